//! `malloc_tuning::return_freed_memory`: buffers of a merge window's size, allocated and
//! freed one after the other as the merge does, do not stay resident.
//!
//! With glibc's defaults the first freed 2 MiB buffer raises the dynamic mmap threshold, the
//! next (slightly smaller) window comes from the thread's arena and stays resident after it
//! is freed; this test then fails by about 1.9 MiB. It is the only test of this binary, so
//! no other test's allocations move the process's RssAnon meanwhile.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_window_buffers_leave_the_resident_set() {
    use std::hint::black_box;

    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("RssAnon in /proc/self/status")
    }

    snapuserd::malloc_tuning::return_freed_memory().expect("glibc accepts the settings");
    let before = rss_anon_kib();
    // Window-sized buffers as the merge allocates them: a full window, then shorter ones.
    for blocks in [510usize, 480, 470, 300] {
        let buf = vec![0x5au8; blocks * 4096];
        black_box(&buf);
    }
    let after = rss_anon_kib();
    assert!(
        after < before + 512,
        "RssAnon {before} KiB before, {after} KiB after the buffers were freed"
    );
}
