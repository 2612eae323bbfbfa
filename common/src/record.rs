//! The binlog record codec and the [`Event`] domain type.
//!
//! # Record format
//!
//! One record is one event, framed as
//!
//! ```text
//! +----------------+--------------------------+---------------------------+
//! | len: u32 LE    | crc: u32 LE              | payload: `len` bytes      |
//! | payload length | crc32c(payload)          | protobuf `binlog.v1.Event`|
//! +----------------+--------------------------+---------------------------+
//! ```
//!
//! The same bytes are stored in binlog segment files and shipped on the wire
//! (`BinlogBatch.records` is a concatenation of records), so a slave's relay
//! log is byte-identical to its master's binlog.
//!
//! Rules a record must satisfy to be accepted:
//!
//! - `MIN_PAYLOAD_LEN <= len <= MAX_PAYLOAD_LEN` (a zero-filled region, whose
//!   checksum happens to be valid, is therefore never taken for a record);
//! - `crc32c(payload) == crc`;
//! - the payload decodes as a `binlog.v1.Event` with a non-zero index and a
//!   kind, and `Begin`/`Commit` carry a non-zero `seq`.
//!
//! [`encode_record`] writes the payload by hand, field by field in tag order,
//! exactly as prost would encode the same message (a test checks this), so
//! the encoder allocates nothing but the growth of the output buffer. Every
//! payload therefore starts with its `index` field followed by the tag of its
//! kind, which lets [`peek`] read both without decoding the event.
//!
//! Nothing here panics on any input: every decoding function returns a
//! [`RecordError`] instead.

use bytes::Bytes;
use prost::Message;

use crate::proto::binlog::v1 as pb;

/// Length of the record header: `len: u32 LE` then `crc32c: u32 LE`.
pub const HEADER_LEN: usize = 8;

/// Largest payload a record may carry (96 MiB).
pub const MAX_PAYLOAD_LEN: usize = 96 << 20;

/// Smallest payload of a valid event: an index field (2 bytes) and an empty
/// `Put` or `Delete` (2 bytes).
pub const MIN_PAYLOAD_LEN: usize = 4;

/// Why a byte string is not a valid record.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The buffer ends before the record does (a torn write, or a partial read).
    #[error("truncated record: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    /// The header announces a payload larger than [`MAX_PAYLOAD_LEN`].
    #[error("record payload of {len} bytes exceeds the maximum of {MAX_PAYLOAD_LEN} bytes")]
    TooLong { len: usize },
    /// The payload does not match the checksum in the header.
    #[error("record checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    Crc { expected: u32, actual: u32 },
    /// The payload is not a protobuf `binlog.v1.Event`.
    #[error("record payload is not a binlog event: {0}")]
    Decode(String),
    /// The payload is a protobuf event that breaks a rule of the domain type
    /// (index 0, no kind, seq 0, payload shorter than [`MIN_PAYLOAD_LEN`]).
    #[error("invalid binlog event: {0}")]
    Invalid(String),
}

/// What an event does. A transaction is `Begin · (Put | Delete | VerifyPoint
/// | VerifyDigest)* · Commit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Opens transaction `seq` (contiguous from 1); `commit_ts` is the
    /// master's clock in unix micros.
    Begin { seq: u64, commit_ts: u64 },
    /// After-image of a write.
    Put { key: Bytes, value: Bytes },
    /// Removal of a key.
    Delete { key: Bytes },
    /// Closes transaction `seq`; its index is a transaction boundary.
    Commit { seq: u64 },
    /// Online consistency check: the transaction holding it ends at a check
    /// point, digested by every node right after applying it. Writes nothing.
    VerifyPoint,
    /// The master's keyspace digest (SHA-256, 32 bytes) and key count at an
    /// earlier check point. Writes nothing.
    VerifyDigest {
        point: u64,
        digest: Bytes,
        keys: u64,
    },
}

/// The kind of an event without its fields; see [`peek`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KindTag {
    Begin,
    Put,
    Delete,
    Commit,
    VerifyPoint,
    VerifyDigest,
}

/// One binlog event, validated: `index >= 1`, and a `Begin`/`Commit` has
/// `seq >= 1`. Values built with [`TryFrom`] or decoded from records always
/// satisfy this; values built by hand should too (the encoder writes what it
/// is given, and the decoder would then reject it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Position of the event in the history, contiguous from 1.
    pub index: u64,
    pub kind: EventKind,
}

impl EventKind {
    /// The kind without its fields.
    pub fn tag(&self) -> KindTag {
        match self {
            EventKind::Begin { .. } => KindTag::Begin,
            EventKind::Put { .. } => KindTag::Put,
            EventKind::Delete { .. } => KindTag::Delete,
            EventKind::Commit { .. } => KindTag::Commit,
            EventKind::VerifyPoint => KindTag::VerifyPoint,
            EventKind::VerifyDigest { .. } => KindTag::VerifyDigest,
        }
    }

    /// Encoded length of the kind's message body (without its own key/length).
    fn body_len(&self) -> usize {
        match self {
            EventKind::Begin { seq, commit_ts } => {
                varint_field_len(*seq) + varint_field_len(*commit_ts)
            }
            EventKind::Put { key, value } => bytes_field_len(key) + bytes_field_len(value),
            EventKind::Delete { key } => bytes_field_len(key),
            EventKind::Commit { seq } => varint_field_len(*seq),
            EventKind::VerifyPoint => 0,
            EventKind::VerifyDigest {
                point,
                digest,
                keys,
            } => varint_field_len(*point) + bytes_field_len(digest) + varint_field_len(*keys),
        }
    }
}

impl KindTag {
    /// Protobuf key byte of the `kind` oneof field (field number, wire type 2).
    fn key(self) -> u8 {
        match self {
            KindTag::Begin => 0x12,
            KindTag::Put => 0x1a,
            KindTag::Delete => 0x22,
            KindTag::Commit => 0x2a,
            KindTag::VerifyPoint => 0x32,
            KindTag::VerifyDigest => 0x3a,
        }
    }

    fn from_key(key: u8) -> Option<KindTag> {
        match key {
            0x12 => Some(KindTag::Begin),
            0x1a => Some(KindTag::Put),
            0x22 => Some(KindTag::Delete),
            0x2a => Some(KindTag::Commit),
            0x32 => Some(KindTag::VerifyPoint),
            0x3a => Some(KindTag::VerifyDigest),
            _ => None,
        }
    }
}

impl Event {
    /// A `Begin` event.
    pub fn begin(index: u64, seq: u64, commit_ts: u64) -> Event {
        Event {
            index,
            kind: EventKind::Begin { seq, commit_ts },
        }
    }

    /// A `Put` event.
    pub fn put(index: u64, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Event {
        Event {
            index,
            kind: EventKind::Put {
                key: key.into(),
                value: value.into(),
            },
        }
    }

    /// A `Delete` event.
    pub fn delete(index: u64, key: impl Into<Bytes>) -> Event {
        Event {
            index,
            kind: EventKind::Delete { key: key.into() },
        }
    }

    /// A `Commit` event.
    pub fn commit(index: u64, seq: u64) -> Event {
        Event {
            index,
            kind: EventKind::Commit { seq },
        }
    }

    /// Length of the protobuf payload [`encode_record`] writes for this event.
    pub fn payload_len(&self) -> usize {
        let body = self.kind.body_len();
        varint_field_len(self.index) + 1 + varint_len(body as u64) + body
    }

    /// Length of the whole framed record: `HEADER_LEN + payload_len()`.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }
}

impl TryFrom<pb::Event> for Event {
    type Error = RecordError;

    fn try_from(ev: pb::Event) -> Result<Event, RecordError> {
        use pb::event::Kind;
        if ev.index == 0 {
            return Err(RecordError::Invalid("event index is 0".into()));
        }
        let kind = match ev.kind {
            None => {
                return Err(RecordError::Invalid(format!(
                    "event {} has no kind",
                    ev.index
                )));
            }
            Some(Kind::Begin(b)) => {
                if b.seq == 0 {
                    return Err(RecordError::Invalid(format!(
                        "Begin at index {} has seq 0",
                        ev.index
                    )));
                }
                EventKind::Begin {
                    seq: b.seq,
                    commit_ts: b.commit_ts,
                }
            }
            Some(Kind::Put(p)) => EventKind::Put {
                key: p.key,
                value: p.value,
            },
            Some(Kind::Delete(d)) => EventKind::Delete { key: d.key },
            Some(Kind::Commit(c)) => {
                if c.seq == 0 {
                    return Err(RecordError::Invalid(format!(
                        "Commit at index {} has seq 0",
                        ev.index
                    )));
                }
                EventKind::Commit { seq: c.seq }
            }
            Some(Kind::VerifyPoint(_)) => EventKind::VerifyPoint,
            Some(Kind::VerifyDigest(d)) => {
                if d.point == 0 || d.digest.len() != 32 {
                    return Err(RecordError::Invalid(format!(
                        "VerifyDigest at index {} has point {} and a {}-byte digest",
                        ev.index,
                        d.point,
                        d.digest.len()
                    )));
                }
                EventKind::VerifyDigest {
                    point: d.point,
                    digest: d.digest,
                    keys: d.keys,
                }
            }
        };
        Ok(Event {
            index: ev.index,
            kind,
        })
    }
}

impl From<&Event> for pb::Event {
    fn from(ev: &Event) -> pb::Event {
        use pb::event::Kind;
        let kind = match &ev.kind {
            EventKind::Begin { seq, commit_ts } => Kind::Begin(pb::Begin {
                seq: *seq,
                commit_ts: *commit_ts,
            }),
            EventKind::Put { key, value } => Kind::Put(pb::Put {
                key: key.clone(),
                value: value.clone(),
            }),
            EventKind::Delete { key } => Kind::Delete(pb::Delete { key: key.clone() }),
            EventKind::Commit { seq } => Kind::Commit(pb::Commit { seq: *seq }),
            EventKind::VerifyPoint => Kind::VerifyPoint(pb::VerifyPoint {}),
            EventKind::VerifyDigest {
                point,
                digest,
                keys,
            } => Kind::VerifyDigest(pb::VerifyDigest {
                point: *point,
                digest: digest.clone(),
                keys: *keys,
            }),
        };
        pb::Event {
            index: ev.index,
            kind: Some(kind),
        }
    }
}

impl From<Event> for pb::Event {
    fn from(ev: Event) -> pb::Event {
        pb::Event::from(&ev)
    }
}

/// Appends one framed record for `ev` to `out`.
///
/// The payload is written field by field (the same bytes prost produces), so
/// this allocates nothing but the growth of `out`. The caller is responsible
/// for keeping events below [`MAX_PAYLOAD_LEN`] (tern's request limits are far
/// below it); use [`try_encode_record`] to have it checked.
pub fn encode_record(ev: &Event, out: &mut Vec<u8>) {
    let body = ev.kind.body_len();
    let payload_len = varint_field_len(ev.index) + 1 + varint_len(body as u64) + body;
    out.reserve(HEADER_LEN + payload_len);
    let start = out.len();
    // Header placeholder, filled once the payload is written.
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    put_varint_field(out, 0x08, ev.index);
    out.push(ev.kind.tag().key());
    put_varint(out, body as u64);
    match &ev.kind {
        EventKind::Begin { seq, commit_ts } => {
            put_varint_field(out, 0x08, *seq);
            put_varint_field(out, 0x18, *commit_ts);
        }
        EventKind::Put { key, value } => {
            put_bytes_field(out, 0x0a, key);
            put_bytes_field(out, 0x12, value);
        }
        EventKind::Delete { key } => put_bytes_field(out, 0x0a, key),
        EventKind::Commit { seq } => put_varint_field(out, 0x08, *seq),
        EventKind::VerifyPoint => {}
        EventKind::VerifyDigest {
            point,
            digest,
            keys,
        } => {
            put_varint_field(out, 0x08, *point);
            put_bytes_field(out, 0x12, digest);
            put_varint_field(out, 0x18, *keys);
        }
    }
    debug_assert_eq!(out.len() - start - HEADER_LEN, payload_len);
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Like [`encode_record`], but refuses an event whose payload would exceed
/// [`MAX_PAYLOAD_LEN`]. Returns the number of bytes appended.
pub fn try_encode_record(ev: &Event, out: &mut Vec<u8>) -> Result<usize, RecordError> {
    let len = ev.payload_len();
    if len > MAX_PAYLOAD_LEN {
        return Err(RecordError::TooLong { len });
    }
    encode_record(ev, out);
    Ok(HEADER_LEN + len)
}

/// Validates the record at the start of `buf` (header, length bounds and
/// checksum) without decoding its payload, and returns its total length
/// (`HEADER_LEN + len`). Used to walk records quickly.
pub fn frame_len(buf: &[u8]) -> Result<usize, RecordError> {
    let len = payload_len_of(buf)?;
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Err(RecordError::Truncated {
            needed: total,
            have: buf.len(),
        });
    }
    let expected = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let actual = crc32c::crc32c(&buf[HEADER_LEN..total]);
    if expected != actual {
        return Err(RecordError::Crc { expected, actual });
    }
    Ok(total)
}

/// Reads only the length field of the record at the start of `buf` and
/// returns the record's total length, checking the length bounds but neither
/// the checksum nor that the payload is present. For skipping over records
/// that are verified elsewhere.
pub fn header_frame_len(buf: &[u8]) -> Result<usize, RecordError> {
    payload_len_of(buf).map(|len| HEADER_LEN + len)
}

fn payload_len_of(buf: &[u8]) -> Result<usize, RecordError> {
    if buf.len() < HEADER_LEN {
        return Err(RecordError::Truncated {
            needed: HEADER_LEN,
            have: buf.len(),
        });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_PAYLOAD_LEN {
        return Err(RecordError::TooLong { len });
    }
    if len < MIN_PAYLOAD_LEN {
        return Err(RecordError::Invalid(format!(
            "payload of {len} bytes is shorter than the smallest event ({MIN_PAYLOAD_LEN} bytes)"
        )));
    }
    Ok(len)
}

/// Decodes the record at the start of `buf`; returns the event and the
/// number of bytes the record occupies.
pub fn decode_record(buf: &[u8]) -> Result<(Event, usize), RecordError> {
    let n = frame_len(buf)?;
    let ev = decode_payload(&buf[HEADER_LEN..n])?;
    Ok((ev, n))
}

/// Decodes and validates an event payload (the bytes after the header; the
/// checksum is not checked here).
pub fn decode_payload(payload: &[u8]) -> Result<Event, RecordError> {
    let ev = pb::Event::decode(payload).map_err(|e| RecordError::Decode(e.to_string()))?;
    Event::try_from(ev)
}

/// Like [`decode_record`], for a shared buffer: the `Put`/`Delete` keys and
/// values of the event are slices of `buf` (no copy). They keep the whole
/// allocation of `buf` alive as long as they live.
pub fn decode_record_bytes(buf: &Bytes) -> Result<(Event, usize), RecordError> {
    let n = frame_len(buf)?;
    let ev = decode_payload_bytes(buf.slice(HEADER_LEN..n))?;
    Ok((ev, n))
}

/// Like [`decode_payload`], without copying keys and values out of `payload`.
pub fn decode_payload_bytes(payload: Bytes) -> Result<Event, RecordError> {
    let ev = pb::Event::decode(payload).map_err(|e| RecordError::Decode(e.to_string()))?;
    Event::try_from(ev)
}

/// Reads the index and the kind of a framed record from the first bytes of
/// its payload, without checking the checksum or decoding the event.
///
/// Relies on the field order every tern encoder uses (`index` first, then
/// the `kind` oneof); returns `None` if the bytes do not look like that.
pub fn peek(frame: &[u8]) -> Option<(u64, KindTag)> {
    let payload = frame.get(HEADER_LEN..)?;
    if *payload.first()? != 0x08 {
        return None;
    }
    let (index, n) = read_varint(&payload[1..])?;
    let tag = KindTag::from_key(*payload.get(1 + n)?)?;
    Some((index, tag))
}

/// Iterator over the records of a byte slice, yielding each decoded event
/// with its raw framed bytes. After the first error it yields that error and
/// then stops; [`Records::offset`] tells how many bytes were valid.
#[derive(Clone, Debug)]
pub struct Records<'a> {
    buf: &'a [u8],
    offset: usize,
    failed: bool,
}

impl<'a> Records<'a> {
    pub fn new(buf: &'a [u8]) -> Records<'a> {
        Records {
            buf,
            offset: 0,
            failed: false,
        }
    }

    /// Bytes consumed by the records yielded so far (the end of the last
    /// valid record).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The bytes not yet consumed.
    pub fn remaining(&self) -> &'a [u8] {
        &self.buf[self.offset..]
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(Event, &'a [u8]), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.buf.len() {
            return None;
        }
        let rest = &self.buf[self.offset..];
        match decode_record(rest) {
            Ok((ev, n)) => {
                self.offset += n;
                Some(Ok((ev, &rest[..n])))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Like [`Records`], over a shared buffer: yields each event (whose keys and
/// values are slices of the buffer, see [`decode_record_bytes`]) with its
/// raw framed record, also a slice of the buffer. Stops after the first error.
#[derive(Clone, Debug)]
pub struct BytesRecords {
    buf: Bytes,
    offset: usize,
    failed: bool,
}

impl BytesRecords {
    pub fn new(buf: Bytes) -> BytesRecords {
        BytesRecords {
            buf,
            offset: 0,
            failed: false,
        }
    }

    /// Bytes consumed by the records yielded so far.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl Iterator for BytesRecords {
    type Item = Result<(Event, Bytes), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.buf.len() {
            return None;
        }
        let rest = self.buf.slice(self.offset..);
        match decode_record_bytes(&rest) {
            Ok((ev, n)) => {
                self.offset += n;
                Some(Ok((ev, rest.slice(..n))))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Iterator over the framed records of a byte slice, checking headers and
/// checksums ([`frame_len`]) but not decoding payloads. Stops after the
/// first error, like [`Records`].
#[derive(Clone, Debug)]
pub struct Frames<'a> {
    buf: &'a [u8],
    offset: usize,
    failed: bool,
}

impl<'a> Frames<'a> {
    pub fn new(buf: &'a [u8]) -> Frames<'a> {
        Frames {
            buf,
            offset: 0,
            failed: false,
        }
    }

    /// Bytes consumed by the frames yielded so far.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<&'a [u8], RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.buf.len() {
            return None;
        }
        let rest = &self.buf[self.offset..];
        match frame_len(rest) {
            Ok(n) => {
                self.offset += n;
                Some(Ok(&rest[..n]))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

fn varint_len(v: u64) -> usize {
    // 1 byte per started group of 7 bits; 0 takes one byte.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Encoded length of a proto3 varint field (omitted when 0); keys are 1 byte.
fn varint_field_len(v: u64) -> usize {
    if v == 0 { 0 } else { 1 + varint_len(v) }
}

/// Encoded length of a proto3 bytes field (omitted when empty).
fn bytes_field_len(b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        1 + varint_len(b.len() as u64) + b.len()
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, key: u8, v: u64) {
    if v != 0 {
        out.push(key);
        put_varint(out, v);
    }
}

fn put_bytes_field(out: &mut Vec<u8>, key: u8, b: &[u8]) {
    if !b.is_empty() {
        out.push(key);
        put_varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
}

/// Decodes a varint from the front of `buf`: `(value, bytes used)`.
fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().take(10).enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Event> {
        vec![
            Event::begin(1, 1, 0),
            Event::begin(u64::MAX, u64::MAX, u64::MAX),
            Event::begin(300, 7, 1_700_000_000_000_000),
            Event::put(2, &b"k"[..], &b"v"[..]),
            Event::put(3, Bytes::new(), Bytes::new()),
            Event::put(4, vec![0u8; 200], vec![7u8; 20_000]),
            Event::delete(5, &b"key"[..]),
            Event::delete(6, Bytes::new()),
            Event::commit(7, 1),
            Event::commit(1 << 40, 1 << 35),
            Event {
                index: 1,
                kind: EventKind::VerifyPoint,
            },
            Event {
                index: u64::MAX,
                kind: EventKind::VerifyDigest {
                    point: 1 << 33,
                    digest: Bytes::from(vec![0xab; 32]),
                    keys: 0,
                },
            },
        ]
    }

    #[test]
    fn encoding_matches_prost_and_round_trips() {
        for ev in samples() {
            let mut out = vec![0xee]; // encode_record appends
            encode_record(&ev, &mut out);
            let rec = &out[1..];
            let payload = pb::Event::from(&ev).encode_to_vec();
            assert_eq!(&rec[HEADER_LEN..], &payload[..], "{ev:?}");
            assert_eq!(rec.len(), ev.record_len());
            assert_eq!(
                u32::from_le_bytes(rec[0..4].try_into().unwrap()) as usize,
                payload.len()
            );
            assert_eq!(
                u32::from_le_bytes(rec[4..8].try_into().unwrap()),
                crc32c::crc32c(&payload)
            );
            assert_eq!(frame_len(rec), Ok(rec.len()));
            assert_eq!(header_frame_len(rec), Ok(rec.len()));
            assert_eq!(decode_record(rec), Ok((ev.clone(), rec.len())));
            assert_eq!(
                decode_record_bytes(&Bytes::copy_from_slice(rec)),
                Ok((ev.clone(), rec.len()))
            );
            assert_eq!(peek(rec), Some((ev.index, ev.kind.tag())));
        }
    }

    #[test]
    fn varint_len_is_exact() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX >> 1, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
            assert_eq!(read_varint(&b), Some((v, b.len())));
        }
    }

    #[test]
    fn truncated_everywhere() {
        let mut rec = Vec::new();
        encode_record(&Event::put(9, &b"key"[..], &b"value"[..]), &mut rec);
        for cut in 0..rec.len() {
            let needed = if cut < HEADER_LEN {
                HEADER_LEN
            } else {
                rec.len()
            };
            assert_eq!(
                decode_record(&rec[..cut]),
                Err(RecordError::Truncated { needed, have: cut })
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let mut rec = Vec::new();
        encode_record(&Event::put(9, &b"key"[..], &b"value"[..]), &mut rec);
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x5a;
            let err = decode_record(&bad).unwrap_err();
            if i < 4 {
                assert!(
                    matches!(
                        err,
                        RecordError::Truncated { .. }
                            | RecordError::TooLong { .. }
                            | RecordError::Crc { .. }
                            | RecordError::Invalid(_)
                    ),
                    "{i}: {err}"
                );
            } else {
                assert!(matches!(err, RecordError::Crc { .. }), "{i}: {err}");
            }
        }
    }

    #[test]
    fn length_bounds() {
        let mut h = Vec::new();
        h.extend_from_slice(&((MAX_PAYLOAD_LEN + 1) as u32).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            frame_len(&h),
            Err(RecordError::TooLong {
                len: MAX_PAYLOAD_LEN + 1
            })
        );
        // A zero-filled region has a valid checksum for an empty payload: rejected by length.
        let zeros = [0u8; 64];
        assert!(matches!(frame_len(&zeros), Err(RecordError::Invalid(_))));
        assert!(matches!(
            decode_record(&zeros),
            Err(RecordError::Invalid(_))
        ));
        let big = Event::put(1, Bytes::new(), vec![0u8; MAX_PAYLOAD_LEN]);
        let mut out = Vec::new();
        assert!(matches!(
            try_encode_record(&big, &mut out),
            Err(RecordError::TooLong { .. })
        ));
        assert!(out.is_empty());
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn invalid_events_are_rejected() {
        let cases: Vec<(pb::Event, &str)> = vec![
            (
                pb::Event {
                    index: 0,
                    kind: Some(pb::event::Kind::Commit(pb::Commit { seq: 1 })),
                },
                "index is 0",
            ),
            (
                pb::Event {
                    index: 5,
                    kind: None,
                },
                "has no kind",
            ),
            (
                pb::Event {
                    index: 5,
                    kind: Some(pb::event::Kind::Begin(pb::Begin::default())),
                },
                "Begin at index 5 has seq 0",
            ),
            (
                pb::Event {
                    index: 5,
                    kind: Some(pb::event::Kind::Commit(pb::Commit { seq: 0 })),
                },
                "Commit at index 5 has seq 0",
            ),
        ];
        for (ev, msg) in cases {
            let mut payload = ev.encode_to_vec();
            // Pad so the length check does not fire first (unknown field 15, varint 0).
            while payload.len() < MIN_PAYLOAD_LEN {
                payload.extend_from_slice(&[0x78, 0x00]);
            }
            match decode_record(&frame(&payload)) {
                Err(RecordError::Invalid(m)) => assert!(m.contains(msg), "{m}"),
                other => panic!("{msg}: {other:?}"),
            }
        }
        // Not protobuf at all (a varint key with no end).
        let err = decode_record(&frame(&[0xff; 12])).unwrap_err();
        assert!(matches!(err, RecordError::Decode(_)), "{err}");
    }

    #[test]
    fn records_iterator_stops_after_first_error() {
        let evs = [
            Event::begin(1, 1, 0),
            Event::put(2, &b"a"[..], &b"b"[..]),
            Event::commit(3, 1),
        ];
        let mut buf = Vec::new();
        for e in &evs {
            encode_record(e, &mut buf);
        }
        let good = buf.len();
        encode_record(&Event::begin(4, 2, 0), &mut buf);
        buf.truncate(buf.len() - 1);
        encode_record(&Event::commit(5, 2), &mut buf); // after the torn record: never reached

        let mut it = Records::new(&buf);
        let mut seen = Vec::new();
        let mut raw_total = 0;
        for item in it.by_ref() {
            match item {
                Ok((ev, raw)) => {
                    assert_eq!(decode_record(raw).unwrap().0, ev);
                    raw_total += raw.len();
                    seen.push(ev);
                }
                Err(e) => {
                    assert!(
                        matches!(e, RecordError::Crc { .. } | RecordError::Truncated { .. }),
                        "{e}"
                    );
                }
            }
        }
        assert_eq!(seen, evs);
        assert_eq!(it.offset(), good);
        assert_eq!(raw_total, good);
        assert!(it.next().is_none());

        let shared = Bytes::from(buf.clone());
        let mut it = BytesRecords::new(shared.clone());
        let got: Vec<_> = it.by_ref().take(3).map(|r| r.unwrap()).collect();
        assert_eq!(got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(), evs);
        assert_eq!(got.iter().map(|g| g.1.len()).sum::<usize>(), good);
        // Keys and values point into the shared buffer.
        if let EventKind::Put { key, .. } = &got[1].0.kind {
            let inside = shared.as_ptr_range();
            assert!(inside.contains(&key.as_ptr()));
        } else {
            panic!("{:?}", got[1].0);
        }
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
        assert_eq!(it.offset(), good);

        let frames: Vec<_> = Frames::new(&buf[..good]).collect();
        assert_eq!(frames.len(), 3);
        assert!(frames.iter().all(|f| f.is_ok()));
        assert_eq!(Records::new(&[]).count(), 0);
    }

    #[test]
    fn a_verify_digest_must_name_a_point_and_hold_32_bytes() {
        for (point, len) in [(0, 32), (5, 31), (5, 0), (5, 33)] {
            let pb = pb::Event {
                index: 9,
                kind: Some(pb::event::Kind::VerifyDigest(pb::VerifyDigest {
                    point,
                    digest: Bytes::from(vec![1; len]),
                    keys: 3,
                })),
            };
            assert!(
                matches!(Event::try_from(pb), Err(RecordError::Invalid(_))),
                "point {point}, {len} bytes"
            );
        }
    }

    #[test]
    fn peek_rejects_foreign_layouts() {
        assert_eq!(peek(&[]), None);
        assert_eq!(peek(&[0; HEADER_LEN]), None);
        let mut rec = vec![0; HEADER_LEN];
        rec.extend_from_slice(&[0x08, 0x80]); // unterminated varint
        assert_eq!(peek(&rec), None);
        let mut rec = vec![0; HEADER_LEN];
        rec.extend_from_slice(&[0x08, 0x05, 0x42]); // unknown kind field 8
        assert_eq!(peek(&rec), None);
    }
}
