//! Helpers shared by the guest tests: devices, aligned buffers, patterns, bounded waits.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dm_ioctl::{DmControl, TableEntry};

/// Test outcome: Ok(detail) or Err(reason).
pub type TestResult = Result<String, String>;

/// Turn any error into a test failure with context (the error and each of its causes).
pub trait Ctx<T> {
    /// Attach `what` to the error.
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: std::error::Error> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {}", snapuserd::error_chain::ErrorChain(&e)))
    }
}

/// Fail with `msg` unless `cond`.
pub fn check(cond: bool, msg: impl Into<String>) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg.into())
    }
}

/// A dm device with a single `user` target, removed on drop.
pub struct UserDevice {
    /// DM device name.
    pub name: String,
    /// dm-user control name.
    pub control: String,
    /// Block node path.
    pub path: PathBuf,
    removed: bool,
}

impl UserDevice {
    /// Create `name` with table `0 <sectors> user 0 <sectors> <control>` and resume it.
    pub fn create(name: &str, control: &str, size: u64) -> Result<Self, String> {
        let dm = DmControl::open().ctx("open /dev/mapper/control")?;
        let sectors = size / 512;
        let info = dm
            .create_device(name, &[TableEntry::dm_user(0, sectors, control)])
            .ctx(&format!("create dm device {name}"))?;
        let path = dm.ensure_node(&info).ctx("device node")?;
        Ok(Self {
            name: name.into(),
            control: control.into(),
            path,
            removed: false,
        })
    }

    /// Open the block device, optionally with O_DIRECT.
    pub fn open(&self, direct: bool) -> Result<File, String> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if direct {
            o.custom_flags(nix::libc::O_DIRECT);
        }
        o.open(&self.path)
            .ctx(&format!("open {}", self.path.display()))
    }

    /// Remove the dm device (retrying briefly while it is still busy).
    pub fn remove(&mut self) -> Result<(), String> {
        let dm = DmControl::open().ctx("open /dev/mapper/control")?;
        let start = Instant::now();
        loop {
            match dm.remove(&self.name) {
                Ok(()) => {
                    self.removed = true;
                    return Ok(());
                }
                Err(e)
                    if start.elapsed() < Duration::from_secs(5)
                        && e.to_string().contains("EBUSY") =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("remove {}: {e}", self.name)),
            }
        }
    }
}

impl Drop for UserDevice {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.remove();
        }
    }
}

/// A buffer of `len` bytes aligned to 4096 (for O_DIRECT).
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Zeroed aligned buffer.
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + 4096];
        let start = storage.as_ptr().align_offset(4096);
        Self {
            storage,
            start,
            len,
        }
    }

    /// Aligned buffer holding `data`.
    pub fn from(data: &[u8]) -> Self {
        let mut b = Self::new(data.len());
        b.as_mut().copy_from_slice(data);
        b
    }

    /// Contents.
    pub fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// Mutable contents.
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// The reproducible random numbers of the read tests (xorshift64): block numbers for
/// random reads, the same sequence for the same seed on every run.
pub struct XorShift(u64);

impl XorShift {
    /// A generator started at `seed` (0 is replaced, it would stay 0).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next number below `n` (`n` at least 1).
    pub fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }
}

/// Deterministic pattern: each aligned 8-byte word encodes (seed, its absolute offset).
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let word =
        |w: u64| (w.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.rotate_left(17)).to_le_bytes();
    let first = offset / 8;
    let last = (offset + len as u64).div_ceil(8);
    let mut out = Vec::with_capacity(((last - first) * 8) as usize);
    for w in first..last {
        out.extend_from_slice(&word(w));
    }
    let skip = (offset % 8) as usize;
    out.drain(..skip);
    out.truncate(len);
    out
}

/// pwrite all of `data` at `off`.
pub fn write_at(f: &File, data: &[u8], off: u64) -> Result<(), String> {
    f.write_all_at(data, off)
        .ctx(&format!("write {} bytes at {off}", data.len()))
}

/// pread exactly `len` bytes at `off` through an aligned buffer.
pub fn read_at(f: &File, len: usize, off: u64) -> Result<Vec<u8>, String> {
    let mut b = AlignedBuf::new(len);
    f.read_exact_at(b.as_mut(), off)
        .ctx(&format!("read {len} bytes at {off}"))?;
    Ok(b.as_ref().to_vec())
}

/// Compare and describe the first difference.
pub fn same(what: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: length {} != {}", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!("{what}: first difference at byte {i}")),
    }
}

/// Run `f` on a thread and wait at most `limit` for it; Err on timeout (the thread is leaked).
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .map_err(|_| format!("{what}: no completion within {limit:?} (hang)"))
}

/// Errno of an I/O error as a number (0 when none).
pub fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Path of a dm-user module parameter.
pub fn param_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/sys/module/dm_user/parameters/{name}"))
}

/// Set a module parameter, returning the old value.
pub fn set_param(name: &str, value: &str) -> Result<String, String> {
    let p = param_path(name);
    let old = std::fs::read_to_string(&p).ctx(&format!("read {}", p.display()))?;
    std::fs::write(&p, value).ctx(&format!("write {}", p.display()))?;
    Ok(old.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_dependent_and_consistent() {
        let whole = pattern(9, 0, 10_000);
        for (off, len) in [(0usize, 1usize), (3, 17), (4095, 4098), (8, 8), (9991, 9)] {
            assert_eq!(
                pattern(9, off as u64, len),
                whole[off..off + len],
                "{off}+{len}"
            );
        }
        assert_ne!(pattern(9, 0, 64), pattern(10, 0, 64));
        assert_ne!(whole[0..8], whole[8..16]);
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [1usize, 512, 4096, 1 << 20] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_ref().as_ptr() as usize % 4096, 0);
            assert_eq!(b.as_ref().len(), len);
        }
    }
}

/// Nanoseconds since `t0` (saturating).
pub fn ns_since(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What a checking reader saw while its server was killed and replaced.
#[derive(Default)]
pub struct ReadLog {
    /// (start, end) of each read, in nanoseconds since the reader's `t0`.
    pub spans: Vec<(u64, u64)>,
    /// Each failed open or read, with its offset.
    pub errors: Vec<String>,
    /// Reads that returned other data than the reference.
    pub wrong: u64,
}

impl ReadLog {
    /// Check the log against the outages (`(killed, restored)` in ns since `t0`): no read
    /// error, no wrong data, and at least one read in flight across each outage. Returns
    /// the number of reads across each outage.
    pub fn check_outages(&self, outages: &[(u64, u64)]) -> Result<Vec<usize>, String> {
        let across: Vec<usize> = outages
            .iter()
            .map(|&(k, r)| self.spans.iter().filter(|&&(s, e)| s < r && e > k).count())
            .collect();
        check(
            self.errors.is_empty(),
            format!(
                "{} read errors, first {:?}",
                self.errors.len(),
                self.errors.first()
            ),
        )?;
        check(
            self.wrong == 0,
            format!("{} reads returned wrong data", self.wrong),
        )?;
        check(
            across.iter().all(|&n| n > 0),
            format!("an outage had no read across it: {across:?}"),
        )?;
        Ok(across)
    }
}

/// Stop a checking reader (`stop`, then a join bounded to 20 s) and return what it saw.
pub fn stop_reader(
    stop: &std::sync::atomic::AtomicBool,
    reader: std::thread::JoinHandle<ReadLog>,
) -> Result<ReadLog, String> {
    stop.store(true, std::sync::atomic::Ordering::Release);
    bounded("reader", Duration::from_secs(20), move || reader.join())?
        .map_err(|_| "reader panicked".to_string())
}

/// Spawn a thread that reads `chunk` bytes of `node` (O_DIRECT) at the offsets `next_off`
/// gives, comparing each with the same bytes of `want`, until `stop` is set; it returns what
/// it saw, with times in ns since `t0`.
pub fn spawn_checking_reader(
    node: PathBuf,
    want: std::sync::Arc<Vec<u8>>,
    chunk: usize,
    t0: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut next_off: impl FnMut() -> u64 + Send + 'static,
) -> std::thread::JoinHandle<ReadLog> {
    std::thread::spawn(move || {
        let mut log = ReadLog::default();
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&node)
        {
            Ok(f) => f,
            Err(e) => {
                log.errors.push(format!("open {}: {e}", node.display()));
                return log;
            }
        };
        let mut buf = AlignedBuf::new(chunk);
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let off = next_off();
            let start = ns_since(t0);
            let res = f.read_exact_at(buf.as_mut(), off);
            log.spans.push((start, ns_since(t0)));
            match res {
                Ok(()) => {
                    let same = usize::try_from(off)
                        .ok()
                        .and_then(|o| want.get(o..o.checked_add(chunk)?))
                        .is_some_and(|w| buf.as_ref() == w);
                    if !same {
                        log.wrong += 1;
                    }
                }
                Err(e) => log.errors.push(format!("read at {off}: {e}")),
            }
        }
        log
    })
}

/// Wait at most `limit` for the line starting with `UBLK READY` on the stdout of a helper
/// process spawned with a piped stdout; on failure the helper is killed and reaped.
pub fn ublk_ready_line(
    child: &mut std::process::Child,
    what: &str,
    limit: Duration,
) -> Result<String, String> {
    use std::io::{BufRead, BufReader};
    let out = child
        .stdout
        .take()
        .ok_or_else(|| format!("{what}: no stdout"))?;
    let line = bounded(what, limit, move || {
        BufReader::new(out)
            .lines()
            .find_map(|l| l.ok().filter(|l| l.starts_with("UBLK READY")))
            .unwrap_or_default()
    });
    match line {
        Ok(l) if !l.is_empty() => Ok(l),
        other => {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(format!("{what} did not get ready ({other:?}, {status})"))
        }
    }
}
