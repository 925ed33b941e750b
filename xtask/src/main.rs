//! `cargo xtask`: project automation.
//!
//! * `cargo xtask vm-test [--kernel 6.1|6.12] [--filter NAME] [--keep] [--bench] [--timeout SECS]`
//!   builds dm-user for each kernel, the guest programs, an initramfs, boots qemu (TCG) and
//!   reports one line per test and kernel. `--disk` attaches raw images as virtio disks.
//! * `cargo xtask vm-bench [--kernel ...] [--smp N] [--ublk]` runs only the dm-user vs loop
//!   benchmark (`--smp 1` keeps TCG's cross-vCPU wake-up latency out of the figures);
//!   `--ublk` adds the ublk (USER_COPY, buffer path) vs loop benchmark in the same boot, on
//!   kernels with ublk. `--wake` runs the guest's wake-up latency benchmark (`vmtest
//!   wake-bench`; alone, instead of the dm-user one). `--append ARGS` adds words to the guest
//!   kernel's command line (to locate costs, e.g. `idle=poll`; not for published figures). The ublk cases (`ublk-*`) run only on kernels whose cloud build has
//!   `ublk_drv` (6.12); on 6.1 the guest log says why they are not run.
//! * `cargo xtask vm-snapshot [--kernel 6.1|6.12] [--timeout SECS]` runs the snapshot scenarios
//!   with the real `snapuserd` daemon (see `snapshot_scenarios.rs`).
//! * `cargo xtask vm-usm [--kernel 6.1|6.12] [--filter NAME] [--timeout SECS]` runs the
//!   user-space-merge scenarios (see `user_snapshot_scenarios.rs`).
//! * `cargo xtask kernel-check` runs `kernel/scripts/check-style.sh`.
//! * `cargo xtask demo [--legacy] [--rounds N] [--transport dm-user|ublk] [--source SRC.img
//!   --target TGT.img]` runs the OTA demo (see `demo.rs`), user-space-merge mode unless
//!   `--legacy`, over dm-user unless `--transport ublk`.
//! * `cargo xtask test [--only STAGE]...` runs everything: the workspace's tests, the kernel
//!   style checks, the dm-user emulator tests and the snapuserd snapshot scenarios on both
//!   kernels, each stage even after a failed one, and ends with one line `N passed, N failed`
//!   over all of them. It is the test command README.md names. `--only` (cargo-test,
//!   kernel-check, vm-test, vm-snapshot, vm-usm) runs a subset while iterating.

mod cmd;
mod demo;
mod demo_figures;
mod demo_svg;
mod deps;
mod error;
mod ext4_images;
mod flags;
mod guest;
mod initramfs;
mod kmod;
mod report;
mod scenario_pairs;
mod snapshot_scenarios;
mod user_snapshot_scenarios;
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use deps::KernelSeries;
use error::{Result, XtaskError};
use flags::{kernels_or_all, Flags};
use guest::GuestBinary;
use initramfs::InitramfsSpec;
use report::TestResult;
use vm::VmSpec;

const USAGE: &str = "cargo xtask <demo|test|vm-test|vm-bench|vm-snapshot|vm-usm|kernel-check> [--only STAGE] [--kernel 6.1|6.12] [--filter NAME] [--keep] [--bench] [--ublk] [--timeout SECS] [--disk RAW.img]... [--smp N] [--wake] [--append KERNEL-ARGS]";

/// Parsed command-line options.
#[derive(Debug, Default)]
struct Options {
    kernels: Vec<KernelSeries>,
    filter: Option<String>,
    keep: bool,
    bench: bool,
    ublk_bench: bool,
    timeout: Option<u64>,
    disks: Vec<PathBuf>,
    cpus: Option<u32>,
    wake_bench: bool,
    append: String,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options::default();
    let mut flags = Flags::new(args, USAGE);
    while let Some(a) = flags.next_flag() {
        match a {
            "--kernel" => o.kernels.push(flags.kernel()?),
            "--filter" => o.filter = Some(flags.value("--filter")?),
            "--timeout" => o.timeout = Some(flags.timeout()?),
            "--disk" => o.disks.push(PathBuf::from(flags.value("--disk")?)),
            "--smp" => {
                let v = flags.value("--smp")?;
                o.cpus = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=8).contains(n))
                        .ok_or_else(|| XtaskError::Usage(format!("bad --smp {v} (1..=8)")))?,
                );
            }
            "--keep" => o.keep = true,
            "--bench" => o.bench = true,
            "--ublk" => o.ublk_bench = true,
            "--wake" => o.wake_bench = true,
            "--append" => {
                o.append.push(' ');
                o.append.push_str(&flags.value("--append")?);
            }
            other => {
                return Err(XtaskError::Usage(format!(
                    "unknown argument {other:?}; {USAGE}"
                )))
            }
        }
    }
    o.kernels = kernels_or_all(std::mem::take(&mut o.kernels));
    Ok(o)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The guest programs of the dm-user test suite.
fn guest_binaries() -> Vec<GuestBinary> {
    vec![
        GuestBinary::new("vm-tests", "vmtest"),
        // The ublk-daemon case drives the real daemon.
        GuestBinary::new("snapuserd", "snapuserd"),
    ]
}

/// Ask the (static, host-runnable) test binary which tests match `filter`.
fn expected_tests(vmtest: &Path, filter: Option<&str>) -> Result<Vec<String>> {
    let mut c = Command::new(vmtest);
    c.arg("list");
    if let Some(f) = filter {
        c.args(["--filter", f]);
    }
    Ok(cmd::output(&mut c)?
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect())
}

fn test_fragment(opts: &Options, run_tests: bool, series: KernelSeries) -> String {
    let mut s = String::new();
    if !series.has_ublk() {
        s.push_str(&format!(
            "echo 'VMINFO kernel {} has no ublk (Debian builds it without CONFIG_BLK_DEV_UBLK): the ublk cases are not run'\n",
            series.label()
        ));
    }
    if run_tests {
        s.push_str("/bin/vmtest run-all");
        if let Some(f) = &opts.filter {
            s.push_str(&format!(" --filter '{}'", f.replace('\'', "")));
        }
        if !series.has_ublk() {
            s.push_str(" --no-ublk");
        }
        s.push('\n');
    }
    if opts.bench {
        s.push_str("/bin/vmtest bench\n");
    }
    if opts.wake_bench {
        s.push_str("/bin/vmtest wake-bench\n/bin/vmtest wake-trace\n");
    }
    if opts.ublk_bench && series.has_ublk() {
        s.push_str("/bin/vmtest ublk-bench\n");
    }
    s
}

/// The tests expected from a kernel: without ublk, the ublk cases are not run.
fn expected_for(expected: &[String], series: KernelSeries) -> Vec<String> {
    expected
        .iter()
        .filter(|n| series.has_ublk() || !n.starts_with(UBLK_CASE_PREFIX))
        .cloned()
        .collect()
}

/// Prefix of the guest's ublk cases (`tests/vm/src/cases.rs`).
const UBLK_CASE_PREFIX: &str = "ublk-";

/// Hold an exclusive lock on `build/vm-test.lock` so that concurrent runs in the
/// same tree (colleagues sharing a worktree) queue up instead of overwriting each
/// other's module build, initramfs and logs.
fn lock_build_dir(build_root: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let path = build_root.join("vm-test.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(error::io_err("open", &path))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, _)) => {
            eprintln!(
                "xtask: another vm-test run holds {}; waiting for it",
                path.display()
            );
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| XtaskError::Io {
                op: "lock",
                path,
                source: e.into(),
            })
        }
    }
}

fn vm_test(opts: &Options, run_tests: bool) -> Result<()> {
    let repo = repo_root();
    let build_root = repo.join("build");
    std::fs::create_dir_all(&build_root).map_err(error::io_err("create", &build_root))?;
    let _lock = lock_build_dir(&build_root)?;
    deps::ensure_host_tools()?;
    let bins = guest::build(&repo, &build_root, &guest_binaries())?;
    let vmtest = bins
        .first()
        .cloned()
        .ok_or_else(|| XtaskError::Usage("no guest binaries".into()))?;
    let expected = if run_tests {
        expected_tests(&vmtest, opts.filter.as_deref())?
    } else {
        Vec::new()
    };
    if run_tests && expected.is_empty() {
        return Err(XtaskError::Usage(format!(
            "no test matches {:?}",
            opts.filter
        )));
    }
    let mut all: Vec<(KernelSeries, TestResult)> = Vec::new();
    let mut timings = Vec::new();
    for &series in &opts.kernels {
        let kernel = deps::ensure_kernel(series)?;
        eprintln!("xtask: kernel {} -> {}", series.label(), kernel.abi);
        let ko = match kmod::build_dm_user(&repo, &build_root, &kernel) {
            Ok(ko) => {
                all.push((
                    series,
                    TestResult {
                        name: "dm-user-build".into(),
                        pass: true,
                        detail: "W=1 clean".into(),
                    },
                ));
                Some(ko)
            }
            Err(e) => {
                eprintln!("xtask: dm-user build failed for {}: {e}", kernel.abi);
                all.push((
                    series,
                    TestResult {
                        name: "dm-user-build".into(),
                        pass: false,
                        detail: e.to_string().lines().next().unwrap_or("").into(),
                    },
                ));
                None
            }
        };
        // Boot and run the tests even without a module: they then fail with a clear
        // reason (unknown target type "user"), and the stock-target tests still run.
        let mut fragment = String::new();
        if ko.is_none() {
            fragment.push_str("echo 'VMINFO dm-user.ko was not built: dm-user tests will fail'\n");
        }
        fragment.push_str(&test_fragment(opts, run_tests, series));
        let spec = VmSpec {
            label: series.label().into(),
            kernel: kernel.clone(),
            disks: opts.disks.clone(),
            initramfs: InitramfsSpec {
                modules: initramfs::BASE_MODULES
                    .iter()
                    .map(|s| s.to_string())
                    .chain(series.has_ublk().then(|| "ublk_drv".to_string()))
                    .collect(),
                extra_modules: ko.into_iter().collect(),
                binaries: bins.clone(),
                init_fragment: fragment,
            },
            timeout: Duration::from_secs(opts.timeout.unwrap_or(
                if opts.bench || opts.ublk_bench {
                    480
                } else {
                    360
                },
            )),
            memory_mib: 1024,
            cpus: opts.cpus.unwrap_or(2),
            cmdline_extra: opts.append.trim().to_string(),
        };
        let run = spec.run(&build_root)?;
        timings.push((series, run.elapsed, run.log_path.clone()));
        for r in report::evaluate(&run, &expected_for(&expected, series)) {
            all.push((series, r));
        }
        if !opts.keep {
            let staging = build_root
                .join(format!("initramfs-{}", series.label()))
                .join("root");
            let _ = std::fs::remove_dir_all(staging);
        }
    }
    println!();
    for (series, r) in &all {
        println!(
            "vm-test {:<5} {:<28} {} {}",
            series.label(),
            r.name,
            if r.pass { "PASS" } else { "FAIL" },
            r.detail
        );
    }
    for (series, t, log) in &timings {
        println!(
            "vm-test {:<5} boot wall time {:.1?} (log: {})",
            series.label(),
            t,
            log.display()
        );
    }
    let failed = all.iter().filter(|(_, r)| !r.pass).count();
    if failed > 0 {
        return Err(XtaskError::TestsFailed(failed));
    }
    Ok(())
}

fn kernel_check() -> Result<()> {
    let repo = repo_root();
    let script = repo.join("kernel/scripts/check-style.sh");
    if !script.exists() {
        return Err(XtaskError::Resolve {
            what: "kernel style check".into(),
            why: format!(
                "{} does not exist yet (owned by the kernel engineer)",
                script.display()
            ),
        });
    }
    cmd::run(Command::new("bash").arg(&script).current_dir(&repo))
}

/// The stages of `cargo xtask test`, in order of cost.
const STAGES: [&str; 5] = [
    "cargo-test",
    "kernel-check",
    "vm-test",
    "vm-snapshot",
    "vm-usm",
];

/// Run `cmd`, passing its stdout and stderr through line by line, and return whether it
/// exited successfully with everything it printed (stdout, then stderr). A command that
/// cannot be started is reported and counts as a failed run.
fn run_teed(cmd: &mut Command) -> (bool, String) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    eprintln!("xtask: $ {}", cmd::describe(cmd));
    let mut child = match cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xtask: cannot start {}: {e}", cmd::describe(cmd));
            return (false, String::new());
        }
    };
    let stderr = child.stderr.take().map(|err| {
        std::thread::spawn(move || {
            let mut seen = String::new();
            for line in BufReader::new(err).lines().map_while(std::io::Result::ok) {
                eprintln!("{line}");
                seen.push_str(&line);
                seen.push('\n');
            }
            seen
        })
    });
    let mut seen = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(std::io::Result::ok) {
            println!("{line}");
            seen.push_str(&line);
            seen.push('\n');
        }
    }
    if let Some(t) = stderr {
        seen.push_str(&t.join().unwrap_or_default());
    }
    let ok = child.wait().is_ok_and(|s| s.success());
    (ok, seen)
}

/// Split `cargo xtask test`'s arguments into the stages to run (`--only STAGE`, repeatable;
/// default: all) and the options for the emulator stages.
fn split_stage_args(args: &[String]) -> Result<(Vec<&'static str>, Vec<String>)> {
    let mut only = Vec::new();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--only" {
            let v = it.next().ok_or_else(|| {
                XtaskError::Usage(format!("--only needs one of {}", STAGES.join(", ")))
            })?;
            let stage = STAGES.iter().find(|s| **s == v.as_str()).ok_or_else(|| {
                XtaskError::Usage(format!(
                    "unknown stage {v:?}; stages: {}",
                    STAGES.join(", ")
                ))
            })?;
            only.push(*stage);
        } else {
            rest.push(a.clone());
        }
    }
    if only.is_empty() {
        only = STAGES.to_vec();
    }
    Ok((only, rest))
}

/// The arguments `vm-snapshot` and `vm-usm` accept out of `cargo xtask test`'s options.
fn snapshot_args(opts: &Options) -> Vec<String> {
    let mut args = Vec::new();
    for k in &opts.kernels {
        args.push("--kernel".to_string());
        args.push(k.label().to_string());
    }
    if let Some(t) = opts.timeout {
        args.push("--timeout".to_string());
        args.push(t.to_string());
    }
    args
}

/// Every test suite of the project, in order of cost. Every stage runs, even after a failed
/// one; the last line is the summary over all of them (`N passed, N failed`, see
/// [`report::Tally`]), and any failure makes the command fail.
fn test_all(args: &[String]) -> Result<()> {
    let (stages, rest) = split_stage_args(args)?;
    let opts = parse_options(&rest)?;
    let repo = repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let xtask = std::env::current_exe().map_err(|source| XtaskError::Io {
        op: "locate",
        path: PathBuf::from("the xtask binary"),
        source,
    })?;
    let mut total = report::Tally::default();
    for (i, stage) in stages.iter().enumerate() {
        let n = format!("[{}/{}]", i + 1, stages.len());
        let tally = match *stage {
            "cargo-test" => {
                eprintln!("xtask: {n} cargo test --workspace");
                let (ok, out) = run_teed(
                    Command::new(&cargo)
                        .args(["test", "--workspace", "--locked"])
                        .current_dir(&repo),
                );
                report::cargo_test_tally(&out).for_stage(ok)
            }
            "kernel-check" => {
                eprintln!("xtask: {n} kernel style (checkpatch, sparse, W=1 on both kernels)");
                let (ok, out) = run_teed(Command::new(&xtask).arg("kernel-check"));
                report::kernel_check_tally(&out).for_stage(ok)
            }
            "vm-test" => {
                eprintln!("xtask: {n} emulator tests: dm-user");
                let (ok, out) = run_teed(Command::new(&xtask).arg("vm-test").args(&rest));
                report::vm_results_tally(&out, "vm-test").for_stage(ok)
            }
            "vm-usm" => {
                eprintln!(
                    "xtask: {n} emulator tests: snapuserd in user-space-merge mode (read, merge, kill chain, power-off chain, handoff, pause, merge-thread limit)"
                );
                let (ok, out) = run_teed(
                    Command::new(&xtask)
                        .arg("vm-usm")
                        .args(snapshot_args(&opts)),
                );
                report::vm_results_tally(&out, "vm-usm").for_stage(ok)
            }
            _ => {
                eprintln!(
                    "xtask: {n} emulator tests: snapuserd under dm-snapshot (read, merge, kill, live handoffs, power-off)"
                );
                let (ok, out) = run_teed(
                    Command::new(&xtask)
                        .arg("vm-snapshot")
                        .args(snapshot_args(&opts)),
                );
                report::vm_results_tally(&out, "vm-snapshot").for_stage(ok)
            }
        };
        eprintln!("xtask: {stage}: {}", tally.summary_line());
        total.add(tally);
    }
    println!("{}", total.summary_line());
    if total.failed > 0 {
        return Err(XtaskError::TestsFailed(
            usize::try_from(total.failed).unwrap_or(usize::MAX),
        ));
    }
    Ok(())
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((sub, rest)) = args.split_first() else {
        return Err(XtaskError::Usage(USAGE.into()));
    };
    match sub.as_str() {
        "vm-test" => vm_test(&parse_options(rest)?, true),
        "vm-bench" => {
            let mut o = parse_options(rest)?;
            // `--wake` alone runs only the wake-up benchmark; with `--bench` both.
            o.bench |= !o.wake_bench;
            vm_test(&o, false)
        }
        "kernel-check" => kernel_check(),
        "test" => test_all(rest),
        "vm-snapshot" => snapshot_scenarios::run(
            &repo_root(),
            &snapshot_scenarios::SnapshotOptions::parse(rest)?,
        ),
        "vm-usm" => user_snapshot_scenarios::run(
            &repo_root(),
            &user_snapshot_scenarios::UsmOptions::parse(rest)?,
        ),
        "demo" => demo::run(&repo_root(), &demo::DemoOptions::parse(rest)?),
        _ => Err(XtaskError::Usage(USAGE.into())),
    }
}

/// `error` and each of its causes, separated by `: ` (every message names only its own
/// context, so each cause is printed once).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
