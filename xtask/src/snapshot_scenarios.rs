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

use crate::deps::KernelSeries;
use crate::error::{Result, XtaskError};
use crate::flags::{kernels_or_all, Flags};
use crate::report::{self, TestResult};
use crate::scenario_pairs::{
    self, collect, fresh_copy, powered_off_verdict, CowMergeMode, ScenarioSetup, MARKER,
};

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
        let mut flags = Flags::new(args, "");
        while let Some(a) = flags.next_flag() {
            match a {
                "--kernel" => o.kernels.push(flags.kernel()?),
                "--timeout" => o.timeout = Some(flags.timeout()?),
                other => {
                    return Err(XtaskError::Usage(format!(
                        "unknown argument {other:?}; usage: cargo xtask vm-snapshot [--kernel 6.1|6.12] [--timeout SECS]"
                    )))
                }
            }
        }
        o.kernels = kernels_or_all(std::mem::take(&mut o.kernels));
        Ok(o)
    }
}

/// Run the scenarios on every selected kernel; fails if any result fails.
pub fn run(repo: &Path, opts: &SnapshotOptions) -> Result<()> {
    let setup = ScenarioSetup::prepare(repo, "vmsnap", CowMergeMode::Legacy)?;
    let (build_root, ext4, synthetic) = (&setup.build_root, &setup.ext4, &setup.synthetic);

    let mut all: Vec<(KernelSeries, TestResult)> = Vec::new();
    for &series in &opts.kernels {
        let (boots, disks) = setup.kernel(repo, series, "snap")?;
        let fresh = |name: &str, from: &Path| fresh_copy(&disks, name, from);
        let limit = opts.timeout.unwrap_or(1500);
        let spec = |label: &str, disks: Vec<PathBuf>, fragment: String, secs: u64| {
            boots.spec(label, disks, fragment, secs)
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
        let run = spec("a", disks_a, fragment_a, limit).run(build_root)?;
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
            .run(build_root)?;
            let mut r1 = report::evaluate(&run1, &[format!("snap-poweroff-{tag}")]);
            // This boot must end by the power-off, before the init script's own VMDONE.
            powered_off_verdict(&run1, &mut r1);
            let powered_off = r1.iter().all(|r| r.pass || r.name == "kernel-log-clean");
            collect(&mut all, series, &format!("p{pct}-1"), r1);
            if powered_off {
                let run2 = spec(
                    &format!("p{pct}-2"),
                    disks_p,
                    format!("/bin/vmtest snap resume-merge {args}\n"),
                    limit,
                )
                .run(build_root)?;
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
    let failed = scenario_pairs::print_results("vm-snapshot", &all);
    if failed > 0 {
        return Err(XtaskError::TestsFailed(failed));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::words as args;

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
