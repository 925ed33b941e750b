//! Tests of the target's device-mapper face (INFO/TABLE status, table
//! arguments, suspend with a silent daemon, response-code mapping) and of its
//! wake-up behaviour (one waiter woken per request).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use dm_ioctl::{DmControl, TableEntry};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use snapuserd::dm_user::{
    MessageHeader, DM_USER_REQ_MAP_DISCARD, DM_USER_REQ_MAP_READ, DM_USER_RESP_ERROR,
    DM_USER_RESP_SUCCESS, DM_USER_RESP_UNSUPPORTED, HEADER_SIZE,
};

use crate::cases::{async_read, await_read, expect_eio, HANG, MIB};
use crate::harness::*;

/// Threads waiting on one target in the wake-up measurements.
const WAITERS: usize = 4;
/// Measured rounds per configuration.
const ROUNDS: usize = 5;
/// Time given to wake-ups to happen (and to sleepers to settle) under TCG.
const SETTLE: Duration = Duration::from_millis(300);

/// Open a raw channel on `/dev/dm-user/<control>` (waiting for the node).
fn open_channel(control: &str) -> Result<File, String> {
    let path = format!("/dev/dm-user/{control}");
    let start = Instant::now();
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && start.elapsed() < HANG => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("open {path}: {e}")),
        }
    }
}

/// Read one request header from a raw channel.
fn read_header(mut f: &File) -> std::io::Result<MessageHeader> {
    let mut b = [0u8; HEADER_SIZE];
    f.read_exact(&mut b)?;
    Ok(MessageHeader::from_bytes(&b))
}

/// Answer request `h` with `code`; a successful READ carries `pattern(seed)`.
fn respond(mut f: &File, h: &MessageHeader, code: u64, seed: u64) -> Result<(), String> {
    let mut msg = h.response(code).to_bytes().to_vec();
    if code == DM_USER_RESP_SUCCESS && h.msg_type == DM_USER_REQ_MAP_READ {
        msg.extend_from_slice(&pattern(seed, h.sector * 512, h.len as usize));
    }
    f.write_all(&msg).ctx("write response")
}

/// `voluntary_ctxt_switches` of thread `tid` of this process: one per sleep.
fn voluntary_switches(tid: i32) -> Result<u64, String> {
    let p = format!("/proc/self/task/{tid}/status");
    let s = std::fs::read_to_string(&p).ctx(&p)?;
    s.lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{p}: no voluntary_ctxt_switches line"))
}

fn total_switches(tids: &[i32]) -> Result<u64, String> {
    tids.iter().map(|&t| voluntary_switches(t)).sum()
}

/// The single `user` target's status line (INFO) and table line (TABLE).
fn status_and_table(dm: &DmControl, name: &str) -> Result<(String, String), String> {
    let s = dm.status(name).ctx("DM_TABLE_STATUS (info)")?;
    let t = dm.table(name).ctx("DM_TABLE_STATUS (table)")?;
    match (s.as_slice(), t.as_slice()) {
        ([s], [t]) => Ok((s.params.clone(), t.params.clone())),
        _ => Err(format!("expected one target, got {s:?} / {t:?}")),
    }
}

/// INFO fields: channels, queued, in flight, daemon state, timeout.
fn info_fields(line: &str) -> Result<(u64, u64, u64, String, String), String> {
    let f: Vec<&str> = line.split(' ').collect();
    let num = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("status {line:?}: field {i} is not a number"))
    };
    check(
        f.len() == 5,
        format!(
            "status {line:?}: want 5 fields <channels> <queued> <in_flight> <daemon> <timeout_ms>"
        ),
    )?;
    Ok((
        num(0)?,
        num(1)?,
        num(2)?,
        f[3].to_string(),
        f[4].to_string(),
    ))
}

/// Poll the INFO line until `want` accepts it (state changes are asynchronous).
fn wait_status(
    dm: &DmControl,
    name: &str,
    what: &str,
    want: impl Fn(&(u64, u64, u64, String, String)) -> bool,
) -> Result<String, String> {
    let start = Instant::now();
    loop {
        let (line, _) = status_and_table(dm, name)?;
        if want(&info_fields(&line)?) {
            return Ok(line);
        }
        if start.elapsed() > HANG {
            return Err(format!("{what}: status stayed {line:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `status` (INFO) and `table` (TABLE) lines through every daemon state.
pub fn status_lines() -> TestResult {
    let old = set_param("dm_user_daemon_timeout_msec", "20000")?;
    let result = (|| {
        let dm = DmControl::open().ctx("open control")?;
        let sectors = 4 * MIB / 512;
        let dev = UserDevice::create("vt-stat", "vt-stat-c", 4 * MIB)?;
        let (info, table) = status_and_table(&dm, &dev.name)?;
        check(
            table == format!("0 {sectors} vt-stat-c"),
            format!("table line {table:?}, want \"0 {sectors} vt-stat-c\""),
        )?;
        check(
            info == "0 0 0 waiting -",
            format!("fresh target: status {info:?}, want \"0 0 0 waiting -\""),
        )?;
        // One read queued before any daemon: the timeout is armed.
        let rx1 = async_read(&dev.path, 0, 4096);
        let queued = wait_status(&dm, &dev.name, "request queued, no daemon", |s| {
            s.1 == 1 && s.3 == "waiting"
        })?;
        let (_, _, _, _, left) = info_fields(&queued)?;
        let left: u64 = left
            .parse()
            .map_err(|_| format!("no-daemon timeout not shown as msec: {queued:?}"))?;
        check(
            left > 0 && left <= 20000,
            format!("time left {left} ms not within the 20000 ms timeout: {queued:?}"),
        )?;
        // A channel opens and takes the request: in flight, timeout disarmed.
        let chan = open_channel(&dev.control)?;
        let h = read_header(&chan).ctx("read request")?;
        let (flight, _) = status_and_table(&dm, &dev.name)?;
        check(
            flight == "1 0 1 attached -",
            format!("one request read, unanswered: status {flight:?}, want \"1 0 1 attached -\""),
        )?;
        respond(&chan, &h, DM_USER_RESP_SUCCESS, 3)?;
        same(
            "served read",
            &await_read("read", &rx1)?.ctx("read")?,
            &pattern(3, 0, 4096),
        )?;
        let (idle, _) = status_and_table(&dm, &dev.name)?;
        check(
            idle == "1 0 0 attached -",
            format!("answered: status {idle:?}, want \"1 0 0 attached -\""),
        )?;
        let chan2 = open_channel(&dev.control)?;
        let (two, _) = status_and_table(&dm, &dev.name)?;
        check(
            two == "2 0 0 attached -",
            format!("two channels: status {two:?}"),
        )?;
        drop(chan2);
        drop(chan);
        let gone = wait_status(&dm, &dev.name, "all channels closed", |s| {
            s.0 == 0 && s.3 == "detached"
        })?;
        check(
            gone == "0 0 0 detached -",
            format!("daemon gone: status {gone:?}"),
        )?;
        Ok(format!(
            "table {table:?}; fresh {info:?}; queued {queued:?}; in flight {flight:?}; idle {idle:?}; gone {gone:?}"
        ))
    })();
    set_param("dm_user_daemon_timeout_msec", &old)?;
    result
}

/// Open /dev/kmsg positioned at its end, to read what the kernel logs next.
fn kmsg_tail() -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ctx("open /dev/kmsg")?;
    nix::unistd::lseek(&f, 0, nix::unistd::Whence::SeekEnd).ctx("seek /dev/kmsg")?;
    Ok(f)
}

/// Kernel log records written since `kmsg` was positioned, joined by newlines.
fn kmsg_read(mut kmsg: &File) -> String {
    let mut out = String::new();
    let mut buf = vec![0u8; 8192];
    // One record per read(); EAGAIN once none is left.
    while let Ok(n) = kmsg.read(&mut buf) {
        if n == 0 {
            break;
        }
        let rec = String::from_utf8_lossy(&buf[..n]);
        out.push_str(rec.split_once(';').map_or(&rec[..], |(_, m)| m).trim_end());
        out.push('\n');
    }
    out
}

/// Bad table arguments are refused at load time with a precise message.
pub fn table_args() -> TestResult {
    let dm = DmControl::open().ctx("open control")?;
    let name = "vt-args";
    dm.create(name, None).ctx("create")?;
    let cases: &[(&str, &str)] = &[
        ("0 8192", "Invalid argument count"),
        ("0 8192 vt-args-c extra", "Invalid argument count"),
        ("x 8192 vt-args-c", "Invalid start sector"),
        ("-1 8192 vt-args-c", "Invalid start sector"),
        ("0 8192x vt-args-c", "Invalid length"),
        ("0 18446744073709551616 vt-args-c", "Invalid length"),
        ("0 8192 a/b", "Invalid control device name"),
        ("0 8192 ..", "Invalid control device name"),
    ];
    let mut seen = Vec::new();
    let result = (|| {
        for (params, want) in cases {
            let kmsg = kmsg_tail()?;
            let r = dm.load_table(name, &[TableEntry::new(0, 8192, "user", params)]);
            check(r.is_err(), format!("table \"user {params}\" was accepted"))?;
            let log = kmsg_read(&kmsg);
            check(
                log.contains(&format!("user: {want}")),
                format!("table \"user {params}\": no \"user: {want}\" in the kernel log: {log:?}"),
            )?;
            seen.push(format!("{params:?} -> {want}"));
        }
        // A good line still loads, and the table shows the parsed numbers.
        dm.load_table(
            name,
            &[TableEntry::new(0, 8192, "user", "00 8192 vt-args-c")],
        )
        .ctx("load a valid table")?;
        dm.resume(name).ctx("resume")?;
        let (_, table) = status_and_table(&dm, name)?;
        check(
            table == "0 8192 vt-args-c",
            format!("table line {table:?}, want \"0 8192 vt-args-c\""),
        )?;
        Ok(format!(
            "{} bad lines refused: {}",
            seen.len(),
            seen.join("; ")
        ))
    })();
    dm.remove(name).ctx("remove")?;
    result
}

/// Suspend while requests are queued and the daemon is alive but silent.
///
/// noflush: the suspend completes at once, the queued bios are held by
/// device-mapper and served after resume.  Flushing suspend: the queued bios
/// fail once the daemon timeout passes without a channel taking them, and the
/// suspend completes.  A request already read stays the daemon's.  A
/// noflush table swap moves requests queued on the silent old target to the
/// daemon of the new table.
pub fn suspend_silent() -> TestResult {
    let old = set_param("dm_user_daemon_timeout_msec", "1000")?;
    let result = (|| {
        let dm = DmControl::open().ctx("open control")?;
        let dev = UserDevice::create("vt-susp", "vt-susp-c", 4 * MIB)?;
        let chan = open_channel(&dev.control)?;
        // noflush: queue 3 reads, nobody reads them.
        let rxs: Vec<_> = (0..3u64)
            .map(|i| (i * 8192, async_read(&dev.path, i * 8192, 4096)))
            .collect();
        wait_status(&dm, &dev.name, "3 queued", |s| s.1 == 3)?;
        let name = dev.name.clone();
        let t = Instant::now();
        bounded("noflush suspend", HANG, move || {
            DmControl::open().and_then(|dm| dm.suspend(&name, true))
        })?
        .ctx("noflush suspend")?;
        let noflush_took = t.elapsed();
        let (held, _) = status_and_table(&dm, &dev.name)?;
        check(
            held == "1 0 0 attached -",
            format!("after noflush suspend the target still holds requests: {held:?}"),
        )?;
        std::thread::sleep(SETTLE);
        for (off, rx) in &rxs {
            check(
                rx.try_recv().is_err(),
                format!("read at {off} completed during the suspend"),
            )?;
        }
        dm.resume(&dev.name).ctx("resume")?;
        for _ in 0..3 {
            let h = bounded("request after resume", HANG, {
                let c = chan.try_clone().ctx("dup")?;
                move || read_header(&c)
            })?
            .ctx("read request after resume")?;
            respond(&chan, &h, DM_USER_RESP_SUCCESS, 9)?;
        }
        for (off, rx) in &rxs {
            same(
                "read held across the suspend",
                &await_read("read", rx)?.ctx("read held across the suspend")?,
                &pattern(9, *off, 4096),
            )?;
        }
        // Flushing suspend: one request in flight (read by the daemon), two queued.
        let inflight = async_read(&dev.path, 0, 4096);
        let h = bounded("in-flight request", HANG, {
            let c = chan.try_clone().ctx("dup")?;
            move || read_header(&c)
        })?
        .ctx("read request")?;
        let queued: Vec<_> = (1..3u64)
            .map(|i| async_read(&dev.path, i * 8192, 4096))
            .collect();
        wait_status(&dm, &dev.name, "2 queued, 1 in flight", |s| {
            s.1 == 2 && s.2 == 1
        })?;
        let name = dev.name.clone();
        let t = Instant::now();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(DmControl::open().and_then(|dm| dm.suspend(&name, false)));
        });
        for rx in &queued {
            expect_eio(
                "queued read during a flushing suspend",
                await_read("queued read", rx)?,
            )?;
        }
        let failed_after = t.elapsed();
        check(
            failed_after >= Duration::from_millis(800),
            format!("queued reads failed after {failed_after:?}, before the 1000 ms timeout"),
        )?;
        std::thread::sleep(SETTLE);
        check(
            done_rx.try_recv().is_err(),
            "flushing suspend completed while a request read by the daemon was unanswered",
        )?;
        respond(&chan, &h, DM_USER_RESP_SUCCESS, 10)?;
        same(
            "in-flight read answered during the suspend",
            &await_read("in-flight read", &inflight)?.ctx("in-flight read")?,
            &pattern(10, 0, 4096),
        )?;
        done_rx
            .recv_timeout(HANG)
            .map_err(|_| "flushing suspend did not complete".to_string())?
            .ctx("flushing suspend")?;
        let flush_took = t.elapsed();
        dm.resume(&dev.name).ctx("resume")?;
        // noflush table swap: reads queued on the old (silent) target are
        // served by the daemon of the new table.
        let queued: Vec<_> = (0..2u64)
            .map(|i| (i * 8192, async_read(&dev.path, i * 8192, 4096)))
            .collect();
        wait_status(&dm, &dev.name, "2 queued before the swap", |s| s.1 == 2)?;
        let sectors = 4 * MIB / 512;
        dm.load_table(&dev.name, &[TableEntry::dm_user(0, sectors, "vt-susp-c2")])
            .ctx("load the new table")?;
        let chan2 = open_channel("vt-susp-c2")?;
        let name = dev.name.clone();
        bounded("noflush suspend for the swap", HANG, move || {
            DmControl::open().and_then(|dm| dm.suspend(&name, true))
        })?
        .ctx("noflush suspend for the swap")?;
        dm.resume(&dev.name).ctx("resume onto the new table")?;
        for _ in 0..2 {
            let h = bounded("request on the new table", HANG, {
                let c = chan2.try_clone().ctx("dup")?;
                move || read_header(&c)
            })?
            .ctx("read request on the new table")?;
            respond(&chan2, &h, DM_USER_RESP_SUCCESS, 11)?;
        }
        for (off, rx) in &queued {
            same(
                "read moved to the new table",
                &await_read("read", rx)?.ctx("read moved to the new table")?,
                &pattern(11, *off, 4096),
            )?;
        }
        drop(chan2);
        drop(chan);
        drop(dev);
        Ok(format!(
            "noflush: suspend in {noflush_took:.0?}, 3 queued reads held and served after resume; \
             flush: 2 queued reads EIO after {failed_after:.0?} (timeout 1000 ms), \
             suspend waited for the in-flight read, done in {flush_took:.0?}; \
             noflush table swap: 2 reads queued on the silent old target served by the new one"
        ))
    })();
    set_param("dm_user_daemon_timeout_msec", &old)?;
    result
}

fn blkdiscard(f: &File, off: u64, len: u64) -> nix::Result<()> {
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, which
    // points at a live local array of exactly that type; the fd is open.
    unsafe { blkdiscard(f.as_raw_fd(), &range) }.map(|_| ())
}

/// UNSUPPORTED answers: a discard completes as "not supported"
/// (BLK_STS_NOTSUPP), which BLKDISCARD reports as success; READ and ERROR
/// answers stay I/O errors.
pub fn unsupported_notsupp() -> TestResult {
    let dev = UserDevice::create("vt-nsup", "vt-nsup-c", 4 * MIB)?;
    let chan = open_channel(&dev.control)?;
    let f = dev.open(true)?;
    let answer_next = |code: u64| -> Result<MessageHeader, String> {
        let c = chan.try_clone().ctx("dup")?;
        let h = bounded("request", HANG, move || read_header(&c))?.ctx("read request")?;
        respond(&chan, &h, code, 0)?;
        Ok(h)
    };
    let outcome = |what: &str, code: u64| -> Result<Result<(), i32>, String> {
        let fd = f.try_clone().ctx("dup")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(blkdiscard(&fd, MIB, MIB));
        });
        let h = answer_next(code)?;
        check(
            h.msg_type == DM_USER_REQ_MAP_DISCARD,
            format!("{what}: request type {}, want DISCARD", h.msg_type),
        )?;
        let r = rx
            .recv_timeout(HANG)
            .map_err(|_| format!("{what}: BLKDISCARD did not return"))?;
        Ok(r.map_err(|e| e as i32))
    };
    let unsup = outcome("discard answered UNSUPPORTED", DM_USER_RESP_UNSUPPORTED)?;
    check(
        matches!(unsup, Ok(()) | Err(nix::libc::EOPNOTSUPP)),
        format!("discard answered UNSUPPORTED: BLKDISCARD gave errno {unsup:?}, want success or EOPNOTSUPP (not EIO)"),
    )?;
    let err = outcome("discard answered ERROR", DM_USER_RESP_ERROR)?;
    check(
        err == Err(nix::libc::EIO),
        format!("discard answered ERROR: BLKDISCARD gave {err:?}, want EIO"),
    )?;
    let rx = async_read(&dev.path, 0, 4096);
    let h = answer_next(DM_USER_RESP_UNSUPPORTED)?;
    check(
        h.msg_type == DM_USER_REQ_MAP_READ,
        format!("request type {}, want READ", h.msg_type),
    )?;
    expect_eio("read answered UNSUPPORTED", await_read("read", &rx)?)?;
    let discard_limit = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/discard_max_bytes",
        dev.path.file_name().and_then(|n| n.to_str()).unwrap_or("?")
    ))
    .unwrap_or_default();
    check(
        discard_limit.trim() != "0",
        "an UNSUPPORTED discard disabled discards on the queue",
    )?;
    drop(f);
    drop(chan);
    drop(dev);
    Ok(format!(
        "discard UNSUPPORTED -> BLKDISCARD {unsup:?}; discard ERROR -> {err:?}; read UNSUPPORTED -> EIO; \
         discard_max_bytes still {}",
        discard_limit.trim()
    ))
}

/// Wake-ups of `WAITERS` threads blocked in read() on one channel, per
/// request, with `burst` requests submitted at a time.  A thread's
/// voluntary context switches count its sleeps, so every wake-up (useful or
/// not) adds one once the thread sleeps again.
fn blocked_reader_wakes(dev: &UserDevice, chan: &File, burst: usize) -> Result<f64, String> {
    let (tx, rx) = mpsc::channel();
    let mut tids = Vec::new();
    for _ in 0..WAITERS {
        let f = chan.try_clone().ctx("dup channel")?;
        let tx = tx.clone();
        let (tid_tx, tid_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tid_tx.send(nix::unistd::gettid().as_raw());
            // Ends with ENOTBLK when the device is removed.
            while let Ok(h) = read_header(&f) {
                if tx.send(h).is_err() {
                    return;
                }
            }
        });
        tids.push(tid_rx.recv_timeout(HANG).ctx("reader thread id")?);
    }
    std::thread::sleep(SETTLE);
    let before = total_switches(&tids)?;
    for round in 0..ROUNDS {
        let reads: Vec<_> = (0..burst)
            .map(|i| {
                let off = ((round * burst + i) as u64 % 256) * 4096;
                (off, async_read(&dev.path, off, 4096))
            })
            .collect();
        for _ in 0..burst {
            let h = rx
                .recv_timeout(HANG)
                .map_err(|_| "no request reached a blocked reader".to_string())?;
            respond(chan, &h, DM_USER_RESP_SUCCESS, 41)?;
        }
        for (off, r) in &reads {
            same(
                "read",
                &await_read("read", r)?.ctx("read")?,
                &pattern(41, *off, 4096),
            )?;
        }
        std::thread::sleep(SETTLE);
    }
    let wakes = total_switches(&tids)? - before;
    Ok(wakes as f64 / (ROUNDS * burst) as f64)
}

/// Wake-ups of `WAITERS` threads, each in epoll_wait() on its own epoll
/// instance watching the channel for EPOLLIN (with or without
/// EPOLLEXCLUSIVE), per request.  Woken threads wait for the request to be
/// answered before polling again (the epoll is level-triggered).
fn epoll_wakes(dev: &UserDevice, chan: &File, exclusive: bool) -> Result<f64, String> {
    let woken = Arc::new(AtomicU64::new(0));
    let (who_tx, who_rx) = mpsc::channel();
    let mut go = Vec::new();
    for i in 0..WAITERS {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).ctx("epoll_create1")?;
        let f = chan.try_clone().ctx("dup channel")?;
        let mut flags = EpollFlags::EPOLLIN;
        if exclusive {
            flags |= EpollFlags::EPOLLEXCLUSIVE;
        }
        ep.add(&f, EpollEvent::new(flags, i as u64))
            .ctx("EPOLL_CTL_ADD")?;
        let (go_tx, go_rx) = mpsc::channel::<()>();
        go.push(go_tx);
        let woken = woken.clone();
        let who_tx = who_tx.clone();
        std::thread::spawn(move || {
            let _keep = f;
            let mut ev = [EpollEvent::empty()];
            loop {
                match ep.wait(&mut ev, 30_000u16) {
                    Ok(0) => {}
                    Ok(_) => {
                        woken.fetch_add(1, Ordering::SeqCst);
                        if who_tx.send(i).is_err() || go_rx.recv().is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
    let mut total = 0;
    for round in 0..ROUNDS {
        std::thread::sleep(SETTLE);
        let start = woken.load(Ordering::SeqCst);
        let off = (round as u64 % 256) * 4096;
        let r = async_read(&dev.path, off, 4096);
        std::thread::sleep(SETTLE);
        total += woken.load(Ordering::SeqCst) - start;
        let h = read_header(chan).ctx("read request")?;
        respond(chan, &h, DM_USER_RESP_SUCCESS, 42)?;
        same(
            "read",
            &await_read("read", &r)?.ctx("read")?,
            &pattern(42, off, 4096),
        )?;
        while let Ok(i) = who_rx.try_recv() {
            let _ = go[i].send(());
        }
    }
    Ok(total as f64 / ROUNDS as f64)
}

/// A fresh target with one raw channel open, for one measurement.
fn fresh_target(tag: &str) -> Result<(UserDevice, File), String> {
    let dev = UserDevice::create(&format!("vt-{tag}"), &format!("vt-{tag}-c"), 4 * MIB)?;
    let chan = open_channel(&dev.control)?;
    Ok((dev, chan))
}

/// One request wakes exactly one blocked reader, and exactly one
/// EPOLLEXCLUSIVE epoll waiter; plain epoll waiters are all woken (the
/// control showing the count can see a herd).  Bursts are reported.
pub fn exclusive_wake() -> TestResult {
    let (dev, chan) = fresh_target("wake1")?;
    let single = blocked_reader_wakes(&dev, &chan, 1)?;
    drop(dev);
    let (dev, chan) = fresh_target("wake8")?;
    let burst = blocked_reader_wakes(&dev, &chan, 8)?;
    drop(dev);
    let (dev, chan) = fresh_target("wakex")?;
    let excl = epoll_wakes(&dev, &chan, true)?;
    drop(dev);
    let (dev, chan) = fresh_target("wakep")?;
    let plain = epoll_wakes(&dev, &chan, false)?;
    drop(dev);
    drop(chan);
    let detail = format!(
        "wake-ups per request, {WAITERS} waiters, {ROUNDS} rounds: blocked read() {single:.2}, \
         blocked read() bursts of 8 {burst:.2}, epoll EPOLLEXCLUSIVE {excl:.2}, plain epoll {plain:.2}"
    );
    eprintln!("VMINFO exclusive-wake {detail}");
    check(
        single == 1.0,
        format!("one request woke {single} blocked readers on average, want exactly 1 ({detail})"),
    )?;
    check(
        excl == 1.0,
        format!(
            "one request woke {excl} EPOLLEXCLUSIVE waiters on average, want exactly 1 ({detail})"
        ),
    )?;
    check(
        plain == WAITERS as f64,
        format!("plain epoll: {plain} wake-ups per request, want all {WAITERS} ({detail})"),
    )?;
    Ok(detail)
}

extern "C" fn on_usr1(_: nix::libc::c_int) {}

/// A flushing suspend interrupted by a signal (`presuspend_undo`) puts the
/// target back to normal: the suspend deadline no longer runs, and the
/// queued request waits for the daemon instead of failing.
pub fn suspend_cancelled() -> TestResult {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_usr1),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler is an empty extern "C" fn, trivially async-signal-safe.
    unsafe { sigaction(Signal::SIGUSR1, &act) }.ctx("sigaction")?;
    let old = set_param("dm_user_daemon_timeout_msec", "2000")?;
    let result = (|| {
        let dm = DmControl::open().ctx("open control")?;
        let dev = UserDevice::create("vt-scan", "vt-scan-c", 4 * MIB)?;
        let chan = open_channel(&dev.control)?;
        let inflight = async_read(&dev.path, 0, 4096);
        let h1 = bounded("in-flight request", HANG, {
            let c = chan.try_clone().ctx("dup")?;
            move || read_header(&c)
        })?
        .ctx("read request")?;
        let queued = async_read(&dev.path, 8192, 4096);
        wait_status(&dm, &dev.name, "1 queued, 1 in flight", |s| {
            s.1 == 1 && s.2 == 1
        })?;
        // The suspend waits for the in-flight request; interrupt it.
        let (tid_tx, tid_rx) = mpsc::channel();
        let (res_tx, res_rx) = mpsc::channel();
        let name = dev.name.clone();
        std::thread::spawn(move || {
            let _ = tid_tx.send(nix::sys::pthread::pthread_self());
            let _ = res_tx.send(DmControl::open().and_then(|dm| dm.suspend(&name, false)));
        });
        let tid = tid_rx.recv_timeout(HANG).ctx("suspend thread")?;
        let armed = wait_status(&dm, &dev.name, "suspend deadline armed", |s| s.4 != "-")?;
        let t = Instant::now();
        let suspend = loop {
            nix::sys::pthread::pthread_kill(tid, Signal::SIGUSR1).ctx("pthread_kill")?;
            if let Ok(r) = res_rx.recv_timeout(Duration::from_millis(50)) {
                break r;
            }
            check(
                t.elapsed() < HANG,
                "the suspend was not interrupted by SIGUSR1",
            )?;
        };
        check(
            suspend.is_err(),
            "flushing suspend completed with an unanswered request",
        )?;
        let info = dm.info(&dev.name).ctx("info")?;
        check(
            !info.suspended(),
            "device suspended after the interrupted suspend",
        )?;
        let (undone, _) = status_and_table(&dm, &dev.name)?;
        check(
            undone == "1 1 1 attached -",
            format!("after the interrupted suspend: status {undone:?}, want \"1 1 1 attached -\""),
        )?;
        // Past the 2000 ms the suspend deadline would have allowed.
        std::thread::sleep(Duration::from_millis(2500));
        check(
            queued.try_recv().is_err(),
            "the queued read failed although the suspend was cancelled",
        )?;
        respond(&chan, &h1, DM_USER_RESP_SUCCESS, 12)?;
        let h2 = read_header(&chan).ctx("read the queued request")?;
        respond(&chan, &h2, DM_USER_RESP_SUCCESS, 12)?;
        same(
            "in-flight read",
            &await_read("in-flight read", &inflight)?.ctx("in-flight read")?,
            &pattern(12, 0, 4096),
        )?;
        same(
            "queued read",
            &await_read("queued read", &queued)?.ctx("queued read")?,
            &pattern(12, 8192, 4096),
        )?;
        drop(chan);
        drop(dev);
        Ok(format!(
            "during the suspend {armed:?}; interrupted ({}) -> {undone:?}; queued read served 2.5 s later",
            suspend.err().map(|e| e.to_string()).unwrap_or_default()
        ))
    })();
    set_param("dm_user_daemon_timeout_msec", &old)?;
    result
}
