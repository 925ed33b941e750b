//! Benchmark input shared by the read-path benchmarks of cow-format and snapuserd, so both
//! measure the same kind of data: real files from this machine, not random bytes.
//! Included with `#[path]`; not part of any library.

use std::fs;
use std::path::{Path, PathBuf};

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>, limit: usize) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if out.len() >= limit {
            return;
        }
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            collect_files(&p, out, limit);
        } else if md.is_file() && md.len() > 0 {
            out.push(p);
        }
    }
}

/// `mib` MiB of real file content (binaries from /usr/lib, text from /usr/share, interleaved),
/// cut to whole 4 KiB blocks. Falls back to repeating what it found when the trees are small.
pub fn real_data(mib: usize) -> Vec<u8> {
    let want = mib * 1024 * 1024;
    let mut files = Vec::new();
    for root in ["/usr/lib", "/usr/share"] {
        collect_files(Path::new(root), &mut files, 200_000);
    }
    let mut data = Vec::with_capacity(want);
    // Interleave the two trees so both binaries and text are represented.
    let (lib, share): (Vec<_>, Vec<_>) = files.iter().partition(|p| p.starts_with("/usr/lib"));
    let mut li = lib.iter();
    let mut si = share.iter();
    while data.len() < want {
        let next = if data.len() % 2 == 0 {
            li.next().or(si.next())
        } else {
            si.next().or(li.next())
        };
        let Some(p) = next else { break };
        if let Ok(bytes) = fs::read(p) {
            let take = bytes.len().min(want - data.len()).min(4 * 1024 * 1024);
            data.extend_from_slice(&bytes[..take]);
        }
    }
    // Pad with a repeat of the start if the trees were small.
    while data.len() < want {
        let n = (want - data.len()).min(data.len().max(1));
        let copy = data[..n].to_vec();
        data.extend_from_slice(&copy);
    }
    data.truncate(want / 4096 * 4096);
    data
}
