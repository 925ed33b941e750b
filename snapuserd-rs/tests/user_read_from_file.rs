//! `UserSnapshot::read_from_file`: which READs the transport may splice straight from the
//! base device (every block unchanged by the COW, or merged), and that those bytes are what
//! the read path returns.

use std::os::unix::fs::FileExt;

use snapuserd::dm_user::{Request, DM_USER_REQ_MAP_READ, DM_USER_REQ_MAP_WRITE};
use snapuserd::user_merge::{MergeControl, MergeOutcome, UserSnapshot, UserSnapshotOptions};

mod common;
use common::{write_user_update, BLOCK};

fn read(sector: u64, len: u64) -> Request {
    Request {
        kind: DM_USER_REQ_MAP_READ,
        flags: 0,
        sector,
        len,
    }
}

/// Bytes `len` at `offset` of `file` equal the read path's answer for the same request.
fn same_as_read_path(snap: &UserSnapshot, req: &Request) {
    let (file, offset) = snap.read_from_file(req).expect("served from the base");
    assert_eq!(offset, req.sector * 512);
    let mut spliced = vec![0u8; req.len as usize];
    file.read_exact_at(&mut spliced, offset).unwrap();
    let mut through = vec![0u8; req.len as usize];
    snap.read(req.sector, &mut through).unwrap();
    assert!(spliced == through, "base bytes differ from the read path");
}

#[test]
fn only_reads_wholly_from_the_base_name_the_base_and_all_do_after_the_merge() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 256;
    let u = write_user_update(dir.path(), "rff", blocks);
    let snap =
        UserSnapshot::open(&u.cow, &u.source, &u.base, &UserSnapshotOptions::default()).unwrap();
    let sectors_per_block = (BLOCK / 512) as u64;
    // Blocks 0..4 are unchanged; block 5 is the first of the shifted run.
    same_as_read_path(&snap, &read(0, 4 * BLOCK as u64));
    same_as_read_path(&snap, &read(3, 512));
    assert!(snap.read_from_file(&read(0, 6 * BLOCK as u64)).is_none());
    assert!(snap
        .read_from_file(&read(5 * sectors_per_block + 1, 512))
        .is_none());
    // Not a READ, empty, or outside the device: never.
    let mut write = read(0, 4096);
    write.kind = DM_USER_REQ_MAP_WRITE;
    assert!(snap.read_from_file(&write).is_none());
    assert!(snap.read_from_file(&read(0, 0)).is_none());
    let device_sectors = snap.base_sectors();
    assert!(snap.read_from_file(&read(device_sectors, 512)).is_none());
    assert!(snap
        .read_from_file(&read(device_sectors - 1, 1024))
        .is_none());

    let io = snap.sync_io().unwrap();
    let outcome = snap.merge(io, &MergeControl::new()).unwrap();
    assert!(matches!(outcome, MergeOutcome::Complete));
    // Every block is merged now: the whole device comes from the base, which is the target.
    let whole = read(0, (blocks * BLOCK) as u64);
    same_as_read_path(&snap, &whole);
    let (file, _) = snap.read_from_file(&whole).unwrap();
    let mut base = vec![0u8; blocks * BLOCK];
    file.read_exact_at(&mut base, 0).unwrap();
    assert!(base == u.target, "merged base == target");
}
