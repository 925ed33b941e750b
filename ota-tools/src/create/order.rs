//! The merge-order engine.
//!
//! During an in-place merge (snapuserd, cow-format.md §6.2) the ordered ops (COPY and XOR)
//! are merged first, in sequence-data order, and then every other op (REPLACE, ZERO) in
//! ascending block order. So REPLACE and ZERO never endanger a read, and the only rule to
//! honour is the one of §6.4: an ordered op must merge before any ordered op that
//! overwrites the block it reads.
//!
//! # Graph
//!
//! Nodes are the ordered target blocks. Node `n` reading source block `s` gets the edge
//! `n -> s` ("n before s") when `s` is itself the target of an ordered op other than `n`.
//! Reading one's own block is harmless (read, then write, in one op). COPY and
//! block-aligned XOR read one block; an XOR at an unaligned byte offset
//! ([`BlockClass::XorAt`]) reads two, so a node has at most two outgoing edges. Every
//! block has at most one writer.
//!
//! # Algorithm
//!
//! Kahn's topological sort; which free op comes next depends on the [`MergeMode`]:
//!
//! - [`MergeMode::User`] (the default): **ascending and local**. snapuserd's user-space merge
//!   reads a window of up to 510 ordered ops ahead and writes their destinations in runs of
//!   contiguous blocks, so the next op is the block after the last one if it is free; else
//!   the bottom of the nearest run of free blocks below the last one; else the lowest free
//!   block. Independent COPYs to adjacent blocks come out `10, 11, 12, ...`, a run shifted
//!   down (`n <- n+3`) unrolls bottom-up, a run shifted up (`n <- n-3`) top-down in
//!   ascending groups of three, and one shifted file is finished before the next begins, so
//!   a window covers one contiguous range (a first-in-first-out queue would interleave every
//!   shifted file of the image and scatter each window over all of them).
//! - [`MergeMode::Legacy`]: **descending**, first freed first emitted. dm-snapshot-merge
//!   copies a run of exceptions in one batch only when their destination blocks step
//!   *down* by one, so independent COPYs come out `19, 18, 17, ...` and a shifted run
//!   (`n <- n-3`) unrolls as `99, 98, 97, 96, ...`.
//!
//! A run shifted against the mode's direction must still unroll the other way (each op
//! reads a block a later one overwrites); the seed decides only among ops that are free.
//!
//! When the queue runs dry, every ordered block not yet emitted waits for a reader that
//! is not emitted either, so walking from the lowest such block to one of its waiting
//! readers, again and again, must come back to a block already visited: a cycle. The
//! [`CycleBreaker`] estimates the cost of each member (at most
//! [`MAX_CYCLE_COST_EVALUATIONS`]) and the cheapest member stops reading other blocks: it
//! becomes REPLACE, or an XOR against its own position, which stays readable until that
//! very op. The rest of the cycle then unrolls. When every op reads one block (no
//! `XorAt`), the graph is functional: its cycles are disjoint and one conversion per cycle
//! is the minimum possible. With two-block reads, cycles can share blocks and breaking one
//! at a time is a greedy choice (no worse than one conversion per cycle found).
//!
//! Time is linear in the number of target blocks plus the length of the walks; memory is
//! one `u32` per target block (in-degree), the readers of each ordered block (at most two
//! `u32` per ordered op plus one `u32` per target block) and one visit mark per target
//! block.

use std::collections::{BTreeSet, VecDeque};

use cow_format::MergeMode;

use super::classify::BlockClass;

/// Cycle members whose cost is estimated when choosing which one to break.
pub const MAX_CYCLE_COST_EVALUATIONS: usize = 64;

/// Decides how to break a dependency cycle.
pub trait CycleBreaker {
    /// Error type of the breaker (it usually reads images).
    type Error;
    /// Estimated payload bytes for block `block` if it stops reading other blocks.
    fn cost(&mut self, block: u32) -> Result<u64, Self::Error>;
    /// The class block `block` gets instead. It must read no block other than `block`
    /// itself (REPLACE, ZERO, or XOR against `block`); anything else is replaced by
    /// REPLACE.
    fn replacement(&mut self, block: u32) -> Result<BlockClass, Self::Error>;
}

/// A breaker that always converts to REPLACE and considers every member equal.
#[derive(Debug, Default)]
pub struct ReplaceBreaker;

impl CycleBreaker for ReplaceBreaker {
    type Error = std::convert::Infallible;
    fn cost(&mut self, _block: u32) -> Result<u64, Self::Error> {
        Ok(0)
    }
    fn replacement(&mut self, _block: u32) -> Result<BlockClass, Self::Error> {
        Ok(BlockClass::Replace)
    }
}

/// Result of ordering.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MergeOrder {
    /// New-block numbers of the ordered ops, first merged first (the sequence data).
    pub sequence: Vec<u32>,
    /// Blocks whose op was changed to break a cycle, in the order they were broken.
    pub broken: Vec<u32>,
}

const DONE: u32 = u32::MAX;

/// The ordered blocks that `n` must precede (up to two).
fn edges(classes: &[BlockClass], n: usize) -> [Option<usize>; 2] {
    let mut out = [None; 2];
    let Some((first, count)) = classes.get(n).and_then(|c| c.read_span()) else {
        return out;
    };
    for (k, s) in (first as usize..first as usize + count as usize).enumerate() {
        if s != n && classes.get(s).is_some_and(|c| c.is_ordered()) {
            out[k] = Some(s);
        }
    }
    out
}

/// Readers of each block, in compressed form: the readers of block `s` are
/// `list[start[s]..start[s + 1]]` (as computed when ordering began; callers check that a
/// reader still reads `s`).
struct Readers {
    start: Vec<u32>,
    list: Vec<u32>,
}

impl Readers {
    fn new(classes: &[BlockClass]) -> Self {
        let len = classes.len();
        let mut start = vec![0u32; len + 1];
        for n in 0..len {
            for s in edges(classes, n).into_iter().flatten() {
                start[s + 1] += 1;
            }
        }
        for i in 0..len {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut list = vec![0u32; start[len] as usize];
        for n in 0..len {
            for s in edges(classes, n).into_iter().flatten() {
                list[fill[s] as usize] = n as u32;
                fill[s] += 1;
            }
        }
        Self { start, list }
    }

    fn of(&self, s: usize) -> &[u32] {
        &self.list[self.start[s] as usize..self.start[s + 1] as usize]
    }
}

/// The ordered blocks free to merge next (every block they must follow is emitted), and
/// which of them comes next.
enum FreeBlocks {
    /// [`MergeMode::Legacy`]: first freed, first emitted (seeded descending).
    Fifo(VecDeque<usize>),
    /// [`MergeMode::User`]: the block after the last one emitted if it is free; else the
    /// bottom of the run of free blocks nearest below the last one (a run shifted up by `k`
    /// unrolls top-down in ascending groups of `k`, each group just below the previous);
    /// else the lowest free block. So the merge order stays near one place of the device
    /// until that place is done, and a read-ahead window of it covers one contiguous range
    /// instead of a little of every shifted file.
    Local {
        free: BTreeSet<usize>,
        last: Option<usize>,
    },
}

impl FreeBlocks {
    fn push(&mut self, n: usize) {
        match self {
            Self::Fifo(q) => q.push_back(n),
            Self::Local { free, .. } => {
                free.insert(n);
            }
        }
    }

    fn pop(&mut self) -> Option<usize> {
        match self {
            Self::Fifo(q) => q.pop_front(),
            Self::Local { free, last } => {
                let next = match *last {
                    Some(l) if l.checked_add(1).is_some_and(|n| free.contains(&n)) => l + 1,
                    Some(l) => match free.range(..l).next_back() {
                        Some(&below) => {
                            let mut bottom = below;
                            while bottom > 0 && free.contains(&(bottom - 1)) {
                                bottom -= 1;
                            }
                            bottom
                        }
                        None => *free.first()?,
                    },
                    None => *free.first()?,
                };
                free.remove(&next);
                *last = Some(next);
                Some(next)
            }
        }
    }
}

/// Orders the ordered ops of `classes` (index = target block) and breaks cycles, changing
/// the classes of the broken blocks in place.
pub fn order_ops<B: CycleBreaker>(
    classes: &mut [BlockClass],
    breaker: &mut B,
    mode: MergeMode,
) -> Result<MergeOrder, B::Error> {
    let len = classes.len();
    let mut indeg = vec![0u32; len];
    for n in 0..len {
        for w in edges(classes, n).into_iter().flatten() {
            indeg[w] += 1;
        }
    }
    let readers = Readers::new(classes);
    let free = |n: &usize| classes[*n].is_ordered() && indeg[*n] == 0;
    let mut queue = match mode {
        MergeMode::User => FreeBlocks::Local {
            free: (0..len).filter(free).collect(),
            last: None,
        },
        MergeMode::Legacy => FreeBlocks::Fifo((0..len).rev().filter(free).collect()),
    };
    let mut out = MergeOrder::default();
    let mut cursor = 0usize;
    // Visit marks of the cycle walks: the walk number (1-based) that visited a block.
    let mut mark = vec![0u32; len];
    let mut walk_no = 0u32;
    loop {
        while let Some(n) = queue.pop() {
            indeg[n] = DONE;
            if classes[n].is_ordered() {
                out.sequence.push(n as u32);
            }
            for w in edges(classes, n).into_iter().flatten() {
                indeg[w] -= 1;
                if indeg[w] == 0 {
                    queue.push(w);
                }
            }
        }
        // The queue is empty: every ordered block not yet emitted waits for a reader that
        // is not emitted either.
        while cursor < len && (indeg[cursor] == DONE || !classes[cursor].is_ordered()) {
            cursor += 1;
        }
        if cursor >= len {
            break;
        }
        // Walk to waiting readers until a block repeats; `path` from that block on is a
        // cycle.
        walk_no += 1;
        let mut path: Vec<usize> = Vec::new();
        let mut m = cursor;
        let cycle_start = loop {
            if mark[m] == walk_no {
                break path.iter().position(|&x| x == m).unwrap_or(0);
            }
            mark[m] = walk_no;
            path.push(m);
            let next = readers.of(m).iter().map(|&r| r as usize).find(|&r| {
                indeg[r] != DONE && classes[r].is_ordered() && edges(classes, r).contains(&Some(m))
            });
            match next {
                Some(r) => m = r,
                // Cannot happen while in-degrees are exact; stop rather than loop.
                None => break path.len() - 1,
            }
        };
        let cycle = &path[cycle_start..];
        let mut best = (u64::MAX, usize::MAX);
        for &c in cycle.iter().take(MAX_CYCLE_COST_EVALUATIONS) {
            let cost = breaker.cost(c as u32)?;
            if cost < best.0 || (cost == best.0 && c < best.1) {
                best = (cost, c);
            }
        }
        let b = best.1;
        let old_targets = edges(classes, b);
        let mut repl = breaker.replacement(b as u32)?;
        if repl
            .read_span()
            .is_some_and(|(s, c)| s as usize != b || c != 1)
        {
            repl = BlockClass::Replace;
        }
        classes[b] = repl;
        out.broken.push(b as u32);
        if !repl.is_ordered() {
            // No longer part of the sequence; edges into it are gone with its class.
            indeg[b] = DONE;
        }
        for w in old_targets.into_iter().flatten() {
            if indeg[w] != DONE {
                indeg[w] -= 1;
                if indeg[w] == 0 {
                    queue.push(w);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(s: u32) -> BlockClass {
        BlockClass::Copy { source: s }
    }

    fn pos(seq: &[u32], b: u32) -> usize {
        seq.iter().position(|&x| x == b).unwrap()
    }

    #[test]
    fn swap_breaks_exactly_one() {
        let mut c = vec![copy(1), copy(0), BlockClass::Unchanged];
        let o = order_ops(&mut c, &mut ReplaceBreaker, MergeMode::Legacy).unwrap();
        assert_eq!(o.broken, vec![0]);
        assert_eq!(c[0], BlockClass::Replace);
        assert_eq!(o.sequence, vec![1]);
    }

    /// Independent COPYs to adjacent blocks come out with their destinations stepping
    /// down by one, the order in which dm-snapshot-merge batches them; a shifted run
    /// unrolls top-down.
    #[test]
    fn independent_runs_and_shifted_runs_come_out_descending() {
        // Blocks 10..20 copy from 100..110 (independent); blocks 40..50 copy from 37..47.
        let mut c = vec![BlockClass::Unchanged; 120];
        for n in 10..20u32 {
            c[n as usize] = copy(n + 90);
        }
        for n in 40..50u32 {
            c[n as usize] = copy(n - 3);
        }
        let o = order_ops(&mut c, &mut ReplaceBreaker, MergeMode::Legacy).unwrap();
        assert!(o.broken.is_empty());
        let independent: Vec<u32> = o.sequence.iter().copied().filter(|&b| b < 20).collect();
        assert_eq!(independent, (10..20).rev().collect::<Vec<u32>>());
        let shifted: Vec<u32> = o.sequence.iter().copied().filter(|&b| b >= 40).collect();
        assert_eq!(shifted, (40..50).rev().collect::<Vec<u32>>());
    }

    /// In user mode the same fixture gives ascending independent runs; a run shifted up by
    /// three still has to unroll top-down, but in ascending runs of three (one write each
    /// in the user-space merge), and a shifted-down run unrolls bottom-up.
    #[test]
    fn user_mode_seeds_ascending() {
        let mut c = vec![BlockClass::Unchanged; 120];
        for n in 10..20u32 {
            c[n as usize] = copy(n + 90);
        }
        for n in 40..50u32 {
            c[n as usize] = copy(n - 3);
        }
        for n in 60..70u32 {
            c[n as usize] = copy(n + 3);
        }
        let o = order_ops(&mut c, &mut ReplaceBreaker, MergeMode::User).unwrap();
        assert!(o.broken.is_empty());
        let pick = |lo: u32, hi: u32| -> Vec<u32> {
            o.sequence
                .iter()
                .copied()
                .filter(|&b| (lo..hi).contains(&b))
                .collect()
        };
        assert_eq!(pick(10, 20), (10..20).collect::<Vec<u32>>());
        assert_eq!(pick(40, 50), vec![47, 48, 49, 44, 45, 46, 41, 42, 43, 40]);
        assert_eq!(pick(60, 70), (60..70).collect::<Vec<u32>>());
    }

    /// Two files shifted up by two blocks each: in user mode the first is merged completely
    /// before the second begins (a FIFO would alternate between them group by group).
    #[test]
    fn user_mode_finishes_one_shifted_file_before_the_next() {
        let mut c = vec![BlockClass::Unchanged; 500];
        for n in (102..200u32).chain(302..400) {
            c[n as usize] = copy(n - 2);
        }
        let o = order_ops(&mut c, &mut ReplaceBreaker, MergeMode::User).unwrap();
        assert!(o.broken.is_empty());
        assert_eq!(o.sequence.len(), 196);
        let (first, second) = o.sequence.split_at(98);
        assert!(first.iter().all(|&b| (102..200).contains(&b)), "{first:?}");
        assert!(
            second.iter().all(|&b| (302..400).contains(&b)),
            "{second:?}"
        );
        // Top-down in ascending pairs: 198, 199, 196, 197, ...
        assert_eq!(&first[..4], &[198, 199, 196, 197]);
        for n in 104..200u32 {
            assert!(pos(&o.sequence, n) < pos(&o.sequence, n - 2));
        }
    }

    #[test]
    fn shifted_run_needs_no_conversion() {
        // Target block n = source block n-3 for n in 3..100: merge from the top down.
        let mut c: Vec<BlockClass> = (0..100)
            .map(|n| {
                if n < 3 {
                    BlockClass::Replace
                } else {
                    copy(n - 3)
                }
            })
            .collect();
        let o = order_ops(&mut c, &mut ReplaceBreaker, MergeMode::Legacy).unwrap();
        assert!(o.broken.is_empty());
        assert_eq!(o.sequence.len(), 97);
        for n in 6..100u32 {
            assert!(pos(&o.sequence, n) < pos(&o.sequence, n - 3));
        }
    }

    #[test]
    fn three_cycle_with_tail() {
        // 0<-1, 1<-2, 2<-0 is a cycle; 3 reads 0 and must precede the writer of 0.
        let mut c = vec![copy(1), copy(2), copy(0), copy(0)];
        let o = order_ops(&mut c, &mut ReplaceBreaker, MergeMode::Legacy).unwrap();
        assert_eq!(o.broken.len(), 1);
        assert_eq!(o.broken, vec![0]);
        assert_eq!(c[0], BlockClass::Replace);
        assert_eq!(o.sequence, vec![3, 1, 2]);
    }

    /// An unaligned XOR reads two blocks; a cycle through its second block is found and
    /// broken, and it still merges before the writers of both blocks it reads.
    #[test]
    fn two_block_reads_are_ordered_and_their_cycles_broken() {
        let mut c = vec![BlockClass::Unchanged; 12];
        // 2 reads 5 and 6 (unaligned); 5 and 6 are COPY targets.
        c[2] = BlockClass::XorAt {
            block: 5,
            offset: 100,
        };
        c[5] = copy(9);
        c[6] = copy(10);
        let o = order_ops(&mut c.clone(), &mut ReplaceBreaker, MergeMode::Legacy).unwrap();
        assert!(o.broken.is_empty());
        assert!(pos(&o.sequence, 2) < pos(&o.sequence, 5));
        assert!(pos(&o.sequence, 2) < pos(&o.sequence, 6));
        // Now 6 reads 2: the cycle 2 -> 6 -> 2 runs through the second block read.
        c[6] = copy(2);
        let o = order_ops(&mut c, &mut ReplaceBreaker, MergeMode::Legacy).unwrap();
        assert_eq!(o.broken, vec![2]);
        assert_eq!(c[2], BlockClass::Replace);
        let mut rest = o.sequence.clone();
        rest.sort_unstable();
        assert_eq!(rest, vec![5, 6]);
    }
}
