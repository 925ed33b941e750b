//! The control server over a real Unix socket, with real COW files and socketpairs playing
//! the dm-user kernel.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use snapuserd::daemon::control_server::{bind_listener, ControlServer, ServerExit};
use snapuserd::daemon::events::DaemonEvents;
use snapuserd::daemon::handlers::{CowFileOpener, HandlerRegistry, TargetError};
use snapuserd::dm_user::{
    MessageHeader, DM_USER_REQ_MAP_DISCARD, DM_USER_REQ_MAP_FLAG_FUA,
    DM_USER_REQ_MAP_FLAG_PREFLUSH, DM_USER_REQ_MAP_WRITE, DM_USER_RESP_ERROR, DM_USER_RESP_SUCCESS,
    DM_USER_RESP_UNSUPPORTED, HEADER_SIZE,
};

mod common;
use common::control::{ask, kernel_read, PairOpener, TestDaemon};
use common::BLOCK;

/// A legacy-mode daemon with `workers` worker threads per handler.
fn start(workers: u32) -> TestDaemon {
    TestDaemon::start(|_, channels| {
        HandlerRegistry::new(Box::new(CowFileOpener), channels, workers)
    })
}

fn stop(d: TestDaemon) {
    d.stop()
}

#[test]
fn query_malformed_oversized_and_unknown() {
    let d = start(1);
    let mut c = d.connect();
    assert_eq!(ask(&mut c, b"query"), "active");
    assert_eq!(ask(&mut c, b"init,a"), "fail");
    assert_eq!(ask(&mut c, b"query"), "active");
    assert_eq!(ask(&mut c, [b'q'; 600]), "fail");
    assert_eq!(ask(&mut c, b"query"), "active");
    assert_eq!(ask(&mut c, b"getstatus,\xff\xfe"), "fail");
    assert_eq!(
        ask(&mut c, b"supports,second_stage_socket_handoff"),
        "success"
    );
    assert_eq!(ask(&mut c, b"supports,teleport"), "fail");
    assert_eq!(ask(&mut c, b"merge_percent"), "0.000000");
    assert_eq!(ask(&mut c, b"getstatus,nothing"), "snapshot-merge-failed");
    // Unknown: fail, then the connection is closed.
    assert_eq!(ask(&mut c, b"frobnicate,1"), "fail");
    let mut buf = [0u8; 8];
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    // The daemon carries on for everyone else.
    let mut other = d.connect();
    assert_eq!(ask(&mut other, b"query"), "active");
    stop(d);
}

#[test]
fn many_concurrent_clients() {
    let d = start(1);
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..24)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = UnixStream::connect(&socket).unwrap();
                (0..50)
                    .filter(|_| ask(&mut c, b"query") == "active")
                    .count()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 50);
    }
    stop(d);
}

#[test]
fn clients_beyond_the_limit_are_refused() {
    let d = start(1);
    let mut held: Vec<UnixStream> = (0..snapuserd::daemon::control_server::MAX_CLIENTS)
        .map(|_| d.connect())
        .collect();
    for c in &mut held {
        assert_eq!(ask(c, b"query"), "active");
    }
    let mut extra = d.connect();
    let _ = extra.write_all(b"query");
    let mut buf = [0u8; 16];
    let got = extra.read(&mut buf).unwrap_or(0);
    assert_eq!(got, 0, "the client over the limit is closed unanswered");
    assert_eq!(ask(&mut held[0], b"query"), "active");
    drop(held);
    stop(d);
}

#[test]
fn a_client_that_never_reads_does_not_stall_the_others() {
    let d = start(1);
    let mut hog = d.connect();
    let hog_thread = std::thread::spawn(move || {
        // Keep sending without ever reading; the server must drop us eventually.
        for _ in 0..2_000_000u32 {
            if hog.write_all(b"query").is_err() {
                return true;
            }
        }
        false
    });
    let mut c = d.connect();
    for _ in 0..300 {
        assert_eq!(ask(&mut c, b"query"), "active");
    }
    assert!(
        hog_thread.join().unwrap(),
        "the non-reading client was never dropped"
    );
    assert_eq!(ask(&mut c, b"query"), "active");
    stop(d);
}

#[test]
fn detach_with_no_handlers_ends_the_server_at_once() {
    let d = start(1);
    let mut c = d.connect();
    c.write_all(b"detach").unwrap();
    let socket = d.socket.clone();
    assert_eq!(d.join(), ServerExit::Detached);
    assert!(UnixStream::connect(&socket).is_err(), "no longer accepting");
}

#[test]
fn detach_turns_passive_and_waits_for_the_handlers() {
    let d = start(1);
    let (cow, src, _) = common::write_small_update(&d.dir);
    let mut a = d.connect();
    let mut b = d.connect();
    let init = format!("init,sys,{},{}", cow.display(), src.display());
    assert!(ask(&mut a, init.as_bytes()).starts_with("success,"));
    assert_eq!(ask(&mut a, b"start,sys"), "success");
    // `detach` has no reply. The poll loop reads clients in connection order, so `a`'s
    // detach is handled no later than `b`'s query, which was written after it.
    a.write_all(b"detach").unwrap();
    assert_eq!(ask(&mut b, b"query"), "passive");
    assert!(
        UnixStream::connect(&d.socket).is_err(),
        "no longer accepting"
    );
    // The dm-user device going away ends the workers; then the server ends.
    let (_, kernel) = d.kernels.recv().unwrap();
    drop(kernel);
    assert_eq!(d.join(), ServerExit::Detached);
}

/// Send a WRITE (an empty one is a flush: PREFLUSH, length 0) and return the response code.
fn kernel_write(k: &mut UnixStream, seq: u64, sector: u64, data: &[u8]) -> u64 {
    let req = MessageHeader {
        seq,
        msg_type: DM_USER_REQ_MAP_WRITE,
        flags: DM_USER_REQ_MAP_FLAG_PREFLUSH | DM_USER_REQ_MAP_FLAG_FUA,
        sector,
        len: data.len() as u64,
    };
    k.write_all(&req.to_bytes()).unwrap();
    k.write_all(data).unwrap();
    let mut raw = [0u8; HEADER_SIZE];
    k.read_exact(&mut raw).unwrap();
    let resp = MessageHeader::from_bytes(&raw);
    assert_eq!(resp.seq, seq);
    resp.msg_type
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn init_with_a_missing_cow_fails() {
    let d = start(1);
    let (_, src, _) = common::write_small_update(&d.dir);
    let mut c = d.connect();
    let missing = d.dir.join("absent.cow");
    let msg = format!("init,a,{},{}", missing.display(), src.display());
    assert_eq!(ask(&mut c, msg.as_bytes()), "fail");
    assert_eq!(ask(&mut c, b"start,a"), "fail");
    assert_eq!(ask(&mut c, b"getstatus,a"), "snapshot-merge-failed");
    stop(d);
}

#[test]
fn init_start_serve_status_delete_on_a_real_cow() {
    let d = start(2);
    let (cow, src, target) = common::write_small_update(&d.dir);
    let expected_sectors = snapuserd::cow_backend::CowSnapshot::open(&cow, &src)
        .unwrap()
        .device_sectors();
    let mut c = d.connect();
    let init = format!("init,sys,{},{}", cow.display(), src.display());
    assert_eq!(
        ask(&mut c, init.as_bytes()),
        format!("success,{expected_sectors}")
    );
    assert_eq!(ask(&mut c, init.as_bytes()), "fail", "the name is taken");
    assert_eq!(ask(&mut c, b"getstatus,sys"), "snapshot");
    assert_eq!(ask(&mut c, b"update-verify"), "fail", "not started yet");
    assert_eq!(ask(&mut c, b"start,sys"), "success");
    assert_eq!(ask(&mut c, b"start,sys"), "fail", "already started");
    assert_eq!(ask(&mut c, b"update-verify"), "success");

    let mut kernels: Vec<UnixStream> = (0..2)
        .map(|_| {
            let (misc, k) = d.kernels.recv().unwrap();
            assert_eq!(misc, "sys");
            k
        })
        .collect();

    // Chunk 0: the dm-snap persistent header.
    let (resp, header) = kernel_read(&mut kernels[0], 1, 0, BLOCK as u64);
    assert_eq!((resp.seq, resp.msg_type), (1, DM_USER_RESP_SUCCESS));
    assert_eq!(u32_at(&header, 0), 0x7041_6e53, "magic");
    assert_eq!(u32_at(&header, 4), 1, "valid");
    assert_eq!(u32_at(&header, 8), 1, "version");
    assert_eq!(u32_at(&header, 12), 8, "chunk size in sectors");

    // Chunk 1: the first metadata area; every live exception's data chunk holds the
    // target block it names. Served by the second worker.
    let (resp, area) = kernel_read(&mut kernels[1], 2, 8, BLOCK as u64);
    assert_eq!(resp.msg_type, DM_USER_RESP_SUCCESS);
    let mut seen = Vec::new();
    for slot in 0..256 {
        let (old, new) = (u64_at(&area, slot * 16), u64_at(&area, slot * 16 + 8));
        if new == 0 {
            break;
        }
        let (resp, data) = kernel_read(&mut kernels[0], 10 + slot as u64, new * 8, BLOCK as u64);
        assert_eq!(resp.msg_type, DM_USER_RESP_SUCCESS);
        let at = old as usize * BLOCK;
        assert_eq!(data, target[at..at + BLOCK], "exception for block {old}");
        seen.push(old);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![3, 5, 7]);

    // A DISCARD is answered UNSUPPORTED and the worker carries on.
    let discard = MessageHeader {
        seq: 99,
        msg_type: DM_USER_REQ_MAP_DISCARD,
        flags: 0,
        sector: 0,
        len: 4096,
    };
    kernels[1].write_all(&discard.to_bytes()).unwrap();
    let mut raw = [0u8; HEADER_SIZE];
    kernels[1].read_exact(&mut raw).unwrap();
    let resp = MessageHeader::from_bytes(&raw);
    assert_eq!((resp.seq, resp.msg_type), (99, DM_USER_RESP_UNSUPPORTED));
    let (resp, _) = kernel_read(&mut kernels[1], 100, 0, 512);
    assert_eq!(resp.msg_type, DM_USER_RESP_SUCCESS);

    assert_eq!(ask(&mut c, b"merge_percent"), "0.000000");
    assert_eq!(ask(&mut c, b"initiate_merge,sys"), "success");
    assert_eq!(ask(&mut c, b"getstatus,sys"), "snapshot-merge");

    // dm-snapshot-merge's write-backs: merge the last exception, then the rest, each by
    // writing the area back with the merged entries zeroed; then an empty flush.
    let live = seen.len();
    let mut area = area;
    area[(live - 1) * 16..live * 16].fill(0);
    assert_eq!(
        kernel_write(&mut kernels[0], 200, 8, &area),
        DM_USER_RESP_SUCCESS
    );
    assert_eq!(ask(&mut c, b"merge_percent"), "33.333333");
    assert_eq!(ask(&mut c, b"getstatus,sys"), "snapshot-merge");
    area[..live * 16].fill(0);
    assert_eq!(
        kernel_write(&mut kernels[1], 201, 8, &area),
        DM_USER_RESP_SUCCESS
    );
    assert_eq!(
        kernel_write(&mut kernels[1], 202, 0, &[]),
        DM_USER_RESP_SUCCESS
    );
    assert_eq!(ask(&mut c, b"merge_percent"), "100.000000");
    assert_eq!(ask(&mut c, b"getstatus,sys"), "snapshot-merge-complete");
    // A write-back that merges nothing new is refused with ERROR; the worker carries on.
    assert_eq!(
        kernel_write(&mut kernels[0], 203, 8, &area),
        DM_USER_RESP_ERROR
    );
    let (resp, _) = kernel_read(&mut kernels[0], 204, 0, 512);
    assert_eq!(resp.msg_type, DM_USER_RESP_SUCCESS);
    assert_eq!(ask(&mut c, b"delete,sys"), "success");
    // The workers are joined and their channels closed.
    for k in &mut kernels {
        let mut buf = [0u8; 8];
        assert_eq!(k.read(&mut buf).unwrap(), 0);
    }
    assert_eq!(ask(&mut c, b"getstatus,sys"), "snapshot-merge-failed");
    assert_eq!(ask(&mut c, b"delete,sys"), "success");
    stop(d);
}

/// Opens COWs with [`CowFileOpener`], but a COW whose path contains "slow" only once the
/// test sends on the gate (and says so on `entered` first).
struct GatedOpener {
    entered: Mutex<Sender<()>>,
    gate: Mutex<Receiver<()>>,
}

impl snapuserd::daemon::handlers::SnapshotOpener for GatedOpener {
    fn open(
        &self,
        cow: &Path,
        source: &Path,
    ) -> Result<Arc<dyn snapuserd::daemon::handlers::SnapshotTarget>, TargetError> {
        if cow.to_string_lossy().contains("slow") {
            self.entered.lock().unwrap().send(()).unwrap();
            self.gate.lock().unwrap().recv().unwrap();
        }
        CowFileOpener.open(cow, source)
    }
}

#[test]
fn a_slow_init_does_not_stall_other_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let (cow, src, _) = common::write_small_update(tmp.path());
    let slow = tmp.path().join("slow.cow");
    std::fs::copy(&cow, &slow).unwrap();
    let socket = tmp.path().join("snapuserd");
    let (entered_tx, entered) = mpsc::channel();
    let (release, gate) = mpsc::channel();
    let (tx, _kernels) = mpsc::channel();
    let registry = Arc::new(HandlerRegistry::new(
        Box::new(GatedOpener {
            entered: Mutex::new(entered_tx),
            gate: Mutex::new(gate),
        }),
        Box::new(PairOpener(Mutex::new(tx))),
        1,
    ));
    let mut server = ControlServer::new(bind_listener(&socket).unwrap(), registry).unwrap();
    let thread = std::thread::spawn(move || server.run(&DaemonEvents::new().unwrap()).unwrap());

    let mut a = UnixStream::connect(&socket).unwrap();
    let init = format!("init,slow,{},{}", slow.display(), src.display());
    a.write_all(init.as_bytes()).unwrap();
    // a's init is now inside the COW open, held there.
    entered.recv().unwrap();
    // a's next message waits behind its init; other clients are served meanwhile,
    // including another init.
    a.write_all(b"query").unwrap();
    let mut b = UnixStream::connect(&socket).unwrap();
    assert_eq!(ask(&mut b, b"query"), "active");
    assert_eq!(ask(&mut b, b"getstatus,slow"), "snapshot-merge-failed");
    let other = format!("init,fast,{},{}", cow.display(), src.display());
    assert!(ask(&mut b, other.as_bytes()).starts_with("success,"));
    assert_eq!(ask(&mut b, b"merge_percent"), "0.000000");
    // Release: a gets its init reply, then its query's, in order.
    release.send(()).unwrap();
    let mut buf = [0u8; 64];
    let n = a.read(&mut buf).unwrap();
    let got = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(got.starts_with("success,"), "{got}");
    let rest = if got.ends_with("active") {
        String::new()
    } else {
        let n = a.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(
        got.ends_with("active") || rest == "active",
        "{got:?} then {rest:?}"
    );
    assert_eq!(ask(&mut b, b"getstatus,slow"), "snapshot");
    b.write_all(b"stop").unwrap();
    assert_eq!(thread.join().unwrap(), ServerExit::StopCommand);
}

#[test]
fn update_verify_reads_every_block_and_fails_on_a_read_error() {
    let d = start(1);
    let (cow, src, _) = common::write_small_update(&d.dir);
    // A second snapshot whose COW loses its data after init. (Its COPY op is served from
    // the read-ahead window saved at open, so a damaged source would go unnoticed here:
    // the REPLACE payload in the COW is what a read must reach.)
    let broken_cow = d.dir.join("broken.cow");
    std::fs::copy(&cow, &broken_cow).unwrap();
    let mut c = d.connect();
    let init = format!("init,good,{},{}", cow.display(), src.display());
    assert!(ask(&mut c, init.as_bytes()).starts_with("success,"));
    assert_eq!(ask(&mut c, b"start,good"), "success");
    assert_eq!(ask(&mut c, b"update-verify"), "success");
    let init = format!("init,broken,{},{}", broken_cow.display(), src.display());
    assert!(ask(&mut c, init.as_bytes()).starts_with("success,"));
    assert_eq!(
        ask(&mut c, b"update-verify"),
        "fail",
        "broken is not started"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&broken_cow)
        .unwrap()
        .set_len(BLOCK as u64)
        .unwrap();
    assert_eq!(ask(&mut c, b"start,broken"), "success");
    assert_eq!(
        ask(&mut c, b"update-verify"),
        "fail",
        "the REPLACE read fails"
    );
    assert_eq!(ask(&mut c, b"delete,broken"), "success");
    assert_eq!(ask(&mut c, b"update-verify"), "success");
    stop(d);
}

#[test]
fn pause_merge_holds_the_write_back_and_keeps_reads_going() {
    let d = start(1);
    let (cow, src, target) = common::write_small_update(&d.dir);
    let mut c = d.connect();
    let init = format!("init,sys,{},{}", cow.display(), src.display());
    assert!(ask(&mut c, init.as_bytes()).starts_with("success,"));
    assert_eq!(ask(&mut c, b"start,sys"), "success");
    let (_, mut k) = d.kernels.recv().unwrap();
    let (_, area) = kernel_read(&mut k, 1, 8, BLOCK as u64);
    let live = (0..256)
        .take_while(|&s| u64_at(&area, s * 16 + 8) != 0)
        .count();
    assert_eq!(live, 3);
    assert_eq!(ask(&mut c, b"pause_merge"), "success");
    // The kernel's write-back of the last exception: held by the only worker ...
    let mut merged = area.clone();
    merged[(live - 1) * 16..live * 16].fill(0);
    let req = MessageHeader {
        seq: 2,
        msg_type: DM_USER_REQ_MAP_WRITE,
        flags: DM_USER_REQ_MAP_FLAG_PREFLUSH | DM_USER_REQ_MAP_FLAG_FUA,
        sector: 8,
        len: BLOCK as u64,
    };
    k.write_all(&req.to_bytes()).unwrap();
    k.write_all(&merged).unwrap();
    // ... which still serves snapshot reads, out of order ahead of the held write.
    let old = u64_at(&area, 0);
    let new = u64_at(&area, 8);
    let (resp, data) = kernel_read(&mut k, 3, new * 8, BLOCK as u64);
    assert_eq!((resp.seq, resp.msg_type), (3, DM_USER_RESP_SUCCESS));
    let at = old as usize * BLOCK;
    assert_eq!(data, target[at..at + BLOCK]);
    assert_eq!(ask(&mut c, b"merge_percent"), "0.000000", "not processed");
    assert_eq!(ask(&mut c, b"resume_merge"), "success");
    let mut raw = [0u8; HEADER_SIZE];
    k.read_exact(&mut raw).unwrap();
    let resp = MessageHeader::from_bytes(&raw);
    assert_eq!((resp.seq, resp.msg_type), (2, DM_USER_RESP_SUCCESS));
    assert_eq!(ask(&mut c, b"merge_percent"), "33.333333");
    stop(d);
}

/// A snapshot whose verification pass runs until the test releases it.
struct HeldVerification {
    entered: Mutex<Sender<()>>,
    gate: Mutex<Receiver<bool>>,
}

impl snapuserd::daemon::transport::RequestHandler for HeldVerification {
    fn handle(
        &self,
        _: &snapuserd::dm_user::Request,
        _: &[u8],
        _: &mut Vec<u8>,
    ) -> snapuserd::dm_user::ResponseCode {
        snapuserd::dm_user::ResponseCode::Unsupported
    }
}

impl snapuserd::daemon::handlers::SnapshotTarget for HeldVerification {
    fn device_sectors(&self) -> u64 {
        8
    }
    fn merge_percent(&self) -> Result<f64, TargetError> {
        Ok(0.0)
    }
    fn merge_complete(&self) -> Result<bool, TargetError> {
        Ok(false)
    }
    fn verify(&self, _: &AtomicBool) -> Result<u64, TargetError> {
        self.entered.lock().unwrap().send(()).unwrap();
        match self.gate.lock().unwrap().recv() {
            Ok(true) => Ok(1),
            _ => Err(TargetError::VerifyRead {
                block: 0,
                blocks: 1,
                source: "read error".into(),
            }),
        }
    }
}

struct HeldOpener(Mutex<Option<Arc<HeldVerification>>>);

impl snapuserd::daemon::handlers::SnapshotOpener for HeldOpener {
    fn open(
        &self,
        _: &Path,
        _: &Path,
    ) -> Result<Arc<dyn snapuserd::daemon::handlers::SnapshotTarget>, TargetError> {
        let t = self
            .0
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| TargetError::Open {
                cow: PathBuf::new(),
                source_path: PathBuf::new(),
                source: "opened twice".into(),
            })?;
        Ok(t)
    }
}

#[test]
fn update_verify_waits_for_the_pass_without_stalling_other_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("snapuserd");
    let (entered_tx, entered) = mpsc::channel();
    let (release, gate) = mpsc::channel();
    let (tx, _kernels) = mpsc::channel();
    let target = Arc::new(HeldVerification {
        entered: Mutex::new(entered_tx),
        gate: Mutex::new(gate),
    });
    let registry = Arc::new(HandlerRegistry::new(
        Box::new(HeldOpener(Mutex::new(Some(target)))),
        Box::new(PairOpener(Mutex::new(tx))),
        1,
    ));
    let mut server = ControlServer::new(bind_listener(&socket).unwrap(), registry).unwrap();
    let thread = std::thread::spawn(move || server.run(&DaemonEvents::new().unwrap()).unwrap());
    let mut a = UnixStream::connect(&socket).unwrap();
    assert_eq!(ask(&mut a, b"init,sys,cow,src"), "success,8");
    assert_eq!(ask(&mut a, b"start,sys"), "success");
    entered.recv().unwrap();
    // The pass is running: a's update-verify waits for it; b is served meanwhile.
    a.write_all(b"update-verify").unwrap();
    let mut b = UnixStream::connect(&socket).unwrap();
    assert_eq!(ask(&mut b, b"query"), "active");
    assert_eq!(ask(&mut b, b"getstatus,sys"), "snapshot");
    assert_eq!(ask(&mut b, b"pause_merge"), "success");
    assert_eq!(ask(&mut b, b"resume_merge"), "success");
    release.send(false).unwrap();
    let mut buf = [0u8; 16];
    let n = a.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"fail", "the pass failed");
    b.write_all(b"stop").unwrap();
    assert_eq!(thread.join().unwrap(), ServerExit::StopCommand);
}
