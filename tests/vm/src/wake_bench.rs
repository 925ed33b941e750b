//! Wake-up latency in the guest: what one thread waking another costs, same vCPU and across
//! vCPUs, and how precisely a short sleep ends. It locates the fixed per-request cost of the
//! user-space block transports (a request wakes the daemon, the answer wakes the reader).
//!
//! Prints `VMBENCH wake ...` lines: the guest's idle and clock configuration, then for each
//! placement the median and 90th percentile of one round trip (A writes an eventfd that B
//! blocks on, B answers on a second eventfd that A blocks on: two wake-ups), in microseconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::unistd::Pid;

/// Round trips per placement.
const TRIPS: usize = 400;
/// Short sleeps measured.
const SLEEPS: usize = 200;

/// Where the two threads of a ping-pong run.
#[derive(Clone, Copy)]
enum Placement {
    /// Both on vCPU 0.
    Same,
    /// Pinger on vCPU 0, ponger on vCPU 1.
    Cross,
    /// Wherever the scheduler puts them.
    Free,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Same => "same-vcpu",
            Placement::Cross => "cross-vcpu",
            Placement::Free => "unpinned",
        }
    }
    fn cpus(self) -> (Option<usize>, Option<usize>) {
        match self {
            Placement::Same => (Some(0), Some(0)),
            Placement::Cross => (Some(0), Some(1)),
            Placement::Free => (None, None),
        }
    }
}

fn pin(cpu: Option<usize>) -> Result<(), String> {
    let Some(cpu) = cpu else {
        return Ok(());
    };
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| format!("cpu set {cpu}: {e}"))?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| format!("pin to vCPU {cpu}: {e}"))
}

fn read_first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|_| "-".into())
}

/// Median and 90th percentile of `v` in microseconds.
fn summary(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    let at = |q: usize| {
        v.get(v.len() * q / 100)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    (at(50), at(90))
}

fn ping_pong(place: Placement) -> Result<Vec<Duration>, String> {
    let to_b =
        Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(|e| format!("eventfd: {e}"))?);
    let to_a =
        Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(|e| format!("eventfd: {e}"))?);
    let b_in = Arc::clone(&to_b);
    let b_out = Arc::clone(&to_a);
    let (cpu_a, cpu_b) = place.cpus();
    let ponger = std::thread::spawn(move || -> Result<(), String> {
        pin(cpu_b)?;
        for _ in 0..TRIPS {
            b_in.read().map_err(|e| format!("ponger read: {e}"))?;
            b_out.write(1).map_err(|e| format!("ponger write: {e}"))?;
        }
        Ok(())
    });
    let run = || -> Result<Vec<Duration>, String> {
        pin(cpu_a)?;
        let mut times = Vec::with_capacity(TRIPS);
        for _ in 0..TRIPS {
            // Let the ponger go to sleep first, as a daemon waiting for work does.
            std::thread::sleep(Duration::from_micros(200));
            let t = Instant::now();
            to_b.write(1).map_err(|e| format!("pinger write: {e}"))?;
            to_a.read().map_err(|e| format!("pinger read: {e}"))?;
            times.push(t.elapsed());
        }
        Ok(times)
    };
    let times = run();
    let pong = ponger
        .join()
        .map_err(|_| "ponger thread panicked".to_string())?;
    // Unpin the calling thread again for what follows.
    let mut all = CpuSet::new();
    for c in 0..CpuSet::count() {
        if all.set(c).is_err() {
            break;
        }
    }
    let _ = sched_setaffinity(Pid::from_raw(0), &all);
    pong?;
    times
}

/// Run the wake-up benchmark and print its lines.
pub(crate) fn run() -> Result<(), String> {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag_line = flags.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flag_line.split_whitespace().any(|w| w == f);
    println!(
        "VMBENCH wake env cmdline={:?} cpuidle_driver={} governor={} clocksource={} monitor={} nr_cpus={}",
        read_first_line("/proc/cmdline"),
        read_first_line("/sys/devices/system/cpu/cpuidle/current_driver"),
        read_first_line("/sys/devices/system/cpu/cpuidle/current_governor_ro"),
        read_first_line("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        has("monitor"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    // An idle stretch the host side can watch (qemu's CPU time while the guest does nothing).
    println!("VMBENCH wake idle-begin");
    std::thread::sleep(Duration::from_secs(3));
    println!("VMBENCH wake idle-end");
    let mut sleeps = Vec::with_capacity(SLEEPS);
    for _ in 0..SLEEPS {
        let t = Instant::now();
        std::thread::sleep(Duration::from_micros(100));
        sleeps.push(t.elapsed());
    }
    let (m, p90) = summary(&mut sleeps);
    println!("VMBENCH wake sleep-100us median_us={m:.0} p90_us={p90:.0}");
    for round in 0..3 {
        for place in [Placement::Same, Placement::Cross, Placement::Free] {
            let mut t = ping_pong(place)?;
            let (m, p90) = summary(&mut t);
            println!(
                "VMBENCH wake round={round} {} round_trip median_us={m:.0} p90_us={p90:.0}",
                place.name()
            );
        }
    }
    Ok(())
}

/// Tracefs mount point in the guest.
const TRACING: &str = "/sys/kernel/tracing";
/// Random 4 KiB reads traced per device.
const TRACED_READS: usize = 6;

fn trace_write(file: &str, what: &str) -> Result<(), String> {
    std::fs::write(format!("{TRACING}/{file}"), what).map_err(|e| format!("{TRACING}/{file}: {e}"))
}

/// `vmtest wake-trace`: a few random O_DIRECT 4 KiB reads of a dm-user device (RAM daemon,
/// one thread) and of a loop device over tmpfs, with the scheduler's wake-ups, context
/// switches and the interrupt vectors traced (ftrace), printed as `VMTRACE` lines: where the
/// milliseconds of one request go.
pub(crate) fn trace() -> Result<(), String> {
    use crate::harness::{AlignedBuf, UserDevice};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const SIZE: u64 = 16 << 20;
    if !std::path::Path::new(&format!("{TRACING}/trace")).exists() {
        nix::mount::mount(
            Some("tracefs"),
            TRACING,
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| format!("mount tracefs: {e}"))?;
    }
    let disk = crate::ramd::RamDisk::new(SIZE as usize);
    let mut dev = UserDevice::create("vt-trace", "vt-trace-c", SIZE)?;
    let daemon = crate::ramd::Daemon::start_with(&dev.control, disk, 1, true)
        .map_err(|e| format!("daemon: {e}"))?;
    let img = std::path::Path::new("/tmp/trace.img");
    std::fs::write(img, vec![7u8; SIZE as usize]).map_err(|e| format!("image: {e}"))?;
    let lp = crate::bench::LoopDevice::attach(img)?;
    trace_write("trace", "")?;
    trace_write("buffer_size_kb", "4096")?;
    for ev in [
        "sched/sched_waking",
        "sched/sched_wakeup",
        "sched/sched_switch",
        "irq_vectors/reschedule_entry",
        "irq_vectors/call_function_single_entry",
        "irq_vectors/local_timer_entry",
        "workqueue/workqueue_execute_start",
        "block/block_rq_issue",
        "block/block_rq_complete",
    ] {
        // Not every kernel has every event: trace what exists.
        let _ = trace_write(&format!("events/{ev}/enable"), "1");
    }
    trace_write("tracing_on", "1")?;
    let mut buf = AlignedBuf::new(4096);
    for (label, path) in [("dm-user", dev.path.clone()), ("loop", lp.path.clone())] {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        for i in 0..TRACED_READS {
            std::thread::sleep(Duration::from_millis(20));
            let _ = trace_write("trace_marker", &format!("{label} read {i} begin"));
            let t = Instant::now();
            f.read_exact_at(buf.as_mut(), (i as u64 * 7919 % (SIZE / 4096)) * 4096)
                .map_err(|e| format!("read {}: {e}", path.display()))?;
            let us = t.elapsed().as_micros();
            let _ = trace_write("trace_marker", &format!("{label} read {i} end {us} us"));
        }
    }
    trace_write("tracing_on", "0")?;
    let text = std::fs::read_to_string(format!("{TRACING}/trace")).unwrap_or_default();
    let mut inside = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.contains(" begin") && line.contains("tracing_mark_write") {
            inside = true;
        }
        if inside {
            println!("VMTRACE {}", line.trim());
        }
        if line.contains(" us") && line.contains("tracing_mark_write") {
            inside = false;
        }
    }
    drop(lp);
    let _ = std::fs::remove_file(img);
    dev.remove()?;
    daemon.join()?;
    Ok(())
}
