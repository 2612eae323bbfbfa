//! Fuzz target: a sequence of length-delimited `SlaveMessage`s against a streaming
//! session's checks and its `SyncWindow`.
//! The body is `sync_session_check.rs`, also run on stable by the property tests.

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("sync_session_check.rs");

fuzz_target!(|data: &[u8]| {
    check(data);
});
