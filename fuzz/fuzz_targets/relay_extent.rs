//! Fuzz target: arbitrary bytes as a relay log segment read for the read
//! floor (`tern_slave::floor::segment_extent`).
//! The body is `relay_extent_check.rs`, also run on stable by the property tests.

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("relay_extent_check.rs");

fuzz_target!(|data: &[u8]| {
    check(data);
});
