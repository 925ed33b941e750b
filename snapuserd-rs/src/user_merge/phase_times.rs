//! Where one merge call spends its time: the wall-clock time of each kind of step, summed
//! over the call and logged when it ends, so a slow merge says what is slow.

use std::fmt;
use std::time::{Duration, Instant};

/// A kind of merge step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MergeStep {
    /// Reading the sources of ordered windows from the source device.
    SourceRead,
    /// Saving a window in scratch (data and metadata synced, then state Done synced).
    ScratchSave,
    /// Producing destination blocks (decompression, XOR) into the write buffer.
    Produce,
    /// Writing destinations to the base device, including its syncs.
    BaseWrite,
    /// Committing `num_merge_ops` (and the scratch state) to the COW.
    Commit,
}

const STEPS: [(MergeStep, &str); 5] = [
    (MergeStep::SourceRead, "source reads"),
    (MergeStep::ScratchSave, "scratch saves"),
    (MergeStep::Produce, "producing"),
    (MergeStep::BaseWrite, "base writes+syncs"),
    (MergeStep::Commit, "commits"),
];

/// Time per [`MergeStep`] since the start of a merge call.
#[derive(Debug)]
pub(crate) struct PhaseTimes {
    started: Instant,
    spent: [Duration; STEPS.len()],
}

impl Default for PhaseTimes {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            spent: [Duration::ZERO; STEPS.len()],
        }
    }
}

impl PhaseTimes {
    /// Run `f`, counting its time as `step`.
    pub(crate) fn time<T>(&mut self, step: MergeStep, f: impl FnOnce() -> T) -> T {
        let at = Instant::now();
        let result = f();
        self.add(step, at.elapsed());
        result
    }

    /// Count `spent` as `step`.
    pub(crate) fn add(&mut self, step: MergeStep, spent: Duration) {
        let slot = STEPS.iter().position(|(s, _)| *s == step).unwrap_or(0);
        self.spent[slot] = self.spent[slot].saturating_add(spent);
    }
}

impl fmt::Display for PhaseTimes {
    /// `1.234 s (source reads 0.100 s, ..., other 0.010 s)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.started.elapsed();
        write!(f, "{:.3} s (", total.as_secs_f64())?;
        for ((_, name), spent) in STEPS.iter().zip(self.spent) {
            write!(f, "{name} {:.3} s, ", spent.as_secs_f64())?;
        }
        let counted: Duration = self.spent.iter().sum();
        write!(
            f,
            "other {:.3} s)",
            total.saturating_sub(counted).as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_add_up_separately_and_show_in_the_summary() {
        let mut t = PhaseTimes::default();
        t.add(MergeStep::ScratchSave, Duration::from_millis(250));
        t.add(MergeStep::ScratchSave, Duration::from_millis(50));
        let v = t.time(MergeStep::Commit, || 7);
        assert_eq!(v, 7);
        let text = t.to_string();
        assert!(text.contains("scratch saves 0.300 s"), "{text}");
        assert!(text.contains("source reads 0.000 s"), "{text}");
        assert!(text.contains("commits 0.0"), "{text}");
        assert!(text.ends_with(" s)"), "{text}");
    }
}
