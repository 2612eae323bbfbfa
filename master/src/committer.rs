//! The committer: the one owner of the master's write path.
//!
//! Client writes arrive on a bounded channel. The committer, on its own thread,
//! takes every request that is waiting (a **group**), executes each as one
//! transaction against the current state overlaid with the group's uncommitted
//! writes, and logs the **after-images** (`Put`/`Delete` with final values, never
//! "incr by 5"). Then, in this order:
//!
//! 1. one binlog append for the whole group, and with `fsync = always` one fsync;
//! 2. one RocksDB WriteBatch holding the group's data and the applied index (I2);
//! 3. each client gets its commit index.
//!
//! Binlog before state: a crash between 1 and 2 is repaired at start-up by
//! replaying the binlog after the applied index. Nothing is shipped to slaves
//! before it is durable under the fsync policy ([`Progress::shippable`]).
//!
//! The committer also owns binlog **retention** (it owns the [`Binlog`]): at
//! most every [`RETENTION_INTERVAL`], after a group or when idle, it works out
//! what [`crate::retention`] allows, flushes RocksDB (so the state never
//! depends on purged binlog), and purges while holding the pin registry's lock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tern_common::binlog::{Binlog, FsyncPolicy};
use tern_common::kv::{OpOutcome, WriteOp, WriteOutcome};
use tern_common::limits::{MAX_TXN_BYTES, MAX_VALUE_BYTES};
use tern_common::record::{Event, EventKind, encode_record};
use tern_common::state::{FLUSH_INTERVAL, GroupBatch, State};
use tokio::sync::{mpsc, oneshot, watch};

use crate::pins::{Pins, SLAVE_PREFIX, SNAPSHOT_PREFIX};
use crate::retention::{self, Policy};
use crate::writeset::WriteSet;

/// Most requests executed in one group.
const MAX_GROUP_REQUESTS: usize = 2048;
/// A group stops taking requests past this many bytes of binlog.
const MAX_GROUP_BYTES: usize = 8 << 20;
/// Largest total of final keys and values one transaction may log.
const MAX_TXN_WRITE_BYTES: usize = 2 * MAX_TXN_BYTES;
/// Recent group commit times kept for lag figures.
const COMMIT_TIMES: usize = 65_536;
/// Entries kept in the WRITESET history.
const WRITESET_CAPACITY: usize = 256 * 1024;
/// Retention runs at most this often.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum WriteError {
    #[error("value at key {key:?} is not a decimal 64-bit integer")]
    NotAnInteger { key: String },
    #[error("incr_by {delta} on {value} at key {key:?} overflows a 64-bit integer")]
    Overflow { key: String, value: i64, delta: i64 },
    #[error(
        "append would make the value at key {key:?} {len} bytes; the limit is {MAX_VALUE_BYTES}"
    )]
    ValueTooLarge { key: String, len: usize },
    #[error("txn would write {bytes} bytes of final values; the limit is {MAX_TXN_WRITE_BYTES}")]
    TxnTooLarge { bytes: usize },
    #[error("the master is shutting down")]
    ShuttingDown,
    #[error("write path failed: {0}")]
    Internal(String),
}

struct WriteRequest {
    ops: Vec<WriteOp>,
    reply: oneshot::Sender<Result<WriteOutcome, WriteError>>,
}

/// Positions the committer publishes for readers, sync sessions and Info.
pub struct Progress {
    /// Last index applied to RocksDB (readers wait on it for `min_index`).
    pub applied: watch::Sender<u64>,
    /// Last index that may be shipped to slaves (durable under the fsync policy).
    pub shippable: watch::Receiver<u64>,
    shippable_tx: watch::Sender<u64>,
    pub durable: AtomicU64,
    pub last_index: AtomicU64,
    pub first_index: AtomicU64,
    pub binlog_bytes: AtomicU64,
    pub last_seq: AtomicU64,
    pub transactions: AtomicU64,
    pub groups: AtomicU64,
    /// When each recent group committed: (last index of the group, time), for lag_ms.
    commit_times: Mutex<VecDeque<(u64, Instant)>>,
}

impl Progress {
    fn new(binlog: &Binlog, state: &State) -> Arc<Progress> {
        let (shippable_tx, shippable) = watch::channel(binlog.last_index());
        let (applied, _) = watch::channel(state.applied_index());
        Arc::new(Progress {
            applied,
            shippable,
            shippable_tx,
            durable: AtomicU64::new(binlog.durable_index()),
            last_index: AtomicU64::new(binlog.last_index()),
            first_index: AtomicU64::new(binlog.first_index()),
            binlog_bytes: AtomicU64::new(binlog.total_bytes()),
            last_seq: AtomicU64::new(state.last_seq()),
            transactions: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            commit_times: Mutex::new(VecDeque::with_capacity(COMMIT_TIMES)),
        })
    }

    /// How long ago the first event after `applied` was committed (0 if none is).
    pub fn lag_since(&self, applied: u64) -> std::time::Duration {
        let times = self.commit_times.lock().expect("commit times");
        // The first group holding an event after `applied`.
        let i = times.partition_point(|(last, _)| *last <= applied);
        match times.get(i) {
            Some((_, t)) => t.elapsed(),
            None => std::time::Duration::ZERO,
        }
    }

    fn record_commit(&self, last_index: u64) {
        let mut times = self.commit_times.lock().expect("commit times");
        if times.len() == COMMIT_TIMES {
            times.pop_front();
        }
        times.push_back((last_index, Instant::now()));
    }

    fn publish(&self, binlog: &Binlog, fsync: FsyncPolicy) {
        self.durable
            .store(binlog.durable_index(), Ordering::Release);
        self.last_index
            .store(binlog.last_index(), Ordering::Release);
        self.first_index
            .store(binlog.first_index(), Ordering::Release);
        self.binlog_bytes
            .store(binlog.total_bytes(), Ordering::Release);
        let ship = match fsync {
            FsyncPolicy::Always => binlog.durable_index(),
            FsyncPolicy::Everysec | FsyncPolicy::No => binlog.last_index(),
        };
        self.shippable_tx.send_if_modified(|v| {
            let changed = *v != ship;
            *v = ship;
            changed
        });
    }
}

/// Handle for submitting writes. Cheap to clone.
#[derive(Clone)]
pub struct CommitterHandle {
    tx: mpsc::Sender<WriteRequest>,
}

impl CommitterHandle {
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<WriteOutcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(WriteRequest { ops, reply })
            .await
            .map_err(|_| WriteError::ShuttingDown)?;
        rx.await.map_err(|_| WriteError::ShuttingDown)?
    }
}

/// Starts the committer thread. It stops when every [`CommitterHandle`] is gone,
/// after making the binlog and the state durable, and then returns the binlog.
/// It purges the binlog under `retention`, never past `pins` (but see
/// [`crate::retention`] about the hard cap).
pub fn spawn(
    binlog: Binlog,
    state: State,
    fsync: FsyncPolicy,
    retention: Policy,
    pins: Arc<Pins>,
    runtime: tokio::runtime::Handle,
) -> (
    CommitterHandle,
    Arc<Progress>,
    std::thread::JoinHandle<Result<Binlog, WriteError>>,
) {
    let (tx, rx) = mpsc::channel(4 * MAX_GROUP_REQUESTS);
    let progress = Progress::new(&binlog, &state);
    let committer = Committer {
        writeset: WriteSet::new(state.last_seq(), WRITESET_CAPACITY),
        next_seq: state.last_seq() + 1,
        binlog,
        state,
        fsync,
        progress: progress.clone(),
        last_sync: Instant::now(),
        last_flush: Instant::now(),
        retention,
        pins,
        last_retention: Instant::now(),
    };
    let join = std::thread::Builder::new()
        .name("committer".into())
        .spawn(move || committer.run(rx, runtime))
        .expect("spawn committer thread");
    (CommitterHandle { tx }, progress, join)
}

struct Committer {
    binlog: Binlog,
    state: State,
    fsync: FsyncPolicy,
    writeset: WriteSet,
    next_seq: u64,
    progress: Arc<Progress>,
    last_sync: Instant,
    last_flush: Instant,
    retention: Policy,
    pins: Arc<Pins>,
    last_retention: Instant,
}

/// Writes of the group not yet in RocksDB: `None` is a delete.
type Overlay = HashMap<Bytes, Option<Bytes>>;

impl Committer {
    fn run(
        mut self,
        mut rx: mpsc::Receiver<WriteRequest>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Binlog, WriteError> {
        let mut group: Vec<WriteRequest> = Vec::with_capacity(MAX_GROUP_REQUESTS);
        loop {
            let first = match rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                // Idle: wake up every second for the everysec fsync and retention.
                // (The timer is made inside block_on: it needs the runtime's context.)
                Err(mpsc::error::TryRecvError::Empty) => match runtime.block_on(async {
                    tokio::time::timeout(Duration::from_secs(1), rx.recv()).await
                }) {
                    Ok(r) => r,
                    Err(_) => {
                        if self.fsync == FsyncPolicy::Everysec {
                            self.sync_if_due()?;
                        }
                        self.retain_if_due();
                        continue;
                    }
                },
            };
            let Some(first) = first else { break };
            group.push(first);
            while group.len() < MAX_GROUP_REQUESTS {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.commit_group(&mut group) {
                tracing::error!(error = %e, "write path failed; refusing further writes");
                for r in group.drain(..) {
                    let _ = r.reply.send(Err(e.clone()));
                }
                rx.close();
                while let Ok(r) = rx.try_recv() {
                    let _ = r.reply.send(Err(e.clone()));
                }
                return Err(e);
            }
            self.retain_if_due();
        }
        self.binlog
            .sync()
            .map_err(|e| WriteError::Internal(format!("binlog fsync: {e}")))?;
        self.state
            .flush()
            .map_err(|e| WriteError::Internal(format!("rocksdb flush: {e}")))?;
        self.progress.publish(&self.binlog, self.fsync);
        Ok(self.binlog)
    }

    fn sync_if_due(&mut self) -> Result<(), WriteError> {
        if self.binlog.durable_index() < self.binlog.last_index()
            && self.last_sync.elapsed() >= Duration::from_secs(1)
        {
            self.binlog
                .sync()
                .map_err(|e| WriteError::Internal(format!("binlog fsync: {e}")))?;
            self.last_sync = Instant::now();
            self.progress.publish(&self.binlog, self.fsync);
        }
        Ok(())
    }

    /// Runs retention if it has not run for [`RETENTION_INTERVAL`]. A failure is
    /// logged and retried next time; it never stops the write path.
    fn retain_if_due(&mut self) {
        if self.last_retention.elapsed() < RETENTION_INTERVAL {
            return;
        }
        self.last_retention = Instant::now();
        if let Err(e) = self.retain() {
            tracing::warn!(error = %e, "binlog retention failed; will retry");
        }
    }

    fn retain(&mut self) -> Result<(), String> {
        let sealed = retention::sealed_segments(self.binlog.dir())
            .map_err(|e| format!("listing binlog segments: {e}"))?;
        if sealed.is_empty() {
            return Ok(());
        }
        // Everything applied is in RocksDB once flushed; the committer is the
        // only writer, so that is every event of the binlog.
        let applied = self.state.applied_index();
        // A first look without the lock: flush (slow) only if something is due.
        if retention::plan(
            self.retention,
            &sealed,
            self.binlog.total_bytes(),
            applied,
            &self.pins.lock(),
        )
        .is_none()
        {
            return Ok(());
        }
        self.state
            .flush()
            .map_err(|e| format!("rocksdb flush before purge: {e}"))?;
        self.last_flush = Instant::now();
        // Decide again, purge and publish the new first index under the pins'
        // lock: a pin set meanwhile is honoured, one set after sees the new
        // first index.
        let pins = self.pins.lock();
        let Some(plan) = retention::plan(
            self.retention,
            &sealed,
            self.binlog.total_bytes(),
            applied,
            &pins,
        ) else {
            return Ok(());
        };
        if plan.over_cap && plan.passed.is_empty() {
            tracing::info!(
                total_bytes = self.binlog.total_bytes(),
                max_retain_bytes = self.retention.max_retain_bytes,
                purge_to = plan.purge_to,
                "binlog over binlog.max_retain_bytes: purging down to it"
            );
        } else if plan.over_cap {
            let slaves: Vec<&str> = plan
                .passed
                .iter()
                .filter_map(|o| o.strip_prefix(SLAVE_PREFIX))
                .collect();
            let snapshots: Vec<&str> = plan
                .passed
                .iter()
                .filter_map(|o| o.strip_prefix(SNAPSHOT_PREFIX))
                .collect();
            tracing::warn!(
                total_bytes = self.binlog.total_bytes(),
                max_retain_bytes = self.retention.max_retain_bytes,
                purge_to = plan.purge_to,
                ?slaves,
                ?snapshots,
                "binlog over binlog.max_retain_bytes: purging past pins; these slaves will need a \
                 full sync and these snapshots expire"
            );
        }
        let purged = self.binlog.purge_to(plan.purge_to);
        // Publish even after a partial failure: the binlog may have moved.
        self.progress.publish(&self.binlog, self.fsync);
        drop(pins);
        let removed =
            purged.map_err(|e| format!("purging the binlog to {}: {e}", plan.purge_to))?;
        tracing::debug!(
            removed,
            purge_to = plan.purge_to,
            first_index = self.binlog.first_index(),
            total_bytes = self.binlog.total_bytes(),
            "binlog retention"
        );
        Ok(())
    }

    /// Executes, logs, applies and answers one group. On `Err` nothing of the
    /// group was acknowledged and the caller fails every request in it.
    fn commit_group(&mut self, group: &mut Vec<WriteRequest>) -> Result<(), WriteError> {
        let commit_ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let first_index = self.binlog.next_index();
        let mut next_index = first_index;
        let mut records = Vec::with_capacity(64 * 1024);
        let mut batch = GroupBatch::default();
        let mut overlay = Overlay::new();
        let mut answers: Vec<Result<WriteOutcome, WriteError>> = Vec::with_capacity(group.len());
        let mut seq = self.next_seq;
        let mut taken = 0;
        for req in group.iter() {
            if records.len() >= MAX_GROUP_BYTES {
                break;
            }
            taken += 1;
            let (writes, results) = match self.execute(&req.ops, &overlay) {
                Ok(x) => x,
                Err(e) => {
                    answers.push(Err(e));
                    continue;
                }
            };
            let last_committed = self
                .writeset
                .commit(seq, writes.iter().map(|(k, _)| k.as_ref()));
            let mut push = |kind| {
                encode_record(
                    &Event {
                        index: next_index,
                        kind,
                    },
                    &mut records,
                );
                next_index += 1;
            };
            push(EventKind::Begin {
                seq,
                last_committed,
                commit_ts,
            });
            for (key, value) in &writes {
                match value {
                    Some(v) => {
                        batch.put(key, v);
                        push(EventKind::Put {
                            key: key.clone(),
                            value: v.clone(),
                        });
                    }
                    None => {
                        batch.delete(key);
                        push(EventKind::Delete { key: key.clone() });
                    }
                }
            }
            push(EventKind::Commit { seq });
            seq += 1;
            for (k, v) in writes {
                overlay.insert(k, v);
            }
            answers.push(Ok(WriteOutcome {
                index: next_index - 1,
                results,
            }));
        }
        let rest: Vec<WriteRequest> = group.drain(taken..).collect();
        if next_index > first_index {
            let last_index = next_index - 1;
            let io = |what: &str, e: &dyn std::fmt::Display| {
                WriteError::Internal(format!("{what}: {e}"))
            };
            self.binlog
                .append(&records, first_index, last_index, true)
                .map_err(|e| io("binlog append", &e))?;
            if self.fsync == FsyncPolicy::Always {
                self.binlog.sync().map_err(|e| io("binlog fsync", &e))?;
                self.last_sync = Instant::now();
            } else if self.fsync == FsyncPolicy::Everysec {
                self.sync_if_due()?;
            }
            self.progress.publish(&self.binlog, self.fsync);
            self.state
                .apply(batch, last_index, seq - 1)
                .map_err(|e| io("rocksdb write", &e))?;
            let txns = seq - self.next_seq;
            self.next_seq = seq;
            self.progress.last_seq.store(seq - 1, Ordering::Release);
            self.progress
                .transactions
                .fetch_add(txns, Ordering::Relaxed);
            self.progress.groups.fetch_add(1, Ordering::Relaxed);
            self.progress.record_commit(last_index);
            if self.last_flush.elapsed() >= FLUSH_INTERVAL {
                self.last_flush = Instant::now();
                if let Err(e) = self.state.request_flush() {
                    tracing::warn!(error = %e, "background flush request failed");
                }
            }
            self.progress.applied.send_replace(last_index);
        }
        for (req, answer) in group.drain(..).zip(answers) {
            let _ = req.reply.send(answer);
        }
        // Requests beyond the byte cap go first in the next group.
        if !rest.is_empty() {
            group.extend(rest);
            return self.commit_group(group);
        }
        Ok(())
    }

    /// Runs one transaction: returns its writes (after-images, in order) and the
    /// result of each op, or the first error (then nothing of it is kept).
    #[allow(clippy::type_complexity)]
    fn execute(
        &self,
        ops: &[WriteOp],
        group: &Overlay,
    ) -> Result<(Vec<(Bytes, Option<Bytes>)>, Vec<OpOutcome>), WriteError> {
        let mut local: HashMap<Bytes, Option<Bytes>> = HashMap::new();
        // Keys in the order first written; each is logged once, with its final value.
        let mut order: Vec<Bytes> = Vec::with_capacity(ops.len());
        let mut results = Vec::with_capacity(ops.len());
        let read = |local: &HashMap<Bytes, Option<Bytes>>,
                    key: &Bytes|
         -> Result<Option<Bytes>, WriteError> {
            if let Some(v) = local.get(key).or_else(|| group.get(key)) {
                return Ok(v.clone());
            }
            self.state
                .get(key)
                .map(|v| v.map(Bytes::from))
                .map_err(|e| WriteError::Internal(format!("rocksdb read: {e}")))
        };
        for op in ops {
            let (key, value, outcome) = match op {
                WriteOp::Put { key, value } => (key.clone(), Some(value.clone()), OpOutcome::Put),
                WriteOp::Delete { key } => (key.clone(), None, OpOutcome::Delete),
                WriteOp::IncrBy { key, delta } => {
                    let current = match read(&local, key)? {
                        None => 0,
                        Some(v) => parse_i64(&v).ok_or_else(|| WriteError::NotAnInteger {
                            key: String::from_utf8_lossy(key).into_owned(),
                        })?,
                    };
                    let next = current
                        .checked_add(*delta)
                        .ok_or_else(|| WriteError::Overflow {
                            key: String::from_utf8_lossy(key).into_owned(),
                            value: current,
                            delta: *delta,
                        })?;
                    (
                        key.clone(),
                        Some(Bytes::from(next.to_string())),
                        OpOutcome::IncrBy(next),
                    )
                }
                WriteOp::Append { key, value } => {
                    let mut v = read(&local, key)?.map(|b| b.to_vec()).unwrap_or_default();
                    if v.len() + value.len() > MAX_VALUE_BYTES {
                        return Err(WriteError::ValueTooLarge {
                            key: String::from_utf8_lossy(key).into_owned(),
                            len: v.len() + value.len(),
                        });
                    }
                    v.extend_from_slice(value);
                    let len = v.len() as u64;
                    (key.clone(), Some(Bytes::from(v)), OpOutcome::Append(len))
                }
            };
            if local.insert(key.clone(), value).is_none() {
                order.push(key);
            }
            results.push(outcome);
        }
        let writes: Vec<(Bytes, Option<Bytes>)> = order
            .into_iter()
            .map(|k| {
                let v = local.remove(&k).flatten();
                (k, v)
            })
            .collect();
        let bytes: usize = writes
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()))
            .sum();
        if bytes > MAX_TXN_WRITE_BYTES {
            return Err(WriteError::TxnTooLarge { bytes });
        }
        Ok((writes, results))
    }
}

fn parse_i64(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}
