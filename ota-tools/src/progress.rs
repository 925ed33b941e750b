//! Progress reporting on stderr, shown only when stderr is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-count progress bar that is invisible unless stderr is a terminal
/// (so scripts and CI logs stay clean).
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for `total` bytes labelled `what`.
    pub fn bytes(what: &str, total: u64) -> Self {
        Self::with_template(
            what,
            total,
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
    }

    /// A count progress bar for `total` items labelled `what`.
    pub fn items(what: &str, total: u64) -> Self {
        Self::with_template(what, total, "{msg} [{bar:40}] {pos}/{len} eta {eta}")
    }

    /// A bar for `total` units labelled `what`, drawn with the indicatif
    /// `template` on a terminal, hidden elsewhere.
    fn with_template(what: &str, total: u64, template: &str) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_string());
            bar
        } else {
            ProgressBar::hidden()
        };
        Self { bar }
    }

    /// A bar that never draws (for library callers and tests).
    pub fn hidden() -> Self {
        Self {
            bar: ProgressBar::hidden(),
        }
    }

    /// Record `n` more bytes done.
    pub fn advance(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Remove the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
