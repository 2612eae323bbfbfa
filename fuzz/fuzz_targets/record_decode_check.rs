// Body of the `record_decode` fuzz target, kept in its own file so that
// `common/tests/binlog_props.rs` can `include!` it and run it on stable
// under proptest (cargo-fuzz itself needs nightly).
//
// The property: no input makes the record codec or the boundary parser
// panic, and whatever they accept is self-consistent.

use tern_common::boundary::{BoundaryParser, ParserState, Step};
use tern_common::record::{
    Event, Frames, HEADER_LEN, Records, decode_record, encode_record, frame_len, header_frame_len,
    peek,
};

/// Runs every check on one input.
pub fn check(data: &[u8]) {
    // The input as a raw record stream (what a slave receives, what recovery reads).
    record_stream(data);
    // The input as payloads framed with valid checksums, so that the protobuf
    // decoder and the event validation see arbitrary bytes too.
    record_stream(&frame_payloads(data));
    // The input as a script of events, most of them valid, for the parser.
    parser_script(data);
}

/// `data` = `[n][n bytes]...`: each chunk framed as a record with a correct
/// header (the last chunk is cut to what is left).
fn frame_payloads(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 2);
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n).min(tail.len());
        let (payload, next) = tail.split_at(n);
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        out.extend_from_slice(payload);
        rest = next;
    }
    out
}

fn record_stream(data: &[u8]) {
    let mut records = Records::new(data);
    let mut frames = Frames::new(data);
    let mut parser: Option<BoundaryParser> = None;
    let mut consumed = 0usize;
    for item in records.by_ref() {
        let frame = frames.next();
        let Ok((ev, raw)) = item else { break };
        // Both walkers agree on where records are.
        assert_eq!(frame, Some(Ok(raw)));
        assert_eq!(frame_len(raw), Ok(raw.len()));
        assert_eq!(header_frame_len(raw), Ok(raw.len()));
        assert!(raw.len() > HEADER_LEN);
        consumed += raw.len();
        // A decoded event re-encodes to a record that decodes to itself.
        let mut again = Vec::new();
        encode_record(&ev, &mut again);
        assert_eq!(again.len(), ev.record_len());
        assert_eq!(decode_record(&again), Ok((ev.clone(), again.len())));
        assert_eq!(peek(&again), Some((ev.index, ev.kind.tag())));
        let p = parser.get_or_insert_with(|| BoundaryParser::new(ev.index - 1, None));
        feed(p, &ev);
    }
    assert_eq!(records.offset(), consumed);
    assert!(records.next().is_none());
    // Any prefix decodes to a prefix of the records.
    if !data.is_empty() {
        let cut = data.len() / 2;
        let n = Records::new(&data[..cut]).take_while(|r| r.is_ok()).count();
        let full = Records::new(data).take_while(|r| r.is_ok()).count();
        assert!(n <= full);
    }
}

/// Feeds one event and checks the parser's bookkeeping.
fn feed(p: &mut BoundaryParser, ev: &Event) {
    let (index, seq, boundary) = (p.last_index(), p.last_seq(), p.last_boundary());
    let was_error = matches!(p.state(), ParserState::Error(_));
    match p.feed(ev) {
        Ok(step) => {
            assert!(!was_error);
            assert_eq!(p.last_index(), ev.index);
            assert_eq!(index.checked_add(1), Some(ev.index));
            match step {
                Step::Boundary { index, seq } => {
                    assert_eq!(index, ev.index);
                    assert_eq!(p.last_boundary(), index);
                    assert_eq!(p.last_seq(), Some(seq));
                    assert!(p.is_outside());
                }
                Step::InTxn => {
                    assert!(matches!(p.state(), ParserState::InTxn { .. }));
                    assert_eq!((p.last_seq(), p.last_boundary()), (seq, boundary));
                }
            }
        }
        Err(_) => {
            assert!(matches!(p.state(), ParserState::Error(_)));
            assert_eq!(
                (p.last_index(), p.last_seq(), p.last_boundary()),
                (index, seq, boundary)
            );
        }
    }
}

/// Each input byte picks an event: its kind, and whether its index or seq is off.
fn parser_script(data: &[u8]) {
    let mut p = BoundaryParser::new(0, None);
    let mut next_index = 1u64;
    let mut next_seq = 1u64;
    let mut open_seq: Option<u64> = None;
    let mut buf = Vec::new();
    for &b in data {
        let index = match (b >> 2) & 7 {
            0 => next_index + 1,
            1 => next_index.saturating_sub(1),
            _ => next_index,
        };
        let seq_off = u64::from((b >> 5) == 7);
        let ev = match b & 3 {
            0 => Event::begin(index, next_seq + seq_off, 0),
            1 => Event::put(index, vec![b], vec![b; usize::from(b >> 4)]),
            2 => Event::delete(index, vec![b]),
            _ => Event::commit(index, open_seq.unwrap_or(next_seq) + seq_off),
        };
        buf.clear();
        encode_record(&ev, &mut buf);
        let decoded = decode_record(&buf).map(|(e, _)| e);
        if ev.index == 0 {
            assert!(decoded.is_err());
            continue;
        }
        assert_eq!(decoded.as_ref(), Ok(&ev));
        feed(&mut p, &ev);
        if p.last_index() == ev.index {
            next_index = ev.index + 1;
            match ev.kind {
                tern_common::record::EventKind::Begin { seq, .. } => open_seq = Some(seq),
                tern_common::record::EventKind::Commit { seq } => {
                    open_seq = None;
                    next_seq = seq + 1;
                }
                _ => {}
            }
        }
        if matches!(p.state(), ParserState::Error(_)) {
            // Start over after the last boundary, as a receiver would after a reconnect.
            p = BoundaryParser::new(p.last_boundary(), Some(next_seq - 1));
            next_index = p.last_index() + 1;
            open_seq = None;
        }
    }
}
