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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
