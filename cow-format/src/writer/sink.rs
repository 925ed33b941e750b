//! The output file with a small write-back buffer.
//!
//! The writers place records and payloads at computed offsets. Consecutive
//! placements usually continue one another (op records of a cluster, payloads
//! of a data region, and for unclustered v2 op + payload + op …), so the sink
//! keeps a few contiguous segments in memory, grows them while writes stay
//! contiguous and merges segments that come to touch. It issues one positioned
//! write per segment when the buffer is full or on [`Sink::flush`]. Writes
//! must never overlap one another; the writers guarantee that.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::WriteError;

/// Bytes buffered before the sink writes them out.
const FLUSH_BYTES: usize = 8 << 20;
/// Segments kept before the sink writes them out.
const MAX_SEGMENTS: usize = 8;

struct Segment {
    offset: u64,
    data: Vec<u8>,
}

impl Segment {
    fn end(&self) -> u64 {
        // Segments are built from checked offsets and in-memory lengths.
        self.offset.saturating_add(self.data.len() as u64)
    }
}

/// The output file plus its pending writes.
pub(crate) struct Sink {
    file: File,
    segments: Vec<Segment>,
    buffered: usize,
    /// Highest end offset written so far (the size a fresh file will have).
    high_water: u64,
    /// Whether `sync` reaches the disk (fsync) or only flushes.
    durable: bool,
}

impl Sink {
    pub(crate) fn new(file: File) -> Self {
        Self {
            file,
            segments: Vec::new(),
            buffered: 0,
            high_water: 0,
            durable: true,
        }
    }

    /// Make `sync` fsync (the default) or only flush.
    pub(crate) fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Whether the output is a regular file (which may be truncated).
    pub(crate) fn is_regular_file(&self) -> Result<bool, WriteError> {
        let meta = self.file.metadata().map_err(|source| WriteError::Io {
            what: "reading output file metadata",
            offset: 0,
            source,
        })?;
        Ok(meta.file_type().is_file())
    }

    /// Truncate or extend a regular file to `len` bytes.
    pub(crate) fn set_len(&mut self, len: u64) -> Result<(), WriteError> {
        self.flush()?;
        self.file.set_len(len).map_err(|source| WriteError::Io {
            what: "setting the output file length",
            offset: len,
            source,
        })?;
        self.high_water = len;
        Ok(())
    }

    /// Take the file's current length as already written (append mode), so
    /// that nothing treats the existing content as missing.
    pub(crate) fn note_existing(&mut self) -> Result<(), WriteError> {
        use std::io::{Seek, SeekFrom};
        let mut f = &self.file;
        let len = f.seek(SeekFrom::End(0)).map_err(|source| WriteError::Io {
            what: "sizing the output file",
            offset: 0,
            source,
        })?;
        self.high_water = self.high_water.max(len);
        Ok(())
    }

    /// Highest byte offset written (or buffered) so far.
    pub(crate) fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Place `bytes` at `offset`.
    pub(crate) fn put(&mut self, offset: u64, bytes: &[u8]) -> Result<(), WriteError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(bytes.len() as u64)
            .ok_or(WriteError::OffsetOverflow {
                what: "buffered write",
                op_index: 0,
            })?;
        self.high_water = self.high_water.max(end);
        let index = match self.segments.iter().position(|s| s.end() == offset) {
            Some(i) => {
                self.segments[i].data.extend_from_slice(bytes);
                i
            }
            None => {
                self.segments.push(Segment {
                    offset,
                    data: bytes.to_vec(),
                });
                self.segments.len() - 1
            }
        };
        self.buffered += bytes.len();
        // Merge a segment that starts where this one now ends.
        let grown_end = self.segments[index].end();
        if let Some(j) = self.segments.iter().position(|s| s.offset == grown_end) {
            let next = self.segments.swap_remove(j);
            // swap_remove may have moved our segment into slot j.
            let index = if index == self.segments.len() {
                j
            } else {
                index
            };
            self.segments[index].data.extend_from_slice(&next.data);
        }
        if self.buffered >= FLUSH_BYTES || self.segments.len() > MAX_SEGMENTS {
            self.flush()?;
        }
        Ok(())
    }

    /// Write `len` zero bytes at `offset` (in bounded pieces).
    pub(crate) fn put_zeros(&mut self, offset: u64, len: u64) -> Result<(), WriteError> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min(len - done);
            let at = offset.checked_add(done).ok_or(WriteError::OffsetOverflow {
                what: "zero fill",
                op_index: 0,
            })?;
            // n ≤ CHUNK, which fits in usize.
            self.put(at, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Write out every pending segment.
    pub(crate) fn flush(&mut self) -> Result<(), WriteError> {
        for seg in self.segments.drain(..) {
            self.file
                .write_all_at(&seg.data, seg.offset)
                .map_err(|source| WriteError::Io {
                    what: "writing",
                    offset: seg.offset,
                    source,
                })?;
        }
        self.buffered = 0;
        Ok(())
    }

    /// Flush, then make everything written so far durable.
    pub(crate) fn sync(&mut self) -> Result<(), WriteError> {
        self.flush()?;
        if !self.durable {
            return Ok(());
        }
        self.file.sync_all().map_err(|source| WriteError::Io {
            what: "syncing",
            offset: 0,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn contents(sink: Sink) -> Vec<u8> {
        let mut f = sink.file;
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn segments_coalesce_and_land_at_their_offsets() {
        let file = tempfile::tempfile().unwrap();
        let mut s = Sink::new(file);
        s.put(10, b"cd").unwrap();
        s.put(0, b"ab").unwrap();
        s.put(12, b"ef").unwrap(); // extends the first segment
        s.put(2, b"XXXXXXXX").unwrap(); // joins [0,2) to [10,14)
        assert_eq!(s.segments.len(), 1);
        assert_eq!(s.high_water(), 14);
        s.put_zeros(20, 3).unwrap();
        s.flush().unwrap();
        let v = contents(s);
        assert_eq!(&v[..14], b"abXXXXXXXXcdef");
        assert_eq!(&v[14..], &[0u8; 9]);
    }
}
