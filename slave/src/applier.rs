//! The slave's applier: tails the relay log and applies whole transactions to
//! RocksDB, strictly in master order (I5).
//!
//! ```text
//! relay log ──read up to `received`──▶ scheduler ──▶ N prepare workers
//!                                                       │ per-transaction write sets
//!                           ordered committer ◀─────────┘
//!          one WriteBatch per group: data + applied index + last seq (I2)
//! ```
//!
//! The relay log is the apply queue: the receiver never waits for the applier,
//! so a slow apply cannot stall the link or its heartbeats (I7). The applier
//! never reads past `received`, which only moves at Commit boundaries (I3), so
//! it never sees half a transaction. A transaction at or below the applied index
//! is skipped and counted in `duplicates_skipped` (I5's second line of defence).
//! Prepare is pure (after-images need no reads), so workers may run any
//! transactions side by side; the committer restores master order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tern_common::binlog::BinlogReader;
use tern_common::record::{Event, EventKind};
use tern_common::state::{FLUSH_INTERVAL, GroupBatch, State};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Bytes of relay log read per apply step (one group at most this large).
const APPLY_CHUNK_BYTES: usize = 4 << 20;

/// One transaction read from the relay log.
struct Txn {
    seq: u64,
    commit_index: u64,
    events: Vec<Event>,
}

/// A transaction's write set, ready to commit.
struct Prepared {
    seq: u64,
    writes: Vec<(Bytes, Option<Bytes>)>,
}

fn prepare(txn: Txn) -> Prepared {
    let writes = txn
        .events
        .into_iter()
        .filter_map(|ev| match ev.kind {
            EventKind::Put { key, value } => Some((key, Some(value))),
            EventKind::Delete { key } => Some((key, None)),
            EventKind::Begin { .. } | EventKind::Commit { .. } => None,
        })
        .collect();
    Prepared {
        seq: txn.seq,
        writes,
    }
}

pub struct ApplierHandle {
    pub applied: watch::Receiver<u64>,
    pub join: std::thread::JoinHandle<anyhow::Result<()>>,
}

pub struct Applier {
    state: State,
    reader: BinlogReader,
    received: watch::Receiver<u64>,
    applied_tx: watch::Sender<u64>,
    workers: usize,
    duplicates_skipped: Arc<AtomicU64>,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Handle,
    /// A transaction whose Commit the last read did not reach yet.
    carry: Option<Txn>,
    last_flush: std::time::Instant,
    #[cfg(feature = "fault-injection")]
    delay: Option<std::time::Duration>,
}

impl Applier {
    pub fn spawn(
        state: State,
        reader: BinlogReader,
        received: watch::Receiver<u64>,
        workers: usize,
        duplicates_skipped: Arc<AtomicU64>,
        shutdown: CancellationToken,
    ) -> ApplierHandle {
        let (applied_tx, applied) = watch::channel(state.applied_index());
        let applier = Applier {
            state,
            reader,
            received,
            applied_tx,
            workers: workers.max(1),
            duplicates_skipped,
            shutdown,
            runtime: tokio::runtime::Handle::current(),
            carry: None,
            last_flush: std::time::Instant::now(),
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
        let mut next = self.state.applied_index() + 1;
        let mut seeked = false;
        loop {
            let received = *self.received.borrow_and_update();
            if received >= next {
                if !seeked {
                    self.reader.seek(next)?;
                    seeked = true;
                }
                next = self.apply_chunk(received)? + 1;
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

    /// Reads and applies transactions up to `received`; returns the new applied index.
    fn apply_chunk(&mut self, received: u64) -> anyhow::Result<u64> {
        let events = self.reader.read_events(received, APPLY_CHUNK_BYTES)?;
        let mut txns = Vec::new();
        let mut current: Option<Txn> = self.carry.take();
        for ev in events {
            match &ev.kind {
                EventKind::Begin { seq, .. } => {
                    anyhow::ensure!(
                        current.is_none(),
                        "Begin inside a transaction at {}",
                        ev.index
                    );
                    current = Some(Txn {
                        seq: *seq,
                        commit_index: 0,
                        events: vec![],
                    });
                }
                EventKind::Commit { .. } => {
                    let mut t = current.take().ok_or_else(|| {
                        anyhow::anyhow!("Commit outside a transaction at {}", ev.index)
                    })?;
                    t.commit_index = ev.index;
                    txns.push(t);
                    continue;
                }
                _ => {}
            }
            if let Some(t) = current.as_mut() {
                t.events.push(ev);
            } else {
                anyhow::bail!("data event outside a transaction at {}", ev.index);
            }
        }
        // A read that stopped inside a transaction (chunk size) carries it over.
        self.carry = current;
        let applied = self.state.applied_index();
        let before = txns.len();
        txns.retain(|t| t.commit_index > applied);
        let skipped = (before - txns.len()) as u64;
        if skipped > 0 {
            self.duplicates_skipped
                .fetch_add(skipped, Ordering::Relaxed);
            tracing::warn!(
                skipped,
                applied,
                "skipped transactions at or below the applied index"
            );
        }
        let Some(last) = txns.last() else {
            return Ok(applied);
        };
        let (index, seq) = (last.commit_index, last.seq);
        let prepared = self.prepare_all(txns);
        let mut batch = GroupBatch::default();
        for p in &prepared {
            for (k, v) in &p.writes {
                match v {
                    Some(v) => batch.put(k, v),
                    None => batch.delete(k),
                }
            }
        }
        #[cfg(feature = "fault-injection")]
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        self.state.apply(batch, index, seq)?;
        self.applied_tx.send_replace(index);
        if self.last_flush.elapsed() >= FLUSH_INTERVAL {
            self.last_flush = std::time::Instant::now();
            self.state.request_flush()?;
        }
        Ok(index)
    }

    /// Prepares transactions on up to `workers` threads; returns them in master order.
    fn prepare_all(&self, txns: Vec<Txn>) -> Vec<Prepared> {
        if self.workers == 1 || txns.len() < 2 * self.workers {
            return txns.into_iter().map(prepare).collect();
        }
        let per = txns.len().div_ceil(self.workers);
        let mut chunks: Vec<Vec<Txn>> = Vec::with_capacity(self.workers);
        let mut it = txns.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(per).collect());
        }
        let mut out: Vec<Prepared> = std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|c| s.spawn(move || c.into_iter().map(prepare).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("prepare worker"))
                .collect()
        });
        // The ordered committer: master order, whatever order workers finished in.
        out.sort_by_key(|p| p.seq);
        out
    }
}
