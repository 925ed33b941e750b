//! Walking an xtask command's words: each flag's value, and the flags several commands share
//! (`--kernel`, `--timeout`).

use crate::deps::KernelSeries;
use crate::error::{Result, XtaskError};

/// The words of one command, walked flag by flag.
pub struct Flags<'a> {
    words: std::slice::Iter<'a, String>,
    /// Appended to a missing-value error (`; usage: ...`), or empty.
    hint: String,
}

impl<'a> Flags<'a> {
    /// Walk `args`; `hint` (if not empty) is appended to the error of a missing value.
    pub fn new(args: &'a [String], hint: &str) -> Self {
        Self {
            words: args.iter(),
            hint: if hint.is_empty() {
                String::new()
            } else {
                format!("; {hint}")
            },
        }
    }

    /// The next flag, if any.
    pub fn next_flag(&mut self) -> Option<&'a str> {
        self.words.next().map(String::as_str)
    }

    /// The value following `flag`.
    pub fn value(&mut self, flag: &str) -> Result<String> {
        self.words
            .next()
            .cloned()
            .ok_or_else(|| XtaskError::Usage(format!("{flag} needs a value{}", self.hint)))
    }

    /// The kernel series following `--kernel`.
    pub fn kernel(&mut self) -> Result<KernelSeries> {
        KernelSeries::parse(&self.value("--kernel")?)
    }

    /// The seconds following `--timeout`.
    pub fn timeout(&mut self) -> Result<u64> {
        let v = self.value("--timeout")?;
        v.parse()
            .map_err(|_| XtaskError::Usage(format!("bad --timeout {v}")))
    }
}

/// The kernels named, or every series when none was.
pub fn kernels_or_all(kernels: Vec<KernelSeries>) -> Vec<KernelSeries> {
    if kernels.is_empty() {
        KernelSeries::ALL.to_vec()
    } else {
        kernels
    }
}

/// Owned command words from string literals, for the option parsers' tests.
#[cfg(test)]
pub fn words(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_kernels_and_timeouts() {
        let args = words(&["--kernel", "6.12", "--timeout", "90", "--filter"]);
        let mut f = Flags::new(&args, "usage: x");
        assert_eq!(f.next_flag(), Some("--kernel"));
        assert_eq!(f.kernel().unwrap(), KernelSeries::V6_12);
        assert_eq!(f.next_flag(), Some("--timeout"));
        assert_eq!(f.timeout().unwrap(), 90);
        assert_eq!(f.next_flag(), Some("--filter"));
        let e = f.value("--filter").unwrap_err().to_string();
        assert!(e.contains("--filter needs a value; usage: x"), "{e}");
        assert_eq!(f.next_flag(), None);
    }

    #[test]
    fn a_bad_timeout_is_refused() {
        let args = words(&["soon"]);
        assert!(Flags::new(&args, "").timeout().is_err());
    }

    #[test]
    fn no_kernel_named_means_all() {
        assert_eq!(kernels_or_all(Vec::new()), KernelSeries::ALL.to_vec());
        let one = vec![KernelSeries::V6_1];
        assert_eq!(kernels_or_all(one.clone()), one);
    }
}
