//! Read-ahead of the base device for a reader that goes through the snapshot in order.
//!
//! A sequential reader of the snapshot device (update verification at boot, `dd`, a
//! filesystem's own read-ahead) sends requests that each start where the last one ended.
//! The unchanged blocks of those requests, and the COPY sources next to them, come from the
//! base device's page cache; when they are not cached each request would wait for the disk
//! in turn. [`SequentialPrefetch`] keeps the base's page cache a few MiB ahead of such a
//! reader with `POSIX_FADV_WILLNEED`, which starts the disk reads and returns without
//! waiting for them, so they overlap the requests answered meanwhile. It is a hint: a race
//! between workers, a refused advice or a wrong guess costs at most page-cache pages.
//! The COW file's payloads of the same blocks, and the source ranges of their COPY and XOR
//! ops, are advised too ([`scattered_ranges`]): they are small reads scattered over the COW's
//! data area and over the source device, each a disk round trip when not cached.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

/// How far ahead of a sequential reader the base is read, unless told otherwise.
pub(crate) const PREFETCH_AHEAD: u64 = 4 << 20;
/// The least new range worth one advice (fewer system calls for small requests).
const PREFETCH_STEP: u64 = 512 << 10;

/// Scattered extents closer than this are advised as one range.
const SCATTER_GAP: u64 = 128 << 10;
/// Most scattered ranges advised per file and step.
const MAX_SCATTERED_RANGES: usize = 16;

/// Coalesce scattered extents `(offset, len)` (payloads, sources; any order) into at most
/// [`MAX_SCATTERED_RANGES`] ranges, joining extents less than [`SCATTER_GAP`] apart; the
/// ranges past that count are left out (the reads find them uncached, as without advice).
pub(crate) fn scattered_ranges(mut extents: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    extents.sort_unstable();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (offset, len) in extents {
        let end = offset.saturating_add(len);
        match ranges.last_mut() {
            Some((_, last_end)) if offset <= last_end.saturating_add(SCATTER_GAP) => {
                *last_end = (*last_end).max(end);
            }
            _ => {
                if ranges.len() == MAX_SCATTERED_RANGES {
                    break;
                }
                ranges.push((offset, end));
            }
        }
    }
    ranges
        .into_iter()
        .map(|(start, end)| (start, end - start))
        .collect()
}

/// Advise `file` that the ranges `(offset, len)` will be read soon.
pub(crate) fn will_need(file: &File, ranges: impl IntoIterator<Item = (u64, u64)>) {
    for (offset, len) in ranges {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            continue;
        };
        // A refusal (a file that takes no advice) leaves reads as they were.
        let _ = nix::fcntl::posix_fadvise(
            file,
            offset,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
    }
}

/// Tracks where the next sequential request would start and how far the base has been
/// advised ahead of it.
#[derive(Debug)]
pub(crate) struct SequentialPrefetch {
    /// Byte offset where the last request ended (`u64::MAX`: none yet).
    next: AtomicU64,
    /// End of the range already advised for the current sequential run.
    ahead_to: AtomicU64,
    /// How far ahead of the reader the base is advised.
    ahead: u64,
}

impl Default for SequentialPrefetch {
    fn default() -> Self {
        Self::new(None)
    }
}

impl SequentialPrefetch {
    /// A tracker advising `ahead` bytes ahead of the reader ([`PREFETCH_AHEAD`] if `None`;
    /// at least [`PREFETCH_STEP`]).
    pub(crate) fn new(ahead: Option<u64>) -> Self {
        Self {
            next: AtomicU64::new(u64::MAX),
            ahead_to: AtomicU64::new(0),
            ahead: ahead.unwrap_or(PREFETCH_AHEAD).max(PREFETCH_STEP),
        }
    }

    /// After a read of `start..end` (bytes) of a device of `size` bytes: whether it
    /// continued the previous one (a sequential run goes on), and the range to advise:
    /// `Some((offset, len))` when it continued it and the base is not yet advised far enough
    /// ahead of it.
    pub(crate) fn follow(&self, start: u64, end: u64, size: u64) -> (bool, Option<(u64, u64)>) {
        if self.next.swap(end, Ordering::AcqRel) != start {
            // A new run (or random reads): nothing advised for it yet.
            self.ahead_to.store(0, Ordering::Release);
            return (false, None);
        }
        let want = end.saturating_add(self.ahead).min(size);
        let from = self.ahead_to.load(Ordering::Acquire).max(end);
        if want <= from || want - from < PREFETCH_STEP.min(size - from) {
            return (true, None);
        }
        self.ahead_to.store(want, Ordering::Release);
        (true, Some((from, want - from)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_distance_ahead_is_the_one_asked_for_and_at_least_one_step() {
        let size = 256 * MIB;
        let p = SequentialPrefetch::new(Some(16 * MIB));
        assert_eq!(p.follow(0, MIB, size).1, None);
        assert_eq!(p.follow(MIB, 2 * MIB, size).1, Some((2 * MIB, 16 * MIB)));
        let tiny = SequentialPrefetch::new(Some(1));
        assert_eq!(tiny.follow(0, MIB, size).1, None);
        assert_eq!(
            tiny.follow(MIB, 2 * MIB, size).1,
            Some((2 * MIB, PREFETCH_STEP))
        );
    }

    #[test]
    fn a_sequential_run_is_advised_ahead_once_per_step() {
        let p = SequentialPrefetch::default();
        let size = 64 * MIB;
        // The first request of a run only starts it.
        assert_eq!(p.follow(0, MIB, size).1, None);
        // The second continues it: the next PREFETCH_AHEAD bytes.
        assert_eq!(
            p.follow(MIB, 2 * MIB, size).1,
            Some((2 * MIB, PREFETCH_AHEAD))
        );
        // The third: only what is new beyond the advised range.
        assert_eq!(
            p.follow(2 * MIB, 3 * MIB, size).1,
            Some((2 * MIB + PREFETCH_AHEAD, MIB))
        );
        // Small steps wait until PREFETCH_STEP bytes are new, but still continue the run.
        assert_eq!(p.follow(3 * MIB, 3 * MIB + 4096, size), (true, None));
        assert_eq!(p.follow(0, 4096, size), (false, None));
    }

    #[test]
    fn payloads_are_joined_across_small_gaps_and_capped() {
        assert_eq!(scattered_ranges(Vec::new()), Vec::new());
        // Out of order, overlapping (a multi-block op seen twice) and close: one range.
        assert_eq!(
            scattered_ranges(vec![
                (10_000, 500),
                (0, 4000),
                (0, 4000),
                (4000 + SCATTER_GAP, 1)
            ]),
            vec![(0, 4001 + SCATTER_GAP)]
        );
        // Far apart: separate ranges, at most MAX_SCATTERED_RANGES of them, the lowest kept.
        let far: Vec<(u64, u64)> = (0..40).rev().map(|i| (i * 10 * SCATTER_GAP, 100)).collect();
        let ranges = scattered_ranges(far);
        assert_eq!(ranges.len(), MAX_SCATTERED_RANGES);
        assert_eq!(ranges[0], (0, 100));
        assert_eq!(ranges[1], (10 * SCATTER_GAP, 100));
    }

    #[test]
    fn a_jump_starts_a_new_run_and_the_end_of_the_device_bounds_the_advice() {
        let p = SequentialPrefetch::default();
        let size = 8 * MIB;
        assert_eq!(p.follow(0, MIB, size).1, None);
        assert_eq!(p.follow(MIB, 2 * MIB, size).1, Some((2 * MIB, 4 * MIB)));
        // Back to the start: a new run, nothing advised by the jump itself.
        assert_eq!(p.follow(0, MIB, size).1, None);
        assert_eq!(p.follow(MIB, 2 * MIB, size).1, Some((2 * MIB, 4 * MIB)));
        assert_eq!(p.follow(2 * MIB, 3 * MIB, size).1, Some((6 * MIB, MIB)));
        assert_eq!(p.follow(3 * MIB, 4 * MIB, size).1, Some((7 * MIB, MIB)));
        // At the end of the device there is nothing more to advise.
        assert_eq!(p.follow(4 * MIB, 5 * MIB, size).1, None);
        assert_eq!(p.follow(5 * MIB, 6 * MIB, size).1, None);
    }
}
