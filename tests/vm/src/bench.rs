//! dm-user (RAM daemon) vs loop-over-tmpfs read benchmark, O_DIRECT, queue depth 1.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::harness::*;
use crate::ramd::{Daemon, RamDisk};

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
    let f = open_direct(path)?;
    let mut buf = AlignedBuf::new(1 << 20);
    // Warm-up pass, and a spot check that the device returns the pattern.
    f.read_exact_at(buf.as_mut(), 0).ctx("warm-up")?;
    same("bench data", buf.as_ref(), &pattern(1, 0, 1 << 20))?;
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
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let t = Instant::now();
    for _ in 0..RAND_OPS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (SIZE / 4096)) * 4096;
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
    // dm-user over the RAM daemon.
    let disk = RamDisk::new(SIZE as usize);
    disk.data
        .write()
        .map_err(|_| "poisoned")?
        .copy_from_slice(&data);
    let mut dev = UserDevice::create("vt-bench", "vt-bench-c", SIZE)?;
    let d = Daemon::start(&dev.control, disk, threads).ctx("daemon")?;
    // loop over a tmpfs file of the same size and contents.
    let img = Path::new("/tmp/bench.img");
    std::fs::write(img, &data).ctx("write tmpfs image")?;
    drop(data);
    let lp = LoopDevice::attach(img)?;
    let mut figures: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
    let mut outcome = Ok(());
    for _ in 0..ROUNDS {
        for (i, path) in [dev.path.as_path(), lp.path.as_path()]
            .into_iter()
            .enumerate()
        {
            match measure(path) {
                Ok(f) => figures[i].push(f),
                Err(e) => outcome = Err(e),
            }
        }
    }
    drop(lp);
    let _ = std::fs::remove_file(img);
    dev.remove()?;
    d.join()?;
    outcome?;
    let [dmu, lpf] = figures;
    let seq = |v: &[Figures]| v.iter().map(|f| f.seq_mbps).collect::<Vec<_>>();
    let rnd = |v: &[Figures]| v.iter().map(|f| f.rand_iops).collect::<Vec<_>>();
    for (what, unit, a, b) in [
        ("seq-1MiB-read", "MB/s", seq(&dmu), seq(&lpf)),
        ("rand-4KiB-read", "IOPS", rnd(&dmu), rnd(&lpf)),
    ] {
        let (ma, mb) = (median(a.clone()), median(b.clone()));
        let (ba, bb) = (best(&a), best(&b));
        println!(
            "VMBENCH {what} median: dm-user {ma:.0} {unit} loop-tmpfs {mb:.0} {unit} ratio {:.2}; best: dm-user {ba:.0} loop-tmpfs {bb:.0} ratio {:.2}",
            ma / mb,
            ba / bb
        );
    }
    println!(
        "VMBENCH config {} MiB device, {ROUNDS} alternating rounds of {SEQ_PASSES} sequential pass + {RAND_OPS} random reads, daemon threads {threads}, O_DIRECT, queue depth 1, TCG guest",
        SIZE >> 20
    );
    Ok(())
}
