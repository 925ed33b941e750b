//! `cargo xtask demo`: the OTA demo, the project's main job.
//!
//! Host half of a Virtual A/B update, end to end: a realistic pair of ext4 images (a real
//! directory tree before and after a simulated package upgrade, packed with `mke2fs -d`), the
//! COW file `ota-tools create` makes from them, `ota-tools verify`, and the merge a device would
//! run, done in place on a copy of the base image in the COW's merge order, checked against the
//! target byte for byte. Then the device half, in the emulator (Debian's 6.12 cloud kernel under
//! qemu TCG, with our dm-user module).
//!
//! User-space-merge mode (the default, Android 13+): `snapuserd -user_snapshot` serves the whole
//! partition as the dm-user device (`0 S user 0 S <misc>`), or with `--transport ublk` as the
//! daemon's own ublk device (`snapuserd -user_snapshot -ublk`, `/dev/ublkb<N>`, the kernel's
//! `ublk_drv` instead of our module); the device is compared with the target, then rounds alternate the figures with their references measured in the same boot
//! (sequential and random reads against the target on a loop device over tmpfs, the merge
//! against a plain O_DIRECT copy with fsync of the changed bytes, the daemon's memory), each
//! round on freshly restored disks (see `tests/vm/src/demo_guest.rs`). The host writes
//! `build/demo/report.txt`, `build/demo/report.json` (the medians) and
//! `build/demo/merge-progress.svg` (merge progress over time next to the plain copy).
//!
//! Legacy mode (`--legacy`): the daemon serves the COW under
//! `snapshot <base> <dm-user> P 8`, the snapshot is compared with the target, `snapshot-merge`
//! runs to completion (one round), and the merged base disk is compared with the target inside
//! the guest and again on the host.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd;
use crate::demo_figures::{self, GuestFigures, Medians};
use crate::demo_svg::{self, ProgressPlot};
use crate::deps::{self, KernelSeries};
use crate::error::{io_err, Result, XtaskError};
use crate::ext4_images;
use crate::flags::Flags;
use crate::guest::{self, GuestBinary};
use crate::initramfs::{self, InitramfsSpec};
use crate::kmod;
use crate::report;
use crate::vm::VmSpec;

const BLOCK: usize = 4096;

/// Default number of rounds in user-space-merge mode.
const DEFAULT_ROUNDS: usize = 5;
const DEMO_USAGE: &str = "cargo xtask demo [--legacy] [--rounds N] [--transport dm-user|ublk] [--source SRC.img --target TGT.img]";
/// The kernel the device stage boots.
const DEMO_KERNEL: KernelSeries = KernelSeries::V6_12;

/// How the daemon serves the demo's snapshot device to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Our dm-user module (`0 S user 0 S <misc>`); the only transport of the legacy mode.
    #[default]
    DmUser,
    /// The kernel's ublk driver: the daemon's own `/dev/ublkb<N>` (`snapuserd -ublk`).
    Ublk,
}

impl Transport {
    /// `dm-user` or `ublk`: the `--transport` value and `report.json`'s `transport`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::DmUser => "dm-user",
            Transport::Ublk => "ublk",
        }
    }

    fn parse(value: &str) -> Result<Self> {
        match value {
            "dm-user" => Ok(Transport::DmUser),
            "ublk" => Ok(Transport::Ublk),
            other => Err(XtaskError::Usage(format!(
                "--transport {other:?}: give dm-user or ublk"
            ))),
        }
    }
}

/// Options of `cargo xtask demo`.
#[derive(Debug)]
pub struct DemoOptions {
    /// Old image; generated when absent.
    pub source: Option<PathBuf>,
    /// New image; generated when absent.
    pub target: Option<PathBuf>,
    /// Run the legacy dm-snapshot mode instead of user-space merge.
    pub legacy: bool,
    /// Rounds of the user-space-merge figures (each a fresh merge), 1-20.
    pub rounds: usize,
    /// How the snapshot device reaches the kernel.
    pub transport: Transport,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            source: None,
            target: None,
            legacy: false,
            rounds: DEFAULT_ROUNDS,
            transport: Transport::DmUser,
        }
    }
}

impl DemoOptions {
    /// Parse `[--legacy] [--rounds N] [--transport dm-user|ublk] [--source SRC.img --target TGT.img]`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self::default();
        let mut flags = Flags::new(args, "");
        while let Some(a) = flags.next_flag() {
            match a {
                "--source" => o.source = Some(flags.value("--source")?.into()),
                "--target" => o.target = Some(flags.value("--target")?.into()),
                "--legacy" => o.legacy = true,
                "--rounds" => {
                    let v = flags.value("--rounds")?;
                    o.rounds =
                        v.parse()
                            .ok()
                            .filter(|r| (1..=20).contains(r))
                            .ok_or_else(|| {
                                XtaskError::Usage(format!("--rounds {v:?}: give 1 to 20"))
                            })?;
                }
                "--transport" => o.transport = Transport::parse(&flags.value("--transport")?)?,
                other => {
                    return Err(XtaskError::Usage(format!(
                        "unknown argument {other:?}; usage: {DEMO_USAGE}"
                    )))
                }
            }
        }
        if o.source.is_some() != o.target.is_some() {
            return Err(XtaskError::Usage(
                "give both --source and --target, or neither (a pair is then generated)".into(),
            ));
        }
        if o.legacy && o.transport != Transport::DmUser {
            return Err(XtaskError::Usage(format!(
                "--legacy with --transport {}: the legacy mode's dm-snapshot needs its COW device \
                 over dm-user; ublk serves the user-space-merge mode only",
                o.transport.name()
            )));
        }
        Ok(o)
    }
}

/// Run the demo; prints a report and writes it to `build/demo/report.txt`, with
/// `build/demo/report.json` and (user-space-merge mode) `build/demo/merge-progress.svg`.
pub fn run(repo: &Path, opts: &DemoOptions) -> Result<()> {
    let work = repo.join("build/demo");
    std::fs::create_dir_all(&work).map_err(io_err("create", &work))?;
    let (source, target) = match (&opts.source, &opts.target) {
        (Some(s), Some(t)) => (s.clone(), t.clone()),
        _ => make_ext4_pair(repo, &work)?,
    };
    let merge_mode = if opts.legacy { "legacy" } else { "user" };
    if opts.transport == Transport::Ublk && !DEMO_KERNEL.has_ublk() {
        return Err(XtaskError::DemoCheck(format!(
            "--transport ublk: the demo's kernel {} has no ublk (built without \
             CONFIG_BLK_DEV_UBLK); use --transport dm-user",
            DEMO_KERNEL.label()
        )));
    }

    step("building ota-tools (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd::run(
        Command::new(cargo)
            .args(["build", "--release", "--locked", "-p", "ota-tools"])
            .current_dir(repo),
    )?;
    let tool = repo.join("target/release/ota-tools");

    let cow = work.join("update.cow");
    step(&format!(
        "ota-tools create (v3, lz4, 64k compression factor, {merge_mode} merge order, all cores)"
    ));
    let (create_out, create_time) = timed(
        Command::new(&tool)
            .arg("create")
            .args(["--merge-mode", merge_mode])
            .arg("--source")
            .arg(&source)
            .arg("--target")
            .arg(&target)
            .arg("--output")
            .arg(&cow),
    )?;
    print!("{create_out}");

    step("ota-tools verify (merge-order safety, then every block)");
    let (verify_out, verify_time) = timed(
        Command::new(&tool)
            .arg("verify")
            .args(["--merge-mode", merge_mode])
            .arg("--source")
            .arg(&source)
            .arg("--target")
            .arg(&target)
            .arg("--cow")
            .arg(&cow),
    )?;
    print!("{verify_out}");

    step("merge: apply the COW in place on a copy of the base image, in merge order");
    let base = work.join("base.img");
    std::fs::copy(&source, &base).map_err(io_err("copy to", &base))?;
    let (_, merge_time) = timed(
        Command::new(&tool)
            .arg("apply")
            .args(["--merge-mode", merge_mode])
            .arg("--source")
            .arg(&base)
            .arg("--cow")
            .arg(&cow)
            .arg("--output")
            .arg(&base),
    )?;

    step("comparing the merged base with the target");
    let target_len = file_len(&target)?;
    let base_len = file_len(&base)?;
    if base_len < target_len {
        return Err(XtaskError::DemoCheck(format!(
            "merged base is {base_len} bytes, shorter than the target ({target_len} bytes)"
        )));
    }
    if let Some(block) = first_difference(&base, &target, target_len)? {
        return Err(XtaskError::DemoCheck(format!(
            "merged base differs from the target at block {block}"
        )));
    }
    let changed = first_difference_count(&source, &target, target_len)?;
    let changed_bytes = changed.saturating_mul(BLOCK as u64);

    let device = if opts.legacy {
        legacy_device_stage(repo, &source, &target, &cow)?
    } else {
        user_device_stage(
            repo,
            &source,
            &target,
            &cow,
            changed_bytes,
            opts.rounds,
            opts.transport,
        )?
    };

    let cow_len = file_len(&cow)?;
    let report = format!(
        "OTA demo report ({} mode, {}, kernel {})\n\
         source image      {}\n\
         target image      {} ({:.1} MiB)\n\
         changed blocks    {changed} ({:.1} MiB)\n\
         COW file          {} ({:.2} MiB, {:.1}% of the changed bytes)\n\
         create time       {}\n\
         verify time       {}\n\
         in-place merge    {} (merged base == target, byte for byte)\n\
         device stage      {}\n{}",
        device.mode,
        device.transport.name(),
        device.kernel,
        source.display(),
        target.display(),
        mib(target_len),
        mib(changed_bytes),
        cow.display(),
        mib(cow_len),
        percent(cow_len, changed_bytes),
        secs(create_time),
        secs(verify_time),
        secs(merge_time),
        device.summary,
        device.figures,
    );
    println!("\n{report}");
    let path = work.join("report.txt");
    std::fs::write(&path, &report).map_err(io_err("write", &path))?;
    let json = report_json(&device, changed_bytes, cow_len);
    let json_path = work.join("report.json");
    std::fs::write(&json_path, json).map_err(io_err("write", &json_path))?;
    step(&format!(
        "wrote {} and {}",
        path.display(),
        json_path.display()
    ));
    match device.failure {
        Some(why) => Err(XtaskError::DemoCheck(why)),
        None => Ok(()),
    }
}

/// `report.json`: the figures named by the issue (numbers as numbers, booleans as booleans,
/// medians over the rounds), then extra keys (random reads, ratios, per-round figures).
fn report_json(device: &DeviceStage, changed_bytes: u64, cow_bytes: u64) -> String {
    let f = &device.json;
    let value = serde_json::json!({
        "mode": device.mode,
        "transport": device.transport.name(),
        "kernel": device.kernel,
        "changed_bytes": changed_bytes,
        "cow_bytes": cow_bytes,
        "snapshot_equals_target": device.snapshot_equals_target,
        "base_equals_target": device.base_equals_target,
        "snapshot_read_mb_s": f.snapshot_read_mb_s,
        "loop_read_mb_s": f.loop_read_mb_s,
        "merge_s": f.merge_s,
        "plain_copy_s": f.plain_copy_s,
        "daemon_rss_peak_kib": f.rss_peak_kib,
        "daemon_rss_anon_kib": f.rss_anon_kib,
        "rounds": f.rounds,
        "snapshot_read_ratio": f.read_ratio,
        "snapshot_rand_4k_iops": f.snapshot_rand_iops,
        "loop_rand_4k_iops": f.loop_rand_iops,
        "rand_4k_ratio": f.rand_ratio,
        "merge_over_plain_copy": f.merge_ratio,
        "scattered_copy_s": f.scattered_copy_s,
        "merge_over_scattered_copy": f.scattered_ratio,
        "per_round": device.per_round,
        "daemon_memory_by_workers": device.by_workers,
    });
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    text
}

fn step(what: &str) {
    eprintln!("demo: {what}");
}

fn timed(cmd: &mut Command) -> Result<(String, Duration)> {
    let start = Instant::now();
    let out = cmd::output(cmd)?;
    Ok((out, start.elapsed()))
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(io_err("stat", path))?.len())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Walk two files in 4 KiB blocks over `len` bytes, calling `on_diff` for each block index
/// that differs (bytes past the end of a file read as zero). Stops when `on_diff` says so.
fn compare_blocks(
    a: &Path,
    b: &Path,
    len: u64,
    mut on_diff: impl FnMut(u64) -> bool,
) -> Result<()> {
    let mut fa = File::open(a).map_err(io_err("open", a))?;
    let mut fb = File::open(b).map_err(io_err("open", b))?;
    let chunk = 256 * BLOCK;
    let mut ba = vec![0u8; chunk];
    let mut bb = vec![0u8; chunk];
    let mut pos = 0u64;
    while pos < len {
        let want = usize::try_from((len - pos).min(chunk as u64)).unwrap_or(chunk);
        ba[..want].fill(0);
        bb[..want].fill(0);
        read_up_to(&mut fa, &mut ba[..want]).map_err(io_err("read", a))?;
        read_up_to(&mut fb, &mut bb[..want]).map_err(io_err("read", b))?;
        for (i, (x, y)) in ba[..want]
            .chunks(BLOCK)
            .zip(bb[..want].chunks(BLOCK))
            .enumerate()
        {
            if x != y && !on_diff(pos / BLOCK as u64 + i as u64) {
                return Ok(());
            }
        }
        pos += want as u64;
    }
    Ok(())
}

/// Fill `buf` from `f`, leaving the tail untouched at end of file.
fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(())
}

/// The verdict of a demo boot: its first failure (a failed result, else a base disk merged
/// in the emulator that differs from `target` on the host), and whether base == target.
fn run_verdict(
    run: &crate::vm::VmRun,
    results: &[report::TestResult],
    base: &Path,
    target: &Path,
) -> Result<(Option<String>, bool)> {
    let mut failure = results.iter().find(|r| !r.pass).map(|bad| {
        format!(
            "emulator: {} failed: {} (log: {})",
            bad.name,
            bad.detail,
            run.log_path.display()
        )
    });
    let host_base_ok = first_difference(base, target, file_len(target)?)?.is_none();
    if !host_base_ok && failure.is_none() {
        failure = Some("the base disk merged in the emulator differs from the target".into());
    }
    Ok((failure, host_base_ok))
}

fn first_difference(a: &Path, b: &Path, len: u64) -> Result<Option<u64>> {
    let mut first = None;
    compare_blocks(a, b, len, |blk| {
        first = Some(blk);
        false
    })?;
    Ok(first)
}

fn first_difference_count(a: &Path, b: &Path, len: u64) -> Result<u64> {
    let mut n = 0u64;
    compare_blocks(a, b, len, |_| {
        n += 1;
        true
    })?;
    Ok(n)
}

/// Build `source.img` / `target.img`: a real tree (Python's standard library from this
/// machine) before and after a simulated package upgrade, packed with `mke2fs -d` with a fixed
/// UUID, hash seed and time so the images are the same on every run.
fn make_ext4_pair(repo: &Path, work: &Path) -> Result<(PathBuf, PathBuf)> {
    let source = work.join("source.img");
    let target = work.join("target.img");
    if source.exists() && target.exists() {
        step("reusing the ext4 pair in build/demo (delete it to regenerate)");
        return Ok((source, target));
    }
    deps::ensure_packages(&["e2fsprogs", "python3"])?;
    let tree = ext4_images::python_lib()?;
    step(&format!(
        "making an ext4 pair from {} before and after a simulated upgrade",
        tree.display()
    ));
    let v1 = work.join("tree-v1");
    let v2 = work.join("tree-v2");
    for d in [&v1, &v2] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(io_err("remove", d))?;
        }
    }
    cmd::run(Command::new("cp").arg("-a").arg(&tree).arg(&v1))?;
    cmd::run(Command::new("cp").arg("-a").arg(&v1).arg(&v2))?;
    let upgrade = repo.join("ota-tools/bench/upgrade_tree.py");
    cmd::run(Command::new("python3").arg(&upgrade).arg(&v2))?;
    let used = cmd::output(Command::new("du").arg("-sm").arg(&v2))?;
    let used_mib: u64 = used
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let size = format!("{}M", used_mib * 3 / 2 + 32);
    for (tree, img) in [(&v1, &source), (&v2, &target)] {
        let tmp = img.with_extension("img.tmp");
        ext4_images::mke2fs_from_tree(tree, &tmp, &size)?;
        std::fs::rename(&tmp, img).map_err(io_err("rename to", img))?;
    }
    for d in [&v1, &v2] {
        std::fs::remove_dir_all(d).map_err(io_err("remove", d))?;
    }
    Ok((source, target))
}

/// What the emulator stage saw.
struct DeviceStage {
    /// `user-space-merge` or `legacy`.
    mode: &'static str,
    /// How the snapshot device reached the kernel.
    transport: Transport,
    /// The guest kernel's release.
    kernel: String,
    /// One line: what was checked.
    summary: String,
    /// The guest's figures in plain words, one per line.
    figures: String,
    /// The whole snapshot device read equal to the target.
    snapshot_equals_target: bool,
    /// The merged base equals the target (in the guest and on the host).
    base_equals_target: bool,
    /// Why the stage failed, when it did (the report is still written).
    failure: Option<String>,
    /// The figures `report.json` carries.
    json: JsonFigures,
    /// Each round's figures (user-space-merge mode), for `report.json`.
    per_round: serde_json::Value,
    /// The daemon's memory by worker count (user-space-merge mode), for `report.json`.
    by_workers: serde_json::Value,
}

/// Figures of `report.json`; NaN (written as null) where not measured.
#[derive(Debug, Clone, PartialEq)]
struct JsonFigures {
    rounds: usize,
    snapshot_read_mb_s: f64,
    loop_read_mb_s: f64,
    read_ratio: f64,
    snapshot_rand_iops: f64,
    loop_rand_iops: f64,
    rand_ratio: f64,
    merge_s: f64,
    plain_copy_s: f64,
    merge_ratio: f64,
    scattered_copy_s: f64,
    scattered_ratio: f64,
    rss_peak_kib: Option<u64>,
    rss_anon_kib: Option<u64>,
}

impl JsonFigures {
    fn none() -> Self {
        Self {
            rounds: 0,
            snapshot_read_mb_s: f64::NAN,
            loop_read_mb_s: f64::NAN,
            read_ratio: f64::NAN,
            snapshot_rand_iops: f64::NAN,
            loop_rand_iops: f64::NAN,
            rand_ratio: f64::NAN,
            merge_s: f64::NAN,
            plain_copy_s: f64::NAN,
            merge_ratio: f64::NAN,
            scattered_copy_s: f64::NAN,
            scattered_ratio: f64::NAN,
            rss_peak_kib: None,
            rss_anon_kib: None,
        }
    }

    fn from_medians(m: &Medians) -> Self {
        Self {
            rounds: m.rounds,
            snapshot_read_mb_s: m.snapshot_read_mb_s,
            loop_read_mb_s: m.loop_read_mb_s,
            read_ratio: m.read_ratio,
            snapshot_rand_iops: m.snapshot_rand_iops,
            loop_rand_iops: m.loop_rand_iops,
            rand_ratio: m.rand_ratio,
            merge_s: m.merge_s,
            plain_copy_s: m.plain_copy_s,
            merge_ratio: m.merge_ratio,
            scattered_copy_s: m.scattered_copy_s,
            scattered_ratio: m.scattered_ratio,
            rss_peak_kib: Some(m.rss_peak_kib),
            rss_anon_kib: Some(m.rss_anon_kib),
        }
    }

    /// The legacy guest's single-round figures (the `VMINFO snap-demo` lines).
    fn from_legacy_lines(lines: &[&str]) -> Self {
        let mut f = Self::none();
        for line in lines {
            if line.starts_with("snapshot-read ") && line.contains("loop device") {
                f.snapshot_read_mb_s = number_after(line, "snapshot-read ").unwrap_or(f64::NAN);
                f.loop_read_mb_s = number_after(line, "tmpfs ").unwrap_or(f64::NAN);
                f.rounds = 1;
            } else if line.starts_with("snapshot-read ") {
                f.rss_anon_kib = number_after(line, "RssAnon ").map(|v| v as u64);
            } else if line.starts_with("merge ") {
                f.merge_s = number_after(line, "exceptions in ").unwrap_or(f64::NAN);
                f.rss_peak_kib = number_after(line, "peak VmRSS ").map(|v| v as u64);
            } else if line.starts_with("plain copy of ") {
                f.plain_copy_s = number_after(line, "fsync) ").unwrap_or(f64::NAN);
            }
        }
        f.read_ratio = f.snapshot_read_mb_s / f.loop_read_mb_s;
        f.merge_ratio = f.merge_s / f.plain_copy_s;
        f
    }
}

/// The guest's script: plain (uncoloured) logs, with the dm-user workers' stage times, so the serial-console log file holds no
/// terminal escape codes, then the OTA reboot scenario on the disks (legacy: base, COW,
/// target; user-space merge: those and pristine copies of base and COW for later rounds,
/// served over `transport`).
fn demo_init_fragment(
    legacy: bool,
    changed_bytes: u64,
    rounds: usize,
    transport: Transport,
) -> String {
    let run = if legacy {
        "/bin/vmtest snap read-merge demo /dev/vda /dev/vdb /dev/vdc".to_string()
    } else {
        format!(
            "/bin/vmtest demo-usm /dev/vda /dev/vdb /dev/vdc /dev/vdd /dev/vde changed={changed_bytes} rounds={rounds} transport={}{}",
            transport.name(),
            ab_flag_arg()
        )
    };
    // The dm-user workers' time per stage (waiting, receiving, answering) at debug level.
    format!(
        "export RUST_LOG_STYLE=never\nexport RUST_LOG=info,snapuserd::daemon::transport=debug\n{run}\n"
    )
}

/// ` ab_flag=FLAG` when the environment sets `DEMO_AB_DAEMON_FLAG` to a daemon flag (it
/// starts with `-` and holds no space): the guest gives it to the daemon on odd rounds only,
/// for an A/B comparison of two daemon configurations in one boot. Empty otherwise.
fn ab_flag_arg() -> String {
    match std::env::var("DEMO_AB_DAEMON_FLAG") {
        Ok(flag) if flag.starts_with('-') && !flag.contains(char::is_whitespace) => {
            format!(" ab_flag={flag}")
        }
        _ => String::new(),
    }
}

/// `text` without terminal escape sequences: `ESC [ ... final` (colours, cursor and screen
/// control) and two-byte `ESC x` sequences (such as the firmware's reset, `ESC c`).
fn strip_terminal_escapes(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.iter().copied();
    while let Some(b) = bytes.next() {
        if b != 0x1b {
            out.push(b);
            continue;
        }
        // `ESC x` ends here; `ESC [` continues with parameters and intermediates, then one
        // final byte in '@'..='~'.
        if bytes.next() == Some(b'[') {
            for b in bytes.by_ref() {
                if (b'@'..=b'~').contains(&b) {
                    break;
                }
            }
        }
    }
    out
}

/// The number right after the first `marker` in `line` (digits and one decimal point).
fn number_after(line: &str, marker: &str) -> Option<f64> {
    let start = line.find(marker)? + marker.len();
    let digits: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

fn mib_of_kib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

/// The emulator's figures (the guest's `VMINFO snap-demo` lines, prefix removed) in plain
/// words, one line each: snapshot read speed, merge, daemon memory. A line in an unknown
/// shape is passed through as it is.
fn plain_figures(lines: &[&str]) -> String {
    let mut read_speed = None;
    let mut loop_speed = None;
    let mut raw_speed = None;
    let mut read_mib = None;
    let mut memory = None;
    let mut merge = None;
    let mut copy = None;
    let mut other = Vec::new();
    for line in lines {
        if line.starts_with("snapshot-read ") && line.contains("loop device") {
            read_speed = read_speed.or(number_after(line, "snapshot-read "));
            loop_speed = number_after(line, "tmpfs ");
        } else if line.starts_with("snapshot-read ") && line.contains("raw base read") {
            read_speed = read_speed.or(number_after(line, "snapshot-read "));
            raw_speed = number_after(line, "raw base read ");
            read_mib = number_after(line, "MB/s (");
            memory = Some((
                number_after(line, "VmRSS "),
                number_after(line, "RssAnon "),
                number_after(line, "RssFile "),
            ));
        } else if line.starts_with("merge ") {
            merge = Some((
                number_after(line, "merge "),
                number_after(line, "exceptions in "),
                number_after(line, " s ("),
                number_after(line, "peak VmRSS "),
            ));
        } else if line.starts_with("plain copy of ") {
            copy = number_after(line, "fsync) ");
        } else {
            other.push(*line);
        }
    }
    let mut out = String::new();
    if let Some(speed) = read_speed {
        out.push_str(&format!("snapshot read     {speed:.1} MB/s"));
        if let Some(mib) = read_mib {
            out.push_str(&format!(" over {mib:.0} MiB in 1 MiB direct reads"));
        }
        let mut compare = Vec::new();
        if let Some(l) = loop_speed {
            compare.push(format!(
                "the target image on a RAM-backed loop device: {l:.1} MB/s"
            ));
        }
        if let Some(r) = raw_speed {
            compare.push(format!("the base disk read directly: {r:.1} MB/s"));
        }
        if !compare.is_empty() {
            out.push_str(&format!(" (for comparison, {})", compare.join("; ")));
        }
        out.push('\n');
    }
    if let Some((kib, secs, rate, _)) = merge {
        if let (Some(kib), Some(secs)) = (kib, secs) {
            out.push_str(&format!(
                "snapshot merge    {} copied into the base disk in {secs:.2} s",
                mib_of_kib(kib)
            ));
            if let Some(rate) = rate {
                out.push_str(&format!(" ({rate:.2} MB/s)"));
            }
            if let Some(c) = copy {
                out.push_str(&format!("; a plain copy of the same data takes {c:.2} s"));
            }
            out.push('\n');
        }
    }
    let peak = merge.and_then(|m| m.3);
    if let Some((Some(rss), anon, file)) = memory {
        out.push_str(&format!(
            "daemon memory     {} in RAM while serving reads",
            mib_of_kib(rss)
        ));
        if let (Some(anon), Some(file)) = (anon, file) {
            out.push_str(&format!(
                " ({} its own data, {} pages of files it reads, such as the COW)",
                mib_of_kib(anon),
                mib_of_kib(file)
            ));
        }
        if let Some(p) = peak {
            out.push_str(&format!("; at most {} during the merge", mib_of_kib(p)));
        }
        out.push('\n');
    }
    for line in other {
        out.push_str(&format!("emulator          {line}\n"));
    }
    out
}

/// Build the guest programs (and dm-user, for that transport) for 6.12, boot it with `disks`
/// and the demo's script (loading `ublk_drv` for the ublk transport), keep the log plain
/// text. Returns the run and the kernel release.
fn boot(
    repo: &Path,
    disks: Vec<PathBuf>,
    init_fragment: String,
    timeout: Duration,
    transport: Transport,
) -> Result<(crate::vm::VmRun, String)> {
    let build_root = repo.join("build");
    let _lock = crate::lock_build_dir(&build_root)?;
    step(&format!(
        "device stage: building the guest programs{} for the {} kernel",
        match transport {
            Transport::DmUser => " and dm-user",
            Transport::Ublk => "",
        },
        DEMO_KERNEL.label()
    ));
    deps::ensure_host_tools()?;
    let bins = guest::build(
        repo,
        &build_root,
        &[
            GuestBinary::new("vm-tests", "vmtest"),
            GuestBinary::new("snapuserd", "snapuserd"),
        ],
    )?;
    let kernel = deps::ensure_kernel(DEMO_KERNEL)?;
    let release = kernel.abi.clone();
    let (extra_modules, stock_extra) = match transport {
        Transport::DmUser => (vec![kmod::build_dm_user(repo, &build_root, &kernel)?], None),
        Transport::Ublk => (Vec::new(), Some("ublk_drv".to_string())),
    };
    step("device stage: booting the emulator");
    let spec = VmSpec {
        label: "demo".into(),
        kernel,
        disks,
        initramfs: InitramfsSpec {
            modules: initramfs::BASE_MODULES
                .iter()
                .map(|s| s.to_string())
                .chain(stock_extra)
                .collect(),
            extra_modules,
            binaries: bins,
            init_fragment,
        },
        timeout,
        memory_mib: 1024,
        cpus: 2,
        cmdline_extra: String::new(),
    };
    let run = spec.run(&build_root)?;
    // The firmware clears the screen with terminal escapes; keep the log file plain text.
    if let Ok(raw) = std::fs::read(&run.log_path) {
        let plain = strip_terminal_escapes(&raw);
        if plain.len() != raw.len() {
            std::fs::write(&run.log_path, plain).map_err(io_err("write", &run.log_path))?;
        }
    }
    Ok((run, release))
}

/// Copies of `files` under `build/demo/device` (the emulator writes to its disks).
fn disk_copies(repo: &Path, files: &[(&Path, &str)]) -> Result<Vec<PathBuf>> {
    let disks = repo.join("build/demo/device");
    std::fs::create_dir_all(&disks).map_err(io_err("create", &disks))?;
    files
        .iter()
        .map(|(from, name)| {
            let to = disks.join(name);
            std::fs::copy(from, &to).map_err(io_err("copy to", &to))?;
            Ok(to)
        })
        .collect()
}

/// The text after `marker` on every log line holding it (`\r` removed).
fn guest_lines<'a>(log: &'a str, marker: &str) -> Vec<&'a str> {
    log.lines()
        .filter_map(|l| l.split_once(marker))
        .map(|(_, rest)| rest.trim_end_matches('\r'))
        .collect()
}

/// Legacy mode: boot the 6.12 kernel with a copy of the base image, the COW and the target as
/// virtio disks, and run the OTA reboot with the real daemon under dm-snapshot (`vmtest snap
/// read-merge`, the same guest code as `cargo xtask vm-snapshot`); then compare the merged
/// base disk with the target on the host.
fn legacy_device_stage(
    repo: &Path,
    source: &Path,
    target: &Path,
    cow: &Path,
) -> Result<DeviceStage> {
    let disks = disk_copies(repo, &[(source, "base.img"), (cow, "update.cow")])?;
    let base = disks[0].clone();
    let mut all = disks;
    all.push(target.to_path_buf());
    let (run, kernel) = boot(
        repo,
        all,
        demo_init_fragment(true, 0, 1, Transport::DmUser),
        Duration::from_secs(1500),
        Transport::DmUser,
    )?;
    let expected = ["snap-read-demo".to_string(), "snap-merge-demo".to_string()];
    let results = report::evaluate(&run, &expected);
    let failed = |name: &str| results.iter().any(|r| r.name == name && !r.pass);
    let (failure, host_base_ok) = run_verdict(&run, &results, &base, target)?;
    let lines = guest_lines(&run.log, "VMINFO snap-demo ");
    Ok(DeviceStage {
        mode: "legacy",
        transport: Transport::DmUser,
        kernel,
        summary: format!(
            "snapshot read == target, merge done, base disk == target (guest and host); {:.0} s boot, log {}",
            run.elapsed.as_secs_f64(),
            run.log_path.display()
        ),
        figures: plain_figures(&lines),
        snapshot_equals_target: !failed("snap-read-demo")
            && results.iter().any(|r| r.name == "snap-read-demo"),
        base_equals_target: host_base_ok && !failed("snap-merge-demo"),
        failure,
        json: JsonFigures::from_legacy_lines(&lines),
        per_round: serde_json::Value::Array(Vec::new()),
        by_workers: serde_json::Value::Array(Vec::new()),
    })
}

/// User-space-merge mode: boot with the base, the COW, the target and pristine copies of base
/// and COW; the guest (`vmtest demo-usm`) runs `rounds` rounds. Then the host compares the
/// base disk with the target, computes the medians and draws the progress plot.
fn user_device_stage(
    repo: &Path,
    source: &Path,
    target: &Path,
    cow: &Path,
    changed_bytes: u64,
    rounds: usize,
    transport: Transport,
) -> Result<DeviceStage> {
    let disks = disk_copies(
        repo,
        &[
            (source, "base.img"),
            (cow, "update.cow"),
            (source, "pristine-base.img"),
            (cow, "pristine-update.cow"),
        ],
    )?;
    let base = disks[0].clone();
    let all = vec![
        disks[0].clone(),
        disks[1].clone(),
        target.to_path_buf(),
        disks[2].clone(),
        disks[3].clone(),
    ];
    let limit = Duration::from_secs(600 + 600 * rounds as u64);
    let (run, kernel) = boot(
        repo,
        all,
        demo_init_fragment(false, changed_bytes, rounds, transport),
        limit,
        transport,
    )?;
    let mut expected = vec!["demo-snapshot-read".to_string(), "demo-usm".to_string()];
    expected.extend((0..rounds).map(|i| format!("demo-merge-round{i}")));
    let results = report::evaluate(&run, &expected);
    let passed = |name: &str| results.iter().any(|r| r.name == name && r.pass);
    let (failure, host_base_ok) = run_verdict(&run, &results, &base, target)?;
    let guest = demo_figures::parse(&guest_lines(&run.log, "VMDEMO "));
    let medians = demo_figures::medians(&guest.rounds);
    let plot = repo.join("build/demo/merge-progress.svg");
    let plotted = match &medians {
        Some(m) => write_plot(&plot, &guest, m)?,
        None => false,
    };
    let figures = user_figures(&guest, medians.as_ref(), plotted.then_some(plot.as_path()));
    let per_round = serde_json::Value::Array(
        guest
            .rounds
            .iter()
            .map(|r| {
                serde_json::json!({
                    "snapshot_read_mb_s": r.snapshot_read_mb_s,
                    "loop_read_mb_s": r.loop_read_mb_s,
                    "snapshot_rand_4k_iops": r.snapshot_rand_iops,
                    "loop_rand_4k_iops": r.loop_rand_iops,
                    "merge_s": r.merge_s,
                    "plain_copy_s": r.plain_copy_s,
                    "scattered_copy_s": r.scattered_copy_s,
                    "daemon_rss_anon_kib": r.rss_anon_kib,
                    "daemon_rss_serving_kib": r.rss_serving_kib,
                    "daemon_rss_peak_kib": r.rss_peak_kib,
                    "daemon_threads": r.threads,
                })
            })
            .collect(),
    );
    let by_workers = serde_json::Value::Array(
        guest
            .by_workers
            .iter()
            .map(|(w, anon, rss)| {
                serde_json::json!({ "workers": w, "rss_anon_kib": anon, "vm_rss_kib": rss })
            })
            .collect(),
    );
    Ok(DeviceStage {
        by_workers,
        mode: "user-space-merge",
        transport,
        kernel,
        summary: format!(
            "{} device over the whole partition == target, {} merge rounds each leaving base == target (guest), final base disk {} the target (host); {:.0} s boot, log {}",
            transport.name(),
            guest.rounds.len(),
            if host_base_ok { "==" } else { "!=" },
            run.elapsed.as_secs_f64(),
            run.log_path.display()
        ),
        figures,
        snapshot_equals_target: passed("demo-snapshot-read"),
        base_equals_target: host_base_ok
            && (0..rounds).all(|i| {
                passed(&format!("demo-merge-round{i}"))
                    && passed(&format!("demo-scattered-copy-round{i}"))
            }),
        failure,
        json: medians
            .as_ref()
            .map(JsonFigures::from_medians)
            .unwrap_or_else(JsonFigures::none),
        per_round,
    })
}

/// Draw the median round's merge progress; false when that round has no samples.
fn write_plot(path: &Path, guest: &GuestFigures, m: &Medians) -> Result<bool> {
    let Some(round) = m.median_merge_round else {
        return Ok(false);
    };
    let (Some(samples), Some(r)) = (
        guest.progress.get(&round),
        guest.rounds.iter().find(|r| r.index == round),
    ) else {
        return Ok(false);
    };
    let title = format!(
        "user-space merge, round {round} (median of {}): {:.2} s vs copies {:.2} / {:.2} s",
        m.rounds, r.merge_s, r.plain_copy_s, r.scattered_copy_s
    );
    let svg = demo_svg::render(&ProgressPlot {
        title: &title,
        samples,
        merge_s: r.merge_s,
        plain_copy_s: r.plain_copy_s,
        scattered_copy_s: r.scattered_copy_s,
    });
    std::fs::write(path, svg).map_err(io_err("write", path))?;
    Ok(true)
}

/// The user-space-merge figures in plain words: medians with their references and ratios,
/// then one line per round.
fn user_figures(guest: &GuestFigures, m: Option<&Medians>, plot: Option<&Path>) -> String {
    let Some(m) = m else {
        return "emulator          no complete round was reported\n".into();
    };
    let mut out = format!(
        "snapshot read     {:.1} MB/s, sequential O_DIRECT 1 MiB (target on a loop device over tmpfs: {:.1} MB/s; ratio {:.2}; medians of {} alternating rounds)\n\
         random 4 KiB      {:.0} reads/s (loop over tmpfs: {:.0} reads/s; ratio {:.2})\n\
         merge             {:.2} s (a plain O_DIRECT copy of the changed bytes with fsync: {:.2} s; ratio {:.2})\n\
         merge vs scatter  {:.2} s (a plain O_DIRECT copy with one fsync of the changed blocks to their own places: {:.2} s; ratio {:.2})\n\
         daemon memory     at most {} anonymous while serving, at most {} resident during the merges\n",
        m.snapshot_read_mb_s,
        m.loop_read_mb_s,
        m.read_ratio,
        m.rounds,
        m.snapshot_rand_iops,
        m.loop_rand_iops,
        m.rand_ratio,
        m.merge_s,
        m.plain_copy_s,
        m.merge_ratio,
        m.merge_s,
        m.scattered_copy_s,
        m.scattered_ratio,
        mib_of_kib(m.rss_anon_kib as f64),
        mib_of_kib(m.rss_peak_kib as f64),
    );
    if let Some(p) = plot {
        out.push_str(&format!("progress plot     {}\n", p.display()));
    }
    for (workers, anon, rss) in &guest.by_workers {
        out.push_str(&format!(
            "memory by workers {workers} worker(s): RssAnon {anon} KiB, VmRSS {rss} KiB after a sequential and a random pass\n"
        ));
    }
    for line in &guest.io_lines {
        out.push_str(&format!("time breakdown    {line}\n"));
    }
    for r in &guest.rounds {
        out.push_str(&format!(
            "round {}           read {:.1} / loop {:.1} MB/s, random {:.0} / {:.0} reads/s, merge {:.2} s / copy {:.2} s / scattered copy {:.2} s, RssAnon {} KiB, VmRSS {} KiB serving, {} KiB peak, {} threads\n",
            r.index,
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
            r.threads
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest's lines in the shapes `tests/vm/src/snapshot_cases.rs` prints them.
    const GUEST: [&str; 4] = [
        "snapshot-read 61.3 MB/s vs the target image on a loop device over tmpfs 240.5 MB/s",
        "snapshot-read 61.3 MB/s, raw base read 180.2 MB/s (256 MiB, O_DIRECT 1 MiB), daemon VmRSS 8192 KiB (RssAnon 2600 KiB, RssFile 5592 KiB; VmLck 120000 KiB is the virtual size of its locked mappings, not memory), COW device 40960 sectors",
        "merge 65536 KiB of exceptions in 5.70 s (11.77 MB/s), daemon peak VmRSS 10240 KiB",
        "plain copy of 65536 KiB target->base (O_DIRECT, 1 MiB, fsync) 1.20 s (55.92 MB/s) vs merge 5.70 s",
    ];

    #[test]
    fn figures_are_said_once_and_plainly() {
        let text = plain_figures(&GUEST);
        assert_eq!(text.matches("61.3 MB/s").count(), 1, "{text}");
        assert!(
            !text.contains("VmLck") && !text.contains("not memory"),
            "{text}"
        );
        assert!(
            !text.contains("RssAnon") && !text.contains("VmRSS"),
            "{text}"
        );
        assert!(
            text.contains("snapshot read     61.3 MB/s over 256 MiB"),
            "{text}"
        );
        assert!(
            text.contains("240.5 MB/s") && text.contains("180.2 MB/s"),
            "{text}"
        );
        assert!(
            text.contains("64.0 MiB copied into the base disk in 5.70 s (11.77 MB/s)"),
            "{text}"
        );
        assert!(
            text.contains("plain copy of the same data takes 1.20 s"),
            "{text}"
        );
        assert!(text.contains("daemon memory     8.0 MiB in RAM"), "{text}");
        assert!(
            text.contains("2.5 MiB its own data") && text.contains("at most 10.0 MiB"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn unknown_lines_pass_through_and_missing_ones_are_left_out() {
        let text = plain_figures(&["something new 1.0", GUEST[2]]);
        assert!(
            text.contains("emulator          something new 1.0"),
            "{text}"
        );
        assert!(!text.contains("snapshot read"), "{text}");
        assert!(text.contains("snapshot merge"), "{text}");
    }

    #[test]
    fn report_json_has_the_named_keys_with_their_types() {
        let guest = demo_figures::parse(&[
            "round 0 snapshot_read_mb_s 300 loop_read_mb_s 600 snapshot_rand_iops 900 loop_rand_iops 1000 merge_s 1.5 plain_copy_s 1.0 scattered_copy_s 3.0 rss_anon_kib 4000 rss_serving_kib 9000 rss_peak_kib 12000 threads 7",
        ]);
        let m = demo_figures::medians(&guest.rounds).unwrap();
        let mut json = JsonFigures::from_medians(&m);
        json.loop_rand_iops = f64::NAN;
        let mut device = DeviceStage {
            mode: "user-space-merge",
            transport: Transport::DmUser,
            kernel: "6.12.0-test".into(),
            summary: String::new(),
            figures: String::new(),
            snapshot_equals_target: true,
            base_equals_target: false,
            failure: None,
            json,
            per_round: serde_json::Value::Array(Vec::new()),
            by_workers: serde_json::Value::Array(Vec::new()),
        };
        let v: serde_json::Value = serde_json::from_str(&report_json(&device, 4096, 1234)).unwrap();
        for key in ["mode", "transport", "kernel"] {
            assert!(v[key].is_string(), "{key}: {}", v[key]);
        }
        for key in [
            "changed_bytes",
            "cow_bytes",
            "snapshot_read_mb_s",
            "loop_read_mb_s",
            "merge_s",
            "plain_copy_s",
            "scattered_copy_s",
            "merge_over_scattered_copy",
            "daemon_rss_peak_kib",
            "daemon_rss_anon_kib",
        ] {
            assert!(v[key].is_number(), "{key}: {}", v[key]);
        }
        assert_eq!(v["snapshot_equals_target"], serde_json::Value::Bool(true));
        assert_eq!(v["base_equals_target"], serde_json::Value::Bool(false));
        assert_eq!(v["transport"], "dm-user");
        assert_eq!(v["snapshot_read_ratio"].as_f64(), Some(0.5));
        assert_eq!(v["merge_over_plain_copy"].as_f64(), Some(1.5));
        assert_eq!(v["scattered_copy_s"].as_f64(), Some(3.0));
        assert_eq!(v["merge_over_scattered_copy"].as_f64(), Some(0.5));
        assert_eq!(v["daemon_rss_anon_kib"].as_u64(), Some(4000));
        assert!(v["loop_rand_4k_iops"].is_null(), "not measured is null");
        device.transport = Transport::Ublk;
        let v: serde_json::Value = serde_json::from_str(&report_json(&device, 4096, 1234)).unwrap();
        assert_eq!(v["transport"], "ublk");
        assert_eq!(v["changed_bytes"].as_u64(), Some(4096));
    }

    #[test]
    fn options_parse_mode_rounds_and_transport() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = DemoOptions::parse(&args(&[])).unwrap();
        assert!(!o.legacy && o.rounds == DEFAULT_ROUNDS);
        let o = DemoOptions::parse(&args(&["--legacy", "--rounds", "7"])).unwrap();
        assert!(o.legacy && o.rounds == 7);
        assert_eq!(o.transport, Transport::DmUser);
        let o = DemoOptions::parse(&args(&["--transport", "dm-user"])).unwrap();
        assert_eq!(o.transport, Transport::DmUser);
        let o = DemoOptions::parse(&args(&["--transport", "ublk", "--rounds", "3"])).unwrap();
        assert!(o.transport == Transport::Ublk && o.rounds == 3 && !o.legacy);
        assert!(DemoOptions::parse(&args(&["--transport", "nbd"])).is_err());
        assert!(DemoOptions::parse(&args(&["--transport"])).is_err());
        // dm-snapshot's COW device is a dm-user device: no legacy mode over ublk.
        let e = DemoOptions::parse(&args(&["--legacy", "--transport", "ublk"])).unwrap_err();
        assert!(e.to_string().contains("user-space-merge mode only"), "{e}");
        assert!(DemoOptions::parse(&args(&["--legacy", "--transport", "dm-user"])).is_ok());
        assert!(DemoOptions::parse(&args(&["--rounds", "0"])).is_err());
        assert!(DemoOptions::parse(&args(&["--source", "a.img"])).is_err());
    }

    #[test]
    fn terminal_escapes_are_removed_from_the_log() {
        let raw = "\u{1b}c\u{1b}[?7l\u{1b}[2J\u{1b}[0mSeaBIOS\r\n\u{1b}[32mINFO\u{1b}[0m serving [1.0] x\n";
        assert_eq!(
            strip_terminal_escapes(raw.as_bytes()),
            b"SeaBIOS\r\nINFO serving [1.0] x\n"
        );
        assert_eq!(
            strip_terminal_escapes(b"plain [ text ]\xff\n"),
            b"plain [ text ]\xff\n"
        );
    }

    #[test]
    fn the_guest_logs_without_colour_codes() {
        let fragment = demo_init_fragment(false, 4096, 5, Transport::DmUser);
        assert!(
            fragment.contains("demo-usm")
                && fragment.contains("rounds=5")
                && fragment.contains("transport=dm-user"),
            "{fragment}"
        );
        let fragment = demo_init_fragment(false, 4096, 3, Transport::Ublk);
        assert!(fragment.contains("transport=ublk"), "{fragment}");
        let fragment = demo_init_fragment(true, 0, 1, Transport::DmUser);
        let style = fragment.find("RUST_LOG_STYLE=never").expect("plain logs");
        assert!(style < fragment.find("/bin/vmtest").unwrap(), "{fragment}");
    }
}
