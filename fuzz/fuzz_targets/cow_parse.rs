//! Fuzz target: open arbitrary bytes as a COW file (v2/v3, complete and at
//! labels), walk file and merge order, and read every block.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cow_format::fuzz_harness::run(data);
});
