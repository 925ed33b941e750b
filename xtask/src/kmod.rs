//! Building the out-of-tree dm-user module against a kernel's headers.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deps::Kernel;
use crate::error::{io_err, Result, XtaskError};

/// Copy `src` recursively into `dst` (which must not exist).
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(io_err("create", dst))?;
    for entry in std::fs::read_dir(src).map_err(io_err("read dir", src))? {
        let entry = entry.map_err(io_err("read dir", src))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let ty = entry.file_type().map_err(io_err("stat", &from))?;
        if ty.is_dir() {
            copy_tree(&from, &to)?;
        } else if ty.is_file() {
            std::fs::copy(&from, &to).map_err(io_err("copy", &from))?;
        }
    }
    Ok(())
}

/// Lines of compiler output that count as warnings.
pub fn warning_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("warning:")).collect()
}

/// Build `kernel/` (copied to `build/kmod/<abi>/`) with `W=1`; return the `.ko`.
/// Any `warning:` in the output fails the build.
pub fn build_dm_user(repo: &Path, build_root: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let src = repo.join("kernel");
    if !src.join("Makefile").exists() {
        return Err(XtaskError::Resolve {
            what: "the dm-user module source".into(),
            why: format!("{} has no Makefile yet", src.display()),
        });
    }
    let dir = build_root.join("kmod").join(&kernel.abi);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
    }
    copy_tree(&src, &dir)?;
    let log_path = build_root.join(format!("kmod-{}.log", kernel.series.label()));
    let mut make = Command::new("make");
    make.arg("-C")
        .arg(&kernel.build_dir)
        .arg(format!("M={}", dir.display()))
        .arg("W=1")
        .arg("CONFIG_DM_USER=m")
        .arg("modules");
    let result = crate::cmd::output(&mut make);
    let text = match &result {
        Ok(t) => t.clone(),
        Err(XtaskError::Command { output, .. }) => output.clone(),
        Err(_) => String::new(),
    };
    std::fs::write(&log_path, &text).map_err(io_err("write", &log_path))?;
    result?;
    let warnings = warning_lines(&text);
    if !warnings.is_empty() {
        for w in &warnings {
            eprintln!("xtask: {w}");
        }
        return Err(XtaskError::BuildWarnings {
            abi: kernel.abi.clone(),
            count: warnings.len(),
            log: log_path,
        });
    }
    let ko = dir.join("dm-user.ko");
    if !ko.exists() {
        return Err(XtaskError::Resolve {
            what: "dm-user.ko".into(),
            why: format!("make succeeded but {} is missing", ko.display()),
        });
    }
    Ok(ko)
}
