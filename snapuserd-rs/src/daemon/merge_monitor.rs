//! The merge monitor of the user-space-merge mode: `initiate_merge` queues a handler, and
//! the monitor starts at most N merges at once (AOSP's `ro.virtual_ab.num_merge_threads`,
//! default 2), in the order they were asked for.
//!
//! Threads: one monitor thread (spawned at the first `initiate_merge`) sleeps on a condition
//! variable until a merge is queued, a slot frees or the daemon shuts down; each merge runs on
//! a thread of its own (`merge-<misc>`) at background priority (nice 10, AOSP's
//! `ANDROID_PRIORITY_BACKGROUND`), so the dm-user workers, which serve the device's reads,
//! win the CPU. A slot frees when its merge completes, fails or is stopped.
//!
//! `pause_merge` / `resume_merge` reach every running merge's [`MergeSwitch`], and a merge
//! started while paused starts paused. Stopping a handler's merge (its `delete`, its
//! workers' end, the daemon's shutdown) takes it out of the queue, or stops it at its next
//! safe point and joins its thread.
//!
//! Locks: the monitor's queue lock and a merge's own state lock are never held together,
//! and no lock is held while a thread is joined.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use crate::error_chain::ErrorChain;

use super::user_target::{MergeEnd, MergeSwitch, UserMergeTarget, UserProgress};

/// Default most merges running at once (AOSP's `kMaxMergeThreads`).
pub const DEFAULT_MERGE_THREADS: u32 = 2;

/// Largest accepted merge-thread limit.
pub const MAX_MERGE_THREADS: u32 = 64;

/// Nice value of the merge threads (AOSP's background priority).
pub const MERGE_NICE: libc::c_int = 10;

/// Where a handler's merge stands, as the monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeRunPhase {
    /// No merge asked for (or the last run was stopped).
    Idle,
    /// Asked for, waiting for a free slot.
    Queued,
    /// Running on its merge thread.
    Running,
    /// The last run was stopped at a safe point (resumable by a new `initiate_merge`).
    Stopped,
    /// The merge completed.
    Complete,
    /// The merge failed.
    Failed,
}

struct RunState {
    phase: MergeRunPhase,
    switch: Option<Arc<dyn MergeSwitch>>,
    thread: Option<JoinHandle<()>>,
}

/// One handler's merge: the snapshot it merges and where its merge stands.
pub struct UserMerge {
    misc: String,
    target: Arc<dyn UserMergeTarget>,
    state: Mutex<RunState>,
}

impl UserMerge {
    /// The merge of `target`, served as `misc`, not asked for yet.
    pub fn new(misc: &str, target: Arc<dyn UserMergeTarget>) -> Arc<Self> {
        Arc::new(Self {
            misc: misc.to_string(),
            target,
            state: Mutex::new(RunState {
                phase: MergeRunPhase::Idle,
                switch: None,
                thread: None,
            }),
        })
    }

    /// The snapshot.
    pub fn target(&self) -> &Arc<dyn UserMergeTarget> {
        &self.target
    }

    /// Where the merge stands.
    pub fn phase(&self) -> MergeRunPhase {
        lock(&self.state).phase
    }

    /// The COW's merge progress.
    pub fn progress(&self) -> UserProgress {
        self.target.progress()
    }

    fn set_phase(&self, phase: MergeRunPhase) {
        lock(&self.state).phase = phase;
    }
}

struct Queue {
    waiting: VecDeque<Arc<UserMerge>>,
    active: u32,
    limit: u32,
    closed: bool,
    known: Vec<Weak<UserMerge>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    paused: AtomicBool,
    io_uring: bool,
}

/// The merge monitor: a FIFO of requested merges and at most `limit` running at once.
pub struct MergeMonitor {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        // Every critical section leaves the data consistent.
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl MergeMonitor {
    /// A monitor running at most `limit` merges at once (at least 1), each over the
    /// io_uring engine when `io_uring` (else the synchronous engine).
    pub fn new(limit: u32, io_uring: bool) -> Self {
        Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    waiting: VecDeque::new(),
                    active: 0,
                    limit: limit.max(1),
                    closed: false,
                    known: Vec::new(),
                }),
                wake: Condvar::new(),
                paused: AtomicBool::new(false),
                io_uring,
            }),
            thread: Mutex::new(None),
        }
    }

    /// Most merges running at once.
    pub fn limit(&self) -> u32 {
        lock(&self.shared.queue).limit
    }

    /// Change the limit (for merges started from now on).
    pub fn set_limit(&self, limit: u32) {
        lock(&self.shared.queue).limit = limit.max(1);
        self.shared.wake.notify_all();
    }

    /// Queue `merge` (`initiate_merge`). A merge already queued or running stays as it is;
    /// one already complete is not run again. False once the monitor is shut down, or when
    /// its thread cannot be spawned.
    pub fn enqueue(&self, merge: &Arc<UserMerge>) -> bool {
        {
            let mut st = lock(&merge.state);
            match st.phase {
                MergeRunPhase::Queued | MergeRunPhase::Running | MergeRunPhase::Complete => {
                    return true
                }
                MergeRunPhase::Idle | MergeRunPhase::Stopped | MergeRunPhase::Failed => {}
            }
            if merge.target.progress().complete {
                st.phase = MergeRunPhase::Complete;
                return true;
            }
            st.phase = MergeRunPhase::Queued;
        }
        {
            let mut q = lock(&self.shared.queue);
            if q.closed {
                drop(q);
                merge.set_phase(MergeRunPhase::Stopped);
                return false;
            }
            q.known.retain(|k| k.strong_count() > 0);
            if !q
                .known
                .iter()
                .any(|k| std::ptr::eq(k.as_ptr(), Arc::as_ptr(merge)))
            {
                q.known.push(Arc::downgrade(merge));
            }
            q.waiting.push_back(Arc::clone(merge));
            log::info!(
                "{}: merge queued ({} waiting, {} of {} slots busy)",
                merge.misc,
                q.waiting.len(),
                q.active,
                q.limit
            );
        }
        if !self.ensure_thread() {
            self.stop(merge);
            merge.set_phase(MergeRunPhase::Failed);
            return false;
        }
        self.shared.wake.notify_all();
        true
    }

    fn ensure_thread(&self) -> bool {
        let mut thread = lock(&self.thread);
        if thread.is_some() {
            return true;
        }
        let shared = Arc::clone(&self.shared);
        match std::thread::Builder::new()
            .name("merge-monitor".into())
            .spawn(move || monitor_loop(&shared))
        {
            Ok(t) => {
                *thread = Some(t);
                true
            }
            Err(e) => {
                log::error!(
                    "cannot spawn the merge monitor thread: {chain}",
                    chain = ErrorChain(&e)
                );
                false
            }
        }
    }

    /// Pause (or resume) every running merge at its next safe point; merges started while
    /// paused start paused.
    pub fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::SeqCst);
        let known: Vec<Arc<UserMerge>> = {
            let mut q = lock(&self.shared.queue);
            q.known.retain(|k| k.strong_count() > 0);
            q.known.iter().filter_map(Weak::upgrade).collect()
        };
        for m in known {
            let switch = lock(&m.state).switch.clone();
            if let Some(s) = switch {
                if paused {
                    s.pause();
                } else {
                    s.resume();
                }
            }
        }
    }

    /// True while `pause_merge` holds the merges.
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// Ask `merge` to stop without waiting: out of the queue if queued, stopped at its next
    /// safe point if running.
    pub fn request_stop(&self, merge: &Arc<UserMerge>) {
        let was_queued = {
            let mut q = lock(&self.shared.queue);
            let before = q.waiting.len();
            q.waiting.retain(|m| !Arc::ptr_eq(m, merge));
            q.waiting.len() != before
        };
        let mut st = lock(&merge.state);
        if was_queued || st.phase == MergeRunPhase::Queued {
            st.phase = MergeRunPhase::Stopped;
            log::info!("{}: queued merge withdrawn", merge.misc);
        }
        if let Some(s) = &st.switch {
            s.stop();
        }
    }

    /// Stop `merge` (see [`request_stop`](Self::request_stop)) and wait for its thread.
    pub fn stop(&self, merge: &Arc<UserMerge>) {
        self.request_stop(merge);
        let thread = lock(&merge.state).thread.take();
        if let Some(t) = thread {
            if t.join().is_err() {
                log::error!("{}: the merge thread panicked", merge.misc);
            }
        }
    }

    /// Refuse new merges, stop every queued and running one, and join every thread.
    pub fn shut_down(&self) {
        let known: Vec<Arc<UserMerge>> = {
            let mut q = lock(&self.shared.queue);
            q.closed = true;
            q.known.iter().filter_map(Weak::upgrade).collect()
        };
        self.shared.wake.notify_all();
        for m in &known {
            self.stop(m);
        }
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            if t.join().is_err() {
                log::error!("the merge monitor thread panicked");
            }
        }
    }

    /// Merges running now.
    pub fn active(&self) -> u32 {
        lock(&self.shared.queue).active
    }
}

impl Drop for MergeMonitor {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The monitor thread: start queued merges while a slot is free, until shut down.
fn monitor_loop(shared: &Arc<Shared>) {
    let mut q = lock(&shared.queue);
    loop {
        while !q.closed && (q.active >= q.limit || q.waiting.is_empty()) {
            q = match shared.wake.wait(q) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
        if q.closed {
            return;
        }
        let Some(merge) = q.waiting.pop_front() else {
            continue;
        };
        q.active = q.active.saturating_add(1);
        drop(q);
        if !start_run(shared, &merge) {
            release_slot(shared);
        }
        q = lock(&shared.queue);
    }
}

fn release_slot(shared: &Shared) {
    let mut q = lock(&shared.queue);
    q.active = q.active.saturating_sub(1);
    drop(q);
    shared.wake.notify_all();
}

/// Start `merge` on a thread of its own; false (the slot is not used) if it was withdrawn
/// meanwhile or the thread cannot be spawned.
fn start_run(shared: &Arc<Shared>, merge: &Arc<UserMerge>) -> bool {
    let mut st = lock(&merge.state);
    if st.phase != MergeRunPhase::Queued {
        return false;
    }
    let prepared = Arc::clone(&merge.target).prepare_merge(shared.io_uring);
    st.switch = Some(Arc::clone(&prepared.switch));
    st.phase = MergeRunPhase::Running;
    // After the switch is visible: a pause set meanwhile is seen either here or by
    // `set_paused` walking the switches.
    if shared.paused.load(Ordering::SeqCst) {
        prepared.switch.pause();
    }
    let body = prepared.body;
    let run_merge = Arc::clone(merge);
    let run_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(thread_name(&merge.misc))
        .spawn(move || {
            lower_thread_priority(MERGE_NICE, "merge");
            log::info!("{}: merge started", run_merge.misc);
            let phase = match body() {
                Ok(MergeEnd::Complete) => {
                    log::info!("{}: merge complete", run_merge.misc);
                    MergeRunPhase::Complete
                }
                Ok(MergeEnd::Stopped) => {
                    log::info!(
                        "{}: merge stopped at a safe point; initiate_merge resumes it",
                        run_merge.misc
                    );
                    MergeRunPhase::Stopped
                }
                Err(e) => {
                    log::error!(
                        "{}: merge failed: {chain}; the COW keeps the merged progress, a \
                         restarted daemon resumes from it",
                        run_merge.misc,
                        chain = ErrorChain(&e)
                    );
                    MergeRunPhase::Failed
                }
            };
            {
                let mut st = lock(&run_merge.state);
                st.phase = phase;
                st.switch = None;
            }
            release_slot(&run_shared);
        });
    match spawned {
        Ok(t) => {
            st.thread = Some(t);
            true
        }
        Err(e) => {
            st.phase = MergeRunPhase::Failed;
            st.switch = None;
            log::error!(
                "{}: cannot spawn the merge thread: {chain}",
                merge.misc,
                chain = ErrorChain(&e)
            );
            false
        }
    }
}

/// Thread names are at most 15 bytes on Linux.
fn thread_name(misc: &str) -> String {
    let mut name = String::from("merge-");
    for c in misc.chars() {
        if name.len() + c.len_utf8() > 15 {
            break;
        }
        name.push(c);
    }
    name
}

/// Lower the calling thread's CPU priority to `nice` (Linux nice values are per thread).
/// A refusal only costs speed; it is logged with what it means.
pub fn lower_thread_priority(nice: libc::c_int, what: &str) {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let Ok(tid) = libc::id_t::try_from(tid) else {
        return;
    };
    // SAFETY: setpriority only changes the scheduling priority of thread `tid` (this one).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
        log::warn!(
            "the {what} thread keeps its priority (setpriority nice {nice}: {}); it competes \
             with the dm-user workers for the CPU",
            std::io::Error::last_os_error()
        );
    }
}
