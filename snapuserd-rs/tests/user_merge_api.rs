//! The user-space-merge mode through the crate's public API only, as the daemon uses it:
//! a `UserSnapshot` behind the transport's `RequestHandler`, merged on another thread with
//! the synchronous engine while requests are answered.

use std::fs;
use std::sync::Arc;

use cow_format::{Compression, CompressionAlgorithm, CowVersion, CowWriter, WriterOptions};
use snapuserd::daemon::transport::RequestHandler;
use snapuserd::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_READ};
use snapuserd::user_merge::{
    MergeControl, MergeOutcome, MergePhase, UserSnapshot, UserSnapshotOptions,
};

const BS: usize = 4096;

fn block(seed: usize) -> Vec<u8> {
    (0..BS).map(|i| ((i * 31 + seed * 7) % 251) as u8).collect()
}

#[test]
fn a_snapshot_serves_requests_through_the_handler_trait_while_it_merges() {
    let dir = tempfile::tempdir().unwrap();
    let (cow, base) = (dir.path().join("cow"), dir.path().join("base"));
    let blocks = 600usize;
    let source: Vec<u8> = (0..blocks).flat_map(block).collect();
    let mut target = source.clone();
    let opts = WriterOptions {
        version: CowVersion::V3,
        compression: Compression {
            algorithm: CompressionAlgorithm::Zstd,
            level: None,
        },
        op_count_max: Some(2000),
        ..WriterOptions::default()
    };
    let mut w = CowWriter::create(fs::File::create(&cow).unwrap(), opts).unwrap();
    // COPY b <- b+1 for b < 520 (two windows, overlapping), then REPLACE 550..560.
    w.add_sequence(&(0..520u32).collect::<Vec<_>>()).unwrap();
    for b in 0..520u64 {
        w.add_copy(b, b + 1).unwrap();
        let s = (b as usize + 1) * BS;
        target.copy_within(s..s + BS, b as usize * BS);
    }
    let fresh: Vec<u8> = (0..10).flat_map(|i| block(1000 + i)).collect();
    w.add_replace(550, &fresh).unwrap();
    target[550 * BS..560 * BS].copy_from_slice(&fresh);
    w.finalize().unwrap();
    fs::write(&base, &source).unwrap();

    let snap =
        Arc::new(UserSnapshot::open(&cow, &base, &base, &UserSnapshotOptions::default()).unwrap());
    assert_eq!(snap.base_sectors(), (blocks * BS / 512) as u64);
    let handler: Arc<dyn RequestHandler> = snap.clone();
    let read_all = |handler: &dyn RequestHandler| {
        let mut image = Vec::new();
        let mut out = Vec::new();
        for sector in (0..snap.base_sectors()).step_by(256) {
            let req = Request {
                kind: DM_USER_REQ_MAP_READ,
                flags: 0,
                sector,
                len: 256.min(snap.base_sectors() - sector) * 512,
            };
            assert_eq!(handler.handle(&req, &[], &mut out), ResponseCode::Success);
            image.extend_from_slice(&out);
        }
        image
    };
    assert!(read_all(handler.as_ref()) == target);
    let merger = {
        let snap = snap.clone();
        std::thread::spawn(move || snap.merge(snap.sync_io().unwrap(), &MergeControl::new()))
    };
    while snap.progress().state != MergePhase::Complete {
        assert!(read_all(handler.as_ref()) == target, "read during merge");
        if merger.is_finished() {
            break;
        }
    }
    assert_eq!(merger.join().unwrap().unwrap(), MergeOutcome::Complete);
    let p = snap.progress();
    // 520 COPYs, and the 10-block REPLACE as two v3 ops (8 + 2 blocks): one entry each.
    assert_eq!((p.merged_ops, p.total_ops), (522, 522));
    assert!(fs::read(&base).unwrap() == target);
}
