//! Test doubles for the daemon's user-space-merge logic: a snapshot whose merge advances
//! one op per permit the test grants, and a channel opener handing out socketpairs.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::dm_user::{Channel, ChannelError, Request, ResponseCode};

use super::handlers::TargetError;
use super::transport::{ChannelOpener, RequestHandler};
use super::user_target::{
    MergeEnd, MergeSwitch, PreparedMerge, UserMergeTarget, UserProgress, UserTargetOpener,
};

#[derive(Default)]
struct Gate {
    permits: u64,
    merged: u64,
    paused: bool,
    stopped: bool,
    runs: u32,
    running: bool,
}

/// A user-space-merge snapshot of `sectors` sectors whose merge of `total` ops takes one
/// permit per op ([`FakeUserTarget::grant`]); with `fail_at`, the merge fails when it
/// reaches that many merged ops.
pub struct FakeUserTarget {
    sectors: u64,
    total: u64,
    fail_at: Option<u64>,
    gate: Arc<(Mutex<Gate>, Condvar)>,
    answered: std::sync::atomic::AtomicUsize,
}

impl FakeUserTarget {
    /// A fake with `merged` of `total` ops already merged.
    pub fn new(sectors: u64, merged: u64, total: u64, fail_at: Option<u64>) -> Self {
        let gate = Gate {
            merged,
            ..Gate::default()
        };
        Self {
            sectors,
            total,
            fail_at,
            gate: Arc::new((Mutex::new(gate), Condvar::new())),
            answered: Default::default(),
        }
    }

    /// How many times [`RequestHandler::answered`] reached this target.
    pub fn answered_calls(&self) -> usize {
        self.answered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Let the merge take `n` more ops.
    pub fn grant(&self, n: u64) {
        let (m, cv) = &*self.gate;
        let mut g = m.lock().unwrap();
        g.permits += n;
        cv.notify_all();
    }

    /// Ops merged.
    pub fn merged(&self) -> u64 {
        self.gate.0.lock().unwrap().merged
    }

    /// Permits granted and not used yet.
    pub fn permits(&self) -> u64 {
        self.gate.0.lock().unwrap().permits
    }

    /// Merge runs started so far.
    pub fn runs(&self) -> u32 {
        self.gate.0.lock().unwrap().runs
    }

    /// True while a merge run is in its body.
    pub fn running(&self) -> bool {
        self.gate.0.lock().unwrap().running
    }

    /// True while the current run is paused.
    pub fn paused(&self) -> bool {
        self.gate.0.lock().unwrap().paused
    }
}

impl RequestHandler for FakeUserTarget {
    fn handle(&self, _: &Request, _: &[u8], _: &mut Vec<u8>) -> ResponseCode {
        ResponseCode::Unsupported
    }

    /// Every request is one produced piece of `req.len` zero bytes.
    fn read_in_pieces(
        &self,
        req: &Request,
        produced: &mut Vec<u8>,
        send: &mut dyn FnMut(&[crate::dm_user::AnswerPiece<'_>], &[u8]) -> bool,
    ) -> Option<bool> {
        let len = usize::try_from(req.len).ok()?;
        produced.clear();
        produced.resize(len, 0);
        Some(send(
            &[crate::dm_user::AnswerPiece::Produced { start: 0, len }],
            produced,
        ))
    }

    /// Every READ in place is 0xAB bytes.
    fn read_into(&self, _: &Request, out: &mut [u8]) -> ResponseCode {
        out.fill(0xAB);
        ResponseCode::Success
    }

    fn answered(&self, _: &Request) {
        self.answered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

struct FakeSwitch(Arc<(Mutex<Gate>, Condvar)>);

impl MergeSwitch for FakeSwitch {
    fn pause(&self) {
        self.0 .0.lock().unwrap().paused = true;
        self.0 .1.notify_all();
    }
    fn resume(&self) {
        self.0 .0.lock().unwrap().paused = false;
        self.0 .1.notify_all();
    }
    fn stop(&self) {
        self.0 .0.lock().unwrap().stopped = true;
        self.0 .1.notify_all();
    }
}

impl UserMergeTarget for FakeUserTarget {
    fn base_sectors(&self) -> u64 {
        self.sectors
    }

    fn progress(&self) -> UserProgress {
        let g = self.gate.0.lock().unwrap();
        UserProgress {
            merged_ops: g.merged,
            total_ops: self.total,
            complete: g.merged >= self.total,
            failed: false,
        }
    }

    fn prepare_merge(self: Arc<Self>, _io_uring: bool) -> PreparedMerge {
        {
            let mut g = self.gate.0.lock().unwrap();
            g.paused = false;
            g.stopped = false;
        }
        let switch = Arc::new(FakeSwitch(Arc::clone(&self.gate)));
        let me = Arc::clone(&self);
        PreparedMerge {
            switch,
            body: Box::new(move || {
                let (m, cv) = &*me.gate;
                let mut g = m.lock().unwrap();
                g.runs += 1;
                g.running = true;
                let end = loop {
                    if g.stopped {
                        break Ok(MergeEnd::Stopped);
                    }
                    if g.merged >= me.total {
                        break Ok(MergeEnd::Complete);
                    }
                    if Some(g.merged) == me.fail_at {
                        break Err(TargetError::Merge("injected failure".into()));
                    }
                    if g.paused || g.permits == 0 {
                        g = cv.wait(g).unwrap();
                        continue;
                    }
                    g.permits -= 1;
                    g.merged += 1;
                    cv.notify_all();
                };
                g.running = false;
                cv.notify_all();
                end
            }),
        }
    }

    fn read(&self, _: u64, out: &mut [u8]) -> Result<(), super::handlers::BackendError> {
        out.fill(0);
        Ok(())
    }
}

/// Opens a [`FakeUserTarget`] per COW "path" `<sectors>:<merged>/<total>[!<fail_at>]` and
/// keeps every one it opened, by COW text, for the test to drive.
#[derive(Default)]
pub struct FakeUserOpener {
    /// The targets opened so far.
    pub opened: Mutex<Vec<(String, Arc<FakeUserTarget>)>>,
}

impl FakeUserOpener {
    /// The target opened from COW text `cow`.
    pub fn get(&self, cow: &str) -> Arc<FakeUserTarget> {
        let opened = self.opened.lock().unwrap();
        let (_, t) = opened.iter().find(|(c, _)| c == cow).unwrap();
        Arc::clone(t)
    }
}

impl UserTargetOpener for Arc<FakeUserOpener> {
    fn open(
        &self,
        cow: &Path,
        source: &Path,
        base: &Path,
    ) -> Result<Arc<dyn UserMergeTarget>, TargetError> {
        let refuse = |why: &str| TargetError::OpenUser {
            cow: cow.to_path_buf(),
            source_path: source.to_path_buf(),
            base: base.to_path_buf(),
            source: why.into(),
        };
        let text = cow.to_str().ok_or_else(|| refuse("not text"))?;
        let (rest, fail) = match text.split_once('!') {
            Some((r, f)) => (r, Some(f.parse().map_err(|_| refuse("bad fail_at"))?)),
            None => (text, None),
        };
        let (sectors, ops) = rest.split_once(':').ok_or_else(|| refuse("no COW"))?;
        let (merged, total) = ops.split_once('/').ok_or_else(|| refuse("no COW"))?;
        let parse = |s: &str| s.parse::<u64>().map_err(|_| refuse("no COW"));
        let t = Arc::new(FakeUserTarget::new(
            parse(sectors)?,
            parse(merged)?,
            parse(total)?,
            fail,
        ));
        self.opened
            .lock()
            .unwrap()
            .push((text.to_string(), Arc::clone(&t)));
        Ok(t)
    }
}

/// Hands out socketpairs as channels, keeping the "kernel" ends (dropping one ends its
/// worker as a destroyed target would).
#[derive(Default)]
pub struct PairChannels {
    /// The kernel ends, by misc name.
    pub kernels: Mutex<Vec<(String, UnixStream)>>,
}

impl PairChannels {
    /// Close every kernel end of `misc`: its workers see the target gone.
    pub fn remove_target(&self, misc: &str) {
        self.kernels.lock().unwrap().retain(|(m, _)| m != misc);
    }
}

impl ChannelOpener for Arc<PairChannels> {
    fn open(&self, misc: &str) -> Result<Channel, ChannelError> {
        let (k, d) = UnixStream::pair().map_err(|source| ChannelError::Io {
            op: "socketpair",
            source,
        })?;
        self.kernels.lock().unwrap().push((misc.to_string(), k));
        Ok(Channel::from_fd(d.into()))
    }
}

/// Wait until `cond` holds, sleeping 1 ms between looks; a minute without it is a failure
/// (something hangs), not a slow machine.
pub fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A directory path that exists nowhere (for verification falling back to the read path).
pub fn nowhere() -> PathBuf {
    PathBuf::from("/nonexistent/snapuserd-test")
}

/// Nice value of this process's thread named `name`, if there is one.
pub fn thread_nice(name: &str) -> Option<i64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 1..];
        // Fields after the command: state is field 3, nice field 19.
        return after.split_whitespace().nth(16)?.parse().ok();
    }
    None
}
