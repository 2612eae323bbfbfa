//! [`BinlogReader`]: reads framed records by index, concurrently with the writer.

use std::fs::File;
use std::sync::Arc;

use super::BinlogError;
use super::segment::{Shared, read_exact_at};
use bytes::Bytes;

use crate::record::{self, BytesRecords, Event, HEADER_LEN, MIN_PAYLOAD_LEN, RecordError};

/// A cursor over the binlog, independent of the writer and of other readers.
///
/// Obtained from [`super::Binlog::reader`]; `Send + 'static`, cheap to create
/// and to clone. It reads segment files with positioned reads through its own
/// shared handles, so it can run on another thread while the writer appends.
/// A segment purged while a reader is inside it stays readable through the
/// open handle; a segment the reader has not reached yet reports
/// [`BinlogError::Purged`]. After the writer truncates or resets the log,
/// a reader re-finds its position by index (and reports `OutOfRange` if that
/// index no longer exists).
#[derive(Clone)]
pub struct BinlogReader {
    shared: Arc<Shared>,
    /// Index of the next event to read.
    pos: u64,
    cur: Option<Cursor>,
}

/// Where `pos` is in a segment file.
#[derive(Clone)]
struct Cursor {
    seg_id: u64,
    seg_first: u64,
    file: Arc<File>,
    offset: u64,
    /// `Meta::epoch` when the cursor was made.
    epoch: u64,
    /// `(len, last_index)` once the segment is known to be sealed: final, so
    /// still usable if the segment is purged under the reader.
    sealed: Option<(u64, u64)>,
}

/// The readable part of the cursor's segment.
struct Extent {
    len: u64,
    last: u64,
}

impl std::fmt::Debug for BinlogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinlogReader")
            .field("dir", &self.shared.dir)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl BinlogReader {
    pub(crate) fn new(shared: Arc<Shared>, pos: u64) -> BinlogReader {
        BinlogReader {
            shared,
            pos,
            cur: None,
        }
    }

    /// Index of the next event [`read_batch`](Self::read_batch) returns.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Positions the reader so the next read starts at event `index`
    /// (`first_index <= index <= last_index + 1`). Costs a binary search over
    /// the segments, a sparse-index lookup (built once per sealed segment, on
    /// first use) and a scan of at most ~64 KiB of record headers.
    pub fn seek(&mut self, index: u64) -> Result<(), BinlogError> {
        let loc = self.shared.locate(index)?;
        self.pos = index;
        self.cur = Some(Cursor {
            seg_id: loc.seg_id,
            seg_first: loc.seg_first,
            file: loc.file,
            offset: loc.offset,
            epoch: loc.epoch,
            sealed: None,
        });
        Ok(())
    }

    /// Appends to `out` the framed bytes of consecutive records from the
    /// current position, never past event `upto_index`, crossing segment
    /// files as needed, and stops before `max_bytes` would be exceeded (but
    /// returns at least one record, however large). Each record's checksum
    /// and index are verified. Returns the `(first, last)` indexes appended,
    /// or `None` if the position is past `upto_index` or past the last
    /// written event.
    ///
    /// The caller guarantees `upto_index` was written when the call started
    /// (`<= Binlog::last_index()`); later indexes are not read. A problem met
    /// after some records were accepted ends the batch there (the records
    /// are returned) and is reported by the next call; on error, `out` and
    /// the position are left as they were.
    pub fn read_batch(
        &mut self,
        upto_index: u64,
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<(u64, u64)>, BinlogError> {
        let (start_len, first, start_cur) = (out.len(), self.pos, self.cur.clone());
        let mut produced = 0usize;
        let r = self.read_inner(upto_index, max_bytes, out, &mut produced);
        // Every record accepted so far is whole and checked: a problem after
        // them ends the batch early and is reported by the next call.
        out.truncate(start_len + produced);
        match r {
            Ok(()) | Err(_) if self.pos > first => Ok(Some((first, self.pos - 1))),
            Ok(()) => Ok(None),
            Err(e) => {
                self.cur = start_cur;
                Err(e)
            }
        }
    }

    /// Like [`read_batch`](Self::read_batch), but decodes the records (used
    /// by replay). Keys and values share one buffer per call (no copy per
    /// record). A record that fails to decode ends the batch before it, like
    /// any other problem.
    pub fn read_events(
        &mut self,
        upto_index: u64,
        max_bytes: usize,
    ) -> Result<Vec<Event>, BinlogError> {
        let mut out = Vec::new();
        let Some((first, _)) = self.read_batch(upto_index, max_bytes, &mut out)? else {
            return Ok(Vec::new());
        };
        let mut events = Vec::new();
        for item in BytesRecords::new(Bytes::from(out)) {
            match item {
                Ok((ev, _)) => events.push(ev),
                Err(source) => {
                    // Checked by read_batch, so this is a valid frame that is
                    // not a valid event. Stop before it.
                    let index = first + events.len() as u64;
                    let loc = self.shared.locate(index)?;
                    self.seek(index)?;
                    if events.is_empty() {
                        return Err(BinlogError::Corrupt {
                            segment: self.shared.path(loc.seg_first),
                            offset: loc.offset,
                            source,
                        });
                    }
                    break;
                }
            }
        }
        Ok(events)
    }

    /// Appends accepted records to `out` (counted in `produced`, with `pos`
    /// and the cursor advanced record by record); may leave unaccepted bytes
    /// after them, which the caller cuts.
    fn read_inner(
        &mut self,
        upto: u64,
        max_bytes: usize,
        out: &mut Vec<u8>,
        produced: &mut usize,
    ) -> Result<(), BinlogError> {
        while self.pos <= upto {
            let Some(ext) = self.extent()? else { break };
            let Some(cur) = self.cur.as_mut() else { break };
            if cur.offset >= ext.len {
                if self.pos <= ext.last {
                    return Err(BinlogError::Corrupt {
                        segment: self.shared.path(cur.seg_first),
                        offset: cur.offset,
                        source: RecordError::Invalid(format!(
                            "segment ends before event {} (it should hold events up to {})",
                            self.pos, ext.last
                        )),
                    });
                }
                if cur.sealed.is_none() {
                    break; // the end of the tail: nothing more for now
                }
                // Done with this sealed segment: the next one starts at `pos`.
                self.cur = None;
                continue;
            }
            let budget = max_bytes.saturating_sub(*produced);
            if *produced > 0 && budget < HEADER_LEN + MIN_PAYLOAD_LEN {
                break;
            }
            let left = ext.len - cur.offset;
            let want = left.min(budget.max(HEADER_LEN) as u64) as usize;
            let path = || self.shared.path(cur.seg_first);

            let chunk = out.len();
            out.resize(chunk + want, 0);
            read_exact_at(&cur.file, &path(), &mut out[chunk..], cur.offset)?;
            let mut p = 0usize;
            let mut full = false;
            while self.pos <= upto {
                let corrupt = |source| BinlogError::Corrupt {
                    segment: path(),
                    offset: cur.offset,
                    source,
                };
                match record::frame_len(&out[chunk + p..]) {
                    Ok(n) => {
                        let frame = &out[chunk + p..chunk + p + n];
                        match record::peek(frame) {
                            Some((i, _)) if i == self.pos => {}
                            other => {
                                return Err(corrupt(RecordError::Invalid(format!(
                                    "record carries index {:?} where event {} belongs",
                                    other.map(|o| o.0),
                                    self.pos
                                ))));
                            }
                        }
                        p += n;
                        *produced += n;
                        cur.offset += n as u64;
                        self.pos += 1;
                    }
                    Err(RecordError::Truncated { needed, have }) => {
                        if have == 0 {
                            break; // chunk consumed exactly
                        }
                        if cur.offset + needed as u64 > ext.len {
                            return Err(corrupt(RecordError::Truncated {
                                needed,
                                have: (ext.len - cur.offset) as usize,
                            }));
                        }
                        if *produced == 0 {
                            // A single record larger than the budget: read the rest of it.
                            let at = out.len();
                            out.resize(chunk + p + needed, 0);
                            read_exact_at(
                                &cur.file,
                                &path(),
                                &mut out[at..],
                                cur.offset + have as u64,
                            )?;
                            continue;
                        }
                        // The next record straddles the end of a chunk cut to
                        // the budget: it does not fit.
                        full = true;
                        break;
                    }
                    Err(e) => return Err(corrupt(e)),
                }
            }
            out.truncate(chunk + p);
            if full {
                break;
            }
        }
        Ok(())
    }

    /// Makes sure the cursor is valid for `pos` and returns the readable
    /// extent of its segment; `None` when `pos` is past the last event.
    fn extent(&mut self) -> Result<Option<Extent>, BinlogError> {
        for _ in 0..2 {
            {
                let meta = self.shared.read();
                if let Some(cur) = self.cur.as_mut().filter(|c| c.epoch == meta.epoch) {
                    match meta.find(cur.seg_first, cur.seg_id) {
                        Some(seg) => {
                            if !meta.is_tail(seg.id) {
                                cur.sealed = Some((seg.len, seg.last_index));
                            }
                            return Ok(Some(Extent {
                                len: seg.len,
                                last: seg.last_index,
                            }));
                        }
                        // Purged under us: a sealed segment is still readable.
                        None => match cur.sealed {
                            Some((len, last)) if self.pos <= last => {
                                return Ok(Some(Extent { len, last }));
                            }
                            _ => {}
                        },
                    }
                }
                if self.pos > meta.next_index {
                    return Err(BinlogError::OutOfRange {
                        index: self.pos,
                        last: meta.last_index(),
                    });
                }
                if self.pos == meta.next_index {
                    return Ok(None);
                }
            }
            self.seek(self.pos)?;
        }
        // Only reached if the log changed between the seek and the check
        // twice in a row; report nothing rather than spin.
        Ok(None)
    }
}
