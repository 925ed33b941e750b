//! Building the guest programs as static x86_64 executables.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Result, XtaskError};

/// Target triple of the guest (the host's own, linked statically).
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// A binary to build and ship into the guest's `/bin`.
#[derive(Debug, Clone)]
pub struct GuestBinary {
    /// Cargo package.
    pub package: String,
    /// Binary name within the package.
    pub bin: String,
}

impl GuestBinary {
    /// A binary `bin` of package `package`.
    pub fn new(package: &str, bin: &str) -> Self {
        Self {
            package: package.into(),
            bin: bin.into(),
        }
    }
}

/// Build `bins` statically (release, separate target dir under `build/`)
/// and return their paths in the same order.
pub fn build(repo: &Path, build_root: &Path, bins: &[GuestBinary]) -> Result<Vec<PathBuf>> {
    let target_dir = build_root.join("guest-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(repo)
        .args([
            "build",
            "--release",
            "--target",
            GUEST_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let mut packages: Vec<&str> = bins.iter().map(|b| b.package.as_str()).collect();
    packages.dedup();
    for p in packages {
        c.args(["-p", p]);
    }
    crate::cmd::run(&mut c)?;
    bins.iter()
        .map(|b| {
            let p = target_dir.join(GUEST_TARGET).join("release").join(&b.bin);
            if p.exists() {
                Ok(p)
            } else {
                Err(XtaskError::Resolve {
                    what: format!("guest binary {}", b.bin),
                    why: format!("{} not produced by cargo", p.display()),
                })
            }
        })
        .collect()
}
