//! Fuzz target: open arbitrary bytes as an update_engine payload, inspect it,
//! extract and convert its small partitions to COW files, and feed the bytes
//! to the bsdiff patcher and every operation applier.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ota_tools::payload::fuzz_harness::run(data);
});
