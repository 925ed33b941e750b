//! `--merge-mode user|legacy`: the COPY/XOR order `create` writes for each mode, `verify`
//! checking the safety rule in the mode's order, and `apply` merging in place in the
//! mode's order, including resuming after a partial `num_merge_ops`.

mod create_common;

use std::fs::{self, File, OpenOptions};
use std::path::Path;

use cow_format::merge_state::MergeState;
use cow_format::{CowReader, CowVersion, CowWriter, MergeMode, WriterOptions};
use create_common::{copy_block, merge_prefix, texty_blocks, Rng};
use ota_tools::apply::{apply_with_mode, ApplyError, ApplyOptions};
use ota_tools::create::command::{create_cow, CreateOptions};
use ota_tools::create::merge_check::MergeCheckError;
use ota_tools::inspect;
use ota_tools::verify::{verify_in_mode, VerifyError};

const BLOCKS: usize = 96;

/// Source and target: blocks 10..40 of the target copy source blocks 50..80 (independent
/// COPYs, their sources unchanged), blocks 82..90 copy 85..93 (a run shifted down by
/// three), and blocks 0..4 and 93..96 get new data (REPLACE).
fn fixture(d: &Path) -> (Vec<u8>, Vec<u8>) {
    let s = texty_blocks(&mut Rng::new(11), BLOCKS);
    let mut t = s.clone();
    for n in 10..40 {
        copy_block(&mut t, n, &s, n + 40);
    }
    for n in 82..90 {
        copy_block(&mut t, n, &s, n + 3);
    }
    let fresh = texty_blocks(&mut Rng::new(12), 8);
    for (k, n) in (0..4).chain(93..96).enumerate() {
        copy_block(&mut t, n, &fresh, k);
    }
    fs::write(d.join("src.img"), &s).unwrap();
    fs::write(d.join("tgt.img"), &t).unwrap();
    (s, t)
}

fn create(d: &Path, version: CowVersion, mode: MergeMode) -> std::path::PathBuf {
    let cow = d.join(format!("{version:?}-{mode}.cow"));
    create_cow(
        &CreateOptions {
            version,
            merge_mode: mode,
            ..CreateOptions::default()
        },
        &d.join("src.img"),
        &d.join("tgt.img"),
        &cow,
    )
    .unwrap();
    cow
}

/// Longest run in `blocks` whose consecutive entries differ by `step`.
fn longest_run(blocks: &[u64], step: i64) -> usize {
    let mut best = usize::from(!blocks.is_empty());
    let mut cur = best;
    for w in blocks.windows(2) {
        if w[1] as i64 - w[0] as i64 == step {
            cur += 1;
            best = best.max(cur);
        } else {
            cur = 1;
        }
    }
    best
}

/// New blocks of the COPY/XOR ops in `mode`'s merge order.
fn ordered_blocks(cow: &Path, mode: MergeMode) -> Vec<u64> {
    let reader = CowReader::open(File::open(cow).unwrap()).unwrap();
    reader
        .merge_order(mode.order_options(false))
        .filter(|op| op.kind.is_ordered())
        .map(|op| op.new_block)
        .collect()
}

#[test]
fn create_orders_independent_copies_for_the_chosen_mode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    for version in [CowVersion::V2, CowVersion::V3] {
        let user = ordered_blocks(&create(d, version, MergeMode::User), MergeMode::User);
        let legacy = ordered_blocks(&create(d, version, MergeMode::Legacy), MergeMode::Legacy);
        let independent = |v: &[u64]| -> Vec<u64> {
            v.iter().copied().filter(|b| (10..40).contains(b)).collect()
        };
        assert_eq!(independent(&user), (10..40).collect::<Vec<u64>>());
        assert_eq!(independent(&legacy), (10..40).rev().collect::<Vec<u64>>());
        assert!(longest_run(&user, 1) >= 30, "{version:?} user {user:?}");
        assert!(
            longest_run(&legacy, -1) >= 30,
            "{version:?} legacy {legacy:?}"
        );
        // The run shifted down: block n reads n+3, so n merges first in both modes; the
        // user-space order is then simply ascending.
        for order in [&user, &legacy] {
            let pos = |b: u64| order.iter().position(|&x| x == b).unwrap();
            for n in 82..87 {
                assert!(pos(n) < pos(n + 3), "{version:?} {order:?}");
            }
        }
        let shifted: Vec<u64> = user.iter().copied().filter(|b| *b >= 82).collect();
        assert_eq!(shifted, (82..90).collect::<Vec<u64>>());
    }
}

/// A v2 COW whose sequence names only block 7, so COPY 5 <- 2 is merged with the REPLACE
/// of block 2 in the REPLACE/ZERO part: before it in the legacy (descending) order, after
/// it in the user-space (ascending) order.
#[test]
fn verify_checks_the_safety_rule_in_the_chosen_mode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = texty_blocks(&mut Rng::new(21), 10);
    let fresh = texty_blocks(&mut Rng::new(22), 1);
    let mut t = s.clone();
    copy_block(&mut t, 7, &s, 8);
    copy_block(&mut t, 5, &s, 2);
    copy_block(&mut t, 2, &fresh, 0);
    fs::write(d.join("src.img"), &s).unwrap();
    fs::write(d.join("tgt.img"), &t).unwrap();
    let cow = d.join("mixed.cow");
    let opts = WriterOptions {
        version: CowVersion::V2,
        ..WriterOptions::default()
    };
    let mut w = CowWriter::create(File::create(&cow).unwrap(), opts).unwrap();
    w.add_sequence(&[7]).unwrap();
    w.add_copy(7, 8).unwrap();
    w.add_copy(5, 2).unwrap();
    w.add_replace(2, &fresh).unwrap();
    w.finalize().unwrap();

    let report = verify_in_mode(
        &d.join("src.img"),
        &d.join("tgt.img"),
        &cow,
        MergeMode::Legacy,
    )
    .unwrap();
    assert_eq!(report.ordered_ops, 2);
    let err = verify_in_mode(
        &d.join("src.img"),
        &d.join("tgt.img"),
        &cow,
        MergeMode::User,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::UnsafeOrder(MergeCheckError::OrderedAfterOther { new_block: 5, .. })
        ),
        "{err}"
    );
}

/// In-place apply of `cow` in `mode` over `dev`, after recording `merged` in the COW.
fn apply_in_place(d: &Path, cow: &Path, dev: &[u8], merged: u64, mode: MergeMode) -> Vec<u8> {
    let cow_copy = d.join("resume.cow");
    fs::copy(cow, &cow_copy).unwrap();
    if merged > 0 {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cow_copy)
            .unwrap();
        MergeState::open(f).unwrap().commit_merged(merged).unwrap();
    }
    let img = d.join("dev.img");
    fs::write(&img, dev).unwrap();
    apply_with_mode(
        &ApplyOptions {
            source: img.clone(),
            cow: cow_copy,
            output: img.clone(),
            size: None,
            progress: false,
            threads: 2,
        },
        mode,
    )
    .unwrap();
    fs::read(&img).unwrap()
}

#[test]
fn apply_in_each_mode_merges_and_resumes_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (s, t) = fixture(d);
    for version in [CowVersion::V2, CowVersion::V3] {
        for mode in MergeMode::ALL {
            let cow = create(d, version, mode);
            assert_eq!(
                apply_in_place(d, &cow, &s, 0, mode),
                t,
                "{version:?} {mode}"
            );
            let reader = CowReader::open(File::open(&cow).unwrap()).unwrap();
            let total = reader.merge_order(mode.order_options(false)).len();
            let ordered = reader
                .merge_order(mode.order_options(false))
                .filter(|op| op.kind.is_ordered())
                .count();
            assert!(total > ordered + 1, "{version:?}: needs REPLACE ops");
            // Stop inside the ordered part (replaying it would read overwritten blocks of
            // the shifted run) and inside the REPLACE part (where the modes differ).
            for k in [ordered / 2, ordered + 1] {
                let mut dev = s.clone();
                merge_prefix(&cow, &mut dev, mode, Some(k));
                let out = apply_in_place(d, &cow, &dev, k as u64, mode);
                assert_eq!(out, t, "{version:?} {mode} resumed after {k}");
            }
            // The same progress read in the other mode skips the wrong blocks.
            let other = if mode == MergeMode::User {
                MergeMode::Legacy
            } else {
                MergeMode::User
            };
            let mut dev = s.clone();
            merge_prefix(&cow, &mut dev, mode, Some(ordered + 1));
            let out = apply_in_place(d, &cow, &dev, ordered as u64 + 1, other);
            assert_ne!(out, t, "{version:?}: resuming {mode} progress as {other}");
        }
    }
}

#[test]
fn in_place_apply_refuses_progress_past_the_end_and_leaves_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (s, _) = fixture(d);
    let cow = create(d, CowVersion::V3, MergeMode::User);
    let total = CowReader::open(File::open(&cow).unwrap())
        .unwrap()
        .merge_order(MergeMode::User.order_options(false))
        .len();
    let bad = d.join("past_end.cow");
    fs::copy(&cow, &bad).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&bad)
        .unwrap();
    MergeState::open(f)
        .unwrap()
        .commit_merged(total as u64 + 1)
        .unwrap();
    let img = d.join("dev_past_end.img");
    fs::write(&img, &s).unwrap();
    let err = apply_with_mode(
        &ApplyOptions {
            source: img.clone(),
            cow: bad,
            output: img.clone(),
            size: None,
            progress: false,
            threads: 2,
        },
        MergeMode::User,
    )
    .unwrap_err();
    assert!(
        matches!(err, ApplyError::MergedPastEnd { num_merge_ops, total: t, .. } if num_merge_ops == total as u64 + 1 && t == total),
        "{err}"
    );
    assert_eq!(
        fs::read(&img).unwrap(),
        s,
        "a refused merge wrote to the image"
    );
}

#[test]
fn inspect_tells_which_mode_the_progress_fits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let cow = create(d, CowVersion::V2, MergeMode::User);
    let reader = CowReader::open(File::open(&cow).unwrap()).unwrap();
    let total = reader.num_total_data_ops();
    let ordered = reader
        .merge_order(MergeMode::User.order_options(false))
        .filter(|op| op.kind.is_ordered())
        .count() as u64;
    let probe = |merged: u64| {
        let c = d.join("probe.cow");
        fs::copy(&cow, &c).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&c).unwrap();
        MergeState::open(f).unwrap().commit_merged(merged).unwrap();
        inspect::inspect(&c, inspect::OpOrder::File, None).unwrap()
    };
    let none = inspect::inspect(&cow, inspect::OpOrder::File, None).unwrap();
    assert!(none.summary.merge_progress.is_none());

    let p = probe(ordered).summary.merge_progress.unwrap();
    assert_eq!(p.verdict, "same");

    let report = probe(ordered + 1);
    let p = report.summary.merge_progress.as_ref().unwrap();
    assert_eq!(p.verdict, "ambiguous");
    let reading = |mode: &str| {
        p.readings
            .iter()
            .find(|r| r.mode == mode)
            .unwrap()
            .merged_blocks
            .clone()
    };
    // The first REPLACE/ZERO entry is the lowest such block in user mode (block 0) and
    // the highest in legacy mode (block 95).
    assert_eq!(reading("user").first().map(|r| r.0), Some(0));
    assert!(!reading("legacy").iter().any(|r| r.0 == 0));
    assert!(reading("legacy")
        .iter()
        .any(|&(f, n)| f + n == BLOCKS as u64));
    let mut json = Vec::new();
    report.write_json(&mut json).unwrap();
    let json = String::from_utf8(json).unwrap();
    assert!(json.contains("\"verdict\": \"ambiguous\""), "{json}");
    let mut text = Vec::new();
    report.write_text(&mut text).unwrap();
    assert!(String::from_utf8(text)
        .unwrap()
        .contains("cannot tell which"));

    let p = probe(total + 5).summary.merge_progress.unwrap();
    assert_eq!(p.verdict, "neither");
    assert!(p.readings.iter().all(|r| !r.consistent));
}
