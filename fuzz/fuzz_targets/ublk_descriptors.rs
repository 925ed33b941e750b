//! Fuzz target: ublk completions and descriptors as a queue meets them, decided and served
//! over a pattern handler. See `snapuserd::fuzz_harness::ublk_descriptors`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    snapuserd::fuzz_harness::ublk_descriptors(data);
});
