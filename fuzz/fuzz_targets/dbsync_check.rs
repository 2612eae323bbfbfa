// Body of the `dbsync` fuzz target, kept in its own file so that
// `slave/tests/fullsync_props.rs` can `include!` it and run it on stable.
//
// A DbSync stream as the slave receives it: length-delimited `DbSyncChunk`s,
// the first a header. The header goes through `fullsync::check_header`, each
// data chunk through `fullsync::check_chunk` and the contiguity check of
// `fullsync::receive` (files are kept in memory here). The property: no
// panic; accepted file names stay inside the files directory (no root, no
// `..`, no `.`), listed once, their sizes summing to `total_bytes`; an accepted
// chunk matches its crc32c and never takes a file past its size.

use std::collections::HashMap;
use std::path::{Component, Path};

use prost::Message;
use tern_common::proto::replication::v1 as pb;
use tern_slave::fullsync::{check_chunk, check_header};

/// Where the checked stream's files would go.
pub const FILES_DIR: &str = "/staging/fullsync/snap/files";

/// How the stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Not a header first, or a header `check_header` refused.
    BadHeader,
    /// A chunk was refused (or did not decode, or came after the end).
    BadChunk,
    /// `DbSyncDone` with every file complete and matching its crc32c.
    Complete,
    /// `DbSyncDone` with a file short or with the wrong crc32c.
    Discarded,
    /// The bytes ran out before `DbSyncDone`.
    Cut,
}

/// Runs the stream in `data`; returns how it ended and the bytes accepted.
pub fn check(data: &[u8]) -> (End, u64) {
    let mut rest = data;
    let Ok(first) = pb::DbSyncChunk::decode_length_delimited(&mut rest) else {
        return (End::BadHeader, 0);
    };
    let Some(pb::db_sync_chunk::Kind::Header(header)) = first.kind else {
        return (End::BadHeader, 0);
    };
    let files_dir = Path::new(FILES_DIR);
    let Ok((sizes, total)) = check_header(&header, files_dir) else {
        return (End::BadHeader, 0);
    };
    assert_eq!(total, header.total_bytes);
    assert_eq!(sizes.len(), header.files.len(), "every file listed once");
    for f in &header.files {
        assert!(!f.name.is_empty() && !Path::new(&f.name).is_absolute());
        assert!(
            Path::new(&f.name)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        );
        let (size, crc, path) = &sizes[&f.name];
        assert_eq!((*size, *crc), (f.size, f.crc32c));
        assert!(path.starts_with(files_dir) && path != files_dir);
        assert!(
            path.components()
                .all(|c| !matches!(c, Component::ParentDir | Component::CurDir))
        );
    }
    let distinct: std::collections::HashSet<_> = sizes.values().map(|(_, _, p)| p).collect();
    assert_eq!(distinct.len(), sizes.len(), "two names for one file");
    let sid = Path::new(&header.snapshot_id);
    assert!(!header.snapshot_id.is_empty() && header.snapshot_id.len() <= 128);
    assert!(matches!(
        sid.components().collect::<Vec<_>>()[..],
        [Component::Normal(_)]
    ));
    let mut files: HashMap<&str, Vec<u8>> = HashMap::new();
    let mut done = 0u64;
    loop {
        if rest.is_empty() {
            return (End::Cut, done);
        }
        let Ok(msg) = pb::DbSyncChunk::decode_length_delimited(&mut rest) else {
            return (End::BadChunk, done);
        };
        match msg.kind {
            Some(pb::db_sync_chunk::Kind::Data(c)) => {
                let Ok((size, _, _)) = check_chunk(&sizes, &c) else {
                    return (End::BadChunk, done);
                };
                assert_eq!(crc32c::crc32c(&c.data), c.crc32c);
                let file = files
                    .entry(sizes.get_key_value(&c.name).expect("listed").0)
                    .or_default();
                if c.offset != file.len() as u64 {
                    return (End::BadChunk, done);
                }
                file.extend_from_slice(&c.data);
                assert!(file.len() as u64 <= *size);
                done += c.data.len() as u64;
                assert!(done <= total);
            }
            Some(pb::db_sync_chunk::Kind::Done(_)) => break,
            _ => return (End::BadChunk, done),
        }
    }
    let whole = sizes.iter().all(|(name, (size, crc, _))| {
        let data = files.get(name.as_str()).map_or(&[][..], |d| d.as_slice());
        data.len() as u64 == *size && crc32c::crc32c(data) == *crc
    });
    (if whole { End::Complete } else { End::Discarded }, done)
}
