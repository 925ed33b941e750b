//! `cargo xtask vm-usm [--kernel 6.1|6.12] [--filter NAME] [--timeout SECS]`: the emulator
//! scenarios of the user-space-merge mode (Android 13+): `snapuserd -user_snapshot` serves the
//! whole partition through the dm-user table `0 S user 0 S <misc>`, with no dm-snapshot, and
//! merges on `initiate_merge`.
//!
//! On the host: the ext4 and synthetic pairs of [`scenario_pairs`] with COWs in the user merge
//! order (`ota-tools create --merge-mode user`), a fresh copy of base and COW per scenario,
//! each a virtio disk; the source of every partition is its base device, as on a Virtual A/B
//! device. The kill and power-off points are placed from the COW's merge order
//! (`ota-tools inspect`): most in the ordered COPY/XOR phase, where `merge_percent` moves once
//! per read-ahead window, so a point is reached right after a window's commit, while the next
//! window's read-ahead commit runs; the rest in the REPLACE/ZERO phase. Per kernel:
//!
//! 1. boot `a`: `read-merge` on both pairs (writes refused, flush, whole device, ext4 mount,
//!    random 4 KiB reads, a reader looping over the device during the merge, base == target),
//!    the `kill -9` chain, the first- to second-stage handoff, pause/resume, and two
//!    partitions with the merge-thread limit at 1;
//! 2. boots `p1` .. `p6`: one power-off chain: each boot reads the device (== target) before
//!    the merge resumes, then cuts the power at the next point; the last boot merges to the
//!    end and checks base == target.
//! 3. boots `u1` .. `u3` (kernels with ublk only; on the others one line says why not): the
//!    same chain with the partition served over ublk (`snapuserd -user_snapshot -ublk`, a new
//!    `/dev/ublkb<N>` each boot), cut once in the ordered phase and once in the REPLACE/ZERO
//!    phase.
//!
//! The guest half is `tests/vm/src/user_snapshot_cases.rs` (`vmtest usm ...`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd;
use crate::deps::KernelSeries;
use crate::error::{Result, XtaskError};
use crate::flags::{kernels_or_all, Flags};
use crate::report::{self, TestResult};
use crate::scenario_pairs::{
    self, collect, fresh_copy, powered_off_verdict, run_boot, BootTemplate, CowMergeMode, Pair,
    ScenarioSetup, MARKER,
};

/// The scenario groups `--filter` selects from (by substring).
pub const GROUPS: [&str; 7] = [
    "read-merge",
    "kill-chain",
    "handoff",
    "pause",
    "two-merge",
    "power-cycle",
    "ublk-power-cycle",
];

/// A point inside a merge phase: (fraction of the phase, milliseconds to wait once
/// `merge_percent` reached it).
type PhasePoint = (f64, u64);

/// Kill points, four in the ordered phase and two in the REPLACE/ZERO phase. `merge_percent`
/// moves only at commits (once per read-ahead window, then once per REPLACE/ZERO batch), so
/// a point is reached right after the commit that crosses it; the delay on the second moves
/// that cut further into the step after the commit.
const KILL_POINTS: ([PhasePoint; 4], [PhasePoint; 2]) = (
    [(0.15, 0), (0.4, 60), (0.6, 0), (0.9, 0)],
    [(0.05, 0), (0.3, 0)],
);
/// Power-off points: four in the ordered phase (the last one reached at its end, i.e. the
/// start of the REPLACE/ZERO phase) and one early in the REPLACE/ZERO phase. A power cut
/// takes a moment (`poweroff -f`), so no point sits near the end of the merge, which would
/// finish before the cut.
const POWEROFF_POINTS: ([PhasePoint; 4], [PhasePoint; 1]) =
    ([(0.2, 0), (0.45, 100), (0.7, 0), (0.95, 0)], [(0.05, 10)]);
/// Power-off points of the chain over ublk: one inside the ordered phase (after a window's
/// commit, 100 ms into the next window), one early in the REPLACE/ZERO phase; three boots.
const UBLK_POWEROFF_POINTS: ([PhasePoint; 1], [PhasePoint; 1]) = ([(0.45, 100)], [(0.05, 10)]);

/// One power-off chain: its scenario tag (`synp`, `synu`), boot-label letter and transport.
#[derive(Debug, Clone, Copy)]
struct Chain {
    tag: &'static str,
    letter: char,
    transport: &'static str,
}

/// The chain over our dm-user module (both kernels).
const DM_USER_CHAIN: Chain = Chain {
    tag: "synp",
    letter: 'p',
    transport: "dm-user",
};
/// The chain over ublk (kernels with `ublk_drv`).
const UBLK_CHAIN: Chain = Chain {
    tag: "synu",
    letter: 'u',
    transport: "ublk",
};

/// Options of `cargo xtask vm-usm`.
#[derive(Debug, Default)]
pub struct UsmOptions {
    /// Kernels to run on (both when empty).
    pub kernels: Vec<KernelSeries>,
    /// Only the groups whose name contains this.
    pub filter: Option<String>,
    /// Wall-clock limit of the longest boot, seconds.
    pub timeout: Option<u64>,
}

impl UsmOptions {
    /// Parse `[--kernel 6.1|6.12]... [--filter NAME] [--timeout SECS]`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self::default();
        let mut flags = Flags::new(args, "");
        while let Some(a) = flags.next_flag() {
            match a {
                "--kernel" => o.kernels.push(flags.kernel()?),
                "--filter" => o.filter = Some(flags.value("--filter")?),
                "--timeout" => o.timeout = Some(flags.timeout()?),
                other => {
                    return Err(XtaskError::Usage(format!(
                        "unknown argument {other:?}; usage: cargo xtask vm-usm [--kernel 6.1|6.12] [--filter {}] [--timeout SECS]",
                        GROUPS.join("|")
                    )))
                }
            }
        }
        o.kernels = kernels_or_all(std::mem::take(&mut o.kernels));
        if let Some(f) = &o.filter {
            if !GROUPS.iter().any(|g| g.contains(f.as_str())) {
                return Err(XtaskError::Usage(format!(
                    "--filter {f:?} matches no scenario; scenarios: {}",
                    GROUPS.join(", ")
                )));
            }
        }
        Ok(o)
    }

    /// Whether `group` is selected: no filter, or the filter is part of its name (so
    /// `power-cycle` selects both power-off chains).
    fn wants(&self, group: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| group.contains(f))
    }
}

/// Where the ordered COPY/XOR ops end in a COW's merge order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeShape {
    /// Ops in the merge order.
    pub total: u64,
    /// Ordered (COPY/XOR) ops at its head.
    pub ordered: u64,
}

impl MergeShape {
    /// From `ota-tools inspect`'s `merge_ops_total:` and `ordered_ops_to_merge:` lines.
    pub fn parse_inspect(text: &str) -> Option<Self> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let total = field("merge_ops_total:")?;
        let ordered = field("ordered_ops_to_merge:")?;
        (total > 0 && ordered <= total).then_some(Self { total, ordered })
    }

    /// `merge_percent` points `PERCENT[+MS]` (the guest's `at=` syntax): `ordered` fractions
    /// of the ordered phase, `rest` fractions of the REPLACE/ZERO phase, each with its delay;
    /// percentages rounded to 0.1, strictly increasing inside (0, 100).
    pub fn points(&self, ordered: &[PhasePoint], rest: &[PhasePoint]) -> Vec<String> {
        let f = self.ordered as f64 * 100.0 / self.total as f64;
        let mut out: Vec<String> = Vec::new();
        let mut last = 0.0;
        let all = ordered
            .iter()
            .map(|&(x, d)| (f * x, d))
            .chain(rest.iter().map(|&(x, d)| (f + (100.0 - f) * x, d)));
        for (p, delay) in all {
            let p = (p * 10.0).round() / 10.0;
            if p > last && p < 100.0 {
                last = p;
                out.push(if delay == 0 {
                    format!("{p:.1}")
                } else {
                    format!("{p:.1}+{delay}")
                });
            }
        }
        out
    }
}

fn inspect_shape(tool: &Path, cow: &Path) -> Result<MergeShape> {
    let text = cmd::output(Command::new(tool).arg("inspect").arg(cow))?;
    MergeShape::parse_inspect(&text).ok_or_else(|| XtaskError::Resolve {
        what: format!("the merge order of {}", cow.display()),
        why: "ota-tools inspect printed no merge_ops_total/ordered_ops_to_merge".into(),
    })
}

/// Run the scenarios on every selected kernel; fails if any result fails.
pub fn run(repo: &Path, opts: &UsmOptions) -> Result<()> {
    let setup = ScenarioSetup::prepare(repo, "vmusm", CowMergeMode::User)?;
    let (build_root, tool, ext4, synthetic) = (
        &setup.build_root,
        &setup.tool,
        &setup.ext4,
        &setup.synthetic,
    );
    let shape = inspect_shape(tool, &synthetic.cow)?;
    let kill_points = shape.points(&KILL_POINTS.0, &KILL_POINTS.1);
    let power_points = shape.points(&POWEROFF_POINTS.0, &POWEROFF_POINTS.1);
    let ublk_power_points = shape.points(&UBLK_POWEROFF_POINTS.0, &UBLK_POWEROFF_POINTS.1);
    eprintln!(
        "xtask: synthetic COW: {} ops, {} ordered; kill points {} (merge_percent[+ms]), power-off points {} (over ublk: {})",
        shape.total,
        shape.ordered,
        kill_points.join(","),
        power_points.join(","),
        ublk_power_points.join(",")
    );

    let mut all: Vec<(KernelSeries, TestResult)> = Vec::new();
    for &series in &opts.kernels {
        let (mut boots, disks) = setup.kernel(repo, series, "usm")?;
        if series.has_ublk() {
            boots.extra_stock_modules.push("ublk_drv".into());
        }
        let k = series.label();
        let limit = opts.timeout.unwrap_or(900);

        let a = boot_a(opts, &disks, ext4, synthetic, shape, &kill_points)?;
        if !a.expected.is_empty() {
            eprintln!("xtask: [{k}] boot a: {}", a.expected.join(" "));
            let run = run_boot(&boots.spec("a", a.disks, a.fragment, limit), build_root)?;
            collect(&mut all, series, "a", report::evaluate(&run, &a.expected));
        }
        // "power-cycle" alone selects both chains; "ublk" only the one over ublk.
        if opts.wants("power-cycle") {
            power_chain(
                &boots,
                build_root,
                &disks,
                (synthetic, shape),
                (DM_USER_CHAIN, &power_points),
                limit.min(600),
                series,
                &mut all,
            )?;
        }
        if opts.wants("ublk-power-cycle") {
            if series.has_ublk() {
                power_chain(
                    &boots,
                    build_root,
                    &disks,
                    (synthetic, shape),
                    (UBLK_CHAIN, &ublk_power_points),
                    limit.min(600),
                    series,
                    &mut all,
                )?;
            } else {
                eprintln!(
                    "xtask: [{k}] kernel {k} has no ublk (Debian builds it without CONFIG_BLK_DEV_UBLK): the power-off chain over ublk is not run"
                );
            }
        }
    }
    let failed = scenario_pairs::print_results("vm-usm", &all);
    if failed > 0 {
        return Err(XtaskError::TestsFailed(failed));
    }
    Ok(())
}

/// The disks, init fragment and expected results of one boot.
struct Boot {
    disks: Vec<PathBuf>,
    fragment: String,
    expected: Vec<String>,
}

impl Boot {
    /// Attach `path` as the next virtio disk and return its guest name (`/dev/vda` ..
    /// `/dev/vdz`).
    fn disk(&mut self, path: PathBuf) -> Result<String> {
        let letter = u8::try_from(self.disks.len())
            .ok()
            .filter(|n| *n < 26)
            .map(|n| char::from(b'a' + n))
            .ok_or_else(|| XtaskError::Usage("more than 26 disks in one boot".into()))?;
        self.disks.push(path);
        Ok(format!("/dev/vd{letter}"))
    }

    fn expect(&mut self, steps: &[&str], tag: &str) {
        for s in steps {
            self.expected.push(format!("usm-{s}-{tag}"));
        }
    }
}

fn boot_a(
    opts: &UsmOptions,
    dir: &Path,
    ext4: &Pair,
    syn: &Pair,
    shape: MergeShape,
    kill_points: &[String],
) -> Result<Boot> {
    let mut b = Boot {
        disks: Vec::new(),
        fragment: String::new(),
        expected: Vec::new(),
    };
    let ext4_target = b.disk(ext4.target.clone())?;
    let syn_target = b.disk(syn.target.clone())?;
    // A fresh base and COW of `pair` for scenario `tag`: their guest names.
    let fresh = |b: &mut Boot, tag: &str, pair: &Pair| -> Result<(String, String)> {
        let base = b.disk(fresh_copy(dir, &format!("{tag}-base.img"), &pair.source)?)?;
        let cow = b.disk(fresh_copy(dir, &format!("{tag}.cow"), &pair.cow)?)?;
        Ok((base, cow))
    };
    if opts.wants("read-merge") {
        let (base, cow) = fresh(&mut b, "ext4", ext4)?;
        b.fragment.push_str(&format!(
            "/bin/vmtest usm read-merge ext4 {base} {cow} {ext4_target} marker={}:{}\n",
            MARKER.0, MARKER.1
        ));
        b.expect(&["read", "ext4", "random", "merge"], "ext4");
        let (base, cow) = fresh(&mut b, "syn", syn)?;
        b.fragment.push_str(&format!(
            "/bin/vmtest usm read-merge syn {base} {cow} {syn_target}\n"
        ));
        b.expect(&["read", "random", "merge"], "syn");
    }
    if opts.wants("kill-chain") {
        let (base, cow) = fresh(&mut b, "synk", syn)?;
        b.fragment.push_str(&format!(
            "/bin/vmtest usm kill-chain synk {base} {cow} {syn_target} at={} ordered={}\n",
            kill_points.join(","),
            shape.ordered
        ));
        for n in 1..=kill_points.len() {
            b.expected.push(format!("usm-kill{n}-synk"));
        }
        b.expect(&["kill-merge"], "synk");
    }
    if opts.wants("handoff") {
        let (base, cow) = fresh(&mut b, "synh", syn)?;
        b.fragment.push_str(&format!(
            "/bin/vmtest usm handoff synh {base} {cow} {syn_target} at=30\n"
        ));
        b.expect(&["handoff"], "synh");
    }
    if opts.wants("pause") {
        let (base, cow) = fresh(&mut b, "synq", syn)?;
        b.fragment.push_str(&format!(
            "/bin/vmtest usm pause synq {base} {cow} {syn_target} at=20\n"
        ));
        b.expect(&["pause"], "synq");
    }
    if opts.wants("two-merge") {
        let (base1, cow1) = fresh(&mut b, "syn2", syn)?;
        let (base2, cow2) = fresh(&mut b, "e42", ext4)?;
        b.fragment.push_str(&format!(
            "/bin/vmtest usm two-merge syn2 {base1} {cow1} {syn_target} second=e42:{base2}:{cow2}:{ext4_target}\n"
        ));
        b.expect(&["two-merge"], "syn2");
    }
    if b.expected.is_empty() {
        b.disks.clear();
    }
    Ok(b)
}

/// A power-off chain on fresh copies of the synthetic pair: boot `<letter><i>` reads,
/// resumes and cuts the power at point i; the boot after the last point merges to the end.
#[allow(clippy::too_many_arguments)]
fn power_chain(
    boots: &BootTemplate,
    build_root: &Path,
    dir: &Path,
    (syn, shape): (&Pair, MergeShape),
    (chain, points): (Chain, &[String]),
    secs: u64,
    series: KernelSeries,
    all: &mut Vec<(KernelSeries, TestResult)>,
) -> Result<()> {
    let tag = chain.tag;
    let disks = vec![
        fresh_copy(dir, &format!("{tag}-base.img"), &syn.source)?,
        fresh_copy(dir, &format!("{tag}.cow"), &syn.cow)?,
        syn.target.clone(),
    ];
    let args = chain_args(chain, shape);
    let last = points.len() + 1;
    for boot in 1..=last {
        let label = format!("{}{boot}", chain.letter);
        let point = points.get(boot - 1);
        let mut expected = vec![format!("usm-boot{boot}-read-{tag}")];
        let fragment = match point {
            Some(p) => {
                expected.push(format!("usm-poweroff{boot}-{tag}"));
                format!(
                    "/bin/vmtest usm power-cycle {args} boot={boot} at={p}\necho VMINFO poweroff did not happen\n"
                )
            }
            None => {
                expected.push(format!("usm-power-merge-{tag}"));
                format!("/bin/vmtest usm power-cycle {args} boot={boot}\n")
            }
        };
        eprintln!(
            "xtask: [{}] power-off chain over {} boot {boot}/{last}{}",
            series.label(),
            chain.transport,
            point
                .map(|p| format!(", power cut at {p}%"))
                .unwrap_or_default()
        );
        let run = run_boot(
            &boots.spec(&label, disks.clone(), fragment, secs),
            build_root,
        )?;
        let mut results = report::evaluate(&run, &expected);
        if point.is_some() {
            powered_off_verdict(&run, &mut results);
        }
        let cut = results
            .iter()
            .all(|r| r.pass || r.name == "kernel-log-clean");
        collect(all, series, &label, results);
        if !cut {
            for later in boot + 1..=last {
                all.push((
                    series,
                    TestResult {
                        name: format!("{}{later}/power-cycle", chain.letter),
                        pass: false,
                        detail: format!(
                            "boot {boot} of the chain failed: precondition not established"
                        ),
                    },
                ));
            }
            break;
        }
    }
    Ok(())
}

/// The guest's `vmtest usm power-cycle` arguments of `chain` before `boot=` and `at=`.
fn chain_args(chain: Chain, shape: MergeShape) -> String {
    format!(
        "{} /dev/vda /dev/vdb /dev/vdc ordered={} transport={}",
        chain.tag, shape.ordered, chain.transport
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::words as args;

    #[test]
    fn options_default_to_both_kernels_and_every_group() {
        let o = UsmOptions::parse(&[]).unwrap();
        assert_eq!(o.kernels, KernelSeries::ALL.to_vec());
        assert!(GROUPS.iter().all(|g| o.wants(g)));
    }

    #[test]
    fn filter_selects_groups_and_refuses_unknown_names() {
        let o = UsmOptions::parse(&args(&["--filter", "kill", "--kernel", "6.12"])).unwrap();
        assert!(o.wants("kill-chain"));
        assert!(!o.wants("power-cycle"));
        assert_eq!(o.kernels, vec![KernelSeries::parse("6.12").unwrap()]);
        let o = UsmOptions::parse(&args(&["--filter", "power-cycle"])).unwrap();
        assert!(o.wants("power-cycle") && o.wants("ublk-power-cycle"));
        let o = UsmOptions::parse(&args(&["--filter", "ublk"])).unwrap();
        assert!(o.wants("ublk-power-cycle") && !o.wants("power-cycle"));
        assert!(UsmOptions::parse(&args(&["--filter", "nothing"])).is_err());
        assert!(UsmOptions::parse(&args(&["--bogus"])).is_err());
        assert!(UsmOptions::parse(&args(&["--timeout", "x"])).is_err());
    }

    #[test]
    fn merge_shape_from_inspect_and_points_in_both_phases() {
        let text =
            "records: 3287\nmerge_ops_total: 3287\nalready_merged: 0\nordered_ops_to_merge: 2400\n";
        let s = MergeShape::parse_inspect(text).unwrap();
        assert_eq!(
            s,
            MergeShape {
                total: 3287,
                ordered: 2400
            }
        );
        let p = s.points(&KILL_POINTS.0, &KILL_POINTS.1);
        assert_eq!(p.len(), 6);
        assert_eq!(p[0], "11.0");
        assert_eq!(p[1], "29.2+60");
        let pct: Vec<f64> = p
            .iter()
            .map(|x| x.split('+').next().unwrap().parse().unwrap())
            .collect();
        let f = 2400.0 * 100.0 / 3287.0;
        assert_eq!(pct.iter().filter(|x| **x < f).count(), 4);
        assert!(pct.windows(2).all(|w| w[0] < w[1]));
        assert!(pct.iter().all(|x| *x > 0.0 && *x < 100.0));
        assert!(MergeShape::parse_inspect("merge_ops_total: 0\nordered_ops_to_merge: 0").is_none());
        assert!(MergeShape::parse_inspect("nothing").is_none());
    }

    #[test]
    fn ublk_chain_cuts_once_per_phase_and_names_its_transport() {
        let s = MergeShape {
            total: 3287,
            ordered: 2400,
        };
        let p = s.points(&UBLK_POWEROFF_POINTS.0, &UBLK_POWEROFF_POINTS.1);
        assert_eq!(p.len(), 2, "{p:?}");
        let pct: Vec<f64> = p
            .iter()
            .map(|x| x.split('+').next().unwrap().parse().unwrap())
            .collect();
        let f = 2400.0 * 100.0 / 3287.0;
        assert!(pct[0] < f && pct[1] > f, "{pct:?} around {f}");
        let a = chain_args(UBLK_CHAIN, s);
        assert!(
            a.starts_with("synu ") && a.ends_with("transport=ublk"),
            "{a}"
        );
        assert!(a.contains("ordered=2400"), "{a}");
        assert!(chain_args(DM_USER_CHAIN, s).ends_with("transport=dm-user"));
    }

    #[test]
    fn points_without_ordered_ops_collapse_duplicates() {
        let s = MergeShape {
            total: 100,
            ordered: 0,
        };
        assert_eq!(s.points(&[(0.5, 0), (0.9, 0)], &[(0.5, 7)]), vec!["50.0+7"]);
    }

    #[test]
    fn disks_get_consecutive_guest_names() {
        let mut b = Boot {
            disks: Vec::new(),
            fragment: String::new(),
            expected: Vec::new(),
        };
        assert_eq!(b.disk("x".into()).unwrap(), "/dev/vda");
        assert_eq!(b.disk("y".into()).unwrap(), "/dev/vdb");
        for _ in 2..26 {
            b.disk("z".into()).unwrap();
        }
        assert!(b.disk("too many".into()).is_err());
    }
}
