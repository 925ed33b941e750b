//! The handler registry: one handler per dm-user misc name, driven by the control commands.
//!
//! `init` opens the COW and source and builds the snapshot; `start` spawns its workers;
//! `delete` stops and joins them. In the legacy dm-snapshot design the kernel drives the
//! merge, so `initiate_merge` only records the request; `getstatus` and `merge_percent`
//! report what the snapshot core has seen of the kernel's merge.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::snapshot::control_protocol::{MergeStatus, Reply};

use super::transport::{ChannelOpener, RequestHandler, Workers};

/// A served snapshot, as the registry needs it.
pub trait SnapshotTarget: RequestHandler {
    /// Size of the virtual COW device in 512-byte sectors (the `init` reply).
    fn device_sectors(&self) -> u64;
    /// Merge progress in percent.
    fn merge_percent(&self) -> Result<f64, String>;
    /// True once the merge is complete and durable.
    fn merge_complete(&self) -> Result<bool, String>;
}

/// Opens a snapshot from its COW and source paths.
pub trait SnapshotOpener: Send + Sync {
    /// Open the COW at `cow` over the source at `source`.
    fn open(&self, cow: &Path, source: &Path) -> Result<Arc<dyn SnapshotTarget>, String>;
}

#[cfg(not(test))]
mod cow_files {
    use super::*;
    use crate::cow_backend::{source_file::FileSource, CowSnapshot};

    impl SnapshotTarget for CowSnapshot<FileSource> {
        fn device_sectors(&self) -> u64 {
            CowSnapshot::device_sectors(self)
        }
        fn merge_percent(&self) -> Result<f64, String> {
            self.server().merge_percent().map_err(|e| e.to_string())
        }
        fn merge_complete(&self) -> Result<bool, String> {
            self.server().merge_complete().map_err(|e| e.to_string())
        }
    }

    /// Opens COW files and source images or devices with [`CowSnapshot::open`].
    #[derive(Debug, Default, Clone, Copy)]
    pub struct CowFileOpener;

    impl SnapshotOpener for CowFileOpener {
        fn open(&self, cow: &Path, source: &Path) -> Result<Arc<dyn SnapshotTarget>, String> {
            CowSnapshot::open(cow, source)
                .map(|s| Arc::new(s) as Arc<dyn SnapshotTarget>)
                .map_err(|e| e.to_string())
        }
    }
}
#[cfg(not(test))]
pub use cow_files::CowFileOpener;

struct Handler {
    target: Arc<dyn SnapshotTarget>,
    workers: Option<Workers>,
    merge_requested: bool,
}

#[derive(Default)]
struct State {
    handlers: HashMap<String, Handler>,
    /// Handlers deleted after their merge completed (they count as 100% in `merge_percent`).
    completed_deleted: u64,
}

/// All handlers of the daemon.
pub struct HandlerRegistry {
    snapshots: Box<dyn SnapshotOpener>,
    channels: Box<dyn ChannelOpener>,
    worker_count: u32,
    state: Mutex<State>,
}

impl HandlerRegistry {
    /// A registry opening snapshots with `snapshots` and dm-user channels with `channels`,
    /// `worker_count` workers per handler.
    pub fn new(
        snapshots: Box<dyn SnapshotOpener>,
        channels: Box<dyn ChannelOpener>,
        worker_count: u32,
    ) -> Self {
        Self {
            snapshots,
            channels,
            worker_count: worker_count.max(1),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            // Nothing in the critical sections can leave the map inconsistent.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// `init`: open the snapshot and register it; replies with the device size in sectors.
    /// The base device of the 5-field form is accepted and unused (the kernel merges).
    pub fn init(&self, misc: &str, cow: &str, source: &str) -> Reply {
        if self.state().handlers.contains_key(misc) {
            log::error!("init {misc}: a handler with that name exists");
            return Reply::Fail;
        }
        let target = match self.snapshots.open(Path::new(cow), Path::new(source)) {
            Ok(t) => t,
            Err(e) => {
                log::error!("init {misc}: {e}");
                return Reply::Fail;
            }
        };
        let sectors = target.device_sectors();
        if sectors == 0 {
            log::error!("init {misc}: the snapshot device would be empty");
            return Reply::Fail;
        }
        let mut state = self.state();
        if state.handlers.contains_key(misc) {
            log::error!("init {misc}: a handler with that name exists");
            return Reply::Fail;
        }
        state.handlers.insert(
            misc.to_string(),
            Handler {
                target,
                workers: None,
                merge_requested: false,
            },
        );
        log::info!("init {misc}: cow {cow}, source {source}, {sectors} sectors");
        Reply::SuccessSectors(sectors)
    }

    /// `start`: spawn the handler's workers. Fails if it is unknown or already started.
    pub fn start(&self, misc: &str) -> Reply {
        let mut state = self.state();
        let Some(handler) = state.handlers.get_mut(misc) else {
            log::error!("start {misc}: no such handler");
            return Reply::Fail;
        };
        if handler.workers.is_some() {
            log::error!("start {misc}: already started");
            return Reply::Fail;
        }
        let serving: Arc<dyn RequestHandler> = handler.target.clone();
        match Workers::spawn(self.channels.as_ref(), misc, serving, self.worker_count) {
            Ok(w) => {
                handler.workers = Some(w);
                log::info!("start {misc}: {} workers", self.worker_count);
                Reply::Success
            }
            Err(e) => {
                log::error!("start {misc}: {e}");
                Reply::Fail
            }
        }
    }

    /// `delete`: stop and join the handler's workers and forget it (`success` also when it
    /// is unknown, as AOSP answers).
    pub fn delete(&self, misc: &str) -> Reply {
        let removed = self.state().handlers.remove(misc);
        if let Some(mut handler) = removed {
            if let Some(mut w) = handler.workers.take() {
                w.stop_and_join();
            }
            if handler.target.merge_complete().unwrap_or(false) {
                let mut state = self.state();
                state.completed_deleted = state.completed_deleted.saturating_add(1);
            }
            log::info!("delete {misc}");
        }
        Reply::Success
    }

    /// `initiate_merge`: record the request (the kernel's snapshot-merge target drives it).
    pub fn initiate_merge(&self, misc: &str) -> Reply {
        match self.state().handlers.get_mut(misc) {
            Some(h) => {
                h.merge_requested = true;
                Reply::Success
            }
            None => {
                log::error!("initiate_merge {misc}: no such handler");
                Reply::Fail
            }
        }
    }

    /// `getstatus`.
    pub fn status(&self, misc: &str) -> Reply {
        let state = self.state();
        let Some(h) = state.handlers.get(misc) else {
            return Reply::Status(MergeStatus::SnapshotMergeFailed);
        };
        let status = match (h.target.merge_complete(), h.target.merge_percent()) {
            (Ok(true), _) => MergeStatus::SnapshotMergeComplete,
            (Ok(false), Ok(p)) if h.merge_requested || p > 0.0 => MergeStatus::SnapshotMerge,
            (Ok(false), Ok(_)) => MergeStatus::Snapshot,
            (Err(e), _) | (_, Err(e)) => {
                log::error!("getstatus {misc}: {e}");
                MergeStatus::SnapshotMergeFailed
            }
        };
        Reply::Status(status)
    }

    /// `merge_percent`: the average over live handlers and handlers deleted after a complete
    /// merge; 0 with none.
    pub fn merge_percent(&self) -> Reply {
        let state = self.state();
        let mut sum = 100.0 * state.completed_deleted as f64;
        let mut count = state.completed_deleted;
        for (misc, h) in &state.handlers {
            match h.target.merge_percent() {
                Ok(p) => sum += p,
                Err(e) => log::error!("merge_percent {misc}: {e}"),
            }
            count = count.saturating_add(1);
        }
        if count == 0 {
            Reply::MergePercent(0.0)
        } else {
            Reply::MergePercent(sum / count as f64)
        }
    }

    /// `update-verify`: `success` once every registered handler is started (no separate
    /// verification pass runs in the legacy design yet).
    pub fn update_verify(&self) -> Reply {
        if self.state().handlers.values().all(|h| h.workers.is_some()) {
            Reply::Success
        } else {
            Reply::Fail
        }
    }

    /// Number of registered handlers.
    pub fn len(&self) -> usize {
        self.state().handlers.len()
    }

    /// True with no handler registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when no started handler has a worker still running.
    pub fn all_workers_finished(&self) -> bool {
        self.state()
            .handlers
            .values()
            .all(|h| h.workers.as_ref().is_none_or(Workers::all_finished))
    }

    /// Stop and join every handler's workers (the handlers stay registered).
    pub fn stop_all(&self) {
        let mut workers: Vec<Workers> = self
            .state()
            .handlers
            .values_mut()
            .filter_map(|h| h.workers.take())
            .collect();
        for w in &workers {
            w.request_stop();
        }
        for w in &mut workers {
            w.stop_and_join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm_user::{Channel, ChannelError};
    use crate::snapshot::block_server::{Request, Status};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct FakeTarget {
        sectors: u64,
        percent_tenths: AtomicU64,
    }

    impl RequestHandler for FakeTarget {
        fn handle(&self, _: &Request, _: &[u8], _: &mut Vec<u8>) -> Status {
            Status::Unsupported
        }
    }

    impl SnapshotTarget for FakeTarget {
        fn device_sectors(&self) -> u64 {
            self.sectors
        }
        fn merge_percent(&self) -> Result<f64, String> {
            Ok(self.percent_tenths.load(Ordering::Relaxed) as f64 / 10.0)
        }
        fn merge_complete(&self) -> Result<bool, String> {
            Ok(self.percent_tenths.load(Ordering::Relaxed) == 1000)
        }
    }

    /// Opens "<n>" as a fake of n sectors at 0%, and "<n>@<tenths>" at that progress.
    struct FakeOpener;

    impl SnapshotOpener for FakeOpener {
        fn open(&self, cow: &Path, _: &Path) -> Result<Arc<dyn SnapshotTarget>, String> {
            let text = cow.to_str().ok_or("not text")?;
            let (n, p) = text.split_once('@').unwrap_or((text, "0"));
            Ok(Arc::new(FakeTarget {
                sectors: n.parse().map_err(|_| format!("no COW {text}"))?,
                percent_tenths: AtomicU64::new(p.parse().map_err(|_| "bad")?),
            }))
        }
    }

    struct Pairs(Mutex<Vec<UnixStream>>);

    impl ChannelOpener for Pairs {
        fn open(&self, misc: &str) -> Result<Channel, ChannelError> {
            if misc == "nodev" {
                return Err(ChannelError::TargetGone);
            }
            let (k, d) = UnixStream::pair().map_err(|source| ChannelError::Io {
                op: "socketpair",
                source,
            })?;
            self.0.lock().unwrap().push(k);
            Ok(Channel::from_fd(d.into()))
        }
    }

    fn registry() -> HandlerRegistry {
        HandlerRegistry::new(
            Box::new(FakeOpener),
            Box::new(Pairs(Mutex::new(Vec::new()))),
            2,
        )
    }

    #[test]
    fn lifecycle() {
        let r = registry();
        assert_eq!(r.init("a", "4096", "src"), Reply::SuccessSectors(4096));
        assert_eq!(r.init("a", "8", "src"), Reply::Fail, "duplicate name");
        assert_eq!(r.init("b", "missing", "src"), Reply::Fail);
        assert_eq!(r.init("z", "0", "src"), Reply::Fail, "empty device");
        assert_eq!(r.update_verify(), Reply::Fail);
        assert_eq!(r.start("nope"), Reply::Fail);
        assert_eq!(r.start("a"), Reply::Success);
        assert_eq!(r.start("a"), Reply::Fail, "already started");
        assert_eq!(r.update_verify(), Reply::Success);
        assert!(!r.all_workers_finished());
        assert_eq!(r.status("a"), Reply::Status(MergeStatus::Snapshot));
        assert_eq!(r.initiate_merge("x"), Reply::Fail);
        assert_eq!(r.initiate_merge("a"), Reply::Success);
        assert_eq!(r.status("a"), Reply::Status(MergeStatus::SnapshotMerge));
        assert_eq!(
            r.status("x"),
            Reply::Status(MergeStatus::SnapshotMergeFailed)
        );
        assert_eq!(r.delete("a"), Reply::Success);
        assert_eq!(r.delete("a"), Reply::Success, "unknown is success");
        assert!(r.is_empty());
    }

    #[test]
    fn start_fails_without_the_device() {
        let r = registry();
        assert_eq!(r.init("nodev", "8", "src"), Reply::SuccessSectors(8));
        assert_eq!(r.start("nodev"), Reply::Fail);
        assert!(r.all_workers_finished());
    }

    #[test]
    fn merge_percent_averages_live_and_completed_handlers() {
        let r = registry();
        assert_eq!(r.merge_percent(), Reply::MergePercent(0.0));
        r.init("a", "8@1000", "s");
        r.init("b", "8@250", "s");
        assert_eq!(
            r.status("a"),
            Reply::Status(MergeStatus::SnapshotMergeComplete)
        );
        assert_eq!(r.status("b"), Reply::Status(MergeStatus::SnapshotMerge));
        assert_eq!(r.merge_percent(), Reply::MergePercent(62.5));
        r.delete("a");
        r.init("c", "8@0", "s");
        // a (deleted, complete) 100 + b 25 + c 0.
        assert_eq!(r.merge_percent().to_string(), "41.666667");
    }

    #[test]
    fn stop_all_joins_workers() {
        let r = registry();
        r.init("a", "8", "s");
        r.init("b", "8", "s");
        assert_eq!(r.start("a"), Reply::Success);
        assert_eq!(r.start("b"), Reply::Success);
        r.stop_all();
        assert!(r.all_workers_finished());
        assert_eq!(r.len(), 2);
    }
}
