//! Fuzz target: arbitrary bytes through the record codec (`Records`,
//! `Frames`, `decode_record`) and the transaction boundary parser. Nothing
//! may panic, and whatever is accepted must be self-consistent; see
//! `record_decode_check.rs` (also run on stable by `common/tests/binlog_props.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("record_decode_check.rs");

fuzz_target!(|data: &[u8]| check(data));
