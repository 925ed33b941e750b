//! dm-user (RAM daemon) vs loop-over-tmpfs read benchmark, O_DIRECT, queue depth 1.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::harness::*;
use crate::ramd::{Daemon, RamDisk};

const SIZE: u64 = 64 << 20;
const SEQ_PASSES: u64 = 2;
const RAND_OPS: u64 = 4_000;

/// Measured figures for one device.
struct Figures {
    seq_mbps: f64,
    rand_iops: f64,
}

fn open_direct(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .ctx(&format!("open {}", path.display()))
}

fn measure(path: &Path) -> Result<Figures, String> {
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
struct LoopDevice {
    file: File,
    path: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path) -> Result<Self, String> {
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
    let dmu = measure(&dev.path);
    dev.remove()?;
    d.join()?;
    let dmu = dmu?;
    // loop over a tmpfs file of the same size.
    let img = Path::new("/tmp/bench.img");
    std::fs::write(img, &data).ctx("write tmpfs image")?;
    drop(data);
    let lp = LoopDevice::attach(img).and_then(|l| measure(&l.path));
    let _ = std::fs::remove_file(img);
    let lp = lp?;
    println!(
        "VMBENCH seq-1MiB-read dm-user {:.0} MB/s loop-tmpfs {:.0} MB/s ratio {:.2}",
        dmu.seq_mbps,
        lp.seq_mbps,
        dmu.seq_mbps / lp.seq_mbps
    );
    println!(
        "VMBENCH rand-4KiB-read dm-user {:.0} IOPS loop-tmpfs {:.0} IOPS ratio {:.2}",
        dmu.rand_iops,
        lp.rand_iops,
        dmu.rand_iops / lp.rand_iops
    );
    println!(
        "VMBENCH config {} MiB device, {SEQ_PASSES} sequential passes, {RAND_OPS} random reads, daemon threads {threads}, O_DIRECT, queue depth 1, TCG guest",
        SIZE >> 20
    );
    Ok(())
}
