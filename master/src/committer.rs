//! The committer: the one owner of the master's write path.
//!
//! Client writes arrive on a bounded channel. The committer, on its own thread,
//! takes every request that is waiting (a **group**), executes each as one
//! transaction against the current state overlaid with the group's uncommitted
//! writes, and logs the **after-images** (`Put`/`Delete` with final values, never
//! "incr by 5"). Then, in this order:
//!
//! 1. one binlog append for the whole group, and with `fsync = always` one fsync;
//! 2. the group applied to the state with its applied index, atomically
//!    ([`State::apply`]: RocksDB gets it in a batch with the index, I2);
//! 3. each client gets its commit index.
//!
//! **One writer alone.** A client with nothing else to send (`alone` in
//! [`CommitterHandle::submit`]) may find the write path idle: the
//! thread holds no group, nothing is queued, and the recent groups were
//! that client's single writes. Then its write is committed on the client's
//! own runtime thread, as a group of one, with the same steps under the
//! same lock (the committer's state is one `Mutex`, held by whichever
//! thread commits), saving the two thread wake-ups of the hand-off. A
//! request queued earlier always commits first, so each caller's order
//! holds either way.
//!
//! Binlog before state: a crash between 1 and 2 is repaired at start-up by
//! replaying the binlog after the applied index. Nothing is shipped to slaves
//! before it is durable under the fsync policy ([`Progress::shippable`]); the
//! binlog's [`Durability`](tern_common::durability) decides when to fsync.
//!
//! # When the write path fails
//!
//! The committer never stops on an error; it answers every request and tells
//! the node through [`Progress::write_path`] (gRPC health, `Info.writable`):
//!
//! - **append fails** (a full disk, too many open files, EIO on write, a new
//!   segment that cannot be created): the binlog undid the append, so nothing
//!   of the group exists anywhere; its clients get [`WriteError::NotCommitted`]
//!   (RESOURCE_EXHAUSTED for a resource that ran out, UNAVAILABLE otherwise),
//!   and the next group is tried normally: writes work again as soon as the
//!   cause is gone. While failing, an idle committer probes the binlog
//!   directory once a second so health comes back without a write.
//! - **fsync fails**: the kernel may have dropped the dirty pages, so a later
//!   fsync that succeeds proves nothing. The group's clients get
//!   [`WriteError::SyncFailed`] (outcome unknown), every later request
//!   [`WriteError::Failed`], and the write path is failed for good: the node
//!   stops and exits non-zero without a clean-shutdown marker, and start-up
//!   recovery reads what is really on disk (PostgreSQL's PANIC on fsync
//!   failure).
//! - **the RocksDB write fails** after the append: the group is committed (in
//!   the binlog, maybe shipped) but not in the state. Its clients are not
//!   answered yet; new groups are refused with [`WriteError::StateBehind`]
//!   (executing them against a state missing a committed group would be
//!   wrong), and before each group and once a second the committer replays the
//!   binlog after the applied index, as start-up recovery does. When that
//!   succeeds the held clients get their answers and writes resume. RocksDB
//!   keeps some errors for good (a background flush that failed on a full disk
//!   fails every later write, even once there is space, and its C API cannot
//!   resume), so after [`STATE_RETRY_FOR`] of failures the write path fails for
//!   good: the held clients get [`WriteError::Unknown`], the binlog (which is
//!   fine) is fsynced, and the node exits non-zero; start-up recovery replays
//!   the binlog into a freshly opened RocksDB.
//!
//! The committer also owns binlog **retention** (it owns the [`Binlog`]): at
//! most every [`RETENTION_INTERVAL`], after a group or when idle, it works out
//! what [`crate::retention`] allows, flushes RocksDB (so the state never
//! depends on purged binlog), and purges while holding the pin registry's lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tern_common::binlog::{Binlog, BinlogError};
use tern_common::kv::{OpOutcome, UNKNOWN_WRITER, WriteOp, WriteOutcome, WriterId};
use tern_common::limits::{MAX_TXN_BYTES, MAX_VALUE_BYTES};
use tern_common::record::{Event, EventKind, encode_record};
use tern_common::replay::add_to_batch;
use tern_common::state::{FLUSH_INTERVAL, GroupBatch, KeyspaceChecksum, State};
use tokio::sync::{mpsc, oneshot, watch};

use crate::pins::{Pins, SLAVE_PREFIX, SNAPSHOT_PREFIX};
use crate::retention::{self, Policy};
use crate::tail::{TAIL_BYTES, Tail};

/// Most requests executed in one group.
const MAX_GROUP_REQUESTS: usize = 2048;
/// A group stops taking requests past this many bytes of binlog.
const MAX_GROUP_BYTES: usize = 8 << 20;
/// Largest total of final keys and values one transaction may log.
const MAX_TXN_WRITE_BYTES: usize = 2 * MAX_TXN_BYTES;
/// Groups of one request in a row after which a write submitted alone may
/// commit inline ([`CommitterHandle::submit`]).
const INLINE_AFTER_SINGLES: u32 = 8;
/// A group that takes longer than this ends the streak of single groups.
const INLINE_MAX_COMMIT: Duration = Duration::from_millis(5);
/// Recent group commit times kept for lag figures.
const COMMIT_TIMES: usize = 65_536;
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
    /// `what`: "write" (final keys and values) or "read" (stored values).
    #[error("txn would {what} {bytes} bytes of keys and values; the limit is {limit}")]
    TxnTooLarge {
        what: &'static str,
        bytes: usize,
        limit: usize,
    },
    #[error("the master is shutting down")]
    ShuttingDown,
    /// The binlog append failed and was undone. `exhausted`: a resource ran out
    /// (disk space, quota, file descriptors).
    #[error("binlog append failed: {cause}; nothing of this write was committed")]
    NotCommitted { cause: String, exhausted: bool },
    /// The fsync covering this write failed: it may or may not survive.
    #[error("binlog fsync failed: {0}; the outcome of this write is unknown")]
    SyncFailed(String),
    /// The write path failed for good earlier; the master is stopping.
    #[error(
        "the write path failed for good ({0}); nothing of this write was committed and the master \
         is stopping"
    )]
    Failed(String),
    /// The write is in the binlog but could not be applied; the master stops.
    #[error("{0}; the outcome of this write is unknown")]
    Unknown(String),
    /// A committed group is not in RocksDB yet: no new write runs until it is.
    #[error(
        "the state is behind the binlog after a RocksDB write failure ({0}); nothing of this \
         write was committed; retrying"
    )]
    StateBehind(String),
    #[error("write path failed: {0}")]
    Internal(String),
}

/// Whether the write path can write; see "When the write path fails".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WritePath {
    Writable,
    /// Writes fail for now; every group retries.
    Failing {
        error: String,
        since: SystemTime,
    },
    /// Failed for good (an fsync failed): the node must stop and exit non-zero.
    Failed {
        error: String,
        since: SystemTime,
    },
}

impl WritePath {
    pub fn is_writable(&self) -> bool {
        matches!(self, WritePath::Writable)
    }

    /// Empty when writable, else the error and since when (for `Info.write_error`).
    pub fn describe(&self) -> String {
        match self {
            WritePath::Writable => String::new(),
            WritePath::Failing { error, since } => format!("{error} (failing {})", ago(*since)),
            WritePath::Failed { error, since } => {
                format!("{error} (failed for good {})", ago(*since))
            }
        }
    }
}

/// "since unix time T (N s ago)".
fn ago(since: SystemTime) -> String {
    let unix = since
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = since.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    format!("since unix time {unix}, {secs} s ago")
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
    /// Groups committed inline ([`CommitterHandle::submit`]).
    pub inline_groups: AtomicU64,
    /// Online consistency checks: digests logged, and the last check point
    /// digested.
    pub verify_checks: AtomicU64,
    pub last_verify: AtomicU64,
    /// Failed binlog appends, binlog fsyncs and RocksDB writes of the write path.
    pub write_errors: AtomicU64,
    /// Whether the write path can write (gRPC health and `Info.writable`).
    pub write_path: watch::Sender<WritePath>,
    /// When each recent group committed: (last index of the group, time), for lag_ms.
    commit_times: Mutex<VecDeque<(u64, Instant)>>,
    /// The most recent shippable groups, for sync sessions (see [`crate::tail`]).
    pub tail: Tail,
}

impl Progress {
    /// Progress of `binlog` applied to `state`: the committer's, or a slave's
    /// relay log that it serves to its own slaves (cascading), which it then
    /// publishes with [`publish_relay`](Self::publish_relay).
    pub fn new(binlog: &Binlog, state: &State) -> Arc<Progress> {
        let (shippable_tx, shippable) = watch::channel(binlog.shippable_index());
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
            verify_checks: AtomicU64::new(0),
            last_verify: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            inline_groups: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            write_path: watch::channel(WritePath::Writable).0,
            commit_times: Mutex::new(VecDeque::with_capacity(COMMIT_TIMES)),
            tail: Tail::new(TAIL_BYTES),
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

    /// Records that the events up to `last_index` arrived now (lag_ms of the
    /// slaves is measured from it).
    pub fn record_commit(&self, last_index: u64) {
        let mut times = self.commit_times.lock().expect("commit times");
        if times.len() == COMMIT_TIMES {
            times.pop_front();
        }
        times.push_back((last_index, Instant::now()));
    }

    fn publish(&self, binlog: &Binlog) {
        self.publish_shippable(binlog, binlog.shippable_index());
    }

    /// A slave's relay log, served to its own slaves: only what it received
    /// (durable under its fsync policy, at a transaction boundary) is shipped.
    pub fn publish_relay(&self, relay: &Binlog) {
        self.publish_shippable(relay, relay.received_index());
    }

    fn publish_shippable(&self, binlog: &Binlog, ship: u64) {
        self.durable
            .store(binlog.durable_index(), Ordering::Release);
        self.last_index
            .store(binlog.last_index(), Ordering::Release);
        self.first_index
            .store(binlog.first_index(), Ordering::Release);
        self.binlog_bytes
            .store(binlog.total_bytes(), Ordering::Release);
        self.shippable_tx.send_if_modified(|v| {
            let changed = *v != ship;
            *v = ship;
            changed
        });
    }
}

/// What the committer's thread and inline writers share (see
/// [`CommitterHandle::submit`]).
struct Shared {
    /// The write path's state; `None` once the thread has stopped it.
    core: Mutex<Option<Committer>>,
    /// Requests queued for the thread (counted before they are sent) and
    /// not yet committed: a write runs inline only when this is 0, so it
    /// never overtakes one queued before it.
    queued: AtomicUsize,
    /// How many groups in a row (on the thread or inline) held one request:
    /// writes run inline only after [`INLINE_AFTER_SINGLES`], so a busy
    /// master, whose groups hold many, keeps them large.
    singles: AtomicU32,
    /// The source of the last write submitted alone, or of the last read:
    /// when another source comes, the streak of single groups starts again.
    last_source: AtomicU64,
}

impl Shared {
    /// Counts a group of `n` requests just committed in `took` (under the
    /// core's lock). A slow one (a disk that stalls) ends the streak: no
    /// write runs inline until groups are quick again.
    fn count_group(&self, n: usize, took: Duration) {
        if n == 1 && took <= INLINE_MAX_COMMIT {
            // Not a plain store: a reset by another writer is not lost.
            let _ = self
                .singles
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                    Some(s.saturating_add(1))
                });
        } else {
            self.singles.store(0, Ordering::Release);
        }
    }
}

/// Handle for submitting writes. Cheap to clone.
#[derive(Clone)]
pub struct CommitterHandle {
    shared: Arc<Shared>,
    tx: mpsc::Sender<WriteRequest>,
}

/// The answer to a submitted write.
pub struct Answer(oneshot::Receiver<Result<WriteOutcome, WriteError>>);

impl Future for Answer {
    type Output = Result<WriteOutcome, WriteError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(WriteError::ShuttingDown)))
    }
}

/// Counts a request as queued until it is sent (then the committer's thread
/// counts it off once committed), or until the send is abandoned.
struct QueuedGuard<'a>(Option<&'a AtomicUsize>);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        if let Some(q) = self.0 {
            q.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl CommitterHandle {
    /// Queues a write (waiting while the queue is full) and returns its
    /// answer to await. Writes queued one after the other by one caller
    /// commit in that order (the queue is FIFO, groups run in order).
    ///
    /// `alone`: the caller, `from`, has nothing else to submit before it
    /// awaits this answer (the only request a stream or connection has).
    /// When the write path is idle the write then commits here, on the
    /// caller's thread, with the same steps and guarantees as on the
    /// committer's thread but without the two thread hand-offs (to the
    /// committer and back, each a wake-up of a parked thread); otherwise it
    /// is queued. Order is kept: a write queued earlier commits first.
    ///
    /// Idle means: the last write that came alone and the last read were
    /// both `from`'s (see [`note_source`](Self::note_source)), the
    /// committer's thread holds no group, nothing is queued, and the last
    /// [`INLINE_AFTER_SINGLES`] groups each held one request and took at
    /// most [`INLINE_MAX_COMMIT`]. So only a master with one active client
    /// commits inline. With several writers, a write that waits in its
    /// socket while another's commits joins a group on the thread instead of
    /// waiting for a commit of its own; other clients' reads are not held up
    /// behind a commit on the runtime thread; and a busy master keeps its
    /// large groups. Meanwhile the caller's runtime thread is busy for one
    /// commit (as Redis's event loop is for its fsync); a commit slower than
    /// [`INLINE_MAX_COMMIT`] (a stalling disk) sends the following writes
    /// back to the thread.
    pub async fn submit(
        &self,
        ops: Vec<WriteOp>,
        alone: Option<WriterId>,
    ) -> Result<Answer, WriteError> {
        let ops = match alone {
            Some(from) => match self.try_inline(ops, from) {
                Ok(answer) => return Ok(answer),
                Err(ops) => ops,
            },
            None => ops,
        };
        let (reply, rx) = oneshot::channel();
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        let mut guard = QueuedGuard(Some(&self.shared.queued));
        self.tx
            .send(WriteRequest { ops, reply })
            .await
            .map_err(|_| WriteError::ShuttingDown)?;
        guard.0 = None;
        Ok(Answer(rx))
    }

    /// A request (a write submitted alone, or a read) from `from`. Whether
    /// the last one came from the same source; if not, more than one client
    /// may be active, and the streak of single groups starts again (so a
    /// lone writer's commits do not hold up other clients' reads on its
    /// runtime thread).
    ///
    /// Every read calls it: it writes the shared atomics only when they
    /// change.
    pub fn note_source(&self, from: WriterId) -> bool {
        let shared = &self.shared;
        let last = match shared.last_source.load(Ordering::Acquire) {
            same if same == from => same,
            _ => shared.last_source.swap(from, Ordering::AcqRel),
        };
        if from != UNKNOWN_WRITER && last == from {
            return true;
        }
        if shared.singles.load(Ordering::Acquire) != 0 {
            shared.singles.store(0, Ordering::Release);
        }
        false
    }

    /// Commits `ops` on this thread if the write path is idle; gives them
    /// back otherwise.
    fn try_inline(&self, ops: Vec<WriteOp>, from: WriterId) -> Result<Answer, Vec<WriteOp>> {
        if !self.note_source(from) {
            return Err(ops);
        }
        if self.shared.singles.load(Ordering::Acquire) < INLINE_AFTER_SINGLES {
            return Err(ops);
        }
        let Ok(mut core) = self.shared.core.try_lock() else {
            return Err(ops);
        };
        // Under the lock: a queued request is counted off only once its
        // group is committed, under this lock too.
        if self.shared.queued.load(Ordering::Acquire) != 0 {
            return Err(ops);
        }
        let Some(committer) = core.as_mut() else {
            return Err(ops);
        };
        let (reply, rx) = oneshot::channel();
        let mut group = vec![WriteRequest { ops, reply }];
        let started = Instant::now();
        committer.commit_group(&mut group);
        self.shared.count_group(1, started.elapsed());
        committer
            .progress
            .inline_groups
            .fetch_add(1, Ordering::Relaxed);
        Ok(Answer(rx))
    }
}

/// Starts the committer thread. It stops when every [`CommitterHandle`] is gone,
/// after making the binlog and the state durable, and then returns the binlog;
/// or an error if the write path failed for good (then nothing more is written).
/// It purges the binlog under `retention`, never past `pins` (but see
/// [`crate::retention`] about the hard cap).
pub fn spawn(
    binlog: Binlog,
    state: State,
    retention: Policy,
    pins: Arc<Pins>,
    verify_interval: Option<Duration>,
    group_sizes: Option<tern_common::metrics::Histogram>,
    runtime: tokio::runtime::Handle,
) -> (
    CommitterHandle,
    Arc<Progress>,
    std::thread::JoinHandle<Result<Binlog, WriteError>>,
) {
    let (tx, rx) = mpsc::channel(4 * MAX_GROUP_REQUESTS);
    let progress = Progress::new(&binlog, &state);
    let committer = Committer {
        next_seq: state.last_seq() + 1,
        binlog,
        state,
        progress: progress.clone(),
        last_flush: Instant::now(),
        retention,
        pins,
        last_retention: Instant::now(),
        failed: None,
        binlog_failed: false,
        behind: None,
        last_attempt: Instant::now(),
        verify: Verify::new(verify_interval),
        group_sizes,
    };
    let shared = Arc::new(Shared {
        core: Mutex::new(Some(committer)),
        queued: AtomicUsize::new(0),
        singles: AtomicU32::new(0),
        last_source: AtomicU64::new(UNKNOWN_WRITER),
    });
    let thread_shared = shared.clone();
    let join = std::thread::Builder::new()
        .name("committer".into())
        .spawn(move || run(&thread_shared, rx, runtime))
        .expect("spawn committer thread");
    (CommitterHandle { shared, tx }, progress, join)
}

/// The committer's thread: commits the queued requests group by group, and
/// does the idle work; at the end stops the write path cleanly.
fn run(
    shared: &Shared,
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
            Err(mpsc::error::TryRecvError::Empty) => {
                let wait = lock_core(shared).as_ref().map(Committer::idle_wait);
                let wait = wait.unwrap_or(Duration::from_secs(1));
                match runtime.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                    Ok(r) => r,
                    Err(_) => {
                        if let Some(c) = lock_core(shared).as_mut() {
                            c.idle();
                        }
                        continue;
                    }
                }
            }
        };
        let Some(first) = first else { break };
        // The lock first: what arrived while an inline write held it joins
        // this group.
        let mut core = lock_core(shared);
        group.push(first);
        while group.len() < MAX_GROUP_REQUESTS {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let n = group.len();
        let Some(c) = core.as_mut() else { break };
        let started = Instant::now();
        c.commit_group(&mut group);
        shared.queued.fetch_sub(n, Ordering::AcqRel);
        shared.count_group(n, started.elapsed());
        if c.failed.is_none() {
            c.retain_if_due();
            c.verify_if_due();
        }
    }
    let committer = lock_core(shared).take();
    match committer {
        Some(c) => c.finish(),
        None => Err(WriteError::Internal(
            "the committer was already stopped".into(),
        )),
    }
}

/// The committer's state, locked. A write that panicked while holding it
/// may have left it between the binlog and RocksDB: the write path then
/// fails for good, and start-up recovery reads what is on disk.
fn lock_core(shared: &Shared) -> MutexGuard<'_, Option<Committer>> {
    match shared.core.lock() {
        Ok(core) => core,
        Err(poisoned) => {
            let mut core = poisoned.into_inner();
            if let Some(c) = core.as_mut()
                && c.failed.is_none()
            {
                c.stop_for_good("a write panicked in the committer".into());
            }
            core
        }
    }
}

struct Committer {
    binlog: Binlog,
    state: State,
    next_seq: u64,
    progress: Arc<Progress>,
    last_flush: Instant,
    retention: Policy,
    pins: Arc<Pins>,
    last_retention: Instant,
    /// Set when the write path failed for good.
    failed: Option<String>,
    /// The binlog writer itself failed (an fsync): nothing more goes to it.
    binlog_failed: bool,
    /// Set while a committed group is not in RocksDB.
    behind: Option<Behind>,
    /// Last probe or catch-up attempt while failing.
    last_attempt: Instant,
    /// Online consistency checks (`sync.verify_interval_secs`).
    verify: Verify,
    /// Transactions per group (`tern_group_commit_transactions`).
    group_sizes: Option<tern_common::metrics::Histogram>,
}

/// The master's side of the online consistency checks: every `interval`
/// (when something was written since the last one) it logs a check point as
/// a transaction of its own, the last of its group; right after that group
/// is in RocksDB a thread takes a snapshot (writes wait for it, a moment) and
/// digests it as `Admin.Checksum` does; the digest is then logged as another
/// transaction, which each slave compares with its own digest at the point.
struct Verify {
    interval: Option<Duration>,
    last: Instant,
    /// A digest is being computed.
    running: bool,
    /// The binlog's last index after the last digest was logged: no new
    /// check point until something is written after it.
    quiet_at: u64,
    done_tx: std::sync::mpsc::Sender<(u64, Result<KeyspaceChecksum, String>)>,
    done_rx: std::sync::mpsc::Receiver<(u64, Result<KeyspaceChecksum, String>)>,
}

impl Verify {
    fn new(interval: Option<Duration>) -> Verify {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        Verify {
            interval,
            last: Instant::now(),
            running: false,
            quiet_at: 0,
            done_tx,
            done_rx,
        }
    }
}

/// A committed group whose RocksDB write failed: its answers wait for the
/// state to catch up with the binlog.
struct Behind {
    error: String,
    since: Instant,
    answers: Vec<(Reply, Result<WriteOutcome, WriteError>)>,
}

type Reply = oneshot::Sender<Result<WriteOutcome, WriteError>>;

/// How long the committer retries bringing RocksDB up to the binlog after a
/// failed RocksDB write before it fails the write path for good.
pub const STATE_RETRY_FOR: Duration = Duration::from_secs(5);

/// Bytes the idle probe writes while appends fail.
const PROBE_BYTES: usize = 64 << 10;
/// Name of the probe's scratch file in the binlog directory (not a segment).
const PROBE_FILE: &str = ".write-probe";

/// Writes of the group not yet in RocksDB: `None` is a delete.
type Overlay = HashMap<Bytes, Option<Bytes>>;

/// One transaction executed: its after-images (each key once, `None` a
/// delete) and each op's outcome.
type Executed = Result<(Vec<(Bytes, Option<Bytes>)>, Vec<OpOutcome>), WriteError>;

impl Committer {
    /// Makes the binlog and the state durable at the stop, and gives back
    /// the binlog; an error if the write path failed for good.
    fn finish(mut self) -> Result<Binlog, WriteError> {
        if let Some(why) = self.failed.take() {
            // After a RocksDB failure the binlog is fine: make what it
            // committed durable for the replay at the next start.
            if !self.binlog_failed
                && let Err(e) = self.binlog.sync()
            {
                tracing::error!(error = %e, "binlog fsync at the stop failed");
            }
            return Err(WriteError::Internal(format!(
                "{why}; stopped so that start-up recovery reads what is on disk"
            )));
        }
        if self.behind.is_some() && !self.catch_up() {
            tracing::warn!("stopping with the state behind the binlog; the next start replays it");
            if let Some(behind) = self.behind.take() {
                let e = WriteError::Unknown(format!(
                    "the master stopped before RocksDB took this committed write ({}); the next \
                     start applies it from the binlog",
                    behind.error
                ));
                fail_committed(behind.answers, &e);
            }
        }
        self.binlog
            .sync_before_state_flush()
            .map_err(|e| WriteError::Internal(format!("binlog fsync: {e}")))?;
        self.progress.publish(&self.binlog);
        // The binlog is durable and ends at a boundary: the stop is clean even if
        // RocksDB cannot flush (a full disk): the next start replays the rest.
        if let Err(e) = self.state.flush() {
            tracing::error!(
                error = %e,
                applied = self.state.applied_index(),
                "rocksdb flush failed at the stop; the next start replays the binlog after the \
                 last flushed state"
            );
        }
        Ok(self.binlog)
    }

    /// How long an idle committer waits for a request before [`idle`](Self::idle).
    fn idle_wait(&self) -> Duration {
        let tick = self
            .binlog
            .durability()
            .tick_interval()
            .unwrap_or(Duration::from_secs(1));
        tick.min(Duration::from_secs(1))
    }

    /// Work with no request waiting: the fsync policy's timer, retrying a
    /// failing write path, retention.
    fn idle(&mut self) {
        if self.failed.is_some() {
            return;
        }
        match self.binlog.tick() {
            Ok(true) => self.progress.publish(&self.binlog),
            Ok(false) => {}
            Err(e) => {
                self.fail_for_good(&e);
                return;
            }
        }
        if self.last_attempt.elapsed() >= Duration::from_secs(1) {
            if self.behind.is_some() {
                self.catch_up();
            } else if !self.progress.write_path.borrow().is_writable() {
                self.probe();
            }
        }
        self.retain_if_due();
        self.verify_if_due();
    }

    /// Logs a computed digest, and a new check point when one is due.
    fn verify_if_due(&mut self) {
        if self.failed.is_some() || self.behind.is_some() {
            return;
        }
        while let Ok((point, result)) = self.verify.done_rx.try_recv() {
            self.verify.running = false;
            match result {
                Ok(c) if c.index == point => match hex::decode(&c.digest) {
                    Ok(digest) => {
                        self.commit_internal(WriteOp::Verify(Some((
                            point,
                            Bytes::from(digest),
                            c.keys,
                        ))));
                        self.verify.quiet_at = self.binlog.last_index();
                        self.progress.verify_checks.fetch_add(1, Ordering::Relaxed);
                        self.progress.last_verify.store(point, Ordering::Release);
                        tracing::info!(point, keys = c.keys, digest = %c.digest, "consistency check: digest logged");
                    }
                    Err(e) => tracing::error!(point, error = %e, "consistency check: bad digest"),
                },
                Ok(c) => tracing::error!(
                    point,
                    snapshot = c.index,
                    "consistency check: the snapshot is not at the check point; skipped"
                ),
                Err(e) => tracing::error!(point, error = %e, "consistency check: digest failed"),
            }
        }
        let Some(every) = self.verify.interval else {
            return;
        };
        if self.verify.running
            || self.verify.last.elapsed() < every
            || self.binlog.last_index() <= self.verify.quiet_at
        {
            return;
        }
        self.verify.last = Instant::now();
        self.commit_internal(WriteOp::Verify(None));
    }

    /// Commits a transaction of the committer's own (nobody awaits it).
    fn commit_internal(&mut self, op: WriteOp) {
        let (reply, _) = oneshot::channel();
        let mut group = vec![WriteRequest {
            ops: vec![op],
            reply,
        }];
        self.commit_group(&mut group);
    }

    /// Digests the state at check point `point` (just applied) on a thread
    /// of its own; returns once its snapshot is taken, so no later write is
    /// in it.
    fn start_digest(&mut self, point: u64) {
        let done = self.verify.done_tx.clone();
        let spawned = self.state.digest_in_background(move |r| {
            let _ = done.send((point, r.map_err(|e| e.to_string())));
        });
        match spawned {
            Ok(()) => self.verify.running = true,
            Err(e) => tracing::error!(point, error = %e, "consistency check: no digest thread"),
        }
    }

    /// Records a failure of the write path (it retries).
    fn failing(&self, error: String) {
        self.progress.write_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%error, "write path failing");
        self.progress.write_path.send_modify(|w| {
            let since = match w {
                WritePath::Failing { since, .. } => *since,
                _ => SystemTime::now(),
            };
            *w = WritePath::Failing { error, since };
        });
    }

    fn writable(&self) {
        self.progress.write_path.send_if_modified(|w| {
            if w.is_writable() {
                return false;
            }
            tracing::info!("write path writable again");
            *w = WritePath::Writable;
            true
        });
    }

    /// The binlog writer failed for good: see the module docs.
    fn fail_for_good(&mut self, e: &BinlogError) {
        self.progress.write_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            error = %e,
            "binlog fsync failed (or a failed write could not be undone): nothing more will be \
             written or acknowledged; stopping so that start-up recovery reads what is on disk"
        );
        self.binlog_failed = true;
        self.stop_for_good(e.to_string());
    }

    /// Nothing more is written or acknowledged; the node stops and exits
    /// non-zero. Held answers (state behind) get [`WriteError::Unknown`]: their
    /// writes are in the binlog, which recovery reads.
    fn stop_for_good(&mut self, error: String) {
        if let Some(behind) = self.behind.take() {
            fail_committed(behind.answers, &WriteError::Unknown(error.clone()));
        }
        self.failed = Some(error.clone());
        self.progress.write_path.send_replace(WritePath::Failed {
            error,
            since: SystemTime::now(),
        });
    }

    /// While appends fail and nothing else tests the disk: writes (and removes)
    /// a scratch file next to the binlog; if that works, health comes back and
    /// the next group tries for real.
    fn probe(&mut self) {
        self.last_attempt = Instant::now();
        let path = self.binlog.dir().join(PROBE_FILE);
        let res = std::fs::write(&path, vec![0u8; PROBE_BYTES]);
        let _ = std::fs::remove_file(&path);
        match res {
            Ok(()) => self.writable(),
            Err(e) => tracing::debug!(error = %e, "write probe failed"),
        }
    }

    /// Brings the state up to the binlog after a failed RocksDB write, by
    /// replaying the binlog after its applied index; answers the held clients
    /// when it works. Returns whether the state is caught up.
    fn catch_up(&mut self) -> bool {
        let Some(behind) = self.behind.take() else {
            return true;
        };
        self.last_attempt = Instant::now();
        match tern_common::replay::replay(&self.binlog, &self.state) {
            Ok(events) => {
                tracing::info!(
                    events,
                    applied = self.state.applied_index(),
                    "state caught up with the binlog after a RocksDB write failure"
                );
                self.progress
                    .applied
                    .send_replace(self.state.applied_index());
                for (reply, answer) in behind.answers {
                    let _ = reply.send(answer);
                }
                self.writable();
                true
            }
            Err(e) => {
                let error = format!(
                    "rocksdb write failed ({}); replaying the binlog into it failed: {e}",
                    behind.error
                );
                self.failing(error.clone());
                let given_up = behind.since.elapsed() >= STATE_RETRY_FOR;
                self.behind = Some(behind);
                if given_up {
                    tracing::error!(
                        %error,
                        retried_for = ?STATE_RETRY_FOR,
                        "RocksDB stays behind the binlog: stopping so that start-up recovery \
                         replays the binlog into a freshly opened RocksDB"
                    );
                    self.stop_for_good(format!(
                        "{error} (for {} s; RocksDB keeps some errors until it is reopened)",
                        STATE_RETRY_FOR.as_secs()
                    ));
                }
                false
            }
        }
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
        if let Err(e) = self.binlog.sync_before_state_flush() {
            self.fail_for_good(&e);
            return Err(format!("binlog fsync before a rocksdb flush: {e}"));
        }
        self.progress.publish(&self.binlog);
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
        self.progress.publish(&self.binlog);
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

    /// Executes, logs, applies and answers one group (every request in it gets
    /// an answer, now or, if the state fell behind, once it caught up).
    fn commit_group(&mut self, group: &mut Vec<WriteRequest>) {
        if let Some(why) = &self.failed {
            let e = WriteError::Failed(why.clone());
            for r in group.drain(..) {
                let _ = r.reply.send(Err(e.clone()));
            }
            return;
        }
        if self.behind.is_some() && !self.catch_up() {
            let e = match (&self.failed, &self.behind) {
                (Some(why), _) => WriteError::Failed(why.clone()),
                (None, b) => {
                    WriteError::StateBehind(b.as_ref().map(|b| b.error.clone()).unwrap_or_default())
                }
            };
            for r in group.drain(..) {
                let _ = r.reply.send(Err(e.clone()));
            }
            return;
        }
        let commit_ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let first_index = self.binlog.next_index();
        let mut next_index = first_index;
        let mut records = Vec::with_capacity(64 * 1024);
        let mut batch = GroupBatch::default();
        // Built from `batch` the first time a transaction reads (most groups
        // only write), then kept up to date.
        let mut overlay: Option<Overlay> = None;
        let mut answers: Vec<Result<WriteOutcome, WriteError>> = Vec::with_capacity(group.len());
        let mut seq = self.next_seq;
        let mut taken = 0;
        // A check point of the consistency checks in this group (its last
        // transaction).
        let mut point = None;
        for req in group.iter_mut() {
            if records.len() >= MAX_GROUP_BYTES {
                break;
            }
            taken += 1;
            if let [WriteOp::Verify(v)] = req.ops.as_slice() {
                push_txn(
                    &mut records,
                    &mut next_index,
                    seq,
                    commit_ts,
                    match v {
                        None => EventKind::VerifyPoint,
                        Some((point, digest, keys)) => EventKind::VerifyDigest {
                            point: *point,
                            digest: digest.clone(),
                            keys: *keys,
                        },
                    },
                );
                seq += 1;
                answers.push(Ok(WriteOutcome {
                    index: next_index - 1,
                    results: Vec::new(),
                    replicas: Default::default(),
                }));
                if v.is_none() {
                    // A check point ends its group: the state is digested
                    // right after this group, before any later write.
                    point = Some(next_index - 1);
                    break;
                }
                continue;
            }
            if overlay.is_none() && req.ops.iter().any(WriteOp::reads) {
                overlay = Some(batch.mutations().collect());
            }
            // Moved out: the keys and values go on to the log and the state
            // without another reference to the request's buffer.
            let ops = std::mem::take(&mut req.ops);
            let (writes, results) = match self.execute(ops, overlay.as_ref()) {
                Ok(x) => x,
                Err(e) => {
                    answers.push(Err(e));
                    continue;
                }
            };
            let mut push = |kind| {
                let ev = Event {
                    index: next_index,
                    kind,
                };
                encode_record(&ev, &mut records);
                next_index += 1;
                ev
            };
            if writes.is_empty() {
                // Nothing to log (reads, or conditional puts that did not
                // apply): answered at the index committed before it.
                answers.push(Ok(WriteOutcome {
                    index: next_index - 1,
                    results,
                    replicas: Default::default(),
                }));
                continue;
            }
            push(EventKind::Begin { seq, commit_ts });
            if let Some(overlay) = overlay.as_mut() {
                overlay.extend(writes.iter().cloned());
            }
            for (key, value) in writes {
                let kind = match value {
                    Some(value) => EventKind::Put { key, value },
                    None => EventKind::Delete { key },
                };
                // Logged, then moved into the state's batch.
                add_to_batch(&mut batch, push(kind));
            }
            push(EventKind::Commit { seq });
            seq += 1;
            answers.push(Ok(WriteOutcome {
                index: next_index - 1,
                results,
                // Filled in by the master's writer if the write waits for slaves.
                replicas: Default::default(),
            }));
        }
        let rest: Vec<WriteRequest> = group.drain(taken..).collect();
        let replies: Vec<(Reply, Result<WriteOutcome, WriteError>)> =
            group.drain(..).map(|r| r.reply).zip(answers).collect();
        if next_index > first_index {
            let last_index = next_index - 1;
            if let Err(e) = self.binlog.append(&records, first_index, last_index, true) {
                let err = if e.is_fatal() {
                    self.fail_for_good(&e);
                    WriteError::SyncFailed(io_cause(&e))
                } else {
                    // Undone: none of these seqs exist.
                    let err = WriteError::NotCommitted {
                        cause: io_cause(&e),
                        exhausted: e.is_out_of_resources(),
                    };
                    self.failing(err.to_string());
                    err
                };
                fail_committed(replies, &err);
                return self.commit_rest(group, rest);
            }
            if let Err(e) = self.binlog.sync_if_due() {
                self.fail_for_good(&e);
                fail_committed(replies, &WriteError::SyncFailed(io_cause(&e)));
                return self.commit_rest(group, rest);
            }
            // Shippable now (durable under the policy): into the in-memory
            // tail before the index is published, so sessions find it there.
            debug_assert_eq!(self.binlog.shippable_index(), last_index);
            self.progress.tail.push(first_index, last_index, records);
            self.progress.publish(&self.binlog);
            let txns = seq - self.next_seq;
            self.next_seq = seq;
            self.progress.last_seq.store(seq - 1, Ordering::Release);
            self.progress
                .transactions
                .fetch_add(txns, Ordering::Relaxed);
            self.progress.groups.fetch_add(1, Ordering::Relaxed);
            if let Some(h) = &self.group_sizes {
                h.observe(txns as f64);
            }
            self.progress.record_commit(last_index);
            if let Err(e) = self.state.apply(batch, last_index, seq - 1) {
                // Committed in the binlog, not in the state: hold the answers
                // until the state catches up (see the module docs).
                let error = format!("rocksdb write: {e}");
                self.failing(format!(
                    "rocksdb write of committed group {first_index}..={last_index} failed: {e}"
                ));
                self.last_attempt = Instant::now();
                self.behind = Some(Behind {
                    error,
                    since: Instant::now(),
                    answers: replies,
                });
                return self.commit_rest(group, rest);
            }
            self.writable();
            if self.last_flush.elapsed() >= FLUSH_INTERVAL {
                self.last_flush = Instant::now();
                self.request_flush();
            }
            self.progress.applied.send_replace(last_index);
            if let Some(p) = point {
                debug_assert_eq!(p, last_index);
                self.start_digest(p);
            }
        }
        for (reply, answer) in replies {
            let _ = reply.send(answer);
        }
        self.commit_rest(group, rest)
    }

    /// Requests beyond the byte cap go first in the next group.
    fn commit_rest(&mut self, group: &mut Vec<WriteRequest>, rest: Vec<WriteRequest>) {
        if !rest.is_empty() {
            group.extend(rest);
            self.commit_group(group);
        }
    }

    /// Starts a background RocksDB flush, after making the binlog durable up to
    /// what the state holds.
    fn request_flush(&mut self) {
        if let Err(e) = self.binlog.sync_before_state_flush() {
            self.fail_for_good(&e);
            return;
        }
        self.progress.publish(&self.binlog);
        if let Err(e) = self.state.request_flush() {
            tracing::warn!(error = %e, "background flush request failed");
        }
    }

    /// Runs one transaction: returns its writes (after-images, in order) and the
    /// result of each op, or the first error (then nothing of it is kept).
    ///
    /// Its cost is bounded while it runs: each key's value is read from the
    /// group or RocksDB at most once (reads count against
    /// [`MAX_TXN_READ_BYTES`]), Appends to one key extend one buffer (a value
    /// is copied at most once per Put or first read, never once per Append),
    /// and the size of the final after-images is kept as ops run, so a Txn
    /// over [`MAX_TXN_WRITE_BYTES`] stops at the op that crosses it.
    fn execute(&self, ops: Vec<WriteOp>, group: Option<&Overlay>) -> Executed {
        // Puts and Deletes read nothing: their after-images are the ops.
        if ops.len() <= BLIND_TXN_OPS && !ops.iter().any(WriteOp::reads) {
            return blind_writes(ops);
        }
        let mut txn = TxnValues::default();
        let mut results = Vec::with_capacity(ops.len());
        let read = |key: &Bytes| -> Result<Option<Bytes>, WriteError> {
            if let Some(v) = group.and_then(|g| g.get(key)) {
                return Ok(v.clone());
            }
            self.state
                .get(key)
                .map(|v| v.map(Bytes::from))
                .map_err(|e| WriteError::Internal(format!("rocksdb read: {e}")))
        };
        for op in &ops {
            let outcome = match op {
                WriteOp::Put { key, value } => {
                    txn.set(key, Pending::Shared(value.clone()))?;
                    OpOutcome::Put
                }
                WriteOp::Delete { key } => {
                    txn.set(key, Pending::Deleted)?;
                    OpOutcome::Delete
                }
                WriteOp::IncrBy { key, delta } => {
                    let current = match txn.current(key, read)?.bytes() {
                        None => 0,
                        Some(v) => parse_i64(v).ok_or_else(|| WriteError::NotAnInteger {
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
                    txn.set(key, Pending::Shared(Bytes::from(next.to_string())))?;
                    OpOutcome::IncrBy(next)
                }
                WriteOp::Append { key, value } => {
                    let len = txn.current(key, read)?.len() + value.len();
                    if len > MAX_VALUE_BYTES {
                        return Err(WriteError::ValueTooLarge {
                            key: String::from_utf8_lossy(key).into_owned(),
                            len,
                        });
                    }
                    txn.append(key, value)?;
                    OpOutcome::Append(len as u64)
                }
                WriteOp::PutIf { key, value, exists } => {
                    let present = txn.current(key, read)?.bytes().is_some();
                    if present == *exists {
                        txn.set(key, Pending::Shared(value.clone()))?;
                    }
                    OpOutcome::PutIf(present == *exists)
                }
                WriteOp::Verify(_) => {
                    return Err(WriteError::Internal(
                        "a consistency check op inside a transaction".into(),
                    ));
                }
                WriteOp::Get { key } => {
                    let v = txn.current(key, read)?.bytes().map(Bytes::copy_from_slice);
                    OpOutcome::Value(v)
                }
            };
            results.push(outcome);
        }
        Ok((txn.into_writes(), results))
    }
}

/// Transactions of Puts and Deletes up to this many ops take
/// [`blind_writes`] (its key search is linear).
const BLIND_TXN_OPS: usize = 32;

/// A transaction of Puts and Deletes only (it reads nothing): each key's last
/// op, in the order keys were first written, as [`TxnValues`] gives them and
/// under its running size limit (so it fails at the same op), without a
/// key or value cloned or hashed.
fn blind_writes(ops: Vec<WriteOp>) -> Executed {
    let mut writes: Vec<(Bytes, Option<Bytes>)> = Vec::with_capacity(ops.len());
    let mut results = Vec::with_capacity(ops.len());
    let mut bytes = 0usize;
    for op in ops {
        let (key, value, outcome) = match op {
            WriteOp::Put { key, value } => (key, Some(value), OpOutcome::Put),
            WriteOp::Delete { key } => (key, None, OpOutcome::Delete),
            _ => {
                return Err(WriteError::Internal(
                    "a read in a transaction of blind writes".into(),
                ));
            }
        };
        let new = value.as_ref().map_or(0, Bytes::len);
        match writes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, old)) => {
                charge(&mut bytes, new, old.as_ref().map_or(0, Bytes::len))?;
                *old = value;
            }
            None => {
                charge(&mut bytes, key.len() + new, 0)?;
                writes.push((key, value));
            }
        }
        results.push(outcome);
    }
    Ok((writes, results))
}

/// A transaction's final after-images (`bytes` of them) grow by `added` and
/// shrink by `removed` bytes, within [`within_write_limit`].
fn charge(bytes: &mut usize, added: usize, removed: usize) -> Result<(), WriteError> {
    *bytes = bytes.saturating_sub(removed) + added;
    within_write_limit(*bytes)
}

/// A transaction's final after-images may hold at most
/// [`MAX_TXN_WRITE_BYTES`] of keys and values.
fn within_write_limit(bytes: usize) -> Result<(), WriteError> {
    if bytes > MAX_TXN_WRITE_BYTES {
        return Err(WriteError::TxnTooLarge {
            what: "write",
            bytes,
            limit: MAX_TXN_WRITE_BYTES,
        });
    }
    Ok(())
}

/// Largest total of stored values one transaction may read (IncrBy and
/// Append read a key's value the first time they touch it).
const MAX_TXN_READ_BYTES: usize = MAX_TXN_WRITE_BYTES;

/// A key's value while a transaction runs.
enum Pending {
    Deleted,
    /// A value as read or as sent (not copied).
    Shared(Bytes),
    /// A value Appends extend in place.
    Owned(Vec<u8>),
}

impl Pending {
    fn bytes(&self) -> Option<&[u8]> {
        match self {
            Pending::Deleted => None,
            Pending::Shared(b) => Some(b),
            Pending::Owned(v) => Some(v),
        }
    }

    fn len(&self) -> usize {
        self.bytes().map_or(0, <[u8]>::len)
    }
}

/// The values one transaction has touched, in the order first touched, with
/// the running cost of its reads and of its final after-images.
#[derive(Default)]
struct TxnValues {
    values: HashMap<Bytes, Pending>,
    /// Keys in the order first touched (read or written).
    order: Vec<Bytes>,
    /// Keys written (set or appended to): only these are logged.
    written: std::collections::HashSet<Bytes>,
    /// Keys plus final values of every touched key.
    write_bytes: usize,
    /// Stored values read into the transaction.
    read_bytes: usize,
}

impl TxnValues {
    /// The key's value in the transaction, read (once) from `read` when the
    /// transaction has not touched it yet.
    fn current(
        &mut self,
        key: &Bytes,
        read: impl FnOnce(&Bytes) -> Result<Option<Bytes>, WriteError>,
    ) -> Result<&Pending, WriteError> {
        if !self.values.contains_key(key) {
            let value = match read(key)? {
                Some(v) => {
                    self.read_bytes += v.len();
                    if self.read_bytes > MAX_TXN_READ_BYTES {
                        return Err(WriteError::TxnTooLarge {
                            what: "read",
                            bytes: self.read_bytes,
                            limit: MAX_TXN_READ_BYTES,
                        });
                    }
                    Pending::Shared(v)
                }
                None => Pending::Deleted,
            };
            self.insert(key, value)?;
        }
        Ok(&self.values[key])
    }

    fn set(&mut self, key: &Bytes, value: Pending) -> Result<(), WriteError> {
        self.written.insert(key.clone());
        self.insert(key, value).map(drop)
    }

    /// Appends `tail` to the key's value (which [`TxnValues::current`] loaded).
    fn append(&mut self, key: &Bytes, tail: &[u8]) -> Result<(), WriteError> {
        let Some(slot) = self.values.get_mut(key) else {
            return Err(WriteError::Internal(
                "append to a key the transaction has not read".into(),
            ));
        };
        self.written.insert(key.clone());
        match slot {
            Pending::Owned(v) => v.extend_from_slice(tail),
            other => {
                let mut v = Vec::with_capacity(other.len() + tail.len());
                v.extend_from_slice(other.bytes().unwrap_or_default());
                v.extend_from_slice(tail);
                *other = Pending::Owned(v);
            }
        }
        self.charge(tail.len(), 0)
    }

    /// Sets the key's value; the first time a key is touched it is also
    /// added to the log order.
    fn insert(&mut self, key: &Bytes, value: Pending) -> Result<(), WriteError> {
        let new = value.len();
        match self.values.insert(key.clone(), value) {
            Some(old) => self.charge(new, old.len()),
            None => {
                self.order.push(key.clone());
                self.charge(key.len() + new, 0)
            }
        }
    }

    fn charge(&mut self, added: usize, removed: usize) -> Result<(), WriteError> {
        charge(&mut self.write_bytes, added, removed)
    }

    /// The after-images of the keys written, each once with its final
    /// value, in the order first touched (keys only read are not logged).
    fn into_writes(mut self) -> Vec<(Bytes, Option<Bytes>)> {
        let written = std::mem::take(&mut self.written);
        self.order
            .into_iter()
            .filter(|k| written.contains(k))
            .map(|k| {
                let v = match self.values.remove(&k) {
                    Some(Pending::Shared(b)) => Some(b),
                    Some(Pending::Owned(v)) => Some(Bytes::from(v)),
                    Some(Pending::Deleted) | None => None,
                };
                (k, v)
            })
            .collect()
    }
}

/// Appends the records of a transaction holding only `kind` (a consistency
/// check event) at `next_index`, which it advances.
fn push_txn(
    records: &mut Vec<u8>,
    next_index: &mut u64,
    seq: u64,
    commit_ts: u64,
    kind: EventKind,
) {
    for kind in [
        EventKind::Begin { seq, commit_ts },
        kind,
        EventKind::Commit { seq },
    ] {
        encode_record(
            &Event {
                index: *next_index,
                kind,
            },
            records,
        );
        *next_index += 1;
    }
}

/// Answers a group whose append or fsync failed: every transaction that was in
/// it gets `err`; those that failed on their own keep their own error.
fn fail_committed(replies: Vec<(Reply, Result<WriteOutcome, WriteError>)>, err: &WriteError) {
    for (reply, answer) in replies {
        let _ = reply.send(answer.and(Err(err.clone())));
    }
}

/// The OS error of a binlog I/O error as the OS says it ("No space left on
/// device (os error 28)"), else the whole error.
fn io_cause(e: &BinlogError) -> String {
    match e {
        BinlogError::Io(io) | BinlogError::Fsync(io) => io.to_string(),
        other => other.to_string(),
    }
}

fn parse_i64(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    /// What [`TxnValues`] (the path for transactions that read) makes of
    /// Puts and Deletes.
    fn through_txn_values(ops: &[WriteOp]) -> Executed {
        let mut txn = TxnValues::default();
        let mut results = Vec::new();
        for op in ops {
            match op {
                WriteOp::Put { key, value } => {
                    txn.set(key, Pending::Shared(value.clone()))?;
                    results.push(OpOutcome::Put);
                }
                WriteOp::Delete { key } => {
                    txn.set(key, Pending::Deleted)?;
                    results.push(OpOutcome::Delete);
                }
                _ => unreachable!("only Puts and Deletes are generated"),
            }
        }
        Ok((txn.into_writes(), results))
    }

    proptest::proptest! {
        /// Blind writes give the same after-images, in the same order, and
        /// fail at the same size limit, as the general path.
        #[test]
        fn blind_writes_match_the_general_path(
            picks in proptest::collection::vec((0u8..4, 0u8..4), 0..BLIND_TXN_OPS)
        ) {
            // A third of the limit: three such values on distinct keys cross it.
            static BIG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
            let big = BIG.get_or_init(|| Bytes::from(vec![b'v'; MAX_TXN_WRITE_BYTES / 3 + 1]));
            let ops: Vec<WriteOp> = picks
                .iter()
                .map(|&(k, kind)| {
                    let key = Bytes::from(vec![b'k', k]);
                    match kind {
                        0 => WriteOp::Delete { key },
                        1 => WriteOp::Put { key, value: big.clone() },
                        _ => WriteOp::Put { key, value: Bytes::from(vec![kind; kind as usize]) },
                    }
                })
                .collect();
            let general = through_txn_values(&ops).map_err(|e| e.to_string());
            let blind = blind_writes(ops).map_err(|e| e.to_string());
            proptest::prop_assert!(blind == general, "{:?} != {:?}", blind.is_ok(), general.is_ok());
        }
    }

    #[test]
    fn appends_share_one_buffer_and_each_key_is_logged_once() {
        let mut t = TxnValues::default();
        let stored = Bytes::from(vec![b'v'; 1000]);
        let mut reads = 0;
        for _ in 0..3 {
            t.current(&b("k"), |_| {
                reads += 1;
                Ok(Some(stored.clone()))
            })
            .unwrap();
            t.append(&b("k"), b"x").unwrap();
        }
        // Read once, copied once into the buffer Appends extend.
        assert_eq!(reads, 1);
        assert!(matches!(t.values[&b("k")], Pending::Owned(ref v) if v.len() == 1003));
        t.set(&b("d"), Pending::Shared(b("1"))).unwrap();
        t.set(&b("d"), Pending::Deleted).unwrap();
        assert_eq!(t.read_bytes, 1000);
        assert_eq!(t.write_bytes, 1 + 1003 + 1);
        let mut want = vec![b'v'; 1000];
        want.extend_from_slice(b"xxx");
        assert_eq!(
            t.into_writes(),
            vec![(b("k"), Some(Bytes::from(want))), (b("d"), None)]
        );
    }

    #[test]
    fn keys_only_read_are_not_logged() {
        let mut t = TxnValues::default();
        t.current(&b("read"), |_| Ok(Some(b("1")))).unwrap();
        t.current(&b("absent"), |_| Ok(None)).unwrap();
        t.current(&b("w"), |_| Ok(None)).unwrap();
        t.set(&b("w"), Pending::Shared(b("2"))).unwrap();
        assert_eq!(t.into_writes(), vec![(b("w"), Some(b("2")))]);
    }

    #[test]
    fn budgets_stop_the_op_that_crosses_them() {
        let mut t = TxnValues::default();
        let half = Bytes::from(vec![0; MAX_TXN_WRITE_BYTES / 2]);
        t.set(&b("a"), Pending::Shared(half.clone())).unwrap();
        assert_eq!(
            t.set(&b("b"), Pending::Shared(half.clone())),
            Err(WriteError::TxnTooLarge {
                what: "write",
                bytes: MAX_TXN_WRITE_BYTES + 2,
                limit: MAX_TXN_WRITE_BYTES,
            })
        );
        // A read is charged even when the key is deleted afterwards.
        let mut t = TxnValues::default();
        let third = Bytes::from(vec![0; MAX_TXN_READ_BYTES / 3 + 1]);
        for (i, k) in ["x", "y"].iter().enumerate() {
            t.current(&b(k), |_| Ok(Some(third.clone()))).unwrap();
            t.set(&b(k), Pending::Deleted).unwrap();
            assert_eq!(t.read_bytes, (i + 1) * third.len());
        }
        assert_eq!(
            t.current(&b("z"), |_| Ok(Some(third.clone()))).err(),
            Some(WriteError::TxnTooLarge {
                what: "read",
                bytes: 3 * third.len(),
                limit: MAX_TXN_READ_BYTES,
            })
        );
    }
}
