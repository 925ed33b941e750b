//! The ublk transport in the guest: a helper process serves an image file through
//! `snapuserd::ublk` as `/dev/ublkb<N>`; the cases read it, mount it, and kill the helper
//! with SIGKILL in the middle of reads to check that a new helper re-attaches and that the
//! reader sees neither an error nor wrong data.
//!
//! Needs `ublk_drv` (Linux 6.12 here; Debian's 6.1 cloud kernel is built without it, and the
//! xtask does not run these cases there).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use snapuserd::daemon::transport::RequestHandler;
use snapuserd::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_READ, DM_USER_REQ_MAP_WRITE};
use snapuserd::ublk::{identity_of, UblkDevice, UblkOptions, UserCopy};

use crate::cases::{sh, HANG, MIB};
use crate::harness::*;

/// Serves READs from a file (the test's stand-in for the snapshot handler).
struct FileHandler {
    file: File,
    size: u64,
    /// Answer READs with zeros instead of reading the file (the benchmark's transport-only
    /// row: what is left is ublk's round trips, the zero fill and the copy to the kernel).
    zeros: bool,
}

impl RequestHandler for FileHandler {
    fn handle(&self, req: &Request, _payload: &[u8], out: &mut Vec<u8>) -> ResponseCode {
        match req.kind {
            DM_USER_REQ_MAP_READ => {
                let inside = req
                    .sector
                    .checked_mul(512)
                    .and_then(|o| o.checked_add(req.len))
                    .is_some_and(|end| end <= self.size);
                let Ok(len) = usize::try_from(req.len) else {
                    return ResponseCode::Error;
                };
                if !inside {
                    return ResponseCode::Error;
                }
                out.resize(len, 0);
                if self.zeros {
                    return ResponseCode::Success;
                }
                match self.file.read_exact_at(out, req.sector * 512) {
                    Ok(()) => ResponseCode::Success,
                    Err(_) => ResponseCode::Error,
                }
            }
            DM_USER_REQ_MAP_WRITE if req.len == 0 => ResponseCode::Success,
            DM_USER_REQ_MAP_WRITE => ResponseCode::Error,
            _ => ResponseCode::Unsupported,
        }
    }
}

/// `vmtest helper-ublk create|recover IMAGE NAME
/// auto|usercopy|buffer|usercopy-zeros|usercopy-unpinned QUEUES [MAX_IO_BYTES]`: serve IMAGE
/// until SIGTERM (`usercopy-zeros`: READs answered with zeros, the file not read;
/// `usercopy-unpinned`: queue threads not pinned to their queues' CPUs), then remove the
/// device. Prints `UBLK READY <block node> <usercopy 0|1>`.
pub fn helper(args: &[String]) -> Result<(), String> {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let (mode, image, name, path) = (arg(0), arg(1), arg(2), arg(3));
    let queues: u16 = arg(4).parse().unwrap_or(1);
    let max_io_bytes: u32 = arg(5)
        .parse()
        .unwrap_or(snapuserd::ublk::device::DEFAULT_MAX_IO_BYTES);
    let user_copy = match path {
        "usercopy" | "usercopy-zeros" | "usercopy-unpinned" => UserCopy::Always,
        "buffer" => UserCopy::Never,
        _ => UserCopy::Auto,
    };
    // Block SIGTERM before any queue thread exists, so that only `wait` below takes it.
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    term.thread_block().ctx("block SIGTERM")?;
    let file = File::open(image).ctx(image)?;
    let size = file.metadata().ctx(image)?.len();
    let handler = Arc::new(FileHandler {
        file,
        size,
        zeros: path == "usercopy-zeros",
    });
    let opts = UblkOptions {
        queues,
        user_copy,
        max_io_bytes,
        identity: identity_of(name),
        pin_queues: path != "usercopy-unpinned",
        ..UblkOptions::default()
    };
    let device = match mode {
        "create" => UblkDevice::create(handler, size / 512, &opts).ctx("create ublk device")?,
        "recover" => UblkDevice::recover(handler, opts.identity, &opts).ctx("recover")?,
        other => return Err(format!("unknown helper mode {other:?}")),
    };
    println!(
        "UBLK READY {} {}",
        device.block_path().display(),
        u8::from(device.user_copy())
    );
    term.wait().ctx("wait for SIGTERM")?;
    let report = device.remove().ctx("remove ublk device")?;
    // The test stops reading stdout after READY: report on stderr (the guest console).
    eprintln!(
        "ublk helper: device removed; {} requests committed, {} failed",
        report.committed, report.failed
    );
    Ok(())
}

/// A running helper.
struct Helper {
    child: Child,
    /// Its block node.
    node: PathBuf,
    /// Whether it serves through USER_COPY.
    user_copy: bool,
}

impl Helper {
    fn spawn(
        mode: &str,
        image: &Path,
        name: &str,
        path: &str,
        queues: u16,
    ) -> Result<Self, String> {
        Self::spawn_sized(mode, image, name, path, queues, 0)
    }

    /// As [`Helper::spawn`], with an I/O limit (0: the default).
    fn spawn_sized(
        mode: &str,
        image: &Path,
        name: &str,
        path: &str,
        queues: u16,
        max_io_bytes: u32,
    ) -> Result<Self, String> {
        let mut child = Command::new("/proc/self/exe")
            .args(["helper-ublk", mode])
            .arg(image)
            .args([name, path, &queues.to_string()])
            .args((max_io_bytes > 0).then(|| max_io_bytes.to_string()))
            .stdout(Stdio::piped())
            .spawn()
            .ctx("spawn ublk helper")?;
        let line = ublk_ready_line(
            &mut child,
            &format!("ublk helper {mode}"),
            Duration::from_secs(30),
        )?;
        let mut words = line.split_whitespace().skip(2);
        let node = PathBuf::from(words.next().unwrap_or(""));
        let user_copy = words.next() == Some("1");
        Ok(Self {
            child,
            node,
            user_copy,
        })
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    /// SIGKILL and reap.
    fn kill9(&mut self) -> Result<(), String> {
        kill(self.pid(), Signal::SIGKILL).ctx("SIGKILL helper")?;
        self.child.wait().ctx("reap helper")?;
        Ok(())
    }

    /// SIGTERM: the helper removes its device and exits 0.
    fn stop(mut self) -> Result<(), String> {
        kill(self.pid(), Signal::SIGTERM).ctx("SIGTERM helper")?;
        let start = Instant::now();
        let status = loop {
            match self.child.try_wait().ctx("wait helper")? {
                Some(s) => break s,
                None if start.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                None => return Err("ublk helper did not exit within 20 s of SIGTERM".into()),
            }
        };
        check(status.success(), format!("ublk helper exited {status}"))?;
        check(
            !self.node.exists(),
            format!("{} still exists after removal", self.node.display()),
        )
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// Write a pattern image of `size` bytes with `seed` into tmpfs.
fn image(name: &str, seed: u64, size: u64) -> Result<PathBuf, String> {
    let path = PathBuf::from(format!("/tmp/{name}.img"));
    std::fs::write(&path, pattern(seed, 0, size as usize)).ctx("write image")?;
    Ok(path)
}

fn open_direct(node: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(node)
        .ctx(&format!("open {}", node.display()))
}

fn ioctl_u32(f: &File, req: u64) -> Result<u32, String> {
    let mut v: nix::libc::c_int = 0;
    // SAFETY: BLKSSZGET/BLKPBSZGET write one int through the pointer; the fd is open.
    let rc = unsafe { nix::libc::ioctl(f.as_raw_fd(), req as _, &mut v) };
    check(
        rc == 0,
        format!("ioctl {req:#x}: {}", std::io::Error::last_os_error()),
    )?;
    u32::try_from(v).map_err(|_| format!("ioctl {req:#x} returned {v}"))
}

const BLKSSZGET: u64 = 0x1268;
const BLKPBSZGET: u64 = 0x127b;
const BLKGETSIZE64: u64 = 0x8008_1272;
const BLKDISCARD: u64 = 0x1277;

/// Whole-device read through `path` (`usercopy`, `buffer`), block sizes, and the ops that
/// are refused.
fn read_case(path: &str) -> TestResult {
    let size = 32 * MIB;
    let img = image(&format!("ublk-read-{path}"), 21, size)?;
    let helper = Helper::spawn("create", &img, &format!("read-{path}"), path, 2)?;
    check(
        helper.user_copy == (path == "usercopy"),
        format!("data path: user copy {} for {path}", helper.user_copy),
    )?;
    let f = open_direct(&helper.node)?;
    check(
        ioctl_u32(&f, BLKSSZGET)? == 512,
        "logical block size is not 512",
    )?;
    check(
        ioctl_u32(&f, BLKPBSZGET)? == 4096,
        "physical block size is not 4096",
    )?;
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer; the fd is open.
    let rc = unsafe { nix::libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut bytes) };
    check(
        rc == 0 && bytes == size,
        format!("device size {bytes} (rc {rc}), want {size}"),
    )?;
    let want = std::fs::read(&img).ctx("read image")?;
    let mut buf = AlignedBuf::new(MIB as usize);
    let t = Instant::now();
    for off in (0..size).step_by(MIB as usize) {
        f.read_exact_at(buf.as_mut(), off)
            .ctx("whole-device read")?;
        same(
            &format!("1 MiB at {off}"),
            buf.as_ref(),
            &want[off as usize..(off + MIB) as usize],
        )?;
    }
    let secs = t.elapsed().as_secs_f64();
    // One sector at an odd sector, and the last sector.
    let mut sector = AlignedBuf::new(512);
    for off in [512 * 7, size - 512] {
        f.read_exact_at(sector.as_mut(), off).ctx("sector read")?;
        same(
            &format!("sector at {off}"),
            sector.as_ref(),
            &want[off as usize..off as usize + 512],
        )?;
    }
    // WRITE fails; the image is untouched.
    let w = f.write_all_at(AlignedBuf::new(4096).as_ref(), 8192);
    check(w.is_err(), "a WRITE to the snapshot device succeeded")?;
    f.sync_all().ctx("flush")?;
    let range = [0u64, 4096];
    // SAFETY: BLKDISCARD reads two u64 (offset, length) through the pointer.
    let rc = unsafe { nix::libc::ioctl(f.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    check(rc != 0, "BLKDISCARD succeeded")?;
    same(
        "image after the refused ops",
        &std::fs::read(&img).ctx("image")?,
        &want,
    )?;
    drop(f);
    helper.stop()?;
    let _ = std::fs::remove_file(&img);
    Ok(format!(
        "{} MiB read equal through {path} ({:.0} MB/s); write and discard refused, flush ok",
        size >> 20,
        size as f64 / secs / 1e6
    ))
}

/// Whole-device read through USER_COPY.
pub fn read_usercopy() -> TestResult {
    read_case("usercopy")
}

/// Whole-device read through the buffer path.
pub fn read_buffer() -> TestResult {
    read_case("buffer")
}

/// An ext4 image made on a loop device, served read-only through ublk, mounted, files read.
pub fn ext4() -> TestResult {
    let img = PathBuf::from("/tmp/ublk-ext4.img");
    std::fs::write(&img, vec![0u8; (32 * MIB) as usize]).ctx("image")?;
    let node = img.display().to_string();
    let mnt = "/tmp/ublk-mnt";
    std::fs::create_dir_all(mnt).ctx("mkdir")?;
    sh(&format!(
        "mke2fs -q -F {node} >/dev/null 2>&1 || mke2fs -F {node}"
    ))?;
    sh(&format!("mount -t ext4 -o loop {node} {mnt}"))?;
    let files: Vec<(String, Vec<u8>)> = (0..24u64)
        .map(|i| {
            (
                format!("f{i}"),
                pattern(50 + i, i * 31, (i as usize * 7919) % 200_000 + 1),
            )
        })
        .collect();
    for (name, data) in &files {
        std::fs::write(format!("{mnt}/{name}"), data).ctx(name)?;
    }
    sh(&format!("umount {mnt}"))?;
    let helper = Helper::spawn("create", &img, "ext4", "auto", 1)?;
    let dev = helper.node.display().to_string();
    sh(&format!("mount -t ext4 -o ro,noload {dev} {mnt}"))?;
    let result = files.iter().try_for_each(|(name, data)| {
        same(
            name,
            &std::fs::read(format!("{mnt}/{name}")).ctx(name)?,
            data,
        )
    });
    sh(&format!("umount {mnt}"))?;
    result?;
    helper.stop()?;
    let _ = std::fs::remove_file(&img);
    Ok(format!("{} files read back from ext4 on ublk", files.len()))
}

/// SIGKILL the serving helper three times in the middle of a reader's O_DIRECT reads; a new
/// helper re-attaches each time. The reader must see zero errors and only the image's data.
pub fn kill_recover() -> TestResult {
    const KILLS: usize = 3;
    let size = 32 * MIB;
    let img = image("ublk-kill", 33, size)?;
    let want = Arc::new(std::fs::read(&img).ctx("image")?);
    let mut helper = Helper::spawn("create", &img, "kill", "auto", 2)?;
    let node = helper.node.clone();
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15);
    let next_off = move || rng.below(size / 4096 - 16) * 4096;
    let reader = spawn_checking_reader(node, want, 64 << 10, t0, stop.clone(), next_off);
    let mut outages = Vec::new();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(400));
        let killed_at = ns_since(t0);
        helper.kill9()?;
        // Reads issued now wait in the kernel for the next server.
        std::thread::sleep(Duration::from_millis(200));
        // On failure the reader is stuck without a server; the test process ends anyway.
        helper = Helper::spawn("recover", &img, "kill", "auto", 2)
            .map_err(|e| format!("recovery failed (the reader waits forever): {e}"))?;
        outages.push((killed_at, ns_since(t0)));
    }
    std::thread::sleep(Duration::from_millis(400));
    let log = stop_reader(&stop, reader)?;
    helper.stop()?;
    let _ = std::fs::remove_file(&img);
    let across = log.check_outages(&outages)?;
    let longest = outages
        .iter()
        .map(|&(k, r)| (r - k) / 1_000_000)
        .max()
        .unwrap_or(0);
    Ok(format!(
        "{KILLS} kill -9 + recovery: {} reads, {} of them across a kill ({across:?}), errors 0, \
         wrong data 0; longest outage {longest} ms",
        log.spans.len(),
        across.iter().sum::<usize>()
    ))
}

/// A server that is stopped (SIGSTOP) keeps its device: the new helper's re-attach waits
/// the grace period, sends the old one SIGKILL (it holds `/dev/ublkc<N>`), and recovers;
/// a reader running across it sees no error and only the image's data.
pub fn recover_stopped_server() -> TestResult {
    let size = 16 * MIB;
    let img = image("ublk-stopped", 35, size)?;
    let want = Arc::new(std::fs::read(&img).ctx("image")?);
    let mut old = Helper::spawn("create", &img, "stopped", "auto", 2)?;
    let node = old.node.clone();
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut rng = XorShift::new(0x2545_F491_4F6C_DD1D);
    let next_off = move || rng.below(size / 4096 - 16) * 4096;
    let reader = spawn_checking_reader(node, want, 64 << 10, t0, stop.clone(), next_off);
    std::thread::sleep(Duration::from_millis(300));
    let stopped_at = ns_since(t0);
    kill(old.pid(), Signal::SIGSTOP).ctx("SIGSTOP helper")?;
    // On failure the reader is stuck without a server; the test process ends anyway.
    let new = Helper::spawn("recover", &img, "stopped", "auto", 2)
        .map_err(|e| format!("re-attach past a stopped server failed: {e}"))?;
    let recovered_at = ns_since(t0);
    let status = bounded("old helper's end", HANG, move || old.child.wait())?.ctx("reap")?;
    use std::os::unix::process::ExitStatusExt;
    check(
        status.signal() == Some(nix::libc::SIGKILL),
        format!("the stopped helper ended with {status}, not by SIGKILL"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let log = stop_reader(&stop, reader)?;
    new.stop()?;
    let _ = std::fs::remove_file(&img);
    let across = log.check_outages(&[(stopped_at, recovered_at)])?;
    let waited_ms = (recovered_at - stopped_at) / 1_000_000;
    check(
        waited_ms >= snapuserd::ublk::device::DEFAULT_STALE_SERVER_GRACE.as_millis() as u64,
        format!("recovered {waited_ms} ms after the stop, before the grace period ended"),
    )?;
    Ok(format!(
        "stopped server killed after the grace period, recovered {waited_ms} ms after the stop: \
         {} reads, {} across it, errors 0, wrong data 0",
        log.spans.len(),
        across.iter().sum::<usize>()
    ))
}

/// `vmtest ublk-bench`: sequential O_DIRECT 1 MiB and random 4 KiB reads through ublk
/// (USER_COPY and buffer path with a 1 MiB I/O limit, USER_COPY with AOSP's 64 KiB) and a
/// loop device over the same tmpfs file, alternating, five rounds; prints `VMBENCH` lines
/// with the medians.
pub fn bench() -> Result<(), String> {
    let size = crate::bench::SIZE;
    let img = image("ublk-bench", 1, size)?;
    // The zeros row answers without reading the image: the transport's own share. The two
    // rows of 2 queues (one per vCPU) compare queue threads pinned to their queue's CPU (the
    // default) with threads that run anywhere.
    let configs = [
        ("usercopy-1MiB", "usercopy", 1u32 << 20, 1u16),
        ("buffer-1MiB", "buffer", 1 << 20, 1),
        ("usercopy-1MiB-zeros", "usercopy-zeros", 1 << 20, 1),
        ("usercopy-1MiB-2q-pinned", "usercopy", 1 << 20, 2),
        ("usercopy-1MiB-2q-unpinned", "usercopy-unpinned", 1 << 20, 2),
    ];
    let mut helpers = Vec::new();
    for (name, path, max_io, queues) in configs {
        helpers.push(Helper::spawn_sized(
            "create", &img, name, path, queues, max_io,
        )?);
    }
    let lp = crate::bench::LoopDevice::attach(&img)?;
    let mut paths: Vec<PathBuf> = helpers.iter().map(|h| h.node.clone()).collect();
    paths.push(lp.path.clone());
    let mut seq: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut rnd: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..crate::bench::ROUNDS {
        for (i, p) in paths.iter().enumerate() {
            let answers_zeros = configs.get(i).is_some_and(|c| c.1 == "usercopy-zeros");
            let f = if answers_zeros {
                crate::bench::measure_expecting(p, &zeros)?
            } else {
                crate::bench::measure(p)?
            };
            seq[i].push(f.seq_mbps);
            rnd[i].push(f.rand_iops);
        }
    }
    drop(lp);
    for h in helpers {
        h.stop()?;
    }
    let _ = std::fs::remove_file(&img);
    for (what, unit, v) in [
        ("seq-1MiB-read", "MB/s", &seq),
        ("rand-4KiB-read", "IOPS", &rnd),
    ] {
        let m: Vec<f64> = v.iter().map(|x| crate::bench::median(x.clone())).collect();
        let loop_median = m.last().copied().unwrap_or(0.0);
        let mut line = format!("VMBENCH ublk {what} median:");
        for ((name, _, _, _), value) in configs.iter().zip(&m) {
            line.push_str(&format!(
                " {name} {value:.0} {unit} ({:.2} of loop);",
                value / loop_median
            ));
        }
        line.push_str(&format!(" loop-tmpfs {loop_median:.0} {unit}"));
        println!("{line}");
    }
    println!(
        "VMBENCH ublk config {} MiB image on tmpfs, {} alternating rounds, queues of depth 32 (1 unless the name says 2q), O_DIRECT, one reader (queue depth 1), TCG guest",
        size >> 20,
        crate::bench::ROUNDS
    );
    Ok(())
}

/// CPU numbers of a kernel CPU list (`0-1`, `0, 2`, `0-3,5`).
fn cpu_set_of(list: &str) -> Result<std::collections::BTreeSet<usize>, String> {
    let mut set = std::collections::BTreeSet::new();
    for part in list.split([',', ' ']).filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let lo: usize = lo.trim().parse().ctx(&format!("cpu list {list:?}"))?;
        let hi: usize = hi.trim().parse().ctx(&format!("cpu list {list:?}"))?;
        set.extend(lo..=hi);
    }
    Ok(set)
}

/// The allowed CPUs of each queue thread (`ublk<N>q<Q>`) of process `pid`, by queue.
fn queue_thread_cpus(
    pid: u32,
    dev_id: &str,
) -> Result<std::collections::BTreeMap<String, std::collections::BTreeSet<usize>>, String> {
    let mut out = std::collections::BTreeMap::new();
    let prefix = format!("ublk{dev_id}q");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ctx("helper tasks")? {
        let dir = task.ctx("helper task")?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let Some(q) = comm.trim().strip_prefix(&prefix) else {
            continue;
        };
        let status = std::fs::read_to_string(dir.join("status")).ctx("task status")?;
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .ok_or("no Cpus_allowed_list in task status")?;
        out.insert(q.to_string(), cpu_set_of(list.trim())?);
    }
    Ok(out)
}

/// Queue threads run on their queue's CPUs: with 2 queues, each thread's allowed CPUs are
/// exactly the CPUs blk-mq maps to its queue (`/sys/block/ublkbN/mq/<q>/cpu_list`); with
/// `pin_queues` off they are every online CPU.
pub fn queue_affinity() -> TestResult {
    let img = image("ublk-affinity", 3, 4 * MIB)?;
    let online = cpu_set_of(
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ctx("online CPUs")?
            .trim(),
    )?;
    let mut seen = Vec::new();
    for (path, pinned) in [("usercopy", true), ("usercopy-unpinned", false)] {
        let helper = Helper::spawn("create", &img, &format!("affinity-{path}"), path, 2)?;
        let dev = helper
            .node
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dev_id = dev.trim_start_matches("ublkb").to_string();
        let threads = queue_thread_cpus(helper.child.id(), &dev_id);
        let checked = threads.and_then(|threads| {
            check(
                threads.len() == 2,
                format!(
                    "{} queue threads named ublk{dev_id}q*, expected 2",
                    threads.len()
                ),
            )?;
            for (q, cpus) in &threads {
                let mapped = cpu_set_of(
                    std::fs::read_to_string(format!("/sys/block/{dev}/mq/{q}/cpu_list"))
                        .ctx("queue cpu_list")?
                        .trim(),
                )?;
                let expected = if pinned && !mapped.is_empty() {
                    mapped
                } else {
                    online.clone()
                };
                check(
                    cpus.is_superset(&expected) && expected.is_superset(cpus),
                    format!("queue {q} thread ({path}) may run on {cpus:?}, expected {expected:?}"),
                )?;
                seen.push(format!("{path} q{q} {cpus:?}"));
            }
            Ok(())
        });
        helper.stop()?;
        checked?;
    }
    let _ = std::fs::remove_file(&img);
    Ok(format!("queue threads' CPUs: {}", seen.join(", ")))
}
