//! Fuzz target: parse arbitrary bytes as an Android sparse image and, when accepted, read
//! it back whole, by block and at odd spans. See `ota_tools::sparse::fuzz_harness`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ota_tools::sparse::fuzz_harness::run(data);
});
