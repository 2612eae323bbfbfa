//! Unit tests of the binlog writer and reader.

use std::fs;

use super::segment::segment_name;
use super::*;
use crate::record::{Event, Frames, Records, encode_record};

/// Records of one transaction `Begin · Put × puts · Commit` starting at
/// `first`; returns the bytes and the Commit's index.
fn txn(first: u64, seq: u64, puts: usize, value_len: usize) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    encode_record(&Event::begin(first, seq, 1_000 + seq), &mut out);
    for i in 0..puts as u64 {
        let key = format!("k{seq}-{i}").into_bytes();
        let value = vec![(seq + i) as u8; value_len];
        encode_record(&Event::put(first + 1 + i, key, value), &mut out);
    }
    let last = first + 1 + puts as u64;
    encode_record(&Event::commit(last, seq), &mut out);
    (out, last)
}

/// Appends `n` transactions; returns all bytes appended.
fn fill(log: &mut Binlog, n: u64, puts: usize, value_len: usize) -> Vec<u8> {
    let mut all = Vec::new();
    for _ in 0..n {
        let seq = log.last_seq().unwrap_or(0) + 1;
        let first = log.next_index();
        let (recs, last) = txn(first, seq, puts, value_len);
        log.append(&recs, first, last, true).unwrap();
        all.extend_from_slice(&recs);
    }
    all
}

/// Bytes of the first `n` records of `recs`.
fn frames_len(recs: &[u8], n: usize) -> usize {
    Frames::new(recs).take(n).map(|f| f.unwrap().len()).sum()
}

/// The records of a segment file, without the zeros written ahead of a tail.
fn log_bytes(path: &Path) -> Vec<u8> {
    let mut bytes = fs::read(path).unwrap();
    let mut it = Records::new(&bytes);
    while let Some(Ok(_)) = it.next() {}
    let end = it.offset();
    bytes.truncate(end);
    bytes
}

fn opts(segment_bytes: u64) -> BinlogOptions {
    BinlogOptions {
        segment_bytes,
        fsync: FsyncPolicy::Always,
    }
}

fn read_all(log: &Binlog, from: u64) -> Vec<u8> {
    let mut r = log.reader();
    r.seek(from).unwrap();
    let mut out = Vec::new();
    while r
        .read_batch(log.last_index(), 1 << 20, &mut out)
        .unwrap()
        .is_some()
    {}
    out
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn empty_dir_gives_empty_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("binlog");
    let (log, report) = Binlog::open(&dir, BinlogOptions::default()).unwrap();
    assert_eq!(
        (log.first_index(), log.last_index(), log.next_index()),
        (1, 0, 1)
    );
    assert_eq!(log.last_seq(), None);
    assert_eq!(log.durable_index(), 0);
    assert_eq!(log.total_bytes(), 0);
    assert_eq!(
        report,
        RecoveryReport {
            segments: 1,
            ..Default::default()
        }
    );
    assert_eq!(segment_files(&dir), [segment_name(1)]);
    assert!(log.is_boundary(0).unwrap());
    assert!(matches!(
        log.is_boundary(1),
        Err(BinlogError::OutOfRange { index: 1, last: 0 })
    ));
    let mut r = log.reader();
    r.seek(1).unwrap();
    let mut out = Vec::new();
    assert_eq!(r.read_batch(0, 100, &mut out).unwrap(), None);
    assert_eq!(r.read_batch(5, 100, &mut out).unwrap(), None);
    assert!(out.is_empty());
}

#[test]
fn append_read_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(1 << 30)).unwrap();
    let all = fill(&mut log, 10, 3, 10);
    assert_eq!(log.last_index(), 50);
    assert_eq!(log.last_seq(), Some(10));
    assert_eq!(log.total_bytes(), all.len() as u64);
    assert_eq!(log.durable_index(), 0);
    log.sync().unwrap();
    assert_eq!(log.durable_index(), 50);
    assert_eq!(read_all(&log, 1), all);

    let mut r = log.reader();
    r.seek(6).unwrap();
    let evs = r.read_events(10, 1 << 20).unwrap();
    assert_eq!(
        evs.iter().map(|e| e.index).collect::<Vec<_>>(),
        [6, 7, 8, 9, 10]
    );
    assert_eq!(evs[0], Event::begin(6, 2, 1_002));
    assert_eq!(evs[4], Event::commit(10, 2));
    assert_eq!(r.position(), 11);
    drop(log);

    let (log, report) = Binlog::open(tmp.path(), opts(1 << 30)).unwrap();
    assert_eq!(
        report,
        RecoveryReport {
            truncated_bytes: 0,
            truncated_events: 0,
            last_index: 50,
            last_seq: Some(10),
            segments: 1,
        }
    );
    assert_eq!(log.durable_index(), 50);
    assert_eq!(read_all(&log, 1), all);
}

#[test]
fn append_rejects_bad_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(1 << 30)).unwrap();
    let (recs, last) = txn(1, 1, 2, 4);
    assert!(matches!(
        log.append(&recs, 2, last + 1, true),
        Err(BinlogError::NotContiguous {
            expected: 1,
            got: 2
        })
    ));
    assert!(matches!(
        log.append(&recs, 1, last + 1, true),
        Err(BinlogError::BadBatch { .. })
    ));
    assert!(matches!(
        log.append(&recs, 1, last - 1, true),
        Err(BinlogError::BadBatch { .. })
    ));
    assert!(matches!(
        log.append(&recs, 1, last, false),
        Err(BinlogError::BadBatch { .. })
    ));
    let mut torn = recs.clone();
    torn.pop();
    assert!(matches!(
        log.append(&torn, 1, last, true),
        Err(BinlogError::BadRecord {
            index: 4,
            source: RecordError::Truncated { .. }
        })
    ));
    let mut flipped = recs.clone();
    flipped[10] ^= 1; // inside the Begin's payload
    assert!(matches!(
        log.append(&flipped, 1, last, true),
        Err(BinlogError::BadRecord {
            index: 1,
            source: RecordError::Crc { .. }
        })
    ));
    // Records numbered from 2 announced as 1..
    let (shifted, _) = txn(2, 1, 2, 4);
    assert!(matches!(
        log.append(&shifted, 1, 4, true),
        Err(BinlogError::BadBatch { index: 1, .. })
    ));
    // A batch starting with a Put at a boundary.
    let mut put = Vec::new();
    encode_record(&Event::put(1, &b"k"[..], &b"v"[..]), &mut put);
    assert!(matches!(
        log.append(&put, 1, 1, false),
        Err(BinlogError::Boundary(BoundaryError::DataOutsideTxn {
            index: 1
        }))
    ));
    // Empty batch: no-op.
    log.append(&[], 1, 0, true).unwrap();
    assert!(matches!(
        log.append(&[], 1, 1, true),
        Err(BinlogError::BadBatch { .. })
    ));
    // Nothing was written by any of these.
    assert_eq!(log.last_index(), 0);
    assert_eq!(
        fs::metadata(tmp.path().join(segment_name(1)))
            .unwrap()
            .len(),
        0
    );
    log.append(&recs, 1, last, true).unwrap();
    assert_eq!(log.last_seq(), Some(1));

    // Mid-transaction batches.
    let (recs2, last2) = txn(last + 1, 2, 3, 4);
    let split = frames_len(&recs2, 2);
    log.append(&recs2[..split], last + 1, last + 2, false)
        .unwrap();
    assert!(!log.at_boundary());
    assert_eq!(log.last_seq(), Some(1));
    // A Begin inside the open transaction.
    let (other, _) = txn(last + 3, 3, 0, 0);
    assert!(matches!(
        log.append(&other, last + 3, last + 4, true),
        Err(BinlogError::Boundary(BoundaryError::BeginInTxn { .. }))
    ));
    log.append(&recs2[split..], last + 3, last2, true).unwrap();
    assert!(log.at_boundary());
    assert_eq!(log.last_seq(), Some(2));
}

#[test]
fn segments_roll_only_at_boundaries() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(4096)).unwrap();
    let mut all = Vec::new();
    let mut seq = 1;
    let txn_len = txn(1, 1, 7, 300).0.len();
    // Transactions appended in several pieces each, so some pieces end mid-transaction.
    while log.total_bytes() < 64 << 10 {
        let first = log.next_index();
        let (recs, last) = txn(first, seq, 7, 300);
        let frames: Vec<&[u8]> = Frames::new(&recs).map(|f| f.unwrap()).collect();
        let mut index = first;
        for piece in frames.chunks(2) {
            let bytes = piece.concat();
            let end = index + piece.len() as u64 - 1;
            log.append(&bytes, index, end, end == last).unwrap();
            index = end + 1;
        }
        all.extend_from_slice(&recs);
        seq += 1;
    }
    let files = segment_files(tmp.path());
    assert!(files.len() > 5, "{files:?}");
    // Sealed segments were made durable when the next one started, unasked.
    let tail_first: u64 = files.last().unwrap()[..20].parse().unwrap();
    assert_eq!(log.durable_index(), tail_first - 1);
    log.sync().unwrap();
    assert_eq!(log.durable_index(), log.last_index());
    assert_eq!(files.len(), log.segment_count());
    for name in &files {
        let bytes = log_bytes(&tmp.path().join(name));
        let first: u64 = name[..20].parse().unwrap();
        let evs: Vec<Event> = Records::new(&bytes).map(|r| r.unwrap().0).collect();
        assert_eq!(evs[0].index, first, "{name}");
        assert!(
            matches!(evs[0].kind, EventKind::Begin { .. }),
            "{name} starts with {:?}",
            evs[0]
        );
        assert!(
            matches!(evs.last().unwrap().kind, EventKind::Commit { .. })
                || name == files.last().unwrap()
        );
        // A segment only grows past the limit until the transaction that crossed it ends.
        assert!(bytes.len() < 4096 + txn_len, "{name}: {}", bytes.len());
    }
    assert_eq!(read_all(&log, 1), all);
    // Reopen: sealed segments are not read; reading them builds their sparse index.
    drop(log);
    let (log, report) = Binlog::open(tmp.path(), opts(4096)).unwrap();
    assert_eq!(report.segments, files.len());
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(read_all(&log, 1), all);
    for i in (1..=log.last_index()).step_by(7) {
        let mut r = log.reader();
        r.seek(i).unwrap();
        assert_eq!(r.read_events(i, 0).unwrap()[0].index, i);
    }
}

/// A relay log fed batches that cut transactions anywhere (as a catching-up
/// slave's is) still rolls near `segment_bytes`: a full tail inside a
/// transaction is closed at the next Commit of a batch.
#[test]
fn segments_roll_when_every_append_ends_mid_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(4096)).unwrap();
    let mut stream = Vec::new();
    let mut first = 1;
    for seq in 1..=60 {
        let (recs, last) = txn(first, seq, 7, 300);
        stream.extend_from_slice(&recs);
        first = last + 1;
    }
    let txn_len = txn(1, 1, 7, 300).0.len();
    let frames: Vec<&[u8]> = Frames::new(&stream).map(|f| f.unwrap()).collect();
    let mut index = 1;
    // 5 frames per append: with 9-frame transactions almost no append ends at a Commit.
    for piece in frames.chunks(5) {
        let bytes = piece.concat();
        let end = index + piece.len() as u64 - 1;
        let at_boundary = matches!(
            record::peek(piece.last().unwrap()),
            Some((_, KindTag::Commit))
        );
        log.append(&bytes, index, end, at_boundary).unwrap();
        index = end + 1;
    }
    let files = segment_files(tmp.path());
    assert!(files.len() > 5, "{files:?}");
    for name in &files {
        let bytes = log_bytes(&tmp.path().join(name));
        let evs: Vec<Event> = Records::new(&bytes).map(|r| r.unwrap().0).collect();
        assert!(matches!(evs[0].kind, EventKind::Begin { .. }), "{name}");
        assert!(bytes.len() < 4096 + 2 * txn_len, "{name}: {}", bytes.len());
    }
    assert_eq!(read_all(&log, 1), stream);
    drop(log);
    let (log, report) = Binlog::open(tmp.path(), opts(4096)).unwrap();
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(read_all(&log, 1), stream);
}

#[test]
fn sparse_index_seeks_in_big_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(1 << 20)).unwrap();
    // ~3 MiB in 1 MiB segments, records of ~1 KiB: many sparse entries per segment.
    let all = fill(&mut log, 300, 10, 1000);
    let check = |log: &Binlog| {
        let mut offsets = vec![0usize];
        for r in Records::new(&all) {
            let (_, raw) = r.unwrap();
            offsets.push(offsets.last().unwrap() + raw.len());
        }
        for i in (1..=log.last_index()).step_by(97).chain([log.last_index()]) {
            let mut r = log.reader();
            r.seek(i).unwrap();
            let mut out = Vec::new();
            let (a, b) = r.read_batch(i + 2, 1 << 20, &mut out).unwrap().unwrap();
            assert_eq!(a, i);
            let b = b as usize;
            assert_eq!(out, &all[offsets[i as usize - 1]..offsets[b]]);
        }
    };
    check(&log);
    drop(log);
    let (log, _) = Binlog::open(tmp.path(), opts(1 << 20)).unwrap();
    assert!(log.segment_count() >= 3);
    check(&log);
}

#[test]
fn read_batch_respects_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(2000)).unwrap();
    let all = fill(&mut log, 30, 2, 100);
    let lens: Vec<usize> = Records::new(&all).map(|r| r.unwrap().1.len()).collect();
    for max in [0usize, 1, 50, 130, 300, 1000, 5000] {
        let mut r = log.reader();
        r.seek(1).unwrap();
        let mut out = Vec::new();
        let mut next = 1u64;
        while let Some((a, b)) = r.read_batch(log.last_index(), max, &mut out).unwrap() {
            assert_eq!(a, next);
            let got: usize = lens[a as usize - 1..b as usize].iter().sum();
            assert!(got <= max || a == b, "max {max}: {a}..={b} is {got} bytes");
            // It stops only when the next record would not fit (or at the end).
            if (b as usize) < lens.len() {
                assert!(
                    got + lens[b as usize] > max,
                    "max {max}: stopped early at {b}"
                );
            }
            next = b + 1;
        }
        assert_eq!(next, log.last_index() + 1);
        assert_eq!(out, all);
    }
    // upto_index bounds the batch.
    let mut r = log.reader();
    r.seek(3).unwrap();
    let mut out = Vec::new();
    assert_eq!(r.read_batch(5, 1 << 20, &mut out).unwrap(), Some((3, 5)));
    assert_eq!(r.read_batch(5, 1 << 20, &mut out).unwrap(), None);
    assert_eq!(r.read_batch(2, 1 << 20, &mut out).unwrap(), None);
    assert_eq!(r.read_batch(6, 1 << 20, &mut out).unwrap(), Some((6, 6)));
}

#[test]
fn recovery_truncates_torn_tail_and_partial_txn() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(1 << 30)).unwrap();
    let good = fill(&mut log, 3, 2, 10);
    // A partial transaction (Begin + 2 Puts) then a torn record.
    let (recs, _) = txn(13, 4, 5, 10);
    let frames: Vec<&[u8]> = Frames::new(&recs).map(|f| f.unwrap()).collect();
    let partial = frames[..3].concat();
    log.append(&partial, 13, 15, false).unwrap();
    drop(log);
    let path = tmp.path().join(segment_name(1));
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(&frames[3][..frames[3].len() - 2]);
    fs::write(&path, &bytes).unwrap();

    let (mut log, report) = Binlog::open(tmp.path(), opts(1 << 30)).unwrap();
    assert_eq!(
        report,
        RecoveryReport {
            truncated_bytes: (bytes.len() - good.len()) as u64,
            truncated_events: 3,
            last_index: 12,
            last_seq: Some(3),
            segments: 1,
        }
    );
    assert_eq!(fs::read(&path).unwrap(), good);
    assert_eq!(log.next_index(), 13);
    let more = fill(&mut log, 1, 1, 1);
    assert_eq!(log.last_seq(), Some(4));
    assert_eq!(read_all(&log, 1), [good, more].concat());
}

#[test]
fn recovery_refuses_a_broken_structure() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(1 << 30)).unwrap();
    fill(&mut log, 2, 1, 1);
    drop(log);
    // A well-framed Begin inside a transaction.
    let path = tmp.path().join(segment_name(1));
    let mut bytes = log_bytes(&path);
    encode_record(&Event::begin(7, 3, 0), &mut bytes);
    encode_record(&Event::begin(8, 3, 0), &mut bytes);
    fs::write(&path, &bytes).unwrap();
    match Binlog::open(tmp.path(), opts(1 << 30)) {
        Err(BinlogError::Structure {
            source: BoundaryError::BeginInTxn { index: 8 },
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // The file was left alone.
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[test]
fn recovery_drops_an_empty_tail_and_learns_last_seq() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(100)).unwrap();
    let all = fill(&mut log, 3, 1, 50);
    assert_eq!(log.segment_count(), 3);
    // The crash left a new segment holding only a partial transaction.
    let (recs, _) = txn(10, 4, 1, 1);
    let partial = frames_len(&recs, 2);
    log.append(&recs[..partial], 10, 11, false).unwrap();
    assert_eq!(log.segment_count(), 4);
    drop(log);
    let (log, report) = Binlog::open(tmp.path(), opts(100)).unwrap();
    assert_eq!(report.last_index, 9);
    assert_eq!(report.last_seq, Some(3));
    assert_eq!(report.truncated_events, 2);
    assert_eq!(report.segments, 3);
    assert_eq!(segment_files(tmp.path()).len(), 3);
    assert_eq!(read_all(&log, 1), all);
}

#[test]
fn truncate_after_within_and_across_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(300)).unwrap();
    let all = fill(&mut log, 12, 2, 40); // 4 events per transaction
    let nsegs = log.segment_count();
    assert!(nsegs >= 4, "{nsegs}");
    let offset_of = |index: u64| -> usize {
        Records::new(&all)
            .take(index as usize)
            .map(|r| r.unwrap().1.len())
            .sum()
    };

    assert!(matches!(
        log.truncate_after(46),
        Err(BinlogError::NotBoundary { index: 46 })
    ));
    assert!(matches!(
        log.truncate_after(49),
        Err(BinlogError::OutOfRange {
            index: 49,
            last: 48
        })
    ));
    log.truncate_after(48).unwrap(); // no-op
    assert_eq!(log.last_index(), 48);

    // Within the tail.
    log.truncate_after(44).unwrap();
    assert_eq!(
        (log.last_index(), log.last_seq(), log.at_boundary()),
        (44, Some(11), true)
    );
    assert_eq!(read_all(&log, 1), &all[..offset_of(44)]);

    // Across segments: back to transaction 3.
    let mut far = log.reader();
    far.seek(40).unwrap();
    log.truncate_after(12).unwrap();
    assert_eq!((log.last_index(), log.last_seq()), (12, Some(3)));
    assert_eq!(log.total_bytes(), offset_of(12) as u64);
    assert!(log.segment_count() < nsegs);
    assert_eq!(read_all(&log, 1), &all[..offset_of(12)]);
    // The reader beyond the cut learns it.
    let mut out = Vec::new();
    assert!(matches!(
        far.read_batch(48, 1 << 20, &mut out),
        Err(BinlogError::OutOfRange {
            index: 40,
            last: 12
        })
    ));

    // The log goes on from there, and reopens the same.
    let more = fill(&mut log, 5, 2, 40);
    assert_eq!(log.last_seq(), Some(8));
    let expect = [&all[..offset_of(12)], &more[..]].concat();
    assert_eq!(read_all(&log, 1), expect);
    drop(log);
    let (mut log, report) = Binlog::open(tmp.path(), opts(300)).unwrap();
    assert_eq!((report.last_index, report.truncated_bytes), (32, 0));
    assert_eq!(read_all(&log, 1), expect);

    // Back to nothing at all.
    log.truncate_after(0).unwrap();
    assert_eq!(
        (log.first_index(), log.next_index(), log.last_seq()),
        (1, 1, Some(0))
    );
    assert_eq!(log.total_bytes(), 0);
    assert_eq!(segment_files(tmp.path()), [segment_name(1)]);
    fill(&mut log, 1, 0, 0);
    assert_eq!(log.last_seq(), Some(1));
}

#[test]
fn purge_to_and_is_boundary() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(200)).unwrap();
    let all = fill(&mut log, 10, 1, 150); // 3 events per transaction, one per segment
    assert_eq!(log.segment_count(), 10);
    for i in 0..=30 {
        assert_eq!(log.is_boundary(i).unwrap(), i % 3 == 0, "{i}");
    }

    // A reader inside segment 2 (events 4..=6), another one before it.
    let mut inside = log.reader();
    inside.seek(5).unwrap();
    let mut behind = log.reader();
    behind.seek(1).unwrap();
    let mut out = Vec::new();
    inside.read_batch(5, 1 << 20, &mut out).unwrap();

    assert_eq!(log.purge_to(5).unwrap(), 1); // segment 4..=6 still holds 6
    assert_eq!(log.first_index(), 4);
    assert_eq!(log.purge_to(9).unwrap(), 2);
    assert_eq!(log.first_index(), 10);
    assert_eq!(log.segment_count(), 7);
    assert_eq!(
        log.total_bytes(),
        (all.len()
            - Records::new(&all)
                .take(9)
                .map(|r| r.unwrap().1.len())
                .sum::<usize>()) as u64
    );
    assert!(matches!(
        log.is_boundary(7),
        Err(BinlogError::Purged {
            index: 7,
            first: 10
        })
    ));
    assert!(log.is_boundary(9).unwrap());
    assert!(!log.is_boundary(10).unwrap());

    // The reader inside a purged segment finishes it, and goes on.
    let mut out = Vec::new();
    let offset_of = |index: usize| -> usize {
        Records::new(&all)
            .take(index)
            .map(|r| r.unwrap().1.len())
            .sum()
    };
    assert_eq!(
        inside.read_batch(30, 1 << 20, &mut out).unwrap(),
        Some((6, 6))
    );
    assert_eq!(out, &all[offset_of(5)..offset_of(6)]);
    // ... and reports that what follows is gone too.
    assert!(matches!(
        inside.read_batch(30, 1 << 20, &mut out),
        Err(BinlogError::Purged {
            index: 7,
            first: 10
        })
    ));
    inside.seek(10).unwrap();
    out.clear();
    assert_eq!(
        inside.read_batch(30, 1 << 20, &mut out).unwrap(),
        Some((10, 30))
    );
    assert_eq!(out, &all[offset_of(9)..]);
    // The one behind gets Purged.
    assert!(matches!(
        behind.read_batch(30, 1 << 20, &mut out),
        Err(BinlogError::Purged {
            index: 1,
            first: 10
        })
    ));
    let mut fresh = log.reader();
    assert!(matches!(
        fresh.seek(3),
        Err(BinlogError::Purged {
            index: 3,
            first: 10
        })
    ));

    // Never the tail.
    assert_eq!(log.purge_to(u64::MAX).unwrap(), 6);
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.first_index(), 28);
    drop(log);
    let (log, _) = Binlog::open(tmp.path(), opts(200)).unwrap();
    assert_eq!((log.first_index(), log.last_index()), (28, 30));
    assert!(log.is_boundary(27).unwrap());
    assert!(matches!(
        log.is_boundary(26),
        Err(BinlogError::Purged { .. })
    ));
}

#[test]
fn reset_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(200)).unwrap();
    fill(&mut log, 5, 1, 150);
    let mut r = log.reader();
    r.seek(2).unwrap();
    log.reset(1001, Some(77)).unwrap();
    assert_eq!(
        (log.first_index(), log.last_index(), log.next_index()),
        (1001, 1000, 1001)
    );
    assert_eq!(
        (log.last_seq(), log.durable_index(), log.total_bytes()),
        (Some(77), 1000, 0)
    );
    assert_eq!(segment_files(tmp.path()), [segment_name(1001)]);
    assert!(log.is_boundary(1000).unwrap());
    let mut out = Vec::new();
    assert!(matches!(
        r.read_batch(10, 100, &mut out),
        Err(BinlogError::Purged { .. })
    ));
    let all = fill(&mut log, 2, 1, 1);
    assert_eq!(log.last_seq(), Some(79));
    assert!(matches!(
        log.reset(0, None),
        Err(BinlogError::InvalidArgument(_))
    ));
    drop(log);
    let (log, report) = Binlog::open(tmp.path(), opts(200)).unwrap();
    assert_eq!((report.last_index, report.last_seq), (1006, Some(79)));
    assert_eq!(read_all(&log, 1001), all);
}

#[test]
fn corrupt_sealed_segment_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(200)).unwrap();
    fill(&mut log, 4, 1, 150);
    drop(log);
    let path = tmp.path().join(segment_name(4));
    let mut bytes = fs::read(&path).unwrap();
    bytes[5] ^= 0xff; // the first record's checksum
    fs::write(&path, &bytes).unwrap();
    let (log, report) = Binlog::open(tmp.path(), opts(200)).unwrap();
    assert_eq!(report.last_index, 12); // sealed segments are not read at open
    let mut r = log.reader();
    r.seek(1).unwrap();
    let mut out = Vec::new();
    assert_eq!(r.read_batch(12, 1 << 20, &mut out).unwrap(), Some((1, 3)));
    let before = out.clone();
    match r.read_batch(12, 1 << 20, &mut out) {
        Err(BinlogError::Corrupt {
            segment,
            offset: 0,
            source: RecordError::Crc { .. },
        }) => assert_eq!(segment, path),
        other => panic!("{other:?}"),
    }
    assert_eq!(out, before);
    assert_eq!(r.position(), 4);
    // Seeking into it builds its sparse index, which checks every record.
    let mut r = log.reader();
    assert!(matches!(r.seek(5), Err(BinlogError::Corrupt { .. })));
}

/// A log in `dir` with 1 MiB segments and `policy`.
fn open_with_policy(dir: &Path, policy: FsyncPolicy) -> Binlog {
    let opts = BinlogOptions {
        segment_bytes: 1 << 20,
        fsync: policy,
    };
    Binlog::open(dir, opts).unwrap().0
}

#[test]
fn sync_policies() {
    let tmp = tempfile::tempdir().unwrap();
    for (policy, synced) in [
        (FsyncPolicy::Always, true),
        (FsyncPolicy::Everysec, false),
        (FsyncPolicy::No, false),
    ] {
        let mut log = open_with_policy(&tmp.path().join(policy.as_str()), policy);
        fill(&mut log, 2, 1, 1);
        assert_eq!(log.sync_if_due().unwrap(), synced, "{policy}");
        assert_eq!(log.durable_index(), if synced { 6 } else { 0 }, "{policy}");
        assert!(!log.sync_if_due().unwrap(), "{policy}: nothing pending");
        log.sync().unwrap();
        assert_eq!(log.durable_index(), 6);
    }
}

#[test]
fn fsync_policy_parses() {
    use serde::Deserialize;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as DeError, StrDeserializer};
    for p in [FsyncPolicy::Always, FsyncPolicy::Everysec, FsyncPolicy::No] {
        assert_eq!(p.to_string().parse::<FsyncPolicy>(), Ok(p));
        let de: StrDeserializer<'_, DeError> = p.as_str().into_deserializer();
        assert_eq!(FsyncPolicy::deserialize(de), Ok(p));
    }
    assert!("Always".parse::<FsyncPolicy>().is_err());
    assert!("".parse::<FsyncPolicy>().is_err());
    let de: StrDeserializer<'_, DeError> = "sometimes".into_deserializer();
    assert!(FsyncPolicy::deserialize(de).is_err());
    assert_eq!(FsyncPolicy::default(), FsyncPolicy::Always);
    assert_eq!(BinlogOptions::default().segment_bytes, 64 << 20);
}

#[test]
fn binlog_and_reader_are_send() {
    fn send<T: Send + 'static>() {}
    send::<Binlog>();
    send::<BinlogReader>();
}

#[test]
fn undecodable_records_stop_read_events() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Binlog::open(tmp.path(), opts(1 << 20)).unwrap();
    let good = fill(&mut log, 2, 1, 5);
    // A well-framed record that looks like a Begin but is not protobuf
    // (a length running past the payload): append does not decode it.
    let payload = [0x08, 0x07, 0x12, 0x7f];
    let mut bad = (payload.len() as u32).to_le_bytes().to_vec();
    bad.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    bad.extend_from_slice(&payload);
    log.append(&bad, 7, 7, false).unwrap();

    let mut r = log.reader();
    r.seek(1).unwrap();
    let evs = r.read_events(7, 1 << 20).unwrap();
    assert_eq!(evs.len(), 6);
    assert_eq!(evs.last().unwrap(), &Event::commit(6, 2));
    assert_eq!(r.position(), 7);
    match r.read_events(7, 1 << 20) {
        Err(BinlogError::Corrupt {
            offset,
            source: RecordError::Decode(_),
            ..
        }) => assert_eq!(offset, good.len() as u64),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.position(), 7);
    // The raw bytes can still be read (a relay copies them as they are).
    let mut out = Vec::new();
    assert_eq!(r.read_batch(7, 1 << 20, &mut out).unwrap(), Some((7, 7)));
    assert_eq!(out, bad);
    drop(log);
    // Recovery drops it as undecodable.
    let (log, report) = Binlog::open(tmp.path(), opts(1 << 20)).unwrap();
    assert_eq!(
        (report.last_index, report.truncated_bytes),
        (6, bad.len() as u64)
    );
    assert_eq!(read_all(&log, 1), good);
}

/// Puts a directory where the segment starting at `first` would be created, so
/// creating it fails (as a full disk or a lack of file descriptors would).
fn block_segment(dir: &Path, first: u64) -> PathBuf {
    let path = dir.join(segment_name(first));
    fs::create_dir(&path).unwrap();
    path
}

/// Reopens the log in `dir`: recovery cuts nothing and it holds exactly `all`.
fn reopen_intact(dir: &Path, o: BinlogOptions, all: &[u8]) -> Binlog {
    let (log, report) = Binlog::open(dir, o).unwrap();
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(read_all(&log, 1), all);
    log
}

/// Everything observable about the writer, to compare before and after.
fn writer_view(log: &Binlog) -> (u64, u64, u64, Option<u64>, bool, u64, u64, usize) {
    (
        log.first_index(),
        log.next_index(),
        log.total_bytes(),
        log.last_seq(),
        log.at_boundary(),
        log.last_boundary(),
        log.durable_boundary(),
        log.segment_count(),
    )
}

#[test]
fn failed_roll_leaves_the_log_at_its_last_boundary_and_appendable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("binlog");
    let (mut log, _) = Binlog::open(&dir, opts(200)).unwrap();
    let before_bytes = fill(&mut log, 4, 2, 40);
    log.sync().unwrap();
    assert_eq!(log.segment_count(), 2, "{:?}", segment_files(&dir));
    // The tail is full: the next append rolls, and the new segment cannot be made.
    let view = writer_view(&log);
    let files = segment_files(&dir);
    let first = log.next_index();
    let obstacle = block_segment(&dir, first);
    let (recs, last) = txn(first, 5, 2, 40);
    let err = log.append(&recs, first, last, true).unwrap_err();
    assert!(matches!(err, BinlogError::Io(_)), "{err}");
    assert!(!err.is_fatal() && !err.is_out_of_resources(), "{err}");
    assert_eq!(writer_view(&log), view);
    assert_eq!(read_all(&log, 1), before_bytes);
    // Appending again fails the same way and changes nothing either.
    assert!(matches!(
        log.append(&recs, first, last, true),
        Err(BinlogError::Io(_))
    ));
    assert_eq!(writer_view(&log), view);

    // The cause is gone: the same append works, and everything survives a reopen.
    fs::remove_dir(&obstacle).unwrap();
    assert_eq!(segment_files(&dir), files);
    log.append(&recs, first, last, true).unwrap();
    log.sync().unwrap();
    assert_eq!((log.last_index(), log.last_seq()), (last, Some(5)));
    let mut all = before_bytes;
    all.extend_from_slice(&recs);
    assert_eq!(read_all(&log, 1), all);
    drop(log);
    let log = reopen_intact(&dir, opts(200), &all);
    assert_eq!((log.last_index(), log.last_seq()), (last, Some(5)));
}

#[test]
fn split_append_failing_midway_undoes_its_first_part() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("binlog");
    let (mut log, _) = Binlog::open(&dir, opts(200)).unwrap();
    let mut all = fill(&mut log, 1, 1, 10);
    // A transaction whose Begin and Puts fill the tail past segment_bytes,
    // appended without its Commit (a slave's batch ending mid-transaction).
    let first = log.next_index();
    let (t2, t2_last) = txn(first, 2, 4, 60);
    let cut = frames_len(&t2, 5);
    log.append(&t2[..cut], first, t2_last - 1, false).unwrap();
    all.extend_from_slice(&t2[..cut]);
    log.sync().unwrap();
    assert!(log.total_bytes() >= 200 && !log.at_boundary());
    let view = writer_view(&log);
    let tail_file = dir.join(segment_name(1));
    // A failed append cuts the zeros written ahead too.
    let tail_len = log_bytes(&tail_file).len() as u64;
    assert_eq!(view.5, 3, "last boundary: the first transaction's Commit");

    // The rest of t2 (its Commit) and a whole t3: `append` closes the full
    // tail at t2's Commit (first write), then rolls for t3, which fails.
    let (t3, t3_last) = txn(t2_last + 1, 3, 1, 10);
    let mut batch = t2[cut..].to_vec();
    batch.extend_from_slice(&t3);
    let obstacle = block_segment(&dir, t2_last + 1);
    let err = log.append(&batch, t2_last, t3_last, true).unwrap_err();
    assert!(matches!(err, BinlogError::Io(_)), "{err}");
    assert_eq!(
        writer_view(&log),
        view,
        "the Commit written first is undone"
    );
    assert_eq!(fs::metadata(&tail_file).unwrap().len(), tail_len);
    assert_eq!(read_all(&log, 1), all);
    assert_eq!(log.durable_index(), t2_last - 1);

    fs::remove_dir(&obstacle).unwrap();
    log.append(&batch, t2_last, t3_last, true).unwrap();
    log.sync().unwrap();
    all.extend_from_slice(&batch);
    assert_eq!(log.segment_count(), 2);
    assert_eq!(
        (log.last_index(), log.last_boundary(), log.last_seq()),
        (t3_last, t3_last, Some(3))
    );
    assert_eq!(read_all(&log, 1), all);
    drop(log);
    reopen_intact(&dir, opts(200), &all);
}

#[test]
fn bad_second_half_of_a_split_append_is_undone_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("binlog");
    let (mut log, _) = Binlog::open(&dir, opts(100)).unwrap();
    let first = log.next_index();
    let (t1, t1_last) = txn(first, 1, 3, 40);
    let cut = frames_len(&t1, 4);
    log.append(&t1[..cut], first, t1_last - 1, false).unwrap();
    let view = writer_view(&log);
    // t1's Commit, then a record claiming the wrong index.
    let mut batch = t1[cut..].to_vec();
    encode_record(&Event::begin(t1_last + 5, 2, 7), &mut batch);
    let err = log.append(&batch, t1_last, t1_last + 1, false).unwrap_err();
    assert!(matches!(err, BinlogError::BadBatch { .. }), "{err}");
    assert_eq!(writer_view(&log), view);
    assert_eq!(read_all(&log, 1), t1[..cut].to_vec());
}

#[test]
fn received_and_shippable_follow_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    for policy in [FsyncPolicy::Always, FsyncPolicy::Everysec, FsyncPolicy::No] {
        let mut log = open_with_policy(&tmp.path().join(policy.as_str()), policy);
        fill(&mut log, 1, 1, 1); // events 1..=3
        log.sync().unwrap();
        fill(&mut log, 1, 1, 1); // 4..=6, written only
        let (t3, t3_last) = txn(7, 3, 2, 1);
        let cut = frames_len(&t3, 2);
        log.append(&t3[..cut], 7, 8, false).unwrap(); // 7..=8, mid-transaction
        assert_eq!((log.last_boundary(), log.durable_boundary()), (6, 3));
        let (received, shippable) = match policy {
            FsyncPolicy::Always => (3, 3),
            FsyncPolicy::Everysec => (3, 8),
            FsyncPolicy::No => (6, 8),
        };
        assert_eq!(log.received_index(), received, "{policy}");
        assert_eq!(log.shippable_index(), shippable, "{policy}");
        // An fsync in the middle of a transaction makes the last Commit durable.
        log.sync().unwrap();
        assert_eq!((log.durable_index(), log.durable_boundary()), (8, 6));
        assert_eq!(log.received_index(), 6, "{policy}");
        log.append(&t3[cut..], 9, t3_last, true).unwrap();
        assert_eq!(log.last_boundary(), t3_last);
        log.sync_before_state_flush().unwrap();
        assert_eq!(log.received_index(), t3_last, "{policy}");
        assert_eq!(log.shippable_index(), t3_last, "{policy}");
        // Truncation and reset move both boundaries.
        log.truncate_after(6).unwrap();
        assert_eq!((log.last_boundary(), log.durable_boundary()), (6, 6));
        log.reset(100, Some(50)).unwrap();
        assert_eq!((log.last_boundary(), log.durable_boundary()), (99, 99));
        assert_eq!(log.received_index(), 99);
    }
}

#[test]
fn zeros_written_ahead_are_kept_at_open_and_cut_at_a_roll() {
    let tmp = tempfile::tempdir().unwrap();
    let seg_bytes = 3 * PREALLOC_AHEAD;
    let (mut log, _) = Binlog::open(tmp.path(), opts(seg_bytes)).unwrap();
    let all = fill(&mut log, 3, 2, 100);
    log.sync().unwrap();
    let path = tmp.path().join(segment_name(1));
    let file_len = fs::metadata(&path).unwrap().len();
    assert!(
        file_len >= all.len() as u64 + PREALLOC_AHEAD,
        "{file_len} bytes on disk for {} of records",
        all.len()
    );
    assert_eq!(log_bytes(&path), all);
    drop(log);
    // Reopen: nothing cut, nothing reported, the zeros stay.
    let (mut log, report) = Binlog::open(tmp.path(), opts(seg_bytes)).unwrap();
    assert_eq!((report.truncated_bytes, report.truncated_events), (0, 0));
    assert_eq!(fs::metadata(&path).unwrap().len(), file_len);
    assert_eq!(read_all(&log, 1), all);
    // Fill past a segment: every sealed segment is exactly its records.
    let mut all = all;
    while log.segment_count() < 3 {
        all.extend(fill(&mut log, 50, 4, 4000));
    }
    log.sync().unwrap();
    let files = segment_files(tmp.path());
    for name in &files[..files.len() - 1] {
        let p = tmp.path().join(name);
        assert_eq!(
            fs::metadata(&p).unwrap().len(),
            log_bytes(&p).len() as u64,
            "sealed {name} ends at its last record"
        );
    }
    assert_eq!(read_all(&log, 1), all);
    drop(log);
    // Garbage after the zeros is damage: cut back to the last record.
    let tail = tmp.path().join(files.last().unwrap());
    let records = log_bytes(&tail);
    let f = fs::OpenOptions::new().write(true).open(&tail).unwrap();
    let len = f.metadata().unwrap().len();
    f.write_all_at(b"junk", len - 4).unwrap();
    drop(f);
    let (log, report) = Binlog::open(tmp.path(), opts(seg_bytes)).unwrap();
    assert_eq!(report.truncated_bytes, len - records.len() as u64);
    assert_eq!(fs::read(&tail).unwrap(), records);
    assert_eq!(read_all(&log, 1), all);
}
