//! Hostile input: truncated, bit-flipped, random and crafted files must give a
//! clean error or a correct parse, never a panic, hang or oversized
//! allocation. A counting allocator checks the allocation bound.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::*;
use cow_format::fuzz_harness;
use cow_format::{CowReader, ReadError};

/// Tracks the largest single allocation made by each thread.
struct CountingAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every method forwards to the system allocator unchanged; the only
// extra work is updating a const-initialised thread-local Cell, which never
// allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's; forwarded verbatim.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's; forwarded verbatim.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr`/`layout` came from this allocator, which is `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Run `f` and return the largest single allocation it made on this thread.
fn largest_alloc(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    f();
    LARGEST.with(|l| l.get())
}

fn open(data: &[u8]) -> Result<CowReader<Vec<u8>>, ReadError> {
    CowReader::from_storage(data.to_vec())
}

#[test]
fn seeds_parse() {
    for (name, file) in seed_corpus() {
        let r = if name.contains("no_footer") {
            CowReader::from_storage_at_label(file.clone(), 1)
        } else {
            CowReader::from_storage(file.clone())
        };
        let r = r.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!r.ops().is_empty(), "{name}");
        fuzz_harness::run(&file);
    }
}

#[test]
fn every_truncation_is_an_error_or_a_prefix_parse() {
    for (name, file) in seed_corpus() {
        let full = open(&file).ok().map(|r| r.ops().to_vec());
        for len in 0..file.len() {
            let cut = &file[..len];
            // A v2 cut loses the footer, so it never parses without a label. A
            // v3 cut can parse only if every op and payload survived, and then
            // it reads the same ops.
            if let Ok(r) = open(cut) {
                assert!(name.starts_with("v3"), "{name} cut at {len} parsed");
                assert_eq!(Some(r.ops().to_vec()), full, "{name} cut at {len}");
            }
            fuzz_harness::run(cut);
        }
    }
}

#[test]
fn torn_v2_recovers_at_labels() {
    let file = cow_v2();
    // Label 1 is recoverable once its record (ends at 0x200062) and the
    // payload of the REPLACE before it (ends at 0x20108A) are on disk.
    for len in (0x200026..file.len()).step_by(7) {
        let r = CowReader::from_storage_at_label(file[..len].to_vec(), 1);
        if len >= 0x20108A {
            let r = r.unwrap_or_else(|e| panic!("cut {len}: {e}"));
            assert_eq!(r.ops().len(), 2);
        } else if len < 0x20004E {
            // The REPLACE record itself is incomplete: no label reachable.
            assert!(
                matches!(r, Err(ReadError::LabelNotFound { .. })),
                "cut {len}"
            );
        } else {
            // The REPLACE record is whole but its payload is cut off.
            assert!(matches!(r, Err(ReadError::OutOfBounds { .. })), "cut {len}");
        }
    }
}

#[test]
fn bit_flips_never_panic() {
    for (name, file) in seed_corpus() {
        // Every bit of the metadata area, a stride through payloads.
        let meta_end = file.len().min(700);
        let positions = (0..meta_end).chain((meta_end..file.len()).step_by(13));
        for pos in positions {
            for bit in 0..8 {
                let mut f = file.clone();
                f[pos] ^= 1 << bit;
                let _ = open(&f);
                if bit == 0 {
                    fuzz_harness::run(&f);
                }
            }
        }
        let _ = name;
    }
}

#[test]
fn random_bytes_are_rejected() {
    for seed in 0..2000u64 {
        let len = (seed as usize * 37) % 3000;
        let mut data = pseudo_random(seed, len);
        if seed % 2 == 0 && data.len() >= 8 {
            data[..8].copy_from_slice(&MAGIC);
        }
        if seed % 4 == 0 && data.len() >= 14 {
            data[8..10].copy_from_slice(&(2 + (seed % 3) as u16 % 2).to_le_bytes());
            data[10..12].copy_from_slice(&0u16.to_le_bytes());
        }
        assert!(open(&data).is_err() || data.len() >= 38, "seed {seed}");
        fuzz_harness::run(&data);
    }
}

#[test]
fn hostile_cluster_skips_terminate() {
    // A chain of CLUSTER ops with skip 0: each moves 20 bytes forward.
    let mut f = v2_header(2, 38, 4096, 2, 0, 0);
    for _ in 0..50_000 {
        f.extend_from_slice(&v2_op(CLUSTER, 0, 0, 0, 0));
    }
    assert!(matches!(open(&f), Err(ReadError::NoFooter)));
    // A skip that overflows u64, and one past the end of the file.
    for skip in [u64::MAX, u64::MAX - 19, 1 << 40] {
        let mut f = v2_header(2, 38, 4096, 2, 0, 0);
        f.extend_from_slice(&v2_op(CLUSTER, 0, 0, 0, skip));
        f.extend_from_slice(&[0u8; 200]);
        assert!(open(&f).is_err(), "skip {skip}");
    }
    // cluster_ops = u32::MAX: batches are bounded by the file size.
    let mut f = v2_header(2, 38, 4096, u32::MAX, 0, 0);
    f.extend_from_slice(&v2_op(ZERO, 0, 0, 1, 0));
    f.extend_from_slice(&v2_op(FOOTER, 0, 64, 20, 1));
    f.extend_from_slice(&[0u8; 64]);
    let big = largest_alloc(|| {
        let r = open(&f).unwrap();
        assert_eq!(r.ops().len(), 1);
    });
    assert!(big < 1 << 20, "largest allocation {big}");
}

fn v3_header_with(
    f: &mut [u8],
    sequence: Option<u64>,
    rp_count: Option<u32>,
    op_count: Option<u64>,
    op_count_max: Option<u64>,
) {
    if let Some(s) = sequence {
        f[38..46].copy_from_slice(&s.to_le_bytes());
    }
    if let Some(c) = rp_count {
        f[46..50].copy_from_slice(&c.to_le_bytes());
    }
    if let Some(c) = op_count {
        f[54..62].copy_from_slice(&c.to_le_bytes());
    }
    if let Some(m) = op_count_max {
        f[62..70].copy_from_slice(&m.to_le_bytes());
    }
}

#[test]
fn hostile_v3_counts_do_not_allocate() {
    let base = V3File::default().assemble(&[V3Rec::zero(1), V3Rec::copy(2, 3)]);
    type Case = (Option<u64>, Option<u32>, Option<u64>, Option<u64>);
    let cases: [Case; 7] = [
        (Some(u64::MAX), None, None, None),
        (Some(1 << 40), None, None, None),
        (None, Some(u32::MAX), None, None),
        (None, None, Some(u64::MAX), Some(u64::MAX)),
        (None, None, Some(u32::MAX as u64), Some(u32::MAX as u64)),
        (None, None, Some(1 << 33), Some(1 << 34)),
        (None, None, Some(17), None),
    ];
    for (i, (s, rp, oc, om)) in cases.into_iter().enumerate() {
        let mut f = base.clone();
        v3_header_with(&mut f, s, rp, oc, om);
        let big = largest_alloc(|| {
            let r = open(&f);
            if i == 2 {
                // resume_point_count above max is an AOSP quirk we accept.
                assert!(r.is_ok(), "case {i}: {r:?}");
            } else {
                assert!(r.is_err(), "case {i}");
            }
            for label in 0..3 {
                let _ = CowReader::from_storage_at_label(f.clone(), label);
            }
        });
        assert!(
            big < 16 * f.len() + 65536,
            "case {i}: largest allocation {big}"
        );
    }
}

#[test]
fn hostile_v2_lengths_are_bounded() {
    // REPLACE claiming a payload past the end; SEQUENCE with a 65532-byte
    // payload past the end; footer with a wrong count.
    let mut f = v2_header(2, 38, 4096, 0, 0, 0);
    f.extend_from_slice(&v2_op(REPLACE, 0, 4096, 1, 58));
    f.extend_from_slice(&[0u8; 100]);
    f.extend_from_slice(&v2_op(FOOTER, 0, 64, 20, 1));
    f.extend_from_slice(&[0u8; 64]);
    assert!(matches!(open(&f), Err(ReadError::OutOfBounds { .. })));

    let mut f = v2_header(2, 38, 4096, 4, 0, 0);
    f.extend_from_slice(&v2_op(SEQUENCE, 0, 65532, 0, 200));
    f.extend_from_slice(&v2_op(FOOTER, 0, 64, 20, 1));
    f.extend_from_slice(&[0u8; 200]);
    let big = largest_alloc(|| assert!(open(&f).is_err()));
    assert!(big < 65536 + 4096, "largest allocation {big}");

    let mut f = V2File::default().assemble(&[V2Rec::zero(1)]);
    let n = f.len();
    f[n - 84 + 12..n - 84 + 20].copy_from_slice(&5u64.to_le_bytes());
    assert!(open(&f).is_err());
}

#[test]
fn file_shrinking_under_the_reader_is_an_error() {
    use std::io::Write;
    let (_, file) = seed_corpus()
        .into_iter()
        .find(|(n, _)| n == "v3_lz4_file_order")
        .unwrap();
    let mut tmp = tempfile::tempfile().unwrap();
    tmp.write_all(&file).unwrap();
    let r = CowReader::open(tmp.try_clone().unwrap()).unwrap();
    let src = source_image(16, 512);
    let mut out = vec![0u8; 512];
    r.read_block(4, &src, &mut out).unwrap();
    tmp.set_len(r.ops()[2].data_offset + 1).unwrap();
    let e = r.read_block(4, &src, &mut out).unwrap_err();
    assert!(matches!(e, ReadError::Io { .. }), "{e}");
    // Blocks that need no payload still read.
    r.read_block(9, &src, &mut out).unwrap();
}

#[test]
fn file_shrinking_under_a_mapped_reader_is_an_error_not_sigbus() {
    use std::io::Write;
    let mut data = vec![0u8; 0];
    // A v3 file whose payloads span several pages.
    let recs: Vec<V3Rec> = (0..8u32)
        .map(|i| V3Rec::replace(i, 0, pseudo_random(u64::from(i), 4096)))
        .collect();
    data.extend(V3File::default().assemble(&recs));
    let mut tmp = tempfile::tempfile().unwrap();
    tmp.write_all(&data).unwrap();
    let r = CowReader::open_mapped(tmp.try_clone().unwrap()).unwrap();
    let src: Vec<u8> = Vec::new();
    let mut out = vec![0u8; 4096];
    for i in 0..8u64 {
        r.read_block(i, &src, &mut out).unwrap();
        assert_eq!(out, pseudo_random(i, 4096));
    }
    tmp.set_len(4096).unwrap();
    let e = r.read_block(7, &src, &mut out).unwrap_err();
    assert!(matches!(e, ReadError::Io { .. }), "{e}");

    // Torn v2 file through the mapping, recovered at a label.
    let file = cow_v2();
    let mut torn = tempfile::tempfile().unwrap();
    torn.write_all(&file[..0x20218E]).unwrap();
    assert!(matches!(
        CowReader::open_mapped(torn.try_clone().unwrap()),
        Err(ReadError::NoFooter)
    ));
    let r = CowReader::open_mapped_at_label(torn, 2).unwrap();
    assert_eq!(r.ops().len(), 13);
    r.read_block(2, &src, &mut out).unwrap();
    assert_eq!(out, test_text(4096));
}

/// The fuzz harness over the seed corpus plus 20,000 deterministic mutations
/// (byte flips, truncations, splices, integer overwrites at field offsets).
#[test]
fn fuzz_harness_over_seed_mutations() {
    let seeds: Vec<Vec<u8>> = seed_corpus().into_iter().map(|(_, f)| f).collect();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 7;
        state ^= state >> 9;
        state
    };
    let interesting: [u64; 8] = [0, 1, 0xFF, 0xFFFF, 0xFFFF_FFFF, u64::MAX, 1 << 48, 4096];
    for _ in 0..20_000 {
        let mut f = seeds[(next() % seeds.len() as u64) as usize].clone();
        let rounds = 1 + next() % 4;
        for _ in 0..rounds {
            if f.is_empty() {
                break;
            }
            let pos = (next() % f.len() as u64) as usize;
            match next() % 5 {
                0 => f[pos] ^= 1 << (next() % 8),
                1 => f[pos] = next() as u8,
                2 => f.truncate(pos),
                3 => {
                    let v = interesting[(next() % 8) as usize].to_le_bytes();
                    let w = [1usize, 2, 4, 8][(next() % 4) as usize];
                    let end = (pos + w).min(f.len());
                    f[pos..end].copy_from_slice(&v[..end - pos]);
                }
                _ => {
                    let other = &seeds[(next() % seeds.len() as u64) as usize];
                    let from = (next() % other.len() as u64) as usize;
                    let n = ((next() % 64) as usize)
                        .min(other.len() - from)
                        .min(f.len() - pos);
                    f[pos..pos + n].copy_from_slice(&other[from..from + n]);
                }
            }
        }
        fuzz_harness::run(&f);
    }
}

/// The checked-in fuzz seed corpus (`fuzz/corpus/seed/`) is exactly what the
/// hand assembler produces. Regenerate with `COW_REGEN_SEEDS=1 cargo test -p
/// cow-format --test robustness seed_corpus_is_checked_in`.
#[test]
fn seed_corpus_is_checked_in() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/seed");
    let regen = std::env::var_os("COW_REGEN_SEEDS").is_some();
    if regen {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, file) in seed_corpus() {
        let path = dir.join(&name);
        if regen {
            std::fs::write(&path, &file).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(on_disk, file, "{} is stale", path.display());
        fuzz_harness::run(&on_disk);
    }
}

#[test]
fn reader_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<CowReader>();
    check::<CowReader<Vec<u8>>>();
}

/// The mapped reader's SIGBUS guard passes faults that are not in its
/// mappings on to the previous handler: a truncated mapping of someone else's
/// still kills the process with SIGBUS, as it would without the guard.
#[test]
fn foreign_sigbus_still_terminates() {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    if std::env::var_os("COW_SIGBUS_CHILD").is_some() {
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&V3File::default().assemble(&[V3Rec::zero(1)]))
            .unwrap();
        let _guarded = CowReader::open_mapped(tmp).unwrap();
        let mut other = tempfile::tempfile().unwrap();
        other.write_all(&[1u8; 3 * 4096]).unwrap();
        // SAFETY: deliberately unsound use in a child process: the file is
        // truncated under the mapping to provoke a real SIGBUS.
        let map = unsafe { memmap2::Mmap::map(&other).unwrap() };
        other.set_len(0).unwrap();
        let v = std::hint::black_box(&map[..])[2 * 4096];
        // Only reached if the fault was swallowed.
        println!("read {v}");
        std::process::exit(0);
    }
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new(exe)
        .args(["--exact", "foreign_sigbus_still_terminates", "--nocapture"])
        .env("COW_SIGBUS_CHILD", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(7), "child status {status:?}");
}

#[test]
fn torn_v3_recovers_at_resume_points() {
    let text = test_text(4096);
    let file = V3File {
        op_count_max: 20,
        resume_points: vec![(1, 2), (2, 6)],
        ..V3File::default()
    }
    .assemble(&[
        V3Rec::copy(0, 5),
        V3Rec::replace(2, 0, text.clone()),
        V3Rec::xor(50, text, 98_314),
        V3Rec::zero(5),
        V3Rec::zero(6),
        V3Rec::zero(7),
    ]);
    // Cut inside the XOR payload (data area starts at 462, XOR at 4558).
    for len in [4558, 6000, file.len() - 1] {
        let cut = file[..len].to_vec();
        assert!(matches!(
            CowReader::from_storage(cut.clone()),
            Err(ReadError::OutOfBounds { .. })
        ));
        assert!(CowReader::from_storage_at_label(cut.clone(), 2).is_err());
        let r = CowReader::from_storage_at_label(cut, 1).unwrap();
        assert_eq!(r.ops().len(), 2);
        let mut out = vec![0u8; 4096];
        r.read_block(2, &Vec::new(), &mut out).unwrap();
        assert_eq!(out, test_text(4096));
    }
    // Cut inside the REPLACE payload: no checkpoint survives.
    assert!(CowReader::from_storage_at_label(file[..1000].to_vec(), 1).is_err());
}

#[test]
fn cow_v2_cut_in_header_or_scratch_is_an_error() {
    let file = cow_v2();
    for len in (0..0x200026).step_by(4099).chain([0x200025, 0x200027]) {
        assert!(open(&file[..len]).is_err(), "cut {len}");
        assert!(
            CowReader::from_storage_at_label(file[..len].to_vec(), 1).is_err(),
            "cut {len}"
        );
    }
}

/// A brotli payload declaring a huge window must not make the decoder
/// allocate it: windows above 22 bits are refused, and a hostile 22-bit
/// multi-metablock stream stays within the 4 MiB window.
#[test]
fn brotli_window_allocation_is_bounded() {
    let data = pseudo_random(3, 6 << 20);
    let mut out = vec![0u8; 4096];
    for (lgwin, ok) in [(24, false), (22, true)] {
        let params = brotli::enc::BrotliEncoderParams {
            quality: 1,
            lgwin,
            ..Default::default()
        };
        let mut c = Vec::new();
        brotli::BrotliCompress(&mut &data[..], &mut c, &params).unwrap();
        let big = largest_alloc(|| {
            let r = cow_format::compression::decompress(
                cow_format::CompressionAlgorithm::Brotli,
                &c,
                &mut out,
            );
            assert_eq!(r.is_ok(), ok, "lgwin {lgwin}");
        });
        assert!(
            big <= (4 << 20) + 4096,
            "lgwin {lgwin}: largest allocation {big}"
        );
    }
}
