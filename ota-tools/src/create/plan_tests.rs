//! Plans for random and adversarial image pairs, proven by the in-place merge simulator.

use super::classify::{BlockClass, ClassifyOptions};
use super::image::MemImage;
use super::plan::{build_plan, Plan, PlanError, PlanOptions};
use super::simulate::simulate_merge;
use super::BLOCK_SIZE;

/// Small deterministic generator (xorshift64*), so the tests need no extra crate.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

pub(crate) fn random_blocks(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n * BLOCK_SIZE];
    rng.fill(&mut v);
    v
}

fn blk(v: &mut [u8], n: usize) -> &mut [u8] {
    &mut v[n * BLOCK_SIZE..(n + 1) * BLOCK_SIZE]
}

fn copy_block(dst: &mut [u8], d: usize, src: &[u8], s: usize) {
    dst[d * BLOCK_SIZE..(d + 1) * BLOCK_SIZE]
        .copy_from_slice(&src[s * BLOCK_SIZE..(s + 1) * BLOCK_SIZE]);
}

fn plan_for(source: &[u8], target: &[u8], xor: bool) -> Plan {
    let opts = PlanOptions {
        classify: ClassifyOptions {
            xor,
            ..Default::default()
        },
        ..Default::default()
    };
    let plan = build_plan(
        &MemImage {
            data: source.to_vec(),
        },
        &MemImage {
            data: target.to_vec(),
        },
        &opts,
        &|_, _| {},
    )
    .unwrap();
    simulate_merge(source, target, &plan).unwrap();
    plan
}

fn check_both(source: &[u8], target: &[u8]) -> Plan {
    plan_for(source, target, false);
    plan_for(source, target, true)
}

#[test]
fn identical_images_need_no_ops() {
    let mut rng = Rng::new(1);
    let s = random_blocks(&mut rng, 64);
    let p = check_both(&s, &s);
    assert_eq!(p.counts().unchanged, 64);
    assert_eq!(p.ops(16).count(), 0);
}

#[test]
fn all_zero_images() {
    let s = vec![0u8; 32 * BLOCK_SIZE];
    let p = check_both(&s, &s);
    assert_eq!(p.counts().unchanged, 32);
    let mut rng = Rng::new(2);
    let t = random_blocks(&mut rng, 32);
    // Zero source, random target: all REPLACE, nothing to copy.
    let p = check_both(&s, &t);
    assert_eq!(p.counts().replace, 32);
    // Random source, zero target: all ZERO.
    let p = check_both(&t, &s);
    assert_eq!(p.counts().zero, 32);
}

#[test]
fn swap_is_one_copy_and_one_conversion() {
    let mut rng = Rng::new(3);
    let s = random_blocks(&mut rng, 16);
    let mut t = s.clone();
    copy_block(&mut t, 3, &s, 11);
    copy_block(&mut t, 11, &s, 3);
    let p = check_both(&s, &t);
    assert_eq!(p.broken.len(), 1);
    let c = p.counts();
    assert_eq!((c.copy, c.replace, c.unchanged), (1, 1, 14));
}

#[test]
fn three_cycles_and_rotation() {
    let mut rng = Rng::new(4);
    let s = random_blocks(&mut rng, 40);
    let mut t = s.clone();
    // 3-cycle 1 -> 5 -> 9 -> 1.
    copy_block(&mut t, 5, &s, 1);
    copy_block(&mut t, 9, &s, 5);
    copy_block(&mut t, 1, &s, 9);
    // Rotation of blocks 20..40 by one.
    for n in 20..40 {
        copy_block(&mut t, n, &s, if n == 39 { 20 } else { n + 1 });
    }
    let p = check_both(&s, &t);
    assert_eq!(p.broken.len(), 2, "one conversion per cycle");
    assert_eq!(p.counts().copy, 2 + 19);
}

#[test]
fn long_shifted_runs_both_ways() {
    let mut rng = Rng::new(5);
    let s = random_blocks(&mut rng, 800);
    for shift in [1i64, 3, 64, -1, -5, -200] {
        let mut t = s.clone();
        for n in 100..500i64 {
            copy_block(&mut t, n as usize, &s, (n - shift) as usize);
        }
        let p = check_both(&s, &t);
        assert!(p.broken.is_empty(), "shift {shift} needs no conversion");
        assert_eq!(p.counts().copy, 400);
    }
}

#[test]
fn one_block_copied_to_many_places() {
    let mut rng = Rng::new(6);
    let s = random_blocks(&mut rng, 50);
    let mut t = s.clone();
    for n in (0..50).step_by(3) {
        copy_block(&mut t, n, &s, 7);
    }
    // Block 7 itself is overwritten by a copy of block 8 after everyone read it.
    copy_block(&mut t, 7, &s, 8);
    let p = check_both(&s, &t);
    assert!(p.broken.is_empty());
    let seq = &p.sequence;
    let pos7 = seq.iter().position(|&b| b == 7).unwrap();
    for (i, &b) in seq.iter().enumerate() {
        if b != 7 && p.classes[b as usize] == (BlockClass::Copy { source: 7 }) {
            assert!(i < pos7);
        }
    }
}

#[test]
fn target_larger_and_smaller() {
    let mut rng = Rng::new(7);
    let s = random_blocks(&mut rng, 30);
    // Larger: the tail has zeros, copies of source blocks, and new data.
    let mut t = s.clone();
    t.extend(vec![0u8; 5 * BLOCK_SIZE]);
    t.extend_from_slice(&s[..10 * BLOCK_SIZE]);
    t.extend(random_blocks(&mut rng, 3));
    let p = check_both(&s, &t);
    let c = p.counts();
    assert_eq!((c.unchanged, c.zero, c.copy, c.replace), (30, 5, 10, 3));
    // Smaller: a block beyond the target is still readable as a COPY source.
    let mut t = s[..20 * BLOCK_SIZE].to_vec();
    copy_block(&mut t, 0, &s, 25);
    let p = check_both(&s, &t);
    assert_eq!(p.counts().copy, 1);
}

#[test]
fn edited_blocks_become_xor() {
    let mut rng = Rng::new(8);
    let s = random_blocks(&mut rng, 20);
    let mut t = s.clone();
    // Same-position edit, and a moved + edited block.
    blk(&mut t, 2)[100..140].fill(0x55);
    copy_block(&mut t, 15, &s, 4);
    blk(&mut t, 15)[3000] ^= 0xFF;
    let p = plan_for(&s, &t, true);
    assert_eq!(p.classes[2], BlockClass::Xor { source: 2 });
    assert_eq!(p.classes[15], BlockClass::Xor { source: 4 });
    // Without XOR they are REPLACE.
    let p = plan_for(&s, &t, false);
    assert_eq!(p.classes[2], BlockClass::Replace);
}

#[test]
fn cycle_of_xor_ops_is_broken_by_self_xor_or_replace() {
    let mut rng = Rng::new(9);
    let s = random_blocks(&mut rng, 8);
    let mut t = s.clone();
    // Swap two blocks with small edits: XOR against each other forms a cycle.
    copy_block(&mut t, 1, &s, 6);
    copy_block(&mut t, 6, &s, 1);
    blk(&mut t, 1)[10] ^= 1;
    blk(&mut t, 6)[20] ^= 1;
    let p = plan_for(&s, &t, true);
    assert_eq!(p.broken.len(), 1);
}

#[test]
fn random_pairs() {
    for seed in 0..40u64 {
        let mut rng = Rng::new(100 + seed);
        let sblocks = 20 + rng.below(200) as usize;
        let mut s = random_blocks(&mut rng, sblocks);
        // Some duplicate and zero source blocks.
        for _ in 0..rng.below(20) {
            let (a, b) = (
                rng.below(sblocks as u64) as usize,
                rng.below(sblocks as u64) as usize,
            );
            let src = s.clone();
            copy_block(&mut s, a, &src, b);
        }
        for _ in 0..rng.below(10) {
            let a = rng.below(sblocks as u64) as usize;
            blk(&mut s, a).fill(0);
        }
        let tblocks = (sblocks as i64 + rng.below(60) as i64 - 30).max(1) as usize;
        let mut t = vec![0u8; tblocks * BLOCK_SIZE];
        for n in 0..tblocks {
            match rng.below(10) {
                0..=3 if n < sblocks => copy_block(&mut t, n, &s, n),
                4..=6 => {
                    let src = rng.below(sblocks as u64) as usize;
                    copy_block(&mut t, n, &s, src);
                }
                7 => {
                    let src = rng.below(sblocks as u64) as usize;
                    copy_block(&mut t, n, &s, src);
                    let off = rng.below(BLOCK_SIZE as u64 - 64) as usize;
                    blk(&mut t, n)[off..off + 32].fill(7);
                }
                8 => {}
                _ => rng.fill(blk(&mut t, n)),
            }
        }
        check_both(&s, &t);
    }
}

#[test]
fn plans_do_not_depend_on_thread_count() {
    let mut rng = Rng::new(10);
    let s = random_blocks(&mut rng, 3000);
    let mut t = s.clone();
    for _ in 0..2000 {
        let (a, b) = (rng.below(3000) as usize, rng.below(3000) as usize);
        copy_block(&mut t, a, &s, b);
        if rng.below(4) == 0 {
            blk(&mut t, a)[..50].fill(1);
        }
    }
    let plans: Vec<Plan> = [1, 2, 4]
        .iter()
        .map(|&threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| plan_for(&s, &t, true))
        })
        .collect();
    assert_eq!(plans[0], plans[1]);
    assert_eq!(plans[0], plans[2]);
}

#[test]
fn target_not_whole_blocks_is_an_error() {
    let s = vec![0u8; BLOCK_SIZE];
    let t = vec![0u8; BLOCK_SIZE + 1];
    let err = build_plan(
        &MemImage { data: s },
        &MemImage { data: t },
        &PlanOptions::default(),
        &|_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, PlanError::TargetSize { len, .. } if len == BLOCK_SIZE as u64 + 1));
}

#[test]
fn byte_shifted_content_becomes_unaligned_xor() {
    let mut rng = Rng::new(11);
    let s = random_blocks(&mut rng, 64);
    // "Insert" 300 new bytes at byte 10_000: everything after moves by 300 bytes.
    let mut t = s[..10_000].to_vec();
    let mut ins = vec![0u8; 300];
    rng.fill(&mut ins);
    t.extend_from_slice(&ins);
    t.extend_from_slice(&s[10_000..s.len() - 300]);
    // Touch a few bytes per block so the moved blocks are not plain copies of anything.
    for n in 0..64 {
        t[n * BLOCK_SIZE + 2000] ^= 0x5A;
    }
    let p = plan_for(&s, &t, true);
    let shifted = p
        .classes
        .iter()
        .filter(|c| matches!(c, BlockClass::XorAt { offset: 3796, .. }))
        .count();
    assert!(
        shifted >= 55,
        "only {shifted} blocks found their moved content"
    );
    // Without XOR they are all REPLACE, and still correct.
    let p = plan_for(&s, &t, false);
    assert!(p
        .classes
        .iter()
        .all(|c| !matches!(c, BlockClass::XorAt { .. })));
}

#[test]
fn unaligned_xor_reading_a_copied_block_merges_before_the_copy() {
    let mut rng = Rng::new(12);
    let s = random_blocks(&mut rng, 32);
    let mut t = s.clone();
    // Block 20 = source bytes spanning blocks 5 and 6 (offset 100), lightly edited.
    let off = 5 * BLOCK_SIZE + 100;
    t[20 * BLOCK_SIZE..21 * BLOCK_SIZE].copy_from_slice(&s[off..off + BLOCK_SIZE]);
    t[20 * BLOCK_SIZE + 7] ^= 1;
    let p = plan_for(&s, &t, true);
    assert_eq!(
        p.classes[20],
        BlockClass::XorAt {
            block: 5,
            offset: 100
        }
    );
    // Now blocks 5 and 6 are targets of COPYs: the XOR must merge before both (plan_for
    // proves the in-place merge).
    copy_block(&mut t, 5, &s, 9);
    copy_block(&mut t, 6, &s, 12);
    let p = plan_for(&s, &t, true);
    assert_eq!(p.classes[5], BlockClass::Copy { source: 9 });
    assert_eq!(p.classes[6], BlockClass::Copy { source: 12 });
    assert_eq!(
        p.classes[20],
        BlockClass::XorAt {
            block: 5,
            offset: 100
        }
    );
    let pos = |b: u32| p.sequence.iter().position(|&x| x == b).unwrap();
    assert!(pos(20) < pos(5) && pos(20) < pos(6));
    assert!(p.broken.is_empty());
}

#[test]
fn shifted_xors_that_read_each_other_are_ordered_or_left_out() {
    let mut rng = Rng::new(13);
    let s = random_blocks(&mut rng, 32);
    let mut t = s.clone();
    // 10 <- bytes at 20*4096+100 (blocks 20, 21); 20 <- bytes at 10*4096+100 (10, 11):
    // a cycle. 25 <- bytes at 26*4096+8 (blocks 26, 27) and 26 <- bytes at 27*4096+8:
    // a chain (25 must merge before 26).
    for (d, off) in [
        (10, 20 * BLOCK_SIZE + 100),
        (20, 10 * BLOCK_SIZE + 100),
        (25, 26 * BLOCK_SIZE + 8),
        (26, 27 * BLOCK_SIZE + 8),
    ] {
        t[d * BLOCK_SIZE..(d + 1) * BLOCK_SIZE].copy_from_slice(&s[off..off + BLOCK_SIZE]);
        t[d * BLOCK_SIZE + 99] ^= 1;
    }
    let p = plan_for(&s, &t, true);
    let unaligned = |b: usize| matches!(p.classes[b], BlockClass::XorAt { .. });
    assert!(
        unaligned(10) != unaligned(20),
        "exactly one of the cycle is kept"
    );
    assert!(unaligned(25) && unaligned(26));
    let pos = |b: u32| p.sequence.iter().position(|&x| x == b).unwrap();
    assert!(pos(25) < pos(26));
}

#[test]
fn simulator_rejects_plans_reaching_outside_the_images() {
    let s = vec![1u8; 4 * BLOCK_SIZE];
    let t = vec![1u8; 4 * BLOCK_SIZE];
    let mut classes = vec![BlockClass::Unchanged; 4];
    classes[2] = BlockClass::Copy { source: 9 };
    let plan = Plan {
        classes,
        sequence: vec![2],
        broken: vec![],
        source_blocks: 4,
    };
    assert_eq!(
        simulate_merge(&s, &t, &plan),
        Err(super::simulate::SimulateError::OutOfRange { block: 2 })
    );
}

/// Content with no anchors of its own (every 32-byte window fails the anchor test) is
/// still found: the block before it in the moved run has anchors, and the forward sweep
/// carries its base (+4096 per block) over the rest of the run.
#[test]
fn neighbours_carry_a_base_to_blocks_without_anchors() {
    use super::anchors::{for_each_anchor, ANCHOR_WINDOW};
    let mut rng = Rng::new(21);
    let mut quiet: Vec<u8> = Vec::with_capacity(12 * BLOCK_SIZE);
    while quiet.len() < 12 * BLOCK_SIZE {
        loop {
            let mut b = [0u8; 1];
            rng.fill(&mut b);
            quiet.push(b[0]);
            let n = quiet.len();
            let mut anchor = false;
            if n >= ANCHOR_WINDOW {
                for_each_anchor(&quiet[n - ANCHOR_WINDOW..], 1, |_, _| anchor = true);
            }
            if !anchor {
                break;
            }
            quiet.pop();
        }
    }
    let mut none = 0;
    for_each_anchor(&quiet, usize::MAX, |_, _| none += 1);
    assert_eq!(none, 0);
    // Source: 4 ordinary blocks, the 12 quiet ones, 16 more ordinary ones.
    let mut s = random_blocks(&mut rng, 4);
    s.extend_from_slice(&quiet);
    s.extend(random_blocks(&mut rng, 16));
    // Target: blocks 0..16 unchanged; from byte 16 * 4096 + 300 the first 16 source
    // blocks again (so target block n >= 17 is source bytes from (n - 17) * 4096 + 3796).
    let mut t = s.clone();
    let start = 16 * BLOCK_SIZE + 300;
    let len = t.len() - start;
    t[start..].copy_from_slice(&s[..len]);
    let p = plan_for(&s, &t, true);
    for n in 17..32usize {
        assert_eq!(
            p.classes[n],
            BlockClass::XorAt {
                block: (n - 17) as u32,
                offset: 3796
            },
            "block {n}"
        );
    }
}
