//! Stopping a server that holds a device it no longer serves.
//!
//! A device created with user recovery waits for a new server only once the old one has
//! released its character node (`/dev/ublkc<N>`): normally when the old process exits. A
//! server that is stopped, or stuck, keeps the node open, the device stays live with nobody
//! answering, and a new daemon's re-attach would wait for it forever. After a grace period
//! the new daemon therefore sends `SIGKILL` to the process the device records as its server
//! (`ublksrv_pid`), but only if that process really holds the device's character node: a
//! recorded pid that was reused by an unrelated process is left alone. Killing is safe for
//! the data: every merge step is crash-safe, and the kernel re-issues the requests the dead
//! server held to the new one.

use std::fs;
use std::path::{Path, PathBuf};

/// What [`stop_stale_server`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaleServer {
    /// The process held the character node and was sent `SIGKILL`.
    Killed {
        /// Its pid.
        pid: i32,
    },
    /// No such process (already gone), or the recorded pid is not a valid one.
    Gone,
    /// The recorded pid is this process: nothing to stop.
    Ourselves,
    /// The process exists but does not hold the device's node (a reused pid): left alone.
    NotHolding {
        /// Its pid.
        pid: i32,
    },
    /// Its descriptors could not be read, or the signal was refused.
    Failed {
        /// Its pid.
        pid: i32,
        /// What went wrong.
        why: String,
    },
}

/// The file name of device `dev_id`'s character node.
pub fn char_node_name(dev_id: u32) -> String {
    format!("ublkc{dev_id}")
}

/// Whether the process whose `/proc` directory is `proc_dir` has a descriptor open on a file
/// named `node_name` (the link targets of `fd/`, compared by file name, so that a node init
/// created under another directory is recognised too).
pub fn holds_node(proc_dir: &Path, node_name: &str) -> std::io::Result<bool> {
    for entry in fs::read_dir(proc_dir.join("fd"))? {
        let Ok(entry) = entry else { continue };
        // A descriptor closed since the listing has no link any more.
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if target.file_name().is_some_and(|n| n == node_name) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Stop the process `pid` if it holds device `dev_id`'s character node (see the module's
/// documentation).
pub fn stop_stale_server(dev_id: u32, pid: i32) -> StaleServer {
    if pid <= 1 {
        return StaleServer::Gone;
    }
    if u32::try_from(pid).ok() == Some(std::process::id()) {
        return StaleServer::Ourselves;
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    match holds_node(&proc_dir, &char_node_name(dev_id)) {
        Ok(true) => {}
        Ok(false) => return StaleServer::NotHolding { pid },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return StaleServer::Gone,
        Err(e) => {
            return StaleServer::Failed {
                pid,
                why: format!("reading {}/fd: {e}", proc_dir.display()),
            }
        }
    }
    let target = nix::unistd::Pid::from_raw(pid);
    match nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL) {
        Ok(()) => StaleServer::Killed { pid },
        Err(nix::errno::Errno::ESRCH) => StaleServer::Gone,
        Err(e) => StaleServer::Failed {
            pid,
            why: format!("SIGKILL: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A `sleep` whose descriptor 3 is open on `node` (when given).
    fn sleeper(node: Option<&Path>) -> Child {
        let script = match node {
            Some(node) => format!("exec sleep 30 3<'{}'", node.display()),
            None => "exec sleep 30".to_string(),
        };
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the shell has become `sleep` with its redirection in place.
        let fd3 = PathBuf::from(format!("/proc/{}/fd/3", child.id()));
        let comm = PathBuf::from(format!("/proc/{}/comm", child.id()));
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let is_sleep = fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep");
            if is_sleep && (node.is_none() || fd3.exists()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    #[test]
    fn a_process_holding_the_node_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join(char_node_name(7));
        fs::write(&node, b"").unwrap();
        let mut child = sleeper(Some(&node));
        let pid = i32::try_from(child.id()).unwrap();
        assert!(holds_node(Path::new(&format!("/proc/{pid}")), "ublkc7").unwrap());
        // Another device's node is not this one.
        assert!(!holds_node(Path::new(&format!("/proc/{pid}")), "ublkc70").unwrap());
        assert_eq!(stop_stale_server(7, pid), StaleServer::Killed { pid });
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: the pid is gone now.
        assert_eq!(stop_stale_server(7, pid), StaleServer::Gone);
    }

    #[test]
    fn a_process_not_holding_the_node_is_left_alone() {
        let mut child = sleeper(None);
        let pid = i32::try_from(child.id()).unwrap();
        assert_eq!(stop_stale_server(7, pid), StaleServer::NotHolding { pid });
        assert!(
            child.try_wait().unwrap().is_none(),
            "the process was killed"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn ourselves_and_invalid_pids_are_never_signalled() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(stop_stale_server(0, me), StaleServer::Ourselves);
        assert_eq!(stop_stale_server(0, 0), StaleServer::Gone);
        assert_eq!(stop_stale_server(0, 1), StaleServer::Gone);
        assert_eq!(stop_stale_server(0, -5), StaleServer::Gone);
    }
}
