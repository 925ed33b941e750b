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
