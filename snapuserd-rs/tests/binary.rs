//! The `snapuserd` binary: argument errors, the host socket path, the inherited init socket,
//! `stop` and SIGTERM.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

mod common;
use common::control::ask;

const BIN: &str = env!("CARGO_BIN_EXE_snapuserd");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("ANDROID_SOCKET_snapuserd")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The last stderr line (logging may precede it).
fn error_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines().last().unwrap_or_default().to_string()
}

#[test]
fn bad_arguments_exit_non_zero_with_one_line() {
    for args in [
        &["-bogus"][..],
        &["-worker_count=many"],
        &["-no_socket", "onlyone"],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(text.lines().count(), 1, "{args:?}: {text}");
        assert!(text.starts_with("snapuserd: "), "{args:?}: {text}");
    }
}

#[test]
fn missing_socket_and_handlers_are_clear_errors() {
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(
        error_line(&out).contains("ANDROID_SOCKET_snapuserd"),
        "{out:?}"
    );
    let out = run(&["-no_socket"]);
    assert!(!out.status.success());
    assert!(error_line(&out).contains("handler"), "{out:?}");
    // An inherited fd that is not a socket.
    let out = Command::new(BIN)
        .env("ANDROID_SOCKET_snapuserd", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(error_line(&out).contains("not an open socket"), "{out:?}");
    // A connected (not listening) socket.
    let (a, _b) = UnixStream::pair().unwrap();
    nix::fcntl::fcntl(
        &a,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .env("ANDROID_SOCKET_snapuserd", a.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(error_line(&out).contains("not a listening one"), "{out:?}");
}

/// Wait (bounded) until the daemon's socket accepts a connection.
fn connect(path: &Path, child: &mut Child) -> UnixStream {
    for _ in 0..3000 {
        if let Ok(s) = UnixStream::connect(path) {
            return s;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("snapuserd exited early: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("snapuserd never listened on {}", path.display());
}

#[test]
fn socket_path_serves_query_and_stop_exits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    let mut child = spawn_quiet(Command::new(BIN).arg(format!("-socket={}", path.display())));
    let mut c = connect(&path, &mut child);
    assert_eq!(ask(&mut c, b"query"), "active");
    c.write_all(b"stop").unwrap();
    assert!(child.wait().unwrap().success());
    assert!(!path.exists(), "the bound socket is removed on exit");
}

#[test]
fn sigterm_stops_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    let mut child = spawn_quiet(Command::new(BIN).args(["--socket", path.to_str().unwrap()]));
    let mut c = connect(&path, &mut child);
    assert_eq!(ask(&mut c, b"query"), "active");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(child.wait().unwrap().success());
}

#[test]
fn inherited_init_socket_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapuserd");
    let listener = UnixListener::bind(&path).unwrap();
    // Let the child inherit the listening socket, as init does.
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let mut child = spawn_quiet(
        Command::new(BIN).env("ANDROID_SOCKET_snapuserd", listener.as_raw_fd().to_string()),
    );
    drop(listener);
    let mut c = connect(&path, &mut child);
    assert_eq!(ask(&mut c, b"query"), "active");
    assert_eq!(ask(&mut c, b"merge_percent"), "0.000000");
    c.write_all(b"stop").unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn no_socket_handler_with_a_missing_cow_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cow = dir.path().join("absent.cow");
    let src = dir.path().join("source.img");
    std::fs::write(&src, vec![0u8; 4096]).unwrap();
    let spec = format!("sys,{},{}", cow.display(), src.display());
    let out = run(&["-no_socket", &spec]);
    assert!(!out.status.success());
    assert!(
        error_line(&out).contains("cannot open handler sys"),
        "{out:?}"
    );
}

#[test]
fn rc_file_defines_both_services_and_the_ready_trigger() {
    let rc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/snapuserd.rc")).unwrap();
    let lines: Vec<&str> = rc.lines().map(str::trim).collect();
    for want in [
        "service snapuserd /system/bin/snapuserd",
        "service snapuserd_proxy /system/bin/snapuserd -socket-handoff",
        "socket snapuserd stream 0660 system system",
        "socket snapuserd_proxy seqpacket 0660 system root",
        "task_profiles OtaProfiles",
        "seclabel u:r:snapuserd:s0",
        "on property:init.svc.snapuserd=stopped",
        "setprop snapuserd.ready false",
    ] {
        assert!(lines.contains(&want), "snapuserd.rc lacks {want:?}");
    }
    for want in ["oneshot", "disabled", "user root", "group root system"] {
        assert_eq!(
            lines.iter().filter(|l| **l == want).count(),
            2,
            "{want} in each service"
        );
    }
    // The proxy flag must be one the binary accepts.
    let out = run(&["-socket-handoff", "-socket=/nonexistent-dir/x"]);
    assert!(!error_line(&out).contains("flag"), "{out:?}");
}

/// The shared small update (see `common::write_small_update`). Returns (cow, source).
fn write_cow(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cow, src, _) = common::write_small_update(dir);
    (cow, src)
}

/// A directory standing in for /dev/dm-user: a FIFO per misc name, so the daemon's workers
/// open a channel that stays idle.
fn fake_dm_user_dir(dir: &Path, misc: &str) -> std::path::PathBuf {
    let d = dir.join("dm-user");
    std::fs::create_dir(&d).unwrap();
    nix::unistd::mkfifo(&d.join(misc), nix::sys::stat::Mode::S_IRWXU).unwrap();
    d
}

/// A fake property service recording every `name=value` set, answering success.
fn fake_property_service(path: &Path) -> std::sync::mpsc::Receiver<String> {
    let listener = UnixListener::bind(path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut s = conn.unwrap();
            let mut word = [0u8; 4];
            s.read_exact(&mut word).unwrap();
            assert_eq!(u32::from_ne_bytes(word), 0x0002_0001, "PROP_MSG_SETPROP2");
            let mut field = || {
                s.read_exact(&mut word).unwrap();
                let mut text = vec![0u8; u32::from_ne_bytes(word) as usize];
                s.read_exact(&mut text).unwrap();
                String::from_utf8(text).unwrap()
            };
            let name = field();
            let value = field();
            s.write_all(&0i32.to_ne_bytes()).unwrap();
            if tx.send(format!("{name}={value}")).is_err() {
                return;
            }
        }
    });
    rx
}

/// Wait (bounded) for `path` to hold `want`.
fn wait_for_file(path: &Path, want: &str, child: &mut Child) {
    for _ in 0..3000 {
        if std::fs::read_to_string(path).is_ok_and(|s| s == want) {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("snapuserd exited early: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("{} never held {want:?}", path.display());
}

fn sigterm(child: &Child) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

#[test]
fn no_socket_daemon_takes_the_control_socket_from_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let (cow, src) = write_cow(dir.path());
    let dm_user = fake_dm_user_dir(dir.path(), "sys");
    let props = dir.path().join("property_service");
    let set = fake_property_service(&props);
    let proxy = dir.path().join("snapuserd_proxy");
    let control = dir.path().join("snapuserd");
    let alive = dir.path().join("daemon-alive-indicator");
    let host = |name: &str, p: &Path| format!("-{name}={}", p.display());
    let mut daemon = spawn_quiet(Command::new(BIN).args([
        "-no_socket".to_string(),
        "-worker_count=2".to_string(),
        host("dm_user_dir", &dm_user),
        host("proxy_socket", &proxy),
        host("property_socket", &props),
        host("daemon_alive_indicator", &alive),
        format!("sys,{},{}", cow.display(), src.display()),
    ]));
    // Handlers first, then the indicator init waits for.
    wait_for_file(&alive, "1", &mut daemon);
    socket_handoff(&proxy, &control, &[host("property_socket", &props)]);
    assert_eq!(set.recv().unwrap(), "snapuserd.proxy_ready=true");
    // The receiver serves the handed-over socket, then says so.
    assert_eq!(set.recv().unwrap(), "snapuserd.ready=true");
    let mut c = connect(&control, &mut daemon);
    assert_eq!(ask(&mut c, b"query"), "active");
    assert_eq!(ask(&mut c, b"getstatus,sys"), "snapshot");
    assert_eq!(ask(&mut c, b"update-verify"), "success");
    c.write_all(b"stop").unwrap();
    assert!(daemon.wait().unwrap().success());
}

/// Spawn the daemon as `cmd` says, its output discarded: a daemon left behind by a failed
/// assertion must not hold the test's stdout (cargo would wait for it instead of reporting
/// the failure).
fn spawn_quiet(cmd: &mut Command) -> std::process::Child {
    cmd.stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// The proxy side of the socket handoff: `-socket-handoff` from `proxy` to the control
/// socket `control`, with `extra` flags; it must succeed.
fn socket_handoff(proxy: &Path, control: &Path, extra: &[String]) {
    let out = Command::new(BIN)
        .arg("-socket-handoff")
        .arg(format!("-proxy_socket={}", proxy.display()))
        .arg(format!("-socket={}", control.display()))
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A `-no_socket` daemon serving handler `sys` with no proxy to hand a socket over (its
/// proxy path does not exist), writing the daemon-alive indicator at `alive`.
fn spawn_no_socket(
    dir: &Path,
    dm_user: &Path,
    alive: &Path,
    cow: &Path,
    src: &Path,
    extra: &[&str],
) -> std::process::Child {
    spawn_quiet(
        Command::new(BIN)
            .arg("-no_socket")
            .args(extra)
            .arg(format!("-dm_user_dir={}", dm_user.display()))
            .arg(format!("-proxy_socket={}", dir.join("none").display()))
            .arg(format!("-daemon_alive_indicator={}", alive.display()))
            .arg(format!("sys,{},{}", cow.display(), src.display())),
    )
}

#[test]
fn no_socket_daemon_without_a_proxy_serves_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (cow, src) = write_cow(dir.path());
    let dm_user = fake_dm_user_dir(dir.path(), "sys");
    let alive = dir.path().join("alive");
    let mut daemon = spawn_no_socket(dir.path(), &dm_user, &alive, &cow, &src, &[]);
    wait_for_file(&alive, "1", &mut daemon);
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn a_proxy_that_sends_no_fd_is_a_clear_error_and_the_handlers_keep_running() {
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let (cow, src) = write_cow(dir.path());
    let dm_user = fake_dm_user_dir(dir.path(), "sys");
    let proxy = dir.path().join("proxy");
    let listener = snapuserd::daemon::handoff::bind_seqpacket(&proxy).unwrap();
    snapuserd::daemon::sockets::ensure_listening(listener.as_fd(), 4).unwrap();
    let mut daemon = Command::new(BIN)
        .arg("-no_socket")
        .arg(format!("-dm_user_dir={}", dm_user.display()))
        .arg(format!("-proxy_socket={}", proxy.display()))
        .arg(format!(
            "-daemon_alive_indicator={}",
            dir.path().join("alive").display()
        ))
        .arg(format!("sys,{},{}", cow.display(), src.display()))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The daemon connects; we answer with a 1-byte message and no fd.
    // SAFETY: test: accept on a listening socket we own.
    let fd = unsafe {
        libc::accept(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert!(fd >= 0);
    // SAFETY: test: a fresh fd from accept.
    let conn = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    nix::sys::socket::send(conn.as_raw_fd(), b"a", nix::sys::socket::MsgFlags::empty()).unwrap();
    // It refuses (no ACK, connection closed) ...
    let mut back = [0u8; 4];
    let n = nix::sys::socket::recv(
        conn.as_raw_fd(),
        &mut back,
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    assert_eq!(n, 0, "no ACK for a handoff without an fd");
    // ... and keeps serving its handlers until told to stop, then reports the failure.
    assert!(daemon.try_wait().unwrap().is_none());
    sigterm(&daemon);
    let out = daemon.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        error_line(&out).contains("expected exactly one fd, got 0"),
        "{out:?}"
    );
}

#[test]
fn proxy_without_its_sockets_fails_clearly() {
    let out = Command::new(BIN)
        .arg("-socket_handoff")
        .env_remove("ANDROID_SOCKET_snapuserd_proxy")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        error_line(&out).contains("ANDROID_SOCKET_snapuserd_proxy"),
        "{out:?}"
    );
}

/// How many fds `pid` holds open on `path`.
fn fds_open_on(pid: u32, path: &Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|target| target == path)
        .count()
}

#[test]
fn both_modes_open_worker_count_channels_per_handler() {
    let dir = tempfile::tempdir().unwrap();
    let (cow, src) = write_cow(dir.path());
    let dm_user = fake_dm_user_dir(dir.path(), "sys");
    let node = dm_user.join("sys");
    let control = dir.path().join("ctl");
    let mut daemon = spawn_quiet(
        Command::new(BIN)
            .arg(format!("-socket={}", control.display()))
            .arg("-worker_count=4")
            .arg(format!("-dm_user_dir={}", dm_user.display())),
    );
    let mut c = connect(&control, &mut daemon);
    let init = format!("init,sys,{},{}", cow.display(), src.display());
    assert!(ask(&mut c, init.as_bytes()).starts_with("success,"));
    assert_eq!(ask(&mut c, b"start,sys"), "success");
    assert_eq!(
        fds_open_on(daemon.id(), &node),
        4,
        "-worker_count channels with a socket too (AOSP forces 1; see main.rs)"
    );
    c.write_all(b"stop").unwrap();
    assert!(daemon.wait().unwrap().success());

    let alive = dir.path().join("alive");
    let mut daemon = spawn_no_socket(
        dir.path(),
        &dm_user,
        &alive,
        &cow,
        &src,
        &["-worker_count=3"],
    );
    wait_for_file(&alive, "1", &mut daemon);
    assert_eq!(
        fds_open_on(daemon.id(), &node),
        3,
        "-worker_count without a socket"
    );
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn proxy_hands_over_init_style_inherited_sockets() {
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    let dir = tempfile::tempdir().unwrap();
    let proxy_path = dir.path().join("snapuserd_proxy");
    let control = dir.path().join("snapuserd");
    // As init creates them: bound, not listening, inherited by the service.
    let proxy: OwnedFd = snapuserd::daemon::handoff::bind_seqpacket(&proxy_path).unwrap();
    let server = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    nix::sys::socket::bind(
        server.as_raw_fd(),
        &nix::sys::socket::UnixAddr::new(&control).unwrap(),
    )
    .unwrap();
    for fd in [proxy.as_fd(), server.as_fd()] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
    }
    let props = dir.path().join("property_service");
    let set = fake_property_service(&props);
    let child = Command::new(BIN)
        .arg("-socket_handoff")
        .arg(format!("-property_socket={}", props.display()))
        .env(
            "ANDROID_SOCKET_snapuserd_proxy",
            proxy.as_raw_fd().to_string(),
        )
        .env("ANDROID_SOCKET_snapuserd", server.as_raw_fd().to_string())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    drop((proxy, server));
    assert_eq!(set.recv().unwrap(), "snapuserd.proxy_ready=true");
    let listener = snapuserd::daemon::handoff::receive_listener(
        &proxy_path,
        &snapuserd::daemon::events::DaemonEvents::new().unwrap(),
        &|| false,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // The received socket is the one bound at the control path, now listening.
    let _client = UnixStream::connect(&control).unwrap();
    listener.accept().unwrap();
}

#[test]
fn help_prints_the_usage_and_exits_zero() {
    for flag in ["--help", "-h", "-help"] {
        let out = run(&[flag]);
        assert!(out.status.success(), "{flag}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("Usage: snapuserd"), "{flag}: {text}");
        for listed in [
            "-socket=",
            "-no_socket",
            "-socket_handoff",
            "-worker_count=",
            "-user_snapshot",
            "-io_uring",
            "-o_direct",
            "-cow_op_merge_size=",
            "-proxy_socket=",
            "-property_socket=",
            "-daemon_alive_indicator=",
            "-dm_user_dir=",
        ] {
            assert!(text.contains(listed), "{flag}: {listed} not listed");
        }
        assert!(out.stderr.is_empty(), "{flag}: {out:?}");
    }
    // An unknown flag points at the usage.
    assert!(error_line(&run(&["-bogus"])).contains("--help"));
}

#[test]
fn a_socket_name_without_a_slash_is_explained() {
    let out = run(&["-socket=adir"]);
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(line.contains("ANDROID_SOCKET_adir"), "{line}");
    assert!(
        line.contains("taken as the name of a socket init creates"),
        "{line}"
    );
    assert!(line.contains("-socket=./adir"), "{line}");
}

#[test]
fn io_flusher_refusal_is_explained_at_info_level_on_a_host() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    let mut child = Command::new(BIN)
        .arg(format!("-socket={}", path.display()))
        .env("RUST_LOG", "info")
        .env("RUST_LOG_STYLE", "never")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = connect(&path, &mut child);
    c.write_all(b"stop").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PR_SET_IO_FLUSHER"))
        .collect();
    // Where the kernel allows it (root with CAP_SYS_RESOURCE) nothing is logged.
    assert!(lines.len() <= 1, "said once: {log}");
    for line in lines {
        assert!(line.contains(" INFO "), "info level on a host: {line}");
        assert!(
            line.contains("CAP_SYS_RESOURCE") || line.contains("5.6"),
            "{line}"
        );
    }
}

/// Ask `getstatus` until it answers something other than `snapshot-merge`.
fn wait_merge_end(c: &mut UnixStream, misc: &str) -> String {
    // A minute is a hang, not a slow machine.
    for _ in 0..12_000 {
        let s = ask(c, format!("getstatus,{misc}").as_bytes());
        if s != "snapshot-merge" {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("{misc}: still merging after a minute");
}

#[test]
fn user_snapshot_init_start_merge_and_status_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let u = common::write_user_update(dir.path(), "sys", 256);
    let dm_user = fake_dm_user_dir(dir.path(), "sys");
    let control = dir.path().join("snapuserd");
    let mut daemon = spawn_quiet(
        Command::new(BIN)
            .arg("-user_snapshot")
            .arg(format!("-socket={}", control.display()))
            .arg(format!("-dm_user_dir={}", dm_user.display()))
            .arg("-num_merge_threads=1"),
    );
    let mut c = connect(&control, &mut daemon);
    let init = format!(
        "init,sys,{},{},{}",
        u.cow.display(),
        u.source.display(),
        u.base.display()
    );
    assert_eq!(
        ask(&mut c, init.as_bytes()),
        format!("success,{}", 256 * common::BLOCK / 512)
    );
    let legacy = format!("init,old,{},{}", u.cow.display(), u.source.display());
    assert_eq!(ask(&mut c, legacy.as_bytes()), "fail", "-user_snapshot");
    assert_eq!(ask(&mut c, b"start,sys"), "success");
    assert_eq!(ask(&mut c, b"getstatus,sys"), "snapshot");
    assert_eq!(ask(&mut c, b"merge_percent"), "0.000000");
    assert_eq!(ask(&mut c, b"initiate_merge,sys"), "success");
    assert_eq!(wait_merge_end(&mut c, "sys"), "snapshot-merge-complete");
    assert_eq!(ask(&mut c, b"merge_percent"), "100.000000");
    assert_eq!(std::fs::read(&u.base).unwrap(), u.target);
    c.write_all(b"stop").unwrap();
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn no_socket_user_snapshot_handlers_verify_and_merge_after_the_handoff() {
    let dir = tempfile::tempdir().unwrap();
    let u = common::write_user_update(dir.path(), "sys", 128);
    let dm_user = fake_dm_user_dir(dir.path(), "sys");
    // The snapshot device update verification reads.
    let devices = dir.path().join("devices");
    std::fs::create_dir(&devices).unwrap();
    std::fs::write(devices.join("sys"), &u.target).unwrap();
    let proxy = dir.path().join("snapuserd_proxy");
    let control = dir.path().join("snapuserd");
    let alive = dir.path().join("alive");
    let host = |name: &str, p: &Path| format!("-{name}={}", p.display());
    let mut daemon = spawn_quiet(Command::new(BIN).args([
        "-no_socket".to_string(),
        "-user_snapshot".to_string(),
        host("dm_user_dir", &dm_user),
        host("proxy_socket", &proxy),
        host("daemon_alive_indicator", &alive),
        host("verify_device_dir", &devices),
        format!(
            "sys,{},{},{}",
            u.cow.display(),
            u.source.display(),
            u.base.display()
        ),
    ]));
    wait_for_file(&alive, "1", &mut daemon);
    socket_handoff(&proxy, &control, &[]);
    let mut c = connect(&control, &mut daemon);
    assert_eq!(ask(&mut c, b"update-verify"), "success");
    assert_eq!(ask(&mut c, b"getstatus,sys"), "snapshot");
    assert_eq!(ask(&mut c, b"initiate_merge,sys"), "success");
    assert_eq!(wait_merge_end(&mut c, "sys"), "snapshot-merge-complete");
    assert_eq!(std::fs::read(&u.base).unwrap(), u.target);
    c.write_all(b"stop").unwrap();
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn a_legacy_handler_argument_for_a_user_snapshot_daemon_is_a_clear_error() {
    let out = run(&["-no_socket", "-user_snapshot", "sys,/c,/s"]);
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(
        line.contains("legacy") && line.contains("misc,cow,source,base"),
        "{line}"
    );
}

/// `cmd` with `fd` inherited across exec (as init leaves its socketpair end to the daemon).
fn inherit_fd(cmd: &mut Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which
    // is async-signal-safe; the parent's copy of `fd` keeps its close-on-exec flag.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn fd_num_daemon_sends_done_to_init_and_closes_once_its_handlers_started() {
    let dir = tempfile::tempdir().unwrap();
    let (cow, src) = write_cow(dir.path());
    let dm_user = fake_dm_user_dir(dir.path(), "sys");
    let alive = dir.path().join("alive");
    let (daemon_end, mut init_end) = UnixStream::pair().unwrap();
    let fd_arg = format!("--fd_num={}", daemon_end.as_raw_fd());
    let mut cmd = Command::new(BIN);
    cmd.arg("-no_socket")
        .arg(format!("-dm_user_dir={}", dm_user.display()))
        .arg(format!(
            "-proxy_socket={}",
            dir.path().join("none").display()
        ))
        .arg(format!("-daemon_alive_indicator={}", alive.display()))
        .arg(format!("sys,{},{}", cow.display(), src.display()))
        .arg(&fd_arg)
        .stderr(Stdio::null())
        .stdout(Stdio::null());
    inherit_fd(&mut cmd, daemon_end.as_raw_fd());
    let mut daemon = cmd.spawn().unwrap();
    drop(daemon_end);
    init_end
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    // A dm-user handler needs no ublk node: init reads only DONE with its NUL, then the
    // end of the stream (the daemon closed its end; the test's copy is gone).
    let mut got = Vec::new();
    init_end.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"DONE\0");
    wait_for_file(&alive, "1", &mut daemon);
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn fd_num_that_is_not_a_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cow, src) = write_cow(dir.path());
    let dm_user = fake_dm_user_dir(dir.path(), "sys");
    let file = std::fs::File::open("/dev/null").unwrap();
    let handler = format!("sys,{},{}", cow.display(), src.display());
    let dm_user_arg = format!("-dm_user_dir={}", dm_user.display());
    // Inherited but not a socket.
    let mut cmd = Command::new(BIN);
    cmd.args(["-no_socket", &dm_user_arg, &handler])
        .arg(format!("-fd_num={}", file.as_raw_fd()))
        .stdin(Stdio::null());
    inherit_fd(&mut cmd, file.as_raw_fd());
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(error_line(&out).contains("not a socket"), "{out:?}");
    // Not open in the daemon (close-on-exec), or not a descriptor number at all.
    for (arg, says) in [
        (
            format!("-fd_num={}", file.as_raw_fd()),
            "no such open descriptor",
        ),
        ("-fd_num=2".to_string(), "not a descriptor number"),
        ("-fd_num=-3".to_string(), "fd_num"),
    ] {
        let out = run(&["-no_socket", &dm_user_arg, &handler, &arg]);
        assert!(!out.status.success(), "{arg}: {out:?}");
        assert!(error_line(&out).contains(says), "{arg}: {out:?}");
    }
}
