//! Fuzz target: arbitrary bytes as a `SlaveMessage` and as a `DbSyncRequest`, through
//! the checked conversions of `tern_common::wire`.
//! The body is `wire_check.rs`, also run on stable by the property tests.

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("wire_check.rs");

fuzz_target!(|data: &[u8]| check(data));
