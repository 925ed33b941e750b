//! What the snapshot scenarios of both daemon modes share on the host: the image pairs and
//! their COW files, the guest programs, the per-boot VM spec, the power-off verdict and the
//! result table.
//!
//! Two pairs: a small ext4 pair (`mke2fs -d` of a real tree before and after a simulated
//! upgrade, with a marker file naming the release) and a synthetic pair
//! (`ota-tools/bench/synthetic_pair.py`: overlapping shifted runs, i.e. long chains of ordered
//! COPY ops over many 510-block read-ahead windows, swaps, edits, zero runs, new data). Their
//! COWs come from `ota-tools create` in the merge order of the daemon mode under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::deps::{Kernel, KernelSeries};
use crate::error::{io_err, Result};
use crate::guest::GuestBinary;
use crate::initramfs::{self, InitramfsSpec};
use crate::report::TestResult;
use crate::vm::{BootEnd, VmRun, VmSpec};
use crate::{cmd, ext4_images};

/// Size of the ext4 images, MiB (TCG is slow: keep it small).
pub const EXT4_MIB: u64 = 32;
/// Size of the synthetic images, MiB.
pub const SYNTHETIC_MIB: u64 = 16;
/// The file the ext4 checks read through the mounted snapshot, and its content in the target.
pub const MARKER: (&str, &str) = ("OTA_RELEASE", "v2");

/// The merge order a COW is written for (`ota-tools create --merge-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CowMergeMode {
    /// Android 13+ user-space merge (REPLACE/ZERO ascending).
    User,
    /// dm-snapshot-merge (REPLACE/ZERO descending).
    Legacy,
}

impl CowMergeMode {
    /// The `--merge-mode` value.
    pub fn arg(self) -> &'static str {
        match self {
            CowMergeMode::User => "user",
            CowMergeMode::Legacy => "legacy",
        }
    }
}

/// One source/target pair with its COW.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The old image (the base before the merge).
    pub source: PathBuf,
    /// The new image (what the snapshot reads as, and the base after the merge).
    pub target: PathBuf,
    /// The COW from `ota-tools create`.
    pub cow: PathBuf,
}

/// Build `ota-tools` (release) and return its path.
pub fn build_ota_tools(repo: &Path) -> Result<PathBuf> {
    eprintln!("xtask: building ota-tools (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd::run(
        Command::new(&cargo)
            .args(["build", "--release", "--locked", "-p", "ota-tools"])
            .current_dir(repo),
    )?;
    Ok(repo.join("target/release/ota-tools"))
}

/// `ota-tools create` of `source` → `target` into `cow`, in `mode`'s merge order.
pub fn create_cow(
    tool: &Path,
    source: &Path,
    target: &Path,
    cow: &Path,
    mode: CowMergeMode,
) -> Result<()> {
    let out = cmd::output(
        Command::new(tool)
            .arg("create")
            .args(["--merge-mode", mode.arg()])
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
/// `ota-tools/bench/upgrade_tree.py`, with a marker file naming the release, in `work`.
pub fn ext4_pair(repo: &Path, work: &Path, tool: &Path, mode: CowMergeMode) -> Result<Pair> {
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
    create_cow(tool, &source, &target, &cow, mode)?;
    Ok(Pair {
        source,
        target,
        cow,
    })
}

/// `ota-tools/bench/synthetic_pair.py` of [`SYNTHETIC_MIB`] in `work`, with its COW.
pub fn synthetic_pair(repo: &Path, work: &Path, tool: &Path, mode: CowMergeMode) -> Result<Pair> {
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
    create_cow(tool, &source, &target, &cow, mode)?;
    Ok(Pair {
        source,
        target,
        cow,
    })
}

/// What a scenario run sets up before its boots: the locked build folder, the host tools,
/// its work folder, `ota-tools`, both image pairs (COWs in `mode`'s merge order) and the guest
/// programs (`vmtest`, `snapuserd`).
pub struct ScenarioSetup {
    /// `build/` of the repository (locked while this lives).
    pub build_root: PathBuf,
    /// The run's own folder below `build/`.
    pub work: PathBuf,
    /// The host `ota-tools` binary.
    pub tool: PathBuf,
    /// The ext4 pair.
    pub ext4: Pair,
    /// The synthetic pair.
    pub synthetic: Pair,
    /// The guest programs.
    pub binaries: Vec<PathBuf>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl ScenarioSetup {
    /// Lock `build/`, install the host tools, make `build/<work_name>`, build `ota-tools`,
    /// both pairs for `mode` and the guest programs.
    pub fn prepare(repo: &Path, work_name: &str, mode: CowMergeMode) -> Result<Self> {
        let build_root = repo.join("build");
        std::fs::create_dir_all(&build_root).map_err(io_err("create", &build_root))?;
        let lock = crate::lock_build_dir(&build_root)?;
        crate::deps::ensure_host_tools()?;
        crate::deps::ensure_packages(&["e2fsprogs", "python3"])?;
        let work = build_root.join(work_name);
        std::fs::create_dir_all(&work).map_err(io_err("create", &work))?;

        let tool = build_ota_tools(repo)?;
        let ext4 = ext4_pair(repo, &work, &tool, mode)?;
        let synthetic = synthetic_pair(repo, &work, &tool, mode)?;

        let binaries = crate::guest::build(
            repo,
            &build_root,
            &[
                GuestBinary::new("vm-tests", "vmtest"),
                GuestBinary::new("snapuserd", "snapuserd"),
            ],
        )?;
        Ok(Self {
            build_root,
            work,
            tool,
            ext4,
            synthetic,
            binaries,
            _lock: lock,
        })
    }

    /// The boots on kernel `series` (labels `<prefix>-<series>-...`, with our dm-user module
    /// when it builds) and the folder `run-<series>` for their disks.
    pub fn kernel(
        &self,
        repo: &Path,
        series: KernelSeries,
        prefix: &str,
    ) -> Result<(BootTemplate, PathBuf)> {
        let kernel = crate::deps::ensure_kernel(series)?;
        eprintln!("xtask: kernel {} -> {}", series.label(), kernel.abi);
        let k = series.label();
        let boots = BootTemplate {
            prefix: format!("{prefix}-{k}"),
            dm_user: crate::kmod::build_dm_user(repo, &self.build_root, &kernel).ok(),
            kernel,
            extra_stock_modules: Vec::new(),
            binaries: self.binaries.clone(),
        };
        let disks = self.work.join(format!("run-{k}"));
        std::fs::create_dir_all(&disks).map_err(io_err("create", &disks))?;
        Ok((boots, disks))
    }
}

/// A boot of the scenario guest: the stock modules plus `extra_modules`, dm-user when it was
/// built, the guest programs, 1 GiB and 2 vCPUs.
pub struct BootTemplate {
    /// Prefix of the boot labels (`build/vm-<prefix>-<label>.log`).
    pub prefix: String,
    /// Kernel to boot.
    pub kernel: Kernel,
    /// Stock modules besides [`initramfs::BASE_MODULES`].
    pub extra_stock_modules: Vec<String>,
    /// Our dm-user module, if it was built.
    pub dm_user: Option<PathBuf>,
    /// Guest programs.
    pub binaries: Vec<PathBuf>,
}

impl BootTemplate {
    /// The spec of boot `label` with `disks`, running `fragment`, limited to `secs`.
    pub fn spec(&self, label: &str, disks: Vec<PathBuf>, fragment: String, secs: u64) -> VmSpec {
        let mut modules: Vec<String> = initramfs::BASE_MODULES
            .iter()
            .map(|s| s.to_string())
            .collect();
        modules.extend(self.extra_stock_modules.iter().cloned());
        VmSpec {
            label: format!("{}-{label}", self.prefix),
            kernel: self.kernel.clone(),
            disks,
            initramfs: InitramfsSpec {
                modules,
                extra_modules: self.dm_user.iter().cloned().collect(),
                binaries: self.binaries.clone(),
                init_fragment: fragment,
            },
            timeout: Duration::from_secs(secs),
            memory_mib: 1024,
            cpus: 2,
            cmdline_extra: String::new(),
        }
    }
}

/// Boot `spec`; if the kernel died before the init script began (no `VMINFO kernel` line:
/// nothing of ours had run and no disk was touched), say so and boot once more. Under TCG
/// the guest kernel now and then trips over its own boot-time code patching (an `int3` Oops
/// in the idle loop) before user space starts.
pub fn run_boot(spec: &VmSpec, build_root: &Path) -> Result<VmRun> {
    let run = spec.run(build_root)?;
    if run.log.contains("VMINFO kernel") {
        return Ok(run);
    }
    let why = crate::report::bad_lines(&run.log)
        .into_iter()
        .next()
        .unwrap_or_else(|| format!("boot ended {:?} without output from /init", run.end));
    eprintln!(
        "xtask: boot {} ended before /init started ({why}); its disks are untouched, booting it again once",
        spec.label
    );
    spec.run(build_root)
}

/// Copy `from` to `dir/name` (a fresh disk image for one scenario) and return the copy.
pub fn fresh_copy(dir: &Path, name: &str, from: &Path) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::copy(from, &p).map_err(io_err("copy to", &p))?;
    Ok(p)
}

/// The verdicts of a boot that must end by a power cut: its `boot-completed` result becomes
/// `powered-off-mid-merge`, which passes only if qemu exited before the init script's own
/// `VMDONE`.
pub fn powered_off_verdict(run: &VmRun, results: &mut [TestResult]) {
    for r in results {
        if r.name == "boot-completed" {
            r.name = "powered-off-mid-merge".into();
            r.pass = run.end == BootEnd::Exited && !run.log.contains("VMDONE");
            r.detail = if r.pass {
                "qemu exited without VMDONE (power cut)".into()
            } else {
                format!(
                    "boot ended {:?}, VMDONE printed: {}",
                    run.end,
                    run.log.contains("VMDONE")
                )
            };
        }
    }
}

/// Append `results` of boot `boot` to `all`, each named `<boot>/<name>`.
pub fn collect(
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

/// Print one line per result, `<command> <kernel> <name> PASS|FAIL <detail>` (the lines
/// `cargo xtask test` counts), and return how many failed.
pub fn print_results(command: &str, all: &[(KernelSeries, TestResult)]) -> usize {
    println!();
    for (series, r) in all {
        println!(
            "{command} {:<5} {:<36} {} {}",
            series.label(),
            r.name,
            if r.pass { "PASS" } else { "FAIL" },
            r.detail
        );
    }
    all.iter().filter(|(_, r)| !r.pass).count()
}
