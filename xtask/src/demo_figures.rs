//! The demo's emulator figures: the guest's `VMDEMO` lines (user-space-merge mode) parsed
//! into rounds and merge-progress samples, and the medians `report.json` carries.

use std::collections::BTreeMap;

/// What one round in the guest measured (`VMDEMO round ...`).
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// Round number, from 0.
    pub index: usize,
    /// Sequential O_DIRECT 1 MiB reads of the snapshot device, MB/s.
    pub snapshot_read_mb_s: f64,
    /// The same reads of the target on a loop device over tmpfs, MB/s.
    pub loop_read_mb_s: f64,
    /// Random O_DIRECT 4 KiB reads of the snapshot device, reads/s.
    pub snapshot_rand_iops: f64,
    /// The same random reads on the loop device, reads/s.
    pub loop_rand_iops: f64,
    /// Merge time, `initiate_merge` to `snapshot-merge-complete`, seconds.
    pub merge_s: f64,
    /// Plain O_DIRECT copy with fsync of the changed bytes, seconds.
    pub plain_copy_s: f64,
    /// Plain O_DIRECT copy with one fsync of the changed blocks to their own places (the
    /// COW's destination runs, 1 MiB at most per I/O), seconds; NaN when not reported.
    pub scattered_copy_s: f64,
    /// Daemon RssAnon while serving, KiB.
    pub rss_anon_kib: u64,
    /// Daemon VmRSS while serving, KiB.
    pub rss_serving_kib: u64,
    /// Daemon peak VmRSS sampled during the merge, KiB.
    pub rss_peak_kib: u64,
    /// Daemon threads while serving.
    pub threads: u64,
}

impl Round {
    /// Snapshot over loop, sequential reads.
    pub fn read_ratio(&self) -> f64 {
        ratio(self.snapshot_read_mb_s, self.loop_read_mb_s)
    }

    /// Snapshot over loop, random reads.
    pub fn rand_ratio(&self) -> f64 {
        ratio(self.snapshot_rand_iops, self.loop_rand_iops)
    }

    /// Merge time over plain-copy time.
    pub fn merge_ratio(&self) -> f64 {
        ratio(self.merge_s, self.plain_copy_s)
    }

    /// Merge time over scattered-copy time.
    pub fn scattered_ratio(&self) -> f64 {
        ratio(self.merge_s, self.scattered_copy_s)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// Everything the guest reported.
#[derive(Debug, Default)]
pub struct GuestFigures {
    /// The rounds, in order.
    pub rounds: Vec<Round>,
    /// Merge progress per round: (seconds since `initiate_merge`, `merge_percent`).
    pub progress: BTreeMap<usize, Vec<(f64, f64)>>,
    /// Where the time of each merge and plain copy went (`merge-io` and `copy-io` lines:
    /// daemon CPU time, disk writes, flushes), as reported.
    pub io_lines: Vec<String>,
    /// The daemon's memory by worker count: (workers, RssAnon KiB, VmRSS KiB) after serving
    /// one sequential and one random pass.
    pub by_workers: Vec<(u64, u64, u64)>,
}

/// `key value` pairs of a line (`a 1 b 2` -> {a: 1, b: 2}); words without a number are skipped.
fn fields(words: &[&str]) -> BTreeMap<String, f64> {
    words
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] => v.parse::<f64>().ok().map(|v| (k.to_string(), v)),
            _ => None,
        })
        .collect()
}

/// Parse the text after `VMDEMO ` of each line. Lines of another shape are ignored; a round
/// missing a figure is left out (and so is its progress).
pub fn parse(lines: &[&str]) -> GuestFigures {
    let mut figures = GuestFigures::default();
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["progress", round, t, p] => {
                if let (Ok(r), Ok(t), Ok(p)) =
                    (round.parse::<usize>(), t.parse::<f64>(), p.parse::<f64>())
                {
                    figures.progress.entry(r).or_default().push((t, p));
                }
            }
            ["merge-io" | "copy-io" | "scatter-io" | "scatter" | "read-io", ..] => {
                figures.io_lines.push(line.to_string())
            }
            ["workers", n, rest @ ..] => {
                let f = fields(rest);
                if let (Ok(n), Some(anon), Some(rss)) =
                    (n.parse::<u64>(), f.get("rss_anon_kib"), f.get("vm_rss_kib"))
                {
                    figures.by_workers.push((n, *anon as u64, *rss as u64));
                }
            }
            ["round", index, rest @ ..] => {
                let Ok(index) = index.parse::<usize>() else {
                    continue;
                };
                let f = fields(rest);
                let get = |k: &str| f.get(k).copied();
                let kib = |k: &str| get(k).map(|v| v as u64);
                let round = (|| {
                    Some(Round {
                        index,
                        snapshot_read_mb_s: get("snapshot_read_mb_s")?,
                        loop_read_mb_s: get("loop_read_mb_s")?,
                        snapshot_rand_iops: get("snapshot_rand_iops")?,
                        loop_rand_iops: get("loop_rand_iops")?,
                        merge_s: get("merge_s")?,
                        plain_copy_s: get("plain_copy_s")?,
                        scattered_copy_s: get("scattered_copy_s").unwrap_or(f64::NAN),
                        rss_anon_kib: kib("rss_anon_kib")?,
                        rss_serving_kib: kib("rss_serving_kib")?,
                        rss_peak_kib: kib("rss_peak_kib")?,
                        threads: kib("threads").unwrap_or(0),
                    })
                })();
                figures.rounds.extend(round);
            }
            _ => {}
        }
    }
    let kept: Vec<usize> = figures.rounds.iter().map(|r| r.index).collect();
    figures.progress.retain(|r, _| kept.contains(r));
    figures
}

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The medians over the rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Medians {
    /// Rounds the medians are taken over.
    pub rounds: usize,
    /// Median snapshot sequential read, MB/s.
    pub snapshot_read_mb_s: f64,
    /// Median loop sequential read, MB/s.
    pub loop_read_mb_s: f64,
    /// Median of the per-round sequential read ratios.
    pub read_ratio: f64,
    /// Median snapshot random 4 KiB reads/s.
    pub snapshot_rand_iops: f64,
    /// Median loop random 4 KiB reads/s.
    pub loop_rand_iops: f64,
    /// Median of the per-round random read ratios.
    pub rand_ratio: f64,
    /// Median merge time, s.
    pub merge_s: f64,
    /// Median plain-copy time, s.
    pub plain_copy_s: f64,
    /// Median of the per-round merge / plain-copy ratios.
    pub merge_ratio: f64,
    /// Median scattered-copy time, s (NaN when no round reported one).
    pub scattered_copy_s: f64,
    /// Median of the per-round merge / scattered-copy ratios.
    pub scattered_ratio: f64,
    /// Highest VmRSS sampled during any merge, KiB.
    pub rss_peak_kib: u64,
    /// Highest RssAnon seen while serving, KiB.
    pub rss_anon_kib: u64,
    /// The round whose merge time is the median (the one plotted).
    pub median_merge_round: Option<usize>,
}

/// Medians of `rounds`; None when there is no round.
pub fn medians(rounds: &[Round]) -> Option<Medians> {
    if rounds.is_empty() {
        return None;
    }
    let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f));
    let merge_s = m(|r| r.merge_s);
    let median_merge_round = rounds
        .iter()
        .min_by(|a, b| {
            (a.merge_s - merge_s)
                .abs()
                .total_cmp(&(b.merge_s - merge_s).abs())
        })
        .map(|r| r.index);
    Some(Medians {
        rounds: rounds.len(),
        snapshot_read_mb_s: m(|r| r.snapshot_read_mb_s),
        loop_read_mb_s: m(|r| r.loop_read_mb_s),
        read_ratio: m(Round::read_ratio),
        snapshot_rand_iops: m(|r| r.snapshot_rand_iops),
        loop_rand_iops: m(|r| r.loop_rand_iops),
        rand_ratio: m(Round::rand_ratio),
        merge_s,
        plain_copy_s: m(|r| r.plain_copy_s),
        merge_ratio: m(Round::merge_ratio),
        scattered_copy_s: m(|r| r.scattered_copy_s),
        scattered_ratio: m(Round::scattered_ratio),
        rss_peak_kib: rounds.iter().map(|r| r.rss_peak_kib).max().unwrap_or(0),
        rss_anon_kib: rounds.iter().map(|r| r.rss_anon_kib).max().unwrap_or(0),
        median_merge_round,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_line(i: usize, snap: f64, merge: f64) -> String {
        format!(
            "round {i} snapshot_read_mb_s {snap} loop_read_mb_s 100.0 snapshot_rand_iops 500 loop_rand_iops 1000 merge_s {merge} plain_copy_s 0.5 scattered_copy_s {} rss_anon_kib 3000 rss_serving_kib 9000 rss_peak_kib {} threads 6",
            merge / 2.0 + i as f64,
            10000 + i
        )
    }

    #[test]
    fn rounds_and_progress_parse_and_medians_are_per_round() {
        let lines: Vec<String> = [
            round_line(0, 50.0, 2.0),
            round_line(1, 70.0, 1.0),
            round_line(2, 60.0, 4.0),
            "progress 2 0.000 0.0".into(),
            "progress 2 0.500 40.5".into(),
            "progress 1 0.100 10.0".into(),
            "workers 2 rss_anon_kib 2100 vm_rss_kib 9000 rss_file_kib 6000 threads 3".into(),
            "config rounds 3".into(),
            "scatter runs 6000 pieces 6010 bytes 69206016".into(),
            "scatter-io 1 seconds 1.500 base writes 6010".into(),
            "read-io 1 warm_snapshot_read_mb_s 500.0 base_disk_read_mb_s 700.0".into(),
        ]
        .into();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let g = parse(&refs);
        assert_eq!(g.rounds.len(), 3);
        assert_eq!(g.progress[&2], vec![(0.0, 0.0), (0.5, 40.5)]);
        assert_eq!(g.by_workers, vec![(2, 2100, 9000)]);
        let m = medians(&g.rounds).unwrap();
        assert_eq!(m.snapshot_read_mb_s, 60.0);
        assert!((m.read_ratio - 0.6).abs() < 1e-9);
        assert!((m.rand_ratio - 0.5).abs() < 1e-9);
        assert_eq!(m.merge_s, 2.0);
        assert!((m.merge_ratio - 4.0).abs() < 1e-9);
        assert_eq!(m.median_merge_round, Some(0));
        // Scattered copies 1.0, 1.5, 4.0 s: ratios 2.0, 0.67, 1.0.
        assert_eq!(g.rounds[1].scattered_copy_s, 1.5);
        assert_eq!(m.scattered_copy_s, 1.5);
        assert!((m.scattered_ratio - 1.0).abs() < 1e-9);
        assert_eq!(g.io_lines.len(), 3, "{:?}", g.io_lines);
        assert_eq!(m.rss_peak_kib, 10002);
    }

    #[test]
    fn an_incomplete_round_is_left_out_with_its_progress() {
        let lines = [
            "round 0 snapshot_read_mb_s 1 loop_read_mb_s 2",
            "progress 0 0.1 5.0",
        ];
        let g = parse(&lines);
        assert!(g.rounds.is_empty() && g.progress.is_empty());
        assert!(medians(&g.rounds).is_none());
    }

    #[test]
    fn a_round_without_the_scattered_copy_still_counts_with_nan() {
        let lines = [
            "round 0 snapshot_read_mb_s 1 loop_read_mb_s 2 snapshot_rand_iops 3 loop_rand_iops 4 merge_s 2 plain_copy_s 1 rss_anon_kib 5 rss_serving_kib 6 rss_peak_kib 7",
            "round 1 snapshot_read_mb_s 1 loop_read_mb_s 2 snapshot_rand_iops 3 loop_rand_iops 4 merge_s 2 plain_copy_s 1 scattered_copy_s oops rss_anon_kib 5 rss_serving_kib 6 rss_peak_kib 7",
        ];
        let g = parse(&lines);
        assert_eq!(g.rounds.len(), 2);
        assert!(g.rounds.iter().all(|r| r.scattered_copy_s.is_nan()));
        let m = medians(&g.rounds).unwrap();
        assert!(m.scattered_copy_s.is_nan() && m.scattered_ratio.is_nan());
        assert_eq!(m.merge_ratio, 2.0);
    }

    #[test]
    fn median_of_even_count_is_the_middle_mean() {
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median([]).is_nan());
    }
}
