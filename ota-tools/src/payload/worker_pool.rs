//! The rayon worker pool of the payload commands.

/// The worker pool could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {threads} worker threads")]
pub struct WorkerPoolError {
    /// Threads asked for.
    pub threads: usize,
    /// The cause.
    #[source]
    pub source: rayon::ThreadPoolBuildError,
}

/// A pool of `threads` workers (0: one per core).
pub fn build(threads: usize) -> Result<rayon::ThreadPool, WorkerPoolError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|source| WorkerPoolError { threads, source })
}
