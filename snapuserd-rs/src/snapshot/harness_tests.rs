//! End-to-end host tests: kernel model + block server + exception store + merge tracker +
//! in-memory durable store, over an in-memory source/target image pair.
//!
//! The expected target is computed independently of the daemon code: every op's block is
//! produced from the pristine source image (COPY/XOR read it, REPLACE/ZERO do not).

use std::cell::RefCell;
use std::rc::Rc;

use proptest::prelude::*;

use super::block_server::{BlockServer, BlockServerError, BlockSource};
use super::dm_snapshot_model::{
    crash_sweep, CowDevice, CrashMode, DmSnapshot, MergeStep, Origin, OriginDevice, ServerCow,
};
use super::merge_plan::{MergePlan, OpKind, PlannedOp, SourceDevice, BLOCK_SIZE, BLOCK_SIZE_U64};
use super::merge_tracker::ScratchState;
use super::test_support::{CrashClock, DurableMergeState, InMemoryMergeStore};

const SCRATCH: usize = 510;

/// Deterministic byte generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 56) as u8).collect()
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    source: Vec<u8>,
    ops: Vec<PlannedOp>,
    /// REPLACE data or XOR delta per op.
    payloads: Rc<Vec<Option<Vec<u8>>>>,
    scratch_blocks: usize,
}

impl Scenario {
    fn new(blocks: u64, ops: Vec<PlannedOp>, scratch_blocks: usize, seed: u64) -> Self {
        let mut rng = Rng(seed | 1);
        let source = rng.bytes(blocks as usize * BLOCK_SIZE);
        let payloads = ops
            .iter()
            .map(|op| match op.kind {
                OpKind::Replace | OpKind::Xor => Some(rng.bytes(BLOCK_SIZE)),
                _ => None,
            })
            .collect();
        Scenario {
            source,
            ops,
            payloads: Rc::new(payloads),
            scratch_blocks,
        }
    }

    /// The new image, from the pristine source.
    fn target(&self) -> Vec<u8> {
        let mut img = self.source.clone();
        for (i, op) in self.ops.iter().enumerate() {
            let block = self.op_block(i, op);
            let at = op.new_block as usize * BLOCK_SIZE;
            img[at..at + BLOCK_SIZE].copy_from_slice(&block);
        }
        img
    }

    fn op_block(&self, i: usize, op: &PlannedOp) -> Vec<u8> {
        match op.kind {
            OpKind::Zero => vec![0u8; BLOCK_SIZE],
            OpKind::Replace => self.payloads[i].clone().unwrap(),
            OpKind::Copy => {
                let at = op.source as usize * BLOCK_SIZE;
                self.source[at..at + BLOCK_SIZE].to_vec()
            }
            OpKind::Xor => {
                let at = op.source as usize;
                let delta = self.payloads[i].as_ref().unwrap();
                self.source[at..at + BLOCK_SIZE]
                    .iter()
                    .zip(delta)
                    .map(|(a, b)| a ^ b)
                    .collect()
            }
        }
    }
}

/// The cow-reader stand-in: produces op data the way the COW reader will.
struct TestBlocks {
    payloads: Rc<Vec<Option<Vec<u8>>>>,
}

impl BlockSource for TestBlocks {
    fn read_op_block(
        &self,
        op_index: usize,
        op: &PlannedOp,
        source: &dyn SourceDevice,
        out: &mut [u8],
    ) -> std::io::Result<()> {
        let payload = || {
            self.payloads
                .get(op_index)
                .and_then(|p| p.as_ref())
                .ok_or_else(|| std::io::Error::other("no payload"))
        };
        match op.kind {
            OpKind::Zero => out.fill(0),
            OpKind::Replace => out.copy_from_slice(payload()?),
            OpKind::Copy => source.read_exact_at(out, op.source * BLOCK_SIZE_U64)?,
            OpKind::Xor => {
                source.read_exact_at(out, op.source)?;
                for (o, d) in out.iter_mut().zip(payload()?) {
                    *o ^= d;
                }
            }
        }
        Ok(())
    }
}

type Server = BlockServer<TestBlocks, Origin, InMemoryMergeStore>;

struct Booted {
    origin: Origin,
    durable: Rc<RefCell<DurableMergeState>>,
    server: Result<Server, BlockServerError>,
}

fn boot(sc: &Scenario, image: Vec<u8>, durable: DurableMergeState, clock: CrashClock) -> Booted {
    let origin = OriginDevice::create(image, clock.clone());
    let plan = MergePlan::new(sc.ops.clone(), durable.num_merge_ops).unwrap();
    let store = InMemoryMergeStore::new(durable, sc.scratch_blocks, clock);
    let shared = store.shared();
    let server = BlockServer::new(
        plan,
        TestBlocks {
            payloads: Rc::clone(&sc.payloads),
        },
        origin.clone(),
        store,
    );
    Booted {
        origin,
        durable: shared,
        server,
    }
}

/// Boot on the pristine source with nothing merged and no crash.
fn boot_fresh(sc: &Scenario) -> Booted {
    boot(
        sc,
        sc.source.clone(),
        DurableMergeState::fresh(0),
        CrashClock::never(),
    )
}

/// Read every block of the snapshot device through a freshly loaded table.
fn snapshot_view(server: &Server, origin: &Origin) -> Vec<u8> {
    let mut cow = ServerCow { server };
    let snap = DmSnapshot::load(&mut cow).unwrap();
    view_of(&snap, origin, &mut cow)
}

fn view_of(snap: &DmSnapshot, origin: &Origin, cow: &mut dyn CowDevice) -> Vec<u8> {
    let mut img = Vec::with_capacity(origin.blocks() as usize * BLOCK_SIZE);
    let mut buf = [0u8; BLOCK_SIZE];
    for b in 0..origin.blocks() {
        snap.read_block(origin, cow, b, &mut buf).unwrap();
        img.extend_from_slice(&buf);
    }
    img
}

/// Run the merge loop to the end; optionally check the snapshot view after every batch.
fn merge(
    server: &Server,
    origin: &Origin,
    check: Option<&[u8]>,
) -> Result<usize, super::dm_snapshot_model::ModelError> {
    let mut cow = ServerCow { server };
    let mut snap = DmSnapshot::load(&mut cow)?;
    let mut batches = 0;
    let mut percent = server.merge_percent().unwrap();
    loop {
        match snap.merge_step(origin, &mut cow)? {
            MergeStep::Done => return Ok(batches),
            MergeStep::Merged(_) => {
                batches += 1;
                let now = server.merge_percent().unwrap();
                assert!(
                    now > percent,
                    "merge_percent did not advance: {percent} -> {now}"
                );
                percent = now;
                if let Some(target) = check {
                    assert!(
                        view_of(&snap, origin, &mut cow) == target,
                        "snapshot view differs after batch {batches}"
                    );
                }
            }
        }
    }
}

fn assert_images_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let bad: Vec<usize> = (0..want.len() / BLOCK_SIZE)
            .filter(|&b| {
                got[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]
                    != want[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]
            })
            .take(10)
            .collect();
        panic!("{what}: blocks differ from the target, first ones: {bad:?}");
    }
}

/// Clean run: snapshot view == target, merge, base == target, nothing left afterwards.
fn run_clean(sc: &Scenario, check_each_batch: bool) -> usize {
    let target = sc.target();
    let b = boot_fresh(sc);
    let server = b.server.unwrap();
    assert_images_eq(&snapshot_view(&server, &b.origin), &target, "snapshot view");
    let batches = merge(&server, &b.origin, check_each_batch.then_some(&target[..])).unwrap();
    assert!(server.merge_complete().unwrap());
    assert_eq!(server.merge_percent().unwrap(), 100.0);
    assert_images_eq(&b.origin.image(), &target, "merged base");
    assert_eq!(b.durable.borrow().num_merge_ops, sc.ops.len() as u64);
    // A restarted daemon presents an empty table.
    let again = boot(
        sc,
        b.origin.image(),
        b.durable.borrow().clone(),
        CrashClock::never(),
    );
    let server = again.server.unwrap();
    assert_eq!(server.exceptions().num_exceptions(), 0);
    assert_eq!(merge(&server, &again.origin, None).unwrap(), 0);
    batches
}

/// Boot with each crash budget in turn (a crash, then a reboot from the durable state
/// only), then finish without crashing. Returns how many crashes actually happened.
fn run_with_crashes(sc: &Scenario, budgets: &[u64], mode: CrashMode, check_view: bool) -> usize {
    let target = sc.target();
    let mut image = sc.source.clone();
    let mut durable = DurableMergeState::fresh(0);
    let mut crashes = 0;
    for &budget in budgets {
        let clock = CrashClock::after(budget);
        let b = boot(sc, image.clone(), durable.clone(), clock.clone());
        let result = match &b.server {
            Ok(server) => {
                // The table load is the daemon's first request: it activates merge
                // tracking, whose first durable step may be the one that crashes.
                let mut cow = ServerCow { server };
                match DmSnapshot::load(&mut cow) {
                    Ok(snap) => {
                        if check_view {
                            assert_images_eq(
                                &view_of(&snap, &b.origin, &mut cow),
                                &target,
                                "snapshot view before merge",
                            );
                        }
                        merge(server, &b.origin, None).map(|_| ())
                    }
                    Err(e) => Err(e),
                }
            }
            Err(_) => Err(super::dm_snapshot_model::ModelError::BadTable(
                "boot failed".into(),
            )),
        };
        if !clock.crashed() {
            result.unwrap();
            assert_images_eq(&b.origin.image(), &target, "merged base (no crash)");
            return crashes;
        }
        assert!(result.is_err(), "a crash must surface as an error");
        crashes += 1;
        image = b.origin.crash_image(mode);
        durable = b.durable.borrow().clone();
    }
    let b = boot(sc, image, durable, CrashClock::never());
    let server = b.server.unwrap();
    assert_images_eq(
        &snapshot_view(&server, &b.origin),
        &target,
        "snapshot view after restart",
    );
    merge(&server, &b.origin, None).unwrap();
    assert_images_eq(&b.origin.image(), &target, "merged base after restart");
    assert_eq!(b.durable.borrow().num_merge_ops, sc.ops.len() as u64);
    crashes
}

/// Crash at every step (budgets 0, stride, 2*stride, ...) in every crash mode.
fn crash_everywhere(sc: &Scenario, stride: u64, check_view: bool) -> u64 {
    crash_sweep(stride, |budget, mode| {
        run_with_crashes(sc, &[budget], mode, check_view) == 1
    })
}

// ---------------------------------------------------------------------------------------
// Hand-built scenarios.

/// 20→23, 19→22, … : each op copies to three blocks higher, highest first.
fn chain_up(start: u64, len: u64, shift: u64) -> Vec<PlannedOp> {
    (0..len)
        .rev()
        .map(|i| PlannedOp::copy(start + i + shift, start + i))
        .collect()
}

/// The mirror image: each op copies from `shift` blocks higher, lowest first.
fn chain_down(start: u64, len: u64, shift: u64) -> Vec<PlannedOp> {
    (0..len)
        .map(|i| PlannedOp::copy(start + i, start + i + shift))
        .collect()
}

fn mixed_ops() -> Vec<PlannedOp> {
    let mut ops = chain_up(20, 6, 3); // 23<-20 ... 18<-15
    ops.extend([50, 51, 52, 53].map(|b| PlannedOp::copy(b, b + 25)));
    ops.push(PlannedOp::xor(60, 70 * 4096 + 1000)); // unaligned: spans blocks 70 and 71
    ops.push(PlannedOp::xor(61, 40 * 4096)); // aligned
    ops.push(PlannedOp::copy(70, 61)); // reads 61 after... no: 61 was written above: invalid
    ops.pop();
    ops.push(PlannedOp::copy(72, 60 + 30)); // independent
    ops.extend(chain_down(100, 8, 2)); // 100<-102, 101<-103, ...
    ops.push(PlannedOp::xor(80, 100 * 4096 + 17)); // reads 100,101 after they were overwritten: invalid
    ops.pop();
    let mut rz: Vec<PlannedOp> = (120..140)
        .map(PlannedOp::replace)
        .chain((140..150).map(PlannedOp::zero))
        .collect();
    rz.sort_by_key(|op| std::cmp::Reverse(op.new_block));
    ops.extend(rz);
    ops
}

/// True if `ops` is a valid merge order: no op reads a block an earlier op wrote.
fn is_valid_order(ops: &[PlannedOp]) -> bool {
    let mut written = std::collections::HashSet::new();
    for op in ops {
        if op.source_blocks().iter().any(|b| written.contains(&b)) {
            return false;
        }
        written.insert(op.new_block);
    }
    true
}

#[test]
fn hand_built_scenarios_are_valid_orders() {
    for ops in [mixed_ops(), chain_up(20, 40, 3), chain_down(0, 40, 3)] {
        assert!(is_valid_order(&ops));
        assert!(MergePlan::new(ops, 0).is_ok());
    }
}

#[test]
fn no_ops() {
    let sc = Scenario::new(8, vec![], SCRATCH, 1);
    assert_eq!(run_clean(&sc, true), 0);
    assert_eq!(crash_everywhere(&sc, 1, true), 0);
}

#[test]
fn all_zero_across_areas() {
    // 300 ZERO ops, descending (legacy order): spans two metadata areas.
    let ops = (0..300).rev().map(PlannedOp::zero).collect();
    let sc = Scenario::new(320, ops, SCRATCH, 2);
    // Consecutive blocks and chunks: the kernel batches each area in one go.
    assert_eq!(run_clean(&sc, true), 2);
    // Every 5th step: the steps inside one batch are 256 alike origin writes.
    assert!(crash_everywhere(&sc, 5, false) > 0);
    // And every step around the end of the first batch (origin flush, commit, next batch).
    for budget in 250..270 {
        for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
            run_with_crashes(&sc, &[budget], mode, true);
        }
    }
}

#[test]
fn overlapping_chain_upwards_with_and_without_scratch() {
    for scratch in [SCRATCH, 0] {
        let sc = Scenario::new(64, chain_up(20, 6, 3), scratch, 3);
        // Two groups of three, as in reference §A.5.
        assert_eq!(run_clean(&sc, true), 2);
        assert!(crash_everywhere(&sc, 1, true) > 0);
        let sc = Scenario::new(96, chain_up(5, 60, 3), scratch, 4);
        run_clean(&sc, true);
        assert!(crash_everywhere(&sc, 1, true) > 0);
    }
}

#[test]
fn overlapping_chain_downwards_with_and_without_scratch() {
    for scratch in [SCRATCH, 0] {
        let sc = Scenario::new(96, chain_down(5, 60, 3), scratch, 5);
        run_clean(&sc, true);
        assert!(crash_everywhere(&sc, 1, true) > 0);
    }
}

#[test]
fn mixed_ops_with_unaligned_xor() {
    for scratch in [SCRATCH, 0] {
        let sc = Scenario::new(160, mixed_ops(), scratch, 6);
        run_clean(&sc, true);
        assert!(crash_everywhere(&sc, 1, true) > 0);
    }
}

#[test]
fn xor_chains_with_unaligned_sources() {
    // Each XOR reads bytes straddling blocks i and i+1 and writes block i+3, highest first.
    let ops: Vec<PlannedOp> = (0..40u64)
        .rev()
        .map(|i| PlannedOp::xor(i + 3, i * 4096 + 2048))
        .collect();
    assert!(is_valid_order(&ops));
    for scratch in [SCRATCH, 0] {
        let sc = Scenario::new(48, ops.clone(), scratch, 7);
        run_clean(&sc, true);
        assert!(crash_everywhere(&sc, 1, true) > 0);
    }
}

#[test]
fn xor_reading_its_own_block_with_scratch() {
    // In-place XOR diffs: each op reads (part of) the block it writes, plus a neighbour
    // that an earlier op of the same chain has not written yet.
    let ops: Vec<PlannedOp> = (0..30u64)
        .map(|i| PlannedOp::xor(i, i * 4096 + 1024))
        .collect();
    assert!(is_valid_order(&ops));
    let sc = Scenario::new(32, ops, SCRATCH, 14);
    run_clean(&sc, true);
    assert!(crash_everywhere(&sc, 1, true) > 0);
}

#[test]
fn more_ordered_ops_than_one_window() {
    // 1100 overlapping copies (three windows) followed by REPLACE ops.
    let mut ops = chain_up(0, 1100, 1);
    ops.extend((1200..1230).rev().map(PlannedOp::replace));
    let sc = Scenario::new(1240, ops, SCRATCH, 8);
    run_clean(&sc, false);
    // Every 401st step in every crash mode, plus every step around the first window end:
    // boot saves window 1 (steps 1-2), batch k writes the origin (step 2k+1) and flushes
    // (2k+2); after batch 510 (step 1022) come the window commit (1023) and the scratch
    // write of window 2 (1024-1025).
    assert!(crash_everywhere(&sc, 401, false) > 0);
    for budget in 1016..1030 {
        for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
            assert_eq!(run_with_crashes(&sc, &[budget], mode, false), 1);
        }
    }
    // Independent copies, highest block first: the kernel batches them, but never across a
    // window end (2 cuts), an area end (4 cuts) or a skipped metadata chunk (at most 5
    // cuts): between 7 and 12 batches, never the 1100 of unbatched merging.
    let ops: Vec<PlannedOp> = (0..1100)
        .rev()
        .map(|i| PlannedOp::copy(1200 + i, i))
        .collect();
    let sc = Scenario::new(2300, ops, SCRATCH, 9);
    let batches = run_clean(&sc, false);
    assert!((7..=12).contains(&batches), "{batches} batches");
    // Every 37th step (about 1130 steps: 1100 origin writes, their flushes and commits).
    assert!(crash_everywhere(&sc, 37, false) > 0);
    // Ascending independent copies cannot batch without reordering, which we never do.
    let ops: Vec<PlannedOp> = (0..600).map(|i| PlannedOp::copy(700 + i, i)).collect();
    let sc = Scenario::new(1300, ops, SCRATCH, 13);
    assert_eq!(run_clean(&sc, false), 600);
}

/// A second daemon on the same origin and the same durable merge state (the COW file), as a
/// handoff starts one while dm-snapshot keeps running.
fn serve_shared(
    sc: &Scenario,
    origin: &Origin,
    durable: &Rc<RefCell<DurableMergeState>>,
) -> Server {
    let merged = durable.borrow().num_merge_ops;
    let plan = MergePlan::new(sc.ops.clone(), merged).unwrap();
    let store =
        InMemoryMergeStore::over_shared(Rc::clone(durable), sc.scratch_blocks, CrashClock::never());
    BlockServer::new(
        plan,
        TestBlocks {
            payloads: Rc::clone(&sc.payloads),
        },
        origin.clone(),
        store,
    )
    .unwrap()
}

/// Live handoff: dm-snapshot keeps its in-core table (a dm-user table swap, not a snapshot
/// reload) while the daemon behind the COW device changes. Daemon A serves the first
/// `switch_at` merge batches; daemon B is opened on the same COW after `opened_at` batches
/// (`opened_at < switch_at`: B was initialised while A kept merging, as in the second-stage
/// transition of libsnapshot) and serves everything from batch `switch_at` on. Returns
/// false when the merge finished before the switch.
fn run_handoff(sc: &Scenario, opened_at: usize, switch_at: usize) -> bool {
    assert!(opened_at <= switch_at);
    let target = sc.target();
    let b = boot_fresh(sc);
    let daemon_a = b.server.unwrap();
    let mut cow_a = ServerCow { server: &daemon_a };
    let mut snap = DmSnapshot::load(&mut cow_a).unwrap();
    let mut daemon_b = None;
    for batch in 0..switch_at {
        if batch == opened_at {
            daemon_b = Some(serve_shared(sc, &b.origin, &b.durable));
        }
        if snap.merge_step(&b.origin, &mut cow_a).unwrap() == MergeStep::Done {
            return false;
        }
    }
    let daemon_b = daemon_b.unwrap_or_else(|| serve_shared(sc, &b.origin, &b.durable));
    assert_eq!(
        daemon_b.device_sectors(),
        daemon_a.device_sectors(),
        "the new daemon must present a device of the same size (Android reloads the dm-user table with the same length)"
    );
    let mut cow_b = ServerCow { server: &daemon_b };
    // Reads through the kept in-core table are now served by daemon B.
    assert_images_eq(
        &view_of(&snap, &b.origin, &mut cow_b),
        &target,
        &format!("snapshot view after a handoff at batch {switch_at} (B opened at {opened_at})"),
    );
    loop {
        match snap.merge_step(&b.origin, &mut cow_b) {
            Ok(MergeStep::Done) => break,
            Ok(MergeStep::Merged(_)) => {}
            Err(e) => {
                panic!("merge after a handoff at batch {switch_at} (B opened at {opened_at}): {e}")
            }
        }
    }
    assert_images_eq(&b.origin.image(), &target, "merged base after a handoff");
    assert_eq!(b.durable.borrow().num_merge_ops, sc.ops.len() as u64);
    assert!(
        daemon_b.merge_complete().unwrap(),
        "daemon B does not see the merge complete after a handoff at {switch_at} (opened at {opened_at}): {:?}",
        b.durable.borrow().num_merge_ops
    );
    true
}

/// 600 overlapping copies (two read-ahead windows, three metadata areas) and 30 REPLACEs,
/// with and without scratch: a handoff at sampled batches and at every batch around the
/// window end and the area boundaries, with the new daemon opened just before the switch or
/// up to 520 batches earlier (so that it missed a whole window commit).
#[test]
fn live_handoff_mid_merge() {
    let mut ops = chain_up(0, 600, 1);
    ops.extend((1200..1230).rev().map(PlannedOp::replace));
    for scratch in [SCRATCH, 0] {
        let sc = Scenario::new(1240, ops.clone(), scratch, 14);
        let batches = run_clean(&sc, false);
        // The copies merge one per batch in merge order (copy k is batch k), then the 30
        // REPLACEs (descending blocks on ascending chunks) as one batch. The window ends
        // after copy 510; area 2 holds ops 0..118 and area 1 ops 118..374.
        assert_eq!(batches, 601);
        let mut switches: Vec<usize> = (1..batches).step_by(53).collect();
        for edge in [118, 374, 510, 600] {
            switches.extend(edge - 2..edge + 3);
        }
        let mut done = 0;
        for &switch_at in &switches {
            for back in [0, 1, 9, 520] {
                let opened_at = switch_at.saturating_sub(back);
                if run_handoff(&sc, opened_at, switch_at) {
                    done += 1;
                }
            }
        }
        // Only a switch after the last batch finds the merge done.
        assert!(done >= 4 * (switches.len() - 2), "{done} handoffs ran");
    }
}

#[test]
fn resume_from_nonzero_num_merge_ops() {
    // The COW says the first 3 ops are merged; the origin already has them.
    let ops = chain_up(20, 6, 3);
    let sc = Scenario::new(64, ops, SCRATCH, 10);
    let target = sc.target();
    let mut image = sc.source.clone();
    for (i, op) in sc.ops.iter().enumerate().take(3) {
        let at = op.new_block as usize * BLOCK_SIZE;
        image[at..at + BLOCK_SIZE].copy_from_slice(&sc.op_block(i, op));
    }
    let b = boot(&sc, image, DurableMergeState::fresh(3), CrashClock::never());
    let server = b.server.unwrap();
    assert_eq!(server.exceptions().num_exceptions(), 3);
    assert_images_eq(&snapshot_view(&server, &b.origin), &target, "view");
    merge(&server, &b.origin, Some(&target)).unwrap();
    assert_images_eq(&b.origin.image(), &target, "base");
}

#[test]
fn double_crashes() {
    let sc = Scenario::new(160, mixed_ops(), SCRATCH, 11);
    for a in (0..60).step_by(7) {
        for b in (0..60).step_by(5) {
            run_with_crashes(&sc, &[a, b], CrashMode::KeepUnflushed, false);
        }
    }
}

/// The harness can see corruption: drop the scratch window after a crash in the middle of
/// an overlapping window, and replaying from the overwritten source goes wrong.
#[test]
fn harness_detects_ignoring_the_scratch_window() {
    let sc = Scenario::new(64, chain_up(20, 6, 3), SCRATCH, 12);
    let target = sc.target();
    // Find a crash point after the second batch wrote the origin (mid-window, nothing committed).
    let mut corrupted = false;
    for budget in 0..40 {
        let clock = CrashClock::after(budget);
        let b = boot(
            &sc,
            sc.source.clone(),
            DurableMergeState::fresh(0),
            clock.clone(),
        );
        let Ok(server) = &b.server else { continue };
        let _ = merge(server, &b.origin, None);
        if !clock.crashed() {
            break;
        }
        let mut durable = b.durable.borrow().clone();
        if durable.state != ScratchState::Done || durable.num_merge_ops != 0 {
            continue;
        }
        durable.state = ScratchState::InProgress; // forget the window
        let image = b.origin.crash_image(CrashMode::KeepUnflushed);
        let b = boot(&sc, image, durable, CrashClock::never());
        let server = b.server.unwrap();
        merge(&server, &b.origin, None).unwrap();
        if b.origin.image() != target {
            corrupted = true;
        }
    }
    assert!(
        corrupted,
        "losing the scratch window never corrupted the base: the crash test is blind"
    );
}

// ---------------------------------------------------------------------------------------
// Random valid merge orders.

#[derive(Debug, Clone)]
enum Gen {
    Copy { dest: u64, src: u64 },
    Xor { dest: u64, offset: u64 },
    Replace(u64),
    Zero(u64),
}

fn gen_op(blocks: u64) -> impl Strategy<Value = Gen> {
    let max_off = (blocks - 1) * BLOCK_SIZE_U64;
    prop_oneof![
        4 => (0..blocks, 0..blocks).prop_map(|(dest, src)| Gen::Copy { dest, src }),
        2 => (0..blocks, 0..max_off).prop_map(|(dest, offset)| Gen::Xor { dest, offset }),
        1 => (0..blocks).prop_map(Gen::Replace),
        1 => (0..blocks).prop_map(Gen::Zero),
    ]
}

/// Keep the generated ops that form a valid merge order: one op per block, ordered ops
/// first, no ordered op reading a block an earlier op wrote.
fn build_ops(gens: &[Gen], descending_rz: bool) -> Vec<PlannedOp> {
    let mut written = std::collections::HashSet::new();
    let mut ordered = Vec::new();
    let mut others = Vec::new();
    for g in gens {
        let op = match *g {
            Gen::Copy { dest, src } => PlannedOp::copy(dest, src),
            Gen::Xor { dest, offset } => PlannedOp::xor(dest, offset),
            Gen::Replace(b) => PlannedOp::replace(b),
            Gen::Zero(b) => PlannedOp::zero(b),
        };
        if written.contains(&op.new_block) {
            continue;
        }
        if op.kind.is_ordered() {
            if op.source_blocks().iter().any(|b| written.contains(&b)) {
                continue;
            }
            ordered.push(op);
        } else {
            others.push(op);
        }
        written.insert(op.new_block);
    }
    if descending_rz {
        others.sort_by_key(|op| std::cmp::Reverse(op.new_block));
    }
    ordered.extend(others);
    ordered
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_orders_merge_to_target(
        blocks in 8u64..40,
        gens in prop::collection::vec(gen_op(40), 0..60),
        descending in any::<bool>(),
        scratch in prop_oneof![Just(0usize), Just(SCRATCH)],
        seed in any::<u64>(),
        crash_a in 0u64..80,
        crash_b in 0u64..80,
        mode in prop_oneof![Just(CrashMode::DropUnflushed), Just(CrashMode::KeepUnflushed), Just(CrashMode::KeepOlderHalf)],
    ) {
        let gens: Vec<Gen> = gens
            .into_iter()
            .filter(|g| match *g {
                Gen::Copy { dest, src } => dest < blocks && src < blocks,
                Gen::Xor { dest, offset } => dest < blocks && offset <= (blocks - 1) * BLOCK_SIZE_U64,
                Gen::Replace(b) | Gen::Zero(b) => b < blocks,
            })
            .collect();
        let mut ops = build_ops(&gens, descending);
        if scratch == 0 {
            // Refused without scratch (MergeTracker::open, XorNeedsScratch).
            ops.retain(|op| !(op.kind == OpKind::Xor && op.source_blocks().iter().any(|b| b == op.new_block)));
        }
        prop_assert!(is_valid_order(&ops));
        let sc = Scenario::new(blocks, ops, scratch, seed);
        run_clean(&sc, true);
        run_with_crashes(&sc, &[crash_a], mode, true);
        run_with_crashes(&sc, &[crash_a, crash_b], mode, false);
    }
}
