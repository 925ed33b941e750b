//! `vmtest`: the dm-user test suite and benchmark, run inside the emulator guest.
//!
//! * `vmtest list [--filter S]` — test names (also runs on the host, for the harness);
//! * `vmtest run-all [--filter S]` — run each test in its own process, print `VMTEST <name> PASS|FAIL <detail>`;
//! * `vmtest run <name>` — run one test in this process;
//! * `vmtest bench` — dm-user vs loop-over-tmpfs reads, prints `VMBENCH` lines;
//! * `vmtest snap SCENARIO ...` — snapshot scenarios with the real daemon (`snapshot_cases.rs`);
//! * `vmtest demo-usm ...` — the OTA demo in user-space-merge mode (`demo_guest.rs`);
//! * `vmtest ublk-bench` — ublk (USER_COPY, buffer path) vs loop-over-tmpfs reads;
//! * `--no-ublk` (with `list`/`run-all`) leaves out the ublk cases, for kernels without ublk.
//! * `vmtest usm SCENARIO ...` — user-space-merge scenarios (`user_snapshot_cases.rs`).

mod bench;
mod cases;
mod demo_guest;
mod harness;
mod ramd;
mod read_profile;
mod scattered_copy;
mod scenario_support;
mod smaps;
mod snapshot_cases;
mod target_cases;
mod ublk_cases;
mod ublk_init_transition;
mod ublk_snapshot;
mod user_snapshot_cases;
mod wake_bench;

use std::io::Read;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Hard limit per test process.
const TEST_LIMIT: Duration = Duration::from_secs(60);

fn selected(filter: Option<&str>, no_ublk: bool) -> Vec<&'static cases::Case> {
    cases::CASES
        .iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f)))
        .filter(|c| !(no_ublk && c.name.starts_with(cases::UBLK_PREFIX)))
        .collect()
}

fn filter_arg(args: &[String]) -> Option<&str> {
    args.windows(2)
        .find(|w| w[0] == "--filter")
        .map(|w| w[1].as_str())
}

/// Run one test in a child process with a deadline; print its VMTEST line.
fn run_isolated(name: &str) -> bool {
    let start = Instant::now();
    let child = Command::new("/proc/self/exe")
        .args(["run", name])
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            println!("VMTEST {name} FAIL cannot spawn: {e}");
            return false;
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() < TEST_LIMIT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) => break None,
            Err(_) => break None,
        }
    };
    let Some(status) = status else {
        let _ = child.kill();
        // A process stuck in the kernel cannot be reaped; do not wait for it forever.
        println!("VMTEST {name} FAIL TIMEOUT after {TEST_LIMIT:?} (hang)");
        return false;
    };
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    let last = out
        .lines()
        .rev()
        .find(|l| l.starts_with("RESULT "))
        .map(str::to_string);
    let secs = start.elapsed().as_secs_f64();
    match last {
        Some(l) if status.success() && l.starts_with("RESULT PASS") => {
            println!(
                "VMTEST {name} PASS {} ({secs:.1}s)",
                l.trim_start_matches("RESULT PASS").trim()
            );
            true
        }
        Some(l) => {
            println!(
                "VMTEST {name} FAIL {} ({secs:.1}s)",
                l.trim_start_matches("RESULT FAIL").trim()
            );
            false
        }
        None => {
            println!("VMTEST {name} FAIL test process died ({status}) without a result");
            false
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sub = args.first().map(String::as_str).unwrap_or("");
    match sub {
        "list" => {
            for c in selected(filter_arg(&args), args.iter().any(|a| a == "--no-ublk")) {
                println!("{}", c.name);
            }
            ExitCode::SUCCESS
        }
        "run-all" => {
            let mut ok = true;
            for c in selected(filter_arg(&args), args.iter().any(|a| a == "--no-ublk")) {
                ok &= run_isolated(c.name);
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        "run" => {
            let name = args.get(1).map(String::as_str).unwrap_or("");
            let Some(case) = cases::CASES.iter().find(|c| c.name == name) else {
                println!("RESULT FAIL no such test {name:?}");
                return ExitCode::FAILURE;
            };
            match (case.run)() {
                Ok(detail) => {
                    println!("RESULT PASS {detail}");
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    println!("RESULT FAIL {why}");
                    ExitCode::FAILURE
                }
            }
        }
        "bench" => {
            let threads = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(1);
            match bench::run(threads) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    println!("VMBENCH error {e}");
                    ExitCode::FAILURE
                }
            }
        }
        "wake-bench" => match wake_bench::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("VMBENCH wake error {e}");
                ExitCode::FAILURE
            }
        },
        "wake-trace" => match wake_bench::trace() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("VMBENCH wake-trace error {e}");
                ExitCode::FAILURE
            }
        },
        "snap" => snapshot_cases::main(&args[1..]),
        "demo-usm" => demo_guest::main(&args[1..]),
        "splice-probe" => match read_profile::splice_probe(
            "file",
            std::path::Path::new(args.get(1).map(String::as_str).unwrap_or("")),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("VMPROFILE error {e}");
                ExitCode::FAILURE
            }
        },
        "read-profile" => match read_profile::main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("VMPROFILE error {e}");
                ExitCode::FAILURE
            }
        },
        "ublk-bench" => match ublk_cases::bench().and_then(|()| ublk_snapshot::bench_snapshot()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("VMBENCH ublk error {e}");
                ExitCode::FAILURE
            }
        },
        "helper-ublk" => report_helper(ublk_cases::helper(&args[1..])),
        "helper-ublk-snapshot" => report_helper(ublk_snapshot::helper(&args[1..])),
        "usm" => user_snapshot_cases::main(&args[1..]),
        "helper-hang" => report_helper(cases::helper_hang(
            args.get(1).map(String::as_str).unwrap_or(""),
        )),
        "helper-ram" => {
            let size = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16 << 20);
            let threads = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
            report_helper(cases::helper_ram(
                args.get(1).map(String::as_str).unwrap_or(""),
                size,
                threads,
            ))
        }
        _ => {
            eprintln!("usage: vmtest list|run-all|run NAME|bench [THREADS] [--filter S]");
            ExitCode::FAILURE
        }
    }
}

fn report_helper(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmtest helper: {e}");
            ExitCode::FAILURE
        }
    }
}
