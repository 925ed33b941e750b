//! [`BlockSource`] on a COW file: the planned op names its COW op
//! ([`PlannedOp::cow_op`]) and [`CowReader::read_op_block`], the format's one block
//! producer, makes the bytes (REPLACE decoded, multi-block ops decoded once per thread and
//! sliced; ZERO; COPY and XOR from `source`).
//!
//! `source` is what the core passes: the source device, or a merge window's saved bytes.

use std::io;

use cow_format::{CowReader, CowStorage, ReadError};
use thiserror::Error;

use crate::snapshot::block_server::BlockSource;
use crate::snapshot::merge_plan::{PlannedOp, SourceDevice};

/// A block of a planned op could not be produced.
#[derive(Debug, Error)]
#[error("merge-order op {op_index} (block {new_block}, COW op position {cow_op})")]
pub struct OpBlockError {
    /// Position in the merge plan.
    pub op_index: usize,
    /// Block being produced.
    pub new_block: u64,
    /// Position of the COW op in `CowReader::ops`.
    pub cow_op: u32,
    /// What the producer found.
    #[source]
    pub source: ReadError,
}

impl From<OpBlockError> for io::Error {
    /// Keeps the kind of an underlying I/O error (a short source read stays
    /// `UnexpectedEof`); everything else is `InvalidData`.
    fn from(e: OpBlockError) -> Self {
        let kind = match &e.source {
            ReadError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// Produces op blocks from a COW file through a [`CowReader`].
#[derive(Debug)]
pub struct CowBlockSource<S: CowStorage> {
    reader: CowReader<S>,
}

impl<S: CowStorage> CowBlockSource<S> {
    /// Serve the ops of a plan built from `reader` (`super::plan::CowMergePlan`).
    pub fn new(reader: CowReader<S>) -> Self {
        CowBlockSource { reader }
    }

    /// The reader.
    pub fn reader(&self) -> &CowReader<S> {
        &self.reader
    }
}

impl<S: CowStorage> BlockSource for CowBlockSource<S> {
    fn read_op_block(
        &self,
        op_index: usize,
        op: &PlannedOp,
        source: &dyn SourceDevice,
        out: &mut [u8],
    ) -> io::Result<()> {
        self.reader
            .read_op_block(op.cow_op as usize, op.new_block, source, out)
            .map_err(|e| {
                OpBlockError {
                    op_index,
                    new_block: op.new_block,
                    cow_op: op.cow_op,
                    source: e,
                }
                .into()
            })
    }
}
