// Body of the `read_floor` fuzz target, kept in its own file so that
// `slave/tests/fullsync_props.rs` can `include!` it and run it on stable.
//
// The property: any content of `data_dir/READ_FLOOR` decodes without a panic;
// an accepted floor writes back (`Display`, as `floor::store` does) to text
// that decodes to the same floor; a refusal carries bounded text.

use tern_slave::floor;

pub fn check(data: &[u8]) {
    match floor::decode(data) {
        Ok(f) => {
            assert!(data.len() <= 128);
            let written = format!("{f}\n");
            assert_eq!(floor::decode(written.as_bytes()), Ok(f));
        }
        // 128 bytes, each at worst one U+FFFD (3 bytes).
        Err(text) => assert!(text.len() <= 3 * 128),
    }
}
