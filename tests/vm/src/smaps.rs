//! What a process's resident memory is made of: `/proc/<pid>/smaps` read and summed by
//! mapping, for the demo's report of the daemon's peak during the merge.
//!
//! `status` only says how much is anonymous, file-backed or shared memory; `smaps` says which
//! mappings hold it: the binary's segments, the heap, malloc's per-thread arenas (64 MiB
//! reservations), thread stacks, io_uring rings, the COW file's mapping.

/// One mapping of `smaps` with its resident figures, in KiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// Size of the mapping (`Size:`).
    pub size_kib: u64,
    /// Resident (`Rss:`).
    pub rss_kib: u64,
    /// Resident anonymous pages (`Anonymous:`).
    pub anon_kib: u64,
    /// Permissions, e.g. `rw-p`.
    pub perms: String,
    /// Path or pseudo-name (`[heap]`, `[stack]`, `anon_inode:[io_uring]`); empty when anonymous.
    pub name: String,
}

/// Parse the text of a `smaps` file. Lines of another shape are skipped.
pub fn parse(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            continue;
        };
        if let Some(key) = first.strip_suffix(':') {
            // `Key: value kB` of the current mapping.
            let (Some(m), Some(v)) = (
                out.last_mut(),
                words.next().and_then(|v| v.parse::<u64>().ok()),
            ) else {
                continue;
            };
            match key {
                "Size" => m.size_kib = v,
                "Rss" => m.rss_kib = v,
                "Anonymous" => m.anon_kib = v,
                _ => {}
            }
            continue;
        }
        // A mapping header: `start-end perms offset dev inode [name]`.
        let Some((start, _)) = first.split_once('-') else {
            continue;
        };
        let Ok(start) = u64::from_str_radix(start, 16) else {
            continue;
        };
        let perms = words.next().unwrap_or("").to_string();
        // Skip offset, device and inode; the rest is the name (paths may hold spaces).
        let name = words.skip(3).collect::<Vec<_>>().join(" ");
        out.push(Mapping {
            start,
            size_kib: 0,
            rss_kib: 0,
            anon_kib: 0,
            perms,
            name,
        });
    }
    out
}

/// One line per mapping holding at least `min_rss_kib`, biggest first, then one line of the
/// rest: `start size_kib N rss_kib N anon_kib N perms P name NAME`.
pub fn report(maps: &[Mapping], min_rss_kib: u64) -> Vec<String> {
    let mut big: Vec<&Mapping> = maps.iter().filter(|m| m.rss_kib >= min_rss_kib).collect();
    big.sort_by(|a, b| b.rss_kib.cmp(&a.rss_kib).then(a.start.cmp(&b.start)));
    let mut lines: Vec<String> = big
        .iter()
        .map(|m| {
            format!(
                "{:x} size_kib {} rss_kib {} anon_kib {} perms {} name {}",
                m.start,
                m.size_kib,
                m.rss_kib,
                m.anon_kib,
                m.perms,
                if m.name.is_empty() { "-" } else { &m.name }
            )
        })
        .collect();
    let rest: Vec<&Mapping> = maps.iter().filter(|m| m.rss_kib < min_rss_kib).collect();
    lines.push(format!(
        "rest mappings {} rss_kib {} anon_kib {}",
        rest.len(),
        rest.iter().map(|m| m.rss_kib).sum::<u64>(),
        rest.iter().map(|m| m.anon_kib).sum::<u64>()
    ));
    lines
}

/// The summary of process `pid`'s `smaps` (empty if unreadable).
pub fn of_pid(pid: u32, min_rss_kib: u64) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map(|t| report(&parse(&t), min_rss_kib))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
00400000-00600000 r-xp 00000000 00:02 123                                /bin/snapuserd
Size:               2048 kB
Rss:                1800 kB
Anonymous:             0 kB
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Rss:                3000 kB
Anonymous:          3000 kB
7ffd0000-7ffd2000 rw-p 00000000 00:00 0                                  [stack]
Size:                132 kB
Rss:                  12 kB
Anonymous:            12 kB
";

    #[test]
    fn mappings_and_their_figures() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].name, "/bin/snapuserd");
        assert_eq!(
            (m[0].size_kib, m[0].rss_kib, m[0].anon_kib),
            (2048, 1800, 0)
        );
        assert_eq!(m[1].name, "");
        assert_eq!(m[1].start, 0x7f00_0000_0000);
        assert_eq!((m[1].rss_kib, m[1].anon_kib), (3000, 3000));
        assert_eq!(m[2].name, "[stack]");
        assert_eq!(m[2].perms, "rw-p");
    }

    #[test]
    fn report_biggest_first_and_the_rest() {
        let lines = report(&parse(SAMPLE), 100);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("rss_kib 3000 anon_kib 3000") && lines[0].ends_with("name -"));
        assert!(lines[1].ends_with("name /bin/snapuserd"));
        assert_eq!(lines[2], "rest mappings 1 rss_kib 12 anon_kib 12");
    }
}
