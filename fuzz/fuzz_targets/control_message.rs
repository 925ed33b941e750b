//! Fuzz target: one control-socket message, and its NUL-separated pieces as the daemon's
//! command line. See `snapuserd::fuzz_harness::control_message`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    snapuserd::fuzz_harness::control_message(data);
});
