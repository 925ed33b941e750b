//! dm-user (RAM daemon) vs loop-over-tmpfs read benchmark, O_DIRECT, queue depth 1.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::harness::*;
use crate::ramd::{Daemon, RamDisk, Stats};

pub(crate) const SIZE: u64 = 64 << 20;
const SEQ_PASSES: u64 = 1;
const RAND_OPS: u64 = 1_500;
/// Rounds, alternating the two devices, so that host noise hits both alike.
pub(crate) const ROUNDS: usize = 5;

/// Measured figures for one device.
pub(crate) struct Figures {
    pub(crate) seq_mbps: f64,
    pub(crate) rand_iops: f64,
}

fn open_direct(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .ctx(&format!("open {}", path.display()))
}

pub(crate) fn measure(path: &Path) -> Result<Figures, String> {
    measure_expecting(path, &pattern(1, 0, 1 << 20))
}

/// As [`measure`], with `first_mib` the data the device's first MiB must read as (zeros for
/// a device that answers without reading its image).
pub(crate) fn measure_expecting(path: &Path, first_mib: &[u8]) -> Result<Figures, String> {
    let f = open_direct(path)?;
    let mut buf = AlignedBuf::new(1 << 20);
    // Warm-up pass, and a spot check that the device returns the expected data.
    f.read_exact_at(buf.as_mut(), 0).ctx("warm-up")?;
    same("bench data", buf.as_ref(), first_mib)?;
    let t = Instant::now();
    for _ in 0..SEQ_PASSES {
        let mut off = 0;
        while off < SIZE {
            f.read_exact_at(buf.as_mut(), off).ctx("sequential read")?;
            off += 1 << 20;
        }
    }
    let seq = (SEQ_PASSES * SIZE) as f64 / t.elapsed().as_secs_f64() / 1e6;
    let mut small = AlignedBuf::new(4096);
    let mut rng = crate::harness::XorShift::new(0x2545_F491_4F6C_DD1D);
    let t = Instant::now();
    for _ in 0..RAND_OPS {
        let off = rng.below(SIZE / 4096) * 4096;
        f.read_exact_at(small.as_mut(), off).ctx("random read")?;
    }
    let iops = RAND_OPS as f64 / t.elapsed().as_secs_f64();
    Ok(Figures {
        seq_mbps: seq,
        rand_iops: iops,
    })
}

const LOOP_SET_FD: u64 = 0x4C00;
const LOOP_CLR_FD: u64 = 0x4C01;
const LOOP_CTL_GET_FREE: u64 = 0x4C82;

/// A loop device bound to a backing file, detached on drop.
pub(crate) struct LoopDevice {
    file: File,
    pub(crate) path: PathBuf,
}

impl LoopDevice {
    pub(crate) fn attach(backing: &Path) -> Result<Self, String> {
        let ctl = File::open("/dev/loop-control").ctx("open /dev/loop-control")?;
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device
        // number or -1; the fd is a live loop-control handle.
        let n = unsafe { nix::libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        check(
            n >= 0,
            format!("LOOP_CTL_GET_FREE: {}", std::io::Error::last_os_error()),
        )?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ctx("open loop device")?;
        let back = OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .ctx("open backing file")?;
        // SAFETY: LOOP_SET_FD takes the backing fd by value; both fds are open
        // for the duration of the call and the kernel takes its own reference.
        let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), LOOP_SET_FD as _, back.as_raw_fd()) };
        check(
            rc == 0,
            format!("LOOP_SET_FD: {}", std::io::Error::last_os_error()),
        )?;
        Ok(Self { file, path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // SAFETY: LOOP_CLR_FD takes no argument; the fd is open.
        let _ = unsafe { nix::libc::ioctl(self.file.as_raw_fd(), LOOP_CLR_FD as _) };
    }
}

/// The block device's queue limit `name` (sysfs), or "?" when unreadable.
fn queue_limit(dev: &Path, name: &str) -> String {
    let node = std::fs::canonicalize(dev).unwrap_or_else(|_| dev.to_path_buf());
    let base = node.file_name().map(|n| n.to_string_lossy().into_owned());
    base.and_then(|b| std::fs::read_to_string(format!("/sys/block/{b}/queue/{name}")).ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// Where the time of one sequential pass over the dm-user device goes: requests the daemon
/// saw, their mean size, and the daemon's time answering them against the wall time.
fn diagnose(label: &str, dev: &Path, stats: &Stats) -> Result<(), String> {
    let f = open_direct(dev)?;
    let mut buf = AlignedBuf::new(1 << 20);
    let reads0 = stats.reads.load(Ordering::Relaxed);
    let ns0 = stats.read_respond_ns.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut off = 0;
    while off < SIZE {
        f.read_exact_at(buf.as_mut(), off).ctx("sequential read")?;
        off += 1 << 20;
    }
    let wall = t.elapsed().as_secs_f64();
    let reads = stats.reads.load(Ordering::Relaxed) - reads0;
    let respond_s = (stats.read_respond_ns.load(Ordering::Relaxed) - ns0) as f64 / 1e9;
    let per = |x: f64| x / reads.max(1) as f64 * 1e6;
    println!(
        "VMBENCH diag seq-1MiB-read dm-user ({label}): {reads} requests for {} MiB (mean {} KiB), wall {:.0} us/request, daemon answer (header and data to the kernel) {:.0} us/request; queue max_sectors_kb {} max_hw_sectors_kb {} max_segments {} max_segment_size {}",
        SIZE >> 20,
        SIZE / 1024 / reads.max(1),
        per(wall),
        per(respond_s),
        queue_limit(dev, "max_sectors_kb"),
        queue_limit(dev, "max_hw_sectors_kb"),
        queue_limit(dev, "max_segments"),
        queue_limit(dev, "max_segment_size"),
    );
    Ok(())
}

/// Copy costs in this guest, per MiB: the kernel copying page-cache pages to a user buffer
/// (`pread` of a tmpfs file), from a user buffer (`pwrite`), and a copy in user space. The
/// dm-user READ answer is one user-to-kernel copy; the loop device's is one kernel copy.
fn copy_costs(img: &Path) -> Result<(), String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .ctx("open tmpfs image")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut other = vec![1u8; 1 << 20];
    let mib = SIZE >> 20;
    let t = Instant::now();
    for i in 0..mib {
        f.read_exact_at(&mut buf, i << 20).ctx("pread tmpfs")?;
    }
    let pread = t.elapsed().as_secs_f64() / mib as f64 * 1e6;
    let t = Instant::now();
    for i in 0..mib {
        f.write_all_at(&buf, i << 20).ctx("pwrite tmpfs")?;
    }
    let pwrite = t.elapsed().as_secs_f64() / mib as f64 * 1e6;
    let t = Instant::now();
    for _ in 0..mib {
        other.copy_from_slice(std::hint::black_box(&buf));
        std::hint::black_box(&mut other);
    }
    let memcpy = t.elapsed().as_secs_f64() / mib as f64 * 1e6;
    println!(
        "VMBENCH diag copy cost per MiB: pread tmpfs (kernel to user) {pread:.0} us, pwrite tmpfs (user to kernel) {pwrite:.0} us, user-space memcpy {memcpy:.0} us"
    );
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Run the benchmark and print VMBENCH lines.
pub fn run(threads: usize) -> Result<(), String> {
    let data = pattern(1, 0, SIZE as usize);
    // Two dm-user devices over one RAM daemon store: answers spliced, and answers written
    // with writev() (what a module without splice support gets).
    let disk = RamDisk::new(SIZE as usize);
    disk.data
        .write()
        .map_err(|_| "poisoned")?
        .copy_from_slice(&data);
    let mut dev = UserDevice::create("vt-bench", "vt-bench-c", SIZE)?;
    let d = Daemon::start_with(&dev.control, disk.clone(), threads, true).ctx("daemon")?;
    let mut dev_w = UserDevice::create("vt-bench-w", "vt-bench-w-c", SIZE)?;
    let d_w = Daemon::start_with(&dev_w.control, disk, threads, false).ctx("writev daemon")?;
    // loop over a tmpfs file of the same size and contents.
    let img = Path::new("/tmp/bench.img");
    std::fs::write(img, &data).ctx("write tmpfs image")?;
    drop(data);
    let lp = LoopDevice::attach(img)?;
    let mut figures: [Vec<Figures>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut outcome = Ok(());
    for _ in 0..ROUNDS {
        for (i, path) in [dev.path.as_path(), dev_w.path.as_path(), lp.path.as_path()]
            .into_iter()
            .enumerate()
        {
            match measure(path) {
                Ok(f) => figures[i].push(f),
                Err(e) => outcome = Err(e),
            }
        }
    }
    if outcome.is_ok() {
        let diag = diagnose("splice", &dev.path, &d.disk.stats)
            .and_then(|()| diagnose("writev", &dev_w.path, &d_w.disk.stats))
            .and_then(|()| copy_costs(img));
        if let Err(e) = diag {
            outcome = Err(e);
        }
    }
    drop(lp);
    let _ = std::fs::remove_file(img);
    dev.remove()?;
    dev_w.remove()?;
    d.join()?;
    d_w.join()?;
    outcome?;
    let [dmu, dmw, lpf] = figures;
    let seq = |v: &[Figures]| v.iter().map(|f| f.seq_mbps).collect::<Vec<_>>();
    let rnd = |v: &[Figures]| v.iter().map(|f| f.rand_iops).collect::<Vec<_>>();
    for (what, unit, a, w, b) in [
        ("seq-1MiB-read", "MB/s", seq(&dmu), seq(&dmw), seq(&lpf)),
        ("rand-4KiB-read", "IOPS", rnd(&dmu), rnd(&dmw), rnd(&lpf)),
    ] {
        let (ma, mw, mb) = (median(a.clone()), median(w.clone()), median(b.clone()));
        let (ba, bw, bb) = (best(&a), best(&w), best(&b));
        println!(
            "VMBENCH {what} median: dm-user {ma:.0} {unit} (writev-only {mw:.0}) loop-tmpfs {mb:.0} {unit} ratio {:.2} (writev-only {:.2}); best: dm-user {ba:.0} (writev-only {bw:.0}) loop-tmpfs {bb:.0} ratio {:.2} (writev-only {:.2})",
            ma / mb,
            mw / mb,
            ba / bb,
            bw / bb
        );
    }
    println!(
        "VMBENCH config {} MiB device, {ROUNDS} alternating rounds (dm-user spliced answers, dm-user writev answers, loop) of {SEQ_PASSES} sequential pass + {RAND_OPS} random reads, daemon threads {threads}, O_DIRECT, queue depth 1, TCG guest",
        SIZE >> 20
    );
    Ok(())
}
