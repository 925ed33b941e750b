//! The daemon in user-space-merge mode, through its control socket, with COW files made by
//! `ota-tools create` and socketpairs playing the dm-user kernel: the 5-field `init`, reads
//! through a channel, `initiate_merge` and the `getstatus` walk, `merge_percent`,
//! pause/resume, the merge-thread limit, a failing merge, and the field-count rules.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use snapuserd::daemon::handlers::{CowFileOpener, HandlerRegistry};
use snapuserd::daemon::update_verify::VerifyDevices;
use snapuserd::daemon::user_snapshots::UserSnapshotOpener;
use snapuserd::dm_user::{
    MessageHeader, DM_USER_REQ_MAP_WRITE, DM_USER_RESP_ERROR, DM_USER_RESP_SUCCESS, HEADER_SIZE,
};
use snapuserd::user_merge::UserSnapshotOptions;

mod common;
use common::control::{self, ask, TestDaemon};
use common::{write_user_update, UserUpdate, BLOCK};

/// A daemon with user-space-merge support over a real socket.
struct Daemon(TestDaemon);

impl std::ops::Deref for Daemon {
    type Target = TestDaemon;
    fn deref(&self) -> &TestDaemon {
        &self.0
    }
}

impl Daemon {
    fn start(merge_threads: u32, user_snapshot_only: bool, opts: UserSnapshotOptions) -> Self {
        Self(TestDaemon::start(|dir, channels| {
            HandlerRegistry::new(Box::new(CowFileOpener), channels, 1)
                .with_user_snapshots(Box::new(UserSnapshotOpener::new(opts)))
                .with_user_snapshot_only(user_snapshot_only)
                .with_merge_threads(merge_threads, true)
                .with_verify_devices(VerifyDevices::Dir(dir.join("no-devices")))
        }))
    }

    fn update(&self, name: &str, blocks: usize) -> UserUpdate {
        write_user_update(&self.dir, name, blocks)
    }

    fn stop(self) {
        self.0.stop()
    }
}

fn init_msg(misc: &str, u: &UserUpdate) -> String {
    format!(
        "init,{misc},{},{},{}",
        u.cow.display(),
        u.source.display(),
        u.base.display()
    )
}

/// Read `len` bytes at `sector` through a kernel end: the response code and the data.
fn kernel_read(k: &mut UnixStream, seq: u64, sector: u64, len: u64) -> (u64, Vec<u8>) {
    let (resp, data) = control::kernel_read(k, seq, sector, len);
    assert_eq!(resp.seq, seq);
    (resp.msg_type, data)
}

/// Read the whole device through `k` in 64 KiB requests.
fn read_device(k: &mut UnixStream, bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes);
    let step = 64 << 10;
    let mut seq = 1000;
    while out.len() < bytes {
        let len = step.min(bytes - out.len());
        let (code, data) = kernel_read(k, seq, (out.len() / 512) as u64, len as u64);
        assert_eq!(code, DM_USER_RESP_SUCCESS, "read at byte {}", out.len());
        out.extend_from_slice(&data);
        seq += 1;
    }
    out
}

/// Wait (a minute at most) until the monitor has started a merge.
fn wait_for_a_running_merge(d: &Daemon) {
    for _ in 0..60_000 {
        if d.registry.merges_running() > 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("no merge started within a minute");
}

/// Ask `getstatus` until it answers something other than `snapshot-merge`.
fn wait_merge_end(c: &mut UnixStream, misc: &str) -> String {
    // A minute is a hang, not a slow machine.
    for _ in 0..12_000 {
        let s = ask(c, format!("getstatus,{misc}"));
        if s != "snapshot-merge" {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("{misc}: still merging after a minute");
}

#[test]
fn init_start_read_merge_and_status_walk_on_a_real_cow() {
    let d = Daemon::start(2, true, UserSnapshotOptions::default());
    let u = d.update("sys", 256);
    let mut c = d.connect();
    let sectors = (256 * BLOCK / 512) as u64;
    assert_eq!(
        ask(&mut c, init_msg("sys", &u)),
        format!("success,{sectors}")
    );
    assert_eq!(ask(&mut c, "getstatus,sys"), "snapshot");
    assert_eq!(ask(&mut c, "initiate_merge,sys"), "fail", "not started");
    assert_eq!(ask(&mut c, "start,sys"), "success");
    let (misc, mut k) = d.kernels.recv().unwrap();
    assert_eq!(misc, "sys");

    // The device reads as the target, with the base still holding the source.
    assert_eq!(read_device(&mut k, u.target.len()), u.target);
    // Unaligned to blocks: one sector inside the shifted run.
    let (code, data) = kernel_read(&mut k, 1, 5 * 8 + 3, 512);
    assert_eq!(code, DM_USER_RESP_SUCCESS);
    assert_eq!(data, &u.target[5 * BLOCK + 3 * 512..5 * BLOCK + 4 * 512]);
    // WRITE is an error: the snapshot is read-only.
    let req = MessageHeader {
        seq: 2,
        msg_type: DM_USER_REQ_MAP_WRITE,
        flags: 0,
        sector: 0,
        len: 512,
    };
    k.write_all(&req.to_bytes()).unwrap();
    k.write_all(&[0u8; 512]).unwrap();
    let mut raw = [0u8; HEADER_SIZE];
    k.read_exact(&mut raw).unwrap();
    assert_eq!(MessageHeader::from_bytes(&raw).msg_type, DM_USER_RESP_ERROR);

    assert_eq!(ask(&mut c, "merge_percent"), "0.000000");
    assert_eq!(
        std::fs::read(&u.base).unwrap(),
        std::fs::read(&u.source).unwrap()
    );
    assert_eq!(ask(&mut c, "initiate_merge,sys"), "success");
    assert_eq!(wait_merge_end(&mut c, "sys"), "snapshot-merge-complete");
    assert_eq!(ask(&mut c, "merge_percent"), "100.000000");
    assert_eq!(std::fs::read(&u.base).unwrap(), u.target, "base == target");
    // Reads after the merge still give the target.
    assert_eq!(read_device(&mut k, u.target.len()), u.target);
    // The kernel end goes (table reloaded as linear), then delete.
    drop(k);
    assert_eq!(ask(&mut c, "delete,sys"), "success");
    assert_eq!(ask(&mut c, "merge_percent"), "100.000000");
    assert_eq!(
        ask(&mut c, "getstatus,sys"),
        "snapshot-merge-failed",
        "unknown now"
    );
    d.stop();
}

#[test]
fn a_merge_started_while_paused_stands_still_until_resumed() {
    let d = Daemon::start(2, false, UserSnapshotOptions::default());
    let u = d.update("sys", 128);
    let mut c = d.connect();
    ask(&mut c, init_msg("sys", &u));
    assert_eq!(ask(&mut c, "start,sys"), "success");
    let (_, _k) = d.kernels.recv().unwrap();
    assert_eq!(ask(&mut c, "pause_merge"), "success");
    assert_eq!(ask(&mut c, "initiate_merge,sys"), "success");
    wait_for_a_running_merge(&d);
    // However long it waits, a paused merge writes nothing.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(ask(&mut c, "getstatus,sys"), "snapshot-merge");
    assert_eq!(ask(&mut c, "merge_percent"), "0.000000");
    assert_eq!(
        std::fs::read(&u.base).unwrap(),
        std::fs::read(&u.source).unwrap()
    );
    assert_eq!(ask(&mut c, "resume_merge"), "success");
    assert_eq!(wait_merge_end(&mut c, "sys"), "snapshot-merge-complete");
    assert_eq!(std::fs::read(&u.base).unwrap(), u.target);
    d.stop();
}

#[test]
fn with_one_merge_thread_the_second_partition_waits_its_turn() {
    let d = Daemon::start(1, false, UserSnapshotOptions::default());
    let a = d.update("a", 128);
    let b = d.update("b", 96);
    let mut c = d.connect();
    ask(&mut c, init_msg("a", &a));
    ask(&mut c, init_msg("b", &b));
    assert_eq!(ask(&mut c, "start,a"), "success");
    assert_eq!(ask(&mut c, "start,b"), "success");
    let _kernels: Vec<_> = (0..2).map(|_| d.kernels.recv().unwrap()).collect();
    // Hold the first merge at its first safe point so the second is seen queued.
    assert_eq!(ask(&mut c, "pause_merge"), "success");
    assert_eq!(ask(&mut c, "initiate_merge,a"), "success");
    assert_eq!(ask(&mut c, "initiate_merge,b"), "success");
    wait_for_a_running_merge(&d);
    assert_eq!(d.registry.merges_running(), 1, "one slot");
    assert_eq!(ask(&mut c, "getstatus,b"), "snapshot-merge", "queued");
    assert_eq!(ask(&mut c, "getstatus,a"), "snapshot-merge");
    assert_eq!(ask(&mut c, "resume_merge"), "success");
    assert_eq!(wait_merge_end(&mut c, "a"), "snapshot-merge-complete");
    assert_eq!(wait_merge_end(&mut c, "b"), "snapshot-merge-complete");
    assert_eq!(std::fs::read(&a.base).unwrap(), a.target);
    assert_eq!(std::fs::read(&b.base).unwrap(), b.target);
    assert_eq!(ask(&mut c, "merge_percent"), "100.000000");
    d.stop();
}

#[test]
fn a_merge_that_cannot_read_its_source_reports_failed() {
    let opts = UserSnapshotOptions {
        mmap_cow: false,
        ..UserSnapshotOptions::default()
    };
    let d = Daemon::start(2, false, opts);
    let u = d.update("sys", 128);
    let mut c = d.connect();
    ask(&mut c, init_msg("sys", &u));
    assert_eq!(ask(&mut c, "start,sys"), "success");
    let (_, _k) = d.kernels.recv().unwrap();
    // The source device loses its contents: the COPY ops cannot be read.
    std::fs::File::options()
        .write(true)
        .open(&u.source)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(ask(&mut c, "initiate_merge,sys"), "success");
    assert_eq!(wait_merge_end(&mut c, "sys"), "snapshot-merge-failed");
    d.stop();
}

#[test]
fn field_counts_choose_the_mode_and_mismatches_fail() {
    let d = Daemon::start(2, true, UserSnapshotOptions::default());
    let u = d.update("sys", 64);
    let mut c = d.connect();
    assert_eq!(ask(&mut c, "init,a,b"), "fail", "3 fields");
    assert_eq!(ask(&mut c, "init,a,b,c,d,e"), "fail", "6 fields");
    // A -user_snapshot daemon refuses the legacy form.
    let legacy = format!("init,sys,{},{}", u.cow.display(), u.source.display());
    assert_eq!(ask(&mut c, &legacy), "fail");
    // A base device of 0 sectors.
    let empty = d.dir.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let msg = format!(
        "init,sys,{},{},{}",
        u.cow.display(),
        u.source.display(),
        empty.display()
    );
    assert_eq!(ask(&mut c, &msg), "fail");
    assert_eq!(ask(&mut c, "query"), "active");
    assert_eq!(
        ask(&mut c, init_msg("sys", &u)),
        format!("success,{}", 64 * BLOCK / 512)
    );
    d.stop();
}

#[test]
fn a_daemon_that_opened_the_cow_before_another_merged_it_serves_the_merged_state() {
    // In place: the source is the base device itself, so a stale view would read the
    // moved blocks from places the merge already overwrote.
    let first = Daemon::start(2, true, UserSnapshotOptions::default());
    let second = Daemon::start(2, true, UserSnapshotOptions::default());
    let u = first.update("sys", 256);
    let init = format!(
        "init,sys,{},{},{}",
        u.cow.display(),
        u.base.display(),
        u.base.display()
    );
    let mut c1 = first.connect();
    let mut c2 = second.connect();
    assert!(ask(&mut c1, &init).starts_with("success,"));
    // The second daemon opens the COW now, before any merge.
    assert!(ask(&mut c2, &init).starts_with("success,"));
    assert_eq!(ask(&mut c1, "start,sys"), "success");
    let (_, _k1) = first.kernels.recv().unwrap();
    assert_eq!(ask(&mut c1, "initiate_merge,sys"), "success");
    assert_eq!(wait_merge_end(&mut c1, "sys"), "snapshot-merge-complete");
    assert_eq!(std::fs::read(&u.base).unwrap(), u.target);
    // The table moves to the second daemon: its first request takes the merge over.
    assert_eq!(ask(&mut c2, "start,sys"), "success");
    let (_, mut k2) = second.kernels.recv().unwrap();
    assert_eq!(read_device(&mut k2, u.target.len()), u.target);
    assert_eq!(ask(&mut c2, "getstatus,sys"), "snapshot-merge-complete");
    first.stop();
    second.stop();
}
