//! The `snapuserd` binary: argument errors, the host socket path, the inherited init socket,
//! `stop` and SIGTERM.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

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

fn ask(s: &mut UnixStream, msg: &[u8]) -> String {
    s.write_all(msg).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn socket_path_serves_query_and_stop_exits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    let mut child = Command::new(BIN)
        .arg(format!("-socket={}", path.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
    let mut child = Command::new(BIN)
        .args(["--socket", path.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
    let mut child = Command::new(BIN)
        .env("ANDROID_SOCKET_snapuserd", listener.as_raw_fd().to_string())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
