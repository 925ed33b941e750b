//! `cargo xtask vm-snapshot [--kernel 6.1|6.12] [--timeout SECS]`: the snapshot scenarios of
//! the emulator with the real `snapuserd` daemon.
//!
//! On the host: a small ext4 pair (`mke2fs -d` of a real tree before and after a simulated
//! upgrade) and a synthetic pair (`ota-tools/bench/synthetic_pair.py`: overlapping shifted
//! runs, thousands of ordered COPY ops), their COWs from `ota-tools create`, and a fresh copy of
//! base and COW per scenario. Per kernel, one boot plus a pair per power-off point:
//!
//! 1. `a`: snapshot read + merge on both pairs, then on the synthetic one the daemon killed
//!    mid-merge (new daemon on a new misc name, snapshot-merge recreated), and two live
//!    handoffs mid-merge (the dm-user table reloaded onto a new daemon under the running
//!    snapshot-merge, whose in-core table is kept): libsnapshot's second-stage order (new
//!    daemon first) and init's SELinux transition order (table first, same length); and a
//!    merge paused (`pause_merge`: it must stand still) and resumed;
//! 2. `p<N>-1`: the merge started and the VM powered off once N% of it is done (N = 5, 35, 70);
//! 3. `p<N>-2`: the same disk images booted again, the merge resumed and the base checked.
//!
//! The guest half is `tests/vm/src/snapshot_cases.rs` (`vmtest snap ...`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::deps::{self, KernelSeries};
use crate::error::{io_err, Result, XtaskError};
use crate::guest::{self, GuestBinary};
use crate::initramfs::{self, InitramfsSpec};
use crate::report::{self, TestResult};
use crate::vm::{BootEnd, VmSpec};
use crate::{cmd, ext4_images, kmod};

/// Size of the ext4 images, MiB (TCG is slow: keep it small).
const EXT4_MIB: u64 = 32;
/// Size of the synthetic images, MiB.
const SYNTHETIC_MIB: u64 = 16;
/// The file the ext4 check reads through the mounted snapshot, and its content in the target.
const MARKER: (&str, &str) = ("OTA_RELEASE", "v2");
/// Power-off points of the power-off scenario: percentage of the exceptions merged.
const POWEROFF_PERCENTS: [u64; 3] = [5, 35, 70];

/// Options of `cargo xtask vm-snapshot`.
#[derive(Debug, Default)]
pub struct SnapshotOptions {
    /// Kernels to run on (both when empty).
    pub kernels: Vec<KernelSeries>,
    /// Wall-clock limit of the longest boot, seconds.
    pub timeout: Option<u64>,
}

impl SnapshotOptions {
    /// Parse `[--kernel 6.1|6.12]... [--timeout SECS]`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| XtaskError::Usage(format!("{flag} needs a value")))
            };
            match a.as_str() {
                "--kernel" => o.kernels.push(KernelSeries::parse(&value("--kernel")?)?),
                "--timeout" => {
                    let v = value("--timeout")?;
                    o.timeout = Some(
                        v.parse()
                            .map_err(|_| XtaskError::Usage(format!("bad --timeout {v}")))?,
                    );
                }
                other => {
                    return Err(XtaskError::Usage(format!(
                        "unknown argument {other:?}; usage: cargo xtask vm-snapshot [--kernel 6.1|6.12] [--timeout SECS]"
                    )))
                }
            }
        }
        if o.kernels.is_empty() {
            o.kernels = KernelSeries::ALL.to_vec();
        }
        Ok(o)
    }
}

/// One source/target pair with its COW.
struct Pair {
    source: PathBuf,
    target: PathBuf,
    cow: PathBuf,
}

/// Run the scenarios on every selected kernel; fails if any result fails.
pub fn run(repo: &Path, opts: &SnapshotOptions) -> Result<()> {
    let build_root = repo.join("build");
    std::fs::create_dir_all(&build_root).map_err(io_err("create", &build_root))?;
    let _lock = crate::lock_build_dir(&build_root)?;
    deps::ensure_host_tools()?;
    deps::ensure_packages(&["e2fsprogs", "python3"])?;
    let work = build_root.join("vmsnap");
    std::fs::create_dir_all(&work).map_err(io_err("create", &work))?;

    eprintln!("xtask: building ota-tools (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd::run(
        Command::new(&cargo)
            .args(["build", "--release", "--locked", "-p", "ota-tools"])
            .current_dir(repo),
    )?;
    let tool = repo.join("target/release/ota-tools");
    let ext4 = ext4_pair(repo, &work, &tool)?;
    let synthetic = synthetic_pair(repo, &work, &tool)?;

    let bins = guest::build(
        repo,
        &build_root,
        &[
            GuestBinary::new("vm-tests", "vmtest"),
            GuestBinary::new("snapuserd", "snapuserd"),
        ],
    )?;
    let mut all: Vec<(KernelSeries, TestResult)> = Vec::new();
    for &series in &opts.kernels {
        let kernel = deps::ensure_kernel(series)?;
        eprintln!("xtask: kernel {} -> {}", series.label(), kernel.abi);
        let ko = kmod::build_dm_user(repo, &build_root, &kernel).ok();
        let k = series.label();
        let disks = work.join(format!("run-{k}"));
        std::fs::create_dir_all(&disks).map_err(io_err("create", &disks))?;
        let fresh = |name: &str, from: &Path| -> Result<PathBuf> {
            let p = disks.join(name);
            std::fs::copy(from, &p).map_err(io_err("copy to", &p))?;
            Ok(p)
        };
        let limit = opts.timeout.unwrap_or(1500);
        let spec = |label: &str, disks: Vec<PathBuf>, fragment: String, secs: u64| VmSpec {
            label: format!("snap-{k}-{label}"),
            kernel: kernel.clone(),
            disks,
            initramfs: InitramfsSpec {
                modules: initramfs::BASE_MODULES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                extra_modules: ko.iter().cloned().collect(),
                binaries: bins.clone(),
                init_fragment: fragment,
            },
            timeout: Duration::from_secs(secs),
            memory_mib: 1024,
            cpus: 2,
            cmdline_extra: String::new(),
        };

        // Boot a: read + merge (ext4, synthetic), then the daemon kill on the synthetic pair.
        let mut disks_a = vec![
            fresh("e4-base.img", &ext4.source)?,
            fresh("e4.cow", &ext4.cow)?,
            ext4.target.clone(),
            fresh("syn-base.img", &synthetic.source)?,
            fresh("syn.cow", &synthetic.cow)?,
            synthetic.target.clone(),
            fresh("synk-base.img", &synthetic.source)?,
            fresh("synk.cow", &synthetic.cow)?,
        ];
        let mut fragment_a = format!(
            "/bin/vmtest snap read-merge ext4 /dev/vda /dev/vdb /dev/vdc {}={}\n\
             /bin/vmtest snap read-merge syn /dev/vdd /dev/vde /dev/vdf\n\
             /bin/vmtest snap kill-merge synk /dev/vdg /dev/vdh /dev/vdf\n",
            MARKER.0, MARKER.1
        );
        let mut expected_a: Vec<String> = [
            "snap-read-ext4",
            "snap-merge-ext4",
            "snap-read-syn",
            "snap-merge-syn",
            "snap-read-synk",
            "snap-kill-merge-synk",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Live handoffs mid-merge: libsnapshot's second-stage path and init's SELinux
        // transition order.
        disks_a.push(fresh("synh-base.img", &synthetic.source)?);
        disks_a.push(fresh("synh.cow", &synthetic.cow)?);
        disks_a.push(fresh("synt-base.img", &synthetic.source)?);
        disks_a.push(fresh("synt.cow", &synthetic.cow)?);
        // And pause_merge/resume_merge mid-merge.
        disks_a.push(fresh("synq-base.img", &synthetic.source)?);
        disks_a.push(fresh("synq.cow", &synthetic.cow)?);
        fragment_a.push_str(
            "/bin/vmtest snap handoff-merge synh /dev/vdi /dev/vdj /dev/vdf\n\
             /bin/vmtest snap transition-merge synt /dev/vdk /dev/vdl /dev/vdf\n\
             /bin/vmtest snap pause-merge synq /dev/vdm /dev/vdn /dev/vdf\n",
        );
        for s in [
            "snap-read-synh",
            "snap-handoff-merge-synh",
            "snap-read-synt",
            "snap-transition-merge-synt",
            "snap-read-synq",
            "snap-pause-merge-synq",
        ] {
            expected_a.push(s.into());
        }
        let run = spec("a", disks_a, fragment_a, limit).run(&build_root)?;
        collect(&mut all, series, "a", report::evaluate(&run, &expected_a));

        // Boots p1/p2: power-off in the middle of the merge, then resume on the same images;
        // once per power-off point (percentage of the exceptions merged).
        for pct in POWEROFF_PERCENTS {
            let tag = format!("synp{pct}");
            let disks_p = vec![
                fresh(&format!("{tag}-base.img"), &synthetic.source)?,
                fresh(&format!("{tag}.cow"), &synthetic.cow)?,
                synthetic.target.clone(),
            ];
            let args = format!("{tag} /dev/vda /dev/vdb /dev/vdc at={pct}");
            let run1 = spec(
                &format!("p{pct}-1"),
                disks_p.clone(),
                format!(
                    "/bin/vmtest snap poweroff-merge {args}\necho VMINFO poweroff did not happen\n"
                ),
                limit.min(900),
            )
            .run(&build_root)?;
            let mut r1 = report::evaluate(&run1, &[format!("snap-poweroff-{tag}")]);
            // This boot must end by the power-off, before the init script's own VMDONE.
            for r in &mut r1 {
                if r.name == "boot-completed" {
                    r.name = "powered-off-mid-merge".into();
                    r.pass = run1.end == BootEnd::Exited && !run1.log.contains("VMDONE");
                    r.detail = if r.pass {
                        "qemu exited without VMDONE (power cut)".into()
                    } else {
                        format!(
                            "boot ended {:?}, VMDONE printed: {}",
                            run1.end,
                            run1.log.contains("VMDONE")
                        )
                    };
                }
            }
            let powered_off = r1.iter().all(|r| r.pass || r.name == "kernel-log-clean");
            collect(&mut all, series, &format!("p{pct}-1"), r1);
            if powered_off {
                let run2 = spec(
                    &format!("p{pct}-2"),
                    disks_p,
                    format!("/bin/vmtest snap resume-merge {args}\n"),
                    limit,
                )
                .run(&build_root)?;
                collect(
                    &mut all,
                    series,
                    &format!("p{pct}-2"),
                    report::evaluate(&run2, &[format!("snap-resume-merge-{tag}")]),
                );
            } else {
                all.push((
                    series,
                    TestResult {
                        name: format!("p{pct}-2/snap-resume-merge-{tag}"),
                        pass: false,
                        detail:
                            "first boot did not power off mid-merge: precondition not established"
                                .into(),
                    },
                ));
            }
        }
    }
    println!();
    for (series, r) in &all {
        println!(
            "vm-snapshot {:<5} {:<32} {} {}",
            series.label(),
            r.name,
            if r.pass { "PASS" } else { "FAIL" },
            r.detail
        );
    }
    let failed = all.iter().filter(|(_, r)| !r.pass).count();
    if failed > 0 {
        return Err(XtaskError::TestsFailed(failed));
    }
    Ok(())
}

fn collect(
    all: &mut Vec<(KernelSeries, TestResult)>,
    series: KernelSeries,
    boot: &str,
    results: Vec<TestResult>,
) {
    for mut r in results {
        r.name = format!("{boot}/{}", r.name);
        all.push((series, r));
    }
}

fn create_cow(tool: &Path, source: &Path, target: &Path, cow: &Path) -> Result<()> {
    let out = cmd::output(
        Command::new(tool)
            .arg("create")
            .args(["--merge-mode", "legacy"])
            .arg("--source")
            .arg(source)
            .arg("--target")
            .arg(target)
            .arg("--output")
            .arg(cow),
    )?;
    eprint!("{out}");
    Ok(())
}

/// ext4 images of a small real tree (a few Python standard-library packages) before and after
/// `ota-tools/bench/upgrade_tree.py`, with a marker file naming the release.
fn ext4_pair(repo: &Path, work: &Path, tool: &Path) -> Result<Pair> {
    let source = work.join("ext4-source.img");
    let target = work.join("ext4-target.img");
    let cow = work.join("ext4.cow");
    let lib = ext4_images::python_lib()?;
    let v1 = work.join("tree-v1");
    let v2 = work.join("tree-v2");
    for d in [&v1, &v2] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(io_err("remove", d))?;
        }
        std::fs::create_dir_all(d).map_err(io_err("create", d))?;
    }
    for sub in [
        "email", "json", "http", "logging", "xml", "urllib", "asyncio",
    ] {
        let from = lib.join(sub);
        if from.is_dir() {
            cmd::run(Command::new("cp").arg("-a").arg(&from).arg(&v1))?;
        }
    }
    std::fs::write(v1.join(MARKER.0), "v1\n").map_err(io_err("write", &v1))?;
    cmd::run(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", v1.display()))
            .arg(&v2),
    )?;
    cmd::run(
        Command::new("python3")
            .arg(repo.join("ota-tools/bench/upgrade_tree.py"))
            .arg(&v2),
    )?;
    std::fs::write(v2.join(MARKER.0), format!("{}\n", MARKER.1)).map_err(io_err("write", &v2))?;
    for (tree, img) in [(&v1, &source), (&v2, &target)] {
        ext4_images::mke2fs_from_tree(tree, img, &format!("{EXT4_MIB}M"))?;
    }
    for d in [&v1, &v2] {
        std::fs::remove_dir_all(d).map_err(io_err("remove", d))?;
    }
    create_cow(tool, &source, &target, &cow)?;
    Ok(Pair {
        source,
        target,
        cow,
    })
}

/// `ota-tools/bench/synthetic_pair.py`: shifted overlapping runs (long chains of ordered COPY
/// ops, far more than one 510-block read-ahead window), swaps, edits, zero runs, new data.
fn synthetic_pair(repo: &Path, work: &Path, tool: &Path) -> Result<Pair> {
    let source = work.join("syn-source.img");
    let target = work.join("syn-target.img");
    let cow = work.join("syn.cow");
    cmd::run(
        Command::new("python3")
            .arg(repo.join("ota-tools/bench/synthetic_pair.py"))
            .arg(&source)
            .arg(&target)
            .arg(SYNTHETIC_MIB.to_string()),
    )?;
    create_cow(tool, &source, &target, &cow)?;
    Ok(Pair {
        source,
        target,
        cow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_default_to_both_kernels() {
        let o = SnapshotOptions::parse(&[]).unwrap();
        assert_eq!(o.kernels, KernelSeries::ALL.to_vec());
        assert_eq!(o.timeout, None);
    }

    #[test]
    fn options_parse_kernel_and_timeout() {
        let o = SnapshotOptions::parse(&args(&["--kernel", "6.12", "--timeout", "90"])).unwrap();
        assert_eq!(o.kernels, vec![KernelSeries::parse("6.12").unwrap()]);
        assert_eq!(o.timeout, Some(90));
    }

    #[test]
    fn options_refuse_unknown_and_incomplete_arguments() {
        assert!(SnapshotOptions::parse(&args(&["--bogus"])).is_err());
        assert!(SnapshotOptions::parse(&args(&["--live-handoff"])).is_err());
        assert!(SnapshotOptions::parse(&args(&["--timeout"])).is_err());
        assert!(SnapshotOptions::parse(&args(&["--timeout", "x"])).is_err());
    }
}
