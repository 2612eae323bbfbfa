//! The slave's applier: applies whole transactions to RocksDB, sequentially and
//! strictly in master order (I5), from the receiver's hand-off or, when that
//! does not continue what is applied, from the relay log.
//!
//! ```text
//! receiver ──(relay durable, `received` moved)──▶ hand-off queue (bounded) ─┐
//!     │                                                                    ├─▶ applier ─▶ one group
//!     └──▶ relay log ──read up to `received` (fallback) ────────────────────┘    per step: data +
//!                                                                                applied index + last seq (I2)
//! ```
//!
//! The receiver decodes every event while it verifies a batch; once the batch's
//! transactions are durable in the relay log (`received` moved, I3) it hands
//! them over as a [`Chunk`] that names its first and last index. The applier
//! uses a chunk only if it continues exactly what is applied (`first ==
//! applied + 1`) and ends at or below `received`; a chunk that is already
//! applied, or starts inside what is applied, is dropped; a chunk after a gap
//! (the queue was full, the applier restarted, a full sync) is held while the
//! gap is read from the relay log. So whatever the queue holds, nothing is
//! skipped or applied twice, and RocksDB never gets ahead of the durable relay
//! log. The receiver never waits for the applier (a full queue drops the
//! chunk), so a slow apply cannot stall the link or its heartbeats (I7).
//!
//! The applier never reads or applies past `received`, which only moves at
//! Commit boundaries (I3), so it never sees half a transaction. A transaction
//! at or below the applied index met in the relay log is skipped and counted
//! in `duplicates_skipped` (I5's second line of defence).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};

use tern_common::binlog::BinlogReader;
use tern_common::record::{Event, EventKind};
use tern_common::replay::add_to_batch;
use tern_common::state::{FLUSH_INTERVAL, GroupBatch, State};

use crate::verify::Verifier;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Bytes of relay log read per apply step (one group at most this large).
const APPLY_CHUNK_BYTES: usize = 4 << 20;
/// Events applied from the hand-off as one group (whole chunks; at least one).
const APPLY_CHUNK_EVENTS: usize = 64 * 1024;
/// Chunks the hand-off queue holds; the receiver drops a chunk when it is full.
pub const HANDOFF_CHUNKS: usize = 64;
/// Record bytes the hand-off queue holds (its events keep the received
/// messages' buffers alive); beyond this the receiver drops a chunk.
pub const HANDOFF_BYTES: usize = 64 << 20;

/// Whole transactions `[first, last]` that are durable in the relay log,
/// decoded by the receiver.
#[derive(Debug)]
pub struct Chunk {
    /// Index of the first event (a Begin).
    pub first: u64,
    /// Index of the last event (a Commit).
    pub last: u64,
    pub events: Vec<Event>,
}

/// The receiver's end of the hand-off.
#[derive(Clone)]
pub struct HandOff {
    tx: SyncSender<(usize, Chunk)>,
    queued_bytes: Arc<AtomicUsize>,
}

/// The applier's end of the hand-off.
pub struct HandOffRx {
    rx: Receiver<(usize, Chunk)>,
    queued_bytes: Arc<AtomicUsize>,
}

impl HandOff {
    /// Offers a chunk; never blocks. A chunk the queue cannot take (full, in
    /// chunks or bytes) is dropped: the applier reads those transactions from
    /// the relay log.
    pub fn offer(&self, chunk: Chunk) {
        let bytes: usize = chunk.events.iter().map(Event::record_len).sum();
        if self.queued_bytes.load(Ordering::Relaxed) + bytes > HANDOFF_BYTES {
            return;
        }
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        match self.tx.try_send((bytes, chunk)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            }
        }
    }
}

impl HandOffRx {
    fn try_recv(&self) -> Option<Chunk> {
        match self.rx.try_recv() {
            Ok((bytes, c)) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                Some(c)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }
}

/// A bounded hand-off queue from the receiver to the applier.
pub fn hand_off() -> (HandOff, HandOffRx) {
    let (tx, rx) = std::sync::mpsc::sync_channel(HANDOFF_CHUNKS);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    (
        HandOff {
            tx,
            queued_bytes: queued_bytes.clone(),
        },
        HandOffRx { rx, queued_bytes },
    )
}

/// What the applier does with a handed-off chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It continues what is applied and is durable: apply it.
    Apply,
    /// It is already applied, or starts inside what is applied: drop it.
    Drop,
    /// It starts after a gap (read the gap from the relay log first) or is
    /// not durable yet: keep it.
    Hold,
}

/// The hand-off rule: a chunk is applied only when `first == applied + 1` and
/// `last <= received`, so the memory path never skips, repeats or runs ahead
/// of the durable relay log.
pub fn judge(first: u64, last: u64, applied: u64, received: u64) -> Verdict {
    if first <= applied {
        Verdict::Drop
    } else if first > applied + 1 || last > received {
        Verdict::Hold
    } else {
        Verdict::Apply
    }
}

/// Counters of where applied events came from (logged when the applier stops).
#[derive(Debug, Default)]
pub struct ApplyStats {
    pub memory_events: u64,
    pub disk_events: u64,
    pub chunks_dropped: u64,
    pub batches: u64,
}

pub struct ApplierHandle {
    pub applied: watch::Receiver<u64>,
    pub join: std::thread::JoinHandle<anyhow::Result<()>>,
}

pub struct Applier {
    state: State,
    reader: BinlogReader,
    seeked: bool,
    received: watch::Receiver<u64>,
    applied_tx: watch::Sender<u64>,
    handoff: HandOffRx,
    /// A chunk waiting for the relay log to fill the gap before it, or for `received`.
    held: Option<Chunk>,
    duplicates_skipped: Arc<AtomicU64>,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Handle,
    /// The start of a transaction whose Commit the last relay read did not
    /// reach yet (events `applied + 1 ..`).
    carry: Vec<Event>,
    last_flush: std::time::Instant,
    stats: ApplyStats,
    /// Online consistency checks (check points and the master's digests).
    verifier: Option<Verifier>,
    #[cfg(feature = "fault-injection")]
    delay: Option<std::time::Duration>,
}

impl Applier {
    pub fn spawn(
        state: State,
        reader: BinlogReader,
        received: watch::Receiver<u64>,
        handoff: HandOffRx,
        duplicates_skipped: Arc<AtomicU64>,
        shutdown: CancellationToken,
        verifier: Option<Verifier>,
    ) -> ApplierHandle {
        let (applied_tx, applied) = watch::channel(state.applied_index());
        let applier = Applier {
            state,
            reader,
            seeked: false,
            received,
            applied_tx,
            handoff,
            held: None,
            duplicates_skipped,
            shutdown,
            runtime: tokio::runtime::Handle::current(),
            carry: Vec::new(),
            last_flush: std::time::Instant::now(),
            stats: ApplyStats::default(),
            verifier,
            #[cfg(feature = "fault-injection")]
            delay: std::env::var("TERN_FAULT_APPLY_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis),
        };
        let join = std::thread::Builder::new()
            .name("applier".into())
            .spawn(move || applier.run())
            .expect("spawn applier thread");
        ApplierHandle { applied, join }
    }

    /// Applies until shutdown, then drains everything received before returning.
    fn run(mut self) -> anyhow::Result<()> {
        let result = self.run_inner();
        let s = &self.stats;
        tracing::info!(
            from_handoff = s.memory_events,
            from_relay_log = s.disk_events,
            chunks_dropped = s.chunks_dropped,
            batches = s.batches,
            "applier stopped"
        );
        result
    }

    fn run_inner(&mut self) -> anyhow::Result<()> {
        loop {
            if self.step()? {
                continue;
            }
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let mut rx = self.received.clone();
            let shutdown = self.shutdown.clone();
            let open = self.runtime.block_on(async move {
                tokio::select! {
                    r = rx.changed() => r.is_ok(),
                    _ = shutdown.cancelled() => true,
                }
            });
            if !open {
                return Ok(());
            }
        }
    }

    fn next_chunk(&mut self) -> Option<Chunk> {
        self.handoff.try_recv()
    }

    /// One apply step: handed-off chunks that continue the applied index, else
    /// the relay log up to `received` (or up to a held chunk). Returns whether
    /// anything was applied.
    fn step(&mut self) -> anyhow::Result<bool> {
        if self.held.is_none() {
            self.held = self.next_chunk();
        }
        // The receiver offers a chunk just before it moves `received` over it,
        // so a chunk may look newer than `received` for a moment: it is held,
        // and the move wakes this thread.
        let received = *self.received.borrow_and_update();
        let applied = self.state.applied_index();
        let mut take = Vec::new();
        let (mut upto, mut events) = (applied, 0usize);
        while let Some(c) = self.held.take() {
            match judge(c.first, c.last, upto, received) {
                Verdict::Apply => {
                    upto = c.last;
                    events += c.events.len();
                    take.push(c);
                    if events >= APPLY_CHUNK_EVENTS {
                        break;
                    }
                    self.held = self.next_chunk();
                }
                Verdict::Drop => {
                    self.stats.chunks_dropped += 1;
                    self.held = self.next_chunk();
                }
                Verdict::Hold => {
                    self.held = Some(c);
                    break;
                }
            }
        }
        if !take.is_empty() {
            // The relay reader's position and carry no longer continue the state.
            self.carry.clear();
            self.seeked = false;
            self.stats.memory_events += events as u64;
            let events = take.into_iter().flat_map(|c| c.events);
            let segments = collect(events, applied, &mut self.carry, &mut 0)?;
            anyhow::ensure!(
                self.carry.is_empty() && segments.last().map(|s| s.index) == Some(upto),
                "handed-off chunks up to {upto} do not end at a Commit"
            );
            self.commit_segments(segments)?;
            return Ok(true);
        }
        // Up to a held chunk after a gap; a held chunk that continues the
        // state but is not durable yet does not stop the relay log.
        let upto = match &self.held {
            Some(c) if c.first > applied + 1 => received.min(c.first - 1),
            _ => received,
        };
        if upto > applied {
            self.apply_from_relay(applied, upto)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Reads and applies transactions from the relay log, at most up to `upto`
    /// (a boundary at or below `received`).
    fn apply_from_relay(&mut self, applied: u64, upto: u64) -> anyhow::Result<()> {
        let next = applied + 1 + self.carry.len() as u64;
        if !self.seeked || self.reader.position() != next {
            self.carry.clear();
            self.reader.seek(applied + 1)?;
            self.seeked = true;
        }
        let events = self.reader.read_events(upto, APPLY_CHUNK_BYTES)?;
        self.stats.disk_events += events.len() as u64;
        let carried = std::mem::take(&mut self.carry);
        let mut skipped = 0;
        let segments = collect(
            carried.into_iter().chain(events),
            applied,
            &mut self.carry,
            &mut skipped,
        )?;
        if skipped > 0 {
            self.duplicates_skipped
                .fetch_add(skipped, Ordering::Relaxed);
            tracing::warn!(
                skipped,
                applied,
                "skipped transactions at or below the applied index"
            );
        }
        self.commit_segments(segments)
    }

    /// Applies segments in order; a check point is digested right after its
    /// segment, a master's digest compared once its segment is applied.
    fn commit_segments(&mut self, segments: Vec<Segment>) -> anyhow::Result<()> {
        for mut seg in segments {
            self.commit(&mut seg.batch, seg.index, seg.seq)?;
            if let Some(v) = &self.verifier {
                for (point, digest, keys) in &seg.digests {
                    v.digest(*point, digest, *keys);
                }
                if seg.point {
                    v.point(seg.index);
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self, batch: &mut GroupBatch, index: u64, seq: u64) -> anyhow::Result<()> {
        #[cfg(feature = "fault-injection")]
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        self.state.apply(std::mem::take(batch), index, seq)?;
        self.stats.batches += 1;
        self.applied_tx.send_replace(index);
        if self.last_flush.elapsed() >= FLUSH_INTERVAL {
            self.last_flush = std::time::Instant::now();
            self.state.request_flush()?;
        }
        Ok(())
    }
}

/// Complete transactions applied as one group, ending at `index`.
#[derive(Default)]
struct Segment {
    batch: GroupBatch,
    /// Commit index and seq of its last transaction.
    index: u64,
    seq: u64,
    /// Its last transaction is a check point of the consistency checks.
    point: bool,
    /// The master's digests it carries: (point, sha256, keys).
    digests: Vec<(u64, bytes::Bytes, u64)>,
}

/// Adds the data of the complete transactions in `events` to batches, in
/// order: one batch, cut after each check point of the consistency checks
/// (so the state can be digested exactly there). Transactions at or below
/// `applied` are skipped and counted in `skipped`; a trailing partial
/// transaction is left in `carry` (which must be empty).
fn collect(
    events: impl IntoIterator<Item = Event>,
    applied: u64,
    carry: &mut Vec<Event>,
    skipped: &mut u64,
) -> anyhow::Result<Vec<Segment>> {
    debug_assert!(carry.is_empty());
    let mut segments = Vec::new();
    let mut seg = Segment::default();
    let mut open_seg = false;
    // Events of the open transaction, kept until its Commit is seen.
    let mut open: Option<(bool, Vec<Event>)> = None;
    for ev in events {
        match &ev.kind {
            EventKind::Begin { .. } => {
                anyhow::ensure!(open.is_none(), "Begin inside a transaction at {}", ev.index);
                // Boundaries are shared by every copy of the history, so a
                // transaction is applied iff it starts after `applied`.
                open = Some((ev.index <= applied, vec![ev]));
            }
            EventKind::Commit { seq } => {
                let (skip, txn) = open.take().ok_or_else(|| {
                    anyhow::anyhow!("Commit outside a transaction at {}", ev.index)
                })?;
                if skip {
                    *skipped += 1;
                    continue;
                }
                let mut point = false;
                for e in txn {
                    match e.kind {
                        EventKind::VerifyPoint => point = true,
                        EventKind::VerifyDigest {
                            point,
                            digest,
                            keys,
                        } => seg.digests.push((point, digest, keys)),
                        _ => add_to_batch(&mut seg.batch, e),
                    }
                }
                (seg.index, seg.seq, open_seg) = (ev.index, *seq, true);
                if point {
                    seg.point = true;
                    segments.push(std::mem::take(&mut seg));
                    open_seg = false;
                }
            }
            EventKind::Put { .. }
            | EventKind::Delete { .. }
            | EventKind::VerifyPoint
            | EventKind::VerifyDigest { .. } => match open.as_mut() {
                Some((_, txn)) => txn.push(ev),
                None => anyhow::bail!("data event outside a transaction at {}", ev.index),
            },
        }
    }
    if open_seg {
        segments.push(seg);
    }
    if let Some((_, txn)) = open {
        *carry = txn;
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_uses_only_the_chunk_that_continues_applied() {
        // Contiguous and durable.
        assert_eq!(judge(11, 20, 10, 20), Verdict::Apply);
        assert_eq!(judge(11, 20, 10, 30), Verdict::Apply);
        // Repeated (already applied, e.g. from the relay log).
        assert_eq!(judge(1, 10, 10, 20), Verdict::Drop);
        assert_eq!(judge(5, 8, 10, 20), Verdict::Drop);
        // Overlapping what is applied.
        assert_eq!(judge(5, 15, 10, 20), Verdict::Drop);
        // A gap: the relay log first.
        assert_eq!(judge(12, 20, 10, 20), Verdict::Hold);
        // Not durable yet (never past `received`, I3).
        assert_eq!(judge(11, 21, 10, 20), Verdict::Hold);
    }

    #[test]
    fn collect_cuts_a_batch_after_each_check_point() {
        let point = |i: u64, seq: u64| {
            vec![
                Event::begin(i, seq, 0),
                Event {
                    index: i + 1,
                    kind: EventKind::VerifyPoint,
                },
                Event::commit(i + 2, seq),
            ]
        };
        let mut events = vec![
            Event::begin(1, 1, 0),
            Event::put(2, "a", "1"),
            Event::commit(3, 1),
        ];
        events.extend(point(4, 2));
        events.extend([
            Event::begin(7, 3, 0),
            Event {
                index: 8,
                kind: EventKind::VerifyDigest {
                    point: 6,
                    digest: bytes::Bytes::from(vec![7; 32]),
                    keys: 1,
                },
            },
            Event::put(9, "b", "2"),
            Event::commit(10, 3),
        ]);
        let (mut carry, mut skipped) = (Vec::new(), 0);
        let segs = collect(events, 0, &mut carry, &mut skipped).unwrap();
        assert_eq!(segs.len(), 2);
        assert!(segs[0].point && segs[0].index == 6 && segs[0].batch.len() == 1);
        assert!(!segs[1].point && segs[1].index == 10 && segs[1].batch.len() == 1);
        assert_eq!(
            segs[1].digests,
            vec![(6, bytes::Bytes::from(vec![7; 32]), 1)]
        );
        // A point ending the input leaves no empty segment behind.
        let segs = collect(point(1, 1), 0, &mut carry, &mut skipped).unwrap();
        assert_eq!(segs.len(), 1);
    }

    #[test]
    fn collect_skips_applied_and_carries_a_partial_transaction() {
        let events = vec![
            Event::begin(1, 1, 0),
            Event::put(2, "a", "1"),
            Event::commit(3, 1),
            Event::begin(4, 2, 0),
            Event::put(5, "b", "2"),
            Event::commit(6, 2),
            Event::begin(7, 3, 0),
            Event::put(8, "c", "3"),
        ];
        let (mut carry, mut skipped) = (Vec::new(), 0);
        let segments = collect(events, 3, &mut carry, &mut skipped).unwrap();
        assert_eq!(skipped, 1);
        assert_eq!(segments.len(), 1);
        assert_eq!((segments[0].index, segments[0].seq), (6, 2));
        assert_eq!(segments[0].batch.len(), 1);
        assert_eq!(carry.len(), 2);
        assert_eq!(carry[0].index, 7);
    }
}
