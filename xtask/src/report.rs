//! Turning a guest log into per-test results.

use std::collections::BTreeMap;

use crate::vm::{BootEnd, VmRun};

/// Kernel log markers that fail a run wherever they appear.
pub const BAD_MARKERS: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "KASAN",
    "UBSAN",
    "general protection",
    "Call Trace",
    "Kernel panic",
    "blocked for more than",
];

/// Verdict for one test on one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// Test name.
    pub name: String,
    /// Passed?
    pub pass: bool,
    /// Detail text.
    pub detail: String,
}

/// Parse `VMTEST <name> <PASS|FAIL> <detail>` lines (last one per name wins).
pub fn parse_results(log: &str) -> BTreeMap<String, TestResult> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let line = line.trim_end_matches('\r');
        let Some(rest) = line.strip_prefix("VMTEST ") else {
            continue;
        };
        let mut parts = rest.splitn(3, ' ');
        let (Some(name), Some(verdict)) = (parts.next(), parts.next()) else {
            continue;
        };
        let detail = parts.next().unwrap_or("").to_string();
        let pass = match verdict {
            "PASS" => true,
            "FAIL" => false,
            _ => continue,
        };
        out.insert(
            name.to_string(),
            TestResult {
                name: name.to_string(),
                pass,
                detail,
            },
        );
    }
    out
}

/// Kernel log lines containing a [`BAD_MARKERS`] entry (our own result lines excluded).
pub fn bad_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| !l.starts_with("VMTEST ") && !l.starts_with("VMBENCH "))
        .filter(|l| BAD_MARKERS.iter().any(|m| l.contains(m)))
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// Combine a run with the expected test names into the final verdict list.
pub fn evaluate(run: &VmRun, expected: &[String]) -> Vec<TestResult> {
    let mut found = parse_results(&run.log);
    let mut out = Vec::new();
    for name in expected {
        match found.remove(name) {
            Some(r) => out.push(r),
            None => out.push(TestResult {
                name: name.clone(),
                pass: false,
                detail: match run.end {
                    BootEnd::TimedOut => "no result: TIMEOUT".into(),
                    BootEnd::Exited => "no result (guest ended without reporting it)".into(),
                },
            }),
        }
    }
    // Results the guest reported that the host did not expect (insmod lines etc.) still count.
    out.extend(found.into_values());
    let bad = bad_lines(&run.log);
    out.push(TestResult {
        name: "kernel-log-clean".into(),
        pass: bad.is_empty(),
        detail: bad
            .first()
            .cloned()
            .unwrap_or_else(|| "no WARNING/BUG/Oops/KASAN/Call Trace".into()),
    });
    out.push(TestResult {
        name: "boot-completed".into(),
        pass: run.end == BootEnd::Exited && run.log.contains("VMDONE"),
        detail: match run.end {
            BootEnd::TimedOut => format!("TIMEOUT after {:.0?}", run.elapsed),
            BootEnd::Exited if run.log.contains("VMDONE") => format!("{:.1?}", run.elapsed),
            BootEnd::Exited => "qemu exited before the init script finished".into(),
        },
    });
    out
}

/// Passed, failed and skipped counts over the stages of `cargo xtask test`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Tests or checks that passed.
    pub passed: u64,
    /// Tests or checks that failed, plus one per stage that failed without naming a failure.
    pub failed: u64,
    /// Tests cargo reported as ignored.
    pub skipped: u64,
}

impl Tally {
    /// Add `other`'s counts.
    pub fn add(&mut self, other: Tally) {
        self.passed = self.passed.saturating_add(other.passed);
        self.failed = self.failed.saturating_add(other.failed);
        self.skipped = self.skipped.saturating_add(other.skipped);
    }

    /// The counts of a stage that exited with `exit_ok`: a stage that failed (did not run,
    /// did not build, crashed) without reporting a failing test counts as one failure.
    pub fn for_stage(mut self, exit_ok: bool) -> Tally {
        if !exit_ok && self.failed == 0 {
            self.failed = 1;
        }
        self
    }

    /// The closing line CI reads: `N passed, N failed`, plus `, N skipped` when any were.
    pub fn summary_line(&self) -> String {
        let mut line = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 {
            line.push_str(&format!(", {} skipped", self.skipped));
        }
        line
    }
}

/// Sum of cargo's per-binary `test result: ok. 12 passed; 0 failed; 3 ignored; ...` lines
/// (unit, integration and doc tests alike); ignored tests count as skipped.
pub fn cargo_test_tally(output: &str) -> Tally {
    let mut tally = Tally::default();
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        let counts = rest.split_once(". ").map_or(rest, |(_, c)| c);
        for part in counts.split(';') {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => tally.passed = tally.passed.saturating_add(n),
                "failed" => tally.failed = tally.failed.saturating_add(n),
                "ignored" => tally.skipped = tally.skipped.saturating_add(n),
                _ => {}
            }
        }
    }
    tally
}

/// One count per check of `kernel/scripts/check-style.sh` (`check-style: ok: ...` or
/// `check-style: FAIL: ...`).
pub fn kernel_check_tally(output: &str) -> Tally {
    let mut tally = Tally::default();
    for line in output.lines() {
        match line.trim().strip_prefix("check-style: ") {
            Some(r) if r.starts_with("ok: ") => tally.passed += 1,
            Some(r) if r.starts_with("FAIL: ") => tally.failed += 1,
            _ => {}
        }
    }
    tally
}

/// One count per emulator result line `<command> <kernel> <name> PASS|FAIL ...` that
/// `cargo xtask vm-test` (command `vm-test`) or `vm-snapshot` prints at its end.
pub fn vm_results_tally(output: &str, command: &str) -> Tally {
    let mut tally = Tally::default();
    for line in output.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some(command) {
            continue;
        }
        match (words.next(), words.next(), words.next()) {
            (Some(_kernel), Some(_name), Some("PASS")) => tally.passed += 1,
            (Some(_kernel), Some(_name), Some("FAIL")) => tally.failed += 1,
            _ => {}
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cargo_results_are_summed_over_every_binary() {
        let out = "\
running 3 tests
test a ... ok
test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/cli.rs (target/debug/deps/cli-c4017f291f38d54a)
test result: FAILED. 11 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 15.35s
   Doc-tests cow_format
test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s
test summary_line_looks_like_a_result ... ok
";
        assert_eq!(
            cargo_test_tally(out),
            Tally {
                passed: 14,
                failed: 1,
                skipped: 3
            }
        );
        assert_eq!(
            cargo_test_tally("error[E0432]: unresolved import\n"),
            Tally::default()
        );
    }

    #[test]
    fn kernel_checks_count_one_each() {
        let out = "\
check-style: checkpatch --strict on 3 files
check-style: ok: checkpatch clean
check-style: ok: kernel-doc clean
check-style: building against 6.1.0-40-cloud-amd64 (W=1 C=1)
check-style: ok: 6.1.0-40-cloud-amd64 builds clean with W=1 C=1
check-style: FAIL: diagnostics building against 6.12.48+deb12-cloud-amd64
check-style: FAILED
";
        assert_eq!(
            kernel_check_tally(out),
            Tally {
                passed: 3,
                failed: 1,
                skipped: 0
            }
        );
    }

    #[test]
    fn emulator_result_lines_count_and_timing_lines_do_not() {
        let out = "\
VMTEST rw-basic PASS 64 extents (0.3s)
vm-test 6.12  dm-user-build                PASS W=1 clean
vm-test 6.12  rw-basic                     PASS 64 extents (0.3s)
vm-test 6.12  kernel-log-clean             FAIL WARNING: at foo
vm-test 6.12  boot wall time 41.2s (log: build/vm-6.12.log)
vm-snapshot 6.1   snap-read-ext4           PASS ok
";
        assert_eq!(
            vm_results_tally(out, "vm-test"),
            Tally {
                passed: 2,
                failed: 1,
                skipped: 0
            }
        );
        assert_eq!(vm_results_tally(out, "vm-snapshot").passed, 1);
    }

    #[test]
    fn a_stage_that_fails_without_a_failing_test_counts_once() {
        let built_nothing = Tally::default().for_stage(false);
        assert_eq!(built_nothing.failed, 1);
        let named = Tally {
            passed: 2,
            failed: 3,
            skipped: 0,
        };
        assert_eq!(named.for_stage(false), named);
        assert_eq!(Tally::default().for_stage(true), Tally::default());
    }

    #[test]
    fn summary_line_has_the_shape_ci_reads() {
        let mut t = Tally::default();
        t.add(Tally {
            passed: 1200,
            failed: 0,
            skipped: 0,
        });
        assert_eq!(t.summary_line(), "1200 passed, 0 failed");
        t.add(Tally {
            passed: 56,
            failed: 2,
            skipped: 4,
        });
        assert_eq!(t.summary_line(), "1256 passed, 2 failed, 4 skipped");
    }

    fn run(log: &str, end: BootEnd) -> VmRun {
        VmRun {
            log_path: "x".into(),
            log: log.into(),
            end,
            elapsed: Duration::from_secs(1),
        }
    }

    #[test]
    fn results_are_parsed_and_missing_ones_fail() {
        let r = run(
            "noise\nVMTEST a PASS ok\r\nVMTEST b FAIL boom here\nVMDONE\n",
            BootEnd::Exited,
        );
        let v = evaluate(&r, &["a".into(), "b".into(), "c".into()]);
        assert!(v[0].pass);
        assert!(!v[1].pass && v[1].detail == "boom here");
        assert!(!v[2].pass);
        assert!(v.iter().find(|t| t.name == "boot-completed").unwrap().pass);
    }

    #[test]
    fn kernel_warnings_fail_the_run() {
        let r = run(
            "[ 1.0] WARNING: CPU: 0 PID: 1 at foo\nVMTEST a PASS\nVMDONE\n",
            BootEnd::Exited,
        );
        let v = evaluate(&r, &["a".into()]);
        assert!(
            !v.iter()
                .find(|t| t.name == "kernel-log-clean")
                .unwrap()
                .pass
        );
    }

    #[test]
    fn timeout_is_reported() {
        let r = run("VMTEST a PASS\n", BootEnd::TimedOut);
        let v = evaluate(&r, &["a".into(), "b".into()]);
        assert!(v[1].detail.contains("TIMEOUT"));
        assert!(!v.iter().find(|t| t.name == "boot-completed").unwrap().pass);
    }
}
