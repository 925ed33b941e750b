//! The demo's second merge reference: a plain O_DIRECT copy, with one fsync, of the changed
//! blocks to their own places.
//!
//! The changed blocks are the new-image blocks the COW's ops produce. They are gathered into
//! destination runs (contiguous blocks, ascending), each run is split into I/Os of at most
//! [`IO_SIZE`], and every piece is read from the target image and written at the same offset
//! into the base with synchronous `pread`/`pwrite`, then the base is synced once. Unlike the
//! issue's contiguous reference (the changed byte count copied as one run), this one does the
//! same number of scattered requests the layout forces on any merge.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cow_format::{CowReader, MergeMode};

use crate::harness::AlignedBuf;
use crate::scenario_support::{open_direct, open_direct_write, Res, IO_SIZE};

/// One byte range of the device: `offset` and `len` in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRun {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Destination runs of `extents` (first block, block count), merged where they touch or
/// overlap, in ascending order, in bytes of `block_size`. Every run must end at or before
/// `device_bytes`; a run past the device end, or arithmetic overflow, is an error.
pub fn destination_runs(
    extents: impl IntoIterator<Item = (u64, u64)>,
    block_size: u64,
    device_bytes: u64,
) -> Res<Vec<ByteRun>> {
    if block_size == 0 {
        return Err("block size 0 in the COW header".to_string());
    }
    let mut blocks: Vec<(u64, u64)> = extents
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(first, n)| {
            first
                .checked_add(n)
                .map(|end| (first, end))
                .ok_or_else(|| format!("op at block {first} of {n} blocks overflows"))
        })
        .collect::<Res<_>>()?;
    blocks.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (first, end) in blocks {
        match merged.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((first, end)),
        }
    }
    merged
        .into_iter()
        .map(|(first, end)| {
            let offset = first.checked_mul(block_size);
            let stop = end.checked_mul(block_size);
            match (offset, stop) {
                (Some(offset), Some(stop)) if stop <= device_bytes => Ok(ByteRun {
                    offset,
                    len: stop - offset,
                }),
                _ => Err(format!(
                    "changed blocks {first}..{end} (block size {block_size}) end past the device's {device_bytes} bytes: the COW does not belong to this target"
                )),
            }
        })
        .collect()
}

/// Runs of `extents` (first block, block count) taken in the order given, joining an extent
/// to the previous run only when it continues it upwards; in bytes of `block_size`, each
/// ending at or before `device_bytes`. Over the merge order this is the sequence of base
/// writes an op-by-op merge makes (a diagnostic next to the ascending runs).
pub fn runs_in_order(
    extents: impl IntoIterator<Item = (u64, u64)>,
    block_size: u64,
    device_bytes: u64,
) -> Res<Vec<ByteRun>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (first, n) in extents.into_iter().filter(|&(_, n)| n > 0) {
        let end = first
            .checked_add(n)
            .ok_or_else(|| format!("op at block {first} of {n} blocks overflows"))?;
        match runs.last_mut() {
            Some(last) if last.1 == first => last.1 = end,
            _ => runs.push((first, end)),
        }
    }
    // Each run on its own: `destination_runs` of one extent checks and converts it.
    let mut out = Vec::with_capacity(runs.len());
    for (first, end) in runs {
        out.extend(destination_runs(
            [(first, end - first)],
            block_size,
            device_bytes,
        )?);
    }
    Ok(out)
}

/// The COW's destination runs in the user-space merge's order (see [`runs_in_order`]).
pub fn merge_order_runs_of_cow(cow: &Path, device_bytes: u64) -> Res<Vec<ByteRun>> {
    let file = File::open(cow).map_err(|e| format!("open {}: {e}", cow.display()))?;
    let reader = CowReader::open(file).map_err(|e| format!("read {}: {e}", cow.display()))?;
    let mut walk = reader.merge_order(MergeMode::User.order_options(false));
    let mut extents = Vec::new();
    while let Some((_, op)) = walk.next_indexed() {
        extents.push((op.new_block, op.num_blocks));
    }
    runs_in_order(extents, u64::from(reader.block_size()), device_bytes)
}

/// `runs` cut into I/Os of at most `max` bytes each (`max` > 0), in order.
pub fn io_pieces(runs: &[ByteRun], max: u64) -> Vec<ByteRun> {
    let max = max.max(1);
    let mut pieces = Vec::new();
    for run in runs {
        let mut done = 0;
        while done < run.len {
            let len = (run.len - done).min(max);
            pieces.push(ByteRun {
                offset: run.offset + done,
                len,
            });
            done += len;
        }
    }
    pieces
}

/// The destination runs of the COW at `cow` (every op's new blocks), for a device of
/// `device_bytes`.
pub fn runs_of_cow(cow: &Path, device_bytes: u64) -> Res<Vec<ByteRun>> {
    let file = File::open(cow).map_err(|e| format!("open {}: {e}", cow.display()))?;
    let reader = CowReader::open(file).map_err(|e| format!("read {}: {e}", cow.display()))?;
    destination_runs(
        reader.ops().iter().map(|op| (op.new_block, op.num_blocks)),
        u64::from(reader.block_size()),
        device_bytes,
    )
}

/// Copy `pieces` (each at most [`IO_SIZE`] bytes, 512-byte aligned) from `from` to the same
/// offsets of `to`, O_DIRECT, synchronously, then one fsync of `to`; returns the time taken.
pub fn copy_pieces_direct(from: &Path, to: &Path, pieces: &[ByteRun]) -> Res<Duration> {
    let src = open_direct(from)?;
    let dst = open_direct_write(to)?;
    let mut buf = AlignedBuf::new(IO_SIZE);
    let t = Instant::now();
    for p in pieces {
        let n = piece_len(p)?;
        src.read_exact_at(&mut buf.as_mut()[..n], p.offset)
            .map_err(|e| format!("read {} at {}: {e}", from.display(), p.offset))?;
        dst.write_all_at(&buf.as_ref()[..n], p.offset)
            .map_err(|e| format!("write {} at {}: {e}", to.display(), p.offset))?;
    }
    dst.sync_all()
        .map_err(|e| format!("fsync {}: {e}", to.display()))?;
    Ok(t.elapsed())
}

/// Check that `dev` equals `want` on every piece (O_DIRECT reads of both).
pub fn compare_pieces(dev: &Path, want: &Path, pieces: &[ByteRun]) -> Res<()> {
    let fd = open_direct(dev)?;
    let fw = open_direct(want)?;
    let mut a = AlignedBuf::new(IO_SIZE);
    let mut b = AlignedBuf::new(IO_SIZE);
    for p in pieces {
        let n = piece_len(p)?;
        fd.read_exact_at(&mut a.as_mut()[..n], p.offset)
            .map_err(|e| format!("read {} at {}: {e}", dev.display(), p.offset))?;
        fw.read_exact_at(&mut b.as_mut()[..n], p.offset)
            .map_err(|e| format!("read {} at {}: {e}", want.display(), p.offset))?;
        if let Some(i) = a.as_ref()[..n]
            .iter()
            .zip(&b.as_ref()[..n])
            .position(|(x, y)| x != y)
        {
            let at = p.offset + i as u64;
            return Err(format!(
                "{} differs from {} at byte {at} after the scattered copy",
                dev.display(),
                want.display()
            ));
        }
    }
    Ok(())
}

/// A piece's length as a buffer length, refusing pieces the buffer or O_DIRECT cannot take.
fn piece_len(p: &ByteRun) -> Res<usize> {
    match usize::try_from(p.len) {
        Ok(n) if n <= IO_SIZE && n % 512 == 0 && p.offset % 512 == 0 => Ok(n),
        _ => Err(format!(
            "piece at {} of {} bytes is not a 512-aligned I/O of at most {IO_SIZE} bytes",
            p.offset, p.len
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn run(offset: u64, len: u64) -> ByteRun {
        ByteRun { offset, len }
    }

    #[test]
    fn adjacent_and_overlapping_blocks_merge_in_ascending_order() {
        // Out of order; 5 and 6 touch 4; a multi-block op (8..12) overlaps 9.
        let runs = destination_runs(
            [(6, 1), (4, 1), (5, 1), (9, 1), (8, 4), (20, 1)],
            4096,
            1 << 30,
        )
        .expect("runs");
        assert_eq!(
            runs,
            vec![
                run(4 * 4096, 3 * 4096),
                run(8 * 4096, 4 * 4096),
                run(20 * 4096, 4096)
            ]
        );
    }

    #[test]
    fn empty_ops_give_no_runs_and_zero_block_ops_are_ignored() {
        assert!(destination_runs([], 4096, 4096).expect("no ops").is_empty());
        assert_eq!(
            destination_runs([(3, 0), (1, 1)], 4096, 1 << 20).expect("runs"),
            vec![run(4096, 4096)]
        );
    }

    #[test]
    fn a_run_ending_at_the_device_end_is_kept_and_one_past_it_is_refused() {
        let dev = 16 * 4096;
        assert_eq!(
            destination_runs([(14, 1), (15, 1)], 4096, dev).expect("ends at the end"),
            vec![run(14 * 4096, 2 * 4096)]
        );
        let past = destination_runs([(15, 2)], 4096, dev).expect_err("past the end");
        assert!(past.contains("past the device"), "{past}");
    }

    #[test]
    fn overflowing_extents_and_block_size_zero_are_errors() {
        assert!(destination_runs([(u64::MAX, 2)], 4096, u64::MAX).is_err());
        assert!(destination_runs([(u64::MAX / 2, 1)], 4096, u64::MAX).is_err());
        assert!(destination_runs([(0, 1)], 0, 4096).is_err());
    }

    #[test]
    fn runs_in_order_join_only_upward_continuations() {
        let runs =
            runs_in_order([(5, 1), (6, 2), (4, 1), (8, 1), (8, 1)], 4096, 1 << 20).expect("runs");
        assert_eq!(
            runs,
            vec![
                run(5 * 4096, 3 * 4096),
                run(4 * 4096, 4096),
                run(8 * 4096, 4096),
                run(8 * 4096, 4096),
            ]
        );
        assert!(runs_in_order([(255, 2)], 4096, 1 << 20).is_err());
    }

    #[test]
    fn long_runs_split_into_pieces_of_at_most_one_mib() {
        let pieces = io_pieces(&[run(4096, 2 * MIB + 8192), run(10 * MIB, MIB)], MIB);
        assert_eq!(
            pieces,
            vec![
                run(4096, MIB),
                run(4096 + MIB, MIB),
                run(4096 + 2 * MIB, 8192),
                run(10 * MIB, MIB),
            ]
        );
        let total: u64 = pieces.iter().map(|p| p.len).sum();
        assert_eq!(total, 3 * MIB + 8192);
    }

    #[test]
    fn pieces_the_buffer_cannot_take_are_refused() {
        assert!(piece_len(&run(0, IO_SIZE as u64)).is_ok());
        assert!(piece_len(&run(0, IO_SIZE as u64 + 512)).is_err());
        assert!(piece_len(&run(100, 512)).is_err());
    }

    #[test]
    fn copy_and_compare_on_files() {
        // tmpfs may refuse O_DIRECT; run only where the test directory accepts it.
        let dir = std::env::temp_dir().join(format!("scatter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let from = dir.join("target");
        let to = dir.join("base");
        let target: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
        std::fs::write(&from, &target).expect("target");
        std::fs::write(&to, vec![0u8; 4 * MIB as usize]).expect("base");
        let pieces = io_pieces(
            &destination_runs([(1, 1), (300, 300)], 4096, 4 * MIB).expect("runs"),
            MIB,
        );
        match copy_pieces_direct(&from, &to, &pieces) {
            Ok(_) => {
                compare_pieces(&to, &from, &pieces).expect("copied pieces equal");
                let base = std::fs::read(&to).expect("read base");
                assert!(base[..4096].iter().all(|&b| b == 0), "block 0 untouched");
                assert_eq!(&base[4096..8192], &target[4096..8192]);
                assert!(
                    base[8192..300 * 4096].iter().all(|&b| b == 0),
                    "gap untouched"
                );
                assert!(compare_pieces(&to, &from, &[run(0, 8192)]).is_err());
            }
            Err(e) => assert!(
                e.contains("O_DIRECT") || e.contains("Invalid argument"),
                "{e}"
            ),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
