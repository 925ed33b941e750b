//! The OTA demo in user-space-merge mode, run by `cargo xtask demo` inside the emulator.
//!
//! `vmtest demo-usm <base> <cow> <target> <pristine-base> <pristine-cow> changed=<bytes> [rounds=<n>] [transport=dm-user|ublk] [ab_flag=<daemon flag for odd rounds>]`
//!
//! The snapshot device is the whole partition: with dm-user (the default) the table
//! `0 S user 0 S <misc>` (S the base device's size) over `snapuserd -user_snapshot`; with ublk
//! the daemon's own `/dev/ublkb<N>` (`snapuserd -user_snapshot -ublk`, found with
//! `get_device_name`). Either way 5-field `init` (source and base are the same device, as on a
//! Virtual A/B device) and `start`. Round 0 compares the whole device with the target. Each
//! round then measures, alternating with the reference measured in the same boot:
//!
//! * sequential O_DIRECT 1 MiB reads of the whole device, against the target on a loop device
//!   over tmpfs;
//! * random O_DIRECT 4 KiB reads (the same offsets on both);
//! * the daemon's RssAnon and VmRSS while serving;
//! * the merge: `initiate_merge`, `merge_percent` and `getstatus` polled (each sample printed
//!   for the progress plot), the daemon's peak VmRSS sampled, until
//!   `snapshot-merge-complete`; then the base is compared with the target;
//! * a plain O_DIRECT copy of `changed` bytes with fsync onto the merged base (which already
//!   equals the target, so nothing changes): the merge's reference;
//! * a second reference, a plain O_DIRECT copy with one fsync of the changed blocks to their
//!   own places (the COW's destination runs, ascending, 1 MiB at most per I/O; see
//!   `scattered_copy`), also onto the merged base; then, as a diagnostic only (a
//!   `scatter-io` line), the same bytes in the merge's order and run sizes; then checked:
//!   base == target on the changed runs.
//!
//! Before every round after the first, the base and COW disks are restored from their
//! pristine copies, and a new daemon serves a new device. Results are `VMTEST demo-*` lines
//! and `VMDEMO` lines the host turns into `report.json` and the progress plot.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dm_ioctl::{DmControl, TableEntry};

use crate::harness::AlignedBuf;
use crate::scattered_copy::{compare_pieces, copy_pieces_direct, ByteRun};
use crate::scenario_support::{
    compare_device, copy_direct, delete_ublk, dev_bytes, open_direct, time_read, ublk_node, Daemon,
    Res, TmpfsLoop, Transport, IO_SIZE,
};
/// Random 4 KiB reads per device and round.
const RANDOM_READS: u64 = 2_000;
/// Longest wait for one merge.
const MERGE_LIMIT: Duration = Duration::from_secs(900);
/// Interval between merge progress samples (progress, memory, threads).
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Interval between `getstatus` polls for the end of the merge: the merge time is measured
/// to within this.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// Mappings of the daemon listed one by one at the merge's peak: those with this much
/// resident (KiB); the others are summed in one line.
const SMAPS_MIN_KIB: u64 = 64;
/// Control name of the demo's handler.
const MISC: &str = "demo";
/// Device-mapper name of the demo's dm-user device.
const DM_NAME: &str = "demo-user";

/// Arguments of `vmtest demo-usm`.
struct Args {
    base: PathBuf,
    cow: PathBuf,
    target: PathBuf,
    pristine_base: PathBuf,
    pristine_cow: PathBuf,
    changed: u64,
    rounds: usize,
    transport: Transport,
    /// `ab_flag=FLAG`: a daemon flag given on odd rounds only, so that one boot alternates
    /// two daemon configurations (an A/B comparison; the report's medians then mix both).
    ab_flag: Option<String>,
}

impl Args {
    fn parse(args: &[String]) -> Res<Self> {
        let path = |i: usize| -> Res<PathBuf> {
            args.get(i)
                .map(PathBuf::from)
                .ok_or_else(|| "usage: vmtest demo-usm BASE COW TARGET PRISTINE_BASE PRISTINE_COW changed=BYTES [rounds=N] [transport=dm-user|ublk]".to_string())
        };
        let value = |key: &str| {
            args.iter()
                .skip(5)
                .find_map(|a| a.strip_prefix(key).and_then(|v| v.parse::<u64>().ok()))
        };
        Ok(Self {
            base: path(0)?,
            cow: path(1)?,
            target: path(2)?,
            pristine_base: path(3)?,
            pristine_cow: path(4)?,
            changed: value("changed=").ok_or("changed=BYTES is missing")?,
            rounds: value("rounds=")
                .and_then(|r| usize::try_from(r).ok())
                .filter(|r| (1..=20).contains(r))
                .unwrap_or(5),
            transport: match args
                .iter()
                .skip(5)
                .find_map(|a| a.strip_prefix("transport="))
            {
                Some(name) => Transport::parse(name)?,
                None => Transport::DmUser,
            },
            ab_flag: args
                .iter()
                .skip(5)
                .find_map(|a| a.strip_prefix("ab_flag="))
                .filter(|f| f.starts_with('-'))
                .map(str::to_string),
        })
    }
}

/// The daemon and its snapshot device for one round.
struct Device {
    /// The device-mapper control (dm-user transport only: the table is ours to remove).
    dm: Option<DmControl>,
    path: PathBuf,
    daemon: Daemon,
}

impl Device {
    /// The daemon (`-user_snapshot`, plus `-ublk` over ublk), the dm-user table over the
    /// whole base when the transport is dm-user, `init` (5 fields) and `start`; over ublk the
    /// device is the one `start` created (`get_device_name`).
    fn bring_up(
        a: &Args,
        base_sectors: u64,
        workers: Option<u32>,
        extra_flag: Option<&str>,
    ) -> Res<Self> {
        let workers = workers.map(|n| format!("-worker_count={n}"));
        let flags: Vec<&str> = a
            .transport
            .daemon_flags()
            .iter()
            .copied()
            .chain(workers.as_deref())
            .chain(extra_flag)
            .collect();
        let daemon = Daemon::start_with(MISC, &flags)?;
        let table = match a.transport {
            Transport::DmUser => {
                let dm = DmControl::open().map_err(|e| format!("open /dev/mapper/control: {e}"))?;
                let info = dm
                    .create_device(DM_NAME, &[TableEntry::dm_user(0, base_sectors, MISC)])
                    .map_err(|e| format!("create {DM_NAME}: {e}"))?;
                let path = dm
                    .ensure_node(&info)
                    .map_err(|e| format!("node of {DM_NAME}: {e}"))?;
                Some((dm, path))
            }
            Transport::Ublk => None,
        };
        let base = a.base.display();
        let init = format!("init,{MISC},{},{base},{base}", a.cow.display());
        let sectors = daemon.init_sectors(&init)?;
        if sectors != base_sectors {
            return Err(format!(
                "init replied {sectors} sectors, the base device has {base_sectors}"
            ));
        }
        let start = daemon.command(&format!("start,{MISC}"))?;
        if start != "success" {
            return Err(format!("start,{MISC} -> {start:?}"));
        }
        let (dm, path) = match table {
            Some((dm, path)) => (Some(dm), path),
            None => (None, ublk_node(&daemon, MISC)?),
        };
        Ok(Self { dm, path, daemon })
    }

    /// Remove the device (the dm-user table, or the ublk device through `delete`), `delete`
    /// the handler, stop the daemon.
    fn tear_down(self) -> Res<()> {
        let Some(dm) = &self.dm else {
            delete_ublk(&self.daemon, MISC, &self.path)?;
            drop(self.daemon);
            return Ok(());
        };
        let mut removed = dm.remove(DM_NAME);
        for _ in 0..50 {
            if removed.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            removed = dm.remove(DM_NAME);
        }
        removed.map_err(|e| format!("remove {DM_NAME}: {e}"))?;
        let _ = self.daemon.command(&format!("delete,{MISC}"));
        drop(self.daemon);
        Ok(())
    }
}

/// Sequential O_DIRECT 1 MiB reads of `len` bytes of `dev`: MB/s.
fn sequential_mb_s(dev: &Path, len: u64) -> Res<f64> {
    let spent = time_read(dev, len)?;
    Ok(len as f64 / 1e6 / spent.as_secs_f64().max(1e-9))
}

/// Random O_DIRECT 4 KiB reads within `len` bytes of `dev` (offsets from `seed`): reads/s.
fn random_iops(dev: &Path, len: u64, seed: u64) -> Res<f64> {
    let f = open_direct(dev)?;
    let mut a = AlignedBuf::new(4096);
    let blocks = (len / 4096).max(1);
    let mut rng = crate::harness::XorShift::new(seed | 1);
    let t = Instant::now();
    for _ in 0..RANDOM_READS {
        let off = rng.below(blocks) * 4096;
        f.read_exact_at(a.as_mut(), off)
            .map_err(|e| format!("random read {} at {off}: {e}", dev.display()))?;
    }
    Ok(RANDOM_READS as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

/// Counters of one block device from `/proc/diskstats`: reads, sectors read, writes,
/// sectors written, flushes, milliseconds spent flushing, milliseconds busy.
#[derive(Clone, Copy, Default)]
struct DiskCounters {
    reads: u64,
    read_sectors: u64,
    writes: u64,
    write_sectors: u64,
    flushes: u64,
    flush_ms: u64,
    busy_ms: u64,
}

impl DiskCounters {
    /// The counters of `dev` (`/dev/vda` -> `vda`); zero when not found.
    fn of(dev: &Path) -> Self {
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
        for line in text.lines() {
            let f: Vec<u64> = line
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            if line.split_whitespace().nth(2) != Some(name.as_str()) {
                continue;
            }
            // major minor (name) reads merged sectors ms writes merged sectors ms inflight
            // io_ms weighted discards merged sectors ms flushes flush_ms
            let at = |i: usize| f.get(i).copied().unwrap_or(0);
            return Self {
                reads: at(2),
                read_sectors: at(4),
                writes: at(6),
                write_sectors: at(8),
                busy_ms: at(11),
                flushes: at(17),
                flush_ms: at(18),
            };
        }
        Self::default()
    }

    /// What happened between `self` and `later`, as `key value` pairs prefixed `tag_`.
    fn delta(&self, later: &Self, tag: &str) -> String {
        format!(
            "{tag}_reads {} {tag}_read_kib {} {tag}_writes {} {tag}_write_kib {} {tag}_flushes {} {tag}_flush_ms {} {tag}_busy_ms {}",
            later.reads.saturating_sub(self.reads),
            later.read_sectors.saturating_sub(self.read_sectors) / 2,
            later.writes.saturating_sub(self.writes),
            later.write_sectors.saturating_sub(self.write_sectors) / 2,
            later.flushes.saturating_sub(self.flushes),
            later.flush_ms.saturating_sub(self.flush_ms),
            later.busy_ms.saturating_sub(self.busy_ms),
        )
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 in the x86 Linux ABI).
const USER_HZ: f64 = 100.0;

/// CPU time (user + system) of process `pid` and all its threads, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    // rest[0] is the state; utime and stime are fields 14 and 15 of the whole line.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Per thread of process `pid`: (thread id, name, user ticks, system ticks).
fn thread_ticks(pid: u32) -> Vec<(String, String, u64, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_string_lossy().into_owned();
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_string();
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|w| w.parse().unwrap_or(0))
                .collect();
            Some((tid, name, f.get(11).copied()?, f.get(12).copied()?))
        })
        .collect()
}

/// `name:user_s/system_s` of each thread that used CPU between `before` and `after`.
fn thread_cpu_delta(
    before: &[(String, String, u64, u64)],
    after: &[(String, String, u64, u64)],
) -> String {
    let mut out = Vec::new();
    for (tid, name, user, system) in after {
        let (u0, s0) = before
            .iter()
            .find(|b| &b.0 == tid)
            .map(|b| (b.2, b.3))
            .unwrap_or((0, 0));
        let (du, ds) = (user.saturating_sub(u0), system.saturating_sub(s0));
        if du + ds > 0 {
            out.push(format!(
                "{}:{:.2}/{:.2}",
                name.replace(' ', "_"),
                du as f64 / USER_HZ,
                ds as f64 / USER_HZ
            ));
        }
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// What one round measured.
struct Round {
    snapshot_read_mb_s: f64,
    loop_read_mb_s: f64,
    snapshot_rand_iops: f64,
    loop_rand_iops: f64,
    rss_anon_kib: u64,
    rss_serving_kib: u64,
    threads: u64,
    merge_s: f64,
    rss_peak_kib: u64,
    plain_copy_s: f64,
    scattered_copy_s: f64,
}

/// Run the merge to completion: `initiate_merge`, then sample `merge_percent` (printed as
/// `VMDEMO progress`), `getstatus` and the daemon's VmRSS. Returns (seconds, peak VmRSS).
fn merge(round: usize, a: &Args, dev: &Device) -> Res<(f64, u64)> {
    let base0 = DiskCounters::of(&a.base);
    let cow0 = DiskCounters::of(&a.cow);
    let cpu0 = cpu_ticks(dev.daemon.pid());
    let threads0 = thread_ticks(dev.daemon.pid());
    // Latest sample of every thread seen, so that threads ending during the merge (the
    // merge thread itself) still count up to their last sample.
    let mut threads_seen = threads0.clone();
    let reply = dev.daemon.command(&format!("initiate_merge,{MISC}"))?;
    if reply != "success" {
        return Err(format!("initiate_merge,{MISC} -> {reply:?}"));
    }
    let t = Instant::now();
    let mut peak = dev.daemon.status_kib("VmRSS:").unwrap_or(0);
    // What the peak is made of: anonymous memory, file pages, shared memory, threads.
    let mut peak_parts = String::new();
    // The daemon's mappings at the peak (`smaps`, mappings of 64 KiB or more).
    let mut peak_maps: Vec<String> = Vec::new();
    println!("VMDEMO progress {round} 0.000 0.0");
    let mut sampled = Duration::ZERO;
    loop {
        std::thread::sleep(POLL_EVERY);
        let status = dev.daemon.command(&format!("getstatus,{MISC}"))?;
        let elapsed = t.elapsed();
        if status == "snapshot-merge" && elapsed < sampled + SAMPLE_EVERY {
            continue;
        }
        sampled = elapsed;
        for t in thread_ticks(dev.daemon.pid()) {
            match threads_seen.iter_mut().find(|s| s.0 == t.0) {
                Some(seen) => *seen = t,
                None => threads_seen.push(t),
            }
        }
        let rss = dev.daemon.status_kib("VmRSS:").unwrap_or(0);
        if rss > peak || peak_parts.is_empty() {
            peak = peak.max(rss);
            peak_parts = format!(
                "rss_kib {rss} anon_kib {} file_kib {} shmem_kib {} threads {} at_s {:.2}",
                dev.daemon.status_kib("RssAnon:").unwrap_or(0),
                dev.daemon.status_kib("RssFile:").unwrap_or(0),
                dev.daemon.status_kib("RssShmem:").unwrap_or(0),
                dev.daemon.threads(),
                elapsed.as_secs_f64()
            );
            peak_maps = crate::smaps::of_pid(dev.daemon.pid(), SMAPS_MIN_KIB);
        }
        match status.as_str() {
            "snapshot-merge-complete" => {
                println!("VMDEMO progress {round} {:.3} 100.0", elapsed.as_secs_f64());
                // Where the merge's time went: the daemon's CPU time, and what the base and
                // COW disks did (writes, flushes and the time spent flushing).
                println!(
                    "VMDEMO merge-io {round} seconds {:.3} daemon_cpu_s {:.2} {} {}",
                    elapsed.as_secs_f64(),
                    cpu_ticks(dev.daemon.pid()).saturating_sub(cpu0) as f64 / USER_HZ,
                    base0.delta(&DiskCounters::of(&a.base), "base"),
                    cow0.delta(&DiskCounters::of(&a.cow), "cow"),
                );
                println!("VMDEMO merge-io {round} peak {peak_parts}");
                for m in &peak_maps {
                    println!("VMDEMO merge-io {round} peak-smaps {m}");
                }
                // Which threads used the CPU, user/system seconds (a thread that ended
                // during the merge counts up to its last sample, every 50 ms).
                for t in thread_ticks(dev.daemon.pid()) {
                    match threads_seen.iter_mut().find(|s| s.0 == t.0) {
                        Some(seen) => *seen = t,
                        None => threads_seen.push(t),
                    }
                }
                println!(
                    "VMDEMO merge-io {round} thread_cpu_user/system_s {}",
                    thread_cpu_delta(&threads0, &threads_seen)
                );
                return Ok((elapsed.as_secs_f64(), peak));
            }
            "snapshot-merge" => {}
            other => return Err(format!("getstatus during the merge: {other:?}")),
        }
        let percent = dev.daemon.command("merge_percent")?;
        if let Ok(p) = percent.parse::<f64>() {
            println!(
                "VMDEMO progress {round} {:.3} {p:.1}",
                elapsed.as_secs_f64()
            );
            peak_maps = crate::smaps::of_pid(dev.daemon.pid(), SMAPS_MIN_KIB);
        }
        if elapsed > MERGE_LIMIT {
            return Err(format!("merge not done after {MERGE_LIMIT:?} ({percent}%)"));
        }
    }
}

/// One round on the current (fresh) base and COW disks.
fn round(
    i: usize,
    a: &Args,
    lp: &TmpfsLoop,
    (len, base_sectors): (u64, u64),
    (pieces, merge_order_pieces): (&[ByteRun], &[ByteRun]),
) -> Res<Round> {
    let extra_flag = a.ab_flag.as_deref().filter(|_| i % 2 == 1);
    println!(
        "VMDEMO ab {i} daemon_flag {}",
        extra_flag.unwrap_or("(none)")
    );
    let dev = Device::bring_up(a, base_sectors, None, extra_flag)?;
    if i == 0 {
        let checked = compare_device("snapshot", &dev.path, &a.target, len).map(drop);
        println!(
            "VMTEST demo-snapshot-read {} {}",
            if checked.is_ok() { "PASS" } else { "FAIL" },
            match &checked {
                Ok(()) => format!(
                    "{} MiB of the {} device ({}) equal the target",
                    len >> 20,
                    a.transport.name(),
                    dev.path.display()
                ),
                Err(e) => e.clone(),
            }
        );
        checked?;
    }
    // Alternate the device under test and the reference, the reference first on odd rounds.
    let seed = 0x2545_F491_4F6C_DD1D ^ i as u64;
    let (snapshot_read_mb_s, loop_read_mb_s, snapshot_rand_iops, loop_rand_iops) = if i % 2 == 0 {
        let s = sequential_mb_s(&dev.path, len)?;
        let l = sequential_mb_s(lp.dev(), len)?;
        let sr = random_iops(&dev.path, len, seed)?;
        let lr = random_iops(lp.dev(), len, seed)?;
        (s, l, sr, lr)
    } else {
        let l = sequential_mb_s(lp.dev(), len)?;
        let s = sequential_mb_s(&dev.path, len)?;
        let lr = random_iops(lp.dev(), len, seed)?;
        let sr = random_iops(&dev.path, len, seed)?;
        (s, l, sr, lr)
    };
    // Diagnostic (not a report key): a second sequential pass, with the base and COW pages
    // the first pass brought into the page cache (each round starts with the base and COW
    // restored with O_DIRECT, which leaves nothing of them cached).
    let warm = sequential_mb_s(&dev.path, len)?;
    // Diagnostic too: the base disk itself, read the same way (O_DIRECT, so never from the
    // guest's page cache): what the emulated disk alone costs a cold pass.
    let base_disk = sequential_mb_s(&a.pristine_base, len)?;
    println!(
        "VMDEMO read-io {i} warm_snapshot_read_mb_s {warm:.1} base_disk_read_mb_s {base_disk:.1}"
    );
    if let Err(e) =
        crate::read_profile::device_groups(&format!("round{i}"), &dev.path, lp.dev(), &a.cow, len)
    {
        println!("VMPROFILE error {e}");
    }
    let rss_anon_kib = dev.daemon.status_kib("RssAnon:").unwrap_or(0);
    let rss_serving_kib = dev.daemon.status_kib("VmRSS:").unwrap_or(0);
    let threads = dev.daemon.threads();
    // The same mappings while serving, before the merge: what the merge adds is the difference.
    for m in crate::smaps::of_pid(dev.daemon.pid(), SMAPS_MIN_KIB) {
        println!("VMDEMO merge-io {i} serving-smaps {m}");
    }
    let merged = merge(i, a, &dev);
    let torn = dev.tear_down();
    let (merge_s, rss_peak_kib) = merged?;
    torn?;
    let checked = compare_device("merged base", &a.base, &a.target, len).map(drop);
    println!(
        "VMTEST demo-merge-round{i} {} {}",
        if checked.is_ok() { "PASS" } else { "FAIL" },
        match &checked {
            Ok(()) => format!("merge {merge_s:.2} s, base == target ({} MiB)", len >> 20),
            Err(e) => e.clone(),
        }
    );
    checked?;
    // The base equals the target now: copying target bytes onto it changes nothing.
    let base0 = DiskCounters::of(&a.base);
    let plain_copy_s = copy_direct(&a.target, &a.base, a.changed)?.as_secs_f64();
    println!(
        "VMDEMO copy-io {i} seconds {plain_copy_s:.3} {}",
        base0.delta(&DiskCounters::of(&a.base), "base")
    );
    // The second reference: the changed blocks to their own places, onto the same base.
    let base0 = DiskCounters::of(&a.base);
    let scattered_copy_s = copy_pieces_direct(&a.target, &a.base, pieces)?.as_secs_f64();
    println!(
        "VMDEMO scatter-io {i} seconds {scattered_copy_s:.3} {}",
        base0.delta(&DiskCounters::of(&a.base), "base")
    );
    // Diagnostic (not a report key): the same bytes in the merge's order and write sizes.
    let base0 = DiskCounters::of(&a.base);
    let in_order_s = copy_pieces_direct(&a.target, &a.base, merge_order_pieces)?.as_secs_f64();
    println!(
        "VMDEMO scatter-io {i} merge_order_copy_s {in_order_s:.3} pieces {} {}",
        merge_order_pieces.len(),
        base0.delta(&DiskCounters::of(&a.base), "base")
    );
    let checked = compare_pieces(&a.base, &a.target, pieces);
    println!(
        "VMTEST demo-scattered-copy-round{i} {} {}",
        if checked.is_ok() { "PASS" } else { "FAIL" },
        match &checked {
            Ok(()) => format!(
                "scattered copy {scattered_copy_s:.2} s, base == target on the {} pieces",
                pieces.len()
            ),
            Err(e) => e.clone(),
        }
    );
    checked?;
    Ok(Round {
        snapshot_read_mb_s,
        loop_read_mb_s,
        snapshot_rand_iops,
        loop_rand_iops,
        rss_anon_kib,
        rss_serving_kib,
        threads,
        merge_s,
        rss_peak_kib,
        plain_copy_s,
        scattered_copy_s,
    })
}

fn run(a: &Args) -> Res<()> {
    let len = dev_bytes(&a.target)?;
    let base_bytes = dev_bytes(&a.base)?;
    if base_bytes < len {
        return Err(format!("base is {base_bytes} bytes, target {len}"));
    }
    let base_sectors = base_bytes / 512;
    let cow_len = dev_bytes(&a.pristine_cow)?;
    let runs = crate::scattered_copy::runs_of_cow(&a.pristine_cow, len)?;
    let pieces = crate::scattered_copy::io_pieces(&runs, IO_SIZE as u64);
    println!(
        "VMDEMO scatter runs {} pieces {} bytes {}",
        runs.len(),
        pieces.len(),
        runs.iter().map(|r| r.len).sum::<u64>()
    );
    let in_order = crate::scattered_copy::merge_order_runs_of_cow(&a.pristine_cow, len)?;
    let in_order = crate::scattered_copy::io_pieces(&in_order, IO_SIZE as u64);
    println!(
        "VMDEMO scatter merge_order_pieces {} bytes {}",
        in_order.len(),
        in_order.iter().map(|r| r.len).sum::<u64>()
    );
    let lp = TmpfsLoop::attach(PathBuf::from("/tmp/demo-target.img"), &a.target, len)?;
    // What each worker costs in memory: a daemon with 1, 2 and 4 workers serving one
    // sequential and one random pass (before any merge), then RssAnon and VmRSS.
    for workers in [1u32, 2, 4] {
        let dev = Device::bring_up(a, base_sectors, Some(workers), None)?;
        let read = sequential_mb_s(&dev.path, len)
            .and_then(|seq| Ok((seq, sequential_mb_s(&dev.path, len)?)))
            .and_then(|seq| Ok((seq, random_iops(&dev.path, len, 7)?)));
        if let Ok(((first, second), random)) = &read {
            println!(
                "VMDEMO workers {workers} seq_mb_s first {first:.1} second {second:.1} rand_iops {random:.0}"
            );
        }
        println!(
            "VMDEMO workers {workers} rss_anon_kib {} vm_rss_kib {} rss_file_kib {} threads {}",
            dev.daemon.status_kib("RssAnon:").unwrap_or(0),
            dev.daemon.status_kib("VmRSS:").unwrap_or(0),
            dev.daemon.status_kib("RssFile:").unwrap_or(0),
            dev.daemon.threads()
        );
        let torn = dev.tear_down();
        read?;
        torn?;
    }
    // Where a sequential read's time goes without a transport (diagnostic lines only).
    for (tag, file) in [("base", &a.base), ("target", &a.target)] {
        if let Err(e) = crate::read_profile::splice_probe(tag, file) {
            println!("VMPROFILE error {e}");
        }
    }
    if let Err(e) = crate::read_profile::run(&a.cow, &a.base, &a.base, &a.target) {
        println!("VMPROFILE error {e}");
    }
    for i in 0..a.rounds {
        if i > 0 {
            copy_direct(&a.pristine_base, &a.base, base_bytes)?;
            copy_direct(&a.pristine_cow, &a.cow, cow_len)?;
        }
        let r = round(i, a, &lp, (len, base_sectors), (&pieces, &in_order))?;
        println!(
            "VMDEMO round {i} snapshot_read_mb_s {:.1} loop_read_mb_s {:.1} snapshot_rand_iops {:.0} loop_rand_iops {:.0} merge_s {:.3} plain_copy_s {:.3} scattered_copy_s {:.3} rss_anon_kib {} rss_serving_kib {} rss_peak_kib {} threads {}",
            r.snapshot_read_mb_s,
            r.loop_read_mb_s,
            r.snapshot_rand_iops,
            r.loop_rand_iops,
            r.merge_s,
            r.plain_copy_s,
            r.scattered_copy_s,
            r.rss_anon_kib,
            r.rss_serving_kib,
            r.rss_peak_kib,
            r.threads,
        );
    }
    println!(
        "VMDEMO config rounds {} bytes {len} changed {} random_reads {RANDOM_READS} transport {}",
        a.rounds,
        a.changed,
        a.transport.name()
    );
    Ok(())
}

/// Entry point of `vmtest demo-usm ...`.
pub fn main(args: &[String]) -> ExitCode {
    let outcome = Args::parse(args).and_then(|a| run(&a));
    println!(
        "VMTEST demo-usm {}",
        match &outcome {
            Ok(()) => "PASS all rounds".to_string(),
            Err(e) => format!("FAIL {e}"),
        }
    );
    if outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
