//! The error type of every xtask step.

use std::path::PathBuf;

/// Anything that can go wrong while preparing or running the emulator tests.
#[derive(Debug, thiserror::Error)]
pub enum XtaskError {
    /// A file-system operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A child process could not be started.
    #[error("cannot run {cmd}")]
    Spawn {
        /// Command line.
        cmd: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A child process exited unsuccessfully.
    #[error("{cmd} failed ({status}){}", tail_note(.output))]
    Command {
        /// Command line.
        cmd: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Tail of its output.
        output: String,
    },
    /// A package or ABI could not be found.
    #[error("cannot resolve {what}: {why}")]
    Resolve {
        /// What we looked for.
        what: String,
        /// Why it failed.
        why: String,
    },
    /// The module build printed warnings.
    #[error("module build for {abi} printed {count} warning(s); see {log}")]
    BuildWarnings {
        /// Kernel ABI.
        abi: String,
        /// Number of warning lines.
        count: usize,
        /// Build log path.
        log: PathBuf,
    },
    /// Bad command-line usage.
    #[error("usage: {0}")]
    Usage(String),
    /// Some tests failed.
    #[error("{0} test result(s) failed")]
    TestsFailed(usize),
    /// A result the demo checks was wrong.
    #[error("demo check failed: {0}")]
    DemoCheck(String),
}

fn tail_note(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(":\n{output}")
    }
}

/// Result alias for xtask.
pub type Result<T> = std::result::Result<T, XtaskError>;

/// Attach a path and operation to an `io::Error`.
pub fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> XtaskError {
    let path = path.into();
    move |source| XtaskError::Io { op, path, source }
}
