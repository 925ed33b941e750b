//! `vmtest read-profile COW SOURCE BASE TARGET`: where the time of a sequential 1 MiB read
//! of a user-space-merge snapshot goes, without any transport. The snapshot is opened in
//! this process (nothing is merged) and read in 1 MiB requests three ways per request:
//! the target image with `pread` (the copy a loop device does, the reference), the whole
//! read path into a buffer (`UserSnapshot::read`), and the piece planner with a sender that
//! takes nothing (what a splicing transport makes the daemon do before the kernel copies).
//! Requests are grouped by what their blocks need (nothing changed; changed blocks, by the
//! kind of op that dominates) and each group's time per MiB is printed, plus the bare
//! decompression time of every REPLACE op of the COW. Run in the guest it shows the
//! emulator's costs; run on the host, the native ones.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cow_format::{CowReader, OpKind};
use snapuserd::dm_user::{AnswerPiece, Request, DM_USER_REQ_MAP_READ};
use snapuserd::user_merge::{UserSnapshot, UserSnapshotOptions};

type Res<T> = Result<T, String>;

const REQUEST: usize = 1 << 20;
const BLOCK: u64 = 4096;

/// Time spent per group of requests.
#[derive(Default)]
struct Group {
    requests: u64,
    changed_blocks: u64,
    reference: Duration,
    whole: Duration,
    pieces: Duration,
    file_pieces: u64,
    produced_pieces: u64,
}

/// What a request's changed blocks mostly are.
fn group_name(kinds: &BTreeMap<&'static str, u64>) -> &'static str {
    kinds
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, _)| *k)
        .unwrap_or("unchanged")
}

/// The kind of op that writes each changed block.
fn kinds_by_block(reader: &CowReader) -> BTreeMap<u64, &'static str> {
    let mut kind_of = BTreeMap::new();
    for op in reader.ops() {
        for b in op.new_block..op.new_block.saturating_add(op.num_blocks) {
            kind_of.insert(b, op.kind.name());
        }
    }
    kind_of
}

/// How many blocks of each kind the `n` bytes at `offset` hold.
fn kinds_in(
    kind_of: &BTreeMap<u64, &'static str>,
    offset: u64,
    n: usize,
) -> BTreeMap<&'static str, u64> {
    let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    for b in offset / BLOCK..(offset + n as u64).div_ceil(BLOCK) {
        if let Some(k) = kind_of.get(&b) {
            *kinds.entry(k).or_default() += 1;
        }
    }
    kinds
}

/// One timed sequential pass of O_DIRECT 1 MiB reads over the snapshot device `dev` and the
/// reference `reference` (request by request, alternating), grouped as [`profile`] groups
/// them: the device's time per request beside the reference's, `tag` naming the pass.
pub fn device_groups(tag: &str, dev: &Path, reference: &Path, cow: &Path, len: u64) -> Res<()> {
    let reader = File::open(cow)
        .map_err(|e| format!("{}: {e}", cow.display()))
        .and_then(|f| CowReader::open(f).map_err(|e| format!("COW: {e}")))?;
    let kind_of = kinds_by_block(&reader);
    let d = crate::scenario_support::open_direct(dev)?;
    let r = crate::scenario_support::open_direct(reference)?;
    let mut buf = crate::harness::AlignedBuf::new(REQUEST);
    let mut groups: BTreeMap<&'static str, (u64, Duration, Duration)> = BTreeMap::new();
    let mut offset = 0u64;
    while offset < len {
        let n = REQUEST.min((len - offset) as usize);
        let kinds = kinds_in(&kind_of, offset, n);
        let t = Instant::now();
        d.read_exact_at(&mut buf.as_mut()[..n], offset)
            .map_err(|e| format!("{} at {offset}: {e}", dev.display()))?;
        let on_dev = t.elapsed();
        let t = Instant::now();
        r.read_exact_at(&mut buf.as_mut()[..n], offset)
            .map_err(|e| format!("{} at {offset}: {e}", reference.display()))?;
        let on_ref = t.elapsed();
        let g = groups.entry(group_name(&kinds)).or_default();
        g.0 += 1;
        g.1 += on_dev;
        g.2 += on_ref;
        offset += n as u64;
    }
    for (name, (requests, on_dev, on_ref)) in &groups {
        println!(
            "VMPROFILE device {tag} group {name} requests {requests} us_per_request device {:.0} reference {:.0}",
            us_per_mib(*on_dev, *requests),
            us_per_mib(*on_ref, *requests),
        );
    }
    Ok(())
}

fn us_per_mib(d: Duration, requests: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        d.as_secs_f64() * 1e6 / requests as f64
    }
}

fn profile(cow: &Path, source: &Path, base: &Path, target: &Path, mmap_cow: bool) -> Res<()> {
    let opts = UserSnapshotOptions {
        mmap_cow,
        ..UserSnapshotOptions::default()
    };
    let snap = UserSnapshot::open(cow, source, base, &opts).map_err(|e| format!("open: {e}"))?;
    let reader = File::open(cow)
        .map_err(|e| format!("{}: {e}", cow.display()))
        .and_then(|f| CowReader::open(f).map_err(|e| format!("COW: {e}")))?;
    let kind_of = kinds_by_block(&reader);
    let target_file = File::open(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let len = crate::scenario_support::dev_bytes(target)?;
    let mut buf = vec![0u8; REQUEST];
    let mut produced = Vec::with_capacity(REQUEST);
    let mut groups: BTreeMap<&'static str, Group> = BTreeMap::new();
    // One untimed pass, so every pass after it reads from the page cache as a device does
    // after its first read.
    for pass in 0..2 {
        let mut offset = 0u64;
        while offset < len {
            let n = REQUEST.min((len - offset) as usize);
            let kinds = kinds_in(&kind_of, offset, n);
            let t = Instant::now();
            target_file
                .read_exact_at(&mut buf[..n], offset)
                .map_err(|e| format!("target at {offset}: {e}"))?;
            let reference = t.elapsed();
            let t = Instant::now();
            snap.read(offset / 512, &mut buf[..n])
                .map_err(|e| format!("snapshot read at {offset}: {e}"))?;
            let whole = t.elapsed();
            let req = Request {
                kind: DM_USER_REQ_MAP_READ,
                flags: 0,
                sector: offset / 512,
                len: n as u64,
            };
            let t = Instant::now();
            let (mut files, mut made) = (0u64, 0u64);
            snap.read_in_pieces(&req, &mut produced, &mut |list, _| {
                for p in list {
                    match p {
                        AnswerPiece::File { .. } => files += 1,
                        AnswerPiece::Produced { .. } | AnswerPiece::Memory { .. } => made += 1,
                    }
                }
                true
            });
            let pieces = t.elapsed();
            if pass == 1 {
                let g = groups.entry(group_name(&kinds)).or_default();
                g.requests += 1;
                g.changed_blocks += kinds.values().sum::<u64>();
                g.reference += reference;
                g.whole += whole;
                g.pieces += pieces;
                g.file_pieces += files;
                g.produced_pieces += made;
            }
            offset += n as u64;
        }
    }
    let mut total = Group::default();
    for (name, g) in &groups {
        println!(
            "VMPROFILE mmap_cow {mmap_cow} group {name} requests {} changed_blocks {} us_per_request reference {:.0} read {:.0} pieces {:.0} file_pieces {} produced_pieces {}",
            g.requests,
            g.changed_blocks,
            us_per_mib(g.reference, g.requests),
            us_per_mib(g.whole, g.requests),
            us_per_mib(g.pieces, g.requests),
            g.file_pieces,
            g.produced_pieces,
        );
        total.requests += g.requests;
        total.reference += g.reference;
        total.whole += g.whole;
        total.pieces += g.pieces;
    }
    println!(
        "VMPROFILE mmap_cow {mmap_cow} all requests {} us_per_request reference {:.0} read {:.0} pieces {:.0}",
        total.requests,
        us_per_mib(total.reference, total.requests),
        us_per_mib(total.whole, total.requests),
        us_per_mib(total.pieces, total.requests),
    );
    // Bare decompression of every REPLACE op, from payloads already in memory.
    let mut payloads = Vec::new();
    for op in reader.ops().iter().filter(|o| o.kind == OpKind::Replace) {
        let size = reader.payload_size(op) as usize;
        let mut out = vec![0u8; size];
        let t = Instant::now();
        reader
            .read_op_data(op, &mut out)
            .map_err(|e| format!("op {}: {e}", op.index))?;
        payloads.push((t.elapsed(), size));
    }
    let bytes: usize = payloads.iter().map(|p| p.1).sum();
    let time: Duration = payloads.iter().map(|p| p.0).sum();
    println!(
        "VMPROFILE replace_ops {} decoded_mib {:.1} read_op_data_us_per_mib {:.0}",
        payloads.len(),
        bytes as f64 / (1 << 20) as f64,
        time.as_secs_f64() * 1e6 / (bytes as f64 / (1 << 20) as f64).max(1e-9),
    );
    Ok(())
}

/// Entry point of `vmtest read-profile COW SOURCE BASE TARGET`.
pub fn main(args: &[String]) -> Res<()> {
    let [cow, source, base, target] = args else {
        return Err("usage: vmtest read-profile COW SOURCE BASE TARGET".into());
    };
    for mmap_cow in [false, true] {
        profile(
            Path::new(cow),
            Path::new(source),
            Path::new(base),
            Path::new(target),
            mmap_cow,
        )?;
    }
    Ok(())
}

/// The profile with the daemon's default COW access (`pread`), for the demo's report.
pub fn run(cow: &Path, source: &Path, base: &Path, target: &Path) -> Res<()> {
    profile(cow, source, base, target, false)
}

/// Time per MiB of the ways a daemon can put 1 MiB into a pipe, each followed by a splice of
/// the pipe into `/dev/null`: `splice` from the page cache of `file` (a block device or file
/// whose first 16 MiB get read once first), `vmsplice` of a buffer, and a `pread` of the same
/// bytes for comparison.
pub fn splice_probe(tag: &str, file: &Path) -> Res<()> {
    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    const SPAN: u64 = 16 << 20;
    let f = File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let null = File::options()
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("/dev/null: {e}"))?;
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    fcntl(&w, FcntlArg::F_SETPIPE_SZ(REQUEST as i32)).map_err(|e| format!("pipe size: {e}"))?;
    let mut aligned = crate::harness::AlignedBuf::new(REQUEST);
    let buf = aligned.as_mut();
    let mut off = 0;
    while off < SPAN {
        f.read_exact_at(buf, off)
            .map_err(|e| format!("{} at {off}: {e}", file.display()))?;
        off += REQUEST as u64;
    }
    let drain = |want: usize| -> Res<()> {
        let mut left = want;
        while left > 0 {
            let n = splice(&r, None, &null, None, left, SpliceFFlags::empty())
                .map_err(|e| format!("splice to /dev/null: {e}"))?;
            if n == 0 {
                return Err("pipe empty".into());
            }
            left -= n;
        }
        Ok(())
    };
    let (mut t_splice, mut t_vmsplice, mut t_pread) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let rounds = (SPAN / REQUEST as u64) as u32;
    for i in 0..rounds {
        let at = u64::from(i) * REQUEST as u64;
        let t = Instant::now();
        splice_request(&f, file, at, &w)?;
        drain(REQUEST)?;
        t_splice += t.elapsed();
        let t = Instant::now();
        vmsplice_all(&w, buf)?;
        drain(REQUEST)?;
        t_vmsplice += t.elapsed();
        let t = Instant::now();
        f.read_exact_at(buf, at)
            .map_err(|e| format!("{} at {at}: {e}", file.display()))?;
        t_pread += t.elapsed();
    }
    println!(
        "VMPROFILE splice-probe {tag} us_per_mib splice_file {:.0} vmsplice {:.0} pread {:.0}",
        us_per_mib(t_splice, u64::from(rounds)),
        us_per_mib(t_vmsplice, u64::from(rounds)),
        us_per_mib(t_pread, u64::from(rounds)),
    );
    cold_probe(tag, file, &f, &w, buf, &drain)
}

/// Splice `REQUEST` bytes of `f` at `at` into the pipe `w` (the page cache filled on the way).
fn splice_request(f: &File, file: &Path, at: u64, w: &std::os::fd::OwnedFd) -> Res<()> {
    use nix::fcntl::{splice, SpliceFFlags};
    let mut pos = i64::try_from(at).map_err(|_| format!("offset {at} out of range"))?;
    let mut filled = 0;
    while filled < REQUEST {
        let n = splice(
            f,
            Some(&mut pos),
            w,
            None,
            REQUEST - filled,
            SpliceFFlags::empty(),
        )
        .map_err(|e| format!("splice from {}: {e}", file.display()))?;
        if n == 0 {
            return Err("end of file".into());
        }
        filled += n;
    }
    Ok(())
}

/// Vmsplice all of `buf` into the pipe `w`.
fn vmsplice_all(w: &std::os::fd::OwnedFd, buf: &[u8]) -> Res<()> {
    use nix::fcntl::{vmsplice, SpliceFFlags};
    use std::io::IoSlice;
    let mut rest = buf;
    while !rest.is_empty() {
        let n = vmsplice(w, &[IoSlice::new(rest)], SpliceFFlags::empty())
            .map_err(|e| format!("vmsplice: {e}"))?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Drop the guest's clean page cache (the probe runs as root in the emulator).
fn drop_page_cache() -> Res<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "1").map_err(|e| format!("drop_caches: {e}"))
}

/// The same 16 MiB read cold (page cache dropped before each way), three ways per 1 MiB:
/// spliced from the page cache into a pipe (the page cache filled on the way), read with
/// `O_DIRECT` into a buffer then vmspliced (the page cache left alone), and a buffered
/// `pread`. Shows what bringing a MiB in costs the guest with and without the page cache.
fn cold_probe(
    tag: &str,
    file: &Path,
    f: &File,
    w: &std::os::fd::OwnedFd,
    buf: &mut [u8],
    drain: &dyn Fn(usize) -> Res<()>,
) -> Res<()> {
    use std::os::unix::fs::OpenOptionsExt;
    const SPAN: u64 = 16 << 20;
    let rounds = (SPAN / REQUEST as u64) as u32;
    let direct = File::options()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(file)
        .map_err(|e| format!("{} O_DIRECT: {e}", file.display()))?;
    drop_page_cache()?;
    let t = Instant::now();
    for i in 0..rounds {
        splice_request(f, file, u64::from(i) * REQUEST as u64, w)?;
        drain(REQUEST)?;
    }
    let t_splice = t.elapsed();
    drop_page_cache()?;
    let t = Instant::now();
    for i in 0..rounds {
        let at = u64::from(i) * REQUEST as u64;
        direct
            .read_exact_at(buf, at)
            .map_err(|e| format!("{} O_DIRECT at {at}: {e}", file.display()))?;
        vmsplice_all(w, buf)?;
        drain(REQUEST)?;
    }
    let t_direct = t.elapsed();
    drop_page_cache()?;
    let t = Instant::now();
    for i in 0..rounds {
        let at = u64::from(i) * REQUEST as u64;
        f.read_exact_at(buf, at)
            .map_err(|e| format!("{} at {at}: {e}", file.display()))?;
    }
    let t_pread = t.elapsed();
    println!(
        "VMPROFILE splice-probe {tag} cold us_per_mib splice_file {:.0} direct_then_vmsplice {:.0} pread {:.0}",
        us_per_mib(t_splice, u64::from(rounds)),
        us_per_mib(t_direct, u64::from(rounds)),
        us_per_mib(t_pread, u64::from(rounds)),
    );
    Ok(())
}
