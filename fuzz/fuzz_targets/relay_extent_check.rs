// Body of the `relay_extent` fuzz target, kept in its own file so that
// `slave/tests/fullsync_props.rs` can `include!` it and run it on stable.
//
// `floor::segment_extent` reads a relay log segment as it is on disk (before
// the binlog's own recovery) to find the highest index it may have received.
// Input: 8 bytes of the segment's first index (little endian), then the
// segment's bytes. The property: no panic and no endless loop on any bytes;
// the extent is never below the last Commit of the segment's valid prefix nor
// below `first - 1`; for a segment that is valid records only, it is exactly
// its last Commit.

use tern_common::record::{EventKind, Records};
use tern_slave::floor::segment_extent;

pub fn check(data: &[u8]) -> u64 {
    let (first, bytes) = match data.split_first_chunk::<8>() {
        Some((head, rest)) => (u64::from_le_bytes(*head), rest),
        None => (1, data),
    };
    let extent = segment_extent(first, bytes);
    assert!(extent >= first.saturating_sub(1));
    let mut records = Records::new(bytes);
    let mut last_commit = first.saturating_sub(1);
    let mut whole = true;
    for r in records.by_ref() {
        match r {
            Ok((ev, _)) => {
                if matches!(ev.kind, EventKind::Commit { .. }) {
                    last_commit = last_commit.max(ev.index);
                }
            }
            Err(_) => {
                whole = false;
                break;
            }
        }
    }
    assert!(
        extent >= last_commit,
        "extent {extent} below the valid prefix's commit {last_commit}"
    );
    if whole && records.offset() == bytes.len() {
        assert_eq!(extent, last_commit);
    }
    extent
}
