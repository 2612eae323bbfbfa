//! The binlog's recent tail in memory, so sync sessions ship what the
//! committer just wrote without reading segment files.
//!
//! The committer [`push`](Tail::push)es each group's framed records (the very
//! bytes it appended to the binlog) once the group is shippable: after its
//! fsync under `fsync = always`, after its write otherwise, and always before
//! it publishes the new shippable index, so a session woken by that index
//! finds the group here. A group whose append failed was undone by the binlog
//! and is never pushed. The tail keeps the most recent groups within a byte
//! budget and drops the oldest; the groups it holds are always consecutive
//! (a push that does not continue the newest group clears it first). The
//! master never truncates or resets its binlog while running (only at
//! start-up, before the tail exists), and retention purges only old segments,
//! so whatever the tail holds is still in the binlog, byte for byte.
//!
//! A session [`read`](Tail::read)s from its next index while that index is in
//! the tail, and falls back to the segment files when it is older (a slave
//! catching up, or just connected).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tern_common::record;

/// Bytes of recent groups kept in memory: one copy for all sessions. At
/// least four of the committer's largest groups (8 MiB), and a few seconds of
/// the binlog at the master's full write rate (a few MB/s with 100-byte
/// values), which is more lag than a connected slave with room in its window
/// has; a slave further behind reads the segment files until it catches up.
pub const TAIL_BYTES: usize = 32 << 20;

/// A group whose buffer is less than half used is copied to an exact-sized
/// one (it is small: the committer starts each group with 64 KiB), so the
/// budget counts real bytes and the tail does not keep mostly empty buffers.
const MIN_USED_FRACTION: usize = 2;

/// Recent groups of framed binlog records.
pub struct Tail {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    groups: VecDeque<Group>,
    /// Memory the groups hold (their buffers' capacity).
    bytes: usize,
}

struct Group {
    first: u64,
    last: u64,
    records: Bytes,
    /// Bytes of memory this group holds.
    cost: usize,
}

/// Consecutive framed records `first ..= last`, exactly as in the binlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first: u64,
    pub last: u64,
    pub records: Bytes,
}

impl Tail {
    pub fn new(budget: usize) -> Tail {
        Tail {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Only field updates happen under the lock.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a group: framed records of events `first ..= last`, exactly as
    /// appended to the binlog, now shippable. Drops the oldest groups over
    /// the budget (a group larger than the budget is not kept at all).
    pub fn push(&self, first: u64, last: u64, records: Vec<u8>) {
        // The binlog's append checked that `records` are events `first..=last`.
        debug_assert!(first <= last && !records.is_empty());
        let (records, cost) = if records.len() * MIN_USED_FRACTION >= records.capacity() {
            let cost = records.capacity();
            (Bytes::from(records), cost)
        } else {
            (Bytes::copy_from_slice(&records), records.len())
        };
        let mut evicted = Vec::new();
        {
            let mut inner = self.inner();
            if inner.groups.back().is_some_and(|g| g.last + 1 != first) {
                evicted.extend(inner.groups.drain(..));
                inner.bytes = 0;
            }
            inner.bytes += cost;
            inner.groups.push_back(Group {
                first,
                last,
                records,
                cost,
            });
            while inner.bytes > self.budget {
                let Some(g) = inner.groups.pop_front() else {
                    break;
                };
                inner.bytes -= g.cost;
                evicted.push(g);
            }
        }
        // Buffers are freed outside the lock.
        drop(evicted);
    }

    /// `(first, last)` index held, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        let inner = self.inner();
        Some((inner.groups.front()?.first, inner.groups.back()?.last))
    }

    /// Memory the groups hold.
    pub fn bytes(&self) -> usize {
        self.inner().bytes
    }

    /// The records from event `next`, never past `upto`, at most `max_bytes`
    /// (but at least one record, however large), crossing groups as needed:
    /// the batch the binlog reader would return. `None` when `next` is not in
    /// the tail (older than its oldest group, or newer than its newest) or is
    /// past `upto`. Within one group the batch shares the group's buffer;
    /// across groups it is one copy.
    pub fn read(&self, next: u64, upto: u64, max_bytes: usize) -> Option<Batch> {
        if next > upto {
            return None;
        }
        // Take what may be needed under the lock (reference counts only),
        // walk the records outside it.
        let mut parts: Vec<(u64, Bytes)> = Vec::new();
        {
            let inner = self.inner();
            let i = inner.groups.partition_point(|g| g.last < next);
            let g = inner.groups.get(i)?;
            if g.first > next {
                return None;
            }
            let mut whole = 0usize;
            for g in inner.groups.range(i..) {
                if g.first > upto || (!parts.is_empty() && whole >= max_bytes) {
                    break;
                }
                parts.push((g.first, g.records.clone()));
                if parts.len() > 1 {
                    whole += g.records.len();
                }
            }
        }
        // Byte ranges of `parts` that make the batch.
        let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
        let mut total = 0usize;
        let mut index = next;
        'parts: for (p, (first, records)) in parts.iter().enumerate() {
            let mut off = 0usize;
            if p == 0 {
                for _ in *first..next {
                    off += record::frame_len(&records[off..]).ok()?;
                }
            }
            let start = off;
            while off < records.len() {
                let len = record::frame_len(&records[off..]).ok()?;
                if index > upto || (total > 0 && total + len > max_bytes) {
                    if off > start {
                        pieces.push((p, start, off));
                    }
                    break 'parts;
                }
                off += len;
                total += len;
                index += 1;
            }
            if off > start {
                pieces.push((p, start, off));
            }
        }
        let records = match pieces.as_slice() {
            [] => return None,
            [(p, start, end)] => parts[*p].1.slice(*start..*end),
            _ => {
                let mut out = BytesMut::with_capacity(total);
                for (p, start, end) in &pieces {
                    out.extend_from_slice(&parts[*p].1[*start..*end]);
                }
                out.freeze()
            }
        };
        Some(Batch {
            first: next,
            last: index - 1,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_common::record::{Event, encode_record};

    /// Framed records of events `first ..= last` (one transaction of puts),
    /// each `Put` value `value_len` bytes.
    fn group(first: u64, last: u64, value_len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in first..=last {
            let ev = if i == first {
                Event::begin(i, i, 0)
            } else if i == last {
                Event::commit(i, first)
            } else {
                Event::put(i, format!("k{i}"), vec![b'v'; value_len])
            };
            encode_record(&ev, &mut out);
        }
        out
    }

    /// The framed bytes of events `first ..= last` across `groups`.
    fn expect(groups: &[(u64, u64, Vec<u8>)], first: u64, last: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (f, _, g) in groups {
            let mut off = 0;
            let mut i = *f;
            while off < g.len() {
                let len = record::frame_len(&g[off..]).unwrap();
                if (first..=last).contains(&i) {
                    out.extend_from_slice(&g[off..off + len]);
                }
                off += len;
                i += 1;
            }
        }
        out
    }

    fn filled(tail: &Tail, groups: &[(u64, u64)], value_len: usize) -> Vec<(u64, u64, Vec<u8>)> {
        let mut all = Vec::new();
        for &(f, l) in groups {
            let g = group(f, l, value_len);
            tail.push(f, l, g.clone());
            all.push((f, l, g));
        }
        all
    }

    #[test]
    fn reads_within_and_across_groups() {
        let tail = Tail::new(1 << 20);
        let all = filled(&tail, &[(1, 3), (4, 10), (11, 12)], 10);
        assert_eq!(tail.range(), Some((1, 12)));
        // One whole group, a part of one, and across all three.
        for (next, upto) in [(1, 3), (4, 10), (5, 7), (2, 12), (1, 12), (12, 12)] {
            let b = tail.read(next, upto, 1 << 20).expect("in the tail");
            assert_eq!((b.first, b.last), (next, upto));
            assert_eq!(b.records, expect(&all, next, upto), "{next}..={upto}");
        }
        // Past upto, past the newest: nothing.
        assert_eq!(tail.read(5, 4, 1 << 20), None);
        assert_eq!(tail.read(13, 20, 1 << 20), None);
    }

    #[test]
    fn a_batch_within_one_group_shares_its_buffer() {
        let tail = Tail::new(1 << 20);
        tail.push(1, 5, group(1, 5, 100));
        let a = tail.read(1, 5, 1 << 20).unwrap();
        let b = tail.read(2, 4, 1 << 20).unwrap();
        // Both are views of one buffer: b starts inside a.
        let (pa, pb) = (a.records.as_ptr() as usize, b.records.as_ptr() as usize);
        assert!(pb > pa && pb + b.records.len() < pa + a.records.len());
    }

    #[test]
    fn batches_stop_at_max_bytes_on_record_boundaries() {
        let tail = Tail::new(1 << 20);
        let all = filled(&tail, &[(1, 10), (11, 20)], 100);
        let rec = expect(&all, 2, 2).len();
        // Room for three records: three, from the middle of the first group.
        let b = tail.read(2, 20, 3 * rec + rec / 2).unwrap();
        assert_eq!((b.first, b.last), (2, 4));
        assert_eq!(b.records, expect(&all, 2, 4));
        // Across the group boundary (Begin and Commit are smaller than a Put).
        let b = tail.read(9, 20, expect(&all, 9, 11).len()).unwrap();
        assert_eq!((b.first, b.last), (9, 11));
        assert_eq!(b.records, expect(&all, 9, 11));
        // A limit below one record still returns one record.
        let b = tail.read(5, 20, 1).unwrap();
        assert_eq!((b.first, b.last), (5, 5));
        assert_eq!(b.records, expect(&all, 5, 5));
        // Walking the whole tail in small batches gives every byte once.
        let (mut next, mut got) = (1, Vec::new());
        while let Some(b) = tail.read(next, 20, 5 * rec) {
            assert_eq!(b.first, next);
            got.extend_from_slice(&b.records);
            next = b.last + 1;
        }
        assert_eq!(next, 21);
        assert_eq!(got, expect(&all, 1, 20));
    }

    #[test]
    fn evicts_the_oldest_groups_over_the_budget() {
        let one = group(1, 10, 1000).len();
        let last_three: usize = [(11, 20), (21, 30), (31, 40)]
            .map(|(f, l)| group(f, l, 1000).len())
            .iter()
            .sum();
        let tail = Tail::new(last_three);
        let all = filled(&tail, &[(1, 10), (11, 20), (21, 30), (31, 40)], 1000);
        assert_eq!(tail.range(), Some((11, 40)));
        assert_eq!(tail.bytes(), last_three);
        // Older than the oldest group: a miss (the session reads the files).
        assert_eq!(tail.read(1, 40, 1 << 20), None);
        assert_eq!(tail.read(10, 40, 1 << 20), None);
        let b = tail.read(11, 40, 1 << 20).unwrap();
        assert_eq!(b.records, expect(&all, 11, 40));
        // A group larger than the whole budget is not kept.
        let small = Tail::new(one / 2);
        small.push(1, 10, group(1, 10, 1000));
        assert_eq!(small.range(), None);
        assert_eq!(small.read(1, 10, 1 << 20), None);
    }

    #[test]
    fn a_push_that_does_not_continue_the_tail_replaces_it() {
        let tail = Tail::new(1 << 20);
        filled(&tail, &[(1, 5), (6, 8)], 10);
        let g = group(20, 22, 10);
        tail.push(20, 22, g.clone());
        assert_eq!(tail.range(), Some((20, 22)));
        assert_eq!(tail.read(6, 22, 1 << 20), None);
        assert_eq!(tail.read(20, 22, 1 << 20).unwrap().records, g);
    }

    #[test]
    fn small_groups_are_kept_in_exact_buffers() {
        let tail = Tail::new(1 << 20);
        let mut g = Vec::with_capacity(64 << 10);
        g.extend_from_slice(&group(1, 3, 10));
        let len = g.len();
        tail.push(1, 3, g);
        assert_eq!(tail.bytes(), len);
        // A mostly full buffer is kept as it is, counted by its capacity.
        let mut g = Vec::with_capacity(len + 1);
        g.extend_from_slice(&group(4, 6, 10));
        tail.push(4, 6, g);
        assert_eq!(tail.bytes(), 2 * len + 1);
    }
}
