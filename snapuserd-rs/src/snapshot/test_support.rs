//! Test support for the snapshot core: a crash clock and an in-memory merge-state store.
//!
//! The clock counts durable steps and fails every step past a budget, which simulates a
//! power cut at each point of a commit; the store keeps the durable state where a test can
//! read it after the "crash".

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

use super::merge_tracker::{MergeStateStore, ScratchState, ScratchWindow};

/// Fault injection for tests: a budget of durable steps shared by every simulated device.
/// Each step consumes one unit; the first step past the budget "crashes" (fails, applying
/// nothing), and every later step fails too. Clones share the budget; the clock is `Sync`,
/// so a store carrying one can still be served by worker threads.
#[derive(Debug, Clone, Default)]
pub struct CrashClock {
    inner: Arc<CrashClockState>,
}

#[derive(Debug)]
struct CrashClockState {
    /// Steps allowed before the crash; `u64::MAX` for none.
    budget: AtomicU64,
    steps: AtomicU64,
    crashed: AtomicBool,
}

impl Default for CrashClockState {
    fn default() -> Self {
        Self {
            budget: AtomicU64::new(u64::MAX),
            steps: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
        }
    }
}

/// A step refused by a [`CrashClock`].
#[derive(Debug, Error)]
#[error("simulated crash at {what}{}", if *.already_down { " (already down)" } else { "" })]
pub struct SimulatedCrash {
    /// The durable step that was refused.
    pub what: String,
    /// True if the crash had happened at an earlier step.
    pub already_down: bool,
}

impl CrashClock {
    /// A clock that never crashes.
    pub fn never() -> Self {
        CrashClock::default()
    }

    /// A clock that lets `steps` durable steps succeed and crashes on the next one.
    pub fn after(steps: u64) -> Self {
        let clock = CrashClock::default();
        clock.inner.budget.store(steps, Ordering::SeqCst);
        clock
    }

    /// Account for one durable step named `what`; `Err` once crashed.
    pub fn step(&self, what: &str) -> io::Result<()> {
        let s = &self.inner;
        let refuse = |already_down| {
            io::Error::other(SimulatedCrash {
                what: what.to_string(),
                already_down,
            })
        };
        if s.crashed.load(Ordering::SeqCst) {
            return Err(refuse(true));
        }
        let taken = s
            .steps
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < s.budget.load(Ordering::SeqCst)).then_some(n.saturating_add(1))
            });
        if taken.is_err() {
            s.crashed.store(true, Ordering::SeqCst);
            return Err(refuse(false));
        }
        Ok(())
    }

    /// True once the crash has happened.
    pub fn crashed(&self) -> bool {
        self.inner.crashed.load(Ordering::SeqCst)
    }

    /// Steps that succeeded so far.
    pub fn steps(&self) -> u64 {
        self.inner.steps.load(Ordering::SeqCst)
    }
}

/// What survives a crash of an [`InMemoryMergeStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableMergeState {
    /// `num_merge_ops`.
    pub num_merge_ops: u64,
    /// Scratch state byte.
    pub state: ScratchState,
    /// Scratch content.
    pub window: ScratchWindow,
}

impl DurableMergeState {
    /// A fresh COW: nothing merged, scratch untouched.
    pub fn fresh(num_merge_ops: u64) -> Self {
        DurableMergeState {
            num_merge_ops,
            state: ScratchState::NotStarted,
            window: ScratchWindow::default(),
        }
    }
}

/// A [`MergeStateStore`] in memory, every step accounted on a [`CrashClock`].
///
/// The durable state lives behind a shared handle ([`InMemoryMergeStore::shared`]) so a
/// test can still read it after the store was dropped in a simulated crash.
#[derive(Debug)]
pub struct InMemoryMergeStore {
    shared: Rc<RefCell<DurableMergeState>>,
    capacity_blocks: usize,
    clock: CrashClock,
}

impl InMemoryMergeStore {
    /// A store over `durable` with `capacity_blocks` of scratch (0: no scratch).
    pub fn new(durable: DurableMergeState, capacity_blocks: usize, clock: CrashClock) -> Self {
        InMemoryMergeStore {
            shared: Rc::new(RefCell::new(durable)),
            capacity_blocks,
            clock,
        }
    }

    /// A second store over the same durable state (a second daemon opening the same COW).
    pub fn over_shared(
        shared: Rc<RefCell<DurableMergeState>>,
        capacity_blocks: usize,
        clock: CrashClock,
    ) -> Self {
        InMemoryMergeStore {
            shared,
            capacity_blocks,
            clock,
        }
    }

    /// The state a restart would find.
    pub fn durable(&self) -> DurableMergeState {
        self.shared.borrow().clone()
    }

    /// Handle to the durable state that outlives the store.
    pub fn shared(&self) -> Rc<RefCell<DurableMergeState>> {
        Rc::clone(&self.shared)
    }
}

impl MergeStateStore for InMemoryMergeStore {
    fn num_merge_ops(&self) -> u64 {
        self.shared.borrow().num_merge_ops
    }

    fn scratch_state(&self) -> ScratchState {
        self.shared.borrow().state
    }

    fn scratch_capacity_blocks(&self) -> usize {
        self.capacity_blocks
    }

    fn read_window(&self) -> io::Result<ScratchWindow> {
        Ok(self.shared.borrow().window.clone())
    }

    fn commit(&mut self, num_merge_ops: u64) -> io::Result<()> {
        self.clock.step("commit num_merge_ops")?;
        self.shared.borrow_mut().num_merge_ops = num_merge_ops;
        Ok(())
    }

    fn commit_window(&mut self, num_merge_ops: u64) -> io::Result<()> {
        self.clock.step("commit window")?;
        let mut d = self.shared.borrow_mut();
        d.num_merge_ops = num_merge_ops;
        d.state = ScratchState::InProgress;
        Ok(())
    }

    fn write_window(&mut self, window: &ScratchWindow) -> io::Result<()> {
        if window.new_blocks.len() > self.capacity_blocks {
            return Err(io::Error::other("window larger than scratch"));
        }
        self.clock.step("write scratch data")?;
        self.shared.borrow_mut().window = window.clone();
        self.clock.step("set scratch state Done")?;
        self.shared.borrow_mut().state = ScratchState::Done;
        Ok(())
    }

    fn reload(&mut self) -> io::Result<()> {
        // Reads go to the shared durable state directly; nothing is cached.
        Ok(())
    }
}
