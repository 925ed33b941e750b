//! The io_uring merge engine against `pread`/`pwrite` ground truth on real files (under
//! /var/tmp, a disk file system), its errors, and the fallback when io_uring is refused.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;
use snapuserd::uring::{
    uring_or_fallback, UringEngineError, UringIoError, UringMergeIo, UringOptions, UringUnavailable,
};
use snapuserd::user_merge::merge_io::{MergeIo, ReadRun, WriteRun};

const FILE_BYTES: usize = 1 << 20;

fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("uring-merge-io")
        .tempdir_in("/var/tmp")
        .expect("temp dir under /var/tmp")
}

/// Deterministic, position-dependent bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> File {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write fixture");
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open fixture")
}

fn engine(source: &File, base: &File, queue_depth: u32, max_piece_bytes: u32) -> UringMergeIo {
    UringMergeIo::new(
        source,
        base,
        &UringOptions {
            queue_depth,
            max_piece_bytes,
        },
    )
    .expect("io_uring engine (the test machine has io_uring)")
}

fn uring_error(error: &io::Error) -> &UringIoError {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<UringIoError>())
        .expect("the io::Error carries a UringIoError")
}

/// Disjoint `(offset, len)` runs inside `FILE_BYTES`, in random order.
fn disjoint_runs() -> impl Strategy<Value = Vec<(u64, usize)>> {
    prop::collection::vec((0usize..FILE_BYTES, 1usize..70_000), 0..40).prop_map(|mut cuts| {
        cuts.sort();
        let mut runs = Vec::new();
        let mut floor = 0usize;
        for (start, len) in cuts {
            let start = start.max(floor);
            let end = (start + len).min(FILE_BYTES);
            if start < end {
                runs.push((start as u64, end - start));
                floor = end;
            }
        }
        // The engine may reorder; the caller's order must not matter.
        runs.reverse();
        runs
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_read_batches_match_pread(
        runs in prop::collection::vec((0usize..FILE_BYTES, 1usize..100_000), 0..48),
        queue_depth in 1u32..10,
        max_piece_bytes in prop::sample::select(vec![512u32, 4096, 65536, 1 << 20]),
    ) {
        let dir = scratch_dir();
        let content = pattern(FILE_BYTES, 7);
        let source = file_with(dir.path(), "source", &content);
        let base = file_with(dir.path(), "base", &[]);
        let mut io = engine(&source, &base, queue_depth, max_piece_bytes);

        // Runs may overlap each other (reads do not conflict) but stay inside the file.
        let shapes: Vec<(u64, usize)> = runs
            .iter()
            .map(|&(start, len)| (start as u64, len.min(FILE_BYTES - start)))
            .collect();
        let mut buffers: Vec<Vec<u8>> = shapes.iter().map(|&(_, len)| vec![0u8; len]).collect();
        let mut batch: Vec<ReadRun<'_>> = shapes
            .iter()
            .zip(buffers.iter_mut())
            .map(|(&(offset, _), buf)| ReadRun { offset, buf: buf.as_mut_slice() })
            .collect();
        io.read_source(&mut batch).expect("read batch");
        for (&(offset, len), got) in shapes.iter().zip(&buffers) {
            let mut want = vec![0u8; len];
            source.read_exact_at(&mut want, offset).expect("pread");
            prop_assert_eq!(got, &want, "run at {}", offset);
        }
    }

    #[test]
    fn random_write_batches_match_pwrite(
        runs in disjoint_runs(),
        queue_depth in 1u32..10,
        max_piece_bytes in prop::sample::select(vec![512u32, 4096, 65536, 1 << 20]),
        durably in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let dir = scratch_dir();
        let before = pattern(FILE_BYTES, 3);
        let source = file_with(dir.path(), "source", &[]);
        let base = file_with(dir.path(), "base", &before);
        let truth = file_with(dir.path(), "truth", &before);
        let mut io = engine(&source, &base, queue_depth, max_piece_bytes);

        let payloads: Vec<Vec<u8>> = runs
            .iter()
            .enumerate()
            .map(|(i, &(_, len))| pattern(len, seed.wrapping_add(i as u64)))
            .collect();
        let batch: Vec<WriteRun<'_>> = runs
            .iter()
            .zip(&payloads)
            .map(|(&(offset, _), buf)| WriteRun { offset, buf })
            .collect();
        if durably {
            io.write_base_durably(&batch).expect("durable write batch");
        } else {
            io.write_base(&batch).expect("write batch");
            io.sync_base().expect("sync");
        }
        for run in &batch {
            truth.write_all_at(run.buf, run.offset).expect("pwrite");
        }
        let mut got = vec![0u8; FILE_BYTES];
        base.read_exact_at(&mut got, 0).expect("read base back");
        let mut want = vec![0u8; FILE_BYTES];
        truth.read_exact_at(&mut want, 0).expect("read truth back");
        prop_assert!(got == want, "base differs from the pwrite ground truth");
    }
}

#[test]
fn a_read_past_the_end_of_the_source_is_an_end_of_device_error() {
    let dir = scratch_dir();
    let source = file_with(dir.path(), "source", &pattern(10_000, 1));
    let base = file_with(dir.path(), "base", &[]);
    let mut io = engine(&source, &base, 4, 4096);

    let mut inside = vec![0u8; 4096];
    let mut across = vec![0u8; 8192];
    let mut batch = [
        ReadRun {
            offset: 0,
            buf: &mut inside,
        },
        ReadRun {
            offset: 4096,
            buf: &mut across,
        },
    ];
    let error = io
        .read_source(&mut batch)
        .expect_err("the source ends at 10000");
    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    match uring_error(&error) {
        UringIoError::EndOfDevice { run, offset } => {
            assert_eq!(*run, 1);
            assert_eq!(
                *offset, 10_000,
                "the read comes back short at 10000, then empty"
            );
        }
        other => panic!("unexpected error {other:?}"),
    }

    // Nothing is left in flight: the engine serves the next batch.
    let mut again = vec![0u8; 100];
    io.read_source(&mut [ReadRun {
        offset: 9_900,
        buf: &mut again,
    }])
    .expect("read after the failed batch");
    assert_eq!(again, pattern(10_000, 1)[9_900..]);
}

#[test]
fn writing_a_read_only_base_fails_every_write_call_and_nothing_hangs() {
    let dir = scratch_dir();
    let source = file_with(dir.path(), "source", &pattern(65_536, 2));
    let writable = file_with(dir.path(), "base", &[0u8; 65_536]);
    drop(writable);
    let read_only = File::open(dir.path().join("base")).expect("open read-only");
    let mut io = engine(&source, &read_only, 4, 4096);

    let data = pattern(40_000, 5);
    let batch: Vec<WriteRun<'_>> = data
        .chunks(4096)
        .enumerate()
        .map(|(i, buf)| WriteRun {
            offset: (i * 4096) as u64,
            buf,
        })
        .collect();
    for durably in [false, true] {
        let error = if durably {
            io.write_base_durably(&batch)
        } else {
            io.write_base(&batch)
        }
        .expect_err("the base is read-only");
        assert_eq!(
            error.raw_os_error(),
            None,
            "the error is wrapped with context"
        );
        match uring_error(&error) {
            UringIoError::Piece { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::EBADF));
            }
            other => panic!("unexpected error {other:?}"),
        }
    }
    let mut unchanged = vec![0u8; 65_536];
    read_only
        .read_exact_at(&mut unchanged, 0)
        .expect("read base");
    assert!(unchanged.iter().all(|&b| b == 0), "no byte was written");

    // The engine is still usable for reads.
    let mut buf = vec![0u8; 65_536];
    io.read_source(&mut [ReadRun {
        offset: 0,
        buf: &mut buf,
    }])
    .expect("read after failed writes");
    assert_eq!(buf, pattern(65_536, 2));
}

#[test]
fn batches_far_beyond_the_queue_depth_complete() {
    let dir = scratch_dir();
    let blocks = 3000usize;
    let source_bytes = pattern(blocks * 4096, 11);
    let source = file_with(dir.path(), "source", &source_bytes);
    let base = file_with(dir.path(), "base", &[]);
    let mut io = engine(&source, &base, 4, 4096);

    // Read every block in reverse order, one run each: 750x the queue depth.
    let mut copy = vec![0u8; blocks * 4096];
    let mut reads: Vec<ReadRun<'_>> = copy
        .chunks_mut(4096)
        .enumerate()
        .rev()
        .map(|(i, buf)| ReadRun {
            offset: (i * 4096) as u64,
            buf,
        })
        .collect();
    io.read_source(&mut reads).expect("large read batch");
    assert!(copy == source_bytes, "every block read right");

    // Write them to the base in one durable batch, every other block first.
    let mut writes: Vec<WriteRun<'_>> = copy
        .chunks(4096)
        .enumerate()
        .map(|(i, buf)| WriteRun {
            offset: (i * 4096) as u64,
            buf,
        })
        .collect();
    writes.sort_by_key(|run| (run.offset / 4096 % 2, run.offset));
    io.write_base_durably(&writes)
        .expect("large durable write batch");
    let mut written = vec![0u8; blocks * 4096];
    base.read_exact_at(&mut written, 0).expect("read base");
    assert!(written == source_bytes, "the base holds every block");
}

#[test]
fn a_single_run_longer_than_a_piece_is_split_and_read_whole() {
    let dir = scratch_dir();
    let content = pattern(3 << 20, 13);
    let source = file_with(dir.path(), "source", &content);
    let base = file_with(dir.path(), "base", &[]);
    let mut io = engine(&source, &base, 8, 64 << 10);
    let mut buf = vec![0u8; (3 << 20) - 1000];
    io.read_source(&mut [ReadRun {
        offset: 1000,
        buf: &mut buf,
    }])
    .expect("one long run");
    assert!(buf == content[1000..]);
}

#[test]
fn empty_batches_and_a_bare_barrier_succeed() {
    let dir = scratch_dir();
    let source = file_with(dir.path(), "source", &[1u8; 4096]);
    let base = file_with(dir.path(), "base", &[2u8; 4096]);
    let mut io = engine(&source, &base, 2, 4096);
    io.read_source(&mut []).expect("empty read batch");
    io.write_base(&[]).expect("empty write batch");
    io.write_base_durably(&[]).expect("empty durable batch");
    io.sync_base().expect("bare barrier");
    let mut empty: [u8; 0] = [];
    io.read_source(&mut [ReadRun {
        offset: 4096,
        buf: &mut empty,
    }])
    .expect("a zero-length run at the end of the file is nothing to read");
    assert_eq!(io.name(), "io_uring");
}

#[test]
fn out_of_range_options_are_refused_not_clamped() {
    let dir = scratch_dir();
    let source = file_with(dir.path(), "source", &[]);
    let base = file_with(dir.path(), "base", &[]);
    for (queue_depth, max_piece_bytes) in [(0, 4096), (4097, 4096), (8, 0)] {
        let error = UringMergeIo::new(
            &source,
            &base,
            &UringOptions {
                queue_depth,
                max_piece_bytes,
            },
        )
        .expect_err("out of range");
        assert!(matches!(error, UringEngineError::InvalidOptions { .. }));
        assert!(!error.is_unavailable());
    }
}

/// A stand-in for the synchronous engine, to see which engine the fallback picked.
struct MarkerEngine;

impl MergeIo for MarkerEngine {
    fn name(&self) -> &'static str {
        "marker"
    }
    fn read_source(&mut self, _runs: &mut [ReadRun<'_>]) -> io::Result<()> {
        Ok(())
    }
    fn write_base(&mut self, _runs: &[WriteRun<'_>]) -> io::Result<()> {
        Ok(())
    }
    fn sync_base(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Make `io_uring_setup` fail with `EPERM` on the calling thread (and threads it starts), as
/// a seccomp policy that forbids io_uring does.
fn forbid_io_uring_on_this_thread() {
    const AUDIT_ARCH: u32 = if cfg!(target_arch = "x86_64") {
        0xC000_003E
    } else if cfg!(target_arch = "aarch64") {
        0xC000_00B7
    } else {
        0
    };
    assert_ne!(AUDIT_ARCH, 0, "add this architecture's AUDIT_ARCH value");
    let ld_abs = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    // seccomp_data: nr at offset 0, arch at offset 4.
    let mut filter = [
        libc::sock_filter {
            code: ld_abs,
            jt: 0,
            jf: 0,
            k: 4,
        },
        libc::sock_filter {
            code: jeq,
            jt: 0,
            jf: 3,
            k: AUDIT_ARCH,
        },
        libc::sock_filter {
            code: ld_abs,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: jeq,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: ret,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: ret,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_NO_NEW_PRIVS: {}", io::Error::last_os_error());
    // SAFETY: `program` points at `filter`, both alive for the call; the kernel copies the
    // program. Without SECCOMP_FILTER_FLAG_TSYNC the filter binds this thread only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &program as *const libc::sock_fprog,
        )
    };
    assert_eq!(rc, 0, "seccomp: {}", io::Error::last_os_error());
}

#[test]
fn io_uring_refused_by_seccomp_falls_back_to_the_synchronous_engine() {
    let dir = scratch_dir();
    let source = file_with(dir.path(), "source", &[]);
    let base = file_with(dir.path(), "base", &[]);
    // A thread of its own: the filter stays with it and ends with it.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                forbid_io_uring_on_this_thread();

                let why = snapuserd::uring::probe().expect_err("io_uring_setup is forbidden");
                assert!(
                    matches!(
                        why,
                        UringUnavailable::Denied | UringUnavailable::DisabledBySysctl { .. }
                    ),
                    "EPERM is reported as a policy refusal, got {why:?}"
                );

                let error = UringMergeIo::new(&source, &base, &UringOptions::default())
                    .expect_err("no ring under the filter");
                assert!(error.is_unavailable());

                let mut fallback_called = false;
                let chosen = uring_or_fallback(
                    &source,
                    &base,
                    Default::default(),
                    &UringOptions::default(),
                    || {
                        fallback_called = true;
                        Ok(Box::new(MarkerEngine))
                    },
                )
                .expect("the fallback engine");
                assert!(fallback_called);
                assert_eq!(chosen.name(), "marker");
            })
            .join()
            .expect("the filtered thread did not panic");
    });

    // Outside the filtered thread io_uring works, and the fallback is not used.
    let chosen = uring_or_fallback(
        &source,
        &base,
        Default::default(),
        &UringOptions::default(),
        || Ok(Box::new(MarkerEngine)),
    )
    .expect("an engine");
    assert_eq!(chosen.name(), "io_uring");
}

#[test]
fn a_failing_barrier_fails_the_batch() {
    let dir = scratch_dir();
    let source = file_with(dir.path(), "source", &[]);
    // fdatasync of a pipe fails with EINVAL: a barrier that cannot make anything durable.
    let (_read_end, write_end) = nix::unistd::pipe().expect("pipe");
    let base = File::from(write_end);
    let mut io = engine(&source, &base, 4, 4096);
    for durable_batch in [false, true] {
        let error = if durable_batch {
            io.write_base_durably(&[])
        } else {
            io.sync_base()
        }
        .expect_err("a pipe cannot be synced");
        match uring_error(&error) {
            UringIoError::Sync(source) => assert_eq!(source.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("unexpected error {other:?}"),
        }
    }
}
