//! Second chance for REPLACE blocks: XOR against source content that moved by a number
//! of bytes that is not a multiple of the block size (a file rewritten with lines
//! inserted, inode tables shifted by whole inodes). cow-format.md §9 allows an XOR op to
//! read 4096 source bytes at any byte offset, spanning two source blocks.
//!
//! # Search
//!
//! For each REPLACE block, every 64-byte window (all 4033 byte offsets) is hashed and
//! looked up in the source's sampled-window index. A hit on sampled window `i` of source
//! block `m` (confirmed by recomputing the full 64-bit window hash on the source block)
//! proposes the base offset `m * 4096 + i * 512 - p`. Windows shared by more than
//! [`MAX_OWNERS`] source blocks are ignored, and at most [`MAX_CANDIDATES`] offsets are
//! proposed. The best proposal (most equal bytes, then lowest offset) is kept when the XOR
//! delta compresses far better than the block, by the same rule as
//! [`super::classify::xor_pays_off`]. This is a pure function of the block, so it runs in
//! parallel and gives the same answer for any thread count.
//!
//! # Keeping the merge order valid
//!
//! Ordering has already run, and the new XORs are appended to the end of the sequence:
//!
//! 1. A proposal that reads a block written by an already-ordered op (COPY/XOR) is
//!    dropped: that op merges earlier and would have overwritten it. Its own target
//!    block may be read (an op reads, then writes).
//! 2. Each new XOR's target was a REPLACE block, merged after every ordered op, so the
//!    ordered ops that read it already precede it.
//! 3. Among the new XORs, one that reads another's target must merge first. They are put
//!    in that order by Kahn's algorithm (each reads at most two blocks); when a cycle
//!    remains, its lowest block is left as REPLACE, which reads nothing.
//!
//! So every read still comes before every write of the block read.

use rayon::prelude::*;

use super::block_index::SourceIndex;
use super::classify::{estimate, xor_pays_off, BlockClass};
use super::hash::{equal_bytes, window_hash, window_offset, WINDOWS, WINDOW_LEN};
use super::image::{BlockImage, ImageError};
use super::BLOCK_SIZE;

/// Largest number of source blocks a window may belong to and still be used.
pub const MAX_OWNERS: usize = 4;
/// Base offsets proposed per block.
pub const MAX_CANDIDATES: usize = 4;
/// REPLACE blocks searched per parallel batch.
pub const SHIFT_BATCH_BLOCKS: usize = 1024;

/// Finds the best byte-shifted XOR base for target block `t`, if one pays off.
pub fn find_shifted_base(
    t: &[u8],
    source: &dyn BlockImage,
    index: &SourceIndex,
) -> Result<Option<u64>, ImageError> {
    let bs = BLOCK_SIZE as u64;
    let src_len = source.block_count() * bs;
    let mut offsets: Vec<u64> = Vec::new();
    let mut sbuf = vec![0u8; BLOCK_SIZE];
    let mut cached: Option<u32> = None;
    let mut p = 0usize;
    while p + WINDOW_LEN <= BLOCK_SIZE && offsets.len() < MAX_CANDIDATES {
        let Some(h) = window_hash(&t[p..p + WINDOW_LEN]) else {
            p += 1;
            continue;
        };
        let Some(owners) = index.window_owners(h, MAX_OWNERS) else {
            p += 1;
            continue;
        };
        let mut found = false;
        for m in owners {
            if cached != Some(m) {
                source.read_blocks(u64::from(m), &mut sbuf)?;
                cached = Some(m);
            }
            for i in 0..WINDOWS {
                let w = window_offset(i);
                if window_hash(&sbuf[w..w + WINDOW_LEN]) != Some(h) {
                    continue;
                }
                let start = u64::from(m) * bs + w as u64;
                let Some(off) = start.checked_sub(p as u64) else {
                    continue;
                };
                if off + bs <= src_len && !offsets.contains(&off) {
                    offsets.push(off);
                    found = true;
                }
            }
        }
        // A hit usually repeats for the next windows of the same run: jump past it.
        p += if found { WINDOW_LEN } else { 1 };
    }
    let mut best: Option<(usize, u64)> = None;
    let mut best_base = vec![0u8; BLOCK_SIZE];
    for &off in &offsets {
        source
            .read_exact_at(&mut sbuf, off)
            .map_err(|e| ImageError::Read {
                name: source.name(),
                offset: off,
                len: BLOCK_SIZE,
                source: e,
            })?;
        let eq = equal_bytes(t, &sbuf);
        if best.is_none_or(|(e, o)| eq > e || (eq == e && off < o)) {
            best = Some((eq, off));
            best_base.copy_from_slice(&sbuf);
        }
    }
    let Some((eq, off)) = best else {
        return Ok(None);
    };
    if eq < BLOCK_SIZE / 4 {
        return Ok(None);
    }
    for (b, x) in best_base.iter_mut().zip(t) {
        *b ^= x;
    }
    Ok(xor_pays_off(estimate(&best_base), estimate(t)).then_some(off))
}

/// Gives the REPLACE blocks of `classes` a byte-shifted XOR base where one pays off and
/// is safe (see the module docs), appending them to `sequence`. Returns how many were
/// converted. `progress` gets the number of target blocks covered per batch.
pub fn add_shifted_xors(
    classes: &mut [BlockClass],
    sequence: &mut Vec<u32>,
    source: &dyn BlockImage,
    target: &dyn BlockImage,
    index: &SourceIndex,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, ImageError> {
    let mut found: Vec<(u32, u64)> = Vec::new();
    let mut covered = 0u64;
    let total = classes.len();
    let mut start = 0usize;
    while start < total {
        // The REPLACE blocks among the next target blocks, at most one batch of them.
        let mut batch: Vec<u32> = Vec::new();
        let mut end = start;
        while end < total && batch.len() < SHIFT_BATCH_BLOCKS {
            if classes[end] == BlockClass::Replace {
                batch.push(end as u32);
            }
            end += 1;
        }
        let results: Vec<Option<(u32, u64)>> = batch
            .par_iter()
            .map(|&n| {
                let mut t = vec![0u8; BLOCK_SIZE];
                target.read_blocks(u64::from(n), &mut t)?;
                Ok(find_shifted_base(&t, source, index)?.map(|off| (n, off)))
            })
            .collect::<Result<_, ImageError>>()?;
        found.extend(results.into_iter().flatten());
        progress(end as u64 - covered);
        covered = end as u64;
        start = end;
    }
    Ok(accept(classes, sequence, found))
}

/// Source blocks read by an XOR at byte offset `off`: first block and count.
fn span(off: u64) -> (u64, u64) {
    let bs = BLOCK_SIZE as u64;
    (off / bs, if off % bs == 0 { 1 } else { 2 })
}

/// Accepts the proposals `found` (ascending target block) that keep the merge safe, orders
/// them and appends them to `sequence`; see the module docs. Returns how many were taken.
fn accept(classes: &mut [BlockClass], sequence: &mut Vec<u32>, found: Vec<(u32, u64)>) -> u64 {
    const NONE: u32 = u32::MAX;
    // 1. Drop proposals reading a block that an already-ordered op writes.
    let mut cands = found;
    cands.retain(|&(n, off)| {
        let (first, count) = span(off);
        (first..first + count).all(|b| {
            b == u64::from(n)
                || usize::try_from(b)
                    .ok()
                    .and_then(|b| classes.get(b))
                    .is_none_or(|c| !c.is_ordered())
        })
    });
    // 2. Order the remaining proposals among themselves: one that reads the target of
    //    another must merge first (edges "i before j"); break cycles by leaving the
    //    lowest remaining block as REPLACE.
    let mut idx = vec![NONE; classes.len()];
    for (i, &(n, _)) in cands.iter().enumerate() {
        idx[n as usize] = i as u32;
    }
    let edges = |i: usize| -> [Option<usize>; 2] {
        let (n, off) = cands[i];
        let (first, count) = span(off);
        let mut out = [None; 2];
        for (k, b) in (first..first + count).enumerate() {
            if b != u64::from(n) {
                if let Some(&j) = usize::try_from(b).ok().and_then(|b| idx.get(b)) {
                    if j != NONE {
                        out[k] = Some(j as usize);
                    }
                }
            }
        }
        out
    };
    let mut indeg = vec![0u32; cands.len()];
    for i in 0..cands.len() {
        for j in edges(i).into_iter().flatten() {
            indeg[j] += 1;
        }
    }
    let mut done = vec![false; cands.len()];
    let mut queue: std::collections::VecDeque<usize> =
        (0..cands.len()).filter(|&i| indeg[i] == 0).collect();
    let mut emitted: Vec<usize> = Vec::new();
    let mut cursor = 0usize;
    loop {
        while let Some(i) = queue.pop_front() {
            if done[i] {
                continue;
            }
            done[i] = true;
            emitted.push(i);
            for j in edges(i).into_iter().flatten() {
                if !done[j] {
                    indeg[j] -= 1;
                    if indeg[j] == 0 {
                        queue.push_back(j);
                    }
                }
            }
        }
        while cursor < cands.len() && done[cursor] {
            cursor += 1;
        }
        if cursor >= cands.len() {
            break;
        }
        // Stuck on a cycle: leave this proposal out (the block stays REPLACE).
        done[cursor] = true;
        for j in edges(cursor).into_iter().flatten() {
            if !done[j] {
                indeg[j] -= 1;
                if indeg[j] == 0 {
                    queue.push_back(j);
                }
            }
        }
    }
    let bs = BLOCK_SIZE as u64;
    for &i in &emitted {
        let (n, off) = cands[i];
        let Ok(block) = u32::try_from(off / bs) else {
            continue;
        };
        classes[n as usize] = match u16::try_from(off % bs) {
            Ok(0) | Err(_) => BlockClass::Xor { source: block },
            Ok(offset) => BlockClass::XorAt { block, offset },
        };
        sequence.push(n);
    }
    emitted.len() as u64
}
