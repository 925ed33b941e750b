//! Host prerequisites: apt packages and the Debian cloud kernels.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cmd;
use crate::error::{Result, XtaskError};

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Kernel series the harness knows how to test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSeries {
    /// Debian 12's 6.1 LTS cloud kernel.
    V6_1,
    /// The 6.12 backport cloud kernel.
    V6_12,
}

impl KernelSeries {
    /// Every supported series, in test order.
    pub const ALL: [KernelSeries; 2] = [KernelSeries::V6_1, KernelSeries::V6_12];

    /// Parse `6.1` / `6.12`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "6.1" => Ok(Self::V6_1),
            "6.12" => Ok(Self::V6_12),
            other => Err(XtaskError::Usage(format!(
                "unknown kernel {other:?} (want 6.1 or 6.12)"
            ))),
        }
    }

    /// Short label, e.g. `6.12`.
    pub fn label(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// Whether this series' Debian cloud kernel ships ublk (`ublk_drv.ko`): 6.12 does; the
    /// 6.1 cloud kernel is built with `# CONFIG_BLK_DEV_UBLK is not set`.
    pub fn has_ublk(self) -> bool {
        matches!(self, Self::V6_12)
    }

    /// apt-cache regex for the headers package of this series.
    fn headers_regex(self) -> &'static str {
        match self {
            Self::V6_1 => r"^linux-headers-6\.1\.0-[0-9]+-cloud-amd64$",
            Self::V6_12 => r"^linux-headers-6\.12\.[0-9]+\+deb12-cloud-amd64$",
        }
    }

    /// True if `abi` (e.g. `6.1.0-56-cloud-amd64`) belongs to this series.
    fn matches_abi(self, abi: &str) -> bool {
        let Some(core) = abi.strip_suffix("-cloud-amd64") else {
            return false;
        };
        match self {
            Self::V6_1 => core
                .strip_prefix("6.1.0-")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
            Self::V6_12 => core
                .strip_prefix("6.12.")
                .and_then(|r| r.strip_suffix("+deb12"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        }
    }
}

/// A resolved, installed kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Series.
    pub series: KernelSeries,
    /// ABI string, e.g. `6.12.117+deb12-cloud-amd64`.
    pub abi: String,
    /// `/boot/vmlinuz-<abi>`.
    pub vmlinuz: PathBuf,
    /// `/lib/modules/<abi>`.
    pub modules_dir: PathBuf,
    /// `/lib/modules/<abi>/build`.
    pub build_dir: PathBuf,
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn apt_update() -> Result<()> {
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        cmd::run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update"]))?;
    }
    Ok(())
}

/// Install `pkgs` with apt-get unless all are installed already.
pub fn ensure_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_update()?;
    let mut c = Command::new("apt-get");
    c.args([
        "-o",
        "DPkg::Lock::Timeout=600",
        "install",
        "-y",
        "--no-install-recommends",
    ])
    .args(&missing)
    .env("DEBIAN_FRONTEND", "noninteractive");
    cmd::run(&mut c)
}

/// Host tools the harness uses (emulator, guest userspace, module and static-binary toolchain).
pub fn ensure_host_tools() -> Result<()> {
    ensure_packages(&[
        "qemu-system-x86",
        "busybox-static",
        "cpio",
        "xz-utils",
        "make",
        "gcc",
        "libc6-dev",
    ])
}

/// Compare two Debian-style version-ish strings by numeric runs (like `sort -V`).
fn version_key(s: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut digits = String::new();
    let mut other = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !other.is_empty() {
                out.push((0, std::mem::take(&mut other)));
            }
            digits.push(c);
        } else {
            if !digits.is_empty() {
                out.push((digits.parse().unwrap_or(u64::MAX), String::new()));
                digits.clear();
            }
            other.push(c);
        }
    }
    if !digits.is_empty() {
        out.push((digits.parse().unwrap_or(u64::MAX), String::new()));
    }
    if !other.is_empty() {
        out.push((0, other));
    }
    out
}

fn highest(abis: Vec<String>) -> Option<String> {
    abis.into_iter().max_by_key(|a| version_key(a))
}

fn installed_abis(series: KernelSeries) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/lib/modules") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|abi| series.matches_abi(abi))
        .filter(|abi| {
            Path::new(&format!("/boot/vmlinuz-{abi}")).exists()
                && Path::new(&format!("/lib/modules/{abi}/build/Makefile")).exists()
                && Path::new(&format!("/lib/modules/{abi}/modules.dep")).exists()
        })
        .collect()
}

/// ABIs named by `apt-cache search` output lines (`linux-headers-<abi> - ...`).
fn abis_from_search(series: KernelSeries, text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| p.strip_prefix("linux-headers-"))
        .filter(|abi| series.matches_abi(abi))
        .map(str::to_string)
        .collect()
}

fn search_abis(series: KernelSeries) -> Result<Vec<String>> {
    let search = || {
        cmd::output(Command::new("apt-cache").args([
            "search",
            "--names-only",
            series.headers_regex(),
        ]))
    };
    let parse = |text: String| abis_from_search(series, &text);
    let mut found = parse(search()?);
    if found.is_empty() {
        apt_update()?;
        found = parse(search()?);
    }
    Ok(found)
}

/// Resolve (and if needed install) the kernel image and headers of `series`.
/// An already-installed ABI is preferred so that nothing is downloaded.
pub fn ensure_kernel(series: KernelSeries) -> Result<Kernel> {
    let abi = match highest(installed_abis(series)) {
        Some(abi) => abi,
        None => {
            let abi = highest(search_abis(series)?).ok_or_else(|| XtaskError::Resolve {
                what: format!("a {} cloud kernel", series.label()),
                why: format!("apt-cache search {} found nothing", series.headers_regex()),
            })?;
            ensure_packages(&[
                &format!("linux-image-{abi}-unsigned"),
                &format!("linux-headers-{abi}"),
            ])?;
            abi
        }
    };
    let kernel = Kernel {
        series,
        vmlinuz: PathBuf::from(format!("/boot/vmlinuz-{abi}")),
        modules_dir: PathBuf::from(format!("/lib/modules/{abi}")),
        build_dir: PathBuf::from(format!("/lib/modules/{abi}/build")),
        abi,
    };
    for p in [&kernel.vmlinuz, &kernel.build_dir] {
        if !p.exists() {
            return Err(XtaskError::Resolve {
                what: format!("kernel {}", kernel.abi),
                why: format!("{} missing after install", p.display()),
            });
        }
    }
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_matching() {
        assert!(KernelSeries::V6_1.matches_abi("6.1.0-56-cloud-amd64"));
        assert!(!KernelSeries::V6_1.matches_abi("6.12.117+deb12-cloud-amd64"));
        assert!(!KernelSeries::V6_1.matches_abi("6.1.0-56-amd64"));
        assert!(KernelSeries::V6_12.matches_abi("6.12.117+deb12-cloud-amd64"));
        assert!(!KernelSeries::V6_12.matches_abi("6.12.117+deb13-cloud-amd64"));
    }

    #[test]
    fn apt_search_output_is_parsed() {
        let out = "linux-headers-6.1.0-55-cloud-amd64 - Header files for Linux 6.1.0-55-cloud-amd64\n\
                   linux-headers-6.1.0-56-cloud-amd64 - Header files for Linux 6.1.0-56-cloud-amd64\n\
                   linux-headers-6.1.0-56-amd64 - not cloud\n";
        let abis = abis_from_search(KernelSeries::V6_1, out);
        assert_eq!(abis, ["6.1.0-55-cloud-amd64", "6.1.0-56-cloud-amd64"]);
        assert_eq!(highest(abis).as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert!(abis_from_search(KernelSeries::V6_12, out).is_empty());
    }

    #[test]
    fn highest_is_version_sorted() {
        let v = vec![
            "6.1.0-9-cloud-amd64".into(),
            "6.1.0-56-cloud-amd64".into(),
            "6.1.0-53-cloud-amd64".into(),
        ];
        assert_eq!(highest(v).as_deref(), Some("6.1.0-56-cloud-amd64"));
        let v = vec![
            "6.12.99+deb12-cloud-amd64".into(),
            "6.12.117+deb12-cloud-amd64".into(),
        ];
        assert_eq!(highest(v).as_deref(), Some("6.12.117+deb12-cloud-amd64"));
    }
}
