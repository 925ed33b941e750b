//! A process under `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)` (as snapuserd runs)
//! that reads a whole COW through `CowReader::open_mapped` must not end up with the COW's
//! pages locked. Its own test binary: `mlockall` is process-wide.

use std::fs::File;

use cow_format::{CowReader, CowVersion, CowWriter, WriterOptions};

/// `Locked:` kB of the mappings of `path` in this process (from /proc/self/smaps).
fn locked_kib_of(path: &std::path::Path) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let name = path.to_str()?;
    let mut in_map = false;
    let mut found = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_map = line.ends_with(name);
        } else if in_map {
            if let Some(v) = line.strip_prefix("Locked:") {
                let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
                found = Some(found.unwrap_or(0) + kib);
            }
        }
    }
    found
}

#[test]
fn mapped_cow_pages_are_not_locked_under_mlockall() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.cow");
    let opts = WriterOptions {
        version: CowVersion::V2,
        ..WriterOptions::default()
    };
    let mut w = CowWriter::create(File::create(&path).unwrap(), opts).unwrap();
    // 8 MiB of incompressible blocks: stored raw, so reading them touches every page.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    w.add_replace(0, &data).unwrap();
    w.finalize().unwrap();

    // SAFETY: mlockall takes only flags and touches no memory of ours.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    assert_eq!(
        rc,
        0,
        "mlockall failed ({}): this test needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK (CI runs as root)",
        std::io::Error::last_os_error()
    );
    let reader = CowReader::open_mapped(File::open(&path).unwrap()).unwrap();
    let mut block = vec![0u8; 4096];
    let mut read = 0u64;
    for op in reader.ops().to_vec() {
        if let Ok(()) = reader.read_op_data(&op, &mut block) {
            read += 1;
        }
    }
    assert_eq!(read, 2048, "every block must be read through the mapping");
    let locked = locked_kib_of(&path).expect("the COW mapping is listed in /proc/self/smaps");
    // SAFETY: munlockall takes no arguments and touches no memory of ours.
    unsafe { libc::munlockall() };
    assert_eq!(locked, 0, "{locked} KiB of the mapped COW are locked");
}
