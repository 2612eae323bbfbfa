//! Fuzz target: arbitrary bytes as the content of the clean-shutdown
//! marker (`tern_common::marker::parse_clean_shutdown`).
//! The body is `marker_check.rs`, also run on stable by the property tests.

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("marker_check.rs");

fuzz_target!(|data: &[u8]| check(data));
