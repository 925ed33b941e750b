//! The v3 layout: fixed op area, packed data area, resume points
//! (fact sheet §5.2).
//!
//! Region offsets come from [`V3Regions`]. Op record `i` goes to
//! `op_offset(i)`, payloads are packed from `data_offset` in op order, and a
//! REPLACE's `source` is its payload's file offset. The header (with
//! `op_count`) is rewritten at every commit point (label, finalize); this
//! writer syncs ops and payloads *before* rewriting the header, so a crash
//! never leaves a header that counts ops that are not on disk.

use crate::layout::{CowHeaderV3, CowOpV3, ResumePoint, V3Regions, RESUME_POINT_SIZE};

use super::sink::Sink;
use super::WriteError;

/// State of a v3 file being written.
pub(crate) struct V3Layout {
    header: CowHeaderV3,
    regions: V3Regions,
    resume_points: Vec<ResumePoint>,
    next_data_pos: u64,
}

fn layout_err(op_index: u64) -> impl Fn(crate::layout::LayoutError) -> WriteError {
    move |source| WriteError::Layout { op_index, source }
}

impl V3Layout {
    pub(crate) fn new(header: CowHeaderV3) -> Result<Self, WriteError> {
        let regions = header.regions().map_err(layout_err(0))?;
        Ok(Self {
            header,
            regions,
            resume_points: Vec::new(),
            next_data_pos: regions.data_offset,
        })
    }

    /// State for appending to an existing file: `header.op_count` is the
    /// number of ops kept, `next_data_pos` the end of their payloads.
    pub(crate) fn resume(
        header: CowHeaderV3,
        resume_points: Vec<ResumePoint>,
        next_data_pos: u64,
    ) -> Result<Self, WriteError> {
        let regions = header.regions().map_err(layout_err(0))?;
        let mut layout = Self {
            header,
            regions,
            resume_points,
            next_data_pos,
        };
        // At most resume_point_max entries (the caller read no more).
        layout.header.resume_point_count = layout.resume_points.len() as u32;
        Ok(layout)
    }

    /// The header as it will be written.
    pub(crate) fn header(&self) -> &CowHeaderV3 {
        &self.header
    }

    /// Op records written so far.
    pub(crate) fn op_count(&self) -> u64 {
        self.header.op_count
    }

    /// Start of the data area.
    pub(crate) fn data_offset(&self) -> u64 {
        self.regions.data_offset
    }

    /// File offset where the next payload goes.
    pub(crate) fn next_data_pos(&self) -> u64 {
        self.next_data_pos
    }

    /// Fail unless `adding` more records fit in the op area.
    pub(crate) fn reserve(&self, adding: u64) -> Result<(), WriteError> {
        let fits = self
            .header
            .op_count
            .checked_add(adding)
            .is_some_and(|n| n <= self.header.op_count_max);
        if fits {
            Ok(())
        } else {
            Err(WriteError::OpCapacityExceeded {
                op_count: self.header.op_count,
                adding,
                op_count_max: self.header.op_count_max,
            })
        }
    }

    /// Store the merge sequence (only while no op has been written).
    pub(crate) fn set_sequence(
        &mut self,
        sink: &mut Sink,
        blocks: &[u32],
    ) -> Result<(), WriteError> {
        let mut header = self.header;
        header.sequence_data_count = blocks.len() as u64;
        let regions = header.regions().map_err(layout_err(0))?;
        let bytes: Vec<u8> = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
        sink.put(regions.sequence_offset, &bytes)?;
        self.header = header;
        self.regions = regions;
        self.next_data_pos = regions.data_offset;
        Ok(())
    }

    /// Write one op record and its payload. The caller has called [`reserve`](Self::reserve).
    pub(crate) fn write_op(
        &mut self,
        sink: &mut Sink,
        op: CowOpV3,
        payload: &[u8],
    ) -> Result<(), WriteError> {
        let index = self.header.op_count;
        self.reserve(1)?;
        let at = self.regions.op_offset(index).map_err(layout_err(index))?;
        let data_end = self.next_data_pos.checked_add(payload.len() as u64).ok_or(
            WriteError::OffsetOverflow {
                what: "payload",
                op_index: index,
            },
        )?;
        sink.put(at, &op.encode())?;
        sink.put(self.next_data_pos, payload)?;
        self.next_data_pos = data_end;
        self.header.op_count = index + 1;
        Ok(())
    }

    /// Record a resume point for `label` at the current op count: drop points
    /// with labels ≥ `label`, append, keep the newest [`resume_point_max`]
    /// (AOSP's pruning). Unlike AOSP, `resume_point_count` is the number of
    /// valid entries, never more than the maximum (fact sheet §5.2.4 [REC]).
    pub(crate) fn add_resume_point(&mut self, label: u64) {
        self.resume_points.retain(|p| p.label < label);
        self.resume_points.push(ResumePoint {
            label,
            op_index: self.header.op_count,
        });
        let max = self.header.resume_point_max as usize;
        if self.resume_points.len() > max {
            let excess = self.resume_points.len() - max;
            self.resume_points.drain(..excess);
        }
        // At most 4 entries.
        self.header.resume_point_count = self.resume_points.len() as u32;
    }

    /// Commit: make ops and payloads durable, then write the resume buffer and
    /// the header, then sync again.
    pub(crate) fn commit(&mut self, sink: &mut Sink) -> Result<(), WriteError> {
        sink.sync()?;
        let mut points = Vec::with_capacity(self.resume_points.len() * RESUME_POINT_SIZE);
        for p in &self.resume_points {
            points.extend_from_slice(&p.encode());
        }
        sink.put(self.regions.resume_offset, &points)?;
        sink.put(0, &self.header.encode())?;
        sink.sync()
    }
}
