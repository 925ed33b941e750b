//! `ota-tools payload inspect`: header, manifest summary and signatures, as
//! text or JSON.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use super::proto::{merge_type, op_type, PartitionInfo, PartitionUpdate};
use super::reader::Payload;

/// Size and hash of a partition image, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// Bytes.
    pub size: Option<u64>,
    /// SHA-256, hex.
    pub sha256: Option<String>,
}

/// Operation statistics of one type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpStats {
    /// Operations.
    pub count: u64,
    /// Blob bytes.
    pub data_bytes: u64,
    /// Destination blocks.
    pub dst_blocks: u64,
}

/// One partition's summary.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    /// Name.
    pub name: String,
    /// Old image (incremental payloads).
    pub old: Option<ImageInfo>,
    /// New image.
    pub new: Option<ImageInfo>,
    /// Operations by type name.
    pub operations: BTreeMap<String, OpStats>,
    /// Merge operations by type name (count).
    pub merge_operations: BTreeMap<String, u64>,
    /// Blocks covered by merge operations.
    pub merge_blocks: u64,
    /// `estimate_cow_size`.
    pub estimate_cow_size: Option<u64>,
    /// `estimate_op_count_max`.
    pub estimate_op_count_max: Option<u64>,
    /// Hash tree: `start+len` of the extent, algorithm.
    pub hash_tree: Option<String>,
    /// FEC: `start+len` of the extent, roots.
    pub fec: Option<String>,
    /// `version`.
    pub version: Option<String>,
}

/// Dynamic partition metadata summary.
#[derive(Debug, Clone, Serialize)]
pub struct DynamicReport {
    /// Groups: name, size, partitions.
    pub groups: Vec<(String, Option<u64>, Vec<String>)>,
    /// `snapshot_enabled`.
    pub snapshot_enabled: Option<bool>,
    /// `vabc_enabled`.
    pub vabc_enabled: Option<bool>,
    /// `vabc_compression_param`.
    pub vabc_compression_param: Option<String>,
    /// `cow_version`.
    pub cow_version: Option<u32>,
    /// `vabc_feature_set.threaded`.
    pub threaded: Option<bool>,
    /// `vabc_feature_set.batch_writes`.
    pub batch_writes: Option<bool>,
    /// `compression_factor`.
    pub compression_factor: Option<u64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct PayloadReport {
    /// File size.
    pub file_size: u64,
    /// Major version.
    pub major_version: u64,
    /// Manifest bytes.
    pub manifest_size: u64,
    /// Metadata signature bytes.
    pub metadata_signature_size: u32,
    /// Block size.
    pub block_size: u32,
    /// Minor version (0: full payload).
    pub minor_version: u32,
    /// Full (no source needed) or incremental.
    pub kind: &'static str,
    /// `max_timestamp`.
    pub max_timestamp: Option<i64>,
    /// `partial_update`.
    pub partial_update: Option<bool>,
    /// Metadata signatures present (count).
    pub metadata_signatures: usize,
    /// Payload signatures present (count).
    pub payload_signatures: usize,
    /// Partitions.
    pub partitions: Vec<PartitionReport>,
    /// Dynamic partition metadata.
    pub dynamic_partition_metadata: Option<DynamicReport>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn image(i: &Option<PartitionInfo>) -> Option<ImageInfo> {
    i.as_ref().map(|i| ImageInfo {
        size: i.size,
        sha256: i.hash.as_deref().map(hex),
    })
}

fn partition(p: &PartitionUpdate) -> PartitionReport {
    let mut operations: BTreeMap<String, OpStats> = BTreeMap::new();
    for op in &p.operations {
        let s = operations
            .entry(op_type::name(op.r#type).to_string())
            .or_default();
        s.count += 1;
        s.data_bytes = s.data_bytes.saturating_add(op.data_length.unwrap_or(0));
        s.dst_blocks = op
            .dst_extents
            .iter()
            .fold(s.dst_blocks, |a, e| a.saturating_add(e.len()));
    }
    let mut merge_operations: BTreeMap<String, u64> = BTreeMap::new();
    let mut merge_blocks = 0u64;
    for m in &p.merge_operations {
        *merge_operations
            .entry(merge_type::name(m.r#type.unwrap_or(0)).to_string())
            .or_default() += 1;
        merge_blocks = merge_blocks.saturating_add(m.dst_extent.map_or(0, |e| e.len()));
    }
    PartitionReport {
        name: p.partition_name.clone(),
        old: image(&p.old_partition_info),
        new: image(&p.new_partition_info),
        operations,
        merge_operations,
        merge_blocks,
        estimate_cow_size: p.estimate_cow_size,
        estimate_op_count_max: p.estimate_op_count_max,
        hash_tree: p.hash_tree_extent.filter(|e| !e.is_empty()).map(|e| {
            format!(
                "{}+{} ({})",
                e.start(),
                e.len(),
                p.hash_tree_algorithm.as_deref().unwrap_or("sha256")
            )
        }),
        fec: p.fec_extent.filter(|e| !e.is_empty()).map(|e| {
            format!(
                "{}+{} (roots {})",
                e.start(),
                e.len(),
                p.fec_roots.unwrap_or(2)
            )
        }),
        version: p.version.clone(),
    }
}

/// Build the report of an open payload.
pub fn report(payload: &Payload) -> PayloadReport {
    let m = &payload.manifest;
    let minor = m.minor_version.unwrap_or(0);
    PayloadReport {
        file_size: payload.file_size(),
        major_version: payload.major_version,
        manifest_size: payload.manifest_size,
        metadata_signature_size: payload.metadata_signature_size,
        block_size: payload.block_size(),
        minor_version: minor,
        kind: if minor == 0 { "full" } else { "incremental" },
        max_timestamp: m.max_timestamp,
        partial_update: m.partial_update,
        metadata_signatures: payload
            .metadata_signatures
            .as_ref()
            .map_or(0, |s| s.signatures.len()),
        payload_signatures: payload
            .payload_signatures()
            .map_or(0, |s| s.signatures.len()),
        partitions: m.partitions.iter().map(partition).collect(),
        dynamic_partition_metadata: m
            .dynamic_partition_metadata
            .as_ref()
            .map(|d| DynamicReport {
                groups: d
                    .groups
                    .iter()
                    .map(|g| (g.name.clone(), g.size, g.partition_names.clone()))
                    .collect(),
                snapshot_enabled: d.snapshot_enabled,
                vabc_enabled: d.vabc_enabled,
                vabc_compression_param: d.vabc_compression_param.clone(),
                cow_version: d.cow_version,
                threaded: d.vabc_feature_set.as_ref().and_then(|f| f.threaded),
                batch_writes: d.vabc_feature_set.as_ref().and_then(|f| f.batch_writes),
                compression_factor: d.compression_factor,
            }),
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |v| v.to_string())
}

impl PayloadReport {
    /// Write the report as pretty JSON.
    pub fn write_json(&self, out: &mut dyn Write) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        writeln!(out)
    }

    /// Write the report as text.
    pub fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "payload: {} bytes, major version {}, manifest {} bytes, metadata signature {} bytes",
            self.file_size, self.major_version, self.manifest_size, self.metadata_signature_size
        )?;
        writeln!(
            out,
            "{} payload, minor version {}, block size {}, max_timestamp {}, partial_update {}",
            self.kind,
            self.minor_version,
            self.block_size,
            opt(&self.max_timestamp),
            opt(&self.partial_update)
        )?;
        writeln!(
            out,
            "signatures: metadata {}, payload {}",
            if self.metadata_signatures > 0 {
                "present"
            } else {
                "absent"
            },
            if self.payload_signatures > 0 {
                "present"
            } else {
                "absent"
            }
        )?;
        for p in &self.partitions {
            writeln!(out, "partition {}:", p.name)?;
            for (what, i) in [("old", &p.old), ("new", &p.new)] {
                if let Some(i) = i {
                    writeln!(
                        out,
                        "  {what}: {} bytes, sha256 {}",
                        opt(&i.size),
                        opt(&i.sha256)
                    )?;
                }
            }
            for (name, s) in &p.operations {
                writeln!(
                    out,
                    "  {name:<17} {:>7} ops {:>12} data bytes {:>9} blocks",
                    s.count, s.data_bytes, s.dst_blocks
                )?;
            }
            if !p.merge_operations.is_empty() {
                let list: Vec<String> = p
                    .merge_operations
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                writeln!(
                    out,
                    "  merge operations: {} ({} blocks)",
                    list.join(", "),
                    p.merge_blocks
                )?;
            }
            writeln!(
                out,
                "  estimate_cow_size {}, estimate_op_count_max {}",
                opt(&p.estimate_cow_size),
                opt(&p.estimate_op_count_max)
            )?;
            if let Some(h) = &p.hash_tree {
                writeln!(out, "  hash tree {h}")?;
            }
            if let Some(f) = &p.fec {
                writeln!(out, "  fec {f}")?;
            }
        }
        if let Some(d) = &self.dynamic_partition_metadata {
            writeln!(out, "dynamic partition metadata:")?;
            for (name, size, parts) in &d.groups {
                writeln!(
                    out,
                    "  group {name}: size {}, partitions {}",
                    opt(size),
                    parts.join(", ")
                )?;
            }
            writeln!(
                out,
                "  snapshot_enabled {}, vabc_enabled {}, vabc_compression_param {}, cow_version {}",
                opt(&d.snapshot_enabled),
                opt(&d.vabc_enabled),
                opt(&d.vabc_compression_param),
                opt(&d.cow_version)
            )?;
            writeln!(
                out,
                "  vabc_feature_set threaded {} batch_writes {}, compression_factor {}",
                opt(&d.threaded),
                opt(&d.batch_writes),
                opt(&d.compression_factor)
            )?;
        }
        Ok(())
    }
}
