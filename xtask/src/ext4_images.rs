//! Reproducible ext4 images of real directory trees, for the demo and the snapshot scenarios.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd;
use crate::error::{io_err, Result, XtaskError};

/// The newest `/usr/lib/python3.*` on this machine: a real tree of files to build images from.
pub fn python_lib() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .map_err(io_err("list", Path::new("/usr/lib")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3.") && p.join("os.py").exists())
        })
        .collect();
    candidates.sort();
    candidates.pop().ok_or_else(|| XtaskError::Resolve {
        what: "a directory tree for the ext4 images".into(),
        why: "no /usr/lib/python3.*".into(),
    })
}

/// Pack `tree` into a fresh ext4 image `img` of `size` (mke2fs syntax, e.g. `32M`) with 4 KiB
/// blocks. The UUID, hash seed and timestamps are fixed, so the same tree gives the same bytes.
pub fn mke2fs_from_tree(tree: &Path, img: &Path, size: &str) -> Result<()> {
    let _ = std::fs::remove_file(img);
    cmd::run(
        Command::new("mke2fs")
            .env("E2FSPROGS_FAKE_TIME", "1700000000")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
            .args(["-U", "3b1c1d62-7a7e-4f42-9a55-0f0c2b5e9a11"])
            .args(["-E", "hash_seed=5f1e0e4c-2d6b-4a8e-bb0f-6c3d2a1b0e9f"])
            .arg("-d")
            .arg(tree)
            .arg(img)
            .arg(size),
    )
}
