//! `snapuserd`: the userspace snapshot daemon over dm-user.
//!
//! Each handler runs in user-space-merge mode (Android 13+: the dm-user device is the
//! partition and the daemon merges; the 5-field `init` and 4-field positional handlers) or
//! in legacy dm-snapshot mode (the 4-field `init` and 3-field positional handlers);
//! `-user_snapshot` refuses the legacy forms. See `DAEMON_USAGE` for every flag.
//!
//! Three roles, as AOSP's daemon:
//! * **control socket** (default): serve AOSP's text protocol on the socket init created
//!   (`ANDROID_SOCKET_<name>`), or on a host a socket bound at `-socket=<path>` /
//!   `--socket <path>` (a value containing a `/`); `-worker_count` dm-user workers per
//!   handler (default 4; AOSP forces 1 here, see `serve_socket`);
//! * **`-no_socket misc,cow,source[,base] ...`**: start those handlers (`-worker_count`
//!   workers each), write the daemon-alive indicator, then take the control socket over from
//!   the handoff proxy and serve it; without a proxy, serve the handlers until they end;
//! * **`-socket_handoff`** (`-socket-handoff`): the proxy; hand init's `snapuserd` socket to
//!   the `-no_socket` daemon and exit.
//!
//! Host-only options (tests): `-proxy_socket=<path>` (the proxy binds its SEQPACKET socket
//! there; the receiver connects there instead of `/dev/socket/snapuserd_proxy`),
//! `-property_socket=<path>` (instead of `/dev/socket/property_service`),
//! `-daemon_alive_indicator=<path>`, `-dm_user_dir=<path>` (instead of `/dev/dm-user`) and
//! `-verify_device_dir=<path>` (update verification reads `<path>/<misc>`).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use snapuserd::daemon::control_protocol::{
    asks_for_help, ControlError, DaemonConfig, Reply, DAEMON_USAGE, DEFAULT_SOCKET_NAME,
};
use snapuserd::daemon::control_server::{
    bind_listener, inherited_listener, inherited_socket, ControlServer, ControlServerError,
    ServerExit,
};
use snapuserd::daemon::events::DaemonEvents;
use snapuserd::daemon::handlers::{CowFileOpener, HandlerRegistry};
use snapuserd::daemon::handoff::{
    bind_seqpacket, default_proxy_path, receive_listener, run_proxy, HandoffError,
    PROXY_SOCKET_NAME,
};
use snapuserd::daemon::init_uevents::InitUeventChannel;
use snapuserd::daemon::merge_monitor::DEFAULT_MERGE_THREADS;
use snapuserd::daemon::transport::DevDmUser;
use snapuserd::daemon::update_verify::VerifyDevices;
use snapuserd::daemon::user_snapshots::UserSnapshotOpener;
use snapuserd::error_chain::ErrorChain;
use snapuserd::properties::{get_property, set_property_if_available, PROPERTY_SERVICE_SOCKET};
use snapuserd::user_merge::UserSnapshotOptions;

/// Where init looks for the daemon-alive indicator after the SELinux transition.
const ALIVE_INDICATOR: &str = "/metadata/ota/daemon-alive-indicator";
/// The same under the scratch OTA metadata mount, used when that directory exists.
const SCRATCH_ALIVE_INDICATOR_DIR: &str = "/mnt/scratch_ota_metadata_super/ota";
/// File name of the indicator.
const ALIVE_INDICATOR_NAME: &str = "daemon-alive-indicator";

fn init_logging() {
    #[cfg(target_os = "android")]
    android_logger::init_once(
        android_logger::Config::default()
            .with_tag("snapuserd")
            .with_max_level(log::LevelFilter::Info),
    );
    #[cfg(not(target_os = "android"))]
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
}

/// Lock memory and mark the process as an I/O flusher: it serves the root file system, so
/// its own page faults and memory reclaim must never wait on the device it serves.
fn harden_process() {
    // MCL_ONFAULT (Linux 4.4+) locks pages as they are touched instead of populating every
    // future mapping at once (the COW file is mapped); older kernels refuse it with EINVAL.
    let base = libc::MCL_CURRENT | libc::MCL_FUTURE;
    // SAFETY: mlockall takes only flags and touches no memory of ours.
    let mut rc = unsafe { libc::mlockall(base | libc::MCL_ONFAULT) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // SAFETY: as above.
        rc = unsafe { libc::mlockall(base) };
    }
    if rc != 0 {
        log::warn!("mlockall: {}", std::io::Error::last_os_error());
    }
    // PR_SET_IO_FLUSHER is 57 (Linux 5.6+).
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) only sets a flag on this process.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        let err = std::io::Error::last_os_error();
        let why = io_flusher_refusal(
            err.raw_os_error(),
            in_initial_user_namespace(),
            has_cap_sys_resource(),
        );
        // On a device the daemon must be an I/O flusher; on a host (tests, development)
        // this is expected and said once, quietly.
        if cfg!(target_os = "android") {
            log::warn!("{why}");
        } else {
            log::info!("{why}");
        }
    }
}

/// `CAP_SYS_RESOURCE`'s bit in the capability sets.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process is in the initial user namespace (its uid map is the identity over
/// every uid); `None` if that cannot be read.
fn in_initial_user_namespace() -> Option<bool> {
    let map = std::fs::read_to_string("/proc/self/uid_map").ok()?;
    let fields: Vec<&str> = map.split_whitespace().collect();
    Some(fields == ["0", "0", "4294967295"])
}

/// Whether `CAP_SYS_RESOURCE` is in this process's effective set; `None` if unknown.
fn has_cap_sys_resource() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Why `prctl(PR_SET_IO_FLUSHER)` failed, and what it means. The kernel refuses it with
/// EPERM unless the caller has `CAP_SYS_RESOURCE` in the initial user namespace
/// (`capable()`), and with EINVAL before Linux 5.6.
fn io_flusher_refusal(
    errno: Option<i32>,
    initial_userns: Option<bool>,
    cap_sys_resource: Option<bool>,
) -> String {
    const EFFECT: &str = "running without it: memory reclaim in this daemon may wait for I/O \
                          to the devices it serves";
    let cause = match errno {
        Some(libc::EPERM) => match (initial_userns, cap_sys_resource) {
            (Some(false), _) => "the kernel requires CAP_SYS_RESOURCE in the initial user \
                 namespace, and this process runs in a user namespace of its own (a rootless \
                 container), where no capability counts for it"
                .to_string(),
            (_, Some(false)) => "the kernel requires CAP_SYS_RESOURCE, and this process does \
                 not have it (container runtimes drop it: grant it, e.g. with \
                 --cap-add SYS_RESOURCE, or run the daemon as full root)"
                .to_string(),
            _ => "the kernel requires CAP_SYS_RESOURCE in the initial user namespace \
                 (refused although this process seems to hold it: a security module may \
                 deny it)"
                .to_string(),
        },
        Some(libc::EINVAL) => "the kernel predates Linux 5.6, which added it".to_string(),
        other => match other {
            Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
            None => "unknown error".to_string(),
        },
    };
    format!("PR_SET_IO_FLUSHER not set: {cause}; {EFFECT}")
}

/// SIGTERM/SIGINT request a stop on the returned events (and wake whatever loop sleeps on
/// them); SIGPIPE is ignored (a vanished client is an ordinary write error).
fn install_signals() -> Result<DaemonEvents, std::io::Error> {
    let events = DaemonEvents::new()?;
    events.stop_on_signals(&[signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
    // SAFETY: setting SIGPIPE's disposition to SIG_IGN installs no handler code.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(events)
}

/// Why the daemon stopped with a failure.
#[derive(Debug, thiserror::Error)]
enum DaemonError {
    /// The socket handoff failed.
    #[error("socket handoff")]
    Handoff(#[from] HandoffError),
    /// The control socket could not be set up or served.
    #[error("control socket")]
    ControlSocket(#[from] ControlServerError),
    /// A `-socket` value without a '/' named no inherited socket.
    #[error(
        "-socket={name} has no '/', so it was taken as the name of a socket init creates, \
         and there is no inherited socket {var}; to bind a socket at a path, give the path \
         with a '/' (e.g. -socket=./{name})"
    )]
    SocketName {
        /// The `-socket` value.
        name: String,
        /// The environment variable that was looked for.
        var: String,
    },
    /// `-no_socket` without handlers.
    #[error("-no_socket needs at least one misc,cow,source[,base] handler")]
    NoHandlers,
    /// A handler given on the command line could not be opened.
    #[error("cannot open handler {misc} (the log says why)")]
    HandlerInit {
        /// Its misc name.
        misc: String,
    },
    /// A handler given on the command line could not be started.
    #[error("cannot start handler {misc} (the log says why)")]
    HandlerStart {
        /// Its misc name.
        misc: String,
    },
}

/// Paths given on a host instead of init's sockets and Android's fixed paths.
#[derive(Debug, Default, PartialEq, Eq)]
struct HostPaths {
    /// `-socket=<path>`: the control socket.
    socket: Option<PathBuf>,
    /// `-proxy_socket=<path>`: the handoff proxy's SEQPACKET socket.
    proxy_socket: Option<PathBuf>,
    /// `-property_socket=<path>`: the property service.
    property_socket: Option<PathBuf>,
    /// `-daemon_alive_indicator=<path>`.
    alive_indicator: Option<PathBuf>,
    /// `-dm_user_dir=<path>`: where the dm-user nodes are (instead of `/dev/dm-user`).
    dm_user_dir: Option<PathBuf>,
    /// `-verify_device_dir=<path>`: update verification reads `<path>/<misc>`.
    verify_device_dir: Option<PathBuf>,
}

impl HostPaths {
    fn property_socket(&self) -> &Path {
        self.property_socket
            .as_deref()
            .unwrap_or(Path::new(PROPERTY_SERVICE_SOCKET))
    }
}

/// Take the host path options out of the arguments: `-socket=<path>`, `--socket=<path>`,
/// `-socket <path>` or `--socket <path>` where the value contains a `/` (init's socket names
/// never do), and `-proxy_socket`, `-property_socket`, `-daemon_alive_indicator`,
/// `-dm_user_dir` (either
/// spelling, `-` or `_`, value after `=` or as the next argument). Everything else is left
/// for [`DaemonConfig::parse`].
fn take_host_paths(args: Vec<String>) -> (HostPaths, Vec<String>) {
    let mut paths = HostPaths::default();
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.into_iter().peekable();
    while let Some(arg) = it.next() {
        if arg == "--" {
            rest.push(arg);
            rest.extend(it);
            break;
        }
        let name = arg.trim_start_matches('-');
        let dashes = arg.len() - name.len();
        if dashes == 0 || dashes > 2 {
            rest.push(arg);
            continue;
        }
        let (key, inline) = match name.split_once('=') {
            Some((k, v)) => (k.replace('-', "_"), Some(v.to_string())),
            None => (name.replace('-', "_"), None),
        };
        let slot = match key.as_str() {
            "socket" => {
                let path_value = match &inline {
                    Some(v) => v.contains('/'),
                    None => it.peek().is_some_and(|v| v.contains('/')),
                };
                if !path_value {
                    rest.push(arg);
                    continue;
                }
                &mut paths.socket
            }
            "proxy_socket" => &mut paths.proxy_socket,
            "property_socket" => &mut paths.property_socket,
            "daemon_alive_indicator" => &mut paths.alive_indicator,
            "dm_user_dir" => &mut paths.dm_user_dir,
            "verify_device_dir" => &mut paths.verify_device_dir,
            _ => {
                rest.push(arg);
                continue;
            }
        };
        match inline.or_else(|| it.next()) {
            Some(v) => *slot = Some(PathBuf::from(v)),
            // A missing value is left for the flag parser to report.
            None => rest.push(arg),
        }
    }
    (paths, rest)
}

/// Publish a property; a failure is logged (the daemon serves regardless).
fn publish(paths: &HostPaths, name: &str) {
    if let Err(e) = set_property_if_available(paths.property_socket(), name, "true") {
        log::error!("{chain}", chain = ErrorChain(&e));
    }
}

/// The `-socket_handoff` role.
fn run_proxy_role(paths: &HostPaths, events: &DaemonEvents) -> Result<(), DaemonError> {
    let proxy: OwnedFd = match &paths.proxy_socket {
        Some(p) => bind_seqpacket(p)?,
        None => inherited_socket(PROXY_SOCKET_NAME)?,
    };
    let server: OwnedFd = match &paths.socket {
        Some(p) => bind_listener(p)?.into(),
        None => inherited_socket(snapuserd::daemon::control_protocol::DEFAULT_SOCKET_NAME)?,
    };
    run_proxy(
        proxy,
        server.as_fd(),
        &|| publish(paths, "snapuserd.proxy_ready"),
        events,
    )?;
    log::info!("socket handoff done");
    Ok(())
}

/// Write "1" to the daemon-alive indicator init waits for after the SELinux transition.
fn notify_alive(paths: &HostPaths) {
    let path = match &paths.alive_indicator {
        Some(p) => p.clone(),
        None if Path::new(SCRATCH_ALIVE_INDICATOR_DIR).is_dir() => {
            Path::new(SCRATCH_ALIVE_INDICATOR_DIR).join(ALIVE_INDICATOR_NAME)
        }
        None => PathBuf::from(ALIVE_INDICATOR),
    };
    match std::fs::write(&path, b"1") {
        Ok(()) => log::info!("wrote {}", path.display()),
        Err(e) => log::warn!(
            "cannot write {}: {chain}",
            path.display(),
            chain = ErrorChain(&e)
        ),
    }
}

/// Serve the control socket until `stop`, a signal, or `detach` and the end of the handlers.
fn serve_socket(
    listener: std::os::unix::net::UnixListener,
    registry: Arc<HandlerRegistry>,
    paths: &HostPaths,
    events: &DaemonEvents,
) -> Result<ServerExit, DaemonError> {
    // AOSP forces one dm-user worker per handler once it serves a socket, to save memory
    // (about 25 MB with its 1 MiB buffers per worker). Ours keep `-worker_count` (default
    // 4): in the emulator 4 workers read the snapshot about 35% faster than 1 (61 vs 42
    // MB/s on the synthetic pair, 6.1) for no measurable memory (RssAnon 2.6 MB either way).
    let mut server = ControlServer::new(listener, registry)?;
    publish(paths, "snapuserd.ready");
    let exit = server.run(events)?;
    log::info!("snapuserd exiting ({exit:?})");
    Ok(exit)
}

fn run(
    config: &DaemonConfig,
    paths: &HostPaths,
    events: &DaemonEvents,
    init_uevents: Option<Arc<InitUeventChannel>>,
) -> Result<(), DaemonError> {
    if config.socket_handoff {
        return run_proxy_role(paths, events);
    }
    if let Some(fd) = config.fd_num {
        log::info!("init's uevent socket is fd {fd}: ublk node paths go there, then DONE");
    }
    let ublk_opts = config.ublk.then(|| snapuserd::ublk::UblkOptions {
        node_requests: init_uevents.as_ref().map(InitUeventChannel::node_hook),
        stale_server_grace: (config.ublk_stale_server_ms > 0)
            .then(|| Duration::from_millis(u64::from(config.ublk_stale_server_ms))),
        ..snapuserd::ublk::UblkOptions::default()
    });
    let registry = Arc::new(
        HandlerRegistry::new(
            Box::new(CowFileOpener),
            // libsnapshot waits for the dm-user node before `start`; `start` runs off the control
            // loop, so a late uevent may take a while without stalling other clients.
            Box::new(DevDmUser::new(
                paths
                    .dm_user_dir
                    .as_deref()
                    .unwrap_or(Path::new(snapuserd::dm_user::DEV_DIR)),
                Duration::from_secs(10),
            )),
            config.worker_count,
        )
        .with_user_snapshots(Box::new(UserSnapshotOpener::new(UserSnapshotOptions {
            o_direct: config.o_direct,
            merge_o_direct: config.merge_o_direct,
            merge_direct_reads: config.merge_direct_reads,
            merge_direct_scratch: config.merge_direct_scratch,
            whole_reads: !config.splice_reads,
            read_prefetch: config.read_prefetch,
            read_prefetch_ahead: Some(u64::from(config.read_prefetch_kib) * 1024),
            direct_reads: config.direct_reads,
            direct_read_ahead: usize::try_from(config.direct_read_ahead_kib())
                .unwrap_or(0)
                .saturating_mul(1024),
            cow_op_merge_size: (config.cow_op_merge_size != 0).then_some(config.cow_op_merge_size),
            ..UserSnapshotOptions::default()
        })))
        .with_user_snapshot_only(config.user_snapshot)
        .with_ublk(ublk_opts)
        .with_merge_threads(merge_threads(config), config.io_uring)
        .with_verify_devices(match &paths.verify_device_dir {
            Some(dir) => VerifyDevices::Dir(dir.clone()),
            None => VerifyDevices::default(),
        }),
    );
    registry.notify_worker_exits(events.notifier());
    if config.no_socket {
        if config.handlers.is_empty() {
            return Err(DaemonError::NoHandlers);
        }
        for h in &config.handlers {
            // The transitioned daemon's handlers: user-space-merge ones are verified once.
            let reply = match &h.base_device {
                Some(base) => {
                    registry.init_user(&h.misc_name, &h.cow_device, &h.source_device, base, true)
                }
                None => registry.init(&h.misc_name, &h.cow_device, &h.source_device),
            };
            match reply {
                Reply::SuccessSectors(_) => {}
                _ => {
                    return Err(DaemonError::HandlerInit {
                        misc: h.misc_name.clone(),
                    })
                }
            }
            if registry.start(&h.misc_name) != Reply::Success {
                return Err(DaemonError::HandlerStart {
                    misc: h.misc_name.clone(),
                });
            }
        }
        if let Some(channel) = &init_uevents {
            // As AOSP: a failed DONE is logged, and the handlers keep serving.
            if let Err(e) = channel.finish() {
                log::error!(
                    "{chain}; init waits for DONE until its timeout (30 s)",
                    chain = ErrorChain(&e)
                );
            }
        }
        notify_alive(paths);
        let proxy = paths
            .proxy_socket
            .clone()
            .unwrap_or_else(default_proxy_path);
        let give_up = || registry.all_workers_finished();
        let handoff = receive_listener(&proxy, events, &give_up);
        let failed = match handoff {
            Ok(listener) => {
                log::info!("serving the control socket handed over by the proxy");
                serve_socket(listener, Arc::clone(&registry), paths, events)?;
                return Ok(());
            }
            Err(HandoffError::Stopped { .. }) => None,
            Err(e) => {
                // As AOSP: keep serving the handlers, and fail once they end.
                log::error!(
                    "{chain}; serving the handlers without a control socket",
                    chain = ErrorChain(&e)
                );
                Some(e)
            }
        };
        if let Err(e) = events.wait_until(&|| registry.all_workers_finished()) {
            log::error!(
                "waiting for the handlers to end: {chain}",
                chain = ErrorChain(&e)
            );
        }
        registry.shut_down();
        return match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        };
    }
    let listener = match &paths.socket {
        Some(path) => bind_listener(path).map_err(DaemonError::from),
        None => {
            inherited_listener(&config.socket).map_err(|e| explain_socket_name(e, &config.socket))
        }
    }?;
    match &paths.socket {
        Some(path) => log::info!("serving control socket {}", path.display()),
        None => log::info!("serving inherited control socket {}", config.socket),
    }
    let exit = serve_socket(listener, registry, paths, events)?;
    if exit == ServerExit::Shutdown || exit == ServerExit::StopCommand {
        // Remove a socket we bound ourselves.
        if let Some(path) = &paths.socket {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(())
}

/// Most merges at once: `-num_merge_threads`, else `ro.virtual_ab.num_merge_threads`, else
/// AOSP's default of 2.
fn merge_threads(config: &DaemonConfig) -> u32 {
    if let Some(n) = config.num_merge_threads {
        return n;
    }
    const PROPERTY: &str = "ro.virtual_ab.num_merge_threads";
    match get_property(PROPERTY).map(|v| v.trim().parse::<u32>()) {
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            log::warn!("{PROPERTY} is not a positive number; using {DEFAULT_MERGE_THREADS}");
            DEFAULT_MERGE_THREADS
        }
        None => DEFAULT_MERGE_THREADS,
    }
}

/// The error for a missing inherited socket, saying what the `-socket` value was taken as.
fn explain_socket_name(e: ControlServerError, name: &str) -> DaemonError {
    match e {
        ControlServerError::NoSocket { var } if name != DEFAULT_SOCKET_NAME => {
            DaemonError::SocketName {
                name: name.to_string(),
                var,
            }
        }
        other => other.into(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if asks_for_help(&args) {
        print!("{DAEMON_USAGE}");
        return ExitCode::SUCCESS;
    }
    let (paths, args) = take_host_paths(args);
    let config = match DaemonConfig::parse(args) {
        Ok(c) => c,
        Err(e @ ControlError::UnknownFlag { .. }) => {
            eprintln!("snapuserd: {e} (snapuserd --help lists every flag)");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("snapuserd: {chain}", chain = ErrorChain(&e));
            return ExitCode::from(2);
        }
    };
    // `-fd_num` is claimed before the daemon opens any descriptor of its own, so the number
    // can only name what init passed (and a bad one fails at once).
    let init_uevents = match config.fd_num.map(InitUeventChannel::claim).transpose() {
        Ok(channel) => channel.map(Arc::new),
        Err(e) => {
            eprintln!("snapuserd: {chain}", chain = ErrorChain(&e));
            return ExitCode::from(2);
        }
    };
    init_logging();
    // Before any thread starts: freed buffers must not stay resident (and locked).
    if let Err(e) = snapuserd::malloc_tuning::return_freed_memory() {
        log::warn!("{e}");
    }
    harden_process();
    let events = match install_signals() {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "snapuserd: installing signal handlers: {chain}",
                chain = ErrorChain(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    match run(&config, &paths, &events, init_uevents) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[cfg(target_os = "android")]
            log::error!("{chain}", chain = ErrorChain(&e));
            eprintln!("snapuserd: {chain}", chain = ErrorChain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{io_flusher_refusal, take_host_paths, HostPaths};
    use std::path::PathBuf;

    #[test]
    fn io_flusher_refusals_name_their_cause() {
        let msg = io_flusher_refusal(Some(libc::EPERM), Some(true), Some(false));
        assert!(
            msg.contains("does not have it") && msg.contains("SYS_RESOURCE"),
            "{msg}"
        );
        let msg = io_flusher_refusal(Some(libc::EPERM), Some(false), Some(true));
        assert!(msg.contains("user namespace of its own"), "{msg}");
        let msg = io_flusher_refusal(Some(libc::EPERM), Some(true), Some(true));
        assert!(msg.contains("security module"), "{msg}");
        let msg = io_flusher_refusal(Some(libc::EINVAL), None, None);
        assert!(msg.contains("5.6"), "{msg}");
        for msg in [
            io_flusher_refusal(Some(libc::EPERM), None, None),
            io_flusher_refusal(None, None, None),
        ] {
            assert!(msg.starts_with("PR_SET_IO_FLUSHER not set: "), "{msg}");
            assert!(msg.contains("memory reclaim"), "{msg}");
        }
    }

    fn split(args: &[&str]) -> (Option<PathBuf>, Vec<String>) {
        let (paths, rest) = take_host_paths(args.iter().map(|s| s.to_string()).collect());
        (paths.socket, rest)
    }

    #[test]
    fn socket_paths_are_taken_names_are_left() {
        let p = Some(PathBuf::from("/tmp/s"));
        assert_eq!(
            split(&["-socket=/tmp/s", "-worker_count=2"]),
            (p.clone(), vec!["-worker_count=2".into()])
        );
        assert_eq!(split(&["--socket", "/tmp/s"]), (p.clone(), vec![]));
        assert_eq!(split(&["--socket=/tmp/s"]), (p, vec![]));
        assert_eq!(
            split(&["-socket=snapuserd"]),
            (None, vec!["-socket=snapuserd".into()])
        );
        assert_eq!(
            split(&["-socket", "name"]),
            (None, vec!["-socket".into(), "name".into()])
        );
        assert_eq!(
            split(&["---socket=/x"]),
            (None, vec!["---socket=/x".into()])
        );
        assert_eq!(
            split(&["--", "-socket=/x"]),
            (None, vec!["--".into(), "-socket=/x".into()])
        );
    }

    #[test]
    fn host_only_paths_are_taken() {
        let args = [
            "-socket-handoff",
            "-proxy-socket=/p",
            "--property_socket",
            "/q",
            "-daemon_alive_indicator=rel",
            "-property_socket",
        ];
        let (paths, rest) = take_host_paths(args.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            paths,
            HostPaths {
                socket: None,
                proxy_socket: Some("/p".into()),
                property_socket: Some("/q".into()),
                alive_indicator: Some("rel".into()),
                dm_user_dir: None,
                verify_device_dir: None,
            }
        );
        assert_eq!(rest, vec!["-socket-handoff", "-property_socket"]);
    }
}
