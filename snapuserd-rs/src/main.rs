//! snapuserd: the userspace snapshot daemon (entry point filled in by the daemon work).

fn main() {}
