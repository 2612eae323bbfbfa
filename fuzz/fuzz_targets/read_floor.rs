//! Fuzz target: arbitrary bytes as the content of `READ_FLOOR`
//! (`tern_slave::floor::decode`).
//! The body is `read_floor_check.rs`, also run on stable by the property tests.

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("read_floor_check.rs");

fuzz_target!(|data: &[u8]| check(data));
