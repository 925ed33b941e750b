//! Rate limiting for log lines that a peer can trigger once per request.
//!
//! A kernel (or a fuzzer) can send a bad request thousands of times a second; logging each
//! one would flood logd and cost more than serving the request. A [`LogLimit`] lets a burst
//! of lines through per interval and counts the rest, so the next line that gets through can
//! say how many were left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines let through per interval.
const BURST: u32 = 10;
/// Length of an interval.
const INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// A budget of `BURST` log lines per `INTERVAL`.
#[derive(Debug, Default)]
pub struct LogLimit {
    window: Mutex<Window>,
}

impl LogLimit {
    /// A fresh budget.
    pub const fn new() -> Self {
        Self {
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(left_out)` if a line may be logged now, with the number of lines left out since
    /// the last one that was; `None` if this one must be left out (it is counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = match self.window.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let expired = w
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= INTERVAL);
        if expired {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged >= BURST {
            w.suppressed = w.suppressed.saturating_add(1);
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

/// Log at `level` through `limit`; a line that gets through after others were left out says
/// how many.
#[macro_export]
macro_rules! log_limited {
    ($limit:expr, $level:expr, $($arg:tt)+) => {
        if let Some(left_out) = $limit.allow() {
            if left_out > 0 {
                log::log!($level, "{left_out} similar messages not logged");
            }
            log::log!($level, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_lines_are_counted_until_the_next_interval() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(limit.allow_at(t0), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(limit.allow_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(limit.allow_at(t0 + INTERVAL), Some(7));
        assert_eq!(limit.allow_at(t0 + INTERVAL), Some(0));
    }
}
