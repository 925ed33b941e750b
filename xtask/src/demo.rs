//! `cargo xtask demo`: the OTA demo, the project's main job.
//!
//! Host half of a Virtual A/B update, end to end: a realistic pair of ext4 images (a real
//! directory tree before and after a simulated package upgrade, packed with `mke2fs -d`), the
//! COW file `ota-tools create` makes from them, `ota-tools verify`, and the merge a device would
//! run, done in place on a copy of the base image in the COW's merge order, checked against the
//! target byte for byte. Then the device half, in the emulator (Debian's 6.12 cloud kernel under
//! qemu TCG, with our dm-user module): the real `snapuserd` serves the COW over dm-user under
//! `snapshot <base> <dm-user> P 8`, the whole snapshot device is read and compared with the
//! target, `snapshot-merge` runs to completion, and the merged base disk is compared with the
//! target inside the guest and again on the host.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd;
use crate::deps::{self, KernelSeries};
use crate::error::{io_err, Result, XtaskError};
use crate::ext4_images;
use crate::guest::{self, GuestBinary};
use crate::initramfs::{self, InitramfsSpec};
use crate::kmod;
use crate::report;
use crate::vm::VmSpec;

const BLOCK: usize = 4096;

/// Options of `cargo xtask demo`.
#[derive(Debug, Default)]
pub struct DemoOptions {
    /// Old image; generated when absent.
    pub source: Option<PathBuf>,
    /// New image; generated when absent.
    pub target: Option<PathBuf>,
}

impl DemoOptions {
    /// Parse `[--source SRC.img --target TGT.img]`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str| {
                it.next()
                    .map(PathBuf::from)
                    .ok_or_else(|| XtaskError::Usage(format!("{flag} needs a path")))
            };
            match a.as_str() {
                "--source" => o.source = Some(value("--source")?),
                "--target" => o.target = Some(value("--target")?),
                other => {
                    return Err(XtaskError::Usage(format!(
                        "unknown argument {other:?}; usage: cargo xtask demo [--source SRC.img --target TGT.img]"
                    )))
                }
            }
        }
        if o.source.is_some() != o.target.is_some() {
            return Err(XtaskError::Usage(
                "give both --source and --target, or neither (a pair is then generated)".into(),
            ));
        }
        Ok(o)
    }
}

/// Run the demo; prints a report and writes it to `build/demo/report.txt`.
pub fn run(repo: &Path, opts: &DemoOptions) -> Result<()> {
    let work = repo.join("build/demo");
    std::fs::create_dir_all(&work).map_err(io_err("create", &work))?;
    let (source, target) = match (&opts.source, &opts.target) {
        (Some(s), Some(t)) => (s.clone(), t.clone()),
        _ => make_ext4_pair(repo, &work)?,
    };

    step("building ota-tools (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd::run(
        Command::new(cargo)
            .args(["build", "--release", "--locked", "-p", "ota-tools"])
            .current_dir(repo),
    )?;
    let tool = repo.join("target/release/ota-tools");

    let cow = work.join("update.cow");
    step("ota-tools create (v3, lz4, 64k compression factor, legacy merge order for the dm-snapshot daemon, all cores)");
    let (create_out, create_time) = timed(
        Command::new(&tool)
            .arg("create")
            .args(["--merge-mode", "legacy"])
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
            .args(["--merge-mode", "legacy"])
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
            .args(["--merge-mode", "legacy"])
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

    let device = device_stage(repo, &source, &target, &cow)?;

    let cow_len = file_len(&cow)?;
    let changed_bytes = changed.saturating_mul(BLOCK as u64);
    let report = format!(
        "OTA demo report\n\
         source image      {}\n\
         target image      {} ({:.1} MiB)\n\
         changed blocks    {changed} ({:.1} MiB)\n\
         COW file          {} ({:.2} MiB, {:.1}% of the changed bytes)\n\
         create time       {}\n\
         verify time       {}\n\
         in-place merge    {} (merged base == target, byte for byte)\n\
         device stage      {}\n{}",
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
    Ok(())
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
    /// One line: what was checked.
    summary: String,
    /// The guest's figures (snapshot read throughput, merge time, daemon memory), one per line.
    figures: String,
}

/// The guest's script: plain (uncoloured) logs, so the serial-console log file holds no
/// terminal escape codes, then the OTA reboot scenario on the three disks.
fn demo_init_fragment() -> String {
    "export RUST_LOG_STYLE=never\n/bin/vmtest snap read-merge demo /dev/vda /dev/vdb /dev/vdc\n"
        .into()
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

/// Boot the 6.12 kernel with a copy of the base image, the COW and the target as virtio disks,
/// and run the OTA reboot with the real daemon (`vmtest snap read-merge`, the same guest code as
/// `cargo xtask vm-snapshot`); then compare the merged base disk with the target on the host.
fn device_stage(repo: &Path, source: &Path, target: &Path, cow: &Path) -> Result<DeviceStage> {
    let build_root = repo.join("build");
    let _lock = crate::lock_build_dir(&build_root)?;
    step("device stage: building the guest programs and dm-user for the 6.12 kernel");
    deps::ensure_host_tools()?;
    let bins = guest::build(
        repo,
        &build_root,
        &[
            GuestBinary::new("vm-tests", "vmtest"),
            GuestBinary::new("snapuserd", "snapuserd"),
        ],
    )?;
    let kernel = deps::ensure_kernel(KernelSeries::V6_12)?;
    let ko = kmod::build_dm_user(repo, &build_root, &kernel)?;
    let disks = repo.join("build/demo/device");
    std::fs::create_dir_all(&disks).map_err(io_err("create", &disks))?;
    let base = disks.join("base.img");
    let cow_copy = disks.join("update.cow");
    std::fs::copy(source, &base).map_err(io_err("copy to", &base))?;
    std::fs::copy(cow, &cow_copy).map_err(io_err("copy to", &cow_copy))?;
    step("device stage: booting the emulator (snapuserd init/start, dm-user, dm-snapshot, read, merge)");
    let spec = VmSpec {
        label: "demo".into(),
        kernel,
        disks: vec![base.clone(), cow_copy, target.to_path_buf()],
        initramfs: InitramfsSpec {
            modules: initramfs::BASE_MODULES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            extra_modules: vec![ko],
            binaries: bins,
            init_fragment: demo_init_fragment(),
        },
        timeout: Duration::from_secs(1500),
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
    let expected = ["snap-read-demo".to_string(), "snap-merge-demo".to_string()];
    let results = report::evaluate(&run, &expected);
    if let Some(bad) = results.iter().find(|r| !r.pass) {
        return Err(XtaskError::DemoCheck(format!(
            "emulator: {} failed: {} (log: {})",
            bad.name,
            bad.detail,
            run.log_path.display()
        )));
    }
    let target_len = file_len(target)?;
    if let Some(block) = first_difference(&base, target, target_len)? {
        return Err(XtaskError::DemoCheck(format!(
            "the base disk merged in the emulator differs from the target at block {block}"
        )));
    }
    let guest_lines: Vec<&str> = run
        .log
        .lines()
        .filter_map(|l| l.split_once("VMINFO snap-demo "))
        .map(|(_, rest)| rest.trim_end_matches('\r'))
        .collect();
    let figures = plain_figures(&guest_lines);
    Ok(DeviceStage {
        summary: format!(
            "snapshot read == target, merge done, base disk == target (guest and host); {:.0} s boot, log {}",
            run.elapsed.as_secs_f64(),
            run.log_path.display()
        ),
        figures,
    })
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
        let fragment = demo_init_fragment();
        let style = fragment.find("RUST_LOG_STYLE=never").expect("plain logs");
        assert!(style < fragment.find("/bin/vmtest").unwrap(), "{fragment}");
    }
}
