//! The error of a failed file operation, shared by the payload commands:
//! which file, what was being done, and the I/O cause.

use std::path::{Path, PathBuf};

/// A file operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// What was being done.
    pub what: &'static str,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// A `map_err` adapter: the I/O error of doing `what` on `path`.
    pub fn on(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self { path, what, source }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;
    use crate::payload::extract::ExtractError;

    #[test]
    fn names_the_file_and_the_step_and_returns_the_cause_once() {
        let cause = std::io::Error::other("disk on fire");
        let err: ExtractError =
            FileError::on(Path::new("/out/system.img"), "cannot write")(cause).into();
        assert_eq!(err.to_string(), "/out/system.img: cannot write");
        let source = err.source().expect("the I/O cause is the source");
        assert_eq!(source.to_string(), "disk on fire");
        assert!(source.source().is_none());
    }
}
