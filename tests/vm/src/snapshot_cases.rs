//! Snapshot scenarios run by `cargo xtask vm-snapshot`: the real `snapuserd` daemon serving a
//! COW made by `ota-tools create` as dm-snapshot's exception store over dm-user.
//!
//! `vmtest snap <scenario> <tag> <base> <cow> <target> [<file>=<content>] [at=<percent>]`
//!
//! * `read-merge`: daemon `init`/`start`, `snapshot <base> <dm-user> P 8`, the whole snapshot
//!   compared with the target (and a file checked through a read-only ext4 mount when one is
//!   named), then `snapshot-merge` until done and the base compared with the target;
//! * `kill-merge`: as `read-merge`, but the daemon is `kill -9`ed while the merge runs and a new
//!   daemon takes over on a new misc name (new dm-user table, suspend, resume);
//! * `handoff-merge`: as `read-merge`, with a live handoff to a second daemon mid-merge (new
//!   daemon initialised first, then the dm-user table swapped under snapshot-merge);
//! * `transition-merge`: the same in the order of init's SELinux transition (table swapped
//!   first with the same length, old daemon stopped, new daemon started);
//! * `pause-merge`: as `read-merge`, with `pause_merge` mid-merge (the merge must stand still)
//!   and `resume_merge`;
//! * `poweroff-merge`: snapshot, start the merge, power the VM off while it runs;
//! * `resume-merge`: (second boot) daemon, dm-user, `snapshot-merge` directly, finish, compare.
//!
//! Each step prints `VMTEST snap-<step>-<tag> PASS|FAIL <detail>` and figures as `VMINFO`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use dm_ioctl::{DmControl, SnapshotStatus, TableEntry};

use crate::scenario_support::{
    compare_device, dev_bytes, dm, exit_code, loop_read_time, mbps, merged_base_check,
    mount_and_check_file, plain_copy_time, report, scenario_args, time_read, Daemon, Res,
};

/// Chunk size of the snapshot, in sectors (4 KiB, as Android uses).
const CHUNK_SECTORS: u32 = 8;
/// Longest wait for the merge to finish in one boot.
const MERGE_LIMIT: Duration = Duration::from_secs(900);

/// How the merge of a `read-merge`-style scenario is run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MergeMode {
    /// One daemon from start to end.
    Plain,
    /// The daemon is `kill -9`ed mid-merge; a new one takes over.
    Kill,
    /// Live handoff mid-merge, libsnapshot's second-stage path: a new daemon is initialised
    /// on a new misc name while the old one keeps serving the merge, then the dm-user table
    /// is reloaded onto it (load, suspend, resume) under the running snapshot-merge.
    Handoff,
    /// Live handoff mid-merge in the order of init's SELinux transition: the dm-user table is
    /// reloaded with the same length under a new misc name first (in-flight I/O drains
    /// through the old daemon, new I/O waits for a daemon), the old daemon is stopped, and
    /// only then is the new daemon started, within dm-user's daemon timeout.
    Transition,
    /// `pause_merge` mid-merge: the kernel's merge must stand still while paused, then
    /// finish after `resume_merge`.
    Pause,
}

/// Arguments of one scenario.
struct Scenario {
    tag: String,
    base: PathBuf,
    cow: PathBuf,
    target: PathBuf,
    file_check: Option<(String, String)>,
    /// `poweroff-merge`: power off once this percentage of the exceptions has merged.
    poweroff_percent: u64,
}

fn vmtest(step: &str, tag: &str, r: &Res<String>) -> bool {
    report("snap", step, tag, r)
}

/// Entry point of `vmtest snap ...`.
pub fn main(args: &[String]) -> ExitCode {
    let Some([kind, tag, base, cow, target]) = scenario_args(args) else {
        eprintln!("usage: vmtest snap SCENARIO TAG BASE COW TARGET [FILE=CONTENT]");
        return ExitCode::FAILURE;
    };
    let sc = Scenario {
        tag: tag.clone(),
        base: base.into(),
        cow: cow.into(),
        target: target.into(),
        file_check: args
            .iter()
            .skip(5)
            .filter(|a| !a.starts_with("at="))
            .find_map(|s| s.split_once('='))
            .map(|(f, c)| (f.to_string(), c.to_string())),
        poweroff_percent: args
            .iter()
            .skip(5)
            .find_map(|a| a.strip_prefix("at=").and_then(|p| p.parse().ok()))
            .filter(|p| (1..100).contains(p))
            .unwrap_or(33),
    };
    let ok = match kind.as_str() {
        "read-merge" => read_merge(&sc, MergeMode::Plain),
        "kill-merge" => read_merge(&sc, MergeMode::Kill),
        "handoff-merge" => read_merge(&sc, MergeMode::Handoff),
        "transition-merge" => read_merge(&sc, MergeMode::Transition),
        "pause-merge" => read_merge(&sc, MergeMode::Pause),
        "poweroff-merge" => poweroff_merge(&sc),
        "resume-merge" => resume_merge(&sc),
        other => {
            eprintln!("unknown scenario {other:?}");
            false
        }
    };
    exit_code(ok)
}

/// The dm devices and daemon of one scenario.
struct Stack {
    dm: DmControl,
    user_name: String,
    snap_name: String,
    user_dev: String,
    snap_path: PathBuf,
    origin_sectors: u64,
    cow_sectors: u64,
    daemon: Daemon,
    misc: String,
}

impl Stack {
    /// init → dm-user table of the returned size → start (reference §A.1).
    fn user_layer(sc: &Scenario, misc: &str) -> Res<(DmControl, Daemon, String, String, u64)> {
        let dm = dm()?;
        let daemon = Daemon::start(misc)?;
        let cow_sectors = init_handler(&daemon, misc, sc)?;
        let user_name = format!("snap-{}-user", sc.tag);
        let info = dm
            .create_device(&user_name, &[TableEntry::dm_user(0, cow_sectors, misc)])
            .map_err(|e| format!("create dm-user {user_name}: {e}"))?;
        let start = daemon.command(&format!("start,{misc}"))?;
        if start != "success" {
            return Err(format!("start,{misc} -> {start:?}"));
        }
        let user_dev = format!("{}:{}", info.major, info.minor);
        Ok((dm, daemon, user_name, user_dev, cow_sectors))
    }

    fn build(sc: &Scenario, misc: &str, merge: bool) -> Res<Self> {
        let (dm, daemon, user_name, user_dev, cow_sectors) = Self::user_layer(sc, misc)?;
        let origin_sectors = dev_bytes(&sc.base)? / 512;
        let snap_name = format!("snap-{}", sc.tag);
        let base = sc.base.display().to_string();
        let entry = if merge {
            TableEntry::snapshot_merge(0, origin_sectors, &base, &user_dev, CHUNK_SECTORS)
        } else {
            TableEntry::snapshot(0, origin_sectors, &base, &user_dev, CHUNK_SECTORS)
        };
        let info = dm
            .create_device(&snap_name, &[entry])
            .map_err(|e| format!("create {snap_name}: {e}"))?;
        let snap_path = dm
            .ensure_node(&info)
            .map_err(|e| format!("node of {snap_name}: {e}"))?;
        Ok(Self {
            dm,
            user_name,
            snap_name,
            user_dev,
            snap_path,
            origin_sectors,
            cow_sectors,
            daemon,
            misc: misc.to_string(),
        })
    }

    fn status(&self) -> Res<SnapshotStatus> {
        let st = self
            .dm
            .status(&self.snap_name)
            .map_err(|e| format!("status {}: {e}", self.snap_name))?;
        let params = st.first().map(|e| e.params.clone()).ok_or("empty status")?;
        SnapshotStatus::parse(&params).ok_or_else(|| format!("unparsable status {params:?}"))
    }

    /// Reload the snapshot device's table as `snapshot-merge` (suspend, load, resume).
    fn start_merge(&self, base: &Path) -> Res<()> {
        let entry = TableEntry::snapshot_merge(
            0,
            self.origin_sectors,
            &base.display().to_string(),
            &self.user_dev,
            CHUNK_SECTORS,
        );
        self.dm
            .suspend(&self.snap_name, false)
            .map_err(|e| format!("suspend {}: {e}", self.snap_name))?;
        self.dm
            .load_table(&self.snap_name, &[entry])
            .map_err(|e| format!("load snapshot-merge: {e}"))?;
        self.dm
            .resume(&self.snap_name)
            .map_err(|e| format!("resume with snapshot-merge: {e}"))?;
        Ok(())
    }

    /// Tear down in order: snapshot, handler, dm-user device, daemon.
    fn teardown(self) -> Res<()> {
        self.dm
            .remove(&self.snap_name)
            .map_err(|e| format!("remove {}: {e}", self.snap_name))?;
        let _ = self.daemon.command(&format!("delete,{}", self.misc));
        self.dm
            .remove(&self.user_name)
            .map_err(|e| format!("remove {}: {e}", self.user_name))?;
        drop(self.daemon);
        Ok(())
    }
}

fn init_handler(daemon: &Daemon, misc: &str, sc: &Scenario) -> Res<u64> {
    let cmd = format!("init,{misc},{},{}", sc.cow.display(), sc.base.display());
    let sectors = daemon.init_sectors(&cmd)?;
    if sectors == 0 {
        return Err(format!("{cmd} -> 0 sectors"));
    }
    Ok(sectors)
}

/// Step 1: the snapshot reads as the target.
fn check_snapshot(sc: &Scenario, st: &Stack) -> Res<String> {
    let len = dev_bytes(&sc.target)?;
    let snap_len = st.origin_sectors * 512;
    if snap_len < len {
        return Err(format!("snapshot is {snap_len} bytes, target {len}"));
    }
    let snap_time = compare_device("snapshot", &st.snap_path, &sc.target, len)?;
    let raw_time = time_read(&sc.base, len)?;
    let loop_figure = match loop_read_time(&sc.tag, &sc.target, len) {
        Ok(t) => format!("{:.1} MB/s", mbps(len, t)),
        Err(e) => format!("not measured ({e})"),
    };
    println!(
        "VMINFO snap-{} snapshot-read {:.1} MB/s vs the target image on a loop device over tmpfs {loop_figure}",
        sc.tag,
        mbps(len, snap_time)
    );
    println!(
        "VMINFO snap-{} snapshot-read {:.1} MB/s, raw base read {:.1} MB/s ({} MiB, O_DIRECT 1 MiB), daemon VmRSS {} KiB (RssAnon {} KiB, RssFile {} KiB; VmLck {} KiB is the virtual size of its locked mappings, not memory), COW device {} sectors",
        sc.tag,
        mbps(len, snap_time),
        mbps(len, raw_time),
        len >> 20,
        st.daemon.rss_kib().unwrap_or(0),
        st.daemon.status_kib("RssAnon:").unwrap_or(0),
        st.daemon.status_kib("RssFile:").unwrap_or(0),
        st.daemon.status_kib("VmLck:").unwrap_or(0),
        st.cow_sectors
    );
    let mut detail = format!("{} MiB equal to the target", len >> 20);
    if let Some((file, content)) = &sc.file_check {
        detail.push_str("; ");
        detail.push_str(&mount_and_check_file(
            &st.snap_path,
            &sc.tag,
            file,
            content,
        )?);
    }
    Ok(detail)
}

/// Poll until the merge is done; `on_tick` may act once per poll (returns Err to abort).
fn wait_merge(
    st: &Stack,
    limit: Duration,
    mut on_tick: impl FnMut(&SnapshotStatus) -> Res<bool>,
) -> Res<(Duration, u64)> {
    let t = Instant::now();
    let first = st.status()?;
    let start_alloc = match first {
        SnapshotStatus::Active { allocated, .. } => allocated,
        other => return Err(format!("merge status at start: {other:?}")),
    };
    loop {
        let s = st.status()?;
        if s.merge_complete() {
            return Ok((t.elapsed(), start_alloc));
        }
        if !matches!(s, SnapshotStatus::Active { .. }) {
            return Err(format!("merge status {s:?} after {:.1?}", t.elapsed()));
        }
        if on_tick(&s)? {
            return Ok((t.elapsed(), start_alloc));
        }
        if t.elapsed() > limit {
            return Err(format!("merge not done after {limit:?}: {s:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait for the end of the merge, keeping the daemon's peak VmRSS in `rss`.
fn wait_merge_done(st: &Stack, rss: &mut u64) -> Res<(Duration, u64)> {
    wait_merge(st, MERGE_LIMIT, |_| {
        *rss = (*rss).max(st.daemon.rss_kib().unwrap_or(0));
        Ok(false)
    })
}

/// True once a quarter of the exceptions present at the start of the merge are merged.
fn quarter_merged(s: &SnapshotStatus, alloc0: u64, metadata: u64) -> bool {
    matches!(s, SnapshotStatus::Active { allocated, .. }
        if *allocated < alloc0 && (alloc0 - *allocated) * 4 >= alloc0 - metadata)
}

fn read_merge(sc: &Scenario, mode: MergeMode) -> bool {
    let misc = format!("{}-a", sc.tag);
    let st = match Stack::build(sc, &misc, false) {
        Ok(s) => s,
        Err(e) => {
            vmtest("read", &sc.tag, &Err(format!("stack: {e}")));
            vmtest("merge", &sc.tag, &Err("no snapshot to merge".into()));
            return false;
        }
    };
    let read = check_snapshot(sc, &st);
    let ok_read = vmtest("read", &sc.tag, &read);
    let step = match mode {
        MergeMode::Plain => "merge",
        MergeMode::Kill => "kill-merge",
        MergeMode::Handoff => "handoff-merge",
        MergeMode::Transition => "transition-merge",
        MergeMode::Pause => "pause-merge",
    };
    let merge = run_merge(sc, st, mode);
    vmtest(step, &sc.tag, &merge) && ok_read
}

fn run_merge(sc: &Scenario, mut st: Stack, mode: MergeMode) -> Res<String> {
    let status0 = st.status()?;
    let SnapshotStatus::Active {
        allocated: alloc0,
        metadata,
        ..
    } = status0
    else {
        return Err(format!("snapshot status before merge: {status0:?}"));
    };
    if alloc0 == metadata {
        return Err(format!(
            "nothing to merge (allocated {alloc0} == metadata {metadata})"
        ));
    }
    st.start_merge(&sc.base)?;
    let mut killed = None;
    let mut rss = 0;
    let (took, _) = if mode == MergeMode::Handoff || mode == MergeMode::Transition {
        let (t1, _) = wait_merge(&st, MERGE_LIMIT, |s| {
            rss = rss.max(st.daemon.rss_kib().unwrap_or(0));
            Ok(quarter_merged(s, alloc0, metadata))
        })?;
        let s = st.status()?;
        if s.merge_complete() {
            return Err(format!(
                "merge finished within {t1:.1?} before the handoff: precondition not established"
            ));
        }
        let old_sectors = st.cow_sectors;
        let mut old = if mode == MergeMode::Handoff {
            handoff(sc, &mut st)?
        } else {
            transition(sc, &mut st)?
        };
        if st.cow_sectors != old_sectors {
            return Err(format!(
                "the new daemon presents a COW device of {} sectors, the old one {old_sectors}: a handoff must keep the length",
                st.cow_sectors
            ));
        }
        // Reads through dm-snapshot's kept in-core table now reach the new daemon.
        let len = dev_bytes(&sc.target)?;
        compare_device("snapshot after the handoff", &st.snap_path, &sc.target, len)?;
        let after = st.status();
        println!(
            "VMINFO snap-{} live handoff after {:.1} s at {s:?}: COW device {old_sectors} -> {} sectors, snapshot read equal to the target after it, status then {after:?}",
            sc.tag,
            t1.as_secs_f64(),
            st.cow_sectors
        );
        killed = Some((t1, s));
        // The first daemon's workers see ENOTBLK once its table is gone; it must then exit
        // on its own signal-free path or on SIGTERM.
        let _ = old.command(&format!("delete,{}-a", sc.tag));
        drop(old.take());
        wait_merge_done(&st, &mut rss)?
    } else if mode == MergeMode::Pause {
        let (t1, _) = wait_merge(&st, MERGE_LIMIT, |s| {
            rss = rss.max(st.daemon.rss_kib().unwrap_or(0));
            Ok(quarter_merged(s, alloc0, metadata))
        })?;
        let paused = st.daemon.command("pause_merge")?;
        if paused != "success" {
            return Err(format!("pause_merge -> {paused:?}"));
        }
        // The batch in flight when the pause arrived may still finish; after that the
        // kernel's next metadata write-back is held and the merge stands still.
        std::thread::sleep(Duration::from_millis(700));
        let s1 = st.status()?;
        std::thread::sleep(Duration::from_millis(2000));
        let s2 = st.status()?;
        if s1.merge_complete() {
            return Err(format!(
                "merge finished before the pause could be observed ({s1:?})"
            ));
        }
        if s1 != s2 {
            return Err(format!("merge moved while paused: {s1:?} -> {s2:?}"));
        }
        let resumed = st.daemon.command("resume_merge")?;
        if resumed != "success" {
            return Err(format!("resume_merge -> {resumed:?}"));
        }
        println!(
            "VMINFO snap-{} paused after {:.1} s at {s1:?}, unchanged 2 s later, resumed",
            sc.tag,
            t1.as_secs_f64()
        );
        killed = Some((t1, s1));
        wait_merge_done(&st, &mut rss)?
    } else if mode == MergeMode::Kill {
        // Kill once a part of the merge is done, then hand over to a new daemon.
        let (t1, _) = wait_merge(&st, MERGE_LIMIT, |s| {
            rss = rss.max(st.daemon.rss_kib().unwrap_or(0));
            Ok(quarter_merged(s, alloc0, metadata))
        })?;
        let s = st.status()?;
        if s.merge_complete() {
            return Err(format!(
                "merge finished within {t1:.1?} before the daemon could be killed: precondition not established"
            ));
        }
        st.daemon.kill9()?;
        // Give dm-snapshot a moment to hit the dead channel, then record what it did.
        std::thread::sleep(Duration::from_millis(500));
        let after_kill = st.status();
        killed = Some((t1, s));
        eprintln!("vmtest snap: daemon killed at {s:?} after {t1:.1?}; then {after_kill:?}");
        println!(
            "VMINFO snap-{} daemon killed after {:.1} s at {s:?}; snapshot-merge status then {after_kill:?}",
            sc.tag,
            t1.as_secs_f64()
        );
        // The new daemon skips merged ops, so its exception store is laid out afresh (smaller):
        // dm-snapshot must read it again, which a table reload would not do (it hands the old
        // in-memory exceptions over). Remove the snapshot device, hand the dm-user device over to
        // the new daemon (new misc name, load, suspend, resume), then recreate snapshot-merge.
        st.dm
            .remove(&st.snap_name)
            .map_err(|e| format!("remove {} after the kill: {e}", st.snap_name))?;
        drop(handoff(sc, &mut st)?);
        let entry = TableEntry::snapshot_merge(
            0,
            st.origin_sectors,
            &sc.base.display().to_string(),
            &st.user_dev,
            CHUNK_SECTORS,
        );
        let info = st
            .dm
            .create_device(&st.snap_name, &[entry])
            .map_err(|e| format!("recreate {} as snapshot-merge: {e}", st.snap_name))?;
        st.snap_path = st
            .dm
            .ensure_node(&info)
            .map_err(|e| format!("node of {}: {e}", st.snap_name))?;
        let resumed = st.status()?;
        println!(
            "VMINFO snap-{} second daemon on {}: COW device {} sectors, merge resumes at {resumed:?}",
            sc.tag, st.misc, st.cow_sectors
        );
        wait_merge_done(&st, &mut rss)?
    } else {
        wait_merge_done(&st, &mut rss)?
    };
    let merged_kib = (alloc0 - metadata) / 2;
    println!(
        "VMINFO snap-{} merge {} KiB of exceptions in {:.2} s ({:.2} MB/s), daemon peak VmRSS {} KiB",
        sc.tag,
        merged_kib,
        took.as_secs_f64(),
        merged_kib as f64 / 1024.0 / took.as_secs_f64().max(1e-9),
        rss
    );
    let percent = st.daemon.command("merge_percent").unwrap_or_default();
    st.teardown()?;
    let mut d = merged_base_check(&sc.base, &sc.target)?;
    d.push_str(&format!(", daemon merge_percent {percent}"));
    // Reference figure: a plain O_DIRECT copy of as many bytes (target -> base at the same
    // offsets; the base already equals the target, so its content does not change).
    match plain_copy_time(&sc.target, &sc.base, merged_kib * 1024) {
        Ok(t) => println!(
            "VMINFO snap-{} plain copy of {merged_kib} KiB target->base (O_DIRECT, 1 MiB, fsync) {:.2} s ({:.2} MB/s) vs merge {:.2} s",
            sc.tag,
            t.as_secs_f64(),
            merged_kib as f64 / 1024.0 / t.as_secs_f64().max(1e-9),
            took.as_secs_f64()
        ),
        Err(e) => println!("VMINFO snap-{} plain copy not measured: {e}", sc.tag),
    }
    if let Some((t1, s)) = killed {
        d.push_str(&format!(
            ", {} after {:.1}s at {s:?}, finished{}",
            match mode {
                MergeMode::Kill => "daemon killed",
                MergeMode::Pause => "paused (merge still) and resumed",
                MergeMode::Transition => "live handoff (SELinux transition order)",
                _ => "live handoff",
            },
            t1.as_secs_f64(),
            if mode == MergeMode::Pause {
                ""
            } else {
                " by the second daemon"
            }
        ));
    }
    Ok(d)
}

/// Android's handoff onto a new daemon: init on a new misc name, load the dm-user table
/// naming it (inactive), start, suspend, resume.
fn handoff(sc: &Scenario, st: &mut Stack) -> Res<OldDaemon> {
    let misc = format!("{}-b", sc.tag);
    let daemon = Daemon::start(&misc)?;
    let sectors = init_handler(&daemon, &misc, sc)?;
    st.dm
        .load_table(&st.user_name, &[TableEntry::dm_user(0, sectors, &misc)])
        .map_err(|e| format!("load dm-user table for {misc}: {e}"))?;
    let start = daemon.command(&format!("start,{misc}"))?;
    if start != "success" {
        return Err(format!("start,{misc} -> {start:?}"));
    }
    activate_loaded_table(st)?;
    let old = std::mem::replace(&mut st.daemon, daemon);
    st.misc = misc;
    st.cow_sectors = sectors;
    Ok(OldDaemon(Some(old)))
}

/// init's SELinux transition onto a new daemon: reload the dm-user table with the same length
/// under a new misc name (load, suspend, resume: the old target is destroyed once in-flight
/// I/O has drained through the old daemon, and new I/O waits for a daemon), stop the old
/// daemon, then start the new one and `init`/`start` it before dm-user's daemon timeout.
fn transition(sc: &Scenario, st: &mut Stack) -> Res<OldDaemon> {
    let misc = format!("{}-b", sc.tag);
    st.dm
        .load_table(
            &st.user_name,
            &[TableEntry::dm_user(0, st.cow_sectors, &misc)],
        )
        .map_err(|e| format!("load dm-user table for {misc}: {e}"))?;
    activate_loaded_table(st)?;
    let swapped = Instant::now();
    // The old daemon's workers see ENOTBLK; init sends SIGTERM and does not wait for it.
    let old_pid = st.daemon.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| format!("SIGTERM to the old daemon {old_pid}: {e}"))?;
    let daemon = Daemon::start(&misc)?;
    let old = std::mem::replace(&mut st.daemon, daemon);
    let sectors = init_handler(&st.daemon, &misc, sc)?;
    let start = st.daemon.command(&format!("start,{misc}"))?;
    if start != "success" {
        return Err(format!("start,{misc} -> {start:?}"));
    }
    println!(
        "VMINFO snap-{} transition: old daemon {old_pid} stopped, new daemon serving {:.2} s after the table swap (dm-user holds I/O for 4 s)",
        sc.tag,
        swapped.elapsed().as_secs_f64()
    );
    st.misc = misc;
    st.cow_sectors = sectors;
    Ok(OldDaemon(Some(old)))
}

/// Suspend and resume the dm-user device, making its loaded (inactive) table live: the old
/// target is destroyed once its in-flight I/O has been answered.
fn activate_loaded_table(st: &Stack) -> Res<()> {
    st.dm
        .suspend(&st.user_name, false)
        .map_err(|e| format!("suspend {}: {e}", st.user_name))?;
    st.dm
        .resume(&st.user_name)
        .map(drop)
        .map_err(|e| format!("resume {}: {e}", st.user_name))
}

/// The daemon replaced by a handoff (stopped when dropped).
struct OldDaemon(Option<Daemon>);

impl OldDaemon {
    fn command(&self, cmd: &str) -> Res<String> {
        match &self.0 {
            Some(d) => d.command(cmd),
            None => Err("no daemon".into()),
        }
    }

    fn take(&mut self) -> Option<Daemon> {
        self.0.take()
    }
}

/// First boot of the power-off scenario: snapshot, start the merge, power off mid-way.
fn poweroff_merge(sc: &Scenario) -> bool {
    let r = (|| -> Res<String> {
        let st = Stack::build(sc, &format!("{}-a", sc.tag), false)?;
        let s0 = st.status()?;
        let SnapshotStatus::Active {
            allocated: alloc0,
            metadata,
            ..
        } = s0
        else {
            return Err(format!("status {s0:?}"));
        };
        st.start_merge(&sc.base)?;
        let (t1, _) = wait_merge(&st, MERGE_LIMIT, |s| {
            Ok(matches!(s, SnapshotStatus::Active { allocated, .. }
                if *allocated < alloc0
                    && (alloc0 - *allocated) * 100 >= (alloc0 - metadata) * sc.poweroff_percent))
        })?;
        let s = st.status()?;
        if s.merge_complete() {
            return Err(format!(
                "merge finished within {t1:.1?} before power-off: precondition not established"
            ));
        }
        Ok(format!(
            "powering off after {t1:.1?} at {s:?} (target {}% merged)",
            sc.poweroff_percent
        ))
    })();
    let ok = vmtest("poweroff", &sc.tag, &r);
    if ok {
        let _ = std::io::stdout().flush();
        // No sync: a power cut. `-n` keeps busybox from syncing.
        let _ = Command::new("poweroff").args(["-f", "-n"]).status();
        std::thread::sleep(Duration::from_secs(30));
    }
    false
}

/// Second boot of the power-off scenario: resume the merge and check the base.
fn resume_merge(sc: &Scenario) -> bool {
    let r = (|| -> Res<String> {
        let st = Stack::build(sc, &format!("{}-r", sc.tag), true)?;
        let s0 = st.status()?;
        let (took, _) = wait_merge(&st, MERGE_LIMIT, |_| Ok(false))?;
        println!(
            "VMINFO snap-{} resumed merge from {s0:?} finished in {:.2} s",
            sc.tag,
            took.as_secs_f64()
        );
        st.teardown()?;
        merged_base_check(&sc.base, &sc.target).map(|d| format!("{d}, resumed from {s0:?}"))
    })();
    vmtest("resume-merge", &sc.tag, &r)
}
