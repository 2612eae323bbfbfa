//! Fuzz target: arbitrary bytes as a stored history list
//! (`Histories::decode_ancestors`).
//! The body is `history_check.rs`, also run on stable by the property tests.

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("history_check.rs");

fuzz_target!(|data: &[u8]| check(data));
