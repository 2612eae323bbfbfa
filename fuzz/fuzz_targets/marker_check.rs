// Body of the `clean_shutdown_marker` fuzz target, kept in its own file so
// that `common/tests/wire_props.rs` can `include!` it and run it on stable.
//
// The property: any content of `data_dir/CLEAN_SHUTDOWN` parses without a
// panic into `Missing`-free `CleanStop` values: a position that writes back
// to a marker parsed as itself, or `Unreadable` text of bounded length (only
// the first 256 bytes are read).

use tern_common::marker::{CleanStop, parse_clean_shutdown};

pub fn check(data: &[u8]) {
    match parse_clean_shutdown(data) {
        CleanStop::Missing => panic!("content parsed as a missing marker"),
        CleanStop::At(p) => {
            // What `write_clean_shutdown` writes for it.
            let written = p.map_or("none".to_string(), |p| p.to_string()) + "\n";
            assert_eq!(parse_clean_shutdown(written.as_bytes()), CleanStop::At(p));
            assert!(CleanStop::At(p).matches(p.map(|p| p.repl_id), p.map_or(0, |p| p.index.get())));
        }
        CleanStop::Unreadable(text) => {
            // 256 bytes, each at worst one U+FFFD (3 bytes).
            assert!(text.len() <= 3 * 256);
            assert!(!CleanStop::Unreadable(text).matches(None, 0));
        }
    }
}
