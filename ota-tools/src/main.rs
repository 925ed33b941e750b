//! `ota-tools`: command-line front end; the work is done in the library.

fn main() {}
