//! The REPLACE/ZERO part of the merge: batches of up to 1 MiB, each written, synced and
//! committed, the next one decoded on a second thread meanwhile (DESIGN.md, "Commit protocol").

use std::sync::atomic::Ordering;
use std::time::Instant;

use cow_format::OpKind;

use super::direct_io::AlignedBuf;
use super::error::UserMergeError;
use super::merge_io::MergeIo;
use super::merger::{push_span, write_runs, Buffers, StepError};
use super::phase_times::MergeStep;
use super::snapshot::{UserSnapshot, BLOCK};

/// Bytes of one REPLACE/ZERO batch (AOSP: 1 MiB, then fsync and commit).
const BATCH_BYTES: usize = 1 << 20;

/// A REPLACE/ZERO batch produced in memory, not yet written: entries `start..end`, their
/// bytes in `buf` at `spans` (see [`push_span`]).
pub(super) struct ProducedBatch {
    start: u64,
    end: u64,
    buf: AlignedBuf,
    spans: Vec<(u64, usize, usize)>,
}

impl UserSnapshot {
    /// One batch of the REPLACE/ZERO part from entry `p`: up to 1 MiB of blocks (and at
    /// most `cow_op_merge_size` ops), written in runs of contiguous blocks, synced, then
    /// `num_merge_ops` committed. A crash anywhere replays the batch, which is idempotent.
    ///
    /// While the batch is written, synced and committed, a second thread produces the next
    /// one (decompression is this phase's CPU work and the write mostly waits for the disk);
    /// the next call writes it if it starts where this batch ends. Only batches of REPLACE
    /// and ZERO ops are produced ahead: their bytes come from the COW alone, while an ordered
    /// op outside the sequence reads the device this batch writes.
    pub(super) fn merge_batch(
        &self,
        p: u64,
        io: &mut dyn MergeIo,
        bufs: &mut Buffers,
    ) -> Result<(), StepError> {
        let started = Instant::now();
        let batch = match bufs.next_batch.take() {
            Some(batch) if batch.start == p => batch,
            other => {
                let buf = other
                    .map(|b| b.buf)
                    .unwrap_or_else(|| std::mem::take(&mut bufs.out));
                self.produce_batch(p, buf, false)?
            }
        };
        bufs.times.add(MergeStep::Produce, started.elapsed());
        let ahead = (batch.end < self.plan.total()).then(|| {
            bufs.spare
                .take()
                .unwrap_or_else(|| std::mem::take(&mut bufs.out))
        });
        let mut writing = std::time::Duration::ZERO;
        let mut joining = std::time::Duration::ZERO;
        let (written, next) = std::thread::scope(|scope| {
            // No thread (none could be started): the next call produces its batch itself.
            let producing = ahead.and_then(|buf| {
                std::thread::Builder::new()
                    .name("merge-decode".into())
                    .spawn_scoped(scope, move || self.produce_batch(batch.end, buf, true))
                    .ok()
            });
            let at = Instant::now();
            let written = io.write_base_durably(&write_runs(&batch.spans, &batch.buf));
            writing = at.elapsed();
            let written = written
                .map_err(|source| {
                    StepError::Engine(UserMergeError::BaseWrite {
                        start: p,
                        end: batch.end,
                        engine: io.name(),
                        source,
                    })
                })
                .and_then(|()| {
                    bufs.times
                        .time(MergeStep::Commit, || self.commit_batch(batch.end))
                });
            let at = Instant::now();
            // A batch that could not be produced ahead is produced again by the next call,
            // which reports its error.
            let next = producing.and_then(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    .ok()
            });
            joining = at.elapsed();
            (written, next)
        });
        bufs.times.add(MergeStep::BaseWrite, writing);
        bufs.times.add(MergeStep::Produce, joining);
        bufs.spare = Some(batch.buf);
        match next {
            Some(next) if next.end > next.start => bufs.next_batch = Some(next),
            Some(empty) => bufs.out = empty.buf,
            None => {}
        }
        written
    }

    /// Commit the REPLACE/ZERO part up to `end` (written and synced), then move the readers
    /// on.
    fn commit_batch(&self, end: u64) -> Result<(), StepError> {
        self.lock_store().commit_merged(end).map_err(|source| {
            StepError::Fatal(UserMergeError::Progress {
                operation: "commit merged REPLACE/ZERO entries",
                num_merge_ops: end,
                source,
            })
        })?;
        let mut view = self.view_write();
        view.merged = end;
        self.merged.store(end, Ordering::Release);
        Ok(())
    }

    /// Produce the REPLACE/ZERO batch from entry `p` into `buf` (see
    /// [`merge_batch`](Self::merge_batch)). `ahead`: stop before the first op that reads
    /// the source device (the batch may then be empty).
    fn produce_batch(
        &self,
        p: u64,
        mut buf: AlignedBuf,
        ahead: bool,
    ) -> Result<ProducedBatch, StepError> {
        let max_ops = match self.opts.cow_op_merge_size {
            Some(n) if n > 0 => u64::from(n),
            _ => u64::MAX,
        };
        if buf.len() < BATCH_BYTES {
            buf.set_len(BATCH_BYTES);
        }
        let mut spans = Vec::new();
        let mut used = 0usize;
        let mut entry = p;
        while entry < self.plan.total() && entry - p < max_ops {
            let (position, op) = self.op_at(entry)?;
            if ahead && op.kind.is_ordered() {
                break;
            }
            let len = usize::try_from(op.num_blocks)
                .ok()
                .and_then(|n| n.checked_mul(BLOCK))
                .unwrap_or(usize::MAX);
            if used.saturating_add(len) > BATCH_BYTES.max(buf.len()) {
                if used > 0 {
                    break;
                }
                // One op larger than a batch (at most 256 KiB in any valid COW).
                buf.set_len(len.min(64 << 20));
                if len > buf.len() {
                    return Err(StepError::Fatal(UserMergeError::Produce {
                        entry,
                        op_index: op.index,
                        block: op.new_block,
                        source: cow_format::ReadError::Overflow { what: "op size" },
                    }));
                }
            }
            let out = &mut buf[used..used + len];
            let produced = match op.kind {
                OpKind::Zero => {
                    out.fill(0);
                    Ok(())
                }
                OpKind::Replace => self.cow.read_op_data(op, out),
                // An ordered op outside the sequence: produced from the source device.
                OpKind::Copy | OpKind::Xor => out
                    .chunks_exact_mut(BLOCK)
                    .zip(op.new_block..)
                    .try_for_each(|(o, b)| self.cow.read_op_block(position, b, &self.source, o)),
            };
            produced.map_err(|source| {
                StepError::Fatal(UserMergeError::Produce {
                    entry,
                    op_index: op.index,
                    block: op.new_block,
                    source,
                })
            })?;
            push_span(&mut spans, op.new_block, used, len);
            used += len;
            entry += 1;
        }
        Ok(ProducedBatch {
            start: p,
            end: entry,
            buf,
            spans,
        })
    }
}
