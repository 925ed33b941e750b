//! What the snapshot scenarios of both daemon modes share in the guest: the `snapuserd`
//! process and its control socket, device-mapper access, whole-device comparisons and the
//! reference timings (raw read, loop device over tmpfs, plain O_DIRECT copy).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use dm_ioctl::DmControl;

use crate::harness::AlignedBuf;

/// Read size of the whole-device comparisons.
pub const IO_SIZE: usize = 1 << 20;

/// A scenario step's outcome: its detail, or why it failed.
pub type Res<T> = Result<T, String>;

/// A running `snapuserd` with its control socket.
pub struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Daemon {
    /// Start `/bin/snapuserd` on the socket `/run/snapuserd-<name>.sock` and wait for it.
    pub fn start(name: &str) -> Res<Self> {
        Self::start_with(name, &[])
    }

    /// Start `/bin/snapuserd` with `flags` besides its socket `/run/snapuserd-<name>.sock`,
    /// and wait for the socket.
    pub fn start_with(name: &str, flags: &[&str]) -> Res<Self> {
        let sock = PathBuf::from(format!("/run/snapuserd-{name}.sock"));
        let _ = std::fs::create_dir_all("/run");
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("/bin/snapuserd")
            .arg(format!("-socket={}", sock.display()))
            .args(flags)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn /bin/snapuserd: {e}"))?;
        Self::adopt(child, sock)
    }

    /// Take over a `snapuserd` started elsewhere whose control socket is (or will be) `sock`,
    /// and wait up to 20 s for that socket to accept.
    pub fn adopt(child: Child, sock: PathBuf) -> Res<Self> {
        let d = Self { child, sock };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&d.sock).is_err() {
            if Instant::now() > deadline {
                return Err(format!("daemon socket {} never appeared", d.sock.display()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    /// Its control socket.
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// Send one command and read the reply (bounded).
    pub fn command(&self, cmd: &str) -> Res<String> {
        let mut s = UnixStream::connect(&self.sock).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        s.write_all(cmd.as_bytes())
            .map_err(|e| format!("send {cmd:?}: {e}"))?;
        let mut buf = [0u8; 512];
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("reply to {cmd:?}: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    }

    /// Send an `init,...` command and return the sectors of its `success,N` reply.
    pub fn init_sectors(&self, cmd: &str) -> Res<u64> {
        let reply = self.command(cmd)?;
        reply
            .strip_prefix("success,")
            .and_then(|n| n.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("{cmd} -> {reply:?}"))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its `VmRSS` in KiB, if readable.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    /// A `/proc/<pid>/status` figure in KiB (`VmRSS:`, `RssAnon:`, `VmLck:` ...).
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines()
            .find(|l| l.starts_with(field))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// The daemon's threads (`Threads:` of its status; 0 if unreadable).
    pub fn threads(&self) -> u64 {
        self.status_kib("Threads:").unwrap_or(0)
    }

    /// Stop every thread of the daemon (SIGSTOP) where it stands.
    pub fn freeze(&self) -> Res<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .map_err(|e| format!("SIGSTOP to the daemon: {e}"))
    }

    /// `kill -9` it and reap it.
    pub fn kill9(&mut self) -> Res<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| format!("kill -9: {e}"))?;
        self.child.wait().map_err(|e| format!("wait: {e}"))?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.try_wait();
        }
    }
}

/// Print the scenario step's `VMTEST <prefix>-<step>-<tag> PASS <detail>` or `... FAIL
/// <reason>` line and flush it (a power cut may follow); true when it passed.
pub fn report(prefix: &str, step: &str, tag: &str, r: &Res<String>) -> bool {
    match r {
        Ok(d) => println!("VMTEST {prefix}-{step}-{tag} PASS {d}"),
        Err(e) => println!("VMTEST {prefix}-{step}-{tag} FAIL {e}"),
    }
    let _ = std::io::stdout().flush();
    r.is_ok()
}

/// The leading `SCENARIO TAG BASE COW TARGET` arguments of a snapshot scenario, if all five
/// are there.
pub fn scenario_args(args: &[String]) -> Option<[&String; 5]> {
    match args {
        [kind, tag, base, cow, target, ..] => Some([kind, tag, base, cow, target]),
        _ => None,
    }
}

/// The exit code of a scenario run.
pub fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// After a merge: the whole `base` equals `target`.
pub fn merged_base_check(base: &Path, target: &Path) -> Res<String> {
    let len = dev_bytes(target)?;
    compare_device("merged base", base, target, len)?;
    Ok(format!("base == target ({} MiB)", len >> 20))
}

/// The device-mapper control device.
pub fn dm() -> Res<DmControl> {
    DmControl::open().map_err(|e| {
        format!(
            "open /dev/mapper/control: {}",
            snapuserd::error_chain::ErrorChain(&e)
        )
    })
}

/// Size in bytes of a file or block device.
pub fn dev_bytes(path: &Path) -> Res<u64> {
    let f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut f2 = f;
    std::io::Seek::seek(&mut f2, std::io::SeekFrom::End(0))
        .map_err(|e| format!("size of {}: {e}", path.display()))
}

/// Open `path` read-only with O_DIRECT.
pub fn open_direct(path: &Path) -> Res<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open {} O_DIRECT: {e}", path.display()))
}

/// Open `path` write-only with O_DIRECT.
pub fn open_direct_write(path: &Path) -> Res<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open {} for writing: {e}", path.display()))
}

/// Read `len` bytes of `dev` with O_DIRECT and compare with `want` (buffered); returns the
/// time spent reading `dev`.
pub fn compare_device(what: &str, dev: &Path, want: &Path, len: u64) -> Res<Duration> {
    let fd = open_direct(dev)?;
    let fw = open_direct(want)?;
    let mut a = AlignedBuf::new(IO_SIZE);
    let mut b = AlignedBuf::new(IO_SIZE);
    let mut spent = Duration::ZERO;
    let mut off = 0u64;
    while off < len {
        let n = usize::try_from((len - off).min(IO_SIZE as u64)).unwrap_or(IO_SIZE);
        let t = Instant::now();
        fd.read_exact_at(&mut a.as_mut()[..n], off)
            .map_err(|e| format!("{what}: read {} at {off}: {e}", dev.display()))?;
        spent += t.elapsed();
        fw.read_exact_at(&mut b.as_mut()[..n], off)
            .map_err(|e| format!("{what}: read {} at {off}: {e}", want.display()))?;
        if a.as_ref()[..n] != b.as_ref()[..n] {
            let i = a.as_ref()[..n]
                .iter()
                .zip(&b.as_ref()[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            let at = off + i as u64;
            return Err(format!(
                "{what}: {} differs from {} at byte {at} (block {})",
                dev.display(),
                want.display(),
                at / 4096
            ));
        }
        off += n as u64;
    }
    Ok(spent)
}

/// Time a raw O_DIRECT sequential read of `len` bytes of `dev`.
pub fn time_read(dev: &Path, len: u64) -> Res<Duration> {
    let f = open_direct(dev)?;
    let mut a = AlignedBuf::new(IO_SIZE);
    let t = Instant::now();
    let mut off = 0u64;
    while off < len {
        let n = usize::try_from((len - off).min(IO_SIZE as u64)).unwrap_or(IO_SIZE);
        f.read_exact_at(&mut a.as_mut()[..n], off)
            .map_err(|e| format!("read {} at {off}: {e}", dev.display()))?;
        off += n as u64;
    }
    Ok(t.elapsed())
}

/// The first `len` bytes of a target image on a loop device over a tmpfs copy; detached
/// and the copy removed on drop.
pub struct TmpfsLoop {
    dev: PathBuf,
    img: PathBuf,
}

impl TmpfsLoop {
    /// Copy the first `len` bytes of `target` to `img` (on tmpfs) and bind a free loop
    /// device to it.
    pub fn attach(img: PathBuf, target: &Path, len: u64) -> Res<Self> {
        let src = File::open(target).map_err(|e| format!("open target: {e}"))?;
        let mut dst = File::create(&img).map_err(|e| format!("create {}: {e}", img.display()))?;
        std::io::copy(&mut Read::take(src, len), &mut dst)
            .map_err(|e| format!("copy the target to tmpfs: {e}"))?;
        drop(dst);
        // busybox: `losetup -f` names a free device, `losetup DEV FILE` binds it.
        let free = Command::new("losetup")
            .arg("-f")
            .output()
            .map_err(|e| format!("losetup -f: {e}"))?;
        let dev = String::from_utf8_lossy(&free.stdout).trim().to_string();
        let bound = !dev.is_empty()
            && Command::new("losetup")
                .arg(&dev)
                .arg(&img)
                .status()
                .is_ok_and(|s| s.success());
        if !bound {
            let _ = std::fs::remove_file(&img);
            return Err(format!(
                "losetup -f gave {dev:?} ({}), binding failed",
                String::from_utf8_lossy(&free.stderr).trim()
            ));
        }
        Ok(Self {
            dev: dev.into(),
            img,
        })
    }

    /// The loop device's node.
    pub fn dev(&self) -> &Path {
        &self.dev
    }
}

impl Drop for TmpfsLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.img);
    }
}

/// Time an O_DIRECT read of the target image from a loop device over a tmpfs copy.
pub fn loop_read_time(tag: &str, target: &Path, len: u64) -> Res<Duration> {
    let lp = TmpfsLoop::attach(PathBuf::from(format!("/tmp/loop-{tag}.img")), target, len)?;
    time_read(lp.dev(), len)
}

/// Time an O_DIRECT copy of the first `len` bytes of `from` onto `to` at the same offsets
/// (clamped to the size of `from`, rounded down to whole 4 KiB blocks).
pub fn plain_copy_time(from: &Path, to: &Path, len: u64) -> Res<Duration> {
    let len = len.min(dev_bytes(from)?) / 4096 * 4096;
    copy_direct(from, to, len)
}

/// Copy `len` bytes (rounded down to whole sectors) of `from` onto `to` at the same offsets
/// (O_DIRECT, 1 MiB at a time), then fsync; returns the time taken.
pub fn copy_direct(from: &Path, to: &Path, len: u64) -> Res<Duration> {
    let src = open_direct(from)?;
    let dst = open_direct_write(to)?;
    let len = len / 512 * 512;
    let mut a = AlignedBuf::new(IO_SIZE);
    let t = Instant::now();
    let mut off = 0u64;
    while off < len {
        let n = usize::try_from((len - off).min(IO_SIZE as u64)).unwrap_or(IO_SIZE);
        src.read_exact_at(&mut a.as_mut()[..n], off)
            .map_err(|e| format!("read {} at {off}: {e}", from.display()))?;
        dst.write_all_at(&a.as_ref()[..n], off)
            .map_err(|e| format!("write {} at {off}: {e}", to.display()))?;
        off += n as u64;
    }
    dst.sync_all()
        .map_err(|e| format!("fsync {}: {e}", to.display()))?;
    Ok(t.elapsed())
}

/// MiB per second of `bytes` in `d`.
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64().max(1e-9)
}

/// Mount `dev` as ext4 read-only (`ro,noload`: no journal replay) on `/mnt/snap-<tag>`, check
/// that `file` reads `content`, and unmount; returns what was seen.
pub fn mount_and_check_file(dev: &Path, tag: &str, file: &str, content: &str) -> Res<String> {
    let mnt = format!("/mnt/snap-{tag}");
    std::fs::create_dir_all(&mnt).map_err(|e| format!("mkdir {mnt}: {e}"))?;
    let out = Command::new("mount")
        .args(["-t", "ext4", "-o", "ro,noload"])
        .arg(dev)
        .arg(&mnt)
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount -o ro,noload {}: {}",
            dev.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let got = std::fs::read_to_string(format!("{mnt}/{file}"));
    let entries = std::fs::read_dir(&mnt).map(|d| d.count()).unwrap_or(0);
    let _ = Command::new("umount").arg(&mnt).status();
    let got = got.map_err(|e| format!("read {file} on the mounted snapshot: {e}"))?;
    if got.trim() != content {
        return Err(format!("{file} reads {got:?}, want {content:?}"));
    }
    Ok(format!(
        "ext4 mounted ro,noload, {file}={content}, {entries} top-level entries"
    ))
}

/// How a user-space-merge daemon serves the partition: a dm-user table the scenario creates
/// (`0 S user 0 S <misc>`), or a ublk device the daemon itself creates on `start`
/// (`snapuserd -user_snapshot -ublk`, the device named by `get_device_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Our dm-user module, a device-mapper table over the whole partition.
    DmUser,
    /// The kernel's ublk driver (`/dev/ublkb<N>`), Linux 6.0+ with `ublk_drv`.
    Ublk,
}

impl Transport {
    /// `dm-user` or `ublk` (the `transport=` argument of the guest programs).
    pub fn parse(name: &str) -> Res<Self> {
        match name {
            "dm-user" => Ok(Self::DmUser),
            "ublk" => Ok(Self::Ublk),
            other => Err(format!("transport {other:?}: want dm-user or ublk")),
        }
    }

    /// The name [`parse`](Self::parse) takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::DmUser => "dm-user",
            Self::Ublk => "ublk",
        }
    }

    /// The daemon's flags for this transport in user-space-merge mode.
    pub fn daemon_flags(self) -> &'static [&'static str] {
        match self {
            Self::DmUser => &["-user_snapshot"],
            Self::Ublk => &["-user_snapshot", "-ublk"],
        }
    }
}

/// The ublk block node a `-ublk` daemon serves `misc` on, after its `start`: asks
/// `supports,ublk` first (so a kernel without ublk is named as the reason), then
/// `get_device_name,<misc>`, and waits (bounded) for the node to appear.
pub fn ublk_node(daemon: &Daemon, misc: &str) -> Res<PathBuf> {
    require_ublk(daemon)?;
    let reply = daemon.command(&format!("get_device_name,{misc}"))?;
    let node = reply
        .strip_prefix("success,")
        .map(PathBuf::from)
        .ok_or_else(|| format!("get_device_name,{misc} -> {reply:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", node.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(node)
}

/// `supports,ublk` must answer `success`; otherwise the kernel has no ublk, said plainly.
pub fn require_ublk(daemon: &Daemon) -> Res<()> {
    let reply = daemon.command("supports,ublk")?;
    if reply == "success" {
        Ok(())
    } else {
        Err(format!(
            "this kernel offers no ublk (supports,ublk -> {reply:?}; /dev/ublk-control {}): \
             use a kernel with ublk_drv (Debian's 6.12 cloud kernel) or the dm-user transport",
            if Path::new("/dev/ublk-control").exists() {
                "exists"
            } else {
                "is missing"
            }
        ))
    }
}

/// `delete,<misc>` of a handler served over ublk: must succeed and remove `node`.
pub fn delete_ublk(daemon: &Daemon, misc: &str, node: &Path) -> Res<()> {
    let reply = daemon.command(&format!("delete,{misc}"))?;
    if reply != "success" {
        return Err(format!("delete,{misc} -> {reply:?}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} still exists after delete", node.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
