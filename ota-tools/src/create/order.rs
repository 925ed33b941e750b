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
//! Reading one's own block is harmless (read, then write, in one op). Every op reads at
//! most one block (XOR bases are block-aligned) and every block has at most one writer,
//! so each node has at most one outgoing edge: the graph is a *functional graph*. Its
//! cycles are therefore disjoint, and breaking one node per cycle is the minimum possible
//! number of conversions (a minimum feedback vertex set), not a heuristic.
//!
//! # Algorithm
//!
//! Kahn's topological sort with a FIFO queue seeded in **descending** block order; what is
//! left when the queue runs dry are exactly the disjoint cycles. Descending matters to the
//! legacy (dm-snapshot) merge: dm-snapshot-merge copies a run of exceptions in one batch
//! only when their destination blocks step down by one along the merge order, so a run of
//! independent COPYs to adjacent blocks merges as one batch (one metadata commit) instead
//! of one batch per block, and a shifted run (`n <- n-3`) unrolls as `99, 98, 97, 96, ...`. For each cycle (in ascending
//! order of its smallest block) the [`CycleBreaker`] estimates the cost of each member
//! (examining at most [`MAX_CYCLE_COST_EVALUATIONS`] members) and the cheapest member
//! stops reading other blocks: it becomes REPLACE, or an XOR against its own position,
//! which stays readable until that very op. The rest of the cycle then unrolls as a chain.
//! Time and memory are linear in the number of target blocks (one `u32` per block).

use std::collections::VecDeque;

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

/// The ordered block that `n` must precede, if any. (Ordering runs before
/// [`super::shifted`] adds two-block [`BlockClass::XorAt`] reads, so one read per op holds
/// here; `XorAt` is treated by its first block.)
fn edge(classes: &[BlockClass], n: usize) -> Option<usize> {
    let s = classes.get(n)?.reads()? as usize;
    if s != n && classes.get(s).is_some_and(|c| c.is_ordered()) {
        Some(s)
    } else {
        None
    }
}

/// Orders the ordered ops of `classes` (index = target block) and breaks cycles, changing
/// the classes of the broken blocks in place.
pub fn order_ops<B: CycleBreaker>(
    classes: &mut [BlockClass],
    breaker: &mut B,
) -> Result<MergeOrder, B::Error> {
    let len = classes.len();
    let mut indeg = vec![0u32; len];
    for n in 0..len {
        if let Some(w) = edge(classes, n) {
            indeg[w] += 1;
        }
    }
    let mut queue: VecDeque<usize> = (0..len)
        .rev()
        .filter(|&n| classes[n].is_ordered() && indeg[n] == 0)
        .collect();
    let mut out = MergeOrder::default();
    let mut cursor = 0usize;
    loop {
        while let Some(n) = queue.pop_front() {
            indeg[n] = DONE;
            if classes[n].is_ordered() {
                out.sequence.push(n as u32);
            }
            if let Some(w) = edge(classes, n) {
                indeg[w] -= 1;
                if indeg[w] == 0 {
                    queue.push_back(w);
                }
            }
        }
        // The queue is empty: every ordered block not yet emitted lies on a cycle.
        while cursor < len && (indeg[cursor] == DONE || !classes[cursor].is_ordered()) {
            cursor += 1;
        }
        if cursor >= len {
            break;
        }
        let start = cursor;
        let mut best = (u64::MAX, start);
        let mut m = start;
        let mut evaluated = 0usize;
        loop {
            if evaluated < MAX_CYCLE_COST_EVALUATIONS {
                let c = breaker.cost(m as u32)?;
                evaluated += 1;
                if c < best.0 || (c == best.0 && m < best.1) {
                    best = (c, m);
                }
            }
            match edge(classes, m) {
                Some(next) if next != start => m = next,
                _ => break,
            }
        }
        let b = best.1;
        let old_target = edge(classes, b);
        let mut repl = breaker.replacement(b as u32)?;
        if repl.reads().is_some_and(|s| s as usize != b) {
            repl = BlockClass::Replace;
        }
        classes[b] = repl;
        out.broken.push(b as u32);
        if !repl.is_ordered() {
            // No longer part of the sequence; its predecessor's edge now points nowhere.
            indeg[b] = DONE;
        }
        if let Some(w) = old_target {
            indeg[w] -= 1;
            if indeg[w] == 0 {
                queue.push_back(w);
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
        let o = order_ops(&mut c, &mut ReplaceBreaker).unwrap();
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
        let o = order_ops(&mut c, &mut ReplaceBreaker).unwrap();
        assert!(o.broken.is_empty());
        let independent: Vec<u32> = o.sequence.iter().copied().filter(|&b| b < 20).collect();
        assert_eq!(independent, (10..20).rev().collect::<Vec<u32>>());
        let shifted: Vec<u32> = o.sequence.iter().copied().filter(|&b| b >= 40).collect();
        assert_eq!(shifted, (40..50).rev().collect::<Vec<u32>>());
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
        let o = order_ops(&mut c, &mut ReplaceBreaker).unwrap();
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
        let o = order_ops(&mut c, &mut ReplaceBreaker).unwrap();
        assert_eq!(o.broken.len(), 1);
        assert_eq!(o.broken, vec![0]);
        assert_eq!(c[0], BlockClass::Replace);
        assert_eq!(o.sequence, vec![3, 1, 2]);
    }
}
