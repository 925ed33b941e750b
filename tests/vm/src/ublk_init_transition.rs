//! AOSP init's hand-over of snapuserd from first stage to second stage over ublk, played in
//! the order of `SnapuserdSelinuxHelper::RelaunchFirstStageSnapuserd` (AOSP-derived tree
//! `yaap/system_core` at 2081fb7d6, `init/snapuserd_transition.cpp`), with this process as
//! init and libsnapshot:
//!
//! * first stage: `snapuserd -user_snapshot -ublk` on its socket; `init` + `start` of the
//!   partition, `<p>` = dm-linear over `/dev/ublkbN`; optionally `initiate_merge` and some
//!   merge progress; a reader loops over `<p>` (O_DIRECT) from here to the end;
//! * the transition: `detach` to the old daemon, `SIGTERM` to it (no wait), a stream
//!   socketpair, the new daemon exec'd with an empty environment as
//!   `snapuserd -no_socket -user_snapshot -io_uring -ublk <misc,cow,source,base> --fd_num=N`,
//!   init's loop over the requests (one `recv` of up to 4 KiB each, 30 s overall; make the
//!   node named and wait up to 500 ms for it; stop at `DONE` or end of stream), the
//!   daemon-alive indicator (10 s), up to 10 O_DIRECT 4 KiB reads at offset 0 of `<p>` 100 ms
//!   apart, then `SIGKILL` to the old pid;
//! * second stage: the socket handoff proxy gives the new daemon its control socket, and
//!   libsnapshot's `initiate_merge` runs the merge to the end.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dm_ioctl::TableEntry;
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::Pid;

use crate::harness::*;
use crate::scenario_support::{delete_ublk, dm, ublk_node, Daemon};
use crate::ublk_snapshot::{
    check_then_read, handler_files, keep_open_across_exec, make_update, path, wait_merge_complete,
    DIR,
};

/// The partition's misc name in the relaunch arguments (libsnapshot names a ublk snapshot
/// after the partition, `GetSnapshotCowName`).
const MISC: &str = "system_b";
/// The dm-user era's first-stage misc name of the same partition (`<p>-init`).
const MISC_FIRST_STAGE_INIT: &str = "system_b-init";
/// `<p>`: the dm-linear device over the ublk block device (`/dev/block/mapper/system_b`).
const LINEAR: &str = "system_b";
/// The first-stage daemon's control socket: `/run/snapuserd-<name>.sock`.
const FIRST_STAGE: &str = "uinit-first";
/// The second-stage control socket the proxy hands over.
const SECOND_STAGE_SOCKET: &str = "/run/snapuserd-uinit-second.sock";
/// The proxy's SEQPACKET socket (`/dev/socket/snapuserd_proxy` on a device).
const PROXY_SOCKET: &str = "/run/snapuserd-uinit-proxy";
/// init's overall bound on the node requests, and its wait for each node.
const REQUESTS_LIMIT: Duration = Duration::from_secs(30);
const NODE_WAIT: Duration = Duration::from_millis(500);

/// The transition with the partition only served (no merge before it), under the same misc
/// name in both stages; the merge runs in second stage.
pub fn init_transition() -> TestResult {
    transition(false, MISC)
}

/// The transition with a merge in progress in the first-stage daemon, which named the
/// partition `<p>-init`; the second stage (`<p>`) takes that device over and the merge
/// resumes.
pub fn init_transition_merging() -> TestResult {
    transition(true, MISC_FIRST_STAGE_INIT)
}

/// Milliseconds of a nanosecond span, for the report.
fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn expect(d: &Daemon, cmd: &str, want: &str) -> Result<String, String> {
    let reply = d.command(cmd)?;
    check(
        reply == want,
        format!("{cmd:?} answered {reply:?}, want {want:?}"),
    )?;
    Ok(reply)
}

/// Poll `merge_percent` until it is above 0 (at most 20 s); returns the last answer.
fn wait_merge_progress(d: &Daemon) -> Result<String, String> {
    let start = Instant::now();
    loop {
        let p = d.command("merge_percent")?;
        if p.parse::<f64>().is_ok_and(|v| v > 0.0) {
            return Ok(p);
        }
        check(
            start.elapsed() < Duration::from_secs(20),
            format!("no merge progress within 20 s (merge_percent {p:?})"),
        )?;
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// True once `pid` has exited (a zombie, or gone).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|t| {
            t.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// A thread noting (ns since `t0`) when `pid` exits; 0 while it has not. Gives up after
/// 60 s or when `stop` is set.
fn watch_exit(pid: u32, t0: Instant, stop: Arc<AtomicBool>) -> Arc<AtomicU64> {
    let at = Arc::new(AtomicU64::new(0));
    let seen = at.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        while !stop.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(60) {
            if exited(pid) {
                seen.store(ns_since(t0).max(1), Ordering::Release);
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    at
}

/// The nodes this process (as init) made, removed at the end.
#[derive(Default)]
struct MadeNodes {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Drop for MadeNodes {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// As init's device initializer: make node `path` (`kind` S_IFCHR or S_IFBLK) from the
/// `maj:min` in `sysfs_dev` unless it exists, then wait up to [`NODE_WAIT`] for it. Returns
/// whether it exists.
fn make_node(path: &Path, sysfs_dev: &Path, kind: SFlag, made: &mut MadeNodes) -> bool {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            if !dir.exists() && std::fs::create_dir(dir).is_ok() {
                made.dirs.push(dir.to_path_buf());
            }
        }
        let numbers = std::fs::read_to_string(sysfs_dev).unwrap_or_default();
        let parsed = numbers
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
        if let Some((major, minor)) = parsed {
            if mknod(
                path,
                kind,
                Mode::from_bits_truncate(0o600),
                makedev(major, minor),
            )
            .is_ok()
            {
                made.files.push(path.to_path_buf());
            }
        }
    }
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() >= NODE_WAIT {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// What init read on its end of the socketpair.
struct Requests {
    /// Each message, as read (one `recv` each).
    messages: Vec<String>,
    /// ns since `t0` when each message was read.
    read_at: Vec<u64>,
    /// Whether each node request's node existed within [`NODE_WAIT`].
    nodes_ready: Vec<bool>,
    /// ns since `t0` when `DONE` (or the end of stream) came.
    done_at: u64,
}

/// init's `ProcessSnapuserdUeventRequests`: one read of up to 4 KiB per message, 30 s in
/// all; `/dev/ublkc*` -> the character node, `/dev/block/ublk*` -> the block node; stop at a
/// message containing `DONE` or at the end of the stream.
fn serve_requests(
    init_end: &mut std::os::unix::net::UnixStream,
    t0: Instant,
    made: &mut MadeNodes,
) -> Result<Requests, String> {
    let start = Instant::now();
    let mut req = Requests {
        messages: Vec::new(),
        nodes_ready: Vec::new(),
        read_at: Vec::new(),
        done_at: 0,
    };
    loop {
        let left = REQUESTS_LIMIT.saturating_sub(start.elapsed());
        check(
            !left.is_zero(),
            format!("no DONE within 30 s; read {:?}", req.messages),
        )?;
        init_end.set_read_timeout(Some(left)).ctx("timeout")?;
        let mut buf = [0u8; 4096];
        let n = init_end.read(&mut buf).ctx("init's recv")?;
        if n == 0 {
            req.done_at = ns_since(t0);
            return Ok(req);
        }
        let m = String::from_utf8_lossy(&buf[..n]).to_string();
        req.messages.push(m.clone());
        req.read_at.push(ns_since(t0));
        if m.contains("DONE") {
            req.done_at = ns_since(t0);
            return Ok(req);
        }
        let node = Path::new(&m);
        let name = node
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if m.starts_with("/dev/ublkc") {
            let sysfs = PathBuf::from(format!("/sys/class/ublk-char/{name}/dev"));
            req.nodes_ready
                .push(make_node(node, &sysfs, SFlag::S_IFCHR, made));
        } else if m.starts_with("/dev/block/ublk") {
            let sysfs = PathBuf::from(format!("/sys/block/{name}/dev"));
            req.nodes_ready
                .push(make_node(node, &sysfs, SFlag::S_IFBLK, made));
        } else {
            return Err(format!("unknown node request {m:?}"));
        }
    }
}

/// init's `TestSnapuserdIsReady` after the indicator: up to 10 O_DIRECT reads of 4 KiB at
/// offset 0 of `<p>`, 100 ms apart (bounded to 30 s in all, as a read may wait). Returns the
/// number of tries and the data read.
fn probe_ready(p: &Path) -> Result<(u32, Vec<u8>), String> {
    let p = p.to_path_buf();
    bounded(
        "readiness probe of <p>",
        Duration::from_secs(30),
        move || {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags_direct()
                .open(&p)
                .ctx(&format!("open {}", p.display()))?;
            let mut buf = AlignedBuf::new(4096);
            let mut last = String::new();
            for tries in 1..=10u32 {
                match f.read_at(buf.as_mut(), 0) {
                    Ok(4096) => return Ok((tries, buf.as_ref().to_vec())),
                    Ok(n) => last = format!("short read of {n} bytes"),
                    Err(e) => {
                        last = e.to_string();
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            Err(format!(
                "snapuserd daemon failed to launch: 10 probe reads of {} failed, last: {last}",
                p.display()
            ))
        },
    )?
}

/// `O_DIRECT` for `OpenOptions`.
trait DirectExt {
    fn custom_flags_direct(&mut self) -> &mut Self;
}

impl DirectExt for std::fs::OpenOptions {
    fn custom_flags_direct(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(nix::libc::O_DIRECT)
    }
}

/// The relaunched daemon, exec'd as init does: empty environment, `fd` (the child end of
/// the socketpair) left open across the exec, AOSP's argument order.
fn relaunch(handler: &str, fd: i32) -> Result<std::process::Child, String> {
    let mut cmd = Command::new("/bin/snapuserd");
    cmd.env_clear()
        .args(["-no_socket", "-user_snapshot", "-io_uring", "-ublk"])
        .arg(format!("-proxy_socket={PROXY_SOCKET}"))
        .arg(format!(
            "-daemon_alive_indicator={}",
            path("alive").display()
        ))
        .arg(handler)
        .arg(format!("--fd_num={fd}"))
        .stdin(Stdio::null());
    keep_open_across_exec(&mut cmd, fd);
    cmd.spawn().ctx("relaunch /bin/snapuserd")
}

/// Second stage: the proxy (`snapuserd -socket_handoff`) hands the control socket to the
/// relaunched daemon and exits; returns the daemon with that socket.
fn hand_socket_over(child: std::process::Child) -> Result<Daemon, String> {
    let _ = std::fs::remove_file(SECOND_STAGE_SOCKET);
    let _ = std::fs::remove_file(PROXY_SOCKET);
    let mut proxy = Command::new("/bin/snapuserd")
        .args(["-socket_handoff"])
        .arg(format!("-proxy_socket={PROXY_SOCKET}"))
        .arg(format!("-socket={SECOND_STAGE_SOCKET}"))
        .stdin(Stdio::null())
        .spawn()
        .ctx("spawn the handoff proxy")?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = proxy.try_wait().ctx("wait for the proxy")? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = proxy.kill();
            let _ = proxy.wait();
            return Err("the handoff proxy did not finish within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    check(
        status.success(),
        format!("the handoff proxy exited {status}"),
    )?;
    Daemon::adopt(child, PathBuf::from(SECOND_STAGE_SOCKET))
}

/// What the transition measured, in ns since the reader's `t0`.
struct Timeline {
    detach: u64,
    old_exit: u64,
    done: u64,
    ready: u64,
}

fn transition(merging: bool, first_misc: &str) -> TestResult {
    let _ = std::fs::remove_dir_all(DIR);
    let target = Arc::new(make_update()?);
    let sectors = target.len() as u64 / 512;
    let files = handler_files();
    let handler = format!("{MISC},{files}");
    // First stage: init starts the daemon on its socket; libsnapshot maps the partition.
    let mut first = Daemon::start_with(FIRST_STAGE, &["-user_snapshot", "-ublk"])?;
    expect(
        &first,
        &format!("init,{first_misc},{files}"),
        &format!("success,{sectors}"),
    )?;
    expect(&first, &format!("start,{first_misc}"), "success")?;
    let node = ublk_node(&first, first_misc)?;
    let rdev = nix::sys::stat::stat(&node)
        .ctx("stat the ublk node")?
        .st_rdev;
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let dmc = dm()?;
    let info = dmc
        .create_device(
            LINEAR,
            &[TableEntry::linear(
                0,
                sectors,
                &format!("{major}:{minor}"),
                0,
            )],
        )
        .map_err(|e| format!("create dm-linear {LINEAR} over {major}:{minor}: {e}"))?;
    let p = dmc
        .ensure_node(&info)
        .map_err(|e| format!("node of {LINEAR}: {e}"))?;
    let mut second: Option<Daemon> = None;
    let mut relaunched: Option<std::process::Child> = None;
    let mut made = MadeNodes::default();
    let outcome = (|| -> TestResult {
        // First-stage init names `<p>` `/dev/block/dm-N`: the relaunched daemon's update
        // verification reads it there.
        let dm_node = format!("/dev/block/dm-{}", info.minor);
        let dm_sysfs = format!("/sys/block/dm-{}/dev", info.minor);
        check(
            make_node(
                Path::new(&dm_node),
                Path::new(&dm_sysfs),
                SFlag::S_IFBLK,
                &mut made,
            ),
            format!("cannot make {dm_node}"),
        )?;
        let _ = std::fs::remove_file(path("alive"));
        let (t0, stop, reader) = check_then_read(&p, &target)?;
        std::thread::sleep(Duration::from_millis(300));
        // The merge (if any) is caught early, once it has committed progress.
        let percent_before = if merging {
            expect(&first, &format!("initiate_merge,{first_misc}"), "success")?;
            Some(wait_merge_progress(&first)?)
        } else {
            None
        };
        let old_pid = first.pid();
        // 1. detach; 2. SIGTERM, without waiting.
        let detach = ns_since(t0);
        {
            use std::io::Write;
            let mut s = std::os::unix::net::UnixStream::connect(first.socket())
                .ctx("connect to the first-stage daemon")?;
            s.write_all(b"detach").ctx("send detach")?;
        }
        kill(Pid::from_raw(old_pid as i32), Signal::SIGTERM).ctx("SIGTERM the old daemon")?;
        let watch_stop = Arc::new(AtomicBool::new(false));
        let old_exit_at = watch_exit(old_pid, t0, watch_stop.clone());
        // 3. socketpair, fork + exec.
        let (daemon_end, mut init_end) =
            std::os::unix::net::UnixStream::pair().ctx("socketpair")?;
        let child = relaunched.insert(relaunch(&handler, daemon_end.as_raw_fd())?);
        drop(daemon_end);
        let new_pid = child.id();
        // 4. the node requests.
        let requests = serve_requests(&mut init_end, t0, &mut made);
        drop(init_end);
        let requests = requests?;
        // 5. the indicator (10 s), then the probe reads.
        let start = Instant::now();
        while std::fs::read(path("alive"))
            .map(|c| c != b"1")
            .unwrap_or(true)
        {
            check(
                start.elapsed() < Duration::from_secs(10),
                "no daemon-alive indicator within 10 s",
            )?;
            std::thread::sleep(Duration::from_millis(10));
        }
        let (tries, first_block) = probe_ready(&p)?;
        let ready = ns_since(t0);
        same("the probe's block 0 of <p>", &first_block, &target[..4096])?;
        // 6. SIGKILL to the old pid.
        let old_exit = old_exit_at.load(Ordering::Acquire);
        watch_stop.store(true, Ordering::Release);
        match kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(format!("SIGKILL the old daemon: {e}")),
        }
        first.kill9()?;
        check(
            kill(Pid::from_raw(old_pid as i32), None) == Err(nix::errno::Errno::ESRCH),
            format!("old daemon pid {old_pid} still exists"),
        )?;
        let id = node
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("ublkb"))
            .unwrap_or("?")
            .to_string();
        let want = vec![
            format!("/dev/ublkc{id}"),
            format!("/dev/block/ublkb{id}"),
            "DONE\0".to_string(),
        ];
        check(
            requests.messages == want,
            format!("init read {:?}, want {want:?}", requests.messages),
        )?;
        check(
            requests.nodes_ready.iter().all(|&r| r),
            format!(
                "a requested node did not appear within 500 ms: {:?} {:?}",
                requests.messages, requests.nodes_ready
            ),
        )?;
        // Second stage: the control socket, then libsnapshot's merge.
        let child = relaunched.take().ok_or("the relaunched daemon is gone")?;
        let d = hand_socket_over(child)?;
        check(
            d.pid() == new_pid,
            "the adopted daemon is not the relaunched one",
        )?;
        let status = d.command(&format!("getstatus,{MISC}"))?;
        let percent_after = d.command("merge_percent")?;
        let d = second.insert(d);
        expect(d, &format!("initiate_merge,{MISC}"), "success")?;
        wait_merge_complete(d, MISC)?;
        std::thread::sleep(Duration::from_millis(300));
        let reads = stop_reader(&stop, reader)?;
        let times = Timeline {
            detach,
            old_exit,
            done: requests.done_at,
            ready,
        };
        let across = reads.check_outages(&[(times.detach, times.ready)])?;
        let parked = reads
            .spans
            .iter()
            .filter(|&&(s, e)| s < times.ready && e > times.detach)
            .map(|&(s, e)| e - s)
            .max()
            .unwrap_or(0);
        let usual = {
            let mut d: Vec<u64> = reads.spans.iter().map(|&(s, e)| e - s).collect();
            d.sort_unstable();
            d.get(d.len() / 2).copied().unwrap_or(0)
        };
        Ok(format!(
            "first stage {first_misc}, second stage {MISC}; {}detach + SIGTERM, relaunch -no_socket -ublk --fd_num: old daemon exited {} \
             (SIGKILL after the probe found it {}), init read {:?} at {:?} ms (nodes made), DONE at +{:.1} ms, \
             indicator, probe ok at try {tries} at +{:.1} ms; {} reads of <p>, {across:?} across \
             the transition, errors 0, wrong data 0; longest parked read {:.1} ms (median read \
             {:.2} ms); old pid {old_pid} gone; second stage (proxy handoff): getstatus {status:?}, \
             merge_percent {percent_after}, initiate_merge -> complete",
            match &percent_before {
                Some(pc) => format!("merge running in first stage (merge_percent {pc}); "),
                None => String::new(),
            },
            if times.old_exit > 0 {
                format!("by itself at +{:.1} ms", ms(times.old_exit - times.detach))
            } else {
                "only at the SIGKILL".to_string()
            },
            if times.old_exit > 0 {
                "already gone"
            } else {
                "alive"
            },
            requests.messages,
            requests
                .read_at
                .iter()
                .map(|&t| format!("+{:.1}", ms(t.saturating_sub(times.detach))))
                .collect::<Vec<_>>(),
            ms(times.done - times.detach),
            ms(times.ready - times.detach),
            reads.spans.len(),
            ms(parked),
            ms(usual),
        ))
    })();
    let removed = dmc
        .remove(LINEAR)
        .map_err(|e| format!("remove {LINEAR}: {e}"));
    let deleted = match &second {
        Some(d) => delete_ublk(d, MISC, &node),
        None => remove_by_name(MISC),
    };
    if let Some(d) = &second {
        let _ = d.command("stop");
    }
    if let Some(mut c) = relaunched {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(second);
    drop(made);
    let detail = outcome?;
    removed?;
    deleted?;
    let base = std::fs::read(path("base.img")).ctx("base")?;
    same("base after the merge", &base, &target)?;
    let _ = std::fs::remove_dir_all(DIR);
    Ok(format!("{detail}; base == target"))
}

/// Remove the ublk device of `misc` or its first-stage name directly (after a failure, when
/// no daemon serves it).
fn remove_by_name(misc: &str) -> Result<(), String> {
    let mut control = snapuserd::ublk::Control::open().map_err(|e| e.to_string())?;
    let identities: Vec<u64> = snapuserd::ublk::device::takeover_names(misc)
        .iter()
        .map(|n| snapuserd::ublk::identity_of(n))
        .collect();
    for id in snapuserd::ublk::device::device_ids() {
        if let Ok(info) = control.info(id) {
            if identities.contains(&info.ublksrv_flags) {
                let _ = control.stop(id);
                control
                    .delete(id)
                    .map_err(|e| format!("delete ublk {id}: {e}"))?;
            }
        }
    }
    Ok(())
}
