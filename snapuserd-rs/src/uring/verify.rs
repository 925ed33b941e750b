//! [`verify_device`]: read a whole block device (or file) once, with `O_DIRECT`, through
//! io_uring and registered buffers: `update-verify`'s reader.
//!
//! The parameters are AOSP's: 1 MiB chunks with 4 reads in flight, or 256 KiB chunks with 2 in
//! flight for devices under 2 GiB. The buffers are one anonymous mapping, registered with the
//! ring once (so the kernel pins them once, not per read). A short read is resubmitted for its
//! remainder; the first error ends the pass and is returned with its device offset once every
//! read in flight has completed.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use io_uring::{opcode, types};
use memmap2::MmapMut;

use super::batch::MAX_TRANSIENT_RETRIES;
use super::probe::{check_opcodes, new_ring, UringUnavailable};

/// Devices smaller than this use the small chunks and the shallow queue.
pub const SMALL_DEVICE_BYTES: u64 = 2 << 30;
/// Chunk size for devices of at least [`SMALL_DEVICE_BYTES`].
pub const LARGE_CHUNK_BYTES: u32 = 1 << 20;
/// Reads in flight for devices of at least [`SMALL_DEVICE_BYTES`].
pub const LARGE_QUEUE_DEPTH: u32 = 4;
/// Chunk size for devices under [`SMALL_DEVICE_BYTES`].
pub const SMALL_CHUNK_BYTES: u32 = 256 << 10;
/// Reads in flight for devices under [`SMALL_DEVICE_BYTES`].
pub const SMALL_QUEUE_DEPTH: u32 = 2;

/// `O_DIRECT` lengths and offsets are kept multiples of this (the largest logical block size
/// in use); the tail of a device whose size is not a multiple reads short, which is expected.
const DIRECT_ALIGN: u32 = 4096;
/// Largest chunk accepted (the buffers are `chunk * depth` bytes of memory).
pub const MAX_CHUNK_BYTES: u32 = 16 << 20;
/// Largest queue depth accepted (registered buffers are indexed by `u16`).
pub const MAX_QUEUE_DEPTH: u32 = 64;

const ENTER_BACKOFF: Duration = Duration::from_millis(1);

/// AOSP's chunk size and queue depth for a device of `device_bytes`.
pub fn aosp_parameters(device_bytes: u64) -> (u32, u32) {
    if device_bytes < SMALL_DEVICE_BYTES {
        (SMALL_CHUNK_BYTES, SMALL_QUEUE_DEPTH)
    } else {
        (LARGE_CHUNK_BYTES, LARGE_QUEUE_DEPTH)
    }
}

/// How [`verify_device`] reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Chunk size; `None` for AOSP's ([`aosp_parameters`]). A multiple of 4096.
    pub chunk_bytes: Option<u32>,
    /// Reads in flight; `None` for AOSP's.
    pub queue_depth: Option<u32>,
    /// Read through the page cache when the file system refuses `O_DIRECT`, instead of
    /// failing with [`VerifyError::DirectIoRefused`].
    pub allow_buffered: bool,
}

/// What a verification pass read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    /// Bytes read (the whole device unless stopped).
    pub bytes_read: u64,
    /// Size of the device.
    pub device_bytes: u64,
    /// Whether the reads bypassed the page cache.
    pub direct_io: bool,
    /// Whether the stop flag ended the pass early.
    pub stopped: bool,
    /// Chunk size used.
    pub chunk_bytes: u32,
    /// Reads in flight used.
    pub queue_depth: u32,
}

/// Why a verification pass failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The chunk size or queue depth is out of range.
    #[error("chunk size {chunk_bytes} must be a multiple of {DIRECT_ALIGN} up to {MAX_CHUNK_BYTES}, and queue depth {queue_depth} between 1 and {MAX_QUEUE_DEPTH}")]
    InvalidOptions {
        /// The chunk size asked for.
        chunk_bytes: u32,
        /// The queue depth asked for.
        queue_depth: u32,
    },
    /// Opening the device failed.
    #[error("opening {path}")]
    Open {
        /// The device.
        path: PathBuf,
        /// The `open` error.
        #[source]
        source: io::Error,
    },
    /// The file system under `path` refuses `O_DIRECT` (`EINVAL`), and buffered reads were not
    /// allowed.
    #[error("{path} refuses O_DIRECT (is it on tmpfs before Linux 6.6, or procfs?); allow buffered reads or verify the block device itself")]
    DirectIoRefused {
        /// The device.
        path: PathBuf,
        /// The `open` error.
        #[source]
        source: io::Error,
    },
    /// The device's size could not be read.
    #[error("finding the size of {path}")]
    Size {
        /// The device.
        path: PathBuf,
        /// The `lseek` error.
        #[source]
        source: io::Error,
    },
    /// io_uring cannot be used here (AOSP then leaves the work to update_verifier).
    #[error("io_uring is unavailable")]
    Unavailable(#[source] UringUnavailable),
    /// The read buffers could not be mapped or registered with the ring.
    #[error("setting up {bytes} bytes of registered read buffers")]
    Buffers {
        /// Bytes of buffers.
        bytes: usize,
        /// The `mmap` or `IORING_REGISTER_BUFFERS` error.
        #[source]
        source: io::Error,
    },
    /// A read failed.
    #[error("reading {path}: {len} bytes at byte {offset}")]
    Read {
        /// The device.
        path: PathBuf,
        /// Device byte offset of the failed read.
        offset: u64,
        /// Bytes asked for.
        len: u32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The device ended before its announced size.
    #[error("reading {path}: no bytes at byte {offset}, before the device's size {device_bytes}")]
    EndOfDevice {
        /// The device.
        path: PathBuf,
        /// Where the read returned 0 bytes.
        offset: u64,
        /// The size the device announced.
        device_bytes: u64,
    },
    /// A read came back with a length the pass cannot continue from.
    #[error("reading {path}: {got} bytes back for {len} asked at byte {offset} (more than asked, or a short direct read off the 512-byte grid)")]
    BadLength {
        /// The device.
        path: PathBuf,
        /// Device byte offset of the read.
        offset: u64,
        /// Bytes asked for.
        len: u32,
        /// Bytes reported.
        got: i32,
    },
    /// `io_uring_enter` failed for good.
    #[error("io_uring_enter while verifying {path}")]
    Enter {
        /// The device.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// One chunk being read into its slot's buffer.
#[derive(Debug, Clone, Copy)]
struct ChunkRead {
    /// Device offset of the chunk.
    offset: u64,
    /// Bytes asked for the chunk (a multiple of 4096; may pass the device's end).
    want: u32,
    /// Bytes read so far.
    done: u32,
}

/// Read all of `path` with `O_DIRECT` through io_uring and registered buffers; `stop` ends the
/// pass early (reported in [`VerifyReport::stopped`], not as an error).
pub fn verify_device(
    path: &Path,
    options: &VerifyOptions,
    stop: &AtomicBool,
) -> Result<VerifyReport, VerifyError> {
    let (mut file, direct_io) = open_for_verify(path, options.allow_buffered)?;
    let device_bytes = file
        .seek(SeekFrom::End(0))
        .map_err(|source| VerifyError::Size {
            path: path.to_owned(),
            source,
        })?;
    let (aosp_chunk, aosp_depth) = aosp_parameters(device_bytes);
    let chunk_bytes = options.chunk_bytes.unwrap_or(aosp_chunk);
    let queue_depth = options.queue_depth.unwrap_or(aosp_depth);
    if chunk_bytes == 0
        || chunk_bytes % DIRECT_ALIGN != 0
        || chunk_bytes > MAX_CHUNK_BYTES
        || queue_depth == 0
        || queue_depth > MAX_QUEUE_DEPTH
    {
        return Err(VerifyError::InvalidOptions {
            chunk_bytes,
            queue_depth,
        });
    }
    let mut pass = Pass {
        path,
        file: &file,
        device_bytes,
        chunk_bytes,
        queue_depth,
        direct_io,
    };
    let (bytes_read, stopped) = pass.run(stop)?;
    Ok(VerifyReport {
        bytes_read,
        device_bytes,
        direct_io,
        stopped,
        chunk_bytes,
        queue_depth,
    })
}

/// Open `path` read-only with `O_DIRECT`, or buffered if that is refused and allowed.
fn open_for_verify(path: &Path, allow_buffered: bool) -> Result<(File, bool), VerifyError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            if !allow_buffered {
                return Err(VerifyError::DirectIoRefused {
                    path: path.to_owned(),
                    source: e,
                });
            }
            log::warn!(
                "update-verify: {} refuses O_DIRECT; reading it through the page cache",
                path.display()
            );
            let file = File::open(path).map_err(|source| VerifyError::Open {
                path: path.to_owned(),
                source,
            })?;
            Ok((file, false))
        }
        Err(source) => Err(VerifyError::Open {
            path: path.to_owned(),
            source,
        }),
    }
}

/// One verification pass over an open device.
struct Pass<'a> {
    path: &'a Path,
    file: &'a File,
    device_bytes: u64,
    chunk_bytes: u32,
    queue_depth: u32,
    direct_io: bool,
}

impl Pass<'_> {
    /// Bytes to ask for a chunk at `offset`: the chunk size, or the rest of the device rounded
    /// up to the alignment.
    fn want_at(&self, offset: u64) -> u32 {
        let left = self.device_bytes.saturating_sub(offset);
        if left >= u64::from(self.chunk_bytes) {
            self.chunk_bytes
        } else {
            // left < chunk_bytes <= MAX_CHUNK_BYTES, a multiple of DIRECT_ALIGN: no overflow,
            // and the rounded length still fits the slot's buffer.
            (left as u32).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
        }
    }

    /// Read every chunk; `(bytes read, stopped)`.
    fn run(&mut self, stop: &AtomicBool) -> Result<(u64, bool), VerifyError> {
        let depth = self.queue_depth as usize;
        let chunk = self.chunk_bytes as usize;
        let buffer_bytes = chunk * depth;
        // Declared before the ring so that it is dropped after it.
        let mut buffers =
            MmapMut::map_anon(buffer_bytes).map_err(|source| VerifyError::Buffers {
                bytes: buffer_bytes,
                source,
            })?;
        let ring = new_ring(self.queue_depth).map_err(VerifyError::Unavailable)?;
        check_opcodes(&ring).map_err(VerifyError::Unavailable)?;
        let mut ring = ring;
        let base = buffers.as_mut_ptr();
        let iovecs: Vec<libc::iovec> = (0..depth)
            .map(|slot| libc::iovec {
                // SAFETY: slot < depth, so `slot * chunk` lies inside the mapping of
                // `chunk * depth` bytes.
                iov_base: unsafe { base.add(slot * chunk) }.cast(),
                iov_len: chunk,
            })
            .collect();
        // SAFETY: every iovec covers a part of `buffers`, which outlives the ring (declared
        // before it, so dropped after it) and is not otherwise touched while reads run.
        unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|source| {
            VerifyError::Buffers {
                bytes: buffer_bytes,
                source,
            }
        })?;

        let fd = types::Fd(self.file.as_raw_fd());
        let mut slots: Vec<Option<ChunkRead>> = vec![None; depth];
        let mut next_offset = 0u64;
        let mut in_flight = 0usize;
        let mut bytes_read = 0u64;
        let mut stopped = false;
        let mut retries = 0u32;
        let mut failure: Option<VerifyError> = None;
        // Slots whose read must go out (new chunks, and remainders of short reads).
        let mut to_submit: Vec<usize> = Vec::with_capacity(depth);

        loop {
            if failure.is_none() {
                for (slot, state) in slots.iter_mut().enumerate() {
                    if state.is_some() || next_offset >= self.device_bytes {
                        continue;
                    }
                    if stop.load(Ordering::Relaxed) {
                        stopped = true;
                        break;
                    }
                    let want = self.want_at(next_offset);
                    *state = Some(ChunkRead {
                        offset: next_offset,
                        want,
                        done: 0,
                    });
                    // want >= 1 because next_offset < device_bytes.
                    next_offset = next_offset.saturating_add(u64::from(want));
                    to_submit.push(slot);
                }
                let mut sq = ring.submission();
                for slot in to_submit.drain(..) {
                    let Some(read) = slots[slot] else { continue };
                    // SAFETY: `done < want <= chunk`, so the address stays inside the slot's
                    // registered buffer.
                    let addr =
                        unsafe { iovecs[slot].iov_base.cast::<u8>().add(read.done as usize) };
                    let entry =
                        opcode::ReadFixed::new(fd, addr, read.want - read.done, slot as u16)
                            .offset(read.offset + u64::from(read.done))
                            .build()
                            .user_data(slot as u64);
                    // SAFETY: the entry reads into the slot's part of `buffers`, registered as
                    // buffer index `slot` and alive until after the ring is dropped; this loop
                    // reaps every entry before returning (or, after a failed enter, never
                    // enters the ring again). At most `depth` entries are queued, the ring's size.
                    if unsafe { sq.push(&entry) }.is_err() {
                        slots[slot] = None;
                        failure.get_or_insert(VerifyError::Enter {
                            path: self.path.to_owned(),
                            source: io::Error::from_raw_os_error(libc::EBUSY),
                        });
                        continue;
                    }
                    in_flight += 1;
                }
            }
            if in_flight == 0 {
                break;
            }
            if let Err(source) = enter_and_wait(&ring) {
                // The buffers outlive every read the kernel took (they are dropped after the
                // ring); wait for those, and drop the rest unsubmitted with the ring.
                let unconsumed = ring.submission().len();
                let mut outstanding = in_flight.saturating_sub(unconsumed);
                while outstanding > 0 {
                    let reaped = ring.completion().count();
                    outstanding = outstanding.saturating_sub(reaped);
                    if reaped == 0 {
                        std::thread::sleep(ENTER_BACKOFF);
                    }
                }
                return Err(VerifyError::Enter {
                    path: self.path.to_owned(),
                    source,
                });
            }
            let completions: Vec<(u64, i32)> = ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result()))
                .collect();
            for (user_data, res) in completions {
                let slot = usize::try_from(user_data).unwrap_or(usize::MAX);
                let Some(read) = slots.get(slot).copied().flatten() else {
                    log::error!("io_uring completion with unknown user_data {user_data}; ignored");
                    continue;
                };
                in_flight -= 1;
                match self.account(read, res, &mut retries) {
                    Ok(Some(next)) if failure.is_none() => {
                        slots[slot] = Some(next);
                        to_submit.push(slot);
                    }
                    Ok(Some(_)) => slots[slot] = None,
                    Ok(None) => {
                        // The chunk is complete: count the bytes inside the device.
                        let inside = self.device_bytes.saturating_sub(read.offset);
                        bytes_read += inside.min(u64::from(read.want));
                        slots[slot] = None;
                    }
                    Err(error) => {
                        slots[slot] = None;
                        failure.get_or_insert(error);
                    }
                }
            }
        }
        drop(ring);
        drop(buffers);
        match failure {
            Some(error) => Err(error),
            None => Ok((bytes_read, stopped)),
        }
    }

    /// What the completion `res` of `read` means: `None` the chunk is complete, `Some` the
    /// state to resubmit.
    fn account(
        &self,
        read: ChunkRead,
        res: i32,
        retries: &mut u32,
    ) -> Result<Option<ChunkRead>, VerifyError> {
        let at = read.offset + u64::from(read.done);
        let asked = read.want - read.done;
        if res < 0 {
            let errno = -res;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && *retries < MAX_TRANSIENT_RETRIES {
                *retries += 1;
                return Ok(Some(read));
            }
            return Err(VerifyError::Read {
                path: self.path.to_owned(),
                offset: at,
                len: asked,
                source: io::Error::from_raw_os_error(errno),
            });
        }
        let got = res.unsigned_abs();
        if got > asked {
            return Err(self.bad_length(at, asked, res));
        }
        let end = at + u64::from(got);
        if got == asked || end >= self.device_bytes {
            return Ok(None);
        }
        if got == 0 {
            return Err(VerifyError::EndOfDevice {
                path: self.path.to_owned(),
                offset: at,
                device_bytes: self.device_bytes,
            });
        }
        if self.direct_io && got % 512 != 0 {
            return Err(self.bad_length(at, asked, res));
        }
        Ok(Some(ChunkRead {
            done: read.done + got,
            ..read
        }))
    }

    fn bad_length(&self, offset: u64, len: u32, got: i32) -> VerifyError {
        VerifyError::BadLength {
            path: self.path.to_owned(),
            offset,
            len,
            got,
        }
    }
}

/// Submit and wait for one completion, riding out interruptions and transient shortages.
fn enter_and_wait(ring: &io_uring::IoUring) -> io::Result<()> {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                std::thread::sleep(ENTER_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;

    fn scratch_dir() -> tempfile::TempDir {
        // /var/tmp: a disk file system that takes O_DIRECT.
        tempfile::Builder::new()
            .prefix("uring-verify")
            .tempdir_in("/var/tmp")
            .expect("temp dir under /var/tmp")
    }

    fn file_of(dir: &Path, name: &str, len: usize) -> PathBuf {
        let path = dir.join(name);
        let mut file = File::create(&path).expect("create");
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        file.write_all(&bytes).expect("fill");
        path
    }

    fn never() -> AtomicBool {
        AtomicBool::new(false)
    }

    #[test]
    fn aosp_parameters_switch_at_two_gib() {
        assert_eq!(aosp_parameters(0), (256 << 10, 2));
        assert_eq!(aosp_parameters((2 << 30) - 1), (256 << 10, 2));
        assert_eq!(aosp_parameters(2 << 30), (1 << 20, 4));
        assert_eq!(aosp_parameters(u64::MAX), (1 << 20, 4));
    }

    #[test]
    fn a_whole_file_is_read_with_o_direct_including_an_unaligned_tail() {
        let dir = scratch_dir();
        let len = (3 << 20) + 1000;
        let path = file_of(dir.path(), "device", len);
        let report = verify_device(&path, &VerifyOptions::default(), &never()).expect("verify");
        assert_eq!(
            report,
            VerifyReport {
                bytes_read: len as u64,
                device_bytes: len as u64,
                direct_io: true,
                stopped: false,
                chunk_bytes: SMALL_CHUNK_BYTES,
                queue_depth: SMALL_QUEUE_DEPTH,
            }
        );
    }

    #[test]
    fn chosen_chunk_and_depth_are_used_and_read_everything() {
        let dir = scratch_dir();
        let len = 5 << 20;
        let path = file_of(dir.path(), "device", len);
        for (chunk, depth) in [(4096u32, 1u32), (64 << 10, 8), (1 << 20, 4), (16 << 20, 2)] {
            let options = VerifyOptions {
                chunk_bytes: Some(chunk),
                queue_depth: Some(depth),
                allow_buffered: false,
            };
            let report = verify_device(&path, &options, &never()).expect("verify");
            assert_eq!(report.bytes_read, len as u64, "chunk {chunk} depth {depth}");
            assert_eq!((report.chunk_bytes, report.queue_depth), (chunk, depth));
        }
    }

    #[test]
    fn an_empty_device_reads_zero_bytes() {
        let dir = scratch_dir();
        let path = file_of(dir.path(), "device", 0);
        let report = verify_device(&path, &VerifyOptions::default(), &never()).expect("verify");
        assert_eq!((report.bytes_read, report.device_bytes), (0, 0));
    }

    #[test]
    fn the_stop_flag_ends_the_pass_early_without_an_error() {
        let dir = scratch_dir();
        let path = file_of(dir.path(), "device", 1 << 20);
        let stop = AtomicBool::new(true);
        let report = verify_device(&path, &VerifyOptions::default(), &stop).expect("verify");
        assert!(report.stopped);
        assert_eq!(report.bytes_read, 0);
    }

    #[test]
    fn a_file_system_without_o_direct_is_a_clear_error_or_a_buffered_pass() {
        // procfs refuses O_DIRECT on every kernel (tmpfs did before 6.6).
        let path = Path::new("/proc/version");
        let error = verify_device(path, &VerifyOptions::default(), &never())
            .expect_err("procfs refuses O_DIRECT");
        assert!(
            matches!(error, VerifyError::DirectIoRefused { .. }),
            "got {error:?}"
        );
        let options = VerifyOptions {
            allow_buffered: true,
            ..VerifyOptions::default()
        };
        // The buffered open gets past the refusal; procfs then has no size to read up to (a
        // disk file system takes O_DIRECT, so no such file system is at hand with a size).
        let error = verify_device(path, &options, &never()).expect_err("procfs has no size");
        assert!(matches!(error, VerifyError::Size { .. }), "got {error:?}");
    }

    #[test]
    fn a_missing_device_and_bad_options_are_errors() {
        let dir = scratch_dir();
        let missing = dir.path().join("missing");
        assert!(matches!(
            verify_device(&missing, &VerifyOptions::default(), &never()),
            Err(VerifyError::Open { .. })
        ));
        let path = file_of(dir.path(), "device", 8192);
        for (chunk, depth) in [(0, 2), (1000, 2), (32 << 20, 2), (4096, 0), (4096, 65)] {
            let options = VerifyOptions {
                chunk_bytes: Some(chunk),
                queue_depth: Some(depth),
                allow_buffered: false,
            };
            assert!(matches!(
                verify_device(&path, &options, &never()),
                Err(VerifyError::InvalidOptions { .. })
            ));
        }
    }

    #[test]
    fn a_device_shorter_than_announced_fails_at_its_real_end() {
        let dir = scratch_dir();
        let path = file_of(dir.path(), "device", 1 << 20);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .expect("open");
        let mut pass = Pass {
            path: &path,
            file: &file,
            device_bytes: 3 << 20,
            chunk_bytes: 256 << 10,
            queue_depth: 2,
            direct_io: true,
        };
        match pass.run(&never()) {
            Err(VerifyError::EndOfDevice { offset, .. }) => assert_eq!(offset, 1 << 20),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_failing_read_reports_its_offset_and_errno() {
        let dir = scratch_dir();
        let path = file_of(dir.path(), "device", 1 << 20);
        // Reads of a write-only descriptor fail with EBADF.
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        let mut pass = Pass {
            path: &path,
            file: &file,
            device_bytes: 1 << 20,
            chunk_bytes: 64 << 10,
            queue_depth: 4,
            direct_io: false,
        };
        match pass.run(&never()) {
            Err(VerifyError::Read { offset, source, .. }) => {
                assert_eq!(offset % (64 << 10), 0);
                assert!(offset < 4 * (64 << 10), "one of the first reads fails");
                assert_eq!(source.raw_os_error(), Some(libc::EBADF));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn short_reads_are_resubmitted_and_bad_lengths_are_errors() {
        let path = Path::new("/dev/null");
        let file = File::open(path).expect("open");
        let pass = Pass {
            path,
            file: &file,
            device_bytes: 1 << 20,
            chunk_bytes: 64 << 10,
            queue_depth: 1,
            direct_io: true,
        };
        let read = ChunkRead {
            offset: 4096,
            want: 65536,
            done: 0,
        };
        let mut retries = 0;
        let next = pass.account(read, 8192, &mut retries).expect("short read");
        assert_eq!(next.map(|r| (r.offset, r.done)), Some((4096, 8192)));
        assert!(pass
            .account(read, 65536, &mut retries)
            .expect("full")
            .is_none());
        assert!(matches!(
            pass.account(read, 65537, &mut retries),
            Err(VerifyError::BadLength { .. })
        ));
        assert!(matches!(
            pass.account(read, 1000, &mut retries),
            Err(VerifyError::BadLength { .. })
        ));
        assert!(matches!(
            pass.account(read, 0, &mut retries),
            Err(VerifyError::EndOfDevice { offset: 4096, .. })
        ));
        let again = pass
            .account(read, -libc::EAGAIN, &mut retries)
            .expect("retry");
        assert_eq!(again.map(|r| r.done), Some(0));
        assert_eq!(retries, 1);
        // A chunk that crosses the device's end is complete when the read reaches it.
        let tail = ChunkRead {
            offset: (1 << 20) - 4096,
            want: 8192,
            done: 0,
        };
        assert!(pass
            .account(tail, 4096, &mut retries)
            .expect("tail")
            .is_none());
    }
}
