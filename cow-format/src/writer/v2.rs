//! The v2 op stream: op records, clusters, the footer (fact sheet §5.1).
//!
//! Positions follow AOSP's writer exactly, so a file written with the same
//! calls is byte-identical to AOSP's (the `cow_v2` golden test checks this):
//!
//! * clustered (C ≥ 2): a cluster is C op slots followed by the payloads of
//!   its ops. After each op, if fewer than two slots remain, a CLUSTER op
//!   closes the cluster; its `source` is the distance from the end of that
//!   record to the next cluster (`data + C·20 − used − 20`).
//! * unclustered (C = 0): every record is followed by its payload.
//! * finalize: zero the unused slots of the current cluster; if the cluster
//!   has payloads, close it with a CLUSTER op so the footer starts a new one;
//!   write the 84-byte footer; truncate a regular file after it.

use crate::layout::{op_type, CowFooterV2, CowOpV2, V2_FOOTER_SIZE, V2_OP_SIZE};

use super::sink::Sink;
use super::WriteError;

const OP: u64 = V2_OP_SIZE as u64;

/// Running positions of a v2 file being written.
pub(crate) struct V2Stream {
    /// Op slots per cluster (0 = unclustered).
    cluster_ops: u64,
    /// `cluster_ops * 20`.
    cluster_bytes: u64,
    next_op_pos: u64,
    next_data_pos: u64,
    /// Bytes of op records in the current cluster.
    current_cluster_size: u64,
    /// Payload bytes in the current cluster.
    current_data_size: u64,
    /// Op records written (the footer's `num_ops`).
    num_ops: u64,
}

fn overflow(what: &'static str, op_index: u64) -> WriteError {
    WriteError::OffsetOverflow { what, op_index }
}

impl V2Stream {
    /// Start the op stream at `ops_start` (= header_size + buffer_size).
    pub(crate) fn new(ops_start: u64, cluster_ops: u32) -> Result<Self, WriteError> {
        let cluster_ops = u64::from(cluster_ops);
        let cluster_bytes = cluster_ops * OP;
        let first_data = if cluster_ops == 0 { OP } else { cluster_bytes };
        Ok(Self {
            cluster_ops,
            cluster_bytes,
            next_op_pos: ops_start,
            next_data_pos: ops_start
                .checked_add(first_data)
                .ok_or(overflow("first cluster", 0))?,
            current_cluster_size: 0,
            current_data_size: 0,
            num_ops: 0,
        })
    }

    /// Op records written so far (CLUSTER, LABEL, SEQUENCE included).
    pub(crate) fn num_ops(&self) -> u64 {
        self.num_ops
    }

    /// File offset where the next payload will go (a REPLACE's `source`).
    pub(crate) fn next_data_pos(&self) -> u64 {
        self.next_data_pos
    }

    /// Positions after writing `op`, without changing state.
    fn advance(&self, op: &CowOpV2) -> Result<(u64, u64), WriteError> {
        let dl = u64::from(op.data_length);
        let idx = self.num_ops;
        let is_cluster = op.op_type == op_type::CLUSTER;
        let op_skip = if is_cluster {
            op.source
        } else if self.cluster_ops == 0
            && (op.op_type == op_type::REPLACE || op.op_type == op_type::XOR)
        {
            dl
        } else {
            0
        };
        let data_skip = if is_cluster {
            self.cluster_bytes
        } else if self.cluster_ops == 0 {
            OP
        } else {
            0
        };
        let op_pos = self
            .next_op_pos
            .checked_add(OP)
            .and_then(|p| p.checked_add(op_skip))
            .ok_or(overflow("op record", idx))?;
        let data_pos = self
            .next_data_pos
            .checked_add(dl)
            .and_then(|p| p.checked_add(data_skip))
            .ok_or(overflow("payload", idx))?;
        Ok((op_pos, data_pos))
    }

    /// Write one op record and its payload, then close the cluster if needed.
    pub(crate) fn write_op(
        &mut self,
        sink: &mut Sink,
        op: CowOpV2,
        payload: &[u8],
    ) -> Result<(), WriteError> {
        self.write_record(sink, op, payload)?;
        if self.cluster_ops != 0 && self.cluster_bytes < self.current_cluster_size + 2 * OP {
            self.emit_cluster(sink)?;
        }
        Ok(())
    }

    /// Position of the next op record.
    pub(crate) fn next_op_pos(&self) -> u64 {
        self.next_op_pos
    }

    /// Account for a record that is already in the file (append mode),
    /// exactly as if it had just been written.
    pub(crate) fn replay(&mut self, op: &CowOpV2) -> Result<(), WriteError> {
        let (op_pos, data_pos) = self.advance(op)?;
        self.account(op, op_pos, data_pos);
        if self.cluster_ops != 0 && self.current_cluster_size + OP > self.cluster_bytes {
            // A well-formed cluster always ends with a CLUSTER op in its last slot.
            return Err(overflow("cluster without CLUSTER op", self.num_ops));
        }
        Ok(())
    }

    /// After replaying up to a label: close the cluster if it has no room
    /// left (as AOSP's OpenForAppend does).
    pub(crate) fn close_cluster_if_full(&mut self, sink: &mut Sink) -> Result<(), WriteError> {
        if self.cluster_ops != 0 && self.cluster_bytes < self.current_cluster_size + 2 * OP {
            self.emit_cluster(sink)?;
        }
        Ok(())
    }

    fn write_record(
        &mut self,
        sink: &mut Sink,
        op: CowOpV2,
        payload: &[u8],
    ) -> Result<(), WriteError> {
        let (op_pos, data_pos) = self.advance(&op)?;
        sink.put(self.next_op_pos, &op.encode())?;
        sink.put(self.next_data_pos, payload)?;
        self.account(&op, op_pos, data_pos);
        Ok(())
    }

    fn account(&mut self, op: &CowOpV2, op_pos: u64, data_pos: u64) {
        self.num_ops += 1;
        self.next_op_pos = op_pos;
        self.next_data_pos = data_pos;
        if self.cluster_ops != 0 {
            if op.op_type == op_type::CLUSTER {
                self.current_cluster_size = 0;
                self.current_data_size = 0;
            } else {
                self.current_cluster_size += OP;
                self.current_data_size += u64::from(op.data_length);
            }
        }
    }

    fn emit_cluster(&mut self, sink: &mut Sink) -> Result<(), WriteError> {
        // current_cluster_size ≤ cluster_bytes − 20 whenever a cluster is emitted.
        let source = (self.current_data_size + self.cluster_bytes)
            .checked_sub(self.current_cluster_size + OP)
            .ok_or(overflow("cluster skip", self.num_ops))?;
        let op = CowOpV2 {
            op_type: op_type::CLUSTER,
            source,
            ..CowOpV2::default()
        };
        self.write_record(sink, op, &[])
    }

    /// Close the stream with the footer. Returns the end offset of the footer.
    /// Truncation is the caller's job.
    pub(crate) fn finish(&mut self, sink: &mut Sink) -> Result<u64, WriteError> {
        let mut unused = 0;
        if self.cluster_ops != 0 {
            unused = self.cluster_bytes.saturating_sub(self.current_cluster_size);
            if self.current_data_size > 0 {
                // The CLUSTER op takes the first unused slot; zero the rest.
                let slot = self.next_op_pos;
                self.emit_cluster(sink)?;
                sink.put_zeros(slot + OP, unused.saturating_sub(OP))?;
                unused = 0;
            }
        }
        let footer = CowFooterV2::new(self.num_ops).map_err(|source| WriteError::Layout {
            op_index: self.num_ops,
            source,
        })?;
        let pos = self.next_op_pos;
        sink.put(pos, &footer.encode())?;
        let end = pos
            .checked_add(V2_FOOTER_SIZE as u64)
            .ok_or(overflow("footer", self.num_ops))?;
        // Unused slots beyond the footer's 84 bytes are zeroed, as AOSP does.
        if unused > V2_FOOTER_SIZE as u64 {
            sink.put_zeros(end, unused - V2_FOOTER_SIZE as u64)?;
        }
        Ok(end)
    }
}
