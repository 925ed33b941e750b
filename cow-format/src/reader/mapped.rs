//! Memory-mapped COW storage that survives the file shrinking underneath.
//!
//! This is the crate's only `unsafe` code. Reading a mapped page that lies
//! beyond the end of a file truncated after `mmap` raises SIGBUS. We install
//! (once per process) a SIGBUS handler that checks whether the faulting
//! address lies inside one of our registered mappings; if so, it maps an
//! anonymous zero page over the faulting page with `MAP_FIXED` (so the
//! interrupted copy completes) and counts the fault for that mapping. Every
//! read checks the counter after copying (or, for [`CowStorage::visit_at`],
//! which lends the mapped bytes in place, after the visitor has returned) and
//! returns an error if the mapping
//! has ever faulted. Faults at other addresses are passed to the handler that
//! was installed before ours (or the default action, which ends the process,
//! exactly as without us).
//!
//! Only the `mmap` syscall and atomics are used inside the handler.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

use memmap2::{Mmap, MmapOptions};

use super::storage::{CowStorage, SourceImage, StorageError};

/// Most mappings that can be registered at once.
const SLOTS: usize = 64;

struct Slot {
    /// Owned by a `MappedFile` (set first, cleared last).
    claimed: AtomicBool,
    /// `start`/`end` are valid and the handler may act on them.
    busy: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    faults: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // used only to initialise the array
const EMPTY_SLOT: Slot = Slot {
    claimed: AtomicBool::new(false),
    busy: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faults: AtomicU64::new(0),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in &REGISTRY {
        if slot.busy.load(Ordering::Acquire)
            && addr >= slot.start.load(Ordering::Acquire)
            && addr < slot.end.load(Ordering::Acquire)
        {
            let base = addr & !(page - 1);
            // SAFETY: `base` is a page inside a mapping we own (registered and
            // not yet unmapped: slots are released before munmap). Replacing
            // it with a private zero page only changes what our own reads see.
            let r = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                slot.faults.fetch_add(1, Ordering::AcqRel);
                return;
            }
        }
    }
    chain(sig, info, ctx);
}

/// Hand a SIGBUS that is not ours to whoever handled it before us.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get();
    let handler = prev.map(|p| p.sa_sigaction).unwrap_or(libc::SIG_DFL);
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let sent_by_user = unsafe { (*info).si_code } <= 0;
    if handler == libc::SIG_IGN && sent_by_user {
        return;
    }
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Restore the default action and re-raise: the signal is delivered
        // when this handler returns and ends the process, as without us.
        // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument;
        // sigaction and raise are async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            libc::raise(libc::SIGBUS);
        }
        return;
    }
    let flags = prev.map(|p| p.sa_flags).unwrap_or(0);
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was registered with SA_SIGINFO, so it
        // has this signature; we forward the kernel's own arguments.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a handler registered without SA_SIGINFO takes one int.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

fn install_handler() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: we build a valid sigaction (handler with SA_SIGINFO, empty
        // mask) and pass valid pointers; `old` receives the previous action.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &act, &mut old) == 0 {
                let _ = PREVIOUS.set(old);
                INSTALLED.store(true, Ordering::Release);
            }
        }
    });
    if INSTALLED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(StorageError::NoSigbusHandler.into())
    }
}

fn register(start: usize, len: usize) -> io::Result<usize> {
    for (i, slot) in REGISTRY.iter().enumerate() {
        if slot
            .claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            slot.faults.store(0, Ordering::Release);
            slot.start.store(start, Ordering::Release);
            slot.end.store(start.saturating_add(len), Ordering::Release);
            slot.busy.store(true, Ordering::Release);
            return Ok(i);
        }
    }
    Err(StorageError::TooManyMappings { max: SLOTS }.into())
}

/// A read-only memory mapping of a COW file, protected against truncation.
#[derive(Debug)]
pub struct MappedFile {
    /// Kept so the descriptor outlives the mapping's users.
    file: File,
    map: Option<Mmap>,
    len: u64,
    slot: usize,
}

impl MappedFile {
    /// Map `file` read-only in full (its size at this moment).
    pub fn new(file: File) -> io::Result<Self> {
        install_handler()?;
        let len = CowStorage::size(&file)?;
        let map_len =
            usize::try_from(len).map_err(|_| io::Error::from(StorageError::TooLarge { len }))?;
        if map_len == 0 {
            return Ok(Self {
                file,
                map: None,
                len,
                slot: usize::MAX,
            });
        }
        // SAFETY: the mapping is read-only and private to this value. The
        // file may change underneath; reads go through raw-pointer copies
        // (never long-lived references) and truncation faults are caught by
        // the SIGBUS handler registered below before any read happens.
        let map = unsafe { MmapOptions::new().len(map_len).map(&file)? };
        // A process under `mlockall(MCL_FUTURE)` (snapuserd, which serves the root
        // filesystem) would otherwise pin every page of the COW it ever reads, up to the
        // whole file. These are clean file pages that can always be dropped and read back
        // from the file, never through the device being served, so they are not locked.
        if let Err(e) = map.unlock() {
            log::warn!("munlock of the {map_len}-byte COW mapping failed: {e}; its pages stay locked once read");
        }
        let slot = register(map.as_ptr() as usize, map_len)?;
        Ok(Self {
            file,
            map: Some(map),
            len,
            slot,
        })
    }

    /// The mapped file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Check that `len` bytes at `byte_offset` lie inside the mapping. Gives the mapping
    /// and the start as a `usize`; no mapping (`None`) only for an empty range of an
    /// empty file.
    fn range(&self, byte_offset: u64, len: usize) -> io::Result<(Option<&Mmap>, usize)> {
        let end = byte_offset.checked_add(len as u64);
        match (end, self.map.as_ref()) {
            (Some(end), Some(map)) if end <= self.len => {
                // end ≤ len, and len (the mapping's length) fits usize.
                let off = usize::try_from(byte_offset)
                    .map_err(|_| past_end(byte_offset, len, self.len))?;
                Ok((Some(map), off))
            }
            (Some(_), None) if len == 0 => Ok((None, 0)),
            _ => Err(past_end(byte_offset, len, self.len)),
        }
    }

    fn faulted(&self) -> bool {
        REGISTRY
            .get(self.slot)
            .is_some_and(|s| s.faults.load(Ordering::Acquire) != 0)
    }
}

fn past_end(byte_offset: u64, len: usize, mapped: u64) -> io::Error {
    StorageError::PastEnd {
        offset: byte_offset,
        len,
        size: mapped,
    }
    .into()
}

fn shrank() -> io::Error {
    StorageError::Shrank.into()
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if let Some(slot) = REGISTRY.get(self.slot) {
            // Release the slot before the mapping goes away (the map field
            // is dropped after this function returns).
            slot.busy.store(false, Ordering::Release);
            slot.claimed.store(false, Ordering::Release);
        }
    }
}

impl SourceImage for MappedFile {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        let (map, off) = self.range(byte_offset, buf.len())?;
        let Some(map) = map else {
            return Ok(());
        };
        // SAFETY: `off + buf.len() ≤ map.len()` (checked by `range`), so the source
        // range is inside the live mapping; `buf` is a distinct, writable buffer. A
        // truncation fault during the copy is turned into zero pages by the handler
        // and detected just below.
        unsafe {
            std::ptr::copy_nonoverlapping(map.as_ptr().add(off), buf.as_mut_ptr(), buf.len());
        }
        if self.faulted() {
            return Err(shrank());
        }
        Ok(())
    }
}

impl CowStorage for MappedFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    /// Lends the mapped bytes in place (no copy), then checks the fault counter: if the
    /// file shrank while `visit` read the range, the pages it touched past the new end read
    /// as zeros and this returns `UnexpectedEof`, so whatever `visit` made of them is
    /// discarded by the caller.
    fn visit_at(
        &self,
        byte_offset: u64,
        len: usize,
        _staging: &mut Vec<u8>,
        visit: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        let (map, off) = self.range(byte_offset, len)?;
        let Some(map) = map else {
            visit(&[]);
            return Ok(());
        };
        if self.faulted() {
            return Err(shrank());
        }
        // SAFETY: `off + len ≤ map.len()` (checked by `range`), so the slice lies inside
        // the mapping, which stays mapped for the whole call: `self` is borrowed, and the
        // mapping is only unmapped when `self` is dropped. The slice cannot outlive the
        // call (`visit` takes it for an anonymous lifetime, so it cannot keep it).
        // What the bytes can be while `visit` reads them:
        // * The file shrinks: a read past the new end faults; the SIGBUS handler maps a
        //   private zero page over that page (same address, still readable), so `visit`
        //   runs to completion on zeros and the fault is reported just below, before any
        //   result of `visit` is accepted. Nothing is ever unmapped under the slice.
        // * The file is written: this crate's writers and snapuserd's merge store only
        //   write the header and the scratch region, never the op/data area where
        //   payloads lie (validated at open time); changing a mapped payload from another
        //   process while it is served is outside the contract, exactly as for every
        //   mapped-file reader. `visit` is safe code that bounds-checks every length and
        //   offset it reads, so unexpected bytes give wrong data or a decode error.
        let bytes = unsafe { std::slice::from_raw_parts(map.as_ptr().add(off), len) };
        visit(bytes);
        if self.faulted() {
            return Err(shrank());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_match_and_truncation_is_an_error() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..5 * 4096).map(|i| (i % 253) as u8).collect();
        f.write_all(&data).unwrap();
        let m = MappedFile::new(f.try_clone().unwrap()).unwrap();
        let mut buf = vec![0u8; 4096];
        m.read_exact_at(&mut buf, 4096 + 17).unwrap();
        assert_eq!(buf, data[4096 + 17..2 * 4096 + 17]);
        assert!(m.read_exact_at(&mut buf, 4 * 4096 + 1).is_err());

        f.set_len(4096).unwrap();
        // Page 0 is still backed by the file; page 3 is gone: SIGBUS, caught.
        let e = m.read_exact_at(&mut buf, 3 * 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // Once faulted, the mapping refuses all reads.
        assert!(m.read_exact_at(&mut buf, 0).is_err());
        drop(m);
        // A fresh mapping of the shrunk file works.
        let m2 = MappedFile::new(f).unwrap();
        assert_eq!(m2.size().unwrap(), 4096);
        m2.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data[..4096]);
    }

    #[test]
    fn empty_files_and_many_mappings() {
        let f = tempfile::tempfile().unwrap();
        let m = MappedFile::new(f).unwrap();
        assert!(m.read_exact_at(&mut [0u8; 1], 0).is_err());
        m.read_exact_at(&mut [], 0).unwrap();
        let mut keep = Vec::new();
        for _ in 0..10 {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&[7u8; 100]).unwrap();
            keep.push(MappedFile::new(f).unwrap());
        }
        for m in &keep {
            let mut b = [0u8; 10];
            m.read_exact_at(&mut b, 90).unwrap();
            assert_eq!(b, [7u8; 10]);
        }
    }
}
