//! `ota-tools inspect`: describe a COW file's header and ops.
//!
//! [`inspect`] builds a [`Report`] (serialisable with serde for `--json`);
//! [`Report::write_text`] renders it for people: the header as `key: value`
//! lines, then one line per op.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use cow_format::reader::{CowHeader, CowReader, MergeMode, MergeOrderOptions, ReadError};
use cow_format::{CowOp, CowVersion};
use serde::Serialize;
use thiserror::Error;

/// Errors of `inspect`.
#[derive(Debug, Error)]
pub enum InspectError {
    /// The COW file cannot be opened.
    #[error("{}: cannot open", path.display())]
    Open {
        /// Path given.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The COW file is invalid.
    #[error("{}", path.display())]
    Cow {
        /// Path given.
        path: PathBuf,
        /// What the reader found.
        #[source]
        source: ReadError,
    },
    /// Writing the report failed.
    #[error("writing the report")]
    Output(#[source] io::Error),
}

/// Which order to list ops in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpOrder {
    /// File order.
    #[default]
    File,
    /// Merge order (snapuserd's: ordered ops, then the others by ascending block).
    Merge,
}

/// The header fields, as stored, plus the v3 extras when present.
#[derive(Debug, Clone, Serialize)]
pub struct HeaderReport {
    /// "2" or "3" (v1 files report major 1 and are read as v2).
    pub major_version: u16,
    /// Always 0.
    pub minor_version: u16,
    /// Header size on disk.
    pub header_size: u16,
    /// 84 (v2) or 0 (v3).
    pub footer_size: u16,
    /// 20 (v2) or 16 (v3).
    pub op_size: u16,
    /// Bytes per block.
    pub block_size: u32,
    /// v2 op slots per cluster.
    pub cluster_ops: u32,
    /// Merge progress counter.
    pub num_merge_ops: u64,
    /// Scratch region size.
    pub buffer_size: u32,
    /// v3: sequence entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence_data_count: Option<u64>,
    /// v3: resume points claimed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_point_count: Option<u32>,
    /// v3: resume buffer capacity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_point_max: Option<u32>,
    /// v3: committed op records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_count: Option<u64>,
    /// v3: op area capacity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_count_max: Option<u64>,
    /// v3: compression algorithm id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_algorithm: Option<u32>,
    /// v3: compression factor in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_compression_size: Option<u32>,
}

/// Facts derived from the whole file.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// "v2" or "v3".
    pub version: &'static str,
    /// File size in bytes.
    pub file_size: u64,
    /// Compression algorithm of the payloads.
    pub compression: &'static str,
    /// Op records read (v2 includes LABEL/CLUSTER/SEQUENCE).
    pub records: u64,
    /// Data ops (COPY/REPLACE/ZERO/XOR).
    pub data_ops: u64,
    /// Merge sequence entries.
    pub sequence_entries: u64,
    /// Entries of the merge order (AOSP num_total_data_ops).
    pub merge_ops_total: u64,
    /// Merge-order entries already merged (`num_merge_ops`).
    pub merged: u64,
    /// Ordered ops (COPY/XOR part) still to merge.
    pub ordered_ops_to_merge: u64,
    /// v2: the last label (full 64 bits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_label: Option<u64>,
    /// v3: resume points `(label, op_index)`.
    pub resume_points: Vec<(u64, u64)>,
    /// Which merge mode the progress (`num_merge_ops > 0`) belongs to; absent when
    /// nothing is merged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_progress: Option<MergeProgressReport>,
}

/// What `num_merge_ops` means under each merge mode. The two modes share the ordered
/// (COPY/XOR) part of the merge order and walk the REPLACE/ZERO part in opposite block
/// orders, so a counter that reaches into that part names different blocks in each.
#[derive(Debug, Clone, Serialize)]
pub struct MergeProgressReport {
    /// The counter read.
    pub num_merge_ops: u64,
    /// `same` (both modes name the same merged blocks), `ambiguous` (both are possible
    /// and they differ: the COW alone cannot tell which mode merged it) or `neither` (the
    /// counter is past the end of the merge order).
    pub verdict: &'static str,
    /// One reading per mode.
    pub readings: Vec<ModeReading>,
}

/// The progress read in one merge mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReading {
    /// `user` or `legacy`.
    pub mode: &'static str,
    /// Whether the counter fits this mode's merge order.
    pub consistent: bool,
    /// The blocks merged under this reading, as `(first, count)` ranges, ascending.
    pub merged_blocks: Vec<(u64, u64)>,
}

/// Reads `num_merge_ops` in both merge modes.
fn merge_progress<S: cow_format::reader::CowStorage>(
    reader: &CowReader<S>,
) -> Option<MergeProgressReport> {
    let merged = reader.num_merge_ops();
    if merged == 0 {
        return None;
    }
    let total = reader.num_total_data_ops();
    let consistent = merged <= total;
    let take = usize::try_from(merged.min(total)).unwrap_or(usize::MAX);
    let readings: Vec<ModeReading> = MergeMode::ALL
        .iter()
        .map(|&mode| {
            let mut blocks: Vec<(u64, u64)> = reader
                .merge_order(mode.order_options(false))
                .take(take)
                .map(|op| (op.new_block, op.num_blocks))
                .collect();
            blocks.sort_unstable();
            ModeReading {
                mode: mode.name(),
                consistent,
                merged_blocks: coalesce(blocks),
            }
        })
        .collect();
    let verdict = if !consistent {
        "neither"
    } else if readings
        .windows(2)
        .all(|w| w[0].merged_blocks == w[1].merged_blocks)
    {
        "same"
    } else {
        "ambiguous"
    };
    Some(MergeProgressReport {
        num_merge_ops: merged,
        verdict,
        readings,
    })
}

/// Joins sorted `(first, count)` ranges that touch or overlap.
fn coalesce(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (first, count) in sorted {
        if let Some(last) = out.last_mut() {
            let end = last.0.saturating_add(last.1);
            if first <= end {
                last.1 = last
                    .1
                    .max(first.saturating_add(count).saturating_sub(last.0));
                continue;
            }
        }
        out.push((first, count));
    }
    out
}

/// One op line.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    /// Position in the listing's order (merge position for `--merge-order`).
    pub position: u64,
    /// File-order record index.
    pub index: u64,
    /// COPY, REPLACE, ZERO or XOR.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// First new block.
    pub new_block: u64,
    /// Blocks covered.
    pub num_blocks: u64,
    /// COPY: source block; XOR: source byte offset; REPLACE: payload offset.
    pub source: u64,
    /// Payload algorithm ("none" for ops without payload).
    pub compression: &'static str,
    /// Payload stored uncompressed.
    pub stored_raw: bool,
    /// Stored payload bytes.
    pub data_length: u32,
    /// Payload file offset (0 without payload).
    pub data_offset: u64,
    /// Merge order only: already merged according to `num_merge_ops`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged: Option<bool>,
}

/// Everything `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Path inspected.
    pub path: String,
    /// Header fields.
    pub header: HeaderReport,
    /// Derived facts.
    pub summary: Summary,
    /// "file" or "merge".
    pub order: &'static str,
    /// The ops.
    pub ops: Vec<OpReport>,
}

fn header_report(h: &CowHeader) -> HeaderReport {
    let b = h.base();
    let mut r = HeaderReport {
        major_version: b.major_version,
        minor_version: b.minor_version,
        header_size: b.header_size,
        footer_size: b.footer_size,
        op_size: b.op_size,
        block_size: b.block_size,
        cluster_ops: b.cluster_ops,
        num_merge_ops: b.num_merge_ops,
        buffer_size: h.buffer_size(),
        sequence_data_count: None,
        resume_point_count: None,
        resume_point_max: None,
        op_count: None,
        op_count_max: None,
        compression_algorithm: None,
        max_compression_size: None,
    };
    if let CowHeader::V3(v3) = h {
        r.sequence_data_count = Some(v3.sequence_data_count);
        r.resume_point_count = Some(v3.resume_point_count);
        r.resume_point_max = Some(v3.resume_point_max);
        r.op_count = Some(v3.op_count);
        r.op_count_max = Some(v3.op_count_max);
        r.compression_algorithm = Some(v3.compression_algorithm);
        r.max_compression_size = Some(v3.max_compression_size);
    }
    r
}

fn op_report(position: u64, op: &CowOp, merged: Option<bool>) -> OpReport {
    OpReport {
        position,
        index: op.index,
        kind: op.kind.name(),
        new_block: op.new_block,
        num_blocks: op.num_blocks,
        source: op.source,
        compression: if op.kind.has_payload() {
            op.compression.name()
        } else {
            "none"
        },
        stored_raw: op.stored_raw,
        data_length: op.data_length,
        data_offset: op.data_offset,
        merged,
    }
}

/// Build the report for an open reader.
pub fn report<S: cow_format::reader::CowStorage>(
    path: &Path,
    reader: &CowReader<S>,
    order: OpOrder,
) -> Report {
    let merged = reader.num_merge_ops();
    let summary = Summary {
        version: match reader.version() {
            CowVersion::V2 => "v2",
            CowVersion::V3 => "v3",
        },
        file_size: reader.file_size(),
        compression: reader.compression().name(),
        records: reader.record_count(),
        data_ops: reader.ops().len() as u64,
        sequence_entries: reader.sequence().len() as u64,
        merge_ops_total: reader.num_total_data_ops(),
        merged,
        ordered_ops_to_merge: reader.num_ordered_ops_to_merge(),
        last_label: reader.last_label(),
        resume_points: reader
            .resume_points()
            .iter()
            .map(|p| (p.label, p.op_index))
            .collect(),
        merge_progress: merge_progress(reader),
    };
    let ops = match order {
        OpOrder::File => reader
            .ops()
            .iter()
            .enumerate()
            .map(|(i, op)| op_report(i as u64, op, None))
            .collect(),
        OpOrder::Merge => reader
            .merge_order(MergeOrderOptions::default())
            .enumerate()
            .map(|(i, op)| op_report(i as u64, op, Some((i as u64) < merged)))
            .collect(),
    };
    Report {
        path: path.display().to_string(),
        header: header_report(reader.header()),
        summary,
        order: match order {
            OpOrder::File => "file",
            OpOrder::Merge => "merge",
        },
        ops,
    }
}

/// Open `path` and build its report. With `label`, the file is read only up
/// to that label (v2 LABEL op / v3 resume point), as AOSP does when resuming:
/// this works on torn files (e.g. a v2 file without footer).
pub fn inspect(path: &Path, order: OpOrder, label: Option<u64>) -> Result<Report, InspectError> {
    let file = File::open(path).map_err(|source| InspectError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let opened = match label {
        None => CowReader::open(file),
        Some(l) => CowReader::open_at_label(file, l),
    };
    let reader = opened.map_err(|source| InspectError::Cow {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(report(path, &reader, order))
}

impl Report {
    /// Write the report as pretty JSON.
    pub fn write_json(&self, out: &mut dyn Write) -> Result<(), InspectError> {
        // `io::Error::from` keeps the kind of an I/O failure (a closed pipe stays BrokenPipe).
        serde_json::to_writer_pretty(&mut *out, self)
            .map_err(|e| InspectError::Output(io::Error::from(e)))?;
        writeln!(out).map_err(InspectError::Output)
    }

    /// Write the report as text: header lines, summary lines, one line per op.
    pub fn write_text(&self, out: &mut dyn Write) -> Result<(), InspectError> {
        self.text(out).map_err(InspectError::Output)
    }

    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let h = &self.header;
        let s = &self.summary;
        writeln!(out, "file: {}", self.path)?;
        writeln!(out, "version: {}.{}", h.major_version, h.minor_version)?;
        writeln!(out, "header_size: {}", h.header_size)?;
        writeln!(out, "footer_size: {}", h.footer_size)?;
        writeln!(out, "op_size: {}", h.op_size)?;
        writeln!(out, "block_size: {}", h.block_size)?;
        writeln!(out, "cluster_ops: {}", h.cluster_ops)?;
        writeln!(out, "num_merge_ops: {}", h.num_merge_ops)?;
        writeln!(out, "buffer_size: {}", h.buffer_size)?;
        let v3_fields = [
            ("sequence_data_count", h.sequence_data_count),
            ("resume_point_count", h.resume_point_count.map(u64::from)),
            ("resume_point_max", h.resume_point_max.map(u64::from)),
            ("op_count", h.op_count),
            ("op_count_max", h.op_count_max),
            (
                "compression_algorithm",
                h.compression_algorithm.map(u64::from),
            ),
            (
                "max_compression_size",
                h.max_compression_size.map(u64::from),
            ),
        ];
        for (name, value) in v3_fields {
            if let Some(v) = value {
                writeln!(out, "{name}: {v}")?;
            }
        }
        writeln!(out, "file_size: {}", s.file_size)?;
        writeln!(out, "compression: {}", s.compression)?;
        writeln!(out, "records: {}", s.records)?;
        writeln!(out, "data_ops: {}", s.data_ops)?;
        writeln!(out, "sequence_entries: {}", s.sequence_entries)?;
        writeln!(out, "merge_ops_total: {}", s.merge_ops_total)?;
        writeln!(out, "already_merged: {}", s.merged.min(s.merge_ops_total))?;
        writeln!(out, "ordered_ops_to_merge: {}", s.ordered_ops_to_merge)?;
        if let Some(l) = s.last_label {
            writeln!(out, "last_label: {l}")?;
        }
        for (label, op_index) in &s.resume_points {
            writeln!(out, "resume_point: label {label} op_index {op_index}")?;
        }
        if let Some(p) = &s.merge_progress {
            let verdict = match p.verdict {
                "same" => "user-space or legacy merge (the same blocks under either)",
                "ambiguous" => {
                    "user-space or legacy merge (different blocks; the COW alone cannot tell which)"
                }
                _ => "neither mode (num_merge_ops is past the end of the merge order)",
            };
            writeln!(out, "merge_progress: {verdict}")?;
            for r in &p.readings {
                let ranges: Vec<String> = r
                    .merged_blocks
                    .iter()
                    .map(|&(first, count)| match count {
                        1 => first.to_string(),
                        _ => format!("{first}-{}", first.saturating_add(count.saturating_sub(1))),
                    })
                    .collect();
                writeln!(out, "merged_blocks[{}]: {}", r.mode, ranges.join(","))?;
            }
        }
        writeln!(out, "ops ({} order):", self.order)?;
        let merge = self.order == "merge";
        writeln!(
            out,
            "{:>8} {:>8} {:<7} {:>10} {:>6} {:>16} {:<6} {:>3} {:>8}{}",
            "pos",
            "index",
            "type",
            "new_block",
            "blocks",
            "source",
            "comp",
            "raw",
            "data_len",
            if merge { "  merged" } else { "" }
        )?;
        for op in &self.ops {
            writeln!(
                out,
                "{:>8} {:>8} {:<7} {:>10} {:>6} {:>16} {:<6} {:>3} {:>8}{}",
                op.position,
                op.index,
                op.kind,
                op.new_block,
                op.num_blocks,
                op.source,
                if op.data_length == 0 {
                    "-"
                } else {
                    op.compression
                },
                match (op.data_length, op.stored_raw) {
                    (0, _) => "-",
                    (_, true) => "yes",
                    (_, false) => "no",
                },
                op.data_length,
                match op.merged {
                    Some(true) => "  yes",
                    Some(false) => "  no",
                    None => "",
                }
            )?;
        }
        Ok(())
    }
}
