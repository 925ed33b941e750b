//! The payload's protobuf messages (proto2), written by hand with `prost`
//! derives. Field names and numbers are update_engine's interface
//! (`update_metadata.proto`); only the fields this tool reads or writes are
//! declared, unknown fields are skipped by the decoder.
#![allow(missing_docs)] // Field docs would restate the proto field names.

/// A run of blocks. A `start_block` of `u64::MAX` marks a sparse hole.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Extent {
    #[prost(uint64, optional, tag = "1")]
    pub start_block: Option<u64>,
    #[prost(uint64, optional, tag = "2")]
    pub num_blocks: Option<u64>,
}

impl Extent {
    /// An extent of `num_blocks` blocks from `start_block`.
    pub fn new(start_block: u64, num_blocks: u64) -> Self {
        Self {
            start_block: Some(start_block),
            num_blocks: Some(num_blocks),
        }
    }
    /// First block.
    pub fn start(&self) -> u64 {
        self.start_block.unwrap_or(0)
    }
    /// Number of blocks.
    pub fn len(&self) -> u64 {
        self.num_blocks.unwrap_or(0)
    }
    /// True when the extent covers no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One signature blob.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Signature {
    #[prost(uint32, optional, tag = "1")]
    pub version: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub data: Option<Vec<u8>>,
    #[prost(fixed32, optional, tag = "3")]
    pub unpadded_signature_size: Option<u32>,
}

/// The metadata or payload signatures.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Signatures {
    #[prost(message, repeated, tag = "1")]
    pub signatures: Vec<Signature>,
}

/// Size and SHA-256 of a partition image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PartitionInfo {
    #[prost(uint64, optional, tag = "1")]
    pub size: Option<u64>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub hash: Option<Vec<u8>>,
}

/// `InstallOperation.Type` values.
pub mod op_type {
    pub const REPLACE: i32 = 0;
    pub const REPLACE_BZ: i32 = 1;
    pub const MOVE: i32 = 2;
    pub const BSDIFF: i32 = 3;
    pub const SOURCE_COPY: i32 = 4;
    pub const SOURCE_BSDIFF: i32 = 5;
    pub const ZERO: i32 = 6;
    pub const DISCARD: i32 = 7;
    pub const REPLACE_XZ: i32 = 8;
    pub const PUFFDIFF: i32 = 9;
    pub const BROTLI_BSDIFF: i32 = 10;
    pub const ZUCCHINI: i32 = 11;
    pub const LZ4DIFF_BSDIFF: i32 = 12;
    pub const LZ4DIFF_PUFFDIFF: i32 = 13;

    /// update_engine's name of an operation type.
    pub fn name(t: i32) -> &'static str {
        match t {
            REPLACE => "REPLACE",
            REPLACE_BZ => "REPLACE_BZ",
            MOVE => "MOVE",
            BSDIFF => "BSDIFF",
            SOURCE_COPY => "SOURCE_COPY",
            SOURCE_BSDIFF => "SOURCE_BSDIFF",
            ZERO => "ZERO",
            DISCARD => "DISCARD",
            REPLACE_XZ => "REPLACE_XZ",
            PUFFDIFF => "PUFFDIFF",
            BROTLI_BSDIFF => "BROTLI_BSDIFF",
            ZUCCHINI => "ZUCCHINI",
            LZ4DIFF_BSDIFF => "LZ4DIFF_BSDIFF",
            LZ4DIFF_PUFFDIFF => "LZ4DIFF_PUFFDIFF",
            _ => "UNKNOWN",
        }
    }
}

/// One install operation: write `dst_extents` of the new partition.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstallOperation {
    #[prost(int32, required, tag = "1")]
    pub r#type: i32,
    #[prost(uint64, optional, tag = "2")]
    pub data_offset: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub data_length: Option<u64>,
    #[prost(message, repeated, tag = "4")]
    pub src_extents: Vec<Extent>,
    #[prost(uint64, optional, tag = "5")]
    pub src_length: Option<u64>,
    #[prost(message, repeated, tag = "6")]
    pub dst_extents: Vec<Extent>,
    #[prost(uint64, optional, tag = "7")]
    pub dst_length: Option<u64>,
    #[prost(bytes = "vec", optional, tag = "8")]
    pub data_sha256_hash: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "9")]
    pub src_sha256_hash: Option<Vec<u8>>,
}

/// `CowMergeOperation.Type` values.
pub mod merge_type {
    pub const COW_COPY: i32 = 0;
    pub const COW_XOR: i32 = 1;
    pub const COW_REPLACE: i32 = 2;

    /// update_engine's name of a merge operation type.
    pub fn name(t: i32) -> &'static str {
        match t {
            COW_COPY => "COW_COPY",
            COW_XOR => "COW_XOR",
            COW_REPLACE => "COW_REPLACE",
            _ => "UNKNOWN",
        }
    }
}

/// A merge operation: `dst_extent` of the new partition can be built from
/// `src_extent` of the old one (copied, or XORed from `src_offset` bytes in).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CowMergeOperation {
    #[prost(int32, optional, tag = "1")]
    pub r#type: Option<i32>,
    #[prost(message, optional, tag = "2")]
    pub src_extent: Option<Extent>,
    #[prost(message, optional, tag = "3")]
    pub dst_extent: Option<Extent>,
    #[prost(uint32, optional, tag = "4")]
    pub src_offset: Option<u32>,
}

/// Everything needed to update one partition.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PartitionUpdate {
    #[prost(string, required, tag = "1")]
    pub partition_name: String,
    #[prost(bool, optional, tag = "2")]
    pub run_postinstall: Option<bool>,
    #[prost(string, optional, tag = "3")]
    pub postinstall_path: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub filesystem_type: Option<String>,
    #[prost(message, optional, tag = "6")]
    pub old_partition_info: Option<PartitionInfo>,
    #[prost(message, optional, tag = "7")]
    pub new_partition_info: Option<PartitionInfo>,
    #[prost(message, repeated, tag = "8")]
    pub operations: Vec<InstallOperation>,
    #[prost(message, optional, tag = "10")]
    pub hash_tree_data_extent: Option<Extent>,
    #[prost(message, optional, tag = "11")]
    pub hash_tree_extent: Option<Extent>,
    #[prost(string, optional, tag = "12")]
    pub hash_tree_algorithm: Option<String>,
    #[prost(bytes = "vec", optional, tag = "13")]
    pub hash_tree_salt: Option<Vec<u8>>,
    #[prost(message, optional, tag = "14")]
    pub fec_data_extent: Option<Extent>,
    #[prost(message, optional, tag = "15")]
    pub fec_extent: Option<Extent>,
    #[prost(uint32, optional, tag = "16")]
    pub fec_roots: Option<u32>,
    #[prost(string, optional, tag = "17")]
    pub version: Option<String>,
    #[prost(message, repeated, tag = "18")]
    pub merge_operations: Vec<CowMergeOperation>,
    #[prost(uint64, optional, tag = "19")]
    pub estimate_cow_size: Option<u64>,
    #[prost(uint64, optional, tag = "20")]
    pub estimate_op_count_max: Option<u64>,
}

/// A group of dynamic partitions sharing a size budget.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DynamicPartitionGroup {
    #[prost(string, required, tag = "1")]
    pub name: String,
    #[prost(uint64, optional, tag = "2")]
    pub size: Option<u64>,
    #[prost(string, repeated, tag = "3")]
    pub partition_names: Vec<String>,
}

/// Optional Virtual A/B compression features.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VabcFeatureSet {
    #[prost(bool, optional, tag = "1")]
    pub threaded: Option<bool>,
    #[prost(bool, optional, tag = "2")]
    pub batch_writes: Option<bool>,
}

/// Dynamic partition layout and the Virtual A/B compression settings.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DynamicPartitionMetadata {
    #[prost(message, repeated, tag = "1")]
    pub groups: Vec<DynamicPartitionGroup>,
    #[prost(bool, optional, tag = "2")]
    pub snapshot_enabled: Option<bool>,
    #[prost(bool, optional, tag = "3")]
    pub vabc_enabled: Option<bool>,
    #[prost(string, optional, tag = "4")]
    pub vabc_compression_param: Option<String>,
    #[prost(uint32, optional, tag = "5")]
    pub cow_version: Option<u32>,
    #[prost(message, optional, tag = "6")]
    pub vabc_feature_set: Option<VabcFeatureSet>,
    #[prost(uint64, optional, tag = "7")]
    pub compression_factor: Option<u64>,
}

/// The payload's manifest.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaArchiveManifest {
    #[prost(uint32, optional, tag = "3")]
    pub block_size: Option<u32>,
    #[prost(uint64, optional, tag = "4")]
    pub signatures_offset: Option<u64>,
    #[prost(uint64, optional, tag = "5")]
    pub signatures_size: Option<u64>,
    #[prost(uint32, optional, tag = "12")]
    pub minor_version: Option<u32>,
    #[prost(message, repeated, tag = "13")]
    pub partitions: Vec<PartitionUpdate>,
    #[prost(int64, optional, tag = "14")]
    pub max_timestamp: Option<i64>,
    #[prost(message, optional, tag = "15")]
    pub dynamic_partition_metadata: Option<DynamicPartitionMetadata>,
    #[prost(bool, optional, tag = "16")]
    pub partial_update: Option<bool>,
}
