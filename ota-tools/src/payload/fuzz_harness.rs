//! Fuzz entry point for the payload parser and the operation appliers (used
//! by `fuzz/fuzz_targets/payload_parse.rs` and by a seeded test).
//!
//! The input is opened as a payload from a private temporary directory; when
//! it parses, it is inspected, and partitions of at most
//! [`MAX_FUZZ_PARTITION`] bytes are extracted and converted to COW files
//! against small old images. The same bytes are also fed to the bsdiff
//! patcher and, as a blob, to every operation type's applier. Every path must
//! end in `Ok` or a clean error: never a panic, a hang or an unbounded
//! allocation.

use std::fs;

use super::bspatch;
use super::extract::{extract, ExtractOptions};
use super::operation::{new_data, OpId};
use super::proto::{Extent, InstallOperation};
use super::reader::Payload;
use super::to_cow::{to_cow, ToCowOptions};

/// Largest partition the harness extracts (larger ones only parse).
pub const MAX_FUZZ_PARTITION: u64 = 1 << 20;

/// Run one input.
pub fn run(data: &[u8]) {
    appliers(data);
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let path = dir.path().join("payload.bin");
    if fs::write(&path, data).is_err() {
        return;
    }
    let Ok(payload) = Payload::open(&path) else {
        return;
    };
    let report = super::inspect::report(&payload);
    let _ = report.write_text(&mut std::io::sink());
    let small: Vec<String> = payload
        .manifest
        .partitions
        .iter()
        .filter(|p| {
            p.new_partition_info
                .as_ref()
                .and_then(|i| i.size)
                .is_some_and(|s| s <= MAX_FUZZ_PARTITION)
        })
        .map(|p| p.partition_name.clone())
        .collect();
    if small.is_empty() {
        return;
    }
    let old_dir = dir.path().join("old");
    if fs::create_dir(&old_dir).is_err() {
        return;
    }
    for name in &small {
        if super::partition::check_name(name).is_ok() {
            let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            let _ = fs::write(old_dir.join(format!("{name}.img")), pattern);
        }
    }
    let _ = extract(&ExtractOptions {
        payload: path.clone(),
        output_dir: dir.path().join("out"),
        source_dir: Some(old_dir.clone()),
        partitions: Some(small.clone()),
        threads: 1,
        progress: false,
    });
    let _ = to_cow(&ToCowOptions {
        payload: path,
        source_dir: old_dir,
        output_dir: dir.path().join("cow"),
        partitions: Some(small),
        cow_version: None,
        compression: None,
        compression_factor: None,
        progress: false,
    });
}

/// The bytes as a bsdiff patch and as every operation type's blob.
fn appliers(data: &[u8]) {
    let old: Vec<u8> = (0..8192).map(|i| (i * 7 % 256) as u8).collect();
    let _ = bspatch::apply(&old, data, 8192);
    for t in 0..14 {
        let op = InstallOperation {
            r#type: t,
            src_extents: vec![Extent::new(0, 2)],
            dst_extents: vec![Extent::new(0, 2)],
            ..Default::default()
        };
        let id = OpId {
            partition: "fuzz".to_string(),
            index: 0,
            op_type: t,
        };
        let _ = new_data(&id, &op, data, &old, 8192, 4096);
    }
}
