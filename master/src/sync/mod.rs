//! The master's side of replication: one **sync session** per `Sync` stream.
//!
//! ```text
//! slave: TrySync(repl_id, index) ─▶ validate ─▶ TrySyncResponse(Ok, session_id)
//! slave: BinlogAck(first_send, index) ─▶ must equal the validated index
//! master: BinlogBatch … while the window has room and the binlog has shippable events
//! slave: BinlogAck(batch) ─▶ must match the window head; slides the window
//! both: Heartbeat every sync.heartbeat_ms; no message for sync.link_timeout_ms ends it
//! ```
//!
//! A session ships the committer's recent groups from memory
//! ([`crate::tail`]: the bytes it appended), and reads older events from the
//! segment files with its own reader; never past the index the
//! committer published as shippable (durable under the fsync policy), so a slave
//! can never be ahead of a master that lost power. A message carrying another
//! session's id is ignored and counted (`stale_messages`); it never touches the
//! window. A slow or dead slave only fills its own window: the committer never
//! waits for a session.
//!
//! While a session is connected it **pins** the binlog at its slave's received
//! index (owner `slave:<id>`, see [`crate::pins`]); the pin moves with the acks
//! and goes when the session ends: a disconnected slave is not protected.
//!
//! A slave that cannot continue (new and empty, another history, purged, not a
//! boundary) is told `NeedFullSync` and calls **`DbSync`** ([`db_sync`]).
//!
//! - [`handshake`]: TrySync validation and the first-send ack.
//! - [`stream`]: the sender (batches under the window, heartbeats) and the
//!   reply reader (acks, heartbeats, link timeout) under one `select!`.
//! - [`db_sync`]: full-sync snapshot streams.
//! - [`registry`]: the per-slave rows `Admin.Info` shows.

mod db_sync;
mod handshake;
mod registry;
mod stream;

pub use db_sync::DB_SYNC_CHUNK_BYTES;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tern_common::binlog::BinlogReader;
use tern_common::config::SyncConfig;
use tern_common::history::Histories;
use tern_common::position::ReplId;
use tern_common::proto::admin::v1 as admin;
use tern_common::proto::replication::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::committer::Progress;
use crate::pins::Pins;
use crate::snapshot::SnapshotManager;
use registry::SlaveRegistry;

/// State shared by every session of this master.
pub struct SyncShared {
    /// The current history and its ancestors (I8): TrySync positions are
    /// checked against them. A master's never change while it runs; a slave
    /// serving its own slaves adopts its master's ([`SyncShared::set_histories`]).
    histories: std::sync::RwLock<Histories>,
    /// Bumped by every [`SyncShared::set_histories`]: a session started under
    /// an older one sends nothing more (its slave must adopt the new history).
    generation: tokio::sync::watch::Sender<u64>,
    pub progress: Arc<Progress>,
    pub pins: Arc<Pins>,
    pub snapshots: Arc<SnapshotManager>,
    reader: Mutex<BinlogReader>,
    cfg: SyncConfig,
    shutdown: CancellationToken,
    registry: SlaveRegistry,
    next_session: AtomicU64,
    /// Open `Sync` streams, at most `sync.max_sessions`.
    sessions: Arc<Slots>,
    /// Open `DbSync` streams, at most `sync.max_db_syncs`.
    db_syncs: Arc<Slots>,
    /// Sync and DbSync calls refused because their limit was reached.
    pub sessions_refused: AtomicU64,
    /// Sessions the master ended because the slave went silent (link
    /// timeout) or left its window full without an ack (stalled).
    pub sessions_dropped: AtomicU64,
    pub stale_messages: AtomicU64,
    pub partial_syncs: AtomicU64,
    pub full_syncs: AtomicU64,
    /// Binlog batches sent from the committer's in-memory tail.
    pub batches_from_memory: AtomicU64,
    /// Binlog batches read from the segment files (a slave behind the tail).
    pub batches_from_files: AtomicU64,
    /// What each connected slave holds (semi-synchronous writes, `Admin.Wait`).
    pub acks: Arc<crate::acks::Acks>,
    /// Set by the node: TrySyncs denied by reason are counted there.
    pub metrics: std::sync::OnceLock<Arc<tern_common::metrics::Metrics>>,
}

impl SyncShared {
    pub fn new(
        histories: Histories,
        progress: Arc<Progress>,
        pins: Arc<Pins>,
        snapshots: Arc<SnapshotManager>,
        reader: BinlogReader,
        cfg: SyncConfig,
        shutdown: CancellationToken,
    ) -> Arc<SyncShared> {
        // Session ids start from the clock so they are not reused across restarts.
        let base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1)
            << 12;
        let (max_sessions, max_db_syncs) = (cfg.max_sessions, cfg.max_db_syncs);
        Arc::new(SyncShared {
            histories: std::sync::RwLock::new(histories),
            generation: tokio::sync::watch::Sender::new(0),
            progress,
            pins,
            snapshots,
            reader: Mutex::new(reader),
            cfg,
            shutdown,
            registry: SlaveRegistry::default(),
            sessions: Slots::new(max_sessions),
            db_syncs: Slots::new(max_db_syncs),
            sessions_refused: AtomicU64::new(0),
            sessions_dropped: AtomicU64::new(0),
            next_session: AtomicU64::new(base),
            stale_messages: AtomicU64::new(0),
            partial_syncs: AtomicU64::new(0),
            full_syncs: AtomicU64::new(0),
            batches_from_memory: AtomicU64::new(0),
            batches_from_files: AtomicU64::new(0),
            acks: crate::acks::Acks::new(),
            metrics: std::sync::OnceLock::new(),
        })
    }

    /// The current history and its ancestors.
    pub fn histories(&self) -> Histories {
        self.histories
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current history's id.
    pub fn repl_id(&self) -> ReplId {
        self.histories
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .current
    }

    /// A slave serving its own slaves adopted new histories from its master:
    /// called before anything of the new history is in its relay log. Every
    /// session started before ends before it sends another batch, and its slave
    /// reconnects and adopts them too.
    pub fn set_histories(&self, h: Histories) {
        let mut cur = self.histories.write().unwrap_or_else(|p| p.into_inner());
        if *cur != h {
            *cur = h;
            self.generation.send_modify(|g| *g += 1);
        }
    }

    fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    fn new_reader(&self) -> BinlogReader {
        self.reader.lock().expect("reader template").clone()
    }

    /// Open `Sync` streams.
    pub fn sync_sessions(&self) -> u32 {
        self.sessions.in_use() as u32
    }

    /// Open `DbSync` streams.
    pub fn db_sync_streams(&self) -> u32 {
        self.db_syncs.in_use() as u32
    }

    /// A slot of `slots`, or RESOURCE_EXHAUSTED (counted) when all are taken.
    fn take_slot(&self, slots: &Arc<Slots>, what: &str, key: &str) -> Result<Slot, Status> {
        slots.take().ok_or_else(|| {
            self.sessions_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(limit = slots.max, "{what}: {key} reached; refusing");
            tern_common::status::exhausted(
                format!("{what}: {} open, the limit ({key})", slots.max),
                self.cfg.heartbeat(),
            )
        })
    }

    /// Per-slave rows for `Admin.Info`.
    pub fn slave_infos(&self) -> Vec<admin::SlaveInfo> {
        self.registry.infos(&self.progress)
    }
}

pub struct ReplicationService {
    shared: Arc<SyncShared>,
}

impl ReplicationService {
    pub fn new(shared: Arc<SyncShared>) -> ReplicationService {
        ReplicationService { shared }
    }

    pub fn into_server(self) -> pb::replication_server::ReplicationServer<ReplicationService> {
        pb::replication_server::ReplicationServer::new(self)
            .max_decoding_message_size(4 << 20)
            .max_encoding_message_size(tern_common::limits::MAX_MESSAGE_BYTES * 2)
    }
}

type Outbound = mpsc::Sender<Result<pb::MasterMessage, Status>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn master_msg(msg: pb::master_message::Msg) -> Result<pb::MasterMessage, Status> {
    Ok(pb::MasterMessage { msg: Some(msg) })
}

/// How a session ended without a protocol error (logged and recorded in the span).
#[derive(Debug)]
#[allow(dead_code)] // fields are read through Debug
enum Outcome {
    NeedFullSync(pb::FullSyncReason),
    SlaveClosed,
    LinkLost(String),
    LinkTimeout,
    /// The window stayed full with no ack for a link timeout.
    Stalled,
    Shutdown,
    /// This node adopted a new history (a slave serving its own slaves).
    HistoryChanged,
}

/// A counted limit on open streams.
struct Slots {
    max: usize,
    in_use: std::sync::atomic::AtomicUsize,
}

/// One taken slot, given back on drop.
struct Slot(Arc<Slots>);

impl Slots {
    fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max,
            in_use: Default::default(),
        })
    }

    fn take(self: &Arc<Slots>) -> Option<Slot> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

#[tonic::async_trait]
impl pb::replication_server::Replication for ReplicationService {
    type SyncStream = ReceiverStream<Result<pb::MasterMessage, Status>>;
    type DbSyncStream = db_sync::DbSyncStream;

    async fn sync(
        &self,
        req: Request<Streaming<pb::SlaveMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let remote = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let span = tracing::info_span!(
            parent: None,
            "sync_session",
            side = "master",
            slave_id = tracing::field::Empty,
            session_id = tracing::field::Empty,
            repl_id = %self.shared.repl_id(),
            start_index = tracing::field::Empty,
            outcome = tracing::field::Empty,
            %remote,
        );
        tern_common::telemetry::extract_context(&span, req.metadata());
        let slot = span.in_scope(|| {
            self.shared
                .take_slot(&self.shared.sessions, "Sync sessions", "sync.max_sessions")
        })?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(self.shared.cfg.window_batches + 16);
        let shared = self.shared.clone();
        let span2 = span.clone();
        tokio::spawn(
            async move {
                let _slot = slot;
                let mut slave_id = String::new();
                let mut session_id = 0;
                let result =
                    run_session(&shared, inbound, &tx, &mut slave_id, &mut session_id).await;
                if !slave_id.is_empty() {
                    shared.registry.disconnect(&slave_id, session_id);
                    shared.acks.remove(&slave_id, session_id);
                }
                if matches!(result, Ok(Outcome::LinkTimeout | Outcome::Stalled)) {
                    shared.sessions_dropped.fetch_add(1, Ordering::Relaxed);
                }
                match result {
                    Ok(outcome) => {
                        span2.record("outcome", tracing::field::debug(&outcome));
                        tracing::info!(?outcome, "sync session ended");
                    }
                    Err(status) => {
                        span2.record("outcome", status.message());
                        tracing::warn!(code = ?status.code(), message = status.message(), "sync session failed");
                        let _ = send_bounded(&shared, &tx, Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn db_sync(
        &self,
        req: Request<pb::DbSyncRequest>,
    ) -> Result<Response<Self::DbSyncStream>, Status> {
        db_sync::serve(self.shared.clone(), req).await
    }
}

/// Why [`send_bounded`] did not send.
enum Unsent {
    /// The stream's client is gone.
    Closed,
    /// It has not read for a link timeout.
    Timeout,
    /// The master shuts down.
    Shutdown,
}

/// Queues one message of a response stream, giving up when the client is
/// gone, stops reading for a link timeout, or the master shuts down: a
/// stream task never waits on its client for longer than that.
async fn send_bounded<T>(
    shared: &SyncShared,
    tx: &mpsc::Sender<Result<T, Status>>,
    msg: Result<T, Status>,
) -> Result<(), Unsent> {
    tokio::select! {
        r = tokio::time::timeout(shared.cfg.link_timeout(), tx.send(msg)) => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Unsent::Closed),
            Err(_) => Err(Unsent::Timeout),
        },
        _ = shared.shutdown.cancelled() => Err(Unsent::Shutdown),
    }
}

/// One session: the handshake, then streaming.
async fn run_session(
    shared: &SyncShared,
    mut inbound: Streaming<pb::SlaveMessage>,
    tx: &Outbound,
    slave_id: &mut String,
    session_id: &mut u64,
) -> Result<Outcome, Status> {
    match handshake::handshake(shared, &mut inbound, tx, slave_id, session_id).await? {
        Ok(accepted) => stream::stream(shared, inbound, tx, accepted).await,
        Err(outcome) => Ok(outcome),
    }
}
