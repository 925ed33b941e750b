//! Fuzz target: a byte stream as the kernel writes it to `/dev/dm-user/<misc>` (after a
//! selector byte choosing the COW), served by one snapuserd transport worker over a real
//! COW file. See `snapuserd::fuzz_harness` for what is checked.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use snapuserd::fuzz_harness::DmUserFixture;

static FIXTURE: OnceLock<DmUserFixture> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let fixture = FIXTURE.get_or_init(|| {
        // libFuzzer's own main does not set SIGPIPE to ignored as Rust's does; a worker
        // that stopped reading must show up as a failed check, not a killed process.
        // SAFETY: setting a signal disposition to SIG_IGN installs no handler code.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        DmUserFixture::create().expect("create the fixture files")
    });
    fixture.run_stream(data);
});
