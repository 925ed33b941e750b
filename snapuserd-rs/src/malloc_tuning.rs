//! Keep freed heap memory from staying resident in the daemon (glibc's malloc).
//!
//! The daemon's big buffers come and go: a merge window's saved sources (up to 2 MiB) are
//! allocated per window and freed after it, on the merge thread. glibc's defaults keep such
//! memory: after the first large buffer is freed, its *dynamic* mmap threshold rises to that
//! buffer's size, so later buffers of up to that size come from the thread's arena, and the
//! arena is only trimmed once more than twice that is free at its top. With `mlockall` the
//! kept pages stay locked, too. In the emulator demo that left a freed 2 MiB window resident
//! next to the live one at the peak of the merge (`BENCHMARKS.md`, "Daemon memory at the
//! peak of the merge").
//!
//! [`return_freed_memory`] fixes both thresholds (which turns the dynamic adjustment off), so
//! every buffer of 128 KiB or more is its own mapping, unmapped when freed, and arenas give
//! back free space at their top beyond 128 KiB; and it caps the number of arenas, so the
//! handful of threads (workers, merge, control) do not each hold a partly used 64 MiB heap
//! reservation. Bionic (Android) has its own allocator and its own knobs: there the function
//! does nothing.

/// Allocations of this size or more get their own mapping (glibc `M_MMAP_THRESHOLD`).
pub const MMAP_THRESHOLD_BYTES: i32 = 128 * 1024;
/// Free space at the top of a heap beyond this is returned (glibc `M_TRIM_THRESHOLD`).
pub const TRIM_THRESHOLD_BYTES: i32 = 128 * 1024;
/// At most this many malloc arenas (glibc `M_ARENA_MAX`; its default is 8 per CPU).
pub const ARENA_MAX: i32 = 2;

/// A setting the allocator refused.
#[derive(Debug, thiserror::Error)]
pub enum MallocTuningError {
    /// `mallopt` returned 0 for this parameter.
    #[error(
        "mallopt({parameter}, {value}) refused; freed buffers may stay resident (the daemon \
         works, with a higher RSS after large buffers come and go)"
    )]
    Refused {
        /// The parameter's glibc name.
        parameter: &'static str,
        /// The value asked for.
        value: i32,
    },
}

/// Apply the settings above to glibc's malloc. Call it before any thread starts. On other
/// C libraries it does nothing and returns `Ok`.
pub fn return_freed_memory() -> Result<(), MallocTuningError> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (param, parameter, value) in [
        (
            libc::M_MMAP_THRESHOLD,
            "M_MMAP_THRESHOLD",
            MMAP_THRESHOLD_BYTES,
        ),
        (
            libc::M_TRIM_THRESHOLD,
            "M_TRIM_THRESHOLD",
            TRIM_THRESHOLD_BYTES,
        ),
        (libc::M_ARENA_MAX, "M_ARENA_MAX", ARENA_MAX),
    ] {
        // SAFETY: mallopt takes two integers and only changes the allocator's parameters;
        // glibc serialises it against concurrent allocations with the arena locks.
        if unsafe { libc::mallopt(param, value) } != 1 {
            return Err(MallocTuningError::Refused { parameter, value });
        }
    }
    Ok(())
}
