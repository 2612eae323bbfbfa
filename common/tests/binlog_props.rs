//! Property tests of the record codec, the boundary parser and the binlog:
//! round trips, recovery from a crash cut at every byte, damaged tails,
//! reads across segments, purge / is_boundary, and a reader racing the writer.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use tern_common::binlog::{Binlog, BinlogError, BinlogOptions, FsyncPolicy};
use tern_common::boundary::{BoundaryError, BoundaryParser, ParserState, Step};
use tern_common::proto::binlog::v1 as pb;
use tern_common::record::{
    Event, EventKind, HEADER_LEN, Records, decode_record, encode_record, frame_len,
};

/// The `record_decode` fuzz target's body, run here on stable.
mod fuzz_body {
    include!("../../fuzz/fuzz_targets/record_decode_check.rs");
}

// ---------------------------------------------------------------- generators

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        (1..=u64::MAX, any::<u64>())
            .prop_map(|(seq, commit_ts)| EventKind::Begin { seq, commit_ts }),
        (arb_bytes(64), arb_bytes(600)).prop_map(|(key, value)| EventKind::Put { key, value }),
        arb_bytes(64).prop_map(|key| EventKind::Delete { key }),
        (1..=u64::MAX).prop_map(|seq| EventKind::Commit { seq }),
        Just(EventKind::VerifyPoint),
        (
            1..=u64::MAX,
            prop::collection::vec(any::<u8>(), 32),
            any::<u64>()
        )
            .prop_map(|(point, digest, keys)| EventKind::VerifyDigest {
                point,
                digest: Bytes::from(digest),
                keys,
            }),
    ]
}

fn arb_event() -> impl Strategy<Value = Event> {
    (prop_oneof![1..=300u64, 1..=u64::MAX], arb_kind())
        .prop_map(|(index, kind)| Event { index, kind })
}

/// Shape of one transaction: its Put value sizes and whether the last
/// data event is a Delete.
#[derive(Clone, Debug)]
struct TxnShape {
    values: Vec<usize>,
    delete: bool,
}

fn arb_txn() -> impl Strategy<Value = TxnShape> {
    (prop::collection::vec(0..200usize, 0..5), any::<bool>())
        .prop_map(|(values, delete)| TxnShape { values, delete })
}

/// Events of transaction `seq` starting at `first`.
fn txn_events(first: u64, seq: u64, shape: &TxnShape) -> Vec<Event> {
    let mut evs = vec![Event::begin(first, seq, 1_000_000 + seq)];
    for (i, &len) in shape.values.iter().enumerate() {
        let index = first + evs.len() as u64;
        evs.push(Event::put(
            index,
            format!("key-{seq}-{i}").into_bytes(),
            vec![(seq as u8) ^ (i as u8); len],
        ));
    }
    if shape.delete {
        let index = first + evs.len() as u64;
        evs.push(Event::delete(index, format!("key-{seq}").into_bytes()));
    }
    let index = first + evs.len() as u64;
    evs.push(Event::commit(index, seq));
    evs
}

fn encode_all(evs: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in evs {
        encode_record(e, &mut out);
    }
    out
}

// ---------------------------------------------------------------- helpers

/// Everything written to a binlog by [`write_log`], for checking.
struct Written {
    /// All events in order.
    events: Vec<Event>,
    /// Their framed records, concatenated.
    bytes: Vec<u8>,
    /// `ends[i]` = byte offset in `bytes` where event `i + 1` ends.
    ends: Vec<usize>,
}

impl Written {
    fn new() -> Written {
        Written {
            events: Vec::new(),
            bytes: Vec::new(),
            ends: Vec::new(),
        }
    }

    fn push(&mut self, ev: Event) {
        encode_record(&ev, &mut self.bytes);
        self.ends.push(self.bytes.len());
        self.events.push(ev);
    }

    /// Bytes of events `from ..= to`.
    fn range(&self, from: u64, to: u64) -> &[u8] {
        let start = if from <= 1 {
            0
        } else {
            self.ends[from as usize - 2]
        };
        let end = if to == 0 {
            0
        } else {
            self.ends[to as usize - 1]
        };
        &self.bytes[start..end]
    }

    fn is_commit(&self, index: u64) -> bool {
        matches!(
            self.events[index as usize - 1].kind,
            EventKind::Commit { .. }
        )
    }

    fn seq_at(&self, commit_index: u64) -> Option<u64> {
        match self.events.get((commit_index as usize).wrapping_sub(1)) {
            Some(Event {
                kind: EventKind::Commit { seq },
                ..
            }) => Some(*seq),
            _ => None,
        }
    }
}

/// Appends `txns` to `log`, each transaction in pieces of `piece` events, and
/// optionally a trailing partial transaction (without its Commit).
fn write_log(
    log: &mut Binlog,
    txns: &[TxnShape],
    piece: usize,
    partial: Option<&TxnShape>,
    w: &mut Written,
) {
    let mut seq = log.last_seq().unwrap_or(0) + 1;
    for shape in txns {
        let evs = txn_events(log.next_index(), seq, shape);
        append_pieces(log, &evs, piece, true, w);
        seq += 1;
    }
    if let Some(shape) = partial {
        let mut evs = txn_events(log.next_index(), seq, shape);
        evs.pop();
        append_pieces(log, &evs, piece, false, w);
    }
}

/// Appends `evs` in pieces of `piece` events; `complete` if they end with a Commit.
fn append_pieces(log: &mut Binlog, evs: &[Event], piece: usize, complete: bool, w: &mut Written) {
    let n = evs.chunks(piece).count();
    for (k, chunk) in evs.chunks(piece).enumerate() {
        let at_boundary = complete && k + 1 == n;
        log.append(
            &encode_all(chunk),
            chunk[0].index,
            chunk.last().unwrap().index,
            at_boundary,
        )
        .unwrap();
        for e in chunk {
            w.push(e.clone());
        }
    }
}

fn read_range(log: &Binlog, from: u64, to: u64, max_bytes: usize) -> Vec<u8> {
    let mut r = log.reader();
    r.seek(from).unwrap();
    let mut out = Vec::new();
    let mut next = from;
    while next <= to {
        let (a, b) = r
            .read_batch(to, max_bytes, &mut out)
            .unwrap()
            .expect("records up to `to` exist");
        assert_eq!(a, next);
        assert!(b <= to);
        next = b + 1;
    }
    assert_eq!(r.read_batch(to, max_bytes, &mut out).unwrap(), None);
    out
}

fn segment_files(dir: &Path) -> Vec<(u64, std::path::PathBuf)> {
    let mut v: Vec<(u64, std::path::PathBuf)> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let first = name.strip_suffix(".binlog")?.parse().ok()?;
            Some((first, e.path()))
        })
        .collect();
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn opts(segment_bytes: u64) -> BinlogOptions {
    BinlogOptions {
        segment_bytes,
        fsync: FsyncPolicy::No,
    }
}

/// After a recovery that should have kept events `..= last`: the log ends
/// there, what is kept is byte-identical, and appending continues after it.
fn check_recovered(dir: &Path, w: &Written, last: u64, segment_bytes: u64) {
    let (mut log, report) = Binlog::open(dir, opts(segment_bytes)).unwrap();
    assert_eq!(report.last_index, last);
    assert_eq!(log.last_index(), last);
    assert!(last == 0 || w.is_commit(last));
    if let Some(seq) = report.last_seq {
        assert_eq!(Some(seq), w.seq_at(last));
    }
    assert_eq!(log.last_seq(), report.last_seq);
    if last > 0 {
        assert_eq!(read_range(&log, 1, last, 1 << 20), w.range(1, last));
    }
    let seq = report.last_seq.or(w.seq_at(last)).unwrap_or(0) + 1;
    let evs = txn_events(
        last + 1,
        seq,
        &TxnShape {
            values: vec![3],
            delete: false,
        },
    );
    log.append(&encode_all(&evs), last + 1, last + 3, true)
        .unwrap();
    assert_eq!(log.last_seq(), Some(seq));
    assert_eq!(
        read_range(&log, last + 1, last + 3, 1 << 20),
        encode_all(&evs)
    );
}

// ---------------------------------------------------------------- model of the parser

/// A deliberately plain restatement of the boundary rules.
#[derive(Debug)]
struct Model {
    last_index: u64,
    last_seq: Option<u64>,
    open: Option<(u64, u64)>,
    failed: Option<BoundaryError>,
}

impl Model {
    fn feed(&mut self, ev: &Event) -> Result<Step, BoundaryError> {
        if self.failed.is_some() {
            return Err(BoundaryError::Poisoned);
        }
        let r = self.rule(ev);
        match &r {
            Ok(_) => self.last_index = ev.index,
            Err(e) => self.failed = Some(e.clone()),
        }
        r
    }

    fn rule(&mut self, ev: &Event) -> Result<Step, BoundaryError> {
        if ev.index != self.last_index + 1 {
            return Err(BoundaryError::NonContiguous {
                expected: self.last_index + 1,
                got: ev.index,
            });
        }
        let index = ev.index;
        match (&ev.kind, self.open) {
            (EventKind::Begin { seq, .. }, None) => {
                if let Some(last) = self.last_seq
                    && *seq != last + 1
                {
                    return Err(BoundaryError::SeqNotNext {
                        index,
                        last,
                        got: *seq,
                    });
                }
                self.open = Some((*seq, index));
                Ok(Step::InTxn)
            }
            (EventKind::Begin { .. }, Some(_)) => Err(BoundaryError::BeginInTxn { index }),
            (
                EventKind::Put { .. }
                | EventKind::Delete { .. }
                | EventKind::VerifyPoint
                | EventKind::VerifyDigest { .. },
                None,
            ) => Err(BoundaryError::DataOutsideTxn { index }),
            (
                EventKind::Put { .. }
                | EventKind::Delete { .. }
                | EventKind::VerifyPoint
                | EventKind::VerifyDigest { .. },
                Some(_),
            ) => Ok(Step::InTxn),
            (EventKind::Commit { .. }, None) => Err(BoundaryError::CommitOutsideTxn { index }),
            (EventKind::Commit { seq }, Some((begin_seq, _))) => {
                if *seq != begin_seq {
                    return Err(BoundaryError::CommitSeqMismatch {
                        index,
                        begin_seq,
                        commit_seq: *seq,
                    });
                }
                self.open = None;
                self.last_seq = Some(*seq);
                Ok(Step::Boundary { index, seq: *seq })
            }
        }
    }
}

/// One step of a random event script: a kind and small perturbations.
#[derive(Clone, Debug)]
struct Op {
    kind: u8,
    index_delta: i8,
    seq_delta: i8,
}

fn arb_op() -> impl Strategy<Value = Op> {
    (
        0..4u8,
        prop_oneof![8 => Just(0i8), 1 => -2..=2i8],
        prop_oneof![8 => Just(0i8), 1 => -2..=2i8],
    )
        .prop_map(|(kind, index_delta, seq_delta)| Op {
            kind,
            index_delta,
            seq_delta,
        })
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn record_codec_round_trips(evs in prop::collection::vec(arb_event(), 1..8)) {
        let mut buf = Vec::new();
        let mut lens = Vec::new();
        for ev in &evs {
            let before = buf.len();
            encode_record(ev, &mut buf);
            let rec = &buf[before..];
            lens.push(rec.len());
            // The hand-written encoder writes exactly what prost writes.
            prop_assert_eq!(&rec[HEADER_LEN..], &pb::Event::from(ev).encode_to_vec()[..]);
            prop_assert_eq!(frame_len(rec), Ok(rec.len()));
            prop_assert_eq!(decode_record(rec), Ok((ev.clone(), rec.len())));
            prop_assert_eq!(Event::try_from(pb::Event::decode(&rec[HEADER_LEN..]).unwrap()), Ok(ev.clone()));
        }
        let decoded: Vec<(Event, usize)> = Records::new(&buf).map(|r| r.map(|(e, raw)| (e, raw.len())).unwrap()).collect();
        prop_assert_eq!(decoded, evs.into_iter().zip(lens).collect::<Vec<_>>());
    }

    #[test]
    fn fuzz_body_never_panics(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        fuzz_body::check(&data);
    }

    #[test]
    fn fuzz_body_on_valid_streams(evs in prop::collection::vec(arb_event(), 0..12), cut in any::<prop::sample::Index>()) {
        let buf = encode_all(&evs);
        fuzz_body::check(&buf);
        fuzz_body::check(&buf[..cut.index(buf.len() + 1)]);
    }

    #[test]
    fn parser_matches_model(
        start in 0..5u64,
        start_seq in prop::option::of(0..5u64),
        ops in prop::collection::vec(arb_op(), 0..60),
    ) {
        let mut parser = BoundaryParser::new(start, start_seq);
        let mut model = Model { last_index: start, last_seq: start_seq, open: None, failed: None };
        let mut next_seq = start_seq.unwrap_or(0) + 1;
        for op in ops {
            let index = (model.last_index + 1).saturating_add_signed(op.index_delta.into());
            let seq = match (op.kind, model.open) {
                (3, Some((s, _))) => s,
                _ => next_seq,
            }.saturating_add_signed(op.seq_delta.into()).max(1);
            let ev = match op.kind {
                0 => Event::begin(index, seq, 0),
                1 => Event::put(index, &b"k"[..], &b"v"[..]),
                2 => Event::delete(index, &b"k"[..]),
                _ => Event::commit(index, seq),
            };
            let want = model.feed(&ev);
            let got = parser.feed(&ev);
            prop_assert_eq!(&got, &want, "{:?}", ev);
            if let Ok(Step::Boundary { seq, .. }) = got {
                next_seq = seq + 1;
            }
            prop_assert_eq!(parser.last_index(), model.last_index);
            prop_assert_eq!(parser.last_seq(), model.last_seq);
            let want_state = match (&model.failed, model.open) {
                (Some(e), _) => ParserState::Error(e.clone()),
                (None, Some((seq, begin_index))) => ParserState::InTxn { seq, begin_index },
                (None, None) => ParserState::Outside,
            };
            prop_assert_eq!(parser.state(), &want_state);
        }
    }
}

proptest! {
    // Each case opens the binlog once per byte of the last few records.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn recovery_from_a_cut_at_every_byte(
        txns in prop::collection::vec(arb_txn(), 1..6),
        partial in prop::option::of(arb_txn()),
        piece in 1..4usize,
        segment_bytes in prop_oneof![Just(1u64 << 30), 200..1500u64],
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let orig = tmp.path().join("orig");
        let (mut log, _) = Binlog::open(&orig, opts(segment_bytes)).unwrap();
        let mut w = Written::new();
        write_log(&mut log, &txns, piece, partial.as_ref(), &mut w);
        log.sync().unwrap();
        drop(log);

        let segs = segment_files(&orig);
        let (tail_first, tail_path) = segs.last().unwrap().clone();
        let file = fs::read(&tail_path).unwrap();
        let total = w.events.len() as u64;
        // Byte offset of the tail file inside `w.bytes`.
        let base = w.range(1, tail_first - 1).len();
        // The tail file is the log's bytes, then only zeros written ahead.
        let tail = &file[..w.bytes.len() - base];
        prop_assert_eq!(&w.bytes[base..], tail);
        prop_assert!(file[tail.len()..].iter().all(|&b| b == 0));
        // Copies below stay small: the variants bring back a page of zeros.
        fs::OpenOptions::new().write(true).open(&tail_path).unwrap().set_len(tail.len() as u64).unwrap();
        // Cut everywhere in the last three records of the tail; the bytes
        // after the cut are gone (`zeros` false) or, as when a crash loses
        // pages of a file written ahead, zeros up to the old length.
        let from_event = total.saturating_sub(3).max(tail_first - 1);
        let cut_from = w.range(1, from_event).len() - base;
        for (k, zeros) in (cut_from..=tail.len()).flat_map(|k| [(k, false), (k, true)]) {
            let dir = tmp.path().join(format!("cut{k}-{zeros}"));
            copy_dir(&orig, &dir);
            let f = fs::OpenOptions::new().write(true).open(dir.join(tail_path.file_name().unwrap())).unwrap();
            f.set_len(k as u64).unwrap();
            if zeros {
                f.set_len(tail.len() as u64 + 4096).unwrap();
            }
            drop(f);
            // The last complete transaction that ends at or before the cut.
            let kept = (0..=total)
                .rev()
                .find(|&i| i == 0 || (w.is_commit(i) && w.ends[i as usize - 1] <= base + k))
                .unwrap();
            check_recovered(&dir, &w, kept, segment_bytes);
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn damaged_tails_are_truncated(
        txns in prop::collection::vec(arb_txn(), 2..6),
        segment_bytes in prop_oneof![Just(1u64 << 30), 300..1500u64],
        at in any::<prop::sample::Index>(),
        flip in 1..=255u8,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let (mut log, _) = Binlog::open(&dir, opts(segment_bytes)).unwrap();
        let mut w = Written::new();
        write_log(&mut log, &txns, 2, None, &mut w);
        drop(log);

        let (tail_first, tail_path) = segment_files(&dir).last().unwrap().clone();
        let mut tail = fs::read(&tail_path).unwrap();
        let base = w.range(1, tail_first - 1).len();
        // Damage the records, not the zeros written ahead of them.
        let pos = at.index(w.bytes.len() - base);
        tail[pos] ^= flip;
        fs::write(&tail_path, &tail).unwrap();
        // The damaged record and everything after it go, and so does the
        // transaction it was part of.
        let damaged = (1..=w.events.len() as u64).find(|&i| w.ends[i as usize - 1] > base + pos).unwrap();
        let kept = (0..damaged).rev().find(|&i| i == 0 || w.is_commit(i)).unwrap();
        check_recovered(&dir, &w, kept, segment_bytes);
    }

    #[test]
    fn reads_across_segments_are_byte_identical(
        txns in prop::collection::vec(arb_txn(), 1..25),
        piece in 1..5usize,
        segment_bytes in 100..3000u64,
        reads in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), 0..4000usize), 1..20),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = Binlog::open(tmp.path(), opts(segment_bytes)).unwrap();
        let mut w = Written::new();
        write_log(&mut log, &txns, piece, None, &mut w);
        let last = log.last_index();
        prop_assert_eq!(log.total_bytes(), w.bytes.len() as u64);
        let check = |log: &Binlog| -> Result<(), TestCaseError> {
            prop_assert_eq!(read_range(log, 1, last, 1 << 20), &w.bytes[..]);
            for (a, b, max) in &reads {
                let from = a.index(last as usize) as u64 + 1;
                let to = from + b.index((last - from + 1) as usize) as u64;
                prop_assert_eq!(read_range(log, from, to, *max), w.range(from, to));
                let mut r = log.reader();
                r.seek(from).unwrap();
                let evs = r.read_events(to, *max).unwrap();
                prop_assert!(!evs.is_empty());
                prop_assert_eq!(&evs[..], &w.events[from as usize - 1..from as usize - 1 + evs.len()]);
            }
            Ok(())
        };
        check(&log)?;
        // Every segment starts with a Begin and is named after it.
        for (first, path) in segment_files(tmp.path()) {
            let bytes = fs::read(path).unwrap();
            if let Some(r) = Records::new(&bytes).next() {
                let (ev, _) = r.unwrap();
                prop_assert_eq!(ev.index, first);
                prop_assert!(matches!(ev.kind, EventKind::Begin { .. }), "segment {} starts with {:?}", first, ev);
            }
        }
        drop(log);
        let (log, report) = Binlog::open(tmp.path(), opts(segment_bytes)).unwrap();
        prop_assert_eq!(report.truncated_bytes, 0);
        check(&log)?;
    }

    #[test]
    fn purge_to_and_is_boundary(
        txns in prop::collection::vec(arb_txn(), 1..20),
        segment_bytes in 100..1500u64,
        purges in prop::collection::vec(any::<prop::sample::Index>(), 1..4),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = Binlog::open(tmp.path(), opts(segment_bytes)).unwrap();
        let mut w = Written::new();
        write_log(&mut log, &txns, 3, None, &mut w);
        let last = log.last_index();
        let commits: BTreeSet<u64> = (1..=last).filter(|&i| w.is_commit(i)).collect();
        for p in purges {
            let segs_before = segment_files(tmp.path());
            let index = p.index(last as usize + 1) as u64;
            let removed = log.purge_to(index).unwrap();
            let segs_after = segment_files(tmp.path());
            // Exactly the sealed segments entirely at or below `index` went.
            let lasts: Vec<u64> = segs_before.iter().skip(1).map(|s| s.0 - 1).collect();
            let expect = lasts.iter().take_while(|&&l| l <= index).count();
            prop_assert_eq!(removed as usize, expect);
            prop_assert_eq!(segs_after.len(), segs_before.len() - expect);
            prop_assert_eq!(log.first_index(), segs_after[0].0);
            prop_assert_eq!(log.last_index(), last);
            let first = log.first_index();
            prop_assert_eq!(log.total_bytes(), w.range(first, last).len() as u64);
            for i in 0..=last + 1 {
                match log.is_boundary(i) {
                    Ok(b) => {
                        prop_assert!(i + 1 >= first && i <= last, "{}", i);
                        prop_assert_eq!(b, i == 0 || commits.contains(&i), "{}", i);
                    }
                    Err(BinlogError::Purged { index, first: f }) => {
                        prop_assert!(i + 1 < first);
                        prop_assert_eq!((index, f), (i, first));
                    }
                    Err(BinlogError::OutOfRange { index, last: l }) => {
                        prop_assert_eq!((index, l), (i, last));
                        prop_assert!(i > last);
                    }
                    Err(e) => prop_assert!(false, "{}: {}", i, e),
                }
            }
            prop_assert_eq!(read_range(&log, first, last, 1 << 20), w.range(first, last));
        }
    }
}

#[test]
fn reader_races_the_writer() {
    for round in 0..3u64 {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = Binlog::open(tmp.path(), opts(2_000 + round * 3_000)).unwrap();
        let published = Arc::new(AtomicU64::new(0));
        let mut reader = log.reader();
        let total_txns = 400u64;
        let reader_thread = {
            let published = published.clone();
            std::thread::spawn(move || {
                reader.seek(1).unwrap();
                let mut out = Vec::new();
                let mut next = 1;
                let mut batches = 0;
                while next <= total_txns * 3 {
                    let upto = published.load(Ordering::Acquire);
                    match reader.read_batch(upto, 700, &mut out).unwrap() {
                        Some((a, b)) => {
                            assert_eq!(a, next);
                            assert!(b <= upto);
                            next = b + 1;
                            batches += 1;
                        }
                        None => std::thread::yield_now(),
                    }
                }
                (out, batches)
            })
        };
        let mut w = Written::new();
        for t in 0..total_txns {
            let shape = TxnShape {
                values: vec![(t as usize * 37) % 250],
                delete: false,
            };
            write_log(&mut log, &[shape], 2, None, &mut w);
            if t % 7 == 0 {
                log.sync_if_due().unwrap();
            }
            published.store(log.last_index(), Ordering::Release);
        }
        let (out, batches) = reader_thread.join().unwrap();
        assert!(batches > 1);
        assert_eq!(out, w.bytes);
        assert!(log.segment_count() > 5, "{}", log.segment_count());
    }
}
