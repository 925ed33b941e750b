//! The bookkeeping of one batch of positioned I/O, independent of the ring: which piece of which
//! run goes out next, and what a completion means (done, a remainder to resubmit, or an error).
//!
//! A run longer than the piece limit is split into pieces so that one large run can still use
//! the whole queue depth. A short completion leaves a remainder piece that goes out before any
//! new piece. The first error ends the batch: no further piece is handed out, and the error is
//! kept until the driver has reaped every piece still in flight.

use std::collections::VecDeque;

/// How many `EAGAIN`/`EINTR` completions one batch resubmits before it gives up.
pub(crate) const MAX_TRANSIENT_RETRIES: u32 = 64;

/// One piece of a run, as submitted to the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Index of the run in the caller's batch.
    pub run: usize,
    /// Byte position of the piece inside its run's buffer.
    pub start: usize,
    /// Bytes to transfer; never zero, never past the end of the run.
    pub len: u32,
    /// Byte offset on the device.
    pub offset: u64,
}

/// Why a piece failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceFailure {
    /// The kernel returned this errno.
    Os(i32),
    /// A read returned 0 bytes before the run was complete: the device ends there.
    EndOfDevice,
    /// A write returned 0 bytes: the device took nothing.
    WriteZero,
    /// The kernel reported more bytes than were asked for: the ring's contract is broken.
    Overlong {
        /// Bytes the completion reported.
        reported: i32,
    },
    /// More transient errors (`EAGAIN`, `EINTR`) than the batch resubmits.
    TooManyRetries(i32),
}

/// Whether the batch moves bytes from the device into memory or out to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Positioned reads.
    Read,
    /// Positioned writes.
    Write,
}

/// The pieces of one batch still to submit, and its first failure.
#[derive(Debug)]
pub(crate) struct BatchPlan {
    direction: Direction,
    /// `(device offset, length)` of each run.
    runs: Vec<(u64, usize)>,
    max_piece: u32,
    /// Next run to split, and the position inside it.
    cursor_run: usize,
    cursor_pos: usize,
    /// Remainders of short or transiently failed pieces; they go out first.
    retries: VecDeque<Piece>,
    transient_retries: u32,
    failure: Option<(Piece, PieceFailure)>,
}

impl BatchPlan {
    /// A plan over runs given as `(device offset, length)`, in pieces of at most `max_piece`
    /// bytes (at least 1).
    pub(crate) fn new(direction: Direction, runs: Vec<(u64, usize)>, max_piece: u32) -> Self {
        let mut plan = BatchPlan {
            direction,
            runs,
            max_piece: max_piece.max(1),
            cursor_run: 0,
            cursor_pos: 0,
            retries: VecDeque::new(),
            transient_retries: 0,
            failure: None,
        };
        // A run whose end lies past the largest byte offset cannot be served by any device.
        let overflowing = plan.runs.iter().position(|&(offset, len)| {
            u64::try_from(len)
                .ok()
                .and_then(|len| offset.checked_add(len))
                .is_none()
        });
        if let Some(run) = overflowing {
            let piece = Piece {
                run,
                start: 0,
                len: 0,
                offset: plan.runs[run].0,
            };
            plan.failure = Some((piece, PieceFailure::Os(libc::EOVERFLOW)));
        }
        plan.skip_finished_runs();
        plan
    }

    /// Move the cursor past runs with nothing left to hand out.
    fn skip_finished_runs(&mut self) {
        while let Some(&(_, len)) = self.runs.get(self.cursor_run) {
            if self.cursor_pos < len {
                break;
            }
            self.cursor_run += 1;
            self.cursor_pos = 0;
        }
    }

    /// The next piece to submit, or `None` when every piece is out or the batch has failed.
    pub(crate) fn next_piece(&mut self) -> Option<Piece> {
        if self.failure.is_some() {
            return None;
        }
        if let Some(piece) = self.retries.pop_front() {
            return Some(piece);
        }
        let run = self.cursor_run;
        let &(run_offset, run_len) = self.runs.get(run)?;
        let left = run_len - self.cursor_pos;
        let len = u32::try_from(left).unwrap_or(u32::MAX).min(self.max_piece);
        let start = self.cursor_pos;
        // `run_offset + run_len` was checked in `new`, and `start` < `run_len`.
        let offset = run_offset + start as u64;
        self.cursor_pos += len as usize;
        self.skip_finished_runs();
        Some(Piece {
            run,
            start,
            len,
            offset,
        })
    }

    /// True when no piece is left to hand out (all submitted, or the batch failed).
    pub(crate) fn nothing_to_submit(&self) -> bool {
        self.failure.is_some() || (self.retries.is_empty() && self.cursor_run >= self.runs.len())
    }

    /// Account for the completion of `piece` with the kernel's result `res`.
    pub(crate) fn complete(&mut self, piece: Piece, res: i32) {
        if res < 0 {
            let errno = -res;
            if errno == libc::EAGAIN || errno == libc::EINTR {
                if self.transient_retries < MAX_TRANSIENT_RETRIES {
                    self.transient_retries += 1;
                    self.retries.push_back(piece);
                } else {
                    self.fail(piece, PieceFailure::TooManyRetries(errno));
                }
                return;
            }
            self.fail(piece, PieceFailure::Os(errno));
            return;
        }
        let done = res.unsigned_abs();
        if done > piece.len {
            self.fail(piece, PieceFailure::Overlong { reported: res });
            return;
        }
        if done == 0 {
            let failure = match self.direction {
                Direction::Read => PieceFailure::EndOfDevice,
                Direction::Write => PieceFailure::WriteZero,
            };
            self.fail(piece, failure);
            return;
        }
        if done < piece.len {
            // `done` < `piece.len` and the piece lies inside its run, so neither sum overflows
            // (the piece's own offset + len was computed without overflow).
            self.retries.push_back(Piece {
                run: piece.run,
                start: piece.start + done as usize,
                len: piece.len - done,
                offset: piece.offset + u64::from(done),
            });
        }
    }

    /// The first failure of the batch, with the piece it happened to.
    pub(crate) fn failure(&self) -> Option<(Piece, PieceFailure)> {
        self.failure
    }

    /// Record a failure the ring itself reported for `piece`, unless one is already recorded.
    pub(crate) fn fail(&mut self, piece: Piece, failure: PieceFailure) {
        if self.failure.is_none() {
            self.failure = Some((piece, failure));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(plan: &mut BatchPlan) -> Vec<Piece> {
        std::iter::from_fn(|| plan.next_piece()).collect()
    }

    #[test]
    fn runs_are_split_at_the_piece_limit() {
        let mut plan = BatchPlan::new(
            Direction::Read,
            vec![(4096, 10_000), (0, 0), (1 << 20, 3)],
            4096,
        );
        let pieces = drain(&mut plan);
        let shape: Vec<_> = pieces
            .iter()
            .map(|p| (p.run, p.start, p.len, p.offset))
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 0, 4096, 4096),
                (0, 4096, 4096, 8192),
                (0, 8192, 1808, 12288),
                (2, 0, 3, 1 << 20),
            ]
        );
        assert!(plan.nothing_to_submit());
    }

    #[test]
    fn a_short_completion_resubmits_exactly_the_remainder() {
        let mut plan = BatchPlan::new(Direction::Write, vec![(512, 8192)], 1 << 20);
        let piece = plan.next_piece().expect("one piece");
        assert!(plan.nothing_to_submit());
        plan.complete(piece, 3000);
        assert!(!plan.nothing_to_submit());
        let rest = plan.next_piece().expect("the remainder");
        assert_eq!(
            rest,
            Piece {
                run: 0,
                start: 3000,
                len: 8192 - 3000,
                offset: 512 + 3000
            }
        );
        plan.complete(rest, 5192);
        assert!(plan.next_piece().is_none());
        assert!(plan.failure().is_none());
    }

    #[test]
    fn zero_bytes_is_end_of_device_for_reads_and_an_error_for_writes() {
        let mut plan = BatchPlan::new(Direction::Read, vec![(0, 4096)], 4096);
        let piece = plan.next_piece().expect("piece");
        plan.complete(piece, 0);
        assert_eq!(plan.failure(), Some((piece, PieceFailure::EndOfDevice)));

        let mut plan = BatchPlan::new(Direction::Write, vec![(0, 4096)], 4096);
        let piece = plan.next_piece().expect("piece");
        plan.complete(piece, 0);
        assert_eq!(plan.failure(), Some((piece, PieceFailure::WriteZero)));
    }

    #[test]
    fn the_first_error_stops_the_batch_and_is_kept() {
        let mut plan = BatchPlan::new(
            Direction::Read,
            vec![(0, 4096), (8192, 4096), (65536, 4096)],
            4096,
        );
        let a = plan.next_piece().expect("a");
        let b = plan.next_piece().expect("b");
        plan.complete(b, -libc::EIO);
        plan.complete(a, -libc::EBADF);
        assert!(plan.next_piece().is_none(), "no piece after a failure");
        assert!(plan.nothing_to_submit());
        assert_eq!(plan.failure(), Some((b, PieceFailure::Os(libc::EIO))));
    }

    #[test]
    fn transient_errors_are_retried_a_bounded_number_of_times() {
        let mut plan = BatchPlan::new(Direction::Read, vec![(0, 4096)], 4096);
        for _ in 0..MAX_TRANSIENT_RETRIES {
            let piece = plan.next_piece().expect("retried piece");
            plan.complete(piece, -libc::EAGAIN);
            assert!(plan.failure().is_none());
        }
        let piece = plan.next_piece().expect("last try");
        plan.complete(piece, -libc::EINTR);
        assert_eq!(
            plan.failure(),
            Some((piece, PieceFailure::TooManyRetries(libc::EINTR)))
        );
    }

    #[test]
    fn a_completion_larger_than_asked_is_an_error() {
        let mut plan = BatchPlan::new(Direction::Read, vec![(0, 100)], 4096);
        let piece = plan.next_piece().expect("piece");
        plan.complete(piece, 101);
        assert_eq!(
            plan.failure(),
            Some((piece, PieceFailure::Overlong { reported: 101 }))
        );
    }

    #[test]
    fn a_run_past_the_largest_offset_fails_without_a_piece() {
        let mut plan = BatchPlan::new(Direction::Read, vec![(0, 4096), (u64::MAX - 10, 4096)], 16);
        assert!(plan.next_piece().is_none());
        assert!(plan.nothing_to_submit());
        assert!(matches!(
            plan.failure(),
            Some((Piece { run: 1, .. }, PieceFailure::Os(libc::EOVERFLOW)))
        ));
    }
}
