//! `cargo xtask demo`: the OTA demo, the project's main job.
//!
//! Host half of a Virtual A/B update, end to end: a realistic pair of ext4 images (a real
//! directory tree before and after a simulated package upgrade, packed with `mke2fs -d`), the
//! COW file `ota-tools create` makes from them, `ota-tools verify`, and the merge a device would
//! run, done in place on a copy of the base image in the COW's merge order, checked against the
//! target byte for byte. The device half (snapuserd serving the snapshot over dm-user in the
//! emulator) joins this command when the daemon lands.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd;
use crate::deps;
use crate::error::{io_err, Result, XtaskError};

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
    step("ota-tools create (v3, lz4, 64k compression factor, all cores)");
    let (create_out, create_time) = timed(
        Command::new(&tool)
            .arg("create")
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
         device stage      snapuserd over dm-user in the emulator: not part of the demo yet (issue: snapuserd-rs daemon)\n",
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
    let tree = pick_tree()?;
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
        cmd::run(
            Command::new("mke2fs")
                .env("E2FSPROGS_FAKE_TIME", "1700000000")
                .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
                .args(["-U", "3b1c1d62-7a7e-4f42-9a55-0f0c2b5e9a11"])
                .args(["-E", "hash_seed=5f1e0e4c-2d6b-4a8e-bb0f-6c3d2a1b0e9f"])
                .arg("-d")
                .arg(tree)
                .arg(&tmp)
                .arg(&size),
        )?;
        std::fs::rename(&tmp, img).map_err(io_err("rename to", img))?;
    }
    for d in [&v1, &v2] {
        std::fs::remove_dir_all(d).map_err(io_err("remove", d))?;
    }
    Ok((source, target))
}

/// A real directory tree to upgrade: the newest Python standard library on this machine.
fn pick_tree() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .map_err(io_err("list", Path::new("/usr/lib")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3.") && p.join("os.py").exists())
        })
        .collect();
    candidates.sort();
    candidates.pop().ok_or_else(|| XtaskError::Resolve {
        what: "a directory tree for the demo images".into(),
        why: "no /usr/lib/python3.*; pass --source and --target instead".into(),
    })
}
