//! Property tests that run the bodies of the fuzz targets over the slave's
//! decoders of network and disk bytes on stable (cargo-fuzz needs nightly):
//! `dbsync` (a DbSync stream: header, chunks, done, through
//! `fullsync::check_header` / `check_chunk`), `read_floor` (the content of
//! `READ_FLOOR`) and `relay_extent` (a relay log segment read for the floor). Each runs on random bytes and on mutated valid encodings,
//! with a bounded number of cases; plus the hostile headers and chunks the
//! checks must refuse.

use std::path::Path;

use proptest::prelude::*;
use prost::Message;
use tern_common::position::ReplId;
use tern_common::proto::replication::v1 as pb;
use tern_common::record::{Event, encode_record};
use tern_slave::floor::{self, Floor};
use tern_slave::fullsync::{FullSyncError, check_chunk, check_header};

mod mutations {
    include!("../../fuzz/support/mutations.rs");
}
mod dbsync_body {
    include!("../../fuzz/fuzz_targets/dbsync_check.rs");
}
mod floor_body {
    include!("../../fuzz/fuzz_targets/read_floor_check.rs");
}
mod extent_body {
    include!("../../fuzz/fuzz_targets/relay_extent_check.rs");
}

use dbsync_body::{End, FILES_DIR};
use mutations::{apply, arb_mutations};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A snapshot: file names and contents.
fn arb_files() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::btree_map(
        "(sub/)?[0-9]{6}\\.(sst|log)|MANIFEST-[0-9]{6}|CURRENT|OPTIONS-[0-9]{2}",
        prop::collection::vec(any::<u8>(), 0..300),
        0..5,
    )
    .prop_map(|m| m.into_iter().collect())
}

fn header(snapshot_id: &str, files: &[(String, Vec<u8>)]) -> pb::DbSyncHeader {
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    pb::DbSyncHeader {
        snapshot_id: snapshot_id.into(),
        repl_id: ReplId(9).to_string(),
        index: 42,
        files: files
            .iter()
            .map(|(name, data)| pb::SnapshotFile {
                name: name.clone(),
                size: data.len() as u64,
                crc32c: crc32c::crc32c(data),
            })
            .collect(),
        total_bytes: total,
        last_seq: 7,
        bytes_to_send: total,
    }
}

fn chunk(name: &str, offset: u64, data: &[u8]) -> pb::FileChunk {
    pb::FileChunk {
        name: name.into(),
        offset,
        data: data.to_vec().into(),
        crc32c: crc32c::crc32c(data),
    }
}

/// The stream a master sends for `files`, chunks of at most `chunk_len` bytes.
fn encode_stream(files: &[(String, Vec<u8>)], chunk_len: usize) -> Vec<u8> {
    use pb::db_sync_chunk::Kind;
    let mut out = Vec::new();
    let mut put = |kind: Kind| {
        pb::DbSyncChunk { kind: Some(kind) }
            .encode_length_delimited(&mut out)
            .expect("a Vec grows")
    };
    put(Kind::Header(header("snap-1", files)));
    for (name, data) in files {
        for (i, piece) in data.chunks(chunk_len).enumerate() {
            put(Kind::Data(chunk(name, (i * chunk_len) as u64, piece)));
        }
    }
    put(Kind::Done(pb::DbSyncDone { bytes_sent: 0 }));
    out
}

fn protocol_error(r: Result<impl std::fmt::Debug, FullSyncError>) -> String {
    match r {
        Err(FullSyncError::Protocol(m)) => m,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn dbsync_random_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        dbsync_body::check(&data);
    }

    #[test]
    fn dbsync_valid_and_mutated(
        files in arb_files(),
        chunk_len in 1..200usize,
        muts in arb_mutations(3),
    ) {
        let bytes = encode_stream(&files, chunk_len);
        let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
        // The valid stream is taken whole and verified.
        prop_assert_eq!(dbsync_body::check(&bytes), (End::Complete, total));
        let (end, done) = dbsync_body::check(&apply(bytes, &muts));
        prop_assert!(done <= total || end != End::Complete);
    }

    #[test]
    fn read_floor_random_bytes(data in prop::collection::vec(any::<u8>(), 0..200)) {
        floor_body::check(&data);
    }

    #[test]
    fn read_floor_valid_and_mutated(
        repl_id in prop::option::of(any::<u128>()),
        index in prop_oneof![0..100u64, Just(u64::MAX), any::<u64>()],
        muts in arb_mutations(3),
    ) {
        let f = Floor { repl_id: repl_id.map(ReplId), index };
        let text = format!("{f}\n").into_bytes();
        prop_assert_eq!(floor::decode(&text), Ok(f));
        floor_body::check(&text);
        floor_body::check(&apply(text, &muts));
    }

    #[test]
    fn relay_extent_random_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        extent_body::check(&data);
    }

    #[test]
    fn relay_extent_valid_and_mutated(
        first in prop_oneof![1..100u64, Just(u64::MAX - 40), 1..=u64::MAX],
        txns in prop::collection::vec(0..4u64, 0..8),
        muts in arb_mutations(3),
    ) {
        // `first` as the input's prefix, then transactions of `puts` Puts each.
        let mut bytes = first.to_le_bytes().to_vec();
        let mut index = first;
        let mut last_commit = first - 1;
        for (seq, puts) in (1u64..).zip(&txns) {
            if index.checked_add(puts + 1).is_none() {
                break;
            }
            encode_record(&Event::begin(index, seq, 0), &mut bytes);
            for i in 0..*puts {
                encode_record(&Event::put(index + 1 + i, "k", "v"), &mut bytes);
            }
            last_commit = index + 1 + puts;
            encode_record(&Event::commit(last_commit, seq), &mut bytes);
            index = last_commit + 1;
        }
        prop_assert_eq!(extent_body::check(&bytes), last_commit);
        extent_body::check(&apply(bytes, &muts));
    }

    /// Any header naming a file outside the files directory is refused.
    #[test]
    fn dbsync_path_traversal_refused(
        files in arb_files(),
        bad in prop_oneof![
            Just("../db/CURRENT".to_string()),
            Just("/etc/passwd".to_string()),
            Just("sub/../../x".to_string()),
            Just("./CURRENT".to_string()),
            Just("..".to_string()),
            Just(String::new()),
            "[a-z]{1,4}/\\.\\./\\.\\./[a-z]{1,4}",
        ],
        at in any::<prop::sample::Index>(),
    ) {
        let mut h = header("snap-1", &files);
        let i = at.index(h.files.len() + 1);
        h.files.insert(i, pb::SnapshotFile { name: bad.clone(), size: 0, crc32c: 0 });
        let msg = protocol_error(check_header(&h, Path::new(FILES_DIR)));
        prop_assert_eq!(msg, format!("bad file name {bad:?}"));
    }
}

#[test]
fn dbsync_hostile_headers_are_refused() {
    let dir = Path::new(FILES_DIR);
    let files = vec![("a/b".to_string(), vec![1u8; 10])];
    let ok = header("snap-1", &files);
    let (sizes, total) = check_header(&ok, dir).unwrap();
    assert_eq!(total, 10);
    assert_eq!(
        sizes["a/b"],
        (10, crc32c::crc32c(&[1; 10]), dir.join("a/b"))
    );
    for id in ["", "..", ".", "a/b", "/abs", &"s".repeat(129)] {
        let h = pb::DbSyncHeader {
            snapshot_id: id.into(),
            ..ok.clone()
        };
        assert_eq!(
            protocol_error(check_header(&h, dir)),
            format!("bad snapshot id {id:?}")
        );
    }
    // Two names of one file.
    for twin in ["a/b", "a//b", "a/b/"] {
        let mut h = ok.clone();
        h.files.push(pb::SnapshotFile {
            name: twin.into(),
            size: 0,
            crc32c: 0,
        });
        assert_eq!(
            protocol_error(check_header(&h, dir)),
            format!("file {twin:?} listed twice")
        );
    }
    // Sizes whose sum does not fit in a u64 (this used to overflow).
    let mut h = ok.clone();
    h.files = ["x", "y"]
        .map(|name| pb::SnapshotFile {
            name: name.into(),
            size: u64::MAX / 2 + 1,
            crc32c: 0,
        })
        .into();
    h.total_bytes = 0;
    assert_eq!(
        protocol_error(check_header(&h, dir)),
        format!("file sizes add up to more than {} bytes", u64::MAX)
    );
    let h = pb::DbSyncHeader {
        total_bytes: 11,
        ..ok.clone()
    };
    assert_eq!(
        protocol_error(check_header(&h, dir)),
        "header total 11 is not the sum of its files 10"
    );
}

#[test]
fn dbsync_hostile_chunks_are_refused() {
    let dir = Path::new(FILES_DIR);
    let (sizes, _) = check_header(&header("snap-1", &[("f".into(), vec![0; 10])]), dir).unwrap();
    assert_eq!(check_chunk(&sizes, &chunk("f", 4, &[0; 6])).unwrap().0, 10);
    assert_eq!(
        protocol_error(check_chunk(&sizes, &chunk("g", 0, &[0]))),
        "chunk for unknown file \"g\""
    );
    let mut bad_crc = chunk("f", 0, &[1, 2]);
    bad_crc.crc32c ^= 1;
    assert_eq!(
        protocol_error(check_chunk(&sizes, &bad_crc)),
        "chunk of f at 0 fails its crc32c"
    );
    assert_eq!(
        protocol_error(check_chunk(&sizes, &chunk("f", 5, &[0; 6]))),
        "chunk of f at 5 runs past its size 10"
    );
    // An offset at the end of the u64 range (this used to overflow).
    assert_eq!(
        protocol_error(check_chunk(&sizes, &chunk("f", u64::MAX, &[0]))),
        format!("chunk of f at {} runs past its size 10", u64::MAX)
    );
}
