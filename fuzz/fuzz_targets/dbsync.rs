//! Fuzz target: arbitrary bytes as a DbSync stream received by a slave
//! (`tern_slave::fullsync::check_header`, `check_chunk`).
//! The body is `dbsync_check.rs`, also run on stable by the property tests.

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("dbsync_check.rs");

fuzz_target!(|data: &[u8]| {
    check(data);
});
