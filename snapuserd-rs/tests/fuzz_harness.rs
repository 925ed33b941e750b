//! The fuzzing entry points of `snapuserd::fuzz_harness`, driven over their seeds and a
//! deterministic set of mutations, so CI runs them without cargo-fuzz.

use snapuserd::cow_backend::CowSnapshot;
use snapuserd::fuzz_harness::{
    control_message, ublk_descriptors, ublk_seeds, DmUserFixture, FixtureCow, XorShift as Rng,
    UBLK_RECORD,
};

/// One mutation of `seed`, keeping its first (selector) byte unless the mutation is a
/// plain bit flip anywhere.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = seed.to_vec();
    if out.is_empty() {
        return out;
    }
    match rng.below(6) {
        0 => {
            let at = rng.below(out.len());
            out[at] ^= 1 << rng.below(8);
        }
        1 => {
            // A header field of a 40-byte record: seq, type, flags, sector or len.
            let records = (out.len() - 1) / 40;
            let at = 1 + rng.below(records) * 40 + rng.below(5) * 8;
            let value = match rng.below(4) {
                0 => rng.next_u64(),
                1 => rng.next_u64() % 16,
                2 => 4096 << rng.below(12),
                _ => u64::MAX - rng.next_u64() % 8,
            };
            if at + 8 <= out.len() {
                out[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        2 => out.truncate(1 + rng.below(out.len())),
        3 => {
            let at = 1 + rng.below(out.len() - 1);
            let piece: Vec<u8> = out[at..(at + 40).min(out.len())].to_vec();
            let to = 1 + rng.below(out.len() - 1);
            out.splice(to..to, piece);
        }
        4 => {
            let at = rng.below(out.len());
            let n = 1 + rng.below(32);
            for i in at..(at + n).min(out.len()) {
                out[i] = rng.next_u64() as u8;
            }
        }
        _ => {
            let at = 1 + rng.below(out.len() - 1);
            out.drain(at..(at + 1 + rng.below(64)).min(out.len()));
        }
    }
    out
}

#[test]
fn dm_user_streams_over_seeds_and_mutations() {
    let fixture = DmUserFixture::create().expect("fixture");
    let mut rng = Rng(0x0dd_ba11_5eed);
    let mut runs = 0;
    for variant in FixtureCow::ALL {
        for seed in fixture.seed_streams(variant) {
            fixture.run_stream(&seed);
            runs += 1;
            for _ in 0..300 {
                fixture.run_stream(&mutate(&seed, &mut rng));
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 2 * 2 * 301);
}

/// The kernel-like seed really merges: without scratch space each write-back commits at
/// once, so the COW it leaves records the three merged ops; with scratch space nothing is
/// committed before the window ends.
#[test]
fn kernel_like_seed_commits_merge_progress() {
    let fixture = DmUserFixture::create().expect("fixture");
    for (variant, expected) in [
        (FixtureCow::V2ZstdNoScratch, 3),
        (FixtureCow::V3Lz4Scratch, 0),
    ] {
        let seed = fixture.seed_streams(variant).remove(0);
        fixture.run_stream(&seed);
        let snapshot = CowSnapshot::open(fixture.cow_path(), fixture.source_path()).unwrap();
        assert_eq!(
            snapshot.server().committed().unwrap(),
            expected,
            "{variant:?}"
        );
    }
}

/// Control-socket seeds: every command, and command lines in each daemon mode.
const CONTROL_SEEDS: &[(&str, &[u8])] = &[
    (
        "init",
        b"init,system_b-user-cow,/dev/block/dm-3,/dev/block/dm-1,/dev/block/dm-2",
    ),
    (
        "init_legacy",
        b"init,vendor-user-cow,/dev/block/dm-3,/dev/block/dm-1",
    ),
    ("start", b"start,system_b-user-cow"),
    ("query", b"query"),
    ("stop", b"stop"),
    ("delete", b"delete,system_b-user-cow"),
    ("detach", b"detach"),
    ("supports", b"supports,second_stage_socket_handoff"),
    ("initiate_merge", b"initiate_merge,system_b-user-cow"),
    ("merge_percent", b"merge_percent"),
    ("getstatus", b"getstatus,system_b-user-cow"),
    ("update_verify", b"update-verify"),
    ("pause_merge", b"pause_merge"),
    ("resume_merge", b"resume_merge"),
    (
        "args_no_socket",
        b"-no_socket\0misc,/dev/cow,/dev/src,/dev/base",
    ),
    (
        "args_socket",
        b"-socket\0snapuserd\0-worker_count=2\0-user_snapshot=false",
    ),
    ("args_handoff", b"-socket_handoff\0--\0-x"),
];

#[test]
fn control_messages_over_seeds_and_mutations() {
    let mut rng = Rng(0xc0_ffee);
    for (_, seed) in CONTROL_SEEDS {
        control_message(seed);
        for _ in 0..200 {
            let mut m = seed.to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(m.len());
                match rng.below(4) {
                    0 => m[at] = rng.next_u64() as u8,
                    1 => m[at] = b',',
                    2 => m.truncate(at),
                    _ => m.insert(at, b"\0,-=x"[rng.below(5)]),
                }
                if m.is_empty() {
                    break;
                }
            }
            control_message(&m);
        }
    }
}

#[test]
fn ublk_descriptors_over_seeds_and_mutations() {
    let mut rng = Rng(0x0b1c_5eed);
    for seed in ublk_seeds() {
        ublk_descriptors(&seed);
        for _ in 0..1_000 {
            let mut m = seed.clone();
            for _ in 0..1 + rng.below(3) {
                let records = (m.len().saturating_sub(7)) / UBLK_RECORD;
                match rng.below(5) {
                    0 => {
                        let at = rng.below(m.len());
                        m[at] ^= 1 << rng.below(8);
                    }
                    1 if records > 0 => {
                        // One field of a record: user_data, op, nr_sectors or start_sector.
                        let base = 7 + rng.below(records) * UBLK_RECORD;
                        let (at, width) = [(0, 8), (8, 4), (12, 4), (16, 8)][rng.below(4)];
                        let v = match rng.below(3) {
                            0 => rng.next_u64(),
                            1 => rng.next_u64() % 4096,
                            _ => u64::MAX - rng.next_u64() % 4,
                        };
                        m[base + at..base + at + width].copy_from_slice(&v.to_le_bytes()[..width]);
                    }
                    2 if m.len() >= 7 => m[rng.below(7)] = rng.next_u64() as u8,
                    3 => m.truncate(rng.below(m.len() + 1)),
                    _ => {
                        let at = rng.below(m.len());
                        m.insert(at, rng.next_u64() as u8);
                    }
                }
                if m.is_empty() {
                    break;
                }
            }
            ublk_descriptors(&m);
        }
    }
}

/// The checked-in seed corpora of the cargo-fuzz targets (`fuzz/corpus/dm_user_seed/`,
/// `fuzz/corpus/control_seed/`, `fuzz/corpus/ublk_seed/`) are exactly the seeds above. Regenerate them with
/// `SNAPUSERD_REGEN_SEEDS=1 cargo test -p snapuserd --test fuzz_harness seed_corpora`.
#[test]
fn seed_corpora_are_checked_in() {
    let fixture = DmUserFixture::create().expect("fixture");
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for variant in FixtureCow::ALL {
        for (i, seed) in fixture.seed_streams(variant).into_iter().enumerate() {
            seeds.push((format!("dm_user_seed/{variant:?}_{i}"), seed));
        }
    }
    for (name, seed) in CONTROL_SEEDS {
        seeds.push((format!("control_seed/{name}"), seed.to_vec()));
    }
    for (i, seed) in ublk_seeds().into_iter().enumerate() {
        seeds.push((format!("ublk_seed/handler_{i}"), seed));
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let regen = std::env::var_os("SNAPUSERD_REGEN_SEEDS").is_some();
    for (name, seed) in seeds {
        let path = root.join(&name);
        if regen {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &seed).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(on_disk == seed, "{} is stale", path.display());
    }
}
