//! A real short write through the io_uring engine: `RLIMIT_FSIZE` makes the kernel take only
//! the bytes below the limit, so the engine must resubmit the remainder at the right offset
//! (where the kernel then refuses with `EFBIG`) instead of reporting success.
//!
//! The limit is process-wide, so this file holds this one test only (its own test binary).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use snapuserd::uring::{UringIoError, UringMergeIo, UringOptions};
use snapuserd::user_merge::merge_io::{MergeIo, WriteRun};

const LIMIT: u64 = 10_000;

#[test]
fn a_short_write_is_resubmitted_at_its_remainder_and_its_failure_reported_there() {
    let dir = tempfile::Builder::new()
        .prefix("uring-short-write")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let source = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("source"))
        .expect("source");
    let base = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("base"))
        .expect("base");
    let mut io = UringMergeIo::new(&source, &base, &UringOptions::default()).expect("engine");

    // SAFETY: ignoring SIGXFSZ installs no handler code; writes past the limit then fail with
    // EFBIG instead of killing the process.
    let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    assert_ne!(previous, libc::SIG_ERR);
    let limit = libc::rlimit {
        rlim_cur: LIMIT,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `limit` is a valid rlimit for the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }, 0);

    let data: Vec<u8> = (0..16_384u32).map(|i| (i % 253) as u8).collect();
    let result = io.write_base_durably(&[WriteRun {
        offset: 0,
        buf: &data,
    }]);

    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `unlimited` is a valid rlimit for the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &unlimited) };
    assert_eq!(rc, 0);

    let error = result.expect_err("the bytes past the limit cannot be written");
    let inner = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<UringIoError>())
        .expect("a UringIoError inside");
    match inner {
        UringIoError::Piece {
            run,
            offset,
            len,
            source,
            ..
        } => {
            assert_eq!(*run, 0);
            assert_eq!(*offset, LIMIT, "the remainder went out at the limit");
            assert_eq!(u64::from(*len), data.len() as u64 - LIMIT);
            assert_eq!(source.raw_os_error(), Some(libc::EFBIG));
        }
        other => panic!("unexpected error {other:?}"),
    }
    let mut written = vec![0u8; LIMIT as usize];
    base.read_exact_at(&mut written, 0).expect("read back");
    assert_eq!(written, data[..LIMIT as usize], "the short part landed");
    assert_eq!(base.metadata().expect("metadata").len(), LIMIT);
}
