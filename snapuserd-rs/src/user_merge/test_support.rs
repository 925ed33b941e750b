//! Test support for the user-space merge: COW cases with their target images, a base disk
//! whose write cache loses unsynced writes at a simulated crash, and a progress store that
//! crashes between durable steps. Both count their steps on the legacy core's
//! [`CrashClock`], so one budget cuts power at any point of the merge.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cow_format::merge_state::{DurableProgress, ScratchWindow};
use cow_format::reader::CowFileStorage;
use cow_format::{
    Compression, CompressionAlgorithm, CowReader, CowVersion, CowWriter, MergeState,
    MergeStateError, WriterOptions,
};

use super::merge_io::{MergeIo, ReadRun, WriteRun};
use super::progress_store::ProgressStore;
use super::snapshot::BLOCK;
use super::{UserSnapshot, UserSnapshotOptions};
use crate::dm_user::AnswerPiece;
use crate::snapshot::test_support::CrashClock;

/// A deterministic byte generator.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A block that compresses somewhat (runs of repeated words).
    pub(crate) fn block(&mut self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK);
        while b.len() < BLOCK {
            let word = self.next().to_le_bytes();
            let repeat = (self.next() % 4 + 1) as usize;
            for _ in 0..repeat {
                b.extend_from_slice(&word);
            }
        }
        b.truncate(BLOCK);
        b
    }
}

/// One op of a test COW, and how it turns the source into the target.
#[derive(Debug, Clone)]
pub(crate) enum TestOp {
    Copy {
        dst: u64,
        src: u64,
    },
    Xor {
        dst: u64,
        src_byte: u64,
        mask: Vec<u8>,
    },
    Replace {
        dst: u64,
        data: Vec<u8>,
    },
    Zero {
        dst: u64,
        blocks: u64,
    },
}

/// A source image, the ops in merge order (ordered ops first), and the target they make.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub(crate) source: Vec<u8>,
    pub(crate) ops: Vec<TestOp>,
    pub(crate) target: Vec<u8>,
}

impl Case {
    /// A case over `blocks` blocks of source (contents from `seed`).
    pub(crate) fn new(blocks: u64, seed: u64) -> Self {
        let mut rng = Rng(seed | 1);
        let mut source = Vec::with_capacity(blocks as usize * BLOCK);
        for _ in 0..blocks {
            source.extend_from_slice(&rng.block());
        }
        Case {
            target: source.clone(),
            source,
            ops: Vec::new(),
        }
    }

    fn blk(image: &mut [u8], b: u64) -> &mut [u8] {
        let at = b as usize * BLOCK;
        &mut image[at..at + BLOCK]
    }

    pub(crate) fn copy(&mut self, dst: u64, src: u64) {
        let data = Self::blk(&mut self.source, src).to_vec();
        Self::blk(&mut self.target, dst).copy_from_slice(&data);
        self.ops.push(TestOp::Copy { dst, src });
    }

    pub(crate) fn xor(&mut self, dst: u64, src_byte: u64, seed: u64) {
        let mut rng = Rng(seed | 1);
        let mask = rng.block();
        let s = src_byte as usize;
        let out: Vec<u8> = self.source[s..s + BLOCK]
            .iter()
            .zip(&mask)
            .map(|(a, b)| a ^ b)
            .collect();
        Self::blk(&mut self.target, dst).copy_from_slice(&out);
        self.ops.push(TestOp::Xor {
            dst,
            src_byte,
            mask,
        });
    }

    pub(crate) fn replace(&mut self, dst: u64, blocks: u64, seed: u64) {
        let mut rng = Rng(seed | 1);
        let mut data = Vec::new();
        for i in 0..blocks {
            let b = rng.block();
            Self::blk(&mut self.target, dst + i).copy_from_slice(&b);
            data.extend_from_slice(&b);
        }
        self.ops.push(TestOp::Replace { dst, data });
    }

    pub(crate) fn zero(&mut self, dst: u64, blocks: u64) {
        for i in 0..blocks {
            Self::blk(&mut self.target, dst + i).fill(0);
        }
        self.ops.push(TestOp::Zero { dst, blocks });
    }

    /// Chains that overlap both ways (COPY b ← b+1 ascending, COPY b ← b-1 descending),
    /// XOR at unaligned offsets reading their own destinations, a multi-block REPLACE
    /// region and ZERO blocks: `ordered_per_chain` ops per chain. Needs
    /// `3 * ordered_per_chain + 140` blocks.
    pub(crate) fn rich(ordered_per_chain: u64, seed: u64) -> Self {
        let n = ordered_per_chain;
        let mut c = Case::new(3 * n + 140, seed);
        // Forward chain: b takes b+1; merged ascending, so each source is read before it is
        // overwritten.
        for b in 0..n {
            c.copy(b, b + 1);
        }
        // Backward chain: b takes b-1; merged descending.
        let lo = n + 10;
        for b in (lo..lo + n).rev() {
            c.copy(b, b - 1);
        }
        // XOR at a 100-byte offset into its own block and the next; ascending.
        let x = 2 * n + 20;
        for b in x..x + n / 2 {
            c.xor(b, b * BLOCK as u64 + 100, seed ^ b);
        }
        let r = 3 * n + 20;
        c.replace(r, 40, seed ^ 0x55);
        c.replace(r + 41, 3, seed ^ 0x66);
        c.zero(r + 50, 20);
        c.replace(r + 80, 1, seed ^ 0x77);
        c
    }

    /// Write the COW for this case (the ordered ops' order as sequence data).
    pub(crate) fn write_cow(&self, path: &Path, opts: WriterOptions) {
        let mut opts = opts;
        if opts.version == CowVersion::V3 && opts.op_count_max.is_none() {
            opts.op_count_max = Some(self.source.len() as u64 / BLOCK as u64 * 2 + 64);
        }
        let mut w = CowWriter::create(File::create(path).unwrap(), opts).unwrap();
        let sequence: Vec<u32> = self
            .ops
            .iter()
            .filter_map(|op| match op {
                TestOp::Copy { dst, .. } | TestOp::Xor { dst, .. } => Some(*dst as u32),
                _ => None,
            })
            .collect();
        w.add_sequence(&sequence).unwrap();
        for op in &self.ops {
            match op {
                TestOp::Copy { dst, src } => w.add_copy(*dst, *src).unwrap(),
                TestOp::Xor {
                    dst,
                    src_byte,
                    mask,
                } => w.add_xor(*dst, mask, *src_byte).unwrap(),
                TestOp::Replace { dst, data } => w.add_replace(*dst, data).unwrap(),
                TestOp::Zero { dst, blocks } => w.add_zero(*dst, *blocks).unwrap(),
            }
        }
        w.finalize().unwrap();
    }
}

/// Writer options for a version and algorithm (v3: 16 KiB ops, so REPLACE spans blocks).
pub(crate) fn writer_opts(
    version: CowVersion,
    algorithm: CompressionAlgorithm,
    scratch: bool,
) -> WriterOptions {
    WriterOptions {
        version,
        compression: Compression {
            algorithm,
            level: None,
        },
        compression_factor: 16384,
        scratch,
        ..WriterOptions::default()
    }
}

/// The files of one device: COW, base (initially the source) and, when the source is a
/// separate device, the source.
pub(crate) struct Files {
    pub(crate) cow: PathBuf,
    pub(crate) base: PathBuf,
    pub(crate) source: PathBuf,
    pub(crate) _dir: tempfile::TempDir,
}

impl Files {
    /// The base device *is* the source (the Virtual A/B layout: the merge overwrites the
    /// blocks its COPY/XOR ops read) unless `separate_source`.
    pub(crate) fn create(case: &Case, opts: WriterOptions, separate_source: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cow = dir.path().join("cow");
        let base = dir.path().join("base");
        let source = if separate_source {
            let s = dir.path().join("source");
            fs::write(&s, &case.source).unwrap();
            s
        } else {
            base.clone()
        };
        fs::write(&base, &case.source).unwrap();
        case.write_cow(&cow, opts);
        Files {
            cow,
            base,
            source,
            _dir: dir,
        }
    }

    pub(crate) fn open(&self) -> UserSnapshot {
        UserSnapshot::open(
            &self.cow,
            &self.source,
            &self.base,
            &UserSnapshotOptions::default(),
        )
        .unwrap()
    }

    /// Open with a progress store that crashes on `clock`, saving windows through an
    /// `O_DIRECT` descriptor of the COW where the filesystem has one (the crash sweeps cover
    /// direct saves; [`open`](Self::open)'s default options cover buffered ones).
    pub(crate) fn open_crashing(&self, clock: &CrashClock) -> UserSnapshot {
        self.open_with_store(|state| {
            Box::new(CrashingStore {
                inner: state,
                clock: clock.clone(),
            })
        })
    }

    /// Open with the progress store `wrap` makes of the COW's [`MergeState`] (which saves
    /// windows with `O_DIRECT` where the filesystem allows).
    pub(crate) fn open_with_store(
        &self,
        wrap: impl FnOnce(MergeState) -> Box<dyn ProgressStore>,
    ) -> UserSnapshot {
        let rw = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.cow)
                .unwrap()
        };
        let state_file = rw();
        let direct = super::direct_io::reopen_direct(&state_file, "COW", true, "crash test");
        let mut state = MergeState::open(state_file).unwrap();
        if let Some(direct) = direct {
            state.set_direct_writes(direct);
        }
        let cow = CowReader::from_storage(CowFileStorage::open(rw(), true).unwrap()).unwrap();
        let source = File::open(&self.source).unwrap();
        let base = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.base)
            .unwrap();
        UserSnapshot::from_parts(
            cow,
            source,
            base,
            wrap(state),
            UserSnapshotOptions::default(),
        )
        .unwrap()
    }

    pub(crate) fn base_image(&self) -> Vec<u8> {
        fs::read(&self.base).unwrap()
    }

    /// Durable `num_merge_ops` and state.
    pub(crate) fn durable(&self) -> DurableProgress {
        MergeState::open(File::open(&self.cow).unwrap())
            .unwrap()
            .progress()
            .unwrap()
    }
}

/// Read the whole device through the read path in requests of `chunk` bytes.
pub(crate) fn read_all(snap: &UserSnapshot, chunk: usize) -> Vec<u8> {
    let len = snap.base_sectors() as usize * 512;
    let mut out = vec![0u8; len];
    for (i, part) in out.chunks_mut(chunk).enumerate() {
        snap.read((i * chunk / 512) as u64, part).unwrap();
    }
    out
}

/// The whole device read in `chunk`-byte READ requests answered in pieces
/// ([`UserSnapshot::read_in_pieces`]), each answer assembled as a transport would splice it:
/// the file pieces read at the time of sending, while the handler holds its view.
pub(crate) fn read_all_in_pieces(snap: &UserSnapshot, chunk: usize) -> Vec<u8> {
    let len = snap.base_sectors() as usize * 512;
    let mut out = vec![0u8; len];
    let mut produced = Vec::new();
    for (i, part) in out.chunks_mut(chunk).enumerate() {
        let req = crate::dm_user::Request {
            kind: crate::dm_user::DM_USER_REQ_MAP_READ,
            flags: 0,
            sector: (i * chunk / 512) as u64,
            len: part.len() as u64,
        };
        let mut send = |pieces: &[AnswerPiece<'_>], bytes: &[u8]| {
            let mut at = 0usize;
            for piece in pieces {
                match *piece {
                    AnswerPiece::File { file, offset, len } => {
                        file.read_exact_at(&mut part[at..at + len], offset).unwrap();
                        at += len;
                    }
                    AnswerPiece::Produced { start, len } => {
                        part[at..at + len].copy_from_slice(&bytes[start..start + len]);
                        at += len;
                    }
                    AnswerPiece::Memory { bytes } => {
                        part[at..at + bytes.len()].copy_from_slice(bytes);
                        at += bytes.len();
                    }
                }
            }
            assert_eq!(at, part.len(), "the pieces add up to the request");
            true
        };
        assert_eq!(
            snap.read_in_pieces(&req, &mut produced, &mut send),
            Some(true),
            "a READ inside the device is answered in pieces"
        );
    }
    out
}

/// First differing block of two images, for messages.
pub(crate) fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(usize::MAX);
    }
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .position(|(x, y)| x != y)
}

/// Writes to the base device not yet synced: where, and what they overwrote.
pub(crate) type Unsynced = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// A merge engine over real files whose base device has a volatile write cache: every
/// call is a step on the crash clock, and the bytes each unsynced write overwrote are kept
/// so a crash can put them back ([`lose_unsynced`]). It reports itself as `"sync"`: it
/// stands for the synchronous engine, so an error is final, as a power cut is.
pub(crate) struct VolatileDiskIo {
    pub(crate) source: File,
    pub(crate) base: File,
    pub(crate) clock: CrashClock,
    pub(crate) unsynced: Unsynced,
}

impl VolatileDiskIo {
    pub(crate) fn boxed(files: &Files, clock: &CrashClock) -> (Box<dyn MergeIo>, Unsynced) {
        let unsynced = Unsynced::default();
        let io = VolatileDiskIo {
            source: File::open(&files.source).unwrap(),
            base: OpenOptions::new()
                .read(true)
                .write(true)
                .open(&files.base)
                .unwrap(),
            clock: clock.clone(),
            unsynced: Arc::clone(&unsynced),
        };
        (Box::new(io), unsynced)
    }
}

impl MergeIo for VolatileDiskIo {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn read_source(&mut self, runs: &mut [ReadRun<'_>]) -> io::Result<()> {
        self.clock.step("read sources")?;
        for r in runs.iter_mut() {
            self.source.read_exact_at(r.buf, r.offset)?;
        }
        Ok(())
    }

    fn write_base(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        self.clock.step("write base")?;
        let mut log = self.unsynced.lock().unwrap();
        for r in runs {
            let mut old = vec![0u8; r.buf.len()];
            self.base.read_exact_at(&mut old, r.offset)?;
            log.push((r.offset, old));
            self.base.write_all_at(r.buf, r.offset)?;
        }
        Ok(())
    }

    fn sync_base(&mut self) -> io::Result<()> {
        self.clock.step("sync base")?;
        self.unsynced.lock().unwrap().clear();
        Ok(())
    }
}

/// Put back what every unsynced write overwrote, newest first: the cache lost them.
pub(crate) fn lose_unsynced(base: &Path, unsynced: &Unsynced) {
    let f = OpenOptions::new().write(true).open(base).unwrap();
    for (offset, old) in unsynced.lock().unwrap().drain(..).rev() {
        f.write_all_at(&old, offset).unwrap();
    }
}

/// A [`MergeState`] that crashes on a clock. A crash inside `stage_window` first tears
/// the scratch data (garbage over the slots), as a power cut in the middle of the write
/// could, to show that nothing trusts scratch bytes without the Done mark.
pub(crate) struct CrashingStore {
    pub(crate) inner: MergeState,
    pub(crate) clock: CrashClock,
}

fn crashed(e: io::Error) -> MergeStateError {
    MergeStateError::Io {
        op: "simulated crash",
        offset: 0,
        len: 0,
        source: e,
    }
}

impl ProgressStore for CrashingStore {
    fn progress(&self) -> Result<DurableProgress, MergeStateError> {
        self.inner.progress()
    }
    fn window_capacity(&self) -> usize {
        self.inner.window_capacity()
    }
    fn stage_window(&mut self, new_blocks: &[u64], data: &[u8]) -> Result<(), MergeStateError> {
        if let Err(e) = self.clock.step("stage scratch window") {
            let torn = vec![0xEE; data.len()];
            self.inner.stage_window_parts(new_blocks, &torn)?;
            return Err(crashed(e));
        }
        self.inner.stage_window_parts(new_blocks, data)
    }
    fn mark_window_done(&mut self) -> Result<(), MergeStateError> {
        self.clock.step("mark window Done").map_err(crashed)?;
        self.inner.mark_window_done()
    }
    fn read_window(&self) -> Result<ScratchWindow, MergeStateError> {
        self.inner.read_window()
    }
    fn commit_window(&mut self, n: u64) -> Result<(), MergeStateError> {
        self.clock.step("commit window").map_err(crashed)?;
        self.inner.commit_window(n)
    }
    fn commit_merged(&mut self, n: u64) -> Result<(), MergeStateError> {
        self.clock.step("commit merged").map_err(crashed)?;
        self.inner.commit_merged(n)
    }
}

/// A file holding `bytes` (synced) in a new temporary directory, opened read-write: a
/// stand-in device for `O_DIRECT` tests. The directory goes when the first value is dropped.
pub(crate) fn device_file(bytes: &[u8]) -> (tempfile::TempDir, File) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("dev"))
        .expect("create");
    file.write_all_at(bytes, 0).expect("fill");
    file.sync_all().expect("sync");
    (dir, file)
}
