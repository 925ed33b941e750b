//! dm-user (RAM daemon) vs loop-over-tmpfs read benchmark, O_DIRECT.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use crate::harness::*;
use crate::ramd::{Daemon, RamDisk};

const SIZE: u64 = 128 << 20;
const SEQ_PASSES: u64 = 3;
const RAND_OPS: u64 = 20_000;

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
    // Warm-up pass.
    f.read_exact_at(buf.as_mut(), 0).ctx("warm-up")?;
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

fn loop_device(img: &Path) -> Result<String, String> {
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(img)
        .output()
        .ctx("run losetup")?;
    check(
        out.status.success(),
        format!("losetup: {}", String::from_utf8_lossy(&out.stderr)),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Run the benchmark and print VMBENCH lines.
pub fn run(threads: usize) -> Result<(), String> {
    // dm-user over the RAM daemon.
    let disk = RamDisk::new(SIZE as usize);
    disk.data
        .lock()
        .map_err(|_| "poisoned")?
        .copy_from_slice(&pattern(1, 0, SIZE as usize));
    let mut dev = UserDevice::create("vt-bench", "vt-bench-c", SIZE)?;
    let d = Daemon::start(&dev.control, disk, threads).ctx("daemon")?;
    let dmu = measure(&dev.path)?;
    dev.remove()?;
    d.join()?;
    // loop over a tmpfs file of the same size.
    let img = Path::new("/tmp/bench.img");
    std::fs::write(img, pattern(1, 0, SIZE as usize)).ctx("write tmpfs image")?;
    let loopdev = loop_device(img)?;
    let lp = measure(Path::new(&loopdev));
    let _ = std::process::Command::new("losetup")
        .args(["-d", &loopdev])
        .status();
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
        "VMBENCH config size {} MiB, daemon threads {threads}, O_DIRECT, queue depth 1",
        SIZE >> 20
    );
    Ok(())
}
