//! Printing an error with its causes.
//!
//! Every error of these crates names only its own context in its message and returns what
//! caused it as its `source`, so a message never repeats its cause; logs and the command
//! line print the whole chain through [`ErrorChain`], each cause once.

use std::fmt;

/// Displays an error and each of its causes, separated by `: `.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'a));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening {path}")]
    struct Open {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_printed_once_in_order() {
        let e = Open {
            path: "/dev/x",
            source: std::io::Error::other("no such device"),
        };
        assert_eq!(ErrorChain(&e).to_string(), "opening /dev/x: no such device");
    }
}
