//! Booting a guest: the reusable [`VmSpec`] API and the bounded qemu run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::deps::Kernel;
use crate::error::{io_err, Result, XtaskError};
use crate::initramfs::{self, InitramfsSpec};

/// The guest CPU model: everything TCG offers, except MONITOR/MWAIT.
///
/// TCG's MONITOR/MWAIT is incomplete (MONITOR records no address, so a write to the monitored
/// line cannot end an MWAIT), while a guest idling in MWAIT expects exactly that write to wake
/// it instead of an interrupt. Without the feature the guest idles in HLT, which TCG emulates
/// faithfully, and is woken by IPIs. In the boots of BENCHMARKS.md "Wake-ups across vCPUs"
/// cross-vCPU wake-ups took a tick (3.6-7 ms) in most boots with `max` and 0.11-0.3 ms in
/// most without, but not in every boot (host load matters as much). It applies to the loop
/// reference and our devices alike.
pub const QEMU_CPU_MODEL: &str = "max,-monitor";

/// The CPU model to boot with: [`QEMU_CPU_MODEL`], or `XTASK_QEMU_CPU` when set (to reproduce
/// earlier measurements, e.g. `XTASK_QEMU_CPU=max` for the model used before 2026-12-03).
pub fn qemu_cpu_model() -> String {
    std::env::var("XTASK_QEMU_CPU").unwrap_or_else(|_| QEMU_CPU_MODEL.to_string())
}

/// Everything needed to boot one guest.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Label used in file names (`build/vm-<label>.log`).
    pub label: String,
    /// Kernel to boot.
    pub kernel: Kernel,
    /// Raw disk images attached as virtio disks (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<PathBuf>,
    /// Initramfs contents (modules, binaries, init fragment).
    pub initramfs: InitramfsSpec,
    /// Hard wall-clock limit for the whole boot.
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs. The benchmark is fairest with 1: under TCG a wake-up that crosses
    /// vCPUs costs milliseconds, which would swamp what the devices themselves cost.
    pub cpus: u32,
    /// Extra kernel command-line words.
    pub cmdline_extra: String,
}

/// How a boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEnd {
    /// qemu exited on its own (the guest powered off or panicked).
    Exited,
    /// The wall-clock limit hit and qemu was killed.
    TimedOut,
}

/// Result of one boot.
#[derive(Debug, Clone)]
pub struct VmRun {
    /// Serial log path.
    pub log_path: PathBuf,
    /// Serial log text.
    pub log: String,
    /// How it ended.
    pub end: BootEnd,
    /// Wall time.
    pub elapsed: Duration,
}

impl VmSpec {
    /// Pack the initramfs and boot; print guest result lines as they arrive.
    pub fn run(&self, build_root: &Path) -> Result<VmRun> {
        let cpio = initramfs::pack(build_root, &self.label, &self.kernel, &self.initramfs)?;
        let log_path = build_root.join(format!("vm-{}.log", self.label));
        let log_file = std::fs::File::create(&log_path).map_err(io_err("create", &log_path))?;
        let log_err = log_file.try_clone().map_err(io_err("dup", &log_path))?;
        let mut c = Command::new("qemu-system-x86_64");
        let cpu_model = qemu_cpu_model();
        c.args(["-name", &format!("{},debug-threads=on", self.label)]);
        c.args([
            "-accel",
            "tcg",
            "-cpu",
            &cpu_model,
            "-smp",
            &self.cpus.to_string(),
        ])
        .args(["-m", &self.memory_mib.to_string()])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&self.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&cpio)
        .arg("-append")
        .arg(
            format!(
                "console=ttyS0 panic=-1 oops=panic loglevel=5 {}",
                self.cmdline_extra
            )
            .trim_end(),
        );
        for d in &self.disks {
            c.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                d.display()
            ));
        }
        c.stdin(Stdio::null()).stdout(log_file).stderr(log_err);
        let what = crate::cmd::describe(&c);
        eprintln!("xtask: $ {what}");
        let start = Instant::now();
        let mut child = c
            .spawn()
            .map_err(|source| XtaskError::Spawn { cmd: what, source })?;
        let mut reader = std::fs::File::open(&log_path).map_err(io_err("open", &log_path))?;
        let mut log = Vec::new();
        let mut printed = 0usize;
        let progress = spinner(&self.label);
        let mut vcpu_time = VcpuTime::default();
        let end = loop {
            vcpu_time.sample(child.id());
            let exited = child
                .try_wait()
                .map_err(io_err("wait", "qemu-system-x86_64"))?
                .is_some();
            reader
                .read_to_end(&mut log)
                .map_err(io_err("read", &log_path))?;
            printed = echo_result_lines(&log, printed, &self.label, progress.as_ref());
            if let Some(p) = &progress {
                p.set_message(format!(
                    "[{}] guest running, {:.0?}",
                    self.label,
                    start.elapsed()
                ));
            }
            if exited {
                break BootEnd::Exited;
            }
            if start.elapsed() >= self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break BootEnd::TimedOut;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        reader
            .read_to_end(&mut log)
            .map_err(io_err("read", &log_path))?;
        echo_result_lines(&log, printed, &self.label, progress.as_ref());
        if let Some(p) = progress {
            p.finish_and_clear();
        }
        eprintln!(
            "xtask: [{}] {}",
            self.label,
            vcpu_time.summary(start.elapsed())
        );
        Ok(VmRun {
            log_path,
            log: String::from_utf8_lossy(&log).into_owned(),
            end,
            elapsed: start.elapsed(),
        })
    }
}

/// What the host scheduler gave qemu's vCPU threads: time on a host CPU and time runnable but
/// waiting for one (`/proc/<pid>/task/<tid>/schedstat`), the latest sample per thread. A vCPU
/// thread that waits for a host CPU stalls the guest as a whole (its timers fire late, the
/// other vCPU waits for its answers): on a loaded host this is what the guest's wake-ups cost.
#[derive(Debug, Default)]
struct VcpuTime {
    /// Per thread id: (ran ns, waited ns).
    threads: std::collections::BTreeMap<u32, (u64, u64)>,
}

impl VcpuTime {
    /// Record the vCPU threads of process `pid` (named `CPU <n>/TCG` by `debug-threads`).
    fn sample(&mut self, pid: u32) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let is_vcpu = std::fs::read_to_string(dir.join("comm"))
                .is_ok_and(|c| c.starts_with("CPU ") && c.trim_end().ends_with("/TCG"));
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            if !is_vcpu {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
            let mut f = stat
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            let (ran, waited) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
            self.threads.insert(tid, (ran, waited));
        }
    }

    /// One line: the vCPU threads' run and wait time over the boot's wall time.
    fn summary(&self, wall: Duration) -> String {
        let (ran, waited) = self
            .threads
            .values()
            .fold((0u64, 0u64), |(r, w), &(a, b)| (r + a, w + b));
        let s = |ns: u64| ns as f64 / 1e9;
        format!(
            "host time of {} vCPU threads over {:.1} s of wall time: on a host CPU {:.1} s, \
             runnable but waiting for a host CPU {:.1} s (sampled every 200 ms until qemu exited)",
            self.threads.len(),
            wall.as_secs_f64(),
            s(ran),
            s(waited)
        )
    }
}

/// A spinner on stderr, only when stderr is a terminal.
fn spinner(label: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let p = indicatif::ProgressBar::new_spinner();
    p.enable_steady_tick(Duration::from_millis(200));
    p.set_message(format!("[{label}] booting"));
    Some(p)
}

/// Print complete `VMTEST`/`VMBENCH` lines past byte `from`; return the new position.
fn echo_result_lines(
    log: &[u8],
    from: usize,
    label: &str,
    progress: Option<&indicatif::ProgressBar>,
) -> usize {
    let Some(rest) = log.get(from..) else {
        return from;
    };
    let Some(last_nl) = rest.iter().rposition(|&b| b == b'\n') else {
        return from;
    };
    let text = String::from_utf8_lossy(&rest[..last_nl]);
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("VMTEST ")
            || line.starts_with("VMBENCH ")
            || line.starts_with("VMINFO ")
        {
            match progress {
                Some(p) => p.println(format!("[{label}] {line}")),
                None => eprintln!("[{label}] {line}"),
            }
        }
    }
    from + last_nl + 1
}
