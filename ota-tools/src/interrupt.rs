//! Temporary output files that must not outlive an interrupted run.
//!
//! `create` and `apply` write a new output under a hidden temporary name and rename it at
//! the end. A failure drops the temporary file (tempfile removes it); a signal would end
//! the process without running any destructor. [`install`] starts one thread that waits for
//! SIGINT, SIGTERM or SIGHUP, removes every file registered with a [`PendingTemp`], and then
//! ends the process with the signal's default action (so the exit status still says which
//! signal ended it). Registration and the final rename hold the same lock, so a signal never
//! removes a file that is being renamed into place.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Temporary files to remove if a signal ends the process.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock leaves a usable list of paths.
    PENDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Route SIGINT, SIGTERM and SIGHUP to a thread that removes the registered temporary
/// files and then ends the process as the signal would have. Call once, early in `main`.
pub fn install() -> io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                // Keep the lock until the process ends: no rename can start meanwhile.
                let files = pending();
                for path in files.iter() {
                    if let Err(e) = std::fs::remove_file(path) {
                        if e.kind() != io::ErrorKind::NotFound {
                            eprintln!("ota-tools: cannot remove {}: {e}", path.display());
                        }
                    }
                }
                // Resets the default action and raises the signal again: the process ends
                // as if no handler had been installed.
                let _ = signal_hook::low_level::emulate_default_handler(signal);
                std::process::exit(128 + signal);
            }
        })?;
    Ok(())
}

/// A temporary file registered for removal on a signal, until it is renamed into place
/// ([`PendingTemp::rename_with`]) or dropped.
#[derive(Debug)]
pub struct PendingTemp {
    path: PathBuf,
    registered: bool,
}

impl PendingTemp {
    /// Register `path` (a temporary file this process just created).
    pub fn register(path: &Path) -> Self {
        pending().push(path.to_path_buf());
        Self {
            path: path.to_path_buf(),
            registered: true,
        }
    }

    /// Run `rename` (which moves the file to its final name) while no signal cleanup can
    /// run, then unregister the file.
    pub fn rename_with<T>(mut self, rename: impl FnOnce() -> T) -> T {
        let mut files = pending();
        let result = rename();
        remove_entry(&mut files, &self.path);
        self.registered = false;
        result
    }
}

impl Drop for PendingTemp {
    fn drop(&mut self) {
        if self.registered {
            remove_entry(&mut pending(), &self.path);
        }
    }
}

fn remove_entry(files: &mut Vec<PathBuf>, path: &Path) {
    if let Some(i) = files.iter().position(|p| p == path) {
        files.swap_remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(path: &Path) -> bool {
        pending().iter().any(|p| p == path)
    }

    #[test]
    fn registration_lasts_until_rename_or_drop() {
        let a = Path::new("/nonexistent/.a.tmp");
        let b = Path::new("/nonexistent/.b.tmp");
        let pa = PendingTemp::register(a);
        let pb = PendingTemp::register(b);
        assert!(registered(a) && registered(b));
        assert_eq!(
            pa.rename_with(|| 7),
            7,
            "the rename's result is passed through"
        );
        assert!(!registered(a) && registered(b));
        drop(pb);
        assert!(!registered(b));
    }
}
