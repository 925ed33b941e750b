//! `ota-tools create`: error paths, atomic output and determinism across thread counts.

mod create_common;

use std::fs;
use std::path::Path;
use std::process::Command;

use cow_format::{Compression, CowVersion};
use create_common::{pairs, BS};
use ota_tools::create::command::{create_cow, CreateError, CreateOptions};

const COMPRESSIONS: [&str; 5] = ["none", "gz", "brotli,5", "lz4", "zstd"];

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ota-tools"))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn write_pair(dir: &Path, s: &[u8], t: &[u8]) {
    fs::write(dir.join("src.img"), s).unwrap();
    fs::write(dir.join("tgt.img"), t).unwrap();
}

fn opts(version: CowVersion, comp: &str, threads: usize) -> CreateOptions {
    CreateOptions {
        version,
        compression: comp.parse::<Compression>().unwrap(),
        compression_factor: 16384,
        threads: Some(threads),
        ..CreateOptions::default()
    }
}

#[test]
fn output_is_identical_for_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let chosen = ["edited", "byte-shifted", "3-cycle-and-rotation", "random"];
    for (name, s, t) in pairs().into_iter().filter(|p| chosen.contains(&p.0)) {
        write_pair(dir.path(), &s, &t);
        for version in [CowVersion::V2, CowVersion::V3] {
            // Every compression on one pair, two on the others (debug builds are slow).
            let comps: &[&str] = if name == "edited" {
                &COMPRESSIONS
            } else {
                &["lz4", "zstd"]
            };
            for &comp in comps {
                let mut files = Vec::new();
                for threads in [1, 2, 4] {
                    let out = dir.path().join(format!("out-{threads}.cow"));
                    create_cow(
                        &opts(version, comp, threads),
                        &dir.path().join("src.img"),
                        &dir.path().join("tgt.img"),
                        &out,
                    )
                    .unwrap();
                    files.push(fs::read(&out).unwrap());
                }
                assert_eq!(
                    files[0], files[1],
                    "{name} {version:?} {comp}: 1 vs 2 threads"
                );
                assert_eq!(
                    files[0], files[2],
                    "{name} {version:?} {comp}: 1 vs 4 threads"
                );
            }
        }
    }
}

#[test]
fn cli_create_then_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, s, t) = pairs().into_iter().find(|p| p.0 == "swap").unwrap();
    write_pair(d, &s, &t);
    let out = bin()
        .args([
            "create",
            "--threads",
            "2",
            "--compression",
            "zstd,3",
            "--source",
        ])
        .arg(d.join("src.img"))
        .arg("--target")
        .arg(d.join("tgt.img"))
        .arg("--output")
        .arg(d.join("out.cow"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("1 copy") && summary.contains("1 cycle breaks"),
        "{summary}"
    );
    assert!(summary.contains("cow: "), "{summary}");
    let verify = |target: &str| {
        bin()
            .args(["verify", "--source"])
            .arg(d.join("src.img"))
            .arg("--target")
            .arg(d.join(target))
            .arg("--cow")
            .arg(d.join("out.cow"))
            .output()
            .unwrap()
    };
    let ok = verify("tgt.img");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok: "));
    // Against the source as "target", block 10 (the first swapped one) differs.
    let bad = verify("src.img");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("block 10 does not match"), "{err}");
}

#[test]
fn missing_and_unreadable_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("tgt.img"), vec![1u8; 4 * BS]).unwrap();
    fs::create_dir(d.join("adir")).unwrap();
    for (src, tgt) in [
        ("missing.img", "tgt.img"),
        ("tgt.img", "missing.img"),
        ("adir", "tgt.img"),
    ] {
        let out = bin()
            .args(["create", "--source"])
            .arg(d.join(src))
            .arg("--target")
            .arg(d.join(tgt))
            .arg("--output")
            .arg(d.join("out.cow"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot open image"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one-line message: {err}");
        assert_eq!(entries(d), vec!["adir", "tgt.img"], "nothing left behind");
    }
}

#[test]
fn target_not_whole_blocks_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pair(d, &vec![0u8; 2 * BS], &vec![0u8; 2 * BS + 100]);
    let err = create_cow(
        &CreateOptions::default(),
        &d.join("src.img"),
        &d.join("tgt.img"),
        &d.join("out.cow"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a multiple of 4096"), "{err}");
    assert_eq!(entries(d), vec!["src.img", "tgt.img"]);
}

#[test]
fn unwritable_output_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pair(d, &vec![1u8; 2 * BS], &vec![2u8; 2 * BS]);
    // Parent is a regular file, and parent does not exist.
    for out in [
        d.join("src.img").join("out.cow"),
        d.join("nodir").join("out.cow"),
    ] {
        let err = create_cow(
            &CreateOptions::default(),
            &d.join("src.img"),
            &d.join("tgt.img"),
            &out,
        )
        .unwrap_err();
        assert!(matches!(err, CreateError::Output { .. }), "{err}");
    }
    assert_eq!(entries(d), vec!["src.img", "tgt.img"]);
}

#[test]
fn failure_after_the_temp_file_exists_removes_it_and_keeps_old_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pair(d, &vec![1u8; 2 * BS], &vec![2u8; 2 * BS]);
    fs::write(d.join("out.cow"), b"previous").unwrap();
    // An invalid compression factor is only rejected by the writer, after the
    // temporary file has been created.
    let bad = CreateOptions {
        compression_factor: 12345,
        ..CreateOptions::default()
    };
    let err = create_cow(
        &bad,
        &d.join("src.img"),
        &d.join("tgt.img"),
        &d.join("out.cow"),
    )
    .unwrap_err();
    assert!(matches!(err, CreateError::Write(_)), "{err}");
    assert_eq!(entries(d), vec!["out.cow", "src.img", "tgt.img"]);
    assert_eq!(fs::read(d.join("out.cow")).unwrap(), b"previous");
}

#[test]
fn output_naming_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pair(d, &vec![1u8; 2 * BS], &vec![2u8; 2 * BS]);
    for (input, role) in [("src.img", "source"), ("tgt.img", "target")] {
        let err = create_cow(
            &CreateOptions::default(),
            &d.join("src.img"),
            &d.join("tgt.img"),
            &d.join(input),
        )
        .unwrap_err();
        assert!(
            matches!(err, CreateError::OutputIsInput { role: r, .. } if r == role),
            "{err}"
        );
    }
    assert_eq!(fs::read(d.join("src.img")).unwrap(), vec![1u8; 2 * BS]);
    assert_eq!(fs::read(d.join("tgt.img")).unwrap(), vec![2u8; 2 * BS]);
    assert_eq!(entries(d), vec!["src.img", "tgt.img"]);
}

#[test]
fn cli_rejects_bad_options() {
    for args in [
        ["--cow-version", "4"],
        ["--compression", "xz"],
        ["--compression-factor", "3k"],
        ["--compression-factor", "512k"],
    ] {
        let out = bin()
            .args(["create", "--source", "a", "--target", "b", "--output", "c"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
    }
}

/// Run `cmd` and wait at most `limit` for it; a run still going is killed and reported.
fn output_within(cmd: &mut Command, limit: std::time::Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn thread_counts_beyond_the_cap_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pair(d, &vec![1u8; 4 * BS], &vec![2u8; 4 * BS]);
    let max = ota_tools::create::command::max_threads();
    for threads in ["100000", &(max + 1).to_string(), "0"] {
        let out = output_within(
            bin().current_dir(d).args([
                "create",
                "--source",
                "src.img",
                "--target",
                "tgt.img",
                "--output",
                "out.cow",
                "--threads",
                threads,
            ]),
            std::time::Duration::from_secs(20),
        );
        assert_eq!(out.status.code(), Some(2), "--threads {threads}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("give 1 to {max}")), "{err}");
    }
    assert_eq!(entries(d), vec!["src.img", "tgt.img"]);
    // The library applies the same cap.
    let err = create_cow(
        &opts(CowVersion::V3, "lz4", max + 1),
        &d.join("src.img"),
        &d.join("tgt.img"),
        &d.join("out.cow"),
    )
    .unwrap_err();
    assert!(matches!(err, CreateError::ThreadCount { .. }), "{err}");
    // The cap itself is accepted.
    create_cow(
        &opts(CowVersion::V3, "lz4", max),
        &d.join("src.img"),
        &d.join("tgt.img"),
        &d.join("out.cow"),
    )
    .unwrap();
    let help = bin().args(["create", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("at most twice the number of CPUs"), "{help}");
}

#[test]
fn verify_applies_the_target_size_rule_of_create() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pair(d, &vec![1u8; 4 * BS], &vec![2u8; 4 * BS]);
    create_cow(
        &CreateOptions::default(),
        &d.join("src.img"),
        &d.join("tgt.img"),
        &d.join("out.cow"),
    )
    .unwrap();
    // The target with 1,000 trailing bytes: create refuses it, and so must verify.
    let mut long = vec![2u8; 4 * BS];
    long.extend_from_slice(&[2u8; 1000]);
    fs::write(d.join("long.img"), &long).unwrap();
    let mut messages = Vec::new();
    for args in [
        [
            "create", "--source", "src.img", "--target", "long.img", "--output", "x.cow",
        ],
        [
            "verify", "--source", "src.img", "--target", "long.img", "--cow", "out.cow",
        ],
    ] {
        let out = bin().current_dir(d).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains("long.img is 17384 bytes, not a multiple of 4096"),
            "{err}"
        );
        messages.push(err);
    }
    assert_eq!(messages[0], messages[1], "one rule, one message");
    let ok = bin()
        .current_dir(d)
        .args([
            "verify", "--source", "src.img", "--target", "tgt.img", "--cow", "out.cow",
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn compression_options_that_would_be_ignored_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pair(d, &vec![1u8; 4 * BS], &vec![2u8; 4 * BS]);
    let cases: [(&[&str], &str); 4] = [
        (&["--compression", ""], "empty"),
        (&["--compression", "lz4,5"], "take no level"),
        (&["--compression", "none,3"], "take no level"),
        (
            &["--cow-version", "2", "--compression-factor", "4k"],
            "--compression-factor applies to v3",
        ),
    ];
    for (args, want) in cases {
        let out = bin()
            .current_dir(d)
            .args([
                "create", "--source", "src.img", "--target", "tgt.img", "--output", "o.cow",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(entries(d), vec!["src.img", "tgt.img"]);
    // Levels where they exist, and the factor with v3, still work.
    for args in [
        &["--compression", "zstd,19"][..],
        &["--compression", "gz,1", "--cow-version", "2"],
        &["--compression-factor", "4k"],
    ] {
        let out = bin()
            .current_dir(d)
            .args([
                "create", "--source", "src.img", "--target", "tgt.img", "--output", "o.cow",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn an_interrupted_create_leaves_no_temporary_file() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Large enough that a debug build is still working when the signal arrives.
    let blocks = 16 * 1024;
    let mut src = Vec::with_capacity(blocks * BS);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..blocks * BS / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        src.extend_from_slice(&x.to_le_bytes());
    }
    let mut tgt = src.clone();
    tgt.rotate_left(BS * 3 + 17);
    write_pair(d, &src, &tgt);
    fs::write(d.join("out.cow"), b"previous").unwrap();
    for signal in ["INT", "TERM"] {
        let mut child = bin()
            .current_dir(d)
            .args([
                "create", "--source", "src.img", "--target", "tgt.img", "--output", "out.cow",
            ])
            .args(["--threads", "1"])
            .spawn()
            .unwrap();
        // Wait for the hidden temporary file, then interrupt.
        let start = std::time::Instant::now();
        while !entries(d).iter().any(|n| n.starts_with(".out.cow.")) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "create ended before the signal"
            );
            assert!(start.elapsed().as_secs() < 30, "no temporary file appeared");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let killed = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = child.wait().unwrap();
        assert!(
            status.signal().is_some(),
            "SIG{signal}: ended by the signal, {status:?}"
        );
        assert_eq!(
            entries(d),
            vec!["out.cow", "src.img", "tgt.img"],
            "SIG{signal}: no temporary file left"
        );
        assert_eq!(fs::read(d.join("out.cow")).unwrap(), b"previous");
    }
}
