//! Update verification of the user-space-merge mode: read the whole snapshot *device* once,
//! after the workers start, in the daemon that took over from the first stage.
//!
//! Which device: as AOSP, the partition name is the misc name up to its first '-', without
//! its slot suffix (`system_b-init` → `system`), and the device is the device-mapper device
//! of that partition found through `/sys/block/dm-*/dm/name`: its `-verity` device when there
//! is one (what the system mounts), else the device named after the partition, else the
//! device named exactly as the misc name (the dm-user device itself). A host gives a
//! directory instead ([`VerifyDevices::Dir`]): the device of misc name `m` is `<dir>/<m>`.
//!
//! How: `O_DIRECT` reads (the device's own read path, not the page cache) through io_uring
//! with registered buffers ([`crate::uring::verify_device`], AOSP's chunk sizes and depths);
//! where io_uring is unavailable, synchronous `O_DIRECT` reads, 1 MiB at a time (256 KiB
//! under 2 GiB), through an aligned buffer. Where no device is found the pass reads the
//! snapshot through the daemon's own read path instead, so a verification still covers
//! every block.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::handlers::TargetError;
use super::user_target::UserMergeTarget;
use crate::uring::{verify_device, VerifyError, VerifyOptions};

/// Read size for devices of at least [`LARGE_DEVICE`] bytes.
pub const LARGE_CHUNK: usize = 1 << 20;
/// Read size for smaller devices.
pub const SMALL_CHUNK: usize = 256 << 10;
/// Devices from this size on are read in [`LARGE_CHUNK`]s (AOSP's 2 GiB threshold).
pub const LARGE_DEVICE: u64 = 2 << 30;
/// Alignment of `O_DIRECT` buffers.
const DIRECT_ALIGN: usize = 4096;
/// Bytes per sector.
const SECTOR: u64 = 512;

/// Where the snapshot devices to verify are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyDevices {
    /// Device-mapper devices listed under `sys_block` (`/sys/block`), nodes in `dev_block`
    /// (`/dev/block`).
    DeviceMapper {
        /// The sysfs block directory.
        sys_block: PathBuf,
        /// Where the `dm-N` nodes are.
        dev_block: PathBuf,
    },
    /// `<dir>/<misc name>` (hosts and tests).
    Dir(PathBuf),
}

impl Default for VerifyDevices {
    fn default() -> Self {
        VerifyDevices::DeviceMapper {
            sys_block: PathBuf::from("/sys/block"),
            dev_block: PathBuf::from("/dev/block"),
        }
    }
}

/// The partition a misc name serves: up to the first '-', without a `_a`/`_b` slot suffix.
pub fn partition_of(misc: &str) -> &str {
    let name = misc.split('-').next().unwrap_or(misc);
    name.strip_suffix("_a")
        .or_else(|| name.strip_suffix("_b"))
        .unwrap_or(name)
}

impl VerifyDevices {
    /// The device to read for misc name `misc`, if there is one.
    pub fn locate(&self, misc: &str) -> Option<PathBuf> {
        match self {
            VerifyDevices::Dir(dir) => {
                let p = dir.join(misc);
                p.exists().then_some(p)
            }
            VerifyDevices::DeviceMapper {
                sys_block,
                dev_block,
            } => {
                let partition = partition_of(misc);
                let verity = format!("{partition}-verity");
                // (rank, node): lower rank wins.
                let mut best: Option<(u8, PathBuf)> = None;
                for entry in std::fs::read_dir(sys_block).ok()?.flatten() {
                    let node = entry.file_name();
                    let Some(node) = node.to_str() else { continue };
                    if !node.starts_with("dm-") {
                        continue;
                    }
                    let Ok(name) = std::fs::read_to_string(entry.path().join("dm/name")) else {
                        continue;
                    };
                    let name = name.trim();
                    let rank = if name == verity || (partition == "system" && name == "vroot") {
                        0
                    } else if name == misc {
                        1
                    } else if name == partition {
                        2
                    } else {
                        continue;
                    };
                    if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                        best = Some((rank, dev_block.join(node)));
                    }
                }
                best.map(|(_, p)| p)
            }
        }
    }
}

/// Open `path` for `O_DIRECT` reads; a file system without `O_DIRECT` (tmpfs) gets buffered
/// reads, logged.
fn open_direct(path: &Path) -> io::Result<File> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log::info!(
                "{}: no O_DIRECT on this file system; verifying through the page cache",
                path.display()
            );
            File::open(path)
        }
        other => other,
    }
}

/// A buffer of `len` bytes aligned for `O_DIRECT`, carved out of a larger allocation.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len.saturating_add(DIRECT_ALIGN)];
        let start = storage
            .as_ptr()
            .align_offset(DIRECT_ALIGN)
            .min(DIRECT_ALIGN);
        Self {
            storage,
            start,
            len,
        }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        let end = self.start.saturating_add(len.min(self.len));
        &mut self.storage[self.start..end]
    }
}

fn read_error(block: u64, blocks: u64, e: io::Error) -> TargetError {
    TargetError::VerifyRead {
        block,
        blocks,
        source: Box::new(e),
    }
}

/// Read every byte of the device at `path` (its size a multiple of 4 KiB) with `O_DIRECT`;
/// the 4 KiB blocks read, or the first error. Stops early when `stop` is set.
pub fn read_device(path: &Path, stop: &AtomicBool) -> Result<u64, TargetError> {
    let open_err = |source: io::Error| TargetError::VerifyDevice {
        device: path.to_path_buf(),
        source: Box::new(source),
    };
    let file = open_direct(path).map_err(open_err)?;
    let size = device_size(&file).map_err(open_err)?;
    let blocks = size / 4096;
    if size == 0 || size % 4096 != 0 {
        return Err(open_err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("device size {size} is not a positive multiple of 4096"),
        )));
    }
    let chunk = if size >= LARGE_DEVICE {
        LARGE_CHUNK
    } else {
        SMALL_CHUNK
    };
    let mut buf = AlignedBuf::new(chunk);
    let mut offset = 0u64;
    while offset < size {
        if stop.load(Ordering::Relaxed) {
            return Err(TargetError::VerifyStopped {
                block: offset / 4096,
                blocks,
            });
        }
        let left = usize::try_from(size - offset).unwrap_or(chunk);
        let len = chunk.min(left);
        file.read_exact_at(buf.get(len), offset)
            .map_err(|e| read_error(offset / 4096, blocks, e))?;
        offset = offset.saturating_add(len as u64);
    }
    Ok(blocks)
}

/// [`read_device`] through io_uring ([`crate::uring::verify_device`]), or synchronously
/// where io_uring is unavailable.
pub fn read_device_uring(path: &Path, stop: &AtomicBool) -> Result<u64, TargetError> {
    let options = VerifyOptions {
        allow_buffered: true,
        ..VerifyOptions::default()
    };
    match verify_device(path, &options, stop) {
        Ok(report) if report.stopped => Err(TargetError::VerifyStopped {
            block: report.bytes_read / 4096,
            blocks: report.device_bytes / 4096,
        }),
        Ok(report) if report.device_bytes == 0 || report.device_bytes % 4096 != 0 => {
            Err(TargetError::VerifyDevice {
                device: path.to_path_buf(),
                source: format!(
                    "device size {} is not a positive multiple of 4096",
                    report.device_bytes
                )
                .into(),
            })
        }
        Ok(report) => Ok(report.bytes_read / 4096),
        Err(VerifyError::Unavailable(why)) => {
            log::info!(
                "{}: io_uring unavailable ({chain}); verifying with synchronous reads",
                path.display(),
                chain = crate::error_chain::ErrorChain(&why)
            );
            read_device(path, stop)
        }
        Err(e) => Err(TargetError::VerifyDevice {
            device: path.to_path_buf(),
            source: Box::new(e),
        }),
    }
}

/// Size of a block device or file in bytes.
fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Seeking to the end works for block devices and regular files alike.
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// Read every block of `target` through its serving read path (no device to read).
pub fn read_through_target(
    target: &dyn UserMergeTarget,
    stop: &AtomicBool,
) -> Result<u64, TargetError> {
    let sectors = target.base_sectors();
    let blocks = sectors / 8;
    let chunk_sectors = (SMALL_CHUNK as u64) / SECTOR;
    let mut buf = vec![0u8; SMALL_CHUNK];
    let mut sector = 0u64;
    while sector < sectors {
        if stop.load(Ordering::Relaxed) {
            return Err(TargetError::VerifyStopped {
                block: sector / 8,
                blocks,
            });
        }
        let n = chunk_sectors.min(sectors - sector);
        let len = usize::try_from(n * SECTOR).unwrap_or(SMALL_CHUNK);
        let out = buf.get_mut(..len).unwrap_or_default();
        target
            .read(sector, out)
            .map_err(|e| TargetError::VerifyRead {
                block: sector / 8,
                blocks,
                source: e,
            })?;
        sector = sector.saturating_add(n);
    }
    Ok(blocks)
}

/// Verify misc name `misc`: its device when `devices` finds one, else the read path.
pub fn verify(
    misc: &str,
    target: &dyn UserMergeTarget,
    devices: &VerifyDevices,
    stop: &AtomicBool,
) -> Result<u64, TargetError> {
    match devices.locate(misc) {
        Some(device) => {
            log::info!("{misc}: verifying {}", device.display());
            read_device_uring(&device, stop)
        }
        None => {
            log::info!(
                "{misc}: no device-mapper device for partition {} found; verifying through \
                 the daemon's read path",
                partition_of(misc)
            );
            read_through_target(target, stop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names() {
        assert_eq!(partition_of("system_b-init"), "system");
        assert_eq!(partition_of("system_b"), "system");
        assert_eq!(partition_of("vendor_a"), "vendor");
        assert_eq!(partition_of("product"), "product");
        assert_eq!(partition_of("odm_dlkm_b-user-cow-init"), "odm_dlkm");
    }

    fn fake_dm(root: &Path, node: &str, name: &str) {
        let d = root.join("sys").join(node).join("dm");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
    }

    #[test]
    fn locate_prefers_verity_then_the_misc_name_then_the_partition() {
        let tmp = tempfile::tempdir().unwrap();
        let devices = VerifyDevices::DeviceMapper {
            sys_block: tmp.path().join("sys"),
            dev_block: PathBuf::from("/dev/block"),
        };
        fake_dm(tmp.path(), "dm-0", "system");
        fake_dm(tmp.path(), "dm-3", "vendor_b");
        fake_dm(tmp.path(), "loop0", "system-verity");
        assert_eq!(
            devices.locate("system_b"),
            Some(PathBuf::from("/dev/block/dm-0"))
        );
        assert_eq!(
            devices.locate("vendor_b"),
            Some(PathBuf::from("/dev/block/dm-3"))
        );
        fake_dm(tmp.path(), "dm-1", "system_b");
        assert_eq!(
            devices.locate("system_b"),
            Some(PathBuf::from("/dev/block/dm-1"))
        );
        fake_dm(tmp.path(), "dm-7", "system-verity");
        assert_eq!(
            devices.locate("system_b"),
            Some(PathBuf::from("/dev/block/dm-7"))
        );
        assert_eq!(devices.locate("odm_b"), None);
    }

    #[test]
    fn read_device_reads_every_block_and_refuses_odd_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = tmp.path().join("dev");
        std::fs::write(&dev, vec![7u8; 5 * 4096]).unwrap();
        let stop = AtomicBool::new(false);
        assert_eq!(read_device(&dev, &stop).unwrap(), 5);
        std::fs::write(&dev, vec![7u8; 4096 + 512]).unwrap();
        assert!(matches!(
            read_device(&dev, &stop),
            Err(TargetError::VerifyDevice { .. })
        ));
        assert!(matches!(
            read_device(&tmp.path().join("missing"), &stop),
            Err(TargetError::VerifyDevice { .. })
        ));
        for read in [read_device, read_device_uring] {
            std::fs::write(&dev, vec![7u8; 3 * 4096]).unwrap();
            assert_eq!(read(&dev, &stop).unwrap(), 3);
            std::fs::write(&dev, vec![7u8; 4096 + 512]).unwrap();
            assert!(read(&dev, &stop).is_err());
            assert!(matches!(
                read(&tmp.path().join("missing"), &stop),
                Err(TargetError::VerifyDevice { .. })
            ));
        }
        std::fs::write(&dev, vec![7u8; 4096]).unwrap();
        stop.store(true, Ordering::Relaxed);
        assert!(matches!(
            read_device(&dev, &stop),
            Err(TargetError::VerifyStopped {
                block: 0,
                blocks: 1
            })
        ));
    }
}
