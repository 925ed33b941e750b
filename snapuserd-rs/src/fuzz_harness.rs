//! Fuzzing entry points for the daemon's untrusted inputs.
//!
//! The cargo-fuzz targets in `fuzz/` and the deterministic mutation test
//! `tests/fuzz_harness.rs` call these functions. Each one checks what the daemon promises
//! about bad input and panics when a promise is broken, which is what a fuzzer reports:
//!
//! * [`control_message`]: one control-socket message, and a command line made of its
//!   NUL-separated pieces. Both parse to a value or a typed error.
//! * [`DmUserFixture::run_stream`]: bytes as the kernel would write them to
//!   `/dev/dm-user/<misc>`, served by one transport worker over a real COW file. The checks:
//!   - every complete request gets exactly one response, in order, echoing its sequence
//!     number, sector and length;
//!   - a successful READ carries exactly `len` bytes, and the header chunk is exact;
//!   - READs past the device end fail, and request types other than READ and WRITE get
//!     UNSUPPORTED;
//!   - the worker ends when the stream ends;
//!   - afterwards a fresh daemon opens the same COW, and every unmerged exception still
//!     reads as the target block. Whatever the metadata writes did, nothing was lost.
//! * [`ublk_descriptors`]: ublk completions and descriptors as the kernel would hand them to
//!   a queue, decided and served by `ublk::descriptor` over a pattern handler (see there).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cow_format::{Compression, CompressionAlgorithm, CowVersion, CowWriter, WriterOptions};

use crate::cow_backend::CowSnapshot;
use crate::daemon::control_protocol::{Command, DaemonConfig};
use crate::daemon::transport::{serve_channel, WorkerControl};
use crate::dm_user::{
    Channel, MessageHeader, Request, ResponseCode, DM_USER_REQ_MAP_FLAG_FUA,
    DM_USER_REQ_MAP_FLAG_PREFLUSH, DM_USER_REQ_MAP_READ, DM_USER_REQ_MAP_WRITE, DM_USER_RESP_ERROR,
    DM_USER_RESP_SUCCESS, DM_USER_RESP_UNSUPPORTED, HEADER_SIZE,
};
use crate::snapshot::exception_store::{area_chunk, header_chunk, CHUNK_SECTORS};
use crate::snapshot::merge_plan::BLOCK_SIZE;

/// Parse `data` as one control-socket message, and its NUL-separated pieces as the
/// daemon's command line. Neither may panic; an error must say something.
pub fn control_message(data: &[u8]) {
    match Command::parse(data) {
        Ok(command) => assert!(!format!("{command:?}").is_empty()),
        Err(e) => assert!(!e.to_string().is_empty(), "empty error for {data:?}"),
    }
    let args: Vec<String> = data
        .split(|&b| b == 0)
        .map(|piece| String::from_utf8_lossy(piece).into_owned())
        .collect();
    if let Err(e) = DaemonConfig::parse(&args) {
        assert!(!e.to_string().is_empty(), "empty error for {args:?}");
    }
}

/// Blocks in the fixture's source image.
const SOURCE_BLOCKS: u64 = 64;

/// The COW variants a stream can be served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixtureCow {
    /// Version 3, lz4, with scratch space (read-ahead windows).
    V3Lz4Scratch,
    /// Version 2, zstd, no scratch space.
    V2ZstdNoScratch,
}

impl FixtureCow {
    /// Both variants.
    pub const ALL: [FixtureCow; 2] = [FixtureCow::V3Lz4Scratch, FixtureCow::V2ZstdNoScratch];

    /// The variant a fuzz input's first byte selects.
    pub fn from_selector(byte: u8) -> Self {
        Self::ALL[usize::from(byte & 1)]
    }

    /// The selector byte of this variant.
    pub fn selector(self) -> u8 {
        match self {
            FixtureCow::V3Lz4Scratch => 0,
            FixtureCow::V2ZstdNoScratch => 1,
        }
    }

    fn options(self) -> WriterOptions {
        let (version, algorithm, scratch) = match self {
            FixtureCow::V3Lz4Scratch => (CowVersion::V3, CompressionAlgorithm::Lz4, true),
            FixtureCow::V2ZstdNoScratch => (CowVersion::V2, CompressionAlgorithm::Zstd, false),
        };
        WriterOptions {
            version,
            compression: Compression {
                algorithm,
                level: None,
            },
            scratch,
            op_count_max: (version == CowVersion::V3).then_some(256),
            ..WriterOptions::default()
        }
    }
}

/// A source image, and a COW of every op kind over it, in a private temporary directory
/// (removed on drop).
#[derive(Debug)]
pub struct DmUserFixture {
    dir: PathBuf,
    source_path: PathBuf,
    cow_path: PathBuf,
    cows: Vec<(FixtureCow, Vec<u8>)>,
    target: Vec<u8>,
}

/// A deterministic generator (xorshift64) for fixtures and mutations: the same seed gives
/// the same sequence on every machine.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value (a zero seed stays zero: pass a non-zero one).
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n` (below 1 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Fill `out` with generated bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next_u64() as u8;
        }
    }
}

fn block(image: &[u8], index: u64) -> &[u8] {
    let at = (index as usize) * BLOCK_SIZE;
    &image[at..at + BLOCK_SIZE]
}

impl DmUserFixture {
    /// Write the fixture files under the system temporary directory.
    ///
    /// The ops: a chain of ten overlapping COPYs (each source overwritten by a later op),
    /// an XOR at an unaligned source offset, eight REPLACE blocks (half compressible), and
    /// three ZERO blocks.
    pub fn create() -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "snapuserd-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        let mut rng = XorShift(0x5eed_cafe_f00d_d00d);
        let mut source = vec![0u8; SOURCE_BLOCKS as usize * BLOCK_SIZE];
        rng.fill(&mut source);
        let mut target = source.clone();
        let put = |target: &mut Vec<u8>, index: u64, data: &[u8]| {
            let at = index as usize * BLOCK_SIZE;
            target[at..at + BLOCK_SIZE].copy_from_slice(data);
        };
        // Ordered ops in merge order: the chain top-down (32<-29 first), then the XOR.
        let copies: Vec<(u64, u64)> = (23..=32).rev().map(|new| (new, new - 3)).collect();
        for &(new, old) in &copies {
            put(&mut target, new, block(&source, old));
        }
        let xor_offset = 5 * BLOCK_SIZE as u64 + 100;
        let mut xor_mask = vec![0u8; BLOCK_SIZE];
        rng.fill(&mut xor_mask[..64]);
        let xored: Vec<u8> = source[xor_offset as usize..xor_offset as usize + BLOCK_SIZE]
            .iter()
            .zip(&xor_mask)
            .map(|(s, m)| s ^ m)
            .collect();
        put(&mut target, 40, &xored);
        let mut replaces = Vec::new();
        for (i, new) in (48..56u64).enumerate() {
            let mut data = vec![0u8; BLOCK_SIZE];
            if i % 2 == 0 {
                rng.fill(&mut data);
            } else {
                data.iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (j / 64) as u8);
            }
            put(&mut target, new, &data);
            replaces.push((new, data));
        }
        for new in 60..63 {
            put(&mut target, new, &[0u8; BLOCK_SIZE]);
        }
        let source_path = dir.join("source.img");
        fs::write(&source_path, &source)?;
        let cow_path = dir.join("fuzz.cow");
        let mut cows = Vec::new();
        for variant in FixtureCow::ALL {
            let file = fs::File::create(&cow_path)?;
            let mut w =
                CowWriter::create(file, variant.options()).map_err(std::io::Error::other)?;
            let mut sequence: Vec<u32> = copies.iter().map(|&(new, _)| new as u32).collect();
            sequence.push(40);
            let mut add = || -> Result<(), cow_format::WriteError> {
                w.add_sequence(&sequence)?;
                for &(new, old) in &copies {
                    w.add_copy(new, old)?;
                }
                w.add_xor(40, &xor_mask, xor_offset)?;
                for (new, data) in &replaces {
                    w.add_replace(*new, data)?;
                }
                w.add_zero(60, 3)
            };
            add().map_err(std::io::Error::other)?;
            w.finalize().map_err(std::io::Error::other)?;
            cows.push((variant, fs::read(&cow_path)?));
        }
        Ok(DmUserFixture {
            dir,
            source_path,
            cow_path,
            cows,
            target,
        })
    }

    /// The COW file the last stream was served from.
    pub fn cow_path(&self) -> &Path {
        &self.cow_path
    }

    /// The source image.
    pub fn source_path(&self) -> &Path {
        &self.source_path
    }

    fn cow_bytes(&self, variant: FixtureCow) -> &[u8] {
        self.cows
            .iter()
            .find(|(v, _)| *v == variant)
            .map(|(_, bytes)| bytes.as_slice())
            .unwrap_or_default()
    }

    /// Replace the COW file with `variant` as written (a new file: nothing an earlier stream
    /// committed or left open carries over) and open a daemon's snapshot on it.
    fn open(&self, variant: FixtureCow) -> CowSnapshot {
        let bytes = self.cow_bytes(variant);
        match fs::remove_file(&self.cow_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("removing the last stream's COW: {e}"),
        }
        fs::write(&self.cow_path, bytes).expect("write the fixture COW");
        let written = fs::read(&self.cow_path).expect("read the fixture COW back");
        assert!(
            written == bytes,
            "the fixture COW differs from {variant:?} as written"
        );
        CowSnapshot::open(&self.cow_path, &self.source_path).expect("open the fixture COW")
    }

    /// Streams that exercise the kernel's real sequence on `variant`: header and area
    /// reads, data reads, metadata write-backs that merge the last exceptions, empty
    /// flushes, and a few bad requests. Each starts with the variant's selector byte.
    pub fn seed_streams(&self, variant: FixtureCow) -> Vec<Vec<u8>> {
        let snapshot = self.open(variant);
        let server = snapshot.server();
        let exceptions = server.exceptions();
        let live = exceptions.num_exceptions();
        let area_sector = area_chunk(0) * CHUNK_SECTORS;
        let mut area = vec![0u8; BLOCK_SIZE];
        let mut out = Vec::new();
        let read_area = Request {
            kind: DM_USER_REQ_MAP_READ,
            flags: 0,
            sector: area_sector,
            len: BLOCK_SIZE as u64,
        };
        if server.handle(&read_area, &[], &mut out) == ResponseCode::Success {
            area.copy_from_slice(&out);
        }
        let mut seq = 0u64;
        let mut header = |msg_type: u64, flags: u64, sector: u64, len: u64| {
            seq += 1;
            MessageHeader {
                seq,
                msg_type,
                flags,
                sector,
                len,
            }
            .to_bytes()
        };
        let mut kernel_like = vec![variant.selector()];
        kernel_like.extend_from_slice(&header(DM_USER_REQ_MAP_READ, 0, 0, BLOCK_SIZE as u64));
        kernel_like.extend_from_slice(&header(
            DM_USER_REQ_MAP_READ,
            0,
            area_sector,
            BLOCK_SIZE as u64,
        ));
        for e in 0..live {
            if let Some(chunk) = exceptions.new_chunk(e) {
                let h = header(DM_USER_REQ_MAP_READ, 0, chunk * CHUNK_SECTORS, 4096);
                kernel_like.extend_from_slice(&h);
            }
        }
        // dm-snapshot-merge: zero the trailing live entries, write the area back with
        // PREFLUSH|FUA, then an empty flush; twice.
        let commit = DM_USER_REQ_MAP_FLAG_PREFLUSH | DM_USER_REQ_MAP_FLAG_FUA;
        for merged in [1usize, 3] {
            for slot in live.saturating_sub(merged)..live {
                if let Some(entry) = area.get_mut(slot * 16..slot * 16 + 16) {
                    entry.fill(0);
                }
            }
            kernel_like.extend_from_slice(&header(
                DM_USER_REQ_MAP_WRITE,
                commit,
                area_sector,
                BLOCK_SIZE as u64,
            ));
            kernel_like.extend_from_slice(&area);
            kernel_like.extend_from_slice(&header(
                DM_USER_REQ_MAP_WRITE,
                DM_USER_REQ_MAP_FLAG_PREFLUSH,
                0,
                0,
            ));
        }
        let mut bad = vec![variant.selector()];
        bad.extend_from_slice(&header(DM_USER_REQ_MAP_READ, 0, 1, 1000));
        bad.extend_from_slice(&header(DM_USER_REQ_MAP_READ, 0, u64::MAX - 7, 4096));
        bad.extend_from_slice(&header(DM_USER_REQ_MAP_READ, 0, 0, u64::MAX));
        bad.extend_from_slice(&header(3, 0, 8, 4096));
        bad.extend_from_slice(&header(DM_USER_REQ_MAP_WRITE, 0, 0, 16));
        bad.extend_from_slice(&[0xa5; 16]);
        bad.extend_from_slice(&header(DM_USER_REQ_MAP_WRITE, commit, area_sector, 4096));
        bad.extend_from_slice(&[0x5a; BLOCK_SIZE]);
        bad.extend_from_slice(&header(DM_USER_REQ_MAP_READ, 0, 3, 1 << 20));
        bad.extend_from_slice(&header(99, 0, 0, 0));
        bad.extend_from_slice(&header(DM_USER_REQ_MAP_WRITE, 0, 0, 1 << 40));
        vec![kernel_like, bad]
    }

    /// Serve `data` (a selector byte, then the kernel's byte stream) with one transport
    /// worker and check the promises listed in the module documentation.
    pub fn run_stream(&self, data: &[u8]) {
        let Some((&selector, stream)) = data.split_first() else {
            return;
        };
        let variant = FixtureCow::from_selector(selector);
        let snapshot = self.open(variant);
        let device_sectors = snapshot.server().device_sectors();
        let requests = complete_requests(stream);

        let (kernel, daemon) = UnixStream::pair().expect("socketpair");
        let mut kernel_writer = kernel.try_clone().expect("clone the kernel end");
        let mut kernel_reader = kernel;
        let input = stream.to_vec();
        let responses = std::thread::scope(|scope| {
            scope.spawn(move || {
                // The worker may stop reading early (a truncated request ends it); a write
                // error then only means nobody listens.
                let _ = kernel_writer.write_all(&input);
                let _ = kernel_writer.shutdown(std::net::Shutdown::Write);
            });
            let reader = scope.spawn(|| read_responses(&mut kernel_reader, &requests));
            let control = WorkerControl::new().expect("worker eventfd");
            let report = serve_channel(
                Channel::from_fd(daemon.into()),
                &snapshot,
                &control,
                &crate::daemon::answer_buffers::AnswerBuffers::default(),
            );
            let responses = reader.join().expect("response reader");
            assert_eq!(
                report.answered,
                requests.len() as u64,
                "worker answered {} of {} complete requests",
                report.answered,
                requests.len()
            );
            responses
        });
        for (request, (code, data)) in requests.iter().zip(&responses) {
            check_response(request, *code, data, device_sectors);
        }
        drop(snapshot);
        self.check_reopens(variant);
    }

    /// A fresh daemon opens the COW the stream left, and every unmerged exception reads
    /// as its target block.
    fn check_reopens(&self, variant: FixtureCow) {
        let snapshot = CowSnapshot::open(&self.cow_path, &self.source_path)
            .unwrap_or_else(|e| panic!("{variant:?}: COW unusable after the stream: {e}"));
        let server = snapshot.server();
        let exceptions = server.exceptions();
        let mut out = Vec::new();
        for e in 0..exceptions.num_exceptions() {
            let (Some(chunk), Some(op_index)) = (exceptions.new_chunk(e), exceptions.op_index(e))
            else {
                panic!("exception {e} has no chunk or op");
            };
            let Some(op) = server.plan().op(op_index) else {
                panic!("exception {e} names op {op_index}, beyond the plan");
            };
            let req = Request {
                kind: DM_USER_REQ_MAP_READ,
                flags: 0,
                sector: chunk * CHUNK_SECTORS,
                len: BLOCK_SIZE as u64,
            };
            let status = server.handle(&req, &[], &mut out);
            assert_eq!(
                status,
                ResponseCode::Success,
                "{variant:?}: reading exception {e}"
            );
            assert!(
                out.as_slice() == block(&self.target, op.new_block),
                "{variant:?}: exception {e} (block {}) reads wrong after the stream",
                op.new_block
            );
        }
    }
}

impl Drop for DmUserFixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The requests a stream holds completely, split the way the ABI frames them: a 40-byte
/// header, then `len` payload bytes for a WRITE.
fn complete_requests(stream: &[u8]) -> Vec<MessageHeader> {
    let mut requests = Vec::new();
    let mut rest = stream;
    while let Some((raw, after)) = rest.split_first_chunk::<HEADER_SIZE>() {
        let header = MessageHeader::from_bytes(raw);
        rest = after;
        if header.msg_type == DM_USER_REQ_MAP_WRITE {
            match usize::try_from(header.len)
                .ok()
                .filter(|&l| l <= rest.len())
            {
                Some(len) => rest = &rest[len..],
                None => break,
            }
        }
        requests.push(header);
    }
    requests
}

/// Read one response per request (and the READ data of successful READs), then expect the
/// end of the stream.
fn read_responses(kernel: &mut UnixStream, requests: &[MessageHeader]) -> Vec<(u64, Vec<u8>)> {
    let mut responses = Vec::with_capacity(requests.len());
    for request in requests {
        let mut raw = [0u8; HEADER_SIZE];
        kernel
            .read_exact(&mut raw)
            .unwrap_or_else(|e| panic!("no response to seq {}: {e}", request.seq));
        let response = MessageHeader::from_bytes(&raw);
        assert_eq!(
            (response.seq, response.sector, response.len),
            (request.seq, request.sector, request.len),
            "response does not echo request {request:?}"
        );
        let mut data = Vec::new();
        if request.msg_type == DM_USER_REQ_MAP_READ && response.msg_type == DM_USER_RESP_SUCCESS {
            let len = usize::try_from(request.len).expect("a successful READ fits in memory");
            data.resize(len, 0);
            kernel
                .read_exact(&mut data)
                .unwrap_or_else(|e| panic!("short READ data for seq {}: {e}", request.seq));
        }
        responses.push((response.msg_type, data));
    }
    let mut extra = Vec::new();
    let _ = kernel.read_to_end(&mut extra);
    assert!(
        extra.is_empty(),
        "{} bytes after the last response",
        extra.len()
    );
    responses
}

fn check_response(request: &MessageHeader, code: u64, data: &[u8], device_sectors: u64) {
    match request.msg_type {
        DM_USER_REQ_MAP_READ => {
            let end = request.sector.checked_add(request.len / 512);
            let inside = request.len % 512 == 0 && end.is_some_and(|e| e <= device_sectors);
            if !inside {
                assert_eq!(
                    code, DM_USER_RESP_ERROR,
                    "READ outside the device: {request:?}"
                );
            }
            if code == DM_USER_RESP_SUCCESS && request.sector == 0 && request.len == 4096 {
                assert!(data == header_chunk().as_slice(), "header chunk differs");
            }
            assert!(
                code == DM_USER_RESP_SUCCESS || code == DM_USER_RESP_ERROR,
                "READ answered {code}"
            );
        }
        DM_USER_REQ_MAP_WRITE => assert!(
            code == DM_USER_RESP_SUCCESS || code == DM_USER_RESP_ERROR,
            "WRITE answered {code}"
        ),
        _ => assert_eq!(
            code, DM_USER_RESP_UNSUPPORTED,
            "request type {} answered {code}",
            request.msg_type
        ),
    }
}

/// Bytes of one ublk record in [`ublk_descriptors`]' input: an 8-byte completion
/// `user_data`, then a 24-byte descriptor.
pub const UBLK_RECORD: usize = 8 + crate::ublk::abi::IoDesc::SIZE;

/// Answers ublk READs with a pattern of the absolute byte offset, or misbehaves as told.
struct UblkPatternHandler {
    /// 0: correct; 1: one byte short; 2: one byte long; 3: ERROR; 4: UNSUPPORTED.
    behaviour: u8,
}

/// The pattern byte at absolute device offset `at`.
fn ublk_pattern(at: u64) -> u8 {
    (at ^ (at >> 9) ^ (at >> 17)) as u8
}

impl crate::daemon::transport::RequestHandler for UblkPatternHandler {
    fn handle(&self, req: &Request, _payload: &[u8], out: &mut Vec<u8>) -> ResponseCode {
        let start = req.sector * 512;
        let fill = |out: &mut Vec<u8>, n: u64| {
            out.extend((0..n).map(|i| ublk_pattern(start + i)));
        };
        match self.behaviour {
            0 => fill(out, req.len),
            1 => fill(out, req.len.saturating_sub(1)),
            2 => fill(out, req.len + 1),
            3 => return ResponseCode::Error,
            _ => return ResponseCode::Unsupported,
        }
        ResponseCode::Success
    }
}

/// Feed `data` to the ublk descriptor handling, as a queue would meet it.
///
/// Layout: byte 0 picks the handler's behaviour (correct, short, long, ERROR, UNSUPPORTED);
/// bytes 1-4 the device size in sectors (little-endian, at most 2^24); byte 5 the I/O limit
/// (4 KiB shifted left by 0-10); byte 6 the queue depth (32-287). Then [`UBLK_RECORD`]-byte
/// records: a completion's `user_data` and the descriptor at that tag.
///
/// Checks: a `user_data` is taken as a tag only below the depth; a request completes with
/// its full length only for a READ inside the device and the limit, from a correct handler,
/// with exactly the device's bytes; every other request completes with a negative errno
/// (0 only for a flush) and no data.
pub fn ublk_descriptors(data: &[u8]) {
    use crate::ublk::abi::{IoDesc, IO_OP_FLUSH, IO_OP_READ};
    use crate::ublk::descriptor::{decide, serve, tag_of, Action, QueueLimits};

    let Some((head, records)) = data.split_at_checked(7) else {
        return;
    };
    let handler = UblkPatternHandler {
        behaviour: head[0] % 5,
    };
    let dev_sectors =
        u64::from(u32::from_le_bytes([head[1], head[2], head[3], head[4]]) % (1 << 24));
    let limits = QueueLimits {
        dev_sectors,
        max_io_bytes: 4096u32 << (head[5] % 11),
        depth: 32 + u16::from(head[6]),
    };
    let mut out = crate::user_merge::direct_io::AlignedBuf::default();
    for record in records.chunks_exact(UBLK_RECORD) {
        let mut user_data = [0u8; 8];
        user_data.copy_from_slice(&record[..8]);
        let user_data = u64::from_le_bytes(user_data);
        match tag_of(user_data, &limits) {
            Some(tag) => assert!(u64::from(tag) == user_data && tag < limits.depth),
            None => assert!(user_data >= u64::from(limits.depth)),
        }
        let mut raw = [0u8; IoDesc::SIZE];
        raw.copy_from_slice(&record[8..]);
        let desc = IoDesc::from_bytes(&raw);
        let result = serve(&handler, &desc, &limits, &mut out);
        match decide(&desc, &limits) {
            Action::Read { sector, len } => {
                assert_eq!(desc.op(), IO_OP_READ);
                assert!(len > 0 && len <= limits.max_io_bytes && len % 512 == 0);
                let end = sector + u64::from(len) / 512;
                assert!(
                    end <= limits.dev_sectors,
                    "READ past the end decided as served"
                );
                if handler.behaviour == 0 {
                    assert_eq!(result, i32::try_from(len).unwrap_or(-1));
                    assert_eq!(out.len(), len as usize);
                    let start = sector * 512;
                    assert!(
                        out.iter()
                            .enumerate()
                            .all(|(i, &b)| b == ublk_pattern(start + i as u64)),
                        "wrong data for {desc:?}"
                    );
                } else {
                    assert!(result < 0, "a misbehaving handler's answer was passed on");
                    assert!(out.is_empty());
                }
            }
            Action::Complete(r) => {
                assert_eq!(r, result);
                assert!(out.is_empty());
                assert!(
                    r < 0 || (r == 0 && desc.op() == IO_OP_FLUSH),
                    "{desc:?} -> {r}"
                );
            }
        }
    }
}

/// Seeds for [`ublk_descriptors`]: every op, edge sectors and lengths, bad tags.
pub fn ublk_seeds() -> Vec<Vec<u8>> {
    let record = |user_data: u64, op: u32, nr_sectors: u32, start_sector: u64| {
        let mut r = user_data.to_le_bytes().to_vec();
        r.extend_from_slice(&op.to_ne_bytes());
        r.extend_from_slice(&nr_sectors.to_ne_bytes());
        r.extend_from_slice(&start_sector.to_ne_bytes());
        r.extend_from_slice(&0u64.to_ne_bytes());
        r
    };
    let mut seeds = Vec::new();
    for behaviour in 0..5u8 {
        // 64 MiB device, 64 KiB limit (4 KiB << 4), depth 32.
        let mut s = vec![behaviour];
        s.extend_from_slice(&(131_072u32).to_le_bytes());
        s.extend_from_slice(&[4, 0]);
        for r in [
            record(0, 0, 8, 0),
            record(31, 0, 128, 131_072 - 128),
            record(5, 0, 1, 7),
            record(32, 0, 8, 0),
            record(u64::MAX, 0, 8, 0),
            record(1, 0, 8, 131_072 - 7),
            record(2, 0, 129, 0),
            record(3, 0, 0, 0),
            record(4, 1, 8, 0),
            record(6, 2, 0, 0),
            record(7, 3, 8, 0),
            record(8, 5, 8, 0),
            record(9, 0x0100 | 18, 8, 0),
            record(10, 0, u32::MAX, u64::MAX - 1),
        ] {
            s.extend_from_slice(&r);
        }
        seeds.push(s);
    }
    seeds
}
