//! The dm-user test cases run inside the guest. Each returns Ok(detail) or Err(reason).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dm_ioctl::{DmControl, SnapshotStatus, TableEntry};
use snapuserd::dm_user::{
    Channel, ChannelError, MessageHeader, Readiness, Received, DM_USER_REQ_MAP_READ,
    DM_USER_RESP_ERROR, DM_USER_RESP_SUCCESS, HEADER_SIZE,
};

use crate::harness::*;
use crate::ramd::{Daemon, RamDisk};

pub(crate) const MIB: u64 = 1 << 20;
const EIO: i32 = nix::libc::EIO;
pub(crate) const HANG: Duration = Duration::from_secs(15);

/// One test case.
pub struct Case {
    /// Name printed in the VMTEST line.
    pub name: &'static str,
    /// Body.
    pub run: fn() -> TestResult,
}

/// Every test, in run order (rmmod last).
pub const CASES: &[Case] = &[
    Case {
        name: "dm-control",
        run: dm_control,
    },
    Case {
        name: "rw-basic",
        run: rw_basic,
    },
    Case {
        name: "unaligned-large",
        run: unaligned_large,
    },
    Case {
        name: "odirect-sizes",
        run: odirect_sizes,
    },
    Case {
        name: "fsync-flush",
        run: fsync_flush,
    },
    Case {
        name: "discard",
        run: discard,
    },
    Case {
        name: "ext4-fs",
        run: ext4_fs,
    },
    Case {
        name: "multi-channel-threads",
        run: multi_channel_threads,
    },
    Case {
        name: "out-of-order",
        run: out_of_order,
    },
    Case {
        name: "daemon-killed",
        run: daemon_killed,
    },
    Case {
        name: "daemon-killed-busy",
        run: daemon_killed_busy,
    },
    Case {
        name: "no-daemon-timeout",
        run: no_daemon_timeout,
    },
    Case {
        name: "late-daemon",
        run: late_daemon,
    },
    Case {
        name: "multi-target",
        run: multi_target,
    },
    Case {
        name: "read-framing",
        run: read_framing,
    },
    Case {
        name: "malformed-short-header",
        run: malformed_short_header,
    },
    Case {
        name: "malformed-unknown-seq",
        run: malformed_unknown_seq,
    },
    Case {
        name: "malformed-resp-code",
        run: malformed_resp_code,
    },
    Case {
        name: "malformed-payload-len",
        run: malformed_payload_len,
    },
    Case {
        name: "teardown-during-read",
        run: teardown_during_read,
    },
    Case {
        name: "signal-read",
        run: signal_read,
    },
    Case {
        name: "many-channels-race",
        run: many_channels_race,
    },
    Case {
        name: "many-devices",
        run: many_devices,
    },
    Case {
        name: "poll",
        run: poll,
    },
    Case {
        name: "nonblocking",
        run: nonblocking,
    },
    Case {
        name: "handoff",
        run: handoff,
    },
    Case {
        name: "snapshot-merge-stack",
        run: snapshot_merge_stack,
    },
    Case {
        name: "status-info-table",
        run: crate::target_cases::status_lines,
    },
    Case {
        name: "table-args",
        run: crate::target_cases::table_args,
    },
    Case {
        name: "suspend-silent-daemon",
        run: crate::target_cases::suspend_silent,
    },
    Case {
        name: "suspend-cancelled",
        run: crate::target_cases::suspend_cancelled,
    },
    Case {
        name: "unsupported-notsupp",
        run: crate::target_cases::unsupported_notsupp,
    },
    Case {
        name: "exclusive-wake",
        run: crate::target_cases::exclusive_wake,
    },
    Case {
        name: "ublk-read-usercopy",
        run: crate::ublk_cases::read_usercopy,
    },
    Case {
        name: "ublk-read-buffer",
        run: crate::ublk_cases::read_buffer,
    },
    Case {
        name: "ublk-ext4",
        run: crate::ublk_cases::ext4,
    },
    Case {
        name: "ublk-queue-affinity",
        run: crate::ublk_cases::queue_affinity,
    },
    Case {
        name: "ublk-kill-recover",
        run: crate::ublk_cases::kill_recover,
    },
    Case {
        name: "ublk-recover-stopped-server",
        run: crate::ublk_cases::recover_stopped_server,
    },
    Case {
        name: "ublk-snapshot-kill-merge",
        run: crate::ublk_snapshot::kill_merge,
    },
    Case {
        name: "ublk-daemon-kill-merge",
        run: crate::ublk_snapshot::daemon_kill_merge,
    },
    Case {
        name: "ublk-daemon-linear-handoff",
        run: crate::ublk_snapshot::daemon_linear_handoff,
    },
    Case {
        name: "ublk-daemon-fd-num",
        run: crate::ublk_snapshot::daemon_fd_num,
    },
    Case {
        name: "ublk-init-transition",
        run: crate::ublk_init_transition::init_transition,
    },
    Case {
        name: "ublk-init-transition-merging",
        run: crate::ublk_init_transition::init_transition_merging,
    },
    Case {
        name: "rmmod",
        run: rmmod,
    },
];

/// Prefix of the cases that need ublk (not run on kernels without `ublk_drv`).
pub const UBLK_PREFIX: &str = "ublk-";

fn dev_with_daemon(tag: &str, size: u64, threads: usize) -> Result<(UserDevice, Daemon), String> {
    let dev = UserDevice::create(&format!("vt-{tag}"), &format!("vt-{tag}-c"), size)?;
    let d = Daemon::start(&dev.control, RamDisk::new(size as usize), threads)
        .ctx("start RAM daemon")?;
    Ok((dev, d))
}

fn finish(mut dev: UserDevice, d: Daemon) -> Result<(), String> {
    dev.remove()?;
    bounded("daemon exit after remove", HANG, move || d.join())?
}

/// The DM control library on stock targets (no dm-user needed).
fn dm_control() -> TestResult {
    let dm = DmControl::open().ctx("open control")?;
    let v = dm.version().ctx("DM_VERSION")?;
    check(v[0] == 4, format!("DM interface major {}", v[0]))?;
    dm.create("vt-ctl", None).ctx("create")?;
    dm.load_table(
        "vt-ctl",
        &[
            TableEntry::new(0, 2048, "error", ""),
            TableEntry::new(2048, 2048, "error", ""),
        ],
    )
    .ctx("load")?;
    let info = dm.info("vt-ctl").ctx("status")?;
    check(
        info.has_inactive_table(),
        "inactive table not reported after load",
    )?;
    let info = dm.resume("vt-ctl").ctx("resume")?;
    let table = dm.table("vt-ctl").ctx("table")?;
    check(
        table.len() == 2 && table[0].target_type == "error" && table[1].start == 2048,
        format!("table {table:?}"),
    )?;
    let status = dm.status("vt-ctl").ctx("status lines")?;
    check(status.len() == 2, format!("status {status:?}"))?;
    let s = dm.suspend("vt-ctl", false).ctx("suspend")?;
    check(s.suspended(), "not suspended after suspend")?;
    let r = dm.resume("vt-ctl").ctx("resume again")?;
    check(!r.suspended(), "still suspended after resume")?;
    // DM_DEV_WAIT with a stale event number returns at once with the current one.
    let w = bounded("DM_DEV_WAIT", HANG, move || {
        DmControl::open().and_then(|dm| dm.wait_event("vt-ctl", r.event_nr.wrapping_add(1)))
    })?
    .ctx("DM_DEV_WAIT")?;
    check(
        w.name == "vt-ctl",
        format!("DM_DEV_WAIT answered for {:?}", w.name),
    )?;
    let path = dm.ensure_node(&info).ctx("node")?;
    let f = std::fs::File::open(&path).ctx("open dm node")?;
    let r = read_at(&f, 4096, 0);
    check(
        r.as_ref().is_err_and(|e| e.contains("Input/output error")),
        format!("read of error target: {r:?}"),
    )?;
    drop(f);
    dm.remove("vt-ctl").ctx("remove")?;
    check(
        dm.info("vt-ctl").is_err(),
        "device still present after remove",
    )?;
    // A table whose status reply exceeds the initial 16 KiB buffer: exercises
    // the DM_BUFFER_FULL_FLAG retry with a larger buffer.
    let many: Vec<TableEntry> = (0..1000u64)
        .map(|i| TableEntry::new(i * 8, 8, "error", ""))
        .collect();
    dm.create_device("vt-ctl-big", &many)
        .ctx("create 1000-target device")?;
    let big = dm.table("vt-ctl-big").ctx("table of 1000 targets");
    let big_status = dm.status("vt-ctl-big").ctx("status of 1000 targets");
    dm.remove("vt-ctl-big").ctx("remove 1000-target device")?;
    let (big, big_status) = (big?, big_status?);
    check(
        big.len() == 1000
            && big_status.len() == 1000
            && big.iter().enumerate().all(|(i, t)| t.start == i as u64 * 8),
        format!(
            "1000-target table read back as {} entries ({} status)",
            big.len(),
            big_status.len()
        ),
    )?;
    Ok(format!(
        "DM v{}.{}.{}, dev {}:{}, 1000-target table read back",
        v[0], v[1], v[2], info.major, info.minor
    ))
}

fn rw_basic() -> TestResult {
    let size = 16 * MIB;
    let (dev, d) = dev_with_daemon("rw", size, 1)?;
    let f = dev.open(true)?;
    let mut n = 0;
    for i in 0..64u64 {
        let off = i * 256 * 1024 + (i % 4) * 4096;
        let len = 4096 * (1 + (i as usize % 16));
        write_at(&f, AlignedBuf::from(&pattern(1, off, len)).as_ref(), off)?;
        n += 1;
    }
    for i in 0..64u64 {
        let off = i * 256 * 1024 + (i % 4) * 4096;
        let len = 4096 * (1 + (i as usize % 16));
        let want = pattern(1, off, len);
        same(
            &format!("device read at {off}"),
            &read_at(&f, len, off)?,
            &want,
        )?;
        same(
            &format!("daemon RAM at {off}"),
            &d.disk.snapshot(off as usize, len),
            &want,
        )?;
    }
    let reads = d.disk.stats.reads.load(Ordering::Relaxed);
    let writes = d.disk.stats.writes.load(Ordering::Relaxed);
    check(
        reads >= 64 && writes >= 64,
        format!("daemon saw {reads} reads / {writes} writes"),
    )?;
    drop(f);
    finish(dev, d)?;
    Ok(format!(
        "{n} writes verified, daemon saw {reads} reads {writes} writes"
    ))
}

fn unaligned_large() -> TestResult {
    let size = 32 * MIB;
    let (dev, d) = dev_with_daemon("ual", size, 2)?;
    // Buffered, unaligned: the page cache does read-modify-write through the daemon.
    let f = dev.open(false)?;
    let cases: &[(u64, usize)] = &[
        (1, 1),
        (511, 2),
        (1000, 5000),
        (4095, 4098),
        (MIB - 3, 70_000),
        (7 * MIB + 123, 1_000_001),
    ];
    for &(off, len) in cases {
        write_at(&f, &pattern(2, off, len), off)?;
    }
    f.sync_all().ctx("fsync")?;
    drop(f);
    let f = dev.open(true)?;
    for &(off, len) in cases {
        let start = off & !4095;
        let end = (off + len as u64).div_ceil(4096) * 4096;
        let got = read_at(&f, (end - start) as usize, start)?;
        let inner = &got[(off - start) as usize..(off - start) as usize + len];
        same(
            &format!("unaligned {len}@{off}"),
            inner,
            &pattern(2, off, len),
        )?;
    }
    // Large direct I/O: 8 MiB in one call each way.
    let big = pattern(3, 16 * MIB, 8 * MIB as usize);
    write_at(&f, AlignedBuf::from(&big).as_ref(), 16 * MIB)?;
    same(
        "8 MiB direct read",
        &read_at(&f, 8 * MIB as usize, 16 * MIB)?,
        &big,
    )?;
    same(
        "8 MiB in daemon RAM",
        &d.disk.snapshot(16 * MIB as usize, 8 * MIB as usize),
        &big,
    )?;
    let max = d.disk.stats.max_len.load(Ordering::Relaxed);
    drop(f);
    finish(dev, d)?;
    Ok(format!(
        "{} unaligned ranges + 8 MiB direct verified, largest request {max} bytes",
        cases.len()
    ))
}

fn odirect_sizes() -> TestResult {
    let size = 8 * MIB;
    let (dev, d) = dev_with_daemon("dio", size, 1)?;
    let f = dev.open(true)?;
    let before = d.disk.stats.writes.load(Ordering::Relaxed);
    let mut off = 0u64;
    for len in [512usize, 1024, 4096, 12288, 65536, 131072, 1 << 20] {
        let data = pattern(4, off, len);
        write_at(&f, AlignedBuf::from(&data).as_ref(), off)?;
        // O_DIRECT: the data must be in the daemon before the write returns, no fsync needed.
        same(
            &format!("daemon RAM after direct write {len}@{off}"),
            &d.disk.snapshot(off as usize, len),
            &data,
        )?;
        same(
            &format!("direct read {len}@{off}"),
            &read_at(&f, len, off)?,
            &data,
        )?;
        off += len as u64 + 512;
    }
    let after = d.disk.stats.writes.load(Ordering::Relaxed);
    drop(f);
    finish(dev, d)?;
    Ok(format!(
        "7 sizes 512 B..1 MiB, {} write requests",
        after - before
    ))
}

fn fsync_flush() -> TestResult {
    let size = 4 * MIB;
    let (dev, d) = dev_with_daemon("fl", size, 1)?;
    let f = dev.open(false)?;
    write_at(&f, &pattern(5, 8192, 4096), 8192)?;
    let flushes_before = d.disk.stats.flushes.load(Ordering::Relaxed);
    f.sync_all().ctx("fsync")?;
    let flushes = d.disk.stats.flushes.load(Ordering::Relaxed) - flushes_before;
    same(
        "data in daemon after fsync",
        &d.disk.snapshot(8192, 4096),
        &pattern(5, 8192, 4096),
    )?;
    check(flushes >= 1, "fsync did not reach the daemon as a flush")?;
    drop(f);
    finish(dev, d)?;
    Ok(format!("fsync produced {flushes} flush request(s)"))
}

fn discard() -> TestResult {
    let size = 8 * MIB;
    let (dev, d) = dev_with_daemon("dis", size, 1)?;
    let f = dev.open(true)?;
    write_at(
        &f,
        AlignedBuf::from(&pattern(6, 0, 4 * MIB as usize)).as_ref(),
        0,
    )?;
    let range: [u64; 2] = [MIB, MIB];
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, which
    // points at a live local array of exactly that type; the fd is open.
    unsafe { blkdiscard(std::os::fd::AsRawFd::as_raw_fd(&f), &range) }.map_err(|e| {
        let limit = std::fs::read_to_string(format!(
            "/sys/block/{}/queue/discard_max_bytes",
            dev.path.file_name().and_then(|n| n.to_str()).unwrap_or("?")
        ))
        .unwrap_or_default();
        format!(
            "BLKDISCARD: {e} (queue/discard_max_bytes = {}: the target does not advertise discard limits)",
            limit.trim()
        )
    })?;
    let n = d.disk.stats.discards.load(Ordering::Relaxed);
    let bytes = d.disk.stats.discarded_bytes.load(Ordering::Relaxed);
    check(n >= 1, "no DISCARD request reached the daemon")?;
    check(
        bytes == MIB,
        format!("daemon saw {bytes} discarded bytes, expected {MIB}"),
    )?;
    let got = read_at(&f, MIB as usize, MIB)?;
    check(
        got.iter().all(|&b| b == 0),
        "discarded range does not read back as zeroes",
    )?;
    same(
        "data before discarded range",
        &read_at(&f, MIB as usize, 0)?,
        &pattern(6, 0, MIB as usize),
    )?;
    drop(f);
    finish(dev, d)?;
    Ok(format!("{n} discard request(s), {bytes} bytes"))
}

pub(crate) fn sh(cmd: &str) -> Result<(), String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().ctx(cmd)?;
    check(
        out.status.success(),
        format!(
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A real file system on dm-user: mke2fs, mount with the ext4 driver, write
/// and fsync files, remount, verify. Exercises the flag mix a file system sends.
fn ext4_fs() -> TestResult {
    let size = 32 * MIB;
    let (dev, d) = dev_with_daemon("fs", size, 2)?;
    let node = dev.path.display().to_string();
    let mnt = "/tmp/vt-fs";
    std::fs::create_dir_all(mnt).ctx("mkdir mount point")?;
    let result: Result<usize, String> = (|| {
        sh(&format!(
            "mke2fs -q {node} >/dev/null 2>&1 || mke2fs {node}"
        ))?;
        sh(&format!("mount -t ext4 {node} {mnt}"))?;
        let files: Vec<(String, Vec<u8>)> = (0..40u64)
            .map(|i| {
                (
                    format!("{mnt}/f{i}"),
                    pattern(30 + i, i * 977, (i as usize * 7919) % 300_000 + 1),
                )
            })
            .collect();
        for (path, data) in &files {
            let mut f = std::fs::File::create(path).ctx(path)?;
            f.write_all(data).ctx(path)?;
            f.sync_all().ctx(path)?;
        }
        sh(&format!("umount {mnt}"))?;
        sh(&format!("mount -t ext4 {node} {mnt}"))?;
        for (path, data) in &files {
            same(path, &std::fs::read(path).ctx(path)?, data)?;
        }
        sh(&format!("umount {mnt}"))?;
        Ok(files.len())
    })();
    if result.is_err() {
        let _ = sh(&format!("umount {mnt}"));
    }
    let n = result?;
    let flags = d.disk.stats.flags_seen.load(Ordering::Relaxed);
    let flushes = d.disk.stats.flushes.load(Ordering::Relaxed);
    finish(dev, d)?;
    check(
        flushes >= n as u64,
        format!("{flushes} flushes for {n} fsync'ed files"),
    )?;
    check(
        flags & !0x7ffff == 0,
        format!("flag bits outside the stable encoding: {flags:#x}"),
    )?;
    Ok(format!("{n} files written, fsync'ed, remounted and verified; {flushes} flushes; flags seen {flags:#x}"))
}

fn multi_channel_threads() -> TestResult {
    let size = 32 * MIB;
    let (dev, d) = dev_with_daemon("mc", size, 4)?;
    let path = dev.path.clone();
    let mut workers = Vec::new();
    for t in 0..4u64 {
        let path = path.clone();
        workers.push(std::thread::spawn(move || -> Result<u64, String> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags_direct()
                .open(&path)
                .ctx("open")?;
            let mut ops = 0;
            for i in 0..64u64 {
                let off = t * 8 * MIB + i * 128 * 1024;
                let data = pattern(7 + t, off, 65536);
                write_at(&f, AlignedBuf::from(&data).as_ref(), off)?;
                same(
                    &format!("thread {t} op {i}"),
                    &read_at(&f, 65536, off)?,
                    &data,
                )?;
                ops += 2;
            }
            Ok(ops)
        }));
    }
    let mut ops = 0;
    for w in workers {
        ops += bounded("worker", Duration::from_secs(120), move || w.join())?
            .map_err(|_| "worker panicked".to_string())??;
    }
    finish(dev, d)?;
    Ok(format!("4 channels, 4 I/O threads, {ops} verified ops"))
}

trait DirectExt {
    fn custom_flags_direct(&mut self) -> &mut Self;
}
impl DirectExt for std::fs::OpenOptions {
    fn custom_flags_direct(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, nix::libc::O_DIRECT)
    }
}

/// Spawn a thread doing one O_DIRECT read of `len` at `off`; returns a receiver of the outcome.
pub(crate) fn async_read(
    path: &std::path::Path,
    off: u64,
    len: usize,
) -> std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let r = (|| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags_direct()
                .open(&path)?;
            let mut b = AlignedBuf::new(len);
            std::os::unix::fs::FileExt::read_exact_at(&f, b.as_mut(), off)?;
            Ok(b.as_ref().to_vec())
        })();
        let _ = tx.send(r);
    });
    rx
}

pub(crate) fn await_read(
    what: &str,
    rx: &std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
) -> Result<std::io::Result<Vec<u8>>, String> {
    rx.recv_timeout(HANG)
        .map_err(|_| format!("{what}: read did not complete within {HANG:?}"))
}

pub(crate) fn expect_eio(what: &str, r: std::io::Result<Vec<u8>>) -> Result<(), String> {
    match r {
        Ok(_) => Err(format!("{what}: read succeeded, expected EIO")),
        Err(e) if errno_of(&e) == EIO => Ok(()),
        Err(e) => Err(format!("{what}: expected EIO, got {e}")),
    }
}

fn receive_bounded(chan: Channel, what: &str) -> Result<(Channel, MessageHeader), String> {
    let what = what.to_string();
    bounded(&what.clone(), HANG, move || {
        let mut chan = chan;
        let mut payload = Vec::new();
        let r = chan.receive(&mut payload);
        (chan, r)
    })
    .and_then(|(chan, r)| match r {
        Ok(Received::Request(h)) => Ok((chan, h)),
        other => Err(format!("{what}: expected a request, got {other:?}")),
    })
}

fn answer_read(chan: &mut Channel, h: &MessageHeader, seed: u64) -> Result<(), String> {
    let data = pattern(seed, h.sector * 512, h.len as usize);
    chan.respond(h, DM_USER_RESP_SUCCESS, &data).ctx("respond")
}

fn out_of_order() -> TestResult {
    let dev = UserDevice::create("vt-ooo", "vt-ooo-c", 4 * MIB)?;
    let chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open channel")?;
    let n = 6u64;
    let rxs: Vec<_> = (0..n)
        .map(|i| (i, async_read(&dev.path, i * 256 * 1024, 4096)))
        .collect();
    let mut chan = chan;
    let mut pending = Vec::new();
    for i in 0..n {
        let (c, h) = receive_bounded(chan, &format!("request {i}"))?;
        chan = c;
        check(
            h.msg_type == DM_USER_REQ_MAP_READ,
            format!("request type {}", h.msg_type),
        )?;
        pending.push(h);
    }
    let seqs: Vec<u64> = pending.iter().map(|h| h.seq).collect();
    for h in pending.iter().rev() {
        answer_read(&mut chan, h, 11)?;
    }
    for (i, rx) in rxs {
        let got = await_read(&format!("reader {i}"), &rx)?.ctx(&format!("reader {i}"))?;
        same(
            &format!("reader {i}"),
            &got,
            &pattern(11, i * 256 * 1024, 4096),
        )?;
    }
    // Two channels: a request held by A does not block B.
    let chan_b = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open channel B")?;
    let r1 = async_read(&dev.path, 0, 4096);
    let (mut chan_a, h1) = receive_bounded(chan, "A takes request 1")?;
    let r2 = async_read(&dev.path, MIB, 4096);
    let (mut chan_b, h2) = receive_bounded(chan_b, "B takes request 2")?;
    answer_read(&mut chan_b, &h2, 12)?;
    same(
        "B's reader",
        &await_read("B's reader", &r2)?.ctx("B's reader")?,
        &pattern(12, MIB, 4096),
    )?;
    check(
        r1.try_recv().is_err(),
        "A's reader finished before A answered",
    )?;
    answer_read(&mut chan_a, &h1, 12)?;
    same(
        "A's reader",
        &await_read("A's reader", &r1)?.ctx("A's reader")?,
        &pattern(12, 0, 4096),
    )?;
    drop((chan_a, chan_b));
    drop(dev);
    Ok(format!(
        "{n} requests answered in reverse order (seqs {seqs:?}); A/B channels independent"
    ))
}

fn spawn_self(args: &[&str]) -> Result<std::process::Child, String> {
    Command::new("/proc/self/exe")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .ctx("spawn helper process")
}

fn wait_line(child: &mut std::process::Child, want: &str) -> Result<(), String> {
    let out = child.stdout.take().ok_or("helper has no stdout")?;
    let want = want.to_string();
    bounded(&format!("helper says {want}"), HANG, move || {
        let mut lines = BufReader::new(out).lines();
        lines.any(|l| l.map(|l| l.trim() == want).unwrap_or(false))
    })
    .and_then(|ok| check(ok, "helper exited before reporting"))
}

fn kill(child: &mut std::process::Child) -> Result<(), String> {
    child.kill().ctx("kill -9 helper")?;
    let pid = child.id();
    let mut c = std::mem::replace(child, Command::new("/bin/true").spawn().ctx("spawn true")?);
    bounded(&format!("reap helper {pid}"), HANG, move || {
        c.wait().map(|_| ())
    })?
    .ctx("wait")
}

fn daemon_killed() -> TestResult {
    let dev = UserDevice::create("vt-kill", "vt-kill-c", 4 * MIB)?;
    let mut child = spawn_self(&["helper-hang", &dev.control])?;
    let rx = async_read(&dev.path, 0, 4096);
    wait_line(&mut child, "GOT")?;
    check(
        rx.try_recv().is_err(),
        "read finished although the daemon never answered",
    )?;
    let t = Instant::now();
    kill(&mut child)?;
    expect_eio(
        "in-flight read after kill",
        await_read("in-flight read", &rx)?,
    )?;
    let first = t.elapsed();
    let t2 = Instant::now();
    let rx2 = async_read(&dev.path, 4096, 4096);
    expect_eio(
        "new read with no daemon left",
        await_read("new read", &rx2)?,
    )?;
    let second = t2.elapsed();
    // A daemon that opens the node later serves new I/O again.
    let d = Daemon::start(&dev.control, RamDisk::new(4 * MIB as usize), 1).ctx("restart daemon")?;
    let rx3 = async_read(&dev.path, 8192, 4096);
    let got = await_read("read after a new daemon attached", &rx3)?.ctx("read after restart")?;
    check(
        got.iter().all(|&b| b == 0),
        "restarted RAM daemon returned non-zero data",
    )?;
    finish(dev, d)?;
    Ok(format!(
        "in-flight read failed EIO {first:.0?} after kill; new read failed EIO in {second:.0?}; a new daemon served again"
    ))
}

fn daemon_killed_busy() -> TestResult {
    let dev = UserDevice::create("vt-killb", "vt-killb-c", 16 * MIB)?;
    let mut child = spawn_self(&["helper-ram", &dev.control, &(16 * MIB).to_string(), "4"])?;
    wait_line(&mut child, "READY")?;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let eio = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for t in 0..4u64 {
        let (path, stop, ok, eio) = (dev.path.clone(), stop.clone(), ok.clone(), eio.clone());
        workers.push(std::thread::spawn(move || -> Result<(), String> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags_direct()
                .open(&path)
                .ctx("open")?;
            let buf = AlignedBuf::from(&pattern(t, 0, 65536));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = t * 4 * MIB + (i % 32) * 65536;
                match std::os::unix::fs::FileExt::write_all_at(&f, buf.as_ref(), off) {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) if errno_of(&e) == EIO => eio.fetch_add(1, Ordering::Relaxed),
                    Err(e) => return Err(format!("unexpected error {e}")),
                };
                i += 1;
            }
            Ok(())
        }));
    }
    let t0 = Instant::now();
    while ok.load(Ordering::Relaxed) < 200 && t0.elapsed() < HANG {
        std::thread::sleep(Duration::from_millis(10));
    }
    check(
        ok.load(Ordering::Relaxed) >= 200,
        "I/O did not get going before the kill",
    )?;
    kill(&mut child)?;
    let t1 = Instant::now();
    while eio.load(Ordering::Relaxed) < 8 && t1.elapsed() < HANG {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        bounded("I/O worker after kill", HANG, move || w.join())?
            .map_err(|_| "worker panicked".to_string())??;
    }
    let (ok, eio) = (ok.load(Ordering::Relaxed), eio.load(Ordering::Relaxed));
    check(eio >= 8, format!("only {eio} EIO after the daemon died"))?;
    drop(dev);
    Ok(format!(
        "{ok} writes OK before kill, {eio} EIO after, all workers returned"
    ))
}

fn no_daemon_timeout() -> TestResult {
    let old = set_param("dm_user_daemon_timeout_msec", "500")?;
    let result = (|| {
        let dev = UserDevice::create("vt-nod", "vt-nod-c", 4 * MIB)?;
        let t = Instant::now();
        let rx = async_read(&dev.path, 0, 4096);
        expect_eio(
            "read with no daemon",
            await_read("read with no daemon", &rx)?,
        )?;
        let took = t.elapsed();
        check(
            took >= Duration::from_millis(400),
            format!("failed after {took:?}, before the 500 ms timeout"),
        )?;
        drop(dev);
        Ok(format!("EIO after {took:.0?} (timeout 500 ms)"))
    })();
    set_param("dm_user_daemon_timeout_msec", &old)?;
    result
}

/// I/O issued before any daemon exists waits for one (within the timeout) instead of failing.
fn late_daemon() -> TestResult {
    // Generous, so a loaded host cannot make the queued read time out first.
    let old = set_param("dm_user_daemon_timeout_msec", "10000")?;
    let result = (|| {
        let dev = UserDevice::create("vt-late", "vt-late-c", 4 * MIB)?;
        let rx = async_read(&dev.path, 4096, 4096);
        std::thread::sleep(Duration::from_millis(300));
        check(
            rx.try_recv().is_err(),
            "read completed with no daemon attached",
        )?;
        let disk = RamDisk::new(4 * MIB as usize);
        disk.data
            .write()
            .unwrap()
            .copy_from_slice(&pattern(23, 0, 4 * MIB as usize));
        let d = Daemon::start(&dev.control, disk, 1).ctx("late daemon")?;
        let got = await_read("queued read", &rx)?.ctx("queued read")?;
        same(
            "queued read served by the late daemon",
            &got,
            &pattern(23, 4096, 4096),
        )?;
        finish(dev, d)?;
        Ok("read queued 300 ms without a daemon, then served".to_string())
    })();
    set_param("dm_user_daemon_timeout_msec", &old)?;
    result
}

/// Two `user` targets in one table, each with its own daemon: DM splits a bio
/// that crosses the boundary and each half reaches the right daemon.
fn multi_target() -> TestResult {
    let half = 4 * MIB;
    let dm = DmControl::open().ctx("control")?;
    let name = "vt-mt";
    dm.create(name, None).ctx("create")?;
    let mut dev_guard = None;
    let result = (|| {
        dm.load_table(
            name,
            &[
                TableEntry::dm_user(0, half / 512, "vt-mt-c1"),
                TableEntry::new(
                    half / 512,
                    half / 512,
                    "user",
                    &format!("{} {} vt-mt-c2", half / 512, half / 512),
                ),
            ],
        )
        .ctx("load two-target table")?;
        let info = dm.resume(name).ctx("resume")?;
        let path = dm.ensure_node(&info).ctx("node")?;
        dev_guard = Some(path.clone());
        // Stores cover the whole device so either sector convention can be served and detected.
        let d1 = Daemon::start("vt-mt-c1", RamDisk::new(2 * half as usize), 1).ctx("daemon 1")?;
        let d2 = Daemon::start("vt-mt-c2", RamDisk::new(2 * half as usize), 1).ctx("daemon 2")?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_direct()
            .open(&path)
            .ctx("open")?;
        let off = half - 65536;
        let data = pattern(24, off, 131072);
        write_at(&f, AlignedBuf::from(&data).as_ref(), off)?;
        same(
            "read across the boundary",
            &read_at(&f, 131072, off)?,
            &data,
        )?;
        same(
            "first half in daemon 1",
            &d1.disk.snapshot(off as usize, 65536),
            &data[..65536],
        )?;
        let relative = d2.disk.snapshot(0, 65536) == data[65536..];
        let absolute = d2.disk.snapshot(half as usize, 65536) == data[65536..];
        check(
            relative || absolute,
            "second half of the write is not in daemon 2",
        )?;
        drop(f);
        dm.remove(name).ctx("remove")?;
        dev_guard = None;
        bounded("daemon 1 exit", HANG, move || d1.join())??;
        bounded("daemon 2 exit", HANG, move || d2.join())??;
        Ok(format!(
            "boundary-crossing write split between daemons; sectors are {}",
            if relative {
                "target-relative"
            } else {
                "absolute (device)"
            }
        ))
    })();
    if result.is_err() || dev_guard.is_some() {
        let _ = dm.remove(name);
    }
    result
}

/// ABI framing on the raw fd: one read() returns header bytes or payload bytes,
/// never both; arbitrary short reads keep their position.
fn read_framing() -> TestResult {
    use std::io::Read;
    let dev = UserDevice::create("vt-rf", "vt-rf-c", 4 * MIB)?;
    let chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open")?;
    let data = pattern(28, 65536, 8192);
    let writer = {
        let (path, data) = (dev.path.clone(), data.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags_direct()
                .open(&path)
                .ctx("open")?;
            write_at(&f, AlignedBuf::from(&data).as_ref(), 65536)
        })
    };
    // 1: a big read returns exactly the 40 header bytes, no payload.
    let fd = chan.file().try_clone().ctx("dup channel fd")?;
    let (mut fd, first) = bounded("first read", HANG, move || {
        let mut fd = fd;
        let mut buf = vec![0u8; 4096];
        let r = fd.read(&mut buf).map(|n| buf[..n].to_vec());
        (fd, r)
    })?;
    let first = first.ctx("read header")?;
    check(
        first.len() == HEADER_SIZE,
        format!(
            "first read returned {} bytes, expected exactly the 40-byte header",
            first.len()
        ),
    )?;
    let mut raw = [0u8; HEADER_SIZE];
    raw.copy_from_slice(&first);
    let h = MessageHeader::from_bytes(&raw);
    check(h.len == 8192 && h.sector == 128, format!("header {h:?}"))?;
    let mut chan = chan;
    // 2: the payload in odd-sized short reads.
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 1000];
    while got.len() < 8192 {
        let want = chunk.len().min(8192 - got.len());
        let n = fd.read(&mut chunk[..want]).ctx("read payload")?;
        check(
            n > 0 && n <= want,
            format!("payload read returned {n} of {want}"),
        )?;
        got.extend_from_slice(&chunk[..n]);
    }
    same("payload read in 1000-byte pieces", &got, &data)?;
    chan.respond(&h, DM_USER_RESP_SUCCESS, &[]).ctx("respond")?;
    bounded("writer", HANG, move || writer.join())?
        .map_err(|_| "writer panicked".to_string())??;
    // 3: the next header read in 7-byte pieces.
    let rx = async_read(&dev.path, 0, 4096);
    let mut hdr = Vec::new();
    let mut small = [0u8; 7];
    while hdr.len() < HEADER_SIZE {
        let want = small.len().min(HEADER_SIZE - hdr.len());
        let n = fd.read(&mut small[..want]).ctx("read header piece")?;
        check(n > 0 && n <= want, format!("header piece {n} of {want}"))?;
        hdr.extend_from_slice(&small[..n]);
    }
    raw.copy_from_slice(&hdr);
    let h2 = MessageHeader::from_bytes(&raw);
    check(
        h2.msg_type == DM_USER_REQ_MAP_READ && h2.len == 4096,
        format!("header from pieces {h2:?}"),
    )?;
    answer_read(&mut chan, &h2, 29)?;
    same(
        "read",
        &await_read("read", &rx)?.ctx("read")?,
        &pattern(29, 0, 4096),
    )?;
    drop((fd, chan));
    drop(dev);
    Ok("header-only first read; payload in 1000-byte reads; header in 7-byte reads".into())
}

fn malformed_short_header() -> TestResult {
    let dev = UserDevice::create("vt-msh", "vt-msh-c", 4 * MIB)?;
    let chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open")?;
    let rx = async_read(&dev.path, 0, 4096);
    let (chan, h) = receive_bounded(chan, "request")?;
    let mut f = chan.file();
    let resp = h.response(DM_USER_RESP_SUCCESS).to_bytes();
    let data = pattern(21, 0, 4096);
    // Header split across writes, then the data: the kernel must buffer the partial header.
    f.write_all(&resp[..20])
        .ctx("write first 20 header bytes")?;
    std::thread::sleep(Duration::from_millis(50));
    check(rx.try_recv().is_err(), "read completed on a partial header")?;
    f.write_all(&resp[20..]).ctx("write rest of header")?;
    f.write_all(&data).ctx("write data")?;
    same(
        "read after split header",
        &await_read("split header read", &rx)?.ctx("split header read")?,
        &data,
    )?;
    // A partial header followed by close fails the bio, promptly.
    let rx = async_read(&dev.path, 8192, 4096);
    let (chan2, h2) = receive_bounded(chan, "request 2")?;
    let mut f2 = chan2.file();
    f2.write_all(&h2.response(DM_USER_RESP_SUCCESS).to_bytes()[..13])
        .ctx("write 13 header bytes")?;
    // Keep a second channel open so the device is not "daemon terminated".
    let spare = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open spare")?;
    drop(chan2);
    expect_eio(
        "read whose channel closed mid-header",
        await_read("mid-header close", &rx)?,
    )?;
    drop(spare);
    drop(dev);
    Ok("split header accepted; close mid-header gave EIO".into())
}

fn malformed_unknown_seq() -> TestResult {
    let dev = UserDevice::create("vt-mus", "vt-mus-c", 4 * MIB)?;
    let chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open")?;
    let rx = async_read(&dev.path, 0, 4096);
    let (mut chan, h) = receive_bounded(chan, "request")?;
    let bogus = MessageHeader {
        seq: h.seq.wrapping_add(12345),
        ..h
    };
    match chan.respond(&bogus, DM_USER_RESP_SUCCESS, &[0u8; 4096]) {
        Err(ChannelError::Rejected { .. }) => {}
        other => return Err(format!("unknown seq: expected EINVAL, got {other:?}")),
    }
    let again = chan.respond(&h, DM_USER_RESP_SUCCESS, &pattern(1, 0, 4096));
    let sticky = matches!(again, Err(ChannelError::Rejected { .. }));
    let mut chan_b = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open B")?;
    drop(chan);
    let first = await_read("reader of poisoned channel", &rx)?;
    if !sticky {
        // If the kernel accepted the real answer, it must be correct data.
        match &first {
            Ok(d) => same("answer after bogus seq", d, &pattern(1, 0, 4096))?,
            Err(e) => {
                return Err(format!(
                    "correct answer after bogus seq was accepted but read failed: {e}"
                ))
            }
        }
    } else {
        expect_eio("request of poisoned channel after close", first)?;
    }
    let rx2 = async_read(&dev.path, MIB, 4096);
    let mut payload = Vec::new();
    let h2 = match chan_b.receive(&mut payload).ctx("B receive")? {
        Received::Request(h) => h,
        Received::TargetGone => return Err("target gone".into()),
    };
    answer_read(&mut chan_b, &h2, 13)?;
    same(
        "device still usable",
        &await_read("B read", &rx2)?.ctx("B read")?,
        &pattern(13, MIB, 4096),
    )?;
    drop(chan_b);
    drop(dev);
    Ok(format!(
        "EINVAL on unknown seq (sticky: {sticky}); pending request failed; new channel serves"
    ))
}

fn malformed_resp_code() -> TestResult {
    let dev = UserDevice::create("vt-mrc", "vt-mrc-c", 4 * MIB)?;
    let mut chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open")?;
    for code in [DM_USER_RESP_ERROR, 2, 77, u64::MAX] {
        let rx = async_read(&dev.path, 0, 4096);
        let (c, h) = receive_bounded(chan, "request")?;
        chan = c;
        chan.respond(&h, code, &[])
            .ctx(&format!("respond code {code}"))?;
        expect_eio(
            &format!("response code {code}"),
            await_read("code read", &rx)?,
        )?;
    }
    let rx = async_read(&dev.path, 4096, 4096);
    let (mut chan, h) = receive_bounded(chan, "request after errors")?;
    answer_read(&mut chan, &h, 14)?;
    same(
        "channel usable after error codes",
        &await_read("ok read", &rx)?.ctx("ok read")?,
        &pattern(14, 4096, 4096),
    )?;
    drop(chan);
    drop(dev);
    Ok("codes 1, 2, 77, u64::MAX -> EIO; channel stays usable".into())
}

fn malformed_payload_len() -> TestResult {
    let dev = UserDevice::create("vt-mpl", "vt-mpl-c", 4 * MIB)?;
    let spare = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open spare")?;
    let chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open")?;
    // Too little, then the rest: buffered and completed.
    let rx = async_read(&dev.path, 0, 4096);
    let (chan, h) = receive_bounded(chan, "request")?;
    let data = pattern(15, 0, 4096);
    let mut msg = h.response(DM_USER_RESP_SUCCESS).to_bytes().to_vec();
    msg.extend_from_slice(&data[..1000]);
    chan.file().write_all(&msg).ctx("header + 1000 bytes")?;
    std::thread::sleep(Duration::from_millis(50));
    check(
        rx.try_recv().is_err(),
        "read completed with 1000 of 4096 bytes",
    )?;
    chan.file()
        .write_all(&data[1000..])
        .ctx("rest of the data")?;
    same(
        "short then rest",
        &await_read("short read", &rx)?.ctx("short read")?,
        &data,
    )?;
    // Too little, then close: EIO.
    let rx = async_read(&dev.path, 8192, 4096);
    let (chan, h) = receive_bounded(chan, "request 2")?;
    let mut msg = h.response(DM_USER_RESP_SUCCESS).to_bytes().to_vec();
    msg.extend_from_slice(&[0u8; 100]);
    chan.file().write_all(&msg).ctx("header + 100 bytes")?;
    drop(chan);
    expect_eio(
        "short payload then close",
        await_read("short payload close", &rx)?,
    )?;
    // Too much in one write: must not corrupt the read nor hang.
    let chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open 3")?;
    let rx = async_read(&dev.path, 16384, 4096);
    let (chan, h) = receive_bounded(chan, "request 3")?;
    let data = pattern(16, 16384, 4096);
    let mut msg = h.response(DM_USER_RESP_SUCCESS).to_bytes().to_vec();
    msg.extend_from_slice(&data);
    msg.extend_from_slice(&[0xAB; 4096 + HEADER_SIZE]);
    let wrote = std::io::Write::write(&mut chan.file(), &msg);
    let outcome = await_read("overlong read", &rx)?;
    let detail = match (&wrote, &outcome) {
        (_, Ok(got)) => {
            same("overlong answer", got, &data)?;
            format!("overlong write -> {wrote:?}, read got correct data")
        }
        (_, Err(e)) => format!("overlong write -> {wrote:?}, read failed {e}"),
    };
    drop(chan);
    drop(spare);
    drop(dev);
    Ok(format!("short payload buffered; short+close EIO; {detail}"))
}

fn teardown_during_read() -> TestResult {
    let mut dev = UserDevice::create("vt-td", "vt-td-c", 4 * MIB)?;
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let mut chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut p = Vec::new();
            let _ = tx.send(chan.receive(&mut p));
        });
        waiters.push(rx);
    }
    std::thread::sleep(Duration::from_millis(100));
    for w in &waiters {
        check(w.try_recv().is_err(), "read() returned before teardown")?;
    }
    dev.remove()?;
    for (i, w) in waiters.iter().enumerate() {
        match w.recv_timeout(HANG) {
            Ok(Ok(Received::TargetGone)) => {}
            Ok(other) => return Err(format!("reader {i}: expected ENOTBLK, got {other:?}")),
            Err(_) => {
                return Err(format!(
                    "reader {i} still blocked {HANG:?} after the table was removed"
                ))
            }
        }
    }
    Ok("3 blocked readers got ENOTBLK after DM_DEV_REMOVE".into())
}

extern "C" fn on_usr1(_: nix::libc::c_int) {}

fn signal_read() -> TestResult {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_usr1),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler is an empty extern "C" fn, trivially async-signal-safe.
    unsafe { sigaction(Signal::SIGUSR1, &act) }.ctx("sigaction")?;
    let dev = UserDevice::create("vt-sig", "vt-sig-c", 4 * MIB)?;
    let chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open")?;
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (res_tx, res_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tid_tx.send(nix::sys::pthread::pthread_self());
        let mut chan = chan;
        let mut p = Vec::new();
        let first = chan.receive(&mut p);
        let _ = res_tx.send((chan, first));
    });
    let tid = tid_rx.recv_timeout(HANG).ctx("thread id")?;
    let t = Instant::now();
    let (chan, first) = loop {
        std::thread::sleep(Duration::from_millis(50));
        nix::sys::pthread::pthread_kill(tid, Signal::SIGUSR1).ctx("pthread_kill")?;
        if let Ok(r) = res_rx.recv_timeout(Duration::from_millis(50)) {
            break r;
        }
        check(t.elapsed() < HANG, "read() was not interrupted by SIGUSR1")?;
    };
    check(
        matches!(first, Err(ChannelError::Interrupted)),
        format!("expected EINTR, got {first:?}"),
    )?;
    let rx = async_read(&dev.path, 0, 4096);
    let (mut chan, h) = receive_bounded(chan, "request after EINTR")?;
    answer_read(&mut chan, &h, 17)?;
    same(
        "read after EINTR",
        &await_read("read", &rx)?.ctx("read")?,
        &pattern(17, 0, 4096),
    )?;
    drop(chan);
    drop(dev);
    Ok("read() returned EINTR; channel served the next request".into())
}

fn many_channels_race() -> TestResult {
    let size = 16 * MIB;
    let (mut dev, d) = dev_with_daemon("race", size, 1)?;
    let control = dev.control.clone();
    let served = Arc::new(AtomicU64::new(0));
    let mut churners = Vec::new();
    for _ in 0..12 {
        let (control, disk, served) = (control.clone(), d.disk.clone(), served.clone());
        churners.push(std::thread::spawn(move || -> Result<(), String> {
            loop {
                let mut chan = match Channel::open(&control, Duration::from_millis(1)) {
                    Ok(c) => c,
                    Err(ChannelError::NodeTimeout { .. }) => return Ok(()),
                    Err(ChannelError::Open { source, .. })
                        if source.raw_os_error() == Some(nix::libc::ENODEV)
                            || source.raw_os_error() == Some(nix::libc::ENXIO)
                            || source.raw_os_error() == Some(nix::libc::ENOENT) =>
                    {
                        return Ok(())
                    }
                    Err(e) => return Err(e.to_string()),
                };
                let mut p = Vec::new();
                match chan.receive(&mut p) {
                    Ok(Received::Request(h)) => {
                        match disk.respond_to(&mut chan, &h, &p) {
                            Ok(()) => {}
                            Err(ChannelError::TargetGone) => return Ok(()),
                            Err(e) => return Err(e.to_string()),
                        }
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Received::TargetGone) => return Ok(()),
                    Err(ChannelError::Interrupted) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        }));
    }
    let mut workers = Vec::new();
    for t in 0..4u64 {
        let path = dev.path.clone();
        workers.push(std::thread::spawn(move || -> Result<(), String> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags_direct()
                .open(&path)
                .ctx("open")?;
            for i in 0..100u64 {
                let off = t * 4 * MIB + (i % 64) * 65536;
                let data = pattern(t * 1000 + i, off, 16384);
                write_at(&f, AlignedBuf::from(&data).as_ref(), off)?;
                same("race verify", &read_at(&f, 16384, off)?, &data)?;
            }
            Ok(())
        }));
    }
    for w in workers {
        bounded("I/O worker", Duration::from_secs(120), move || w.join())?
            .map_err(|_| "worker panicked".to_string())??;
    }
    dev.remove()?;
    for c in churners {
        bounded("churning channel thread", HANG, move || c.join())?
            .map_err(|_| "churner panicked".to_string())??;
    }
    bounded("steady daemon", HANG, move || d.join())??;
    Ok(format!(
        "800 verified ops; 12 channels churned open/close serving {} requests",
        served.load(Ordering::Relaxed)
    ))
}

fn many_devices() -> TestResult {
    let mut handles = Vec::new();
    for i in 0..8 {
        handles.push(std::thread::spawn(move || -> Result<(), String> {
            for round in 0..3 {
                let tag = format!("md{i}r{round}");
                let (dev, d) = dev_with_daemon(&tag, 2 * MIB, 1)?;
                let f = dev.open(true)?;
                let data = pattern(i, 0, 8192);
                write_at(&f, AlignedBuf::from(&data).as_ref(), 4096)?;
                same(&tag, &read_at(&f, 8192, 4096)?, &data)?;
                drop(f);
                finish(dev, d)?;
            }
            Ok(())
        }));
    }
    for h in handles {
        bounded("device thread", Duration::from_secs(120), move || h.join())?
            .map_err(|_| "panicked".to_string())??;
    }
    Ok("8 threads x 3 rounds of create/serve/remove".into())
}

fn poll() -> TestResult {
    let mut dev = UserDevice::create("vt-poll", "vt-poll-c", 4 * MIB)?;
    let chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open")?;
    let idle = chan.poll(Duration::from_millis(200)).ctx("poll idle")?;
    check(
        idle == Readiness::TimedOut,
        format!("idle channel polled {idle:?} (no poll support?)"),
    )?;
    let rx = async_read(&dev.path, 0, 4096);
    let ready = chan.poll(HANG).ctx("poll with request")?;
    check(
        ready == Readiness::Readable,
        format!("pending request polled {ready:?}"),
    )?;
    let (mut chan, h) = receive_bounded(chan, "request")?;
    answer_read(&mut chan, &h, 18)?;
    same(
        "read",
        &await_read("read", &rx)?.ctx("read")?,
        &pattern(18, 0, 4096),
    )?;
    dev.remove()?;
    let gone = chan.poll(HANG).ctx("poll after remove")?;
    check(
        gone == Readiness::HangUp,
        format!("removed target polled {gone:?}, expected hang-up"),
    )?;
    drop(chan);
    Ok("idle: timeout; request: POLLIN; removed: POLLHUP".into())
}

/// O_NONBLOCK channel: EAGAIN when idle, poll-driven receive, ENOTBLK after removal.
fn nonblocking() -> TestResult {
    let mut dev = UserDevice::create("vt-nb", "vt-nb-c", 4 * MIB)?;
    let mut chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open")?;
    chan.set_nonblocking(true).ctx("O_NONBLOCK")?;
    let mut p = Vec::new();
    let idle = chan.receive(&mut p);
    check(
        matches!(idle, Err(ChannelError::WouldBlock)),
        format!("idle non-blocking read: {idle:?}"),
    )?;
    let rx = async_read(&dev.path, 12288, 4096);
    let ready = chan.poll(HANG).ctx("poll")?;
    check(
        ready == Readiness::Readable,
        format!("poll with a request pending: {ready:?}"),
    )?;
    let h = match chan.receive(&mut p) {
        Ok(Received::Request(h)) => h,
        other => return Err(format!("non-blocking receive after POLLIN: {other:?}")),
    };
    answer_read(&mut chan, &h, 27)?;
    same(
        "non-blocking served read",
        &await_read("read", &rx)?.ctx("read")?,
        &pattern(27, 12288, 4096),
    )?;
    dev.remove()?;
    let gone = chan.receive(&mut p);
    check(
        matches!(gone, Ok(Received::TargetGone)),
        format!("after removal: {gone:?}"),
    )?;
    Ok("EAGAIN when idle; POLLIN then receive; ENOTBLK after removal".into())
}

fn handoff() -> TestResult {
    let size = 16 * MIB;
    // Two stores with the same contents, so we can tell which daemon served what.
    let contents = pattern(19, 0, size as usize);
    let disk1 = RamDisk::new(size as usize);
    disk1.data.write().unwrap().copy_from_slice(&contents);
    let disk2 = RamDisk::new(size as usize);
    disk2.data.write().unwrap().copy_from_slice(&contents);
    drop(contents);
    let mut dev = UserDevice::create("vt-ho", "vt-ho-c1", size)?;
    let d1 = Daemon::start("vt-ho-c1", disk1.clone(), 2).ctx("daemon 1")?;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (path, stop, reads) = (dev.path.clone(), stop.clone(), reads.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags_direct()
                .open(&path)
                .ctx("open")?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (i * 7919 % (size / 65536)) * 65536;
                same(
                    &format!("handoff read {i} at {off}"),
                    &read_at(&f, 65536, off)?,
                    &pattern(19, off, 65536),
                )?;
                reads.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok(())
        })
    };
    let wait_reads = |n: u64| {
        let t = Instant::now();
        let base = reads.load(Ordering::Relaxed);
        while reads.load(Ordering::Relaxed) < base + n && t.elapsed() < HANG {
            std::thread::sleep(Duration::from_millis(5));
        }
        reads.load(Ordering::Relaxed) - base
    };
    let before = wait_reads(50);
    let dm = DmControl::open().ctx("control")?;
    dm.load_table("vt-ho", &[TableEntry::dm_user(0, size / 512, "vt-ho-c2")])
        .ctx("load inactive table")?;
    let d2 = Daemon::start("vt-ho-c2", disk2.clone(), 2).ctx("daemon 2 on the new node")?;
    let during = wait_reads(20);
    dm.suspend("vt-ho", false).ctx("suspend")?;
    dm.resume("vt-ho").ctx("resume")?;
    bounded("daemon 1 exits (ENOTBLK)", HANG, move || d1.join())??;
    let after = wait_reads(50);
    stop.store(true, Ordering::Relaxed);
    bounded("reader", HANG, move || reader.join())?
        .map_err(|_| "reader panicked".to_string())??;
    check(
        before >= 50 && during >= 20 && after >= 50,
        format!("reads before/during/after: {before}/{during}/{after}"),
    )?;
    let served1 = disk1.stats.reads.load(Ordering::Relaxed);
    let served2 = disk2.stats.reads.load(Ordering::Relaxed);
    check(
        served1 > 0 && served2 > 0,
        format!("daemon 1 served {served1}, daemon 2 served {served2}"),
    )?;
    let table = dm.table("vt-ho").ctx("table")?;
    check(
        table
            .first()
            .is_some_and(|t| t.params.ends_with("vt-ho-c2")),
        format!("live table {table:?}"),
    )?;
    dev.remove()?;
    bounded("daemon 2 exits", HANG, move || d2.join())??;
    Ok(format!(
        "{} verified reads, 0 errors, across c1 -> c2 handoff (daemon 1 served {served1}, daemon 2 {served2})",
        reads.load(Ordering::Relaxed)
    ))
}

/// dm-snapshot (persistent, 4 KiB chunks) with both origin and COW on dm-user
/// RAM devices, then snapshot-merge back into the origin: the stack the
/// snapshot daemon will serve.
fn snapshot_merge_stack() -> TestResult {
    let size = 8 * MIB;
    let base_contents = pattern(25, 0, size as usize);
    let base_disk = RamDisk::new(size as usize);
    base_disk
        .data
        .write()
        .unwrap()
        .copy_from_slice(&base_contents);
    let base = UserDevice::create("vt-sn-base", "vt-sn-base-c", size)?;
    let db = Daemon::start(&base.control, base_disk.clone(), 2).ctx("base daemon")?;
    let cow = UserDevice::create("vt-sn-cow", "vt-sn-cow-c", size)?;
    let dc = Daemon::start(&cow.control, RamDisk::new(size as usize), 2).ctx("cow daemon")?;
    let dm = DmControl::open().ctx("control")?;
    let devno = |name: &str| dm.info(name).map(|i| format!("{}:{}", i.major, i.minor));
    let (bdev, cdev) = (
        devno(&base.name).ctx("base info")?,
        devno(&cow.name).ctx("cow info")?,
    );
    let result = (|| {
        let info = dm
            .create_device(
                "vt-sn",
                &[TableEntry::snapshot(0, size / 512, &bdev, &cdev, 8)],
            )
            .ctx("create snapshot")?;
        let snap = dm.ensure_node(&info).ctx("snapshot node")?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_direct()
            .open(&snap)
            .ctx("open snapshot")?;
        same(
            "snapshot reads the origin",
            &read_at(&f, 65536, MIB)?,
            &base_contents[MIB as usize..MIB as usize + 65536],
        )?;
        let new = pattern(26, 2 * MIB, 65536);
        write_at(&f, AlignedBuf::from(&new).as_ref(), 2 * MIB)?;
        f.sync_all().ctx("fsync snapshot")?;
        same(
            "snapshot reads its write",
            &read_at(&f, 65536, 2 * MIB)?,
            &new,
        )?;
        same(
            "origin untouched by the snapshot write",
            &base_disk.snapshot(2 * MIB as usize, 65536),
            &base_contents[2 * MIB as usize..2 * MIB as usize + 65536],
        )?;
        drop(f);
        let st = dm.status("vt-sn").ctx("snapshot status")?;
        let parsed = st.first().and_then(|t| SnapshotStatus::parse(&t.params));
        let Some(SnapshotStatus::Active {
            allocated,
            metadata,
            ..
        }) = parsed
        else {
            return Err(format!("snapshot status {st:?}"));
        };
        check(
            allocated > metadata,
            format!("status {allocated} allocated / {metadata} metadata after a write"),
        )?;
        dm.remove("vt-sn").ctx("remove snapshot")?;
        // Merge the persistent exceptions back into the origin.
        dm.create_device(
            "vt-sn-m",
            &[TableEntry::snapshot_merge(0, size / 512, &bdev, &cdev, 8)],
        )
        .ctx("create snapshot-merge")?;
        let t = Instant::now();
        let done = loop {
            let st = dm.status("vt-sn-m").ctx("merge status")?;
            let parsed = st.first().and_then(|t| SnapshotStatus::parse(&t.params));
            match parsed {
                Some(s) if s.merge_complete() => break s,
                Some(SnapshotStatus::Active { .. }) if t.elapsed() < HANG => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => return Err(format!("merge did not complete: {other:?} ({st:?})")),
            }
        };
        dm.remove("vt-sn-m").ctx("remove merge device")?;
        same(
            "origin after merge",
            &base_disk.snapshot(2 * MIB as usize, 65536),
            &new,
        )?;
        same(
            "rest of origin after merge",
            &base_disk.snapshot(0, 2 * MIB as usize),
            &base_contents[..2 * MIB as usize],
        )?;
        Ok(format!(
            "snapshot status {allocated}/{metadata}, merged in {:.0?} ({done:?})",
            t.elapsed()
        ))
    })();
    let _ = dm.remove("vt-sn");
    let _ = dm.remove("vt-sn-m");
    let r2 = finish(base, db).and_then(|_| finish(cow, dc));
    let detail = result?;
    r2?;
    Ok(detail)
}

fn rmmod() -> TestResult {
    use std::ffi::CString;
    let name = CString::new("dm_user").ctx("name")?;
    let busy = |what: &str| -> Result<(), String> {
        match nix::kmod::delete_module(&name, nix::kmod::DeleteModuleFlags::O_NONBLOCK) {
            Err(nix::errno::Errno::EBUSY) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
            other => Err(format!(
                "rmmod while {what}: expected EBUSY/EAGAIN, got {other:?}"
            )),
        }
    };
    // While a table uses the target, and while a channel fd is still open
    // after the device is gone, the module must refuse to go away.
    let mut dev = UserDevice::create("vt-rm", "vt-rm-c", MIB)?;
    let chan = Channel::open(&dev.control, Duration::from_secs(5)).ctx("open channel")?;
    busy("a device exists")?;
    dev.remove()?;
    busy("a channel fd is open")?;
    drop(chan);
    nix::kmod::delete_module(&name, nix::kmod::DeleteModuleFlags::O_NONBLOCK)
        .ctx("delete_module(dm_user) after all devices and channels are gone")?;
    check(
        !std::path::Path::new("/sys/module/dm_user").exists(),
        "/sys/module/dm_user still present",
    )?;
    let f = std::fs::File::open("/lib/modules/dm_user.ko").ctx("open dm_user.ko")?;
    let params = CString::new("").ctx("params")?;
    nix::kmod::finit_module(&f, &params, nix::kmod::ModuleInitFlags::empty())
        .ctx("re-insert dm_user")?;
    check(
        std::path::Path::new("/sys/module/dm_user").exists(),
        "module not back after finit_module",
    )?;
    Ok("refused while a device / an open channel existed; removed after; re-inserted".into())
}

/// Helper process: read one request, report GOT, never answer (to be killed).
pub fn helper_hang(control: &str) -> Result<(), String> {
    let mut chan = Channel::open(control, Duration::from_secs(5)).ctx("open")?;
    let mut p = Vec::new();
    chan.receive(&mut p).ctx("receive")?;
    println!("GOT");
    std::io::stdout().flush().ctx("flush")?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Helper process: a RAM daemon with `threads` channels; prints READY.
pub fn helper_ram(control: &str, size: usize, threads: usize) -> Result<(), String> {
    let d = Daemon::start(control, RamDisk::new(size), threads).ctx("start")?;
    println!("READY");
    std::io::stdout().flush().ctx("flush")?;
    d.join()
}
