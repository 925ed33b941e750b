//! `snapuserd`: the userspace snapshot daemon (legacy dm-snapshot design over dm-user).
//!
//! With a control socket (inherited from init as `ANDROID_SOCKET_<name>`, or bound at
//! `-socket=<path>` / `--socket <path>` when the value contains a `/`) it serves AOSP's text protocol. With
//! `-no_socket` it starts the positional `misc,cow,source[,base]` handlers directly and runs
//! until they end or a signal arrives.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snapuserd::daemon::control_server::{
    bind_listener, inherited_listener, ControlServer, ServerExit,
};
use snapuserd::daemon::handlers::{CowFileOpener, HandlerRegistry};
use snapuserd::daemon::transport::DevDmUser;
use snapuserd::snapshot::control_protocol::{DaemonConfig, Reply};

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
        log::warn!(
            "prctl(PR_SET_IO_FLUSHER): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// SIGTERM/SIGINT set the returned flag; SIGPIPE is ignored (a vanished client is an
/// ordinary write error).
fn install_signals() -> Result<Arc<AtomicBool>, std::io::Error> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&flag))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&flag))?;
    // SAFETY: setting SIGPIPE's disposition to SIG_IGN installs no handler code.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(flag)
}

/// Take a host socket path out of the arguments: `-socket=<path>`, `--socket=<path>`,
/// `-socket <path>` or `--socket <path>` where the value contains a `/` (init's socket names
/// never do). Everything else is left for [`DaemonConfig::parse`].
fn take_socket_path(args: Vec<String>) -> (Option<PathBuf>, Vec<String>) {
    let mut path = None;
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
        if let Some(value) = name.strip_prefix("socket=") {
            if value.contains('/') {
                path = Some(PathBuf::from(value));
                continue;
            }
        } else if name == "socket" && it.peek().is_some_and(|v| v.contains('/')) {
            path = it.next().map(PathBuf::from);
            continue;
        }
        rest.push(arg);
    }
    (path, rest)
}

fn run(
    config: &DaemonConfig,
    socket_path: Option<&Path>,
    shutdown: &AtomicBool,
) -> Result<(), String> {
    let registry = Arc::new(HandlerRegistry::new(
        Box::new(CowFileOpener),
        // libsnapshot waits for the dm-user node before `start`; a short wait covers a
        // late uevent without letting one `start` stall the control loop for long.
        Box::new(DevDmUser::new(
            Path::new(snapuserd::dm_user::DEV_DIR),
            Duration::from_secs(1),
        )),
        config.worker_count,
    ));
    if config.no_socket {
        if config.handlers.is_empty() {
            return Err("-no_socket needs at least one misc,cow,source[,base] handler".into());
        }
        for h in &config.handlers {
            match registry.init(&h.misc_name, &h.cow_device, &h.source_device) {
                Reply::SuccessSectors(_) => {}
                _ => return Err(format!("cannot open handler {}", h.misc_name)),
            }
            if registry.start(&h.misc_name) != Reply::Success {
                return Err(format!("cannot start handler {}", h.misc_name));
            }
        }
        while !shutdown.load(Ordering::Acquire) && !registry.all_workers_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        registry.stop_all();
        return Ok(());
    }
    if config.socket_handoff {
        log::warn!("-socket_handoff is accepted but not implemented; serving the socket directly");
    }
    let listener = match socket_path {
        Some(path) => bind_listener(path),
        None => inherited_listener(&config.socket),
    }
    .map_err(|e| e.to_string())?;
    let mut server = ControlServer::new(listener, registry).map_err(|e| e.to_string())?;
    match socket_path {
        Some(path) => log::info!("serving control socket {}", path.display()),
        None => log::info!("serving inherited control socket {}", config.socket),
    }
    let exit = server.run(shutdown).map_err(|e| e.to_string())?;
    log::info!("snapuserd exiting ({exit:?})");
    if exit == ServerExit::Shutdown || exit == ServerExit::StopCommand {
        // Remove a socket we bound ourselves.
        if let Some(path) = socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let (socket_path, args) = take_socket_path(std::env::args().skip(1).collect());
    let config = match DaemonConfig::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("snapuserd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    harden_process();
    let shutdown = match install_signals() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("snapuserd: installing signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&config, socket_path.as_deref(), &shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[cfg(target_os = "android")]
            log::error!("{e}");
            eprintln!("snapuserd: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::take_socket_path;
    use std::path::PathBuf;

    fn split(args: &[&str]) -> (Option<PathBuf>, Vec<String>) {
        take_socket_path(args.iter().map(|s| s.to_string()).collect())
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
}
