//! The user-space-merge snapshot over ublk, with the daemon killed across reads and the
//! merge: a helper process opens a COW, source and base with `snapuserd::user_merge`, serves
//! the whole partition through `UblkDevice::serve` (create, or re-attach after a kill) and
//! optionally merges. A reader loops over the device the whole time.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cow_format::{Compression, CompressionAlgorithm, CowVersion, CowWriter, WriterOptions};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use snapuserd::ublk::{UblkDevice, UblkOptions};
use snapuserd::user_merge::{MergeControl, MergeOutcome, UserSnapshot, UserSnapshotOptions};

use crate::harness::*;

const BLOCK: usize = 4096;
/// Partition size in blocks (32 MiB).
const BLOCKS: usize = 8192;
pub(crate) const DIR: &str = "/tmp/ublk-snap";
const NAME: &str = "system_b";

/// Leave descriptor `fd` open across `cmd`'s exec (clear its close-on-exec flag in the child),
/// as init leaves its end of the node socketpair open for the relaunched daemon.
pub(crate) fn keep_open_across_exec(cmd: &mut Command, fd: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe; nothing is allocated or locked.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The COW, source and base paths of a handler's arguments (`<cow>,<source>,<base>`).
pub(crate) fn handler_files() -> String {
    format!(
        "{},{},{}",
        path("update.cow").display(),
        path("source.img").display(),
        path("base.img").display()
    )
}

pub(crate) fn path(file: &str) -> PathBuf {
    Path::new(DIR).join(file)
}

/// Source, base (= source) and a v3 COW turning it into the target: COPY of 512 blocks from
/// the top of the partition to its start, REPLACE of 4000 blocks, ZERO of 500. Returns the
/// target image.
pub(crate) fn make_update() -> Result<Vec<u8>, String> {
    std::fs::create_dir_all(DIR).ctx("mkdir")?;
    let source = pattern(61, 0, BLOCKS * BLOCK);
    let fresh = pattern(62, 0, BLOCKS * BLOCK);
    let mut target = source.clone();
    let blk = |b: usize| b * BLOCK..(b + 1) * BLOCK;
    let copies: Vec<(usize, usize)> = (0..512).map(|i| (i, 6000 + i)).collect();
    for &(new, old) in &copies {
        target[blk(new)].copy_from_slice(&source[blk(old)]);
    }
    for b in 600..4600 {
        target[blk(b)].copy_from_slice(&fresh[blk(b)]);
    }
    for b in 5000..5500 {
        target[blk(b)].fill(0);
    }
    std::fs::write(path("source.img"), &source).ctx("source")?;
    std::fs::write(path("base.img"), &source).ctx("base")?;
    let file = File::create(path("update.cow")).ctx("cow")?;
    let opts = WriterOptions {
        version: CowVersion::V3,
        compression: Compression {
            algorithm: CompressionAlgorithm::Lz4,
            level: None,
        },
        scratch: true,
        op_count_max: Some(8192),
        ..WriterOptions::default()
    };
    let mut w = CowWriter::create(file, opts).ctx("COW writer")?;
    let order: Vec<u32> = copies.iter().map(|&(new, _)| new as u32).collect();
    w.add_sequence(&order).ctx("sequence")?;
    for &(new, old) in &copies {
        w.add_copy(new as u64, old as u64).ctx("copy")?;
    }
    for b in 600..4600 {
        w.add_replace(b as u64, &fresh[blk(b)]).ctx("replace")?;
    }
    w.add_zero(5000, 500).ctx("zero")?;
    w.finalize().ctx("finalize")?;
    Ok(target)
}

/// `vmtest helper-ublk-snapshot merge|serve`: serve the snapshot in `DIR` as ublk device
/// `NAME` (re-attaching if a killed helper left it), merging with `merge`. Prints
/// `UBLK READY <node> <merged ops> <total ops>`; writes `DIR/merged` when the merge completes;
/// on SIGTERM stops the merge and removes the device.
pub fn helper(args: &[String]) -> Result<(), String> {
    let merge = args.first().map(String::as_str) == Some("merge");
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    term.thread_block().ctx("block SIGTERM")?;
    let snapshot = Arc::new(
        UserSnapshot::open(
            &path("update.cow"),
            &path("source.img"),
            &path("base.img"),
            &UserSnapshotOptions::default(),
        )
        .ctx("open snapshot")?,
    );
    let progress = snapshot.progress();
    let device = UblkDevice::serve(
        snapshot.clone(),
        NAME,
        snapshot.base_sectors(),
        &UblkOptions {
            queues: 2,
            ..UblkOptions::default()
        },
    )
    .ctx("serve over ublk")?;
    println!(
        "UBLK READY {} {} {}",
        device.block_path().display(),
        progress.merged_ops,
        progress.total_ops
    );
    let control = Arc::new(MergeControl::new());
    let merger = merge.then(|| {
        let (snapshot, control) = (snapshot.clone(), control.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let io = snapshot.sync_io().ctx("sync engine")?;
            match snapshot.merge(io, &control).ctx("merge")? {
                MergeOutcome::Complete => {
                    std::fs::write(path("merged"), b"complete").ctx("marker")?;
                    eprintln!("ublk snapshot helper: merge complete");
                }
                MergeOutcome::Stopped => eprintln!("ublk snapshot helper: merge stopped"),
            }
            Ok(())
        })
    });
    term.wait().ctx("wait for SIGTERM")?;
    control.stop();
    if let Some(m) = merger {
        m.join().map_err(|_| "merge thread panicked")??;
    }
    device.remove().ctx("remove")?;
    Ok(())
}

struct SnapHelper {
    child: Child,
    node: PathBuf,
    merged_ops: u64,
    total_ops: u64,
}

impl SnapHelper {
    fn spawn(mode: &str) -> Result<Self, String> {
        let mut child = Command::new("/proc/self/exe")
            .args(["helper-ublk-snapshot", mode])
            .stdout(Stdio::piped())
            .spawn()
            .ctx("spawn snapshot helper")?;
        let line = ublk_ready_line(
            &mut child,
            &format!("snapshot helper {mode}"),
            Duration::from_secs(40),
        )?;
        let w: Vec<&str> = line.split_whitespace().collect();
        Ok(Self {
            node: PathBuf::from(w.get(2).copied().unwrap_or("")),
            merged_ops: w.get(3).and_then(|v| v.parse().ok()).unwrap_or(0),
            total_ops: w.get(4).and_then(|v| v.parse().ok()).unwrap_or(0),
            child,
        })
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    fn kill9(&mut self) -> Result<(), String> {
        kill(self.pid(), Signal::SIGKILL).ctx("SIGKILL")?;
        self.child.wait().ctx("reap")?;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), String> {
        kill(self.pid(), Signal::SIGTERM).ctx("SIGTERM")?;
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().ctx("wait")? {
                return check(s.success(), format!("snapshot helper exited {s}"));
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err("snapshot helper did not exit after SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SnapHelper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// A whole-device buffered read of `node` equals `target` (before any merge).
fn same_whole_device(node: &Path, target: &[u8]) -> Result<(), String> {
    let f = File::open(node).ctx("open snapshot device")?;
    let mut whole = vec![0u8; target.len()];
    f.read_exact_at(&mut whole, 0).ctx("whole-device read")?;
    same("whole device before the merge", &whole, target)
}

/// The whole device reads as `target`; then a [`sequential_reader`] starts. Returns its
/// time origin, its stop flag and its thread.
pub(crate) fn check_then_read(
    node: &Path,
    target: &Arc<Vec<u8>>,
) -> Result<(Instant, Arc<AtomicBool>, std::thread::JoinHandle<ReadLog>), String> {
    same_whole_device(node, target)?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = sequential_reader(node, target, t0, &stop);
    Ok((t0, stop, reader))
}

/// A reader looping over the whole snapshot device in 128 KiB O_DIRECT reads, checking each
/// against `target`, until `stop`.
fn sequential_reader(
    node: &Path,
    target: &Arc<Vec<u8>>,
    t0: Instant,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<ReadLog> {
    const CHUNK: usize = 128 << 10;
    let size = target.len() as u64;
    let mut off = 0u64;
    let next_off = move || {
        let at = off;
        off = (off + CHUNK as u64) % size;
        at
    };
    spawn_checking_reader(
        node.to_path_buf(),
        target.clone(),
        CHUNK,
        t0,
        stop.clone(),
        next_off,
    )
}

/// The snapshot device over ublk: whole-device read == target; a reader loops over the
/// device while the helper is killed (during reads, then twice during the merge) and
/// re-attached; the merge resumes and completes; base == target.
pub fn kill_merge() -> TestResult {
    let _ = std::fs::remove_dir_all(DIR);
    let target = Arc::new(make_update()?);
    let mut helper = SnapHelper::spawn("serve")?;
    let node = helper.node.clone();
    let (t0, stop, reader) = check_then_read(&node, &target)?;
    let ns = move || ns_since(t0);
    let mut kills = Vec::new();
    let mut progress_at_restart = Vec::new();
    // During reads, then during the merge (twice, early), then let it finish.
    for (mode, wait_ms) in [("merge", 300u64), ("merge", 40), ("merge", 120)] {
        std::thread::sleep(Duration::from_millis(wait_ms));
        let killed = ns();
        helper.kill9()?;
        std::thread::sleep(Duration::from_millis(150));
        helper = SnapHelper::spawn(mode)
            .map_err(|e| format!("re-attach failed (the reader waits forever): {e}"))?;
        kills.push((killed, ns()));
        progress_at_restart.push((helper.merged_ops, helper.total_ops));
    }
    let start = Instant::now();
    while !path("merged").exists() {
        check(
            start.elapsed() < Duration::from_secs(40),
            "the merge did not complete within 40 s",
        )?;
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let reads = stop_reader(&stop, reader)?;
    helper.stop()?;
    let across = reads.check_outages(&kills)?;
    let base = std::fs::read(path("base.img")).ctx("base")?;
    same("base after the merge", &base, &target)?;
    let _ = std::fs::remove_dir_all(DIR);
    Ok(format!(
        "3 kill -9 (reads, then merge): {} reads, across the kills {across:?}, errors 0, wrong \
         data 0; merged/total ops at each re-attach {progress_at_restart:?}; base == target",
        reads.spans.len()
    ))
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

/// The daemon itself over ublk (`snapuserd -user_snapshot -ublk`), driven through its control
/// socket as libsnapshot would: `supports,ublk`, 5-field `init`, `start`, `get_device_name`;
/// whole-device read == target; `kill -9` of the daemon during reads and during the merge,
/// each time a new daemon (`init` + `start`) re-attaching to the waiting device while a
/// reader runs across; the merge completes (`getstatus`), base == target, `delete` removes
/// the device.
pub fn daemon_kill_merge() -> TestResult {
    use crate::scenario_support::Daemon;
    const MISC: &str = "product_b";
    let _ = std::fs::remove_dir_all(DIR);
    let target = Arc::new(make_update()?);
    let size = target.len() as u64;
    let init = format!("init,{MISC},{}", handler_files());
    let expect = |d: &Daemon, cmd: &str, want: &str| -> Result<String, String> {
        let reply = d.command(cmd)?;
        check(
            reply.starts_with(want),
            format!("{cmd:?} answered {reply:?}, want {want:?}"),
        )?;
        Ok(reply)
    };
    let flags = ["-user_snapshot", "-ublk", "-worker_count=2"];
    let start_daemon = |merge: bool| -> Result<Daemon, String> {
        let d = Daemon::start_with("ublk", &flags)?;
        expect(&d, &init, &format!("success,{}", size / 512))?;
        expect(&d, &format!("start,{MISC}"), "success")?;
        if merge {
            expect(&d, &format!("initiate_merge,{MISC}"), "success")?;
        }
        Ok(d)
    };
    let mut d = Daemon::start_with("ublk", &flags)?;
    expect(&d, "supports,ublk", "success")?;
    expect(
        &d,
        &format!("get_device_name,{MISC}"),
        "fail,device_not_found",
    )?;
    expect(&d, &init, &format!("success,{}", size / 512))?;
    expect(&d, &format!("create,{MISC},{}", size / 512), "success")?;
    let reply = expect(&d, &format!("get_device_name,{MISC}"), "success,")?;
    let node = PathBuf::from(reply.trim_start_matches("success,"));
    check(node.exists(), format!("{} does not exist", node.display()))?;
    let (t0, stop, reader) = check_then_read(&node, &target)?;
    let ns = move || ns_since(t0);
    let mut kills = Vec::new();
    let mut percent_at_last_kill = String::new();
    // During reads (no merge yet), early in the merge, then once the merge has committed
    // progress (merge_percent above 0).
    for (round, wait_ms) in [300u64, 60, 0].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(wait_ms));
        if round == 2 {
            let start = Instant::now();
            loop {
                let p = d.command("merge_percent")?;
                if p.parse::<f64>().is_ok_and(|v| v > 0.0)
                    || start.elapsed() > Duration::from_secs(20)
                {
                    percent_at_last_kill = p;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let killed = ns();
        d.kill9()?;
        std::thread::sleep(Duration::from_millis(150));
        d = start_daemon(true)
            .map_err(|e| format!("new daemon failed (the reader waits forever): {e}"))?;
        kills.push((killed, ns()));
    }
    // A graceful handoff: `detach` ends the daemon (its device stays, I/O waits), and the
    // next one re-attaches and carries on with the merge.
    std::thread::sleep(Duration::from_millis(100));
    let killed = ns();
    detach_and_wait(&mut d)?;
    std::thread::sleep(Duration::from_millis(100));
    d = start_daemon(true).map_err(|e| format!("daemon after detach failed: {e}"))?;
    kills.push((killed, ns()));
    wait_merge_complete(&d, MISC)?;
    std::thread::sleep(Duration::from_millis(300));
    let reads = stop_reader(&stop, reader)?;
    expect(&d, &format!("delete,{MISC}"), "success")?;
    check(
        !node.exists(),
        format!("{} still exists after delete", node.display()),
    )?;
    let _ = d.command("stop");
    let across = reads.check_outages(&kills)?;
    let base = std::fs::read(path("base.img")).ctx("base")?;
    same("base after the merge", &base, &target)?;
    let _ = std::fs::remove_dir_all(DIR);
    Ok(format!(
        "snapuserd -ublk: 3 kill -9 (reads, merge start, merge at {percent_at_last_kill}%) and a \
         detach handoff, with a new daemon each time: {} reads, across the kills {across:?}, errors 0, wrong data 0; \
         merge complete, base == target; delete removed {}",
        reads.spans.len(),
        node.display()
    ))
}

/// AOSP's layering over ublk, `<p>` = dm-linear on top of the daemon's `/dev/ublkbN`, across
/// the first- to second-stage handoff and a daemon death: the first daemon (`-ublk`, no merge,
/// as first-stage init runs it) serves the device; `<p>` is `0 S linear <ublkbN> 0`, its whole
/// device == target, and a reader loops over `<p>` from here to the end. The first daemon is
/// handed off with `detach` and exits; the second re-attaches through user recovery (`init` +
/// `start`) and starts the merge; it is killed (`kill -9`) mid-merge and a third re-attaches
/// and finishes. `<p>`'s table never changes and keeps naming the same ublk device; the reader
/// sees no error and only target data, with reads in flight across both changes of daemon;
/// base == target.
pub fn daemon_linear_handoff() -> TestResult {
    use crate::scenario_support::{dm, ublk_node, Daemon};
    use dm_ioctl::TableEntry;
    const MISC: &str = "system_b";
    const LINEAR: &str = "ublk-linear-p";
    let _ = std::fs::remove_dir_all(DIR);
    let target = Arc::new(make_update()?);
    let sectors = target.len() as u64 / 512;
    let init = format!("init,{MISC},{}", handler_files());
    let flags = ["-user_snapshot", "-ublk", "-worker_count=2"];
    let expect = |d: &Daemon, cmd: &str, want: &str| -> Result<(), String> {
        let reply = d.command(cmd)?;
        check(
            reply == want,
            format!("{cmd:?} answered {reply:?}, want {want:?}"),
        )
    };
    // init + start: a new device the first time, a re-attach to the waiting one afterwards.
    let serve = |merge: bool| -> Result<(Daemon, PathBuf), String> {
        let d = Daemon::start_with("ublk", &flags)?;
        expect(&d, &init, &format!("success,{sectors}"))?;
        expect(&d, &format!("start,{MISC}"), "success")?;
        if merge {
            expect(&d, &format!("initiate_merge,{MISC}"), "success")?;
        }
        let node = ublk_node(&d, MISC)?;
        Ok((d, node))
    };
    let (mut d, node) = serve(false)?;
    let dmc = dm()?;
    let rdev = nix::sys::stat::stat(&node)
        .ctx("stat the ublk node")?
        .st_rdev;
    let ublk_dev = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let info = dmc
        .create_device(LINEAR, &[TableEntry::linear(0, sectors, &ublk_dev, 0)])
        .map_err(|e| format!("create dm-linear {LINEAR} over {ublk_dev}: {e}"))?;
    let p = dmc
        .ensure_node(&info)
        .map_err(|e| format!("node of {LINEAR}: {e}"))?;
    let table_line = |dmc: &dm_ioctl::DmControl| -> Result<String, String> {
        let t = dmc
            .table(LINEAR)
            .map_err(|e| format!("table of {LINEAR}: {e}"))?;
        Ok(t.iter()
            .map(TableEntry::to_line)
            .collect::<Vec<_>>()
            .join("; "))
    };
    let table_before = table_line(&dmc)?;
    let outcome = (|| -> TestResult {
        let (t0, stop, reader) = check_then_read(&p, &target)?;
        let ns = move || ns_since(t0);
        let mut changes = Vec::new();
        // First stage to second stage: `detach`, the first daemon exits, the second takes
        // the device over and (second stage) starts the merge.
        std::thread::sleep(Duration::from_millis(300));
        let handed = ns();
        detach_and_wait(&mut d)?;
        let (d2, node2) = serve(true).map_err(|e| format!("second-stage daemon: {e}"))?;
        changes.push((handed, ns()));
        d = d2;
        check(
            node2 == node,
            format!(
                "second stage serves {}, not {}",
                node2.display(),
                node.display()
            ),
        )?;
        // The second-stage daemon dies once the merge has committed progress.
        let start = Instant::now();
        let mut percent = String::new();
        while start.elapsed() < Duration::from_secs(20) {
            percent = d.command("merge_percent")?;
            if percent.parse::<f64>().is_ok_and(|v| v > 0.0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let killed = ns();
        d.kill9()?;
        std::thread::sleep(Duration::from_millis(150));
        let (d3, _) = serve(true).map_err(|e| format!("daemon after kill -9: {e}"))?;
        changes.push((killed, ns()));
        d = d3;
        wait_merge_complete(&d, MISC)?;
        std::thread::sleep(Duration::from_millis(300));
        let reads = stop_reader(&stop, reader)?;
        let across = reads.check_outages(&changes)?;
        let table_after = table_line(&dmc)?;
        check(
            table_after == table_before,
            format!("{LINEAR}'s table changed: {table_before:?} -> {table_after:?}"),
        )?;
        Ok(format!(
            "<p> = dm-linear {table_before:?} over {}: detach handoff to a second-stage daemon, \
             then kill -9 of it at merge_percent {percent} and a third re-attaching; {} reads of \
             <p>, across the two changes {across:?}, errors 0, wrong data 0; table unchanged",
            node.display(),
            reads.spans.len()
        ))
    })();
    let removed = dmc
        .remove(LINEAR)
        .map_err(|e| format!("remove {LINEAR}: {e}"));
    let deleted = crate::scenario_support::delete_ublk(&d, MISC, &node);
    let _ = d.command("stop");
    let detail = outcome?;
    removed?;
    deleted?;
    let base = std::fs::read(path("base.img")).ctx("base")?;
    same("base after the merge", &base, &target)?;
    let _ = std::fs::remove_dir_all(DIR);
    Ok(format!("{detail}; merge complete, base == target"))
}

/// Sequential 1 MiB and random 4 KiB O_DIRECT reads of `node` (`size` bytes): (MB/s, IOPS).
fn measure(node: &Path, size: u64) -> Result<(f64, f64), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_direct()
        .open(node)
        .ctx(&format!("open {}", node.display()))?;
    let mut big = AlignedBuf::new(1 << 20);
    let t = Instant::now();
    for off in (0..size).step_by(1 << 20) {
        f.read_exact_at(big.as_mut(), off).ctx("sequential read")?;
    }
    let seq = size as f64 / t.elapsed().as_secs_f64() / 1e6;
    let mut small = AlignedBuf::new(4096);
    let mut rng = crate::harness::XorShift::new(0x2545_F491_4F6C_DD1D);
    const OPS: u64 = 1500;
    let t = Instant::now();
    for _ in 0..OPS {
        f.read_exact_at(small.as_mut(), rng.below(size / 4096) * 4096)
            .ctx("random read")?;
    }
    Ok((seq, OPS as f64 / t.elapsed().as_secs_f64()))
}

/// `vmtest ublk-bench` (second part): the user-space-merge snapshot device (COPY, REPLACE
/// and ZERO over a 32 MiB partition, before any merge) served over ublk by the real read
/// path, against a loop device over the target image on tmpfs; five alternating rounds.
pub fn bench_snapshot() -> Result<(), String> {
    let _ = std::fs::remove_dir_all(DIR);
    let target = make_update()?;
    let size = target.len() as u64;
    std::fs::write(path("target.img"), &target).ctx("target image")?;
    drop(target);
    let mut helper = SnapHelper::spawn("serve")?;
    let lp = crate::bench::LoopDevice::attach(&path("target.img"))?;
    let (mut snap, mut reference) = (Vec::new(), Vec::new());
    for _ in 0..crate::bench::ROUNDS {
        snap.push(measure(&helper.node, size)?);
        reference.push(measure(&lp.path, size)?);
    }
    drop(lp);
    helper.stop()?;
    let _ = std::fs::remove_dir_all(DIR);
    let med = |v: &[(f64, f64)], i: usize| {
        crate::bench::median(v.iter().map(|p| if i == 0 { p.0 } else { p.1 }).collect())
    };
    println!(
        "VMBENCH ublk snapshot-device median: seq-1MiB-read {:.0} MB/s vs loop-tmpfs {:.0} MB/s (ratio {:.2}); rand-4KiB-read {:.0} IOPS vs loop-tmpfs {:.0} IOPS (ratio {:.2}); 32 MiB user-space-merge snapshot (512 COPY, 4000 REPLACE lz4, 500 ZERO blocks), 2 queues, USER_COPY, {} alternating rounds",
        med(&snap, 0),
        med(&reference, 0),
        med(&snap, 0) / med(&reference, 0),
        med(&snap, 1),
        med(&reference, 1),
        med(&snap, 1) / med(&reference, 1),
        crate::bench::ROUNDS
    );
    Ok(())
}

/// Send `detach` (no reply) and wait for the daemon to exit by itself.
/// Poll `getstatus,<misc>` until the merge is complete; fails if it reports a failed merge or takes
/// more than 40 s.
pub(crate) fn wait_merge_complete(
    d: &crate::scenario_support::Daemon,
    misc: &str,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let status = d.command(&format!("getstatus,{misc}"))?;
        if status == "snapshot-merge-complete" {
            return Ok(());
        }
        check(
            status != "snapshot-merge-failed" && start.elapsed() < Duration::from_secs(40),
            format!("merge status {status:?} after {:?}", start.elapsed()),
        )?;
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn detach_and_wait(d: &mut crate::scenario_support::Daemon) -> Result<(), String> {
    use std::io::Write;
    let sock = format!("/run/snapuserd-{}.sock", "ublk");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).ctx("connect")?;
    s.write_all(b"detach").ctx("send detach")?;
    let stat = format!("/proc/{}/stat", d.pid());
    let start = Instant::now();
    loop {
        // A zombie ('Z') or a reaped process: it exited.
        let exited = std::fs::read_to_string(&stat)
            .map(|t| {
                t.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if exited {
            break;
        }
        check(
            start.elapsed() < Duration::from_secs(20),
            "the daemon did not exit within 20 s of detach",
        )?;
        std::thread::sleep(Duration::from_millis(10));
    }
    // Reap it (a signal to a zombie is harmless).
    d.kill9()
}

/// AOSP init's second-stage launch over ublk: `snapuserd -no_socket -user_snapshot -ublk
/// --fd_num=N misc,cow,source,base` with `N` one end of a stream socketpair. This process
/// plays init: one `recv` (up to 4 KiB) per request until `DONE`; the daemon must name
/// `/dev/ublkc<N>` then `/dev/block/ublkb<N>`, each alone in its read, then send `DONE\0`
/// and close its end. The nodes exist (devtmpfs) and the device reads as the target.
pub fn daemon_fd_num() -> TestResult {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    const MISC: &str = "fdnum_b";
    let _ = std::fs::remove_dir_all(DIR);
    let target = Arc::new(make_update()?);
    let (daemon_end, mut init_end) = std::os::unix::net::UnixStream::pair().ctx("socketpair")?;
    let fd = daemon_end.as_raw_fd();
    let mut cmd = Command::new("/bin/snapuserd");
    cmd.args(["-no_socket", "-user_snapshot", "-ublk", "-worker_count=1"])
        .arg("-proxy_socket=/run/fdnum-no-proxy")
        .arg(format!("-daemon_alive_indicator={DIR}/alive"))
        .arg(format!("{MISC},{}", handler_files()))
        .arg(format!("--fd_num={fd}"))
        .stdin(Stdio::null());
    keep_open_across_exec(&mut cmd, fd);
    let mut child = cmd.spawn().ctx("spawn /bin/snapuserd")?;
    drop(daemon_end);
    init_end
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ctx("timeout")?;
    let mut messages = Vec::new();
    let outcome = (|| -> Result<u32, String> {
        loop {
            let mut buf = [0u8; 4096];
            let n = init_end.read(&mut buf).ctx("init's recv")?;
            check(
                n > 0,
                format!("end of stream before DONE after {messages:?}"),
            )?;
            let m = String::from_utf8_lossy(&buf[..n]).to_string();
            messages.push(m.clone());
            if m.contains("DONE") {
                break;
            }
            // As init: wait for the node before the next read (devtmpfs makes it here).
            let local = m.replace("/dev/block/", "/dev/");
            let start = Instant::now();
            while !Path::new(&local).exists() {
                check(
                    start.elapsed() < Duration::from_secs(5),
                    format!("{local} (asked as {m}) never appeared"),
                )?;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let id = messages
            .first()
            .and_then(|m| m.strip_prefix("/dev/ublkc"))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| format!("first request is not /dev/ublkcN: {messages:?}"))?;
        let want = vec![
            format!("/dev/ublkc{id}"),
            format!("/dev/block/ublkb{id}"),
            "DONE\0".to_string(),
        ];
        check(
            messages == want,
            format!("init read {messages:?}, want {want:?}"),
        )?;
        let mut rest = Vec::new();
        init_end.read_to_end(&mut rest).ctx("after DONE")?;
        check(rest.is_empty(), format!("bytes after DONE: {rest:?}"))?;
        same_whole_device(&PathBuf::from(format!("/dev/ublkb{id}")), &target)?;
        Ok(id)
    })();
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let _ = child.wait();
    // The device outlives its daemon (user recovery): remove it.
    let ids = snapuserd::ublk::device::device_ids();
    let mut control = snapuserd::ublk::Control::open().map_err(|e| e.to_string())?;
    for id in ids {
        if let Ok(info) = control.info(id) {
            if info.ublksrv_flags == snapuserd::ublk::identity_of(MISC) {
                let _ = control.stop(id);
                control
                    .delete(id)
                    .map_err(|e| format!("delete ublk {id}: {e}"))?;
            }
        }
    }
    let _ = std::fs::remove_dir_all(DIR);
    let id = outcome?;
    Ok(format!(
        "snapuserd --fd_num: init read \"/dev/ublkc{id}\", \"/dev/block/ublkb{id}\", \"DONE\\0\" \
         (one per recv), then end of stream; /dev/ublkb{id} reads as the target"
    ))
}
