//! User-space-merge scenarios run by `cargo xtask vm-usm`: the real `snapuserd -user_snapshot`
//! serving a COW made by `ota-tools create` (user merge order) as the whole partition, with
//! the dm-user table `0 S user 0 S <misc>` (S = the base device's size in sectors) and no
//! dm-snapshot. The source and the base are the same device, as on a Virtual A/B device, so
//! the merge overwrites blocks that later COPY ops read.
//!
//! `vmtest usm <scenario> <tag> <base> <cow> <target> [key=value]...`, keys:
//! `marker=FILE:CONTENT` (a file to check through a read-only ext4 mount), `at=P[,P...]`
//! (merge_percent points), `ordered=N` (ordered COPY/XOR ops at the head of the merge order,
//! to say in which phase a point fell), `boot=N`, `second=TAG:BASE:COW:TARGET`,
//! `transport=dm-user|ublk` (default dm-user; over ublk the daemon runs with `-ublk` and
//! serves the partition as its own `/dev/ublkb<N>`, named by `get_device_name`; the
//! `read-merge`, `power-cycle` and `pause` scenarios take it, the others re-load dm-user
//! tables and refuse it).
//!
//! * `read-merge`: writes refused, flush acknowledged, whole device == target (O_DIRECT
//!   1 MiB), ext4 mount, random 4 KiB reads == target; `initiate_merge` with a reader looping
//!   over the whole device; `getstatus` until `snapshot-merge-complete`; base == target.
//! * `kill-chain`: `kill -9` at each `at` point; after each, a new daemon on a new misc name
//!   (table reload), the whole device == target, `initiate_merge` again; base == target.
//! * `power-cycle`: one boot of a power-off chain: reads == target before the merge resumes,
//!   then `initiate_merge` and, at `at`, the daemon frozen (SIGSTOP) and the power cut
//!   (`reboot(RB_POWER_OFF)`, no sync); or (no `at`) the merge to the end.
//! * `handoff`: the first-stage daemon (`<tag>-init`) with the merge part-way and paused, the
//!   table reloaded onto `<tag>` while a reader runs, the old daemon SIGTERMed, a new daemon
//!   on `<tag>`, `initiate_merge` on it, merge to the end.
//! * `pause`: `pause_merge` mid-merge (progress stands still), `resume_merge`, to the end.
//! * `two-merge`: two partitions on one daemon with `-num_merge_threads=1`: the second
//!   reports `snapshot-merge` while queued and merges only after the first.
//!
//! Each step prints `VMTEST usm-<step>-<tag> PASS|FAIL <detail>`, figures as `VMINFO`.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cow_format::layout::BufferState;
use cow_format::merge_state::DurableProgress;
use cow_format::MergeState;
use dm_ioctl::{DmControl, TableEntry};

use crate::harness::AlignedBuf;
use crate::scenario_support::{
    compare_device, delete_ublk, dev_bytes, dm, exit_code, loop_read_time, mbps, merged_base_check,
    mount_and_check_file, open_direct, plain_copy_time, report, scenario_args, ublk_node, Daemon,
    Res, Transport, IO_SIZE,
};

/// Longest wait for a merge to finish in one boot.
const MERGE_LIMIT: Duration = Duration::from_secs(300);
/// The flag every daemon of these scenarios runs with besides its transport's: REPLACE/ZERO
/// batches of at most 16 ops (`ro.virtual_ab.cow_op_merge_size`, which libsnapshot passes as
/// `-cow_op_merge_size`), so that phase commits its progress often enough for a kill or
/// power-off point inside it to be reached before the merge ends, however late the loaded
/// emulator schedules the poller.
const MERGE_BATCH_FLAG: &str = "-cow_op_merge_size=16";
/// The flags of a dm-user daemon of these scenarios.
const DM_USER_FLAGS: [&str; 2] = ["-user_snapshot", MERGE_BATCH_FLAG];
/// Random 4 KiB reads of the random-read step.
const RANDOM_READS: usize = 2000;
/// How often the merge's progress is polled while waiting for a kill or power-off point.
const POINT_POLL: Duration = Duration::from_millis(2);

/// Arguments of one scenario.
struct Scenario {
    tag: String,
    base: PathBuf,
    cow: PathBuf,
    target: PathBuf,
    marker: Option<(String, String)>,
    points: Vec<Point>,
    ordered_ops: Option<u64>,
    boot: u32,
    second: Option<Box<Scenario>>,
    transport: Transport,
}

impl Scenario {
    fn parse(tag: &str, base: &str, cow: &str, target: &str, keys: &[String]) -> Res<Self> {
        let mut sc = Scenario {
            tag: tag.into(),
            base: base.into(),
            cow: cow.into(),
            target: target.into(),
            marker: None,
            points: Vec::new(),
            ordered_ops: None,
            boot: 1,
            second: None,
            transport: Transport::DmUser,
        };
        for kv in keys {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("argument {kv:?} is not key=value"))?;
            match k {
                "marker" => {
                    let (f, c) = v
                        .split_once(':')
                        .ok_or_else(|| format!("marker={v}: want FILE:CONTENT"))?;
                    sc.marker = Some((f.into(), c.into()));
                }
                "at" => {
                    sc.points = v
                        .split(',')
                        .map(Point::parse)
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            format!("at={v}: want PERCENT[+MS] with PERCENT in (0, 100)")
                        })?;
                }
                "ordered" => {
                    sc.ordered_ops = Some(v.parse().map_err(|_| format!("ordered={v}"))?);
                }
                "boot" => sc.boot = v.parse().map_err(|_| format!("boot={v}"))?,
                "transport" => sc.transport = Transport::parse(v)?,
                "second" => {
                    let f: Vec<&str> = v.split(':').collect();
                    let [t, b, c, g] = f[..] else {
                        return Err(format!("second={v}: want TAG:BASE:COW:TARGET"));
                    };
                    sc.second = Some(Box::new(Scenario::parse(t, b, c, g, &[])?));
                }
                other => return Err(format!("unknown key {other:?}")),
            }
        }
        Ok(sc)
    }
}

/// A kill or power-off point: once `merge_percent` reaches `percent`, wait `delay` more (to
/// land later inside the step that follows the commit), then act.
#[derive(Debug, Clone, Copy)]
struct Point {
    percent: f64,
    delay: Duration,
}

impl Point {
    /// `PERCENT` or `PERCENT+MS`.
    fn parse(s: &str) -> Option<Self> {
        let (p, ms) = match s.split_once('+') {
            Some((p, ms)) => (p, ms.parse::<u64>().ok().filter(|ms| *ms <= 10_000)?),
            None => (s, 0),
        };
        let percent = p.parse::<f64>().ok().filter(|p| *p > 0.0 && *p < 100.0)?;
        Some(Self {
            percent,
            delay: Duration::from_millis(ms),
        })
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.percent)?;
        if !self.delay.is_zero() {
            write!(f, " + {} ms", self.delay.as_millis())?;
        }
        Ok(())
    }
}

fn vmtest(step: &str, tag: &str, r: &Res<String>) -> bool {
    report("usm", step, tag, r)
}

/// Entry point of `vmtest usm ...`.
pub fn main(args: &[String]) -> ExitCode {
    let Some([kind, tag, base, cow, target]) = scenario_args(args) else {
        eprintln!("usage: vmtest usm SCENARIO TAG BASE COW TARGET [KEY=VALUE]...");
        return ExitCode::FAILURE;
    };
    let sc = match Scenario::parse(tag, base, cow, target, args.get(5..).unwrap_or(&[])) {
        Ok(sc) => sc,
        Err(e) => {
            vmtest(kind, tag, &Err(format!("bad arguments: {e}")));
            return ExitCode::FAILURE;
        }
    };
    let dm_user_only = ["kill-chain", "handoff", "two-merge"];
    if sc.transport != Transport::DmUser && dm_user_only.contains(&kind.as_str()) {
        vmtest(
            kind,
            tag,
            &Err(format!(
                "{kind} reloads dm-user tables: it runs over dm-user only, not {}",
                sc.transport.name()
            )),
        );
        return ExitCode::FAILURE;
    }
    let ok = match kind.as_str() {
        "read-merge" => read_merge(&sc),
        "kill-chain" => kill_chain(&sc),
        "power-cycle" => power_cycle(&sc),
        "handoff" => handoff(&sc),
        "pause" => pause(&sc),
        "two-merge" => two_merge(&sc),
        other => {
            eprintln!("unknown scenario {other:?}");
            false
        }
    };
    exit_code(ok)
}

// ---------------------------------------------------------------------------------------------
// The device: a dm-user table over the whole partition, or the daemon's ublk device.

/// A device-mapper device the scenario created, by name.
struct DmTable {
    dm: DmControl,
    name: String,
}

/// The snapshot device of one partition and the misc name it is served under now.
struct UserDevice {
    /// The dm-user table (dm-user transport); `None` over ublk, where the daemon owns the
    /// device and `delete` removes it.
    table: Option<DmTable>,
    path: PathBuf,
    sectors: u64,
    misc: String,
}

/// The base device's size in sectors (whole, non-empty).
fn base_sectors(sc: &Scenario) -> Res<u64> {
    let bytes = dev_bytes(&sc.base)?;
    if bytes % 512 != 0 || bytes == 0 {
        return Err(format!("base {} is {bytes} bytes", sc.base.display()));
    }
    Ok(bytes / 512)
}

impl UserDevice {
    /// Create `usm-<tag>` with `0 S user 0 S <misc>` (S = the base size in sectors), as
    /// libsnapshot does before `init`.
    fn create(sc: &Scenario, misc: &str) -> Res<Self> {
        let dm = dm()?;
        let sectors = base_sectors(sc)?;
        let name = format!("usm-{}", sc.tag);
        let info = dm
            .create_device(&name, &[TableEntry::dm_user(0, sectors, misc)])
            .map_err(|e| format!("create dm-user {name}: {e}"))?;
        let path = dm
            .ensure_node(&info)
            .map_err(|e| format!("node of {name}: {e}"))?;
        wait_misc_node(misc)?;
        Ok(Self {
            table: Some(DmTable { dm, name }),
            path,
            sectors,
            misc: misc.into(),
        })
    }

    /// The ublk device a `-ublk` daemon created for `misc` on `start`.
    fn over_ublk(daemon: &Daemon, misc: &str, sectors: u64) -> Res<Self> {
        Ok(Self {
            table: None,
            path: ublk_node(daemon, misc)?,
            sectors,
            misc: misc.into(),
        })
    }

    fn table(&self) -> Res<&DmTable> {
        self.table
            .as_ref()
            .ok_or_else(|| "the ublk device has no dm-user table to reload".to_string())
    }

    /// Load `0 S user 0 S <misc>` as the inactive table (same length), creating the new
    /// misc device; [`activate`](Self::activate) makes it live.
    fn load(&mut self, misc: &str) -> Res<()> {
        let t = self.table()?;
        t.dm.load_table(&t.name, &[TableEntry::dm_user(0, self.sectors, misc)])
            .map_err(|e| format!("load dm-user table for {misc}: {e}"))?;
        wait_misc_node(misc)?;
        self.misc = misc.into();
        Ok(())
    }

    /// Suspend and resume: the loaded table goes live, the old target is destroyed once
    /// its in-flight I/O has been answered (its daemon's workers then see ENOTBLK).
    fn activate(&self) -> Res<()> {
        let t = self.table()?;
        t.dm.suspend(&t.name, false)
            .map_err(|e| format!("suspend {}: {e}", t.name))?;
        t.dm.resume(&t.name)
            .map(drop)
            .map_err(|e| format!("resume {}: {e}", t.name))
    }

    /// Remove the dm-user table (nothing to do over ublk: the handler's `delete` removes
    /// that device).
    fn remove(&self) -> Res<()> {
        match &self.table {
            Some(t) => {
                t.dm.remove(&t.name)
                    .map_err(|e| format!("remove {}: {e}", t.name))
            }
            None => Ok(()),
        }
    }
}

/// Wait (bounded) for `/dev/dm-user/<misc>` after a table load.
fn wait_misc_node(misc: &str) -> Res<()> {
    let node = PathBuf::from(format!("/dev/dm-user/{misc}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", node.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `init,<misc>,<cow>,<source>,<base>` (5 fields; the source is the base device, as on a
/// Virtual A/B device) must answer `success,<base sectors>`; then `start,<misc>`.
fn init_and_start(daemon: &Daemon, sc: &Scenario, misc: &str, sectors: u64) -> Res<()> {
    let base = sc.base.display();
    let cmd = format!("init,{misc},{},{base},{base}", sc.cow.display());
    let got = daemon.init_sectors(&cmd)?;
    if got != sectors {
        return Err(format!(
            "{cmd} -> {got} sectors: the base device has {sectors} sectors"
        ));
    }
    expect_reply(daemon, &format!("start,{misc}"), "success")
}

fn expect_reply(daemon: &Daemon, cmd: &str, want: &str) -> Res<()> {
    let got = daemon.command(cmd)?;
    if got == want {
        Ok(())
    } else {
        Err(format!("{cmd} -> {got:?}, want {want:?}"))
    }
}

/// A daemon serving one partition.
struct Stack {
    dev: UserDevice,
    daemon: Daemon,
}

impl Stack {
    /// Daemon `-user_snapshot` (and `-ublk` over ublk) + `flags`; dm-user: the table, then
    /// `init`, `start`; ublk: `init`, `start` (which creates the device), `get_device_name`.
    fn build(sc: &Scenario, misc: &str, flags: &[&str]) -> Res<Self> {
        let mut all = sc.transport.daemon_flags().to_vec();
        all.push(MERGE_BATCH_FLAG);
        all.extend_from_slice(flags);
        let daemon = Daemon::start_with(misc, &all)?;
        let dev = match sc.transport {
            Transport::DmUser => {
                let dev = UserDevice::create(sc, misc)?;
                init_and_start(&daemon, sc, misc, dev.sectors)?;
                dev
            }
            Transport::Ublk => {
                let sectors = base_sectors(sc)?;
                init_and_start(&daemon, sc, misc, sectors)?;
                UserDevice::over_ublk(&daemon, misc, sectors)?
            }
        };
        Ok(Self { dev, daemon })
    }

    fn status(&self) -> Res<String> {
        self.daemon.command(&format!("getstatus,{}", self.dev.misc))
    }

    fn percent(&self) -> Res<f64> {
        merge_percent(&self.daemon)
    }

    fn initiate_merge(&self) -> Res<()> {
        expect_reply(
            &self.daemon,
            &format!("initiate_merge,{}", self.dev.misc),
            "success",
        )
    }

    /// Hand the device over to a new daemon on misc name `misc`, as after a daemon death:
    /// the new table loaded (new misc device), the new daemon's `init` and `start`, then
    /// suspend/resume. The previous daemon is returned (stopped when dropped).
    fn reload_onto_new_daemon(&mut self, sc: &Scenario, misc: &str) -> Res<Daemon> {
        let daemon = Daemon::start_with(misc, &DM_USER_FLAGS)?;
        self.dev.load(misc)?;
        init_and_start(&daemon, sc, misc, self.dev.sectors)?;
        self.dev.activate()?;
        Ok(std::mem::replace(&mut self.daemon, daemon))
    }

    /// dm-user: remove the device (the workers see ENOTBLK), `delete` the handler; ublk:
    /// `delete` must succeed and remove the device. Then stop the daemon.
    fn teardown(self) -> Res<()> {
        if self.dev.table.is_some() {
            self.dev.remove()?;
            let _ = self.daemon.command(&format!("delete,{}", self.dev.misc));
        } else {
            delete_ublk(&self.daemon, &self.dev.misc, &self.dev.path)?;
        }
        drop(self.daemon);
        Ok(())
    }
}

fn merge_percent(daemon: &Daemon) -> Res<f64> {
    let r = daemon.command("merge_percent")?;
    r.trim()
        .parse::<f64>()
        .map_err(|_| format!("merge_percent -> {r:?}"))
}

/// The COW's merge progress as the next daemon would find it (read through the page cache,
/// which the daemon's writes and msyncs go through).
fn durable(cow: &Path) -> Res<DurableProgress> {
    let f = File::open(cow).map_err(|e| format!("open {}: {e}", cow.display()))?;
    MergeState::open(f).and_then(|m| m.progress()).map_err(|e| {
        format!(
            "merge state of {}: {}",
            cow.display(),
            snapuserd::error_chain::ErrorChain(&e)
        )
    })
}

/// Where the merge stood: `num_merge_ops`, the phase, and what the scratch state byte says
/// about the read-ahead commit of the window after it.
fn describe_progress(p: &DurableProgress, ordered: Option<u64>) -> String {
    let phase = match ordered {
        Some(n) if p.num_merge_ops < n => {
            let ra = match p.state {
                BufferState::Done => {
                    "next window's read-ahead committed (cut in its destination writes, their fsync or before its commit)"
                }
                BufferState::InProgress => {
                    "next window's read-ahead not committed yet (cut before or inside the read-ahead commit)"
                }
                BufferState::NotStarted => "read-ahead never committed",
            };
            format!(
                "ordered COPY/XOR phase, {} of {n} ordered ops merged, {ra}",
                p.num_merge_ops
            )
        }
        Some(n) => format!(
            "REPLACE/ZERO phase, {} ops past the {n} ordered ones",
            p.num_merge_ops - n
        ),
        None => format!("scratch state {:?}", p.state),
    };
    format!("num_merge_ops {} ({phase})", p.num_merge_ops)
}

/// Poll `getstatus` until `snapshot-merge-complete`; any status but `snapshot-merge` on the
/// way fails. `on_tick` runs once per poll.
fn wait_complete(
    daemon: &Daemon,
    misc: &str,
    mut on_tick: impl FnMut() -> Res<()>,
) -> Res<Duration> {
    let t = Instant::now();
    loop {
        let s = daemon.command(&format!("getstatus,{misc}"))?;
        match s.as_str() {
            "snapshot-merge-complete" => return Ok(t.elapsed()),
            "snapshot-merge" => {}
            other => {
                return Err(format!(
                    "getstatus,{misc} -> {other:?} after {:.1?} of merging",
                    t.elapsed()
                ))
            }
        }
        on_tick()?;
        if t.elapsed() > MERGE_LIMIT {
            return Err(format!(
                "merge of {misc} not complete after {MERGE_LIMIT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Poll `merge_percent` until it reaches `point` and is past `floor` (the percentage when this
/// daemon resumed the merge: every cut comes after at least one commit of its own), then wait
/// the point's delay; fails if the merge completes first. Returns the percentage seen at the
/// end and the time taken.
fn wait_point(st: &Stack, point: Point, floor: f64) -> Res<(f64, Duration)> {
    let t = Instant::now();
    loop {
        let p = st.percent()?;
        if p >= 100.0 {
            return Err(format!(
                "merge complete ({p}%) before the point {point}: precondition not established"
            ));
        }
        if p >= point.percent && p > floor {
            break;
        }
        if t.elapsed() > MERGE_LIMIT {
            return Err(format!(
                "merge at {p}% after {MERGE_LIMIT:?}, point {point}"
            ));
        }
        std::thread::sleep(POINT_POLL);
    }
    std::thread::sleep(point.delay);
    let p = st.percent()?;
    if p >= 100.0 {
        return Err(format!(
            "merge complete within the delay of the point {point}: precondition not established"
        ));
    }
    Ok((p, t.elapsed()))
}

fn base_check(sc: &Scenario) -> Res<String> {
    merged_base_check(&sc.base, &sc.target)
}

// ---------------------------------------------------------------------------------------------
// Readers.

/// What a looping reader saw.
#[derive(Debug, Default)]
struct ReaderStats {
    passes: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
}

/// A thread reading the whole device (O_DIRECT, 1 MiB) again and again, comparing every
/// chunk with the target, until stopped (at the end of a pass, so every pass is whole).
struct LoopReader {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    handle: JoinHandle<ReaderStats>,
}

impl LoopReader {
    fn start(dev: &Path, target: &Path) -> Res<Self> {
        let len = dev_bytes(target)?;
        let dev_f = open_direct(dev)?;
        let want_f = File::open(target).map_err(|e| format!("open target: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let flag = Arc::clone(&stop);
        let counter = Arc::clone(&bytes);
        let handle = std::thread::spawn(move || {
            let mut st = ReaderStats::default();
            let mut a = AlignedBuf::new(IO_SIZE);
            let mut b = vec![0u8; IO_SIZE];
            while !flag.load(Ordering::Relaxed) {
                let mut off = 0u64;
                while off < len {
                    let n = usize::try_from((len - off).min(IO_SIZE as u64)).unwrap_or(IO_SIZE);
                    match compare_chunk(&dev_f, &want_f, &mut a.as_mut()[..n], &mut b[..n], off) {
                        Ok(()) => {
                            st.bytes += n as u64;
                            counter.store(st.bytes, Ordering::Relaxed);
                        }
                        Err(e) => {
                            st.errors += 1;
                            st.first_error.get_or_insert(e);
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    off += n as u64;
                }
                st.passes += 1;
            }
            st
        });
        Ok(Self {
            stop,
            bytes,
            handle,
        })
    }

    /// Bytes read and found equal so far.
    fn bytes_now(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Stop at the end of the current pass.
    fn finish(self) -> Res<ReaderStats> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| "the reader thread panicked".to_string())
    }
}

/// Read `a.len()` bytes at `off` of `dev` and of `want` and compare them.
fn compare_chunk(dev: &File, want: &File, a: &mut [u8], b: &mut [u8], off: u64) -> Res<()> {
    dev.read_exact_at(a, off)
        .map_err(|e| format!("read at {off}: {e}"))?;
    want.read_exact_at(b, off)
        .map_err(|e| format!("read target at {off}: {e}"))?;
    match a.iter().zip(b.iter()).position(|(x, y)| x != y) {
        None => Ok(()),
        Some(i) => Err(format!("byte {} differs from the target", off + i as u64)),
    }
}

/// Stop `reader` (after its pass); fail on any error it saw, or if it read nothing while
/// `during` covered (`bytes_during`: what it had read when that ended).
fn reader_verdict(reader: LoopReader, what: &str, bytes_during: u64) -> Res<String> {
    let r = reader.finish()?;
    if r.errors > 0 {
        return Err(format!(
            "reader {what}: {} errors over {} passes, first: {}",
            r.errors,
            r.passes,
            r.first_error.unwrap_or_default()
        ));
    }
    if bytes_during == 0 {
        return Err(format!(
            "reader {what}: nothing read in that time: precondition not established"
        ));
    }
    Ok(format!(
        "reader {what}: {} MiB equal to the target in that time, {} whole passes in all, 0 errors",
        bytes_during >> 20,
        r.passes
    ))
}

// ---------------------------------------------------------------------------------------------
// Steps.

/// A write is refused (and changes nothing), a flush is acknowledged, and the whole device
/// reads as the target; figures against a loop device over tmpfs.
fn read_step(sc: &Scenario, st: &Stack) -> Res<String> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(&st.dev.path)
        .map_err(|e| format!("open {} rw O_DIRECT: {e}", st.dev.path.display()))?;
    let junk = AlignedBuf::from(&[0xa5u8; 4096]);
    let write = dev.write_at(junk.as_ref(), 0);
    if write.is_ok() {
        return Err("a 4 KiB O_DIRECT write to the snapshot device succeeded".into());
    }
    dev.sync_all()
        .map_err(|e| format!("fsync (flush) of the snapshot device: {e}"))?;
    drop(dev);
    let len = dev_bytes(&sc.target)?;
    if st.dev.sectors * 512 != len {
        return Err(format!(
            "device is {} bytes, target {len}",
            st.dev.sectors * 512
        ));
    }
    let took = compare_device("snapshot", &st.dev.path, &sc.target, len)?;
    let loop_figure = match loop_read_time(&sc.tag, &sc.target, len) {
        Ok(t) => format!("{:.1} MB/s", mbps(len, t)),
        Err(e) => format!("not measured ({e})"),
    };
    println!(
        "VMINFO usm-{} device read {:.1} MB/s (O_DIRECT 1 MiB, {} MiB) vs the target on a loop device over tmpfs {loop_figure}; daemon VmRSS {} KiB, RssAnon {} KiB",
        sc.tag,
        mbps(len, took),
        len >> 20,
        st.daemon.rss_kib().unwrap_or(0),
        st.daemon.status_kib("RssAnon:").unwrap_or(0)
    );
    Ok(format!(
        "write refused ({}), flush acknowledged, {} MiB equal to the target",
        write.err().map(|e| e.to_string()).unwrap_or_default(),
        len >> 20
    ))
}

/// `RANDOM_READS` O_DIRECT 4 KiB reads at pseudo-random block offsets == target.
fn random_step(sc: &Scenario, st: &Stack) -> Res<String> {
    let len = dev_bytes(&sc.target)?;
    let blocks = len / 4096;
    if blocks == 0 {
        return Err("target smaller than a block".into());
    }
    let dev = open_direct(&st.dev.path)?;
    let want = File::open(&sc.target).map_err(|e| format!("open target: {e}"))?;
    let mut a = AlignedBuf::new(4096);
    let mut b = [0u8; 4096];
    let mut rng = crate::harness::XorShift::new(0x9e37_79b9_7f4a_7c15);
    let t = Instant::now();
    let mut spent = Duration::ZERO;
    for i in 0..RANDOM_READS {
        let off = rng.below(blocks) * 4096;
        let t1 = Instant::now();
        dev.read_exact_at(a.as_mut(), off)
            .map_err(|e| format!("random read {i} at {off}: {e}"))?;
        spent += t1.elapsed();
        want.read_exact_at(&mut b, off)
            .map_err(|e| format!("read target at {off}: {e}"))?;
        if a.as_ref() != b {
            return Err(format!("random read {i}: block {} differs", off / 4096));
        }
    }
    let iops = RANDOM_READS as f64 / spent.as_secs_f64().max(1e-9);
    println!(
        "VMINFO usm-{} random 4 KiB reads: {RANDOM_READS} in {:.2} s ({iops:.0} IOPS, O_DIRECT, queue depth 1)",
        sc.tag,
        t.elapsed().as_secs_f64()
    );
    Ok(format!(
        "{RANDOM_READS} random 4 KiB reads equal to the target"
    ))
}

/// Before `initiate_merge` the daemon reports `snapshot` and has merged nothing.
fn not_merging_yet(sc: &Scenario, st: &Stack) -> Res<DurableProgress> {
    let s = st.status()?;
    if s != "snapshot" {
        return Err(format!(
            "getstatus before initiate_merge -> {s:?}, want \"snapshot\""
        ));
    }
    durable(&sc.cow)
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

fn read_merge(sc: &Scenario) -> bool {
    let st = match Stack::build(sc, &sc.tag, &[]) {
        Ok(s) => s,
        Err(e) => {
            vmtest("read", &sc.tag, &Err(format!("setup: {e}")));
            let steps: &[&str] = if sc.marker.is_some() {
                &["ext4", "random", "merge"]
            } else {
                &["random", "merge"]
            };
            for step in steps {
                vmtest(step, &sc.tag, &Err("no device (setup failed)".into()));
            }
            return false;
        }
    };
    let mut ok = vmtest("read", &sc.tag, &read_step(sc, &st));
    if let Some((file, content)) = &sc.marker {
        ok &= vmtest(
            "ext4",
            &sc.tag,
            &mount_and_check_file(&st.dev.path, &sc.tag, file, content),
        );
    }
    ok &= vmtest("random", &sc.tag, &random_step(sc, &st));
    let merge = (|| -> Res<String> {
        let before = not_merging_yet(sc, &st)?;
        if before.num_merge_ops != 0 {
            return Err(format!("merged ops before initiate_merge: {before:?}"));
        }
        let reader = LoopReader::start(&st.dev.path, &sc.target)?;
        let before = reader.bytes_now();
        st.initiate_merge()?;
        let mut rss = 0;
        let took = wait_complete(&st.daemon, &st.dev.misc, || {
            rss = rss.max(st.daemon.rss_kib().unwrap_or(0));
            Ok(())
        });
        let during = reader.bytes_now() - before;
        let reads = reader_verdict(reader, "during the merge", during);
        let took = took?;
        let reads = reads?;
        let after = durable(&sc.cow)?;
        st.teardown()?;
        let base = base_check(sc)?;
        let merged = after.num_merge_ops;
        println!(
            "VMINFO usm-{} merge of {merged} ops in {:.2} s, daemon peak VmRSS {rss} KiB",
            sc.tag,
            took.as_secs_f64()
        );
        let changed = changed_bytes(sc)?;
        if let Ok(t) = plain_copy_time(&sc.target, &sc.base, changed) {
            println!(
                "VMINFO usm-{} plain copy of {} KiB target->base (O_DIRECT 1 MiB, fsync) {:.2} s vs merge {:.2} s",
                sc.tag,
                changed / 1024,
                t.as_secs_f64(),
                took.as_secs_f64()
            );
        }
        Ok(format!(
            "{base}; {reads}; merge {:.2} s",
            took.as_secs_f64()
        ))
    })();
    vmtest("merge", &sc.tag, &merge) && ok
}

/// Bytes where the base before the merge differed from the target: not known here after the
/// merge, so the COW's op count stands in (one block per op), bounded by the device.
fn changed_bytes(sc: &Scenario) -> Res<u64> {
    let f = File::open(&sc.cow).map_err(|e| format!("open {}: {e}", sc.cow.display()))?;
    let m = MergeState::open(f).map_err(|e| format!("{e}"))?;
    let ops = m.progress().map_err(|e| format!("{e}"))?.num_merge_ops;
    Ok((ops * 4096).min(dev_bytes(&sc.target)?))
}

fn kill_chain(sc: &Scenario) -> bool {
    if sc.points.is_empty() {
        return vmtest("kill-merge", &sc.tag, &Err("no at= points".into()));
    }
    let mut st = match Stack::build(sc, &format!("{}-k0", sc.tag), &[]) {
        Ok(s) => s,
        Err(e) => return vmtest("kill-merge", &sc.tag, &Err(format!("setup: {e}"))),
    };
    let first = (|| -> Res<()> {
        compare_device("snapshot", &st.dev.path, &sc.target, dev_bytes(&sc.target)?)?;
        not_merging_yet(sc, &st)?;
        st.initiate_merge()
    })();
    if let Err(e) = first {
        return vmtest("kill-merge", &sc.tag, &Err(e));
    }
    let mut ok = true;
    let mut floor = 0.0;
    for (i, &point) in sc.points.iter().enumerate() {
        let n = i + 1;
        let step = (|| -> Res<String> {
            let (seen, after) = wait_point(&st, point, floor)?;
            st.daemon.kill9()?;
            let at = durable(&sc.cow)?;
            let misc = format!("{}-k{n}", sc.tag);
            let old = st.reload_onto_new_daemon(sc, &misc)?;
            drop(old);
            let len = dev_bytes(&sc.target)?;
            compare_device("device after the restart", &st.dev.path, &sc.target, len)?;
            let status = st.status()?;
            floor = st.percent()?;
            st.initiate_merge()?;
            Ok(format!(
                "killed {:.2} s after the restart at merge_percent {seen:.1} (point {point}): {}; new daemon on {misc} (status {status}), {} MiB equal to the target before the merge resumed",
                after.as_secs_f64(),
                describe_progress(&at, sc.ordered_ops),
                len >> 20
            ))
        })();
        ok &= vmtest(&format!("kill{n}"), &sc.tag, &step);
        if step.is_err() {
            break;
        }
    }
    let end = (|| -> Res<String> {
        let took = wait_complete(&st.daemon, &st.dev.misc, || Ok(()))?;
        st.teardown()?;
        let base = base_check(sc)?;
        Ok(format!(
            "{base} after {} kills; last daemon finished in {:.2} s",
            sc.points.len(),
            took.as_secs_f64()
        ))
    })();
    vmtest("kill-merge", &sc.tag, &end) && ok
}

/// One boot of the power-off chain.
fn power_cycle(sc: &Scenario) -> bool {
    let b = sc.boot;
    let st = match Stack::build(sc, &sc.tag, &[]) {
        Ok(s) => s,
        Err(e) => {
            return vmtest(
                &format!("boot{b}-read"),
                &sc.tag,
                &Err(format!("setup: {e}")),
            )
        }
    };
    let read = (|| -> Res<String> {
        if b > 1 && st.status()? == "snapshot-merge-complete" {
            return Err(
                "the merge was complete at boot: the previous boot's power cut came after its end: precondition not established"
                    .into(),
            );
        }
        let found = not_merging_yet(sc, &st)?;
        let len = dev_bytes(&sc.target)?;
        compare_device("device after boot", &st.dev.path, &sc.target, len)?;
        let still = durable(&sc.cow)?;
        if still.num_merge_ops != found.num_merge_ops {
            return Err(format!(
                "the merge moved without initiate_merge: {found:?} -> {still:?}"
            ));
        }
        Ok(format!(
            "found {}; {} MiB equal to the target before the merge resumed",
            describe_progress(&found, sc.ordered_ops),
            len >> 20
        ))
    })();
    if !vmtest(&format!("boot{b}-read"), &sc.tag, &read) {
        return false;
    }
    if let Some(&point) = sc.points.first() {
        let r = (|| -> Res<String> {
            let floor = st.percent()?;
            st.initiate_merge()?;
            let (seen, after) = wait_point(&st, point, floor)?;
            // The cut is at this instant: the daemon stops here, then the power goes (the
            // kernel's power-off path takes a while, in which it would go on merging).
            st.daemon.freeze()?;
            let at = durable(&sc.cow)?;
            Ok(format!(
                "daemon frozen (SIGSTOP) and power cut {:.2} s into the merge at merge_percent {seen:.1} (point {point}): {} in the page cache at the cut",
                after.as_secs_f64(),
                describe_progress(&at, sc.ordered_ops)
            ))
        })();
        if vmtest(&format!("poweroff{b}"), &sc.tag, &r) {
            power_cut();
            std::thread::sleep(Duration::from_secs(30));
        }
        return false;
    }
    let end = (|| -> Res<String> {
        st.initiate_merge()?;
        let took = wait_complete(&st.daemon, &st.dev.misc, || Ok(()))?;
        st.teardown()?;
        let base = base_check(sc)?;
        Ok(format!(
            "{base}; the last boot's merge took {:.2} s",
            took.as_secs_f64()
        ))
    })();
    vmtest("power-merge", &sc.tag, &end)
}

/// Power the VM off at once, without syncing anything: the reboot system call from this
/// process (no fork and exec of a poweroff program, during which the merge would go on);
/// busybox `poweroff -f -n` if the call is refused.
fn power_cut() {
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("vmtest usm: reboot(RB_POWER_OFF) returned {err:?}; trying poweroff -f -n");
    // No sync: a power cut. `-n` keeps busybox from syncing.
    let _ = Command::new("poweroff").args(["-f", "-n"]).status();
}

/// First stage to second stage mid-merge, in init's order.
fn handoff(sc: &Scenario) -> bool {
    let first_misc = format!("{}-init", sc.tag);
    let mut st = match Stack::build(sc, &first_misc, &[]) {
        Ok(s) => s,
        Err(e) => return vmtest("handoff", &sc.tag, &Err(format!("setup: {e}"))),
    };
    let r = (|| -> Res<String> {
        let len = dev_bytes(&sc.target)?;
        compare_device("first-stage device", &st.dev.path, &sc.target, len)?;
        // The update's merge is part-way: merge to the point, then hold it, as a first-stage
        // daemon (which never merges) finds it after a reboot mid-merge.
        st.initiate_merge()?;
        let point = sc.points.first().copied().unwrap_or(Point {
            percent: 30.0,
            delay: Duration::ZERO,
        });
        let (seen, _) = wait_point(&st, point, 0.0)?;
        expect_reply(&st.daemon, "pause_merge", "success")?;
        let reader = LoopReader::start(&st.dev.path, &sc.target)?;
        std::thread::sleep(Duration::from_millis(300));
        // init: reload every dm-user table with the same length under `<p>`, SIGTERM the
        // old daemon, start the new one (within dm-user's 4 s daemon timeout).
        let misc = sc.tag.clone();
        let before = reader.bytes_now();
        st.dev.load(&misc)?;
        st.dev.activate()?;
        let swapped = Instant::now();
        let old_pid = st.daemon.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old_pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| format!("SIGTERM to the first-stage daemon {old_pid}: {e}"))?;
        let daemon = Daemon::start_with(&misc, &DM_USER_FLAGS)?;
        let old = std::mem::replace(&mut st.daemon, daemon);
        init_and_start(&st.daemon, sc, &misc, st.dev.sectors)?;
        let serving = swapped.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let status = st.status()?;
        st.initiate_merge()?;
        let took = wait_complete(&st.daemon, &misc, || Ok(()));
        let during = reader.bytes_now() - before;
        let reads = reader_verdict(
            reader,
            "from the table reload to the end of the merge",
            during,
        );
        let took = took?;
        let reads = reads?;
        drop(old);
        st.teardown()?;
        let base = base_check(sc)?;
        Ok(format!(
            "first stage merged to {seen:.1}% and paused; table reloaded onto {misc}, old daemon SIGTERMed, new daemon serving {:.2} s after the swap (status {status}); merge finished by it in {:.2} s; {reads}; {base}",
            serving.as_secs_f64(),
            took.as_secs_f64()
        ))
    })();
    vmtest("handoff", &sc.tag, &r)
}

fn pause(sc: &Scenario) -> bool {
    let st = match Stack::build(sc, &sc.tag, &[]) {
        Ok(s) => s,
        Err(e) => return vmtest("pause", &sc.tag, &Err(format!("setup: {e}"))),
    };
    let r = (|| -> Res<String> {
        st.initiate_merge()?;
        let point = sc.points.first().copied().unwrap_or(Point {
            percent: 20.0,
            delay: Duration::ZERO,
        });
        let (seen, _) = wait_point(&st, point, 0.0)?;
        expect_reply(&st.daemon, "pause_merge", "success")?;
        // A step in flight when the pause arrived may still finish; then nothing moves.
        std::thread::sleep(Duration::from_millis(700));
        let p1 = st.percent()?;
        let d1 = durable(&sc.cow)?;
        std::thread::sleep(Duration::from_secs(2));
        let p2 = st.percent()?;
        let d2 = durable(&sc.cow)?;
        let status = st.status()?;
        if p1 >= 100.0 {
            return Err(
                "merge complete before the pause could be seen: precondition not established"
                    .into(),
            );
        }
        if p1 != p2 || d1 != d2 {
            return Err(format!(
                "merge moved while paused: merge_percent {p1} -> {p2}, {d1:?} -> {d2:?}"
            ));
        }
        if status != "snapshot-merge" {
            return Err(format!("getstatus while paused -> {status:?}"));
        }
        expect_reply(&st.daemon, "resume_merge", "success")?;
        let took = wait_complete(&st.daemon, &st.dev.misc, || Ok(()))?;
        st.teardown()?;
        let base = base_check(sc)?;
        Ok(format!(
            "paused at merge_percent {seen:.1}: {p1} and num_merge_ops {} unchanged over 2 s (status {status}); resumed, finished in {:.2} s; {base}",
            d1.num_merge_ops,
            took.as_secs_f64()
        ))
    })();
    vmtest("pause", &sc.tag, &r)
}

fn two_merge(sc: &Scenario) -> bool {
    let Some(sc2) = sc.second.as_deref() else {
        return vmtest("two-merge", &sc.tag, &Err("no second= partition".into()));
    };
    let r = (|| -> Res<String> {
        let daemon = Daemon::start_with(
            &sc.tag,
            &[DM_USER_FLAGS[0], DM_USER_FLAGS[1], "-num_merge_threads=1"],
        )?;
        let dev1 = UserDevice::create(sc, &sc.tag)?;
        init_and_start(&daemon, sc, &sc.tag, dev1.sectors)?;
        let dev2 = UserDevice::create(sc2, &sc2.tag)?;
        init_and_start(&daemon, sc2, &sc2.tag, dev2.sectors)?;
        expect_reply(&daemon, &format!("initiate_merge,{}", sc.tag), "success")?;
        expect_reply(&daemon, &format!("initiate_merge,{}", sc2.tag), "success")?;
        let queued = daemon.command(&format!("getstatus,{}", sc2.tag))?;
        if queued != "snapshot-merge" {
            return Err(format!("getstatus,{} while queued -> {queued:?}", sc2.tag));
        }
        // While the first merges, the second must not move.
        let mut mid_seen = 0u32;
        let t = Instant::now();
        let took1 = wait_complete(&daemon, &sc.tag, || {
            let d2 = durable(&sc2.cow)?;
            if d2.num_merge_ops != 0 {
                return Err(format!(
                    "{} merged {} ops while {} was still merging (limit 1)",
                    sc2.tag, d2.num_merge_ops, sc.tag
                ));
            }
            let s2 = daemon.command(&format!("getstatus,{}", sc2.tag))?;
            if s2 != "snapshot-merge" {
                return Err(format!("getstatus,{} while queued -> {s2:?}", sc2.tag));
            }
            let d1 = durable(&sc.cow)?;
            if d1.num_merge_ops > 0 {
                mid_seen += 1;
            }
            Ok(())
        })?;
        if mid_seen == 0 {
            return Err(format!(
                "never saw {} part-way while {} waited: precondition not established",
                sc.tag, sc2.tag
            ));
        }
        // libsnapshot: after snapshot-merge-complete, <p> is reloaded (the dm-user target
        // goes) and the handler deleted; the merge slot frees for the queued partition.
        dev1.remove()?;
        let _ = daemon.command(&format!("delete,{}", sc.tag));
        let took2 = wait_complete(&daemon, &sc2.tag, || Ok(()))?;
        let total = t.elapsed();
        dev2.remove()?;
        let _ = daemon.command(&format!("delete,{}", sc2.tag));
        drop(daemon);
        let b1 = base_check(sc)?;
        let b2 = base_check(sc2)?;
        Ok(format!(
            "{} merged in {:.2} s while {} stayed queued (snapshot-merge, 0 ops, {mid_seen} polls with the first part-way), then {} in {:.2} s ({:.2} s in all); {}: {b1}; {}: {b2}",
            sc.tag,
            took1.as_secs_f64(),
            sc2.tag,
            sc2.tag,
            took2.as_secs_f64(),
            total.as_secs_f64(),
            sc.tag,
            sc2.tag
        ))
    })();
    vmtest("two-merge", &sc.tag, &r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_parse_percent_and_optional_delay() {
        let p = Point::parse("29.2+60").unwrap();
        assert_eq!(p.percent, 29.2);
        assert_eq!(p.delay, Duration::from_millis(60));
        assert_eq!(Point::parse("11").unwrap().delay, Duration::ZERO);
        for bad in ["0", "100", "-3", "x", "12+", "12+x", "12+99999"] {
            assert!(Point::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn scenario_keys_are_checked() {
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let sc = Scenario::parse(
            "t",
            "/b",
            "/c",
            "/g",
            &keys(&[
                "at=10,20+5",
                "ordered=7",
                "marker=F:v2",
                "second=u:/b2:/c2:/g2",
                "transport=ublk",
            ]),
        )
        .unwrap();
        assert_eq!(sc.transport, Transport::Ublk);
        assert_eq!(sc.points.len(), 2);
        assert_eq!(sc.ordered_ops, Some(7));
        assert_eq!(sc.marker, Some(("F".into(), "v2".into())));
        assert_eq!(sc.second.map(|s| s.tag), Some("u".into()));
        for bad in [
            &["at=0"][..],
            &["bogus=1"],
            &["second=a:b"],
            &["noequals"],
            &["transport=nbd"],
        ] {
            assert!(Scenario::parse("t", "/b", "/c", "/g", &keys(bad)).is_err());
        }
    }
}
