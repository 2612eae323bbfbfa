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
//! A session reads the binlog with its own reader, never past the index the
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
//! boundary) is told `NeedFullSync` and calls **`DbSync`**:
//!
//! ```text
//! slave: DbSyncRequest{slave_id, snapshot_id?, have[]}
//! master: DbSyncHeader{snapshot_id, repl_id, index, files[name,size,crc32c], total_bytes, ...}
//! master: FileChunk{name, offset, data, crc32c} ... file by file, each from its `have` offset
//! master: DbSyncDone{bytes_sent}
//! ```
//!
//! The snapshot is a RocksDB checkpoint whose index is read from inside it
//! ([`crate::snapshot`]); an empty `snapshot_id` gets a fresh (or recent,
//! shared) one, a given one resumes it or is NOT_FOUND when it has gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tern_common::binlog::BinlogReader;
use tern_common::config::SyncConfig;
use tern_common::history::{Histories, HistoryError};
use tern_common::position::{Position, ReplId};
use tern_common::proto::admin::v1 as admin;
use tern_common::proto::replication::v1 as pb;
use tern_common::record::EventKind;
use tern_common::window::{InFlight, SyncWindow};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::committer::Progress;
use crate::pins::{Pins, SLAVE_PREFIX};
use crate::snapshot::{SnapshotError, SnapshotLease, SnapshotManager};

/// Bytes of snapshot data in one `FileChunk`.
pub const DB_SYNC_CHUNK_BYTES: usize = 1 << 20;
/// How often a `DbSync` stream logs its progress.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(2);
/// Most `have` entries one `DbSyncRequest` may carry.
const MAX_HAVE: usize = 1 << 20;
/// Longest snapshot id accepted.
const MAX_SNAPSHOT_ID: usize = 128;

/// What Info shows about one slave.
#[derive(Clone, Debug, Default)]
struct SlaveEntry {
    addr: String,
    state: &'static str,
    session_id: u64,
    received: u64,
    applied: u64,
}

/// State shared by every session of this master.
pub struct SyncShared {
    pub repl_id: ReplId,
    /// The current history and its ancestors (I8): TrySync positions are checked against them.
    histories: Histories,
    pub progress: Arc<Progress>,
    pub pins: Arc<Pins>,
    pub snapshots: Arc<SnapshotManager>,
    reader: Mutex<BinlogReader>,
    cfg: SyncConfig,
    shutdown: CancellationToken,
    slaves: Mutex<HashMap<String, SlaveEntry>>,
    next_session: AtomicU64,
    pub stale_messages: AtomicU64,
    pub partial_syncs: AtomicU64,
    pub full_syncs: AtomicU64,
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
        Arc::new(SyncShared {
            repl_id: histories.current,
            histories,
            progress,
            pins,
            snapshots,
            reader: Mutex::new(reader),
            cfg,
            shutdown,
            slaves: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(base),
            stale_messages: AtomicU64::new(0),
            partial_syncs: AtomicU64::new(0),
            full_syncs: AtomicU64::new(0),
        })
    }

    fn new_reader(&self) -> BinlogReader {
        self.reader.lock().expect("reader template").clone()
    }

    /// Per-slave rows for `Admin.Info`.
    pub fn slave_infos(&self) -> Vec<admin::SlaveInfo> {
        let last = self.progress.last_index.load(Ordering::Acquire);
        let first = self.progress.first_index.load(Ordering::Acquire);
        let mut rows: Vec<admin::SlaveInfo> = self
            .slaves
            .lock()
            .expect("slaves")
            .iter()
            .map(|(id, e)| admin::SlaveInfo {
                id: id.clone(),
                addr: e.addr.clone(),
                state: e.state.to_string(),
                session_id: e.session_id,
                received_index: e.received,
                applied_index: e.applied,
                lag_events: last.saturating_sub(e.applied),
                lag_ms: self.progress.lag_since(e.applied).as_millis() as u64,
                needs_full_sync: e.received + 1 < first,
            })
            .collect();
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        rows
    }

    fn update(&self, slave_id: &str, f: impl FnOnce(&mut SlaveEntry)) {
        let mut slaves = self.slaves.lock().expect("slaves");
        let e = slaves.entry(slave_id.to_string()).or_default();
        f(e);
    }

    /// Updates the slave's row only while `session_id` is its latest session:
    /// an old session of a slave that reconnected never touches the live one's.
    fn update_session(&self, slave_id: &str, session_id: u64, f: impl FnOnce(&mut SlaveEntry)) {
        let mut slaves = self.slaves.lock().expect("slaves");
        if let Some(e) = slaves.get_mut(slave_id)
            && e.session_id == session_id
        {
            f(e);
        }
    }

    /// Decides whether the master can continue a slave from `(repl_id, index)`
    /// with `seq` the slave's transaction ending there: the position must be a
    /// prefix of this master's log (I8: its current history, or an ancestor at
    /// or before where it ended), a transaction boundary still stored (or just
    /// purged up to), and the master's Commit at `index` must carry the same seq.
    /// A slave without a history (empty repl id) always gets a full sync.
    fn check_position(
        &self,
        repl_id: &str,
        index: u64,
        seq: u64,
    ) -> Result<(), (pb::FullSyncReason, String)> {
        use pb::FullSyncReason as R;
        if repl_id.is_empty() {
            return Err((R::UnknownReplId, "new slave: full sync".to_string()));
        }
        let Ok(slave_repl) = repl_id.parse::<ReplId>() else {
            return Err((
                R::UnknownReplId,
                format!("repl id {repl_id:?} is not a repl id"),
            ));
        };
        let position = Position {
            repl_id: slave_repl,
            index: index.into(),
        };
        match self.histories.check(position) {
            Ok(()) => {}
            Err(e @ HistoryError::Unknown(_)) => return Err((R::UnknownReplId, e.to_string())),
            Err(e @ HistoryError::Diverged { .. }) => return Err((R::Diverged, e.to_string())),
        }
        let last = self.progress.last_index.load(Ordering::Acquire);
        let first = self.progress.first_index.load(Ordering::Acquire);
        if index > last {
            return Err((
                R::AheadOfMaster,
                format!("index {index} is ahead of the master's last index {last}"),
            ));
        }
        if index + 1 < first {
            return Err((
                R::Purged,
                format!("events after {index} are purged; the binlog starts at {first}"),
            ));
        }
        if index == 0 {
            return Ok(());
        }
        // Read the event at `index` (when still stored: it must be the Commit of
        // the slave's transaction) and the one after it (a Begin, unless `index`
        // is the last), in one pass.
        let from = index.max(first);
        let to = (index + 1).min(last);
        if from > to {
            return Ok(());
        }
        let mut reader = self.new_reader();
        let events = match tokio::task::block_in_place(|| {
            reader.seek(from)?;
            reader.read_events(from, (to - from + 1) as usize)
        }) {
            Ok(evs) => evs,
            Err(e) => {
                return Err((
                    R::Purged,
                    format!("cannot read the binlog around {index}: {e}"),
                ));
            }
        };
        for ev in &events {
            match (&ev.kind, ev.index == index) {
                (EventKind::Commit { seq: ours }, true) if *ours == seq => {}
                (EventKind::Commit { seq: ours }, true) => {
                    return Err((
                        R::Diverged,
                        format!(
                            "the slave's transaction at {index} has seq {seq}, the master's has \
                             seq {ours}: different histories"
                        ),
                    ));
                }
                (_, true)
                | (
                    EventKind::Put { .. } | EventKind::Delete { .. } | EventKind::Commit { .. },
                    false,
                ) => {
                    return Err((
                        R::NotABoundary,
                        format!("index {index} is not a transaction boundary"),
                    ));
                }
                (EventKind::Begin { .. }, false) => {}
            }
        }
        Ok(())
    }

    /// The ancestor histories, as TrySyncResponse carries them.
    fn history_list(&self) -> Vec<pb::History> {
        self.histories.replication_list()
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
    Shutdown,
}

#[tonic::async_trait]
impl pb::replication_server::Replication for ReplicationService {
    type SyncStream = ReceiverStream<Result<pb::MasterMessage, Status>>;
    type DbSyncStream = ReceiverStream<Result<pb::DbSyncChunk, Status>>;

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
            repl_id = %self.shared.repl_id,
            start_index = tracing::field::Empty,
            outcome = tracing::field::Empty,
            %remote,
        );
        tern_common::telemetry::extract_context(&span, req.metadata());
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(self.shared.cfg.window_batches + 16);
        let shared = self.shared.clone();
        let span2 = span.clone();
        tokio::spawn(
            async move {
                let mut slave_id = String::new();
                let mut session_id = 0;
                let result =
                    run_session(&shared, inbound, &tx, &mut slave_id, &mut session_id).await;
                if !slave_id.is_empty() {
                    shared.update_session(&slave_id, session_id, |e| e.state = "disconnected");
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
        let remote = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let span = tracing::info_span!(
            parent: None,
            "db_sync",
            side = "master",
            slave_id = tracing::field::Empty,
            snapshot_id = tracing::field::Empty,
            index = tracing::field::Empty,
            bytes = tracing::field::Empty,
            bytes_to_send = tracing::field::Empty,
            outcome = tracing::field::Empty,
            %remote,
        );
        tern_common::telemetry::extract_context(&span, req.metadata());
        let req = req.into_inner();
        let slave_id = req.slave_id.clone();
        let shared = self.shared.clone();
        let prepared = span.in_scope(|| prepare_db_sync(&shared, &req));
        let (resumed, starts) = match prepared {
            Ok(x) => x,
            Err(status) => {
                span.record("outcome", status.message());
                span.in_scope(|| {
                    tracing::warn!(code = ?status.code(), message = status.message(), "DbSync refused")
                });
                return Err(status);
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let span2 = span.clone();
        tokio::spawn(
            async move {
                // A new snapshot is made here, not before answering: a large
                // checkpoint's checksums may take longer than a request deadline.
                let result = match resumed {
                    Some(lease) => stream_snapshot(&shared, lease, &starts, &tx).await,
                    None => match shared.snapshots.get_or_create(&slave_id).await {
                        Ok(lease) => stream_snapshot(&shared, lease, &starts, &tx).await,
                        Err(e) => Err(Status::from(e)),
                    },
                };
                match result {
                    Ok(outcome) => {
                        span2.record("outcome", tracing::field::debug(&outcome));
                        tracing::info!(?outcome, "DbSync stream ended");
                    }
                    Err(status) => {
                        span2.record("outcome", status.message());
                        tracing::warn!(code = ?status.code(), message = status.message(), "DbSync stream failed");
                        let _ = send_bounded(&shared, &tx, Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Status {
        match e {
            SnapshotError::Purged { .. } => Status::unavailable(e.to_string()),
            SnapshotError::WrongReplId { .. } => Status::failed_precondition(e.to_string()),
            SnapshotError::Io(_)
            | SnapshotError::State(_)
            | SnapshotError::Task(_)
            | SnapshotError::FileChanged { .. } => Status::internal(e.to_string()),
        }
    }
}

fn snapshot_gone(id: &str) -> Status {
    Status::not_found(format!("snapshot {id} is gone; start a new full sync"))
}

/// Validates a `DbSyncRequest`. A resume (`snapshot_id` set) gets its lease
/// and, per file, the offset the slave has it up to (`None`: not listed in
/// `have`); a new full sync gets `None` and no offsets (`have` is only
/// meaningful with the snapshot it refers to).
fn prepare_db_sync(
    shared: &SyncShared,
    req: &pb::DbSyncRequest,
) -> Result<(Option<SnapshotLease>, Vec<Option<u64>>), Status> {
    let span = tracing::Span::current();
    if req.slave_id.is_empty() || req.slave_id.len() > 256 {
        return Err(Status::invalid_argument(
            "DbSyncRequest.slave_id must be 1 to 256 bytes",
        ));
    }
    span.record("slave_id", req.slave_id.as_str());
    if req.snapshot_id.len() > MAX_SNAPSHOT_ID {
        return Err(Status::invalid_argument(format!(
            "DbSyncRequest.snapshot_id is longer than {MAX_SNAPSHOT_ID} bytes"
        )));
    }
    if req.have.len() > MAX_HAVE {
        return Err(Status::invalid_argument(format!(
            "DbSyncRequest.have lists more than {MAX_HAVE} files"
        )));
    }
    if shared.shutdown.is_cancelled() {
        return Err(Status::unavailable("the master is shutting down"));
    }
    if req.snapshot_id.is_empty() {
        if let Some(h) = req.have.first() {
            return Err(Status::invalid_argument(format!(
                "have: {:?} without a snapshot_id; `have` resumes a given snapshot",
                h.name
            )));
        }
        return Ok((None, Vec::new()));
    }
    let lease = shared
        .snapshots
        .lease(&req.snapshot_id, &req.slave_id)
        .ok_or_else(|| snapshot_gone(&req.snapshot_id))?;
    let mut starts: Vec<Option<u64>> = vec![None; lease.files.len()];
    for h in &req.have {
        let Some(i) = lease.files.iter().position(|f| f.name == h.name) else {
            return Err(Status::invalid_argument(format!(
                "have: {:?} is not a file of snapshot {}",
                h.name, lease.id
            )));
        };
        if starts[i].is_some() {
            return Err(Status::invalid_argument(format!(
                "have: {:?} is listed twice",
                h.name
            )));
        }
        if h.offset > lease.files[i].size {
            return Err(Status::invalid_argument(format!(
                "have: offset {} of {:?} is beyond its size {}",
                h.offset, h.name, lease.files[i].size
            )));
        }
        starts[i] = Some(h.offset);
    }
    Ok((Some(lease), starts))
}

/// How a `DbSync` stream ended without an error.
#[derive(Debug)]
#[allow(dead_code)] // fields are read through Debug
enum DbSyncOutcome {
    Done { bytes_sent: u64 },
    SlaveGone,
    Timeout,
    Shutdown,
}

/// Why a `DbSync` stream stopped early.
enum Stop {
    Ended(DbSyncOutcome),
    Failed(Status),
}

impl From<DbSyncOutcome> for Stop {
    fn from(o: DbSyncOutcome) -> Stop {
        Stop::Ended(o)
    }
}

impl From<Status> for Stop {
    fn from(s: Status) -> Stop {
        Stop::Failed(s)
    }
}

impl From<SnapshotError> for Stop {
    fn from(e: SnapshotError) -> Stop {
        Stop::Failed(e.into())
    }
}

type DbSyncOutbound = mpsc::Sender<Result<pb::DbSyncChunk, Status>>;

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

/// Sends one message of a `DbSync` stream (see [`send_bounded`]).
async fn send_chunk(
    shared: &SyncShared,
    tx: &DbSyncOutbound,
    kind: pb::db_sync_chunk::Kind,
) -> Result<(), Stop> {
    let msg = Ok(pb::DbSyncChunk { kind: Some(kind) });
    send_bounded(shared, tx, msg).await.map_err(|e| {
        match e {
            Unsent::Closed => DbSyncOutcome::SlaveGone,
            Unsent::Timeout => DbSyncOutcome::Timeout,
            Unsent::Shutdown => DbSyncOutcome::Shutdown,
        }
        .into()
    })
}

/// Runs blocking snapshot I/O off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, Stop> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(Status::internal(format!("snapshot read task: {e}")).into()),
    }
}

fn mb_per_s(bytes: u64, since: Instant) -> String {
    let secs = since.elapsed().as_secs_f64().max(1e-3);
    format!("{:.1}", bytes as f64 / secs / (1u64 << 20) as f64)
}

/// Streams the header, each file from what the slave `have`s, and `DbSyncDone`.
async fn stream_snapshot(
    shared: &SyncShared,
    mut snap: SnapshotLease,
    have: &[Option<u64>],
    tx: &DbSyncOutbound,
) -> Result<DbSyncOutcome, Status> {
    let span = tracing::Span::current();
    span.record("snapshot_id", snap.id.as_str());
    span.record("index", snap.index);
    let have: Vec<Option<u64>> = if have.is_empty() {
        vec![None; snap.files.len()]
    } else {
        have.to_vec()
    };
    let bytes_to_send: u64 = snap
        .files
        .iter()
        .zip(&have)
        .map(|(f, h)| f.size - h.unwrap_or(0))
        .sum();
    span.record("bytes_to_send", bytes_to_send);
    tracing::info!(
        index = snap.index,
        files = snap.files.len(),
        total_bytes = snap.total_bytes,
        bytes_to_send,
        "full sync: sending snapshot"
    );
    let started = Instant::now();
    let mut sent = 0u64;
    let result = send_files(shared, &snap, &have, tx, bytes_to_send, started, &mut sent).await;
    span.record("bytes", sent);
    match result {
        Ok(()) => {
            snap.mark_completed();
            shared.full_syncs.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                bytes_sent = sent,
                secs = format!("{:.2}", started.elapsed().as_secs_f64()),
                mb_per_s = mb_per_s(sent, started),
                "full sync: snapshot sent"
            );
            Ok(DbSyncOutcome::Done { bytes_sent: sent })
        }
        Err(Stop::Ended(o)) => Ok(o),
        Err(Stop::Failed(s)) => Err(s),
    }
}

async fn send_files(
    shared: &SyncShared,
    snap: &SnapshotLease,
    have: &[Option<u64>],
    tx: &DbSyncOutbound,
    bytes_to_send: u64,
    started: Instant,
    sent: &mut u64,
) -> Result<(), Stop> {
    let header = pb::DbSyncHeader {
        snapshot_id: snap.id.clone(),
        repl_id: snap.repl_id.to_string(),
        index: snap.index,
        files: snap
            .files
            .iter()
            .map(|f| pb::SnapshotFile {
                name: f.name.clone(),
                size: f.size,
                crc32c: f.crc32c,
            })
            .collect(),
        total_bytes: snap.total_bytes,
        last_seq: snap.last_seq,
        bytes_to_send,
    };
    send_chunk(shared, tx, pb::db_sync_chunk::Kind::Header(header)).await?;
    let mut last_log = Instant::now();
    for (f, &has) in snap.files.iter().zip(have) {
        // A file the slave has whole is skipped; an empty one it does not have
        // still gets one empty chunk, so the slave creates it.
        if has == Some(f.size) {
            continue;
        }
        let start = has.unwrap_or(0);
        let file = {
            let (s, f) = (snap.snapshot(), f.clone());
            Arc::new(blocking(move || s.open(&f)).await?)
        };
        let mut offset = start;
        loop {
            if !snap.alive() {
                return Err(snapshot_gone(&snap.id).into());
            }
            let len = (f.size - offset).min(DB_SYNC_CHUNK_BYTES as u64) as usize;
            let data = {
                let (s, f, file) = (snap.snapshot(), f.clone(), file.clone());
                blocking(move || s.read_at(&file, &f, offset, len)).await?
            };
            let chunk = pb::FileChunk {
                name: f.name.clone(),
                offset,
                crc32c: crc32c::crc32c(&data),
                data: bytes::Bytes::from(data),
            };
            send_chunk(shared, tx, pb::db_sync_chunk::Kind::Data(chunk)).await?;
            offset += len as u64;
            *sent += len as u64;
            if last_log.elapsed() >= PROGRESS_LOG_INTERVAL {
                last_log = Instant::now();
                tracing::info!(
                    percent = format!("{:.1}", *sent as f64 * 100.0 / bytes_to_send.max(1) as f64),
                    mb_per_s = mb_per_s(*sent, started),
                    sent = *sent,
                    bytes_to_send,
                    "full sync: sending"
                );
            }
            if offset >= f.size {
                break;
            }
        }
    }
    let done = pb::DbSyncDone { bytes_sent: *sent };
    send_chunk(shared, tx, pb::db_sync_chunk::Kind::Done(done)).await
}

async fn recv(
    shared: &SyncShared,
    inbound: &mut Streaming<pb::SlaveMessage>,
) -> Result<Option<pb::slave_message::Msg>, Outcome> {
    tokio::select! {
        m = inbound.message() => match m {
            Ok(Some(m)) => Ok(m.msg),
            Ok(None) => Err(Outcome::SlaveClosed),
            Err(s) => Err(Outcome::LinkLost(s.message().to_string())),
        },
        _ = tokio::time::sleep(shared.cfg.link_timeout()) => Err(Outcome::LinkTimeout),
        _ = shared.shutdown.cancelled() => Err(Outcome::Shutdown),
    }
}

async fn run_session(
    shared: &SyncShared,
    mut inbound: Streaming<pb::SlaveMessage>,
    tx: &Outbound,
    slave_id_out: &mut String,
    session_id_out: &mut u64,
) -> Result<Outcome, Status> {
    use pb::slave_message::Msg;
    let span = tracing::Span::current();
    // 1. TrySync.
    let try_sync = match recv(shared, &mut inbound).await {
        Ok(Some(Msg::TrySync(t))) => t,
        Ok(_) => {
            return Err(Status::invalid_argument(
                "the first message of a Sync stream must be TrySync",
            ));
        }
        Err(o) => return Ok(o),
    };
    if try_sync.slave_id.is_empty() || try_sync.slave_id.len() > 256 {
        return Err(Status::invalid_argument(
            "TrySync.slave_id must be 1 to 256 bytes",
        ));
    }
    let slave_id = try_sync.slave_id.clone();
    *slave_id_out = slave_id.clone();
    let index = try_sync.index;
    span.record("slave_id", slave_id.as_str());
    span.record("start_index", index);
    // Pin before validating: retention publishes the new first index before it
    // lets go of the pins, so either this pin holds the binlog or the check
    // below sees it purged. Under a provisional owner, so a refused TrySync
    // never takes the pin of a live session of the same slave.
    let provisional = shared
        .pins
        .pin(format!("{SLAVE_PREFIX}{slave_id}/try_sync"), index);
    let first = shared.progress.first_index.load(Ordering::Acquire);
    let last = shared.progress.last_index.load(Ordering::Acquire);
    if let Err((reason, message)) = shared.check_position(&try_sync.repl_id, index, try_sync.seq) {
        drop(provisional);
        tracing::info!(?reason, %message, "TrySync: slave needs a full sync");
        shared.update(&slave_id, |e| {
            e.addr = try_sync.addr.clone();
            e.state = "need_full_sync";
            e.session_id = 0;
        });
        let resp = pb::TrySyncResponse {
            code: pb::TrySyncCode::NeedFullSync as i32,
            reason: reason as i32,
            message,
            repl_id: shared.repl_id.to_string(),
            first_index: first,
            last_index: last,
            session_id: 0,
            histories: shared.history_list(),
        };
        let _ = tx
            .send(master_msg(pb::master_message::Msg::TrySyncResponse(resp)))
            .await;
        return Ok(Outcome::NeedFullSync(reason));
    }
    // This session's pin replaces any older session's of the same slave.
    let pin = shared.pins.pin(format!("{SLAVE_PREFIX}{slave_id}"), index);
    drop(provisional);
    // Its own pin now holds the binlog: a snapshot it came from may go.
    shared.snapshots.slave_connected(&slave_id);
    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    *session_id_out = session_id;
    span.record("session_id", session_id);
    shared.update(&slave_id, |e| {
        e.addr = try_sync.addr.clone();
        e.state = "wait_first_ack";
        e.session_id = session_id;
        e.received = index;
        e.applied = index;
    });
    let resp = pb::TrySyncResponse {
        code: pb::TrySyncCode::Ok as i32,
        reason: pb::FullSyncReason::Unspecified as i32,
        message: String::new(),
        repl_id: shared.repl_id.to_string(),
        first_index: first,
        last_index: last,
        session_id,
        histories: shared.history_list(),
    };
    if tx
        .send(master_msg(pb::master_message::Msg::TrySyncResponse(resp)))
        .await
        .is_err()
    {
        return Ok(Outcome::SlaveClosed);
    }
    // 2. The first-send ack must carry exactly the validated index (F2).
    loop {
        match recv(shared, &mut inbound).await {
            Err(o) => return Ok(o),
            Ok(Some(Msg::Ack(a))) if a.session_id != session_id => {
                shared.stale_messages.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(stale = a.session_id, "ignoring ack of another session");
            }
            Ok(Some(Msg::Ack(a))) => {
                if !a.first_send {
                    return Err(Status::failed_precondition(
                        "expected the first-send BinlogAck before any other ack",
                    ));
                }
                if a.received_index != index {
                    return Err(Status::failed_precondition(format!(
                        "first-send ack index {} is not the TrySync index {index}",
                        a.received_index
                    )));
                }
                break;
            }
            Ok(Some(Msg::Heartbeat(_))) | Ok(None) => {}
            Ok(Some(Msg::TrySync(_))) => {
                return Err(Status::failed_precondition(
                    "TrySync sent twice on one stream",
                ));
            }
        }
    }
    shared.partial_syncs.fetch_add(1, Ordering::Relaxed);
    shared.update_session(&slave_id, session_id, |e| e.state = "streaming");
    tracing::info!(index, "slave connected; streaming binlog");
    // 3. Stream.
    let cfg = &shared.cfg;
    let mut reader = shared.new_reader();
    let mut need_seek = true;
    let mut next = index + 1;
    let mut window = SyncWindow::new(cfg.window_batches, cfg.window_bytes);
    let mut shippable = shared.progress.shippable.clone();
    let mut heartbeat = tokio::time::interval(cfg.heartbeat());
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // What this session's slave has received (its pin).
    let mut received = index;
    let mut buf = Vec::with_capacity(cfg.batch_bytes + 4096);
    loop {
        let upto = *shippable.borrow_and_update();
        while window.has_room() && next <= upto {
            buf.clear();
            let read = tokio::task::block_in_place(|| {
                if need_seek {
                    reader.seek(next)?;
                }
                reader.read_batch(upto, cfg.batch_bytes, &mut buf)
            });
            need_seek = false;
            let (f, l) = match read {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    return Err(Status::internal(format!(
                        "reading the binlog at {next}: {e}"
                    )));
                }
            };
            window.push(InFlight {
                first_index: f,
                last_index: l,
                bytes: buf.len(),
            });
            next = l + 1;
            let batch = pb::BinlogBatch {
                session_id,
                first_index: f,
                last_index: l,
                records: bytes::Bytes::copy_from_slice(&buf),
            };
            let msg = master_msg(pb::master_message::Msg::Batch(batch));
            match send_bounded(shared, tx, msg).await {
                Ok(()) => {}
                Err(Unsent::Closed) => return Ok(Outcome::SlaveClosed),
                Err(Unsent::Timeout) => return Ok(Outcome::LinkTimeout),
                Err(Unsent::Shutdown) => return Ok(Outcome::Shutdown),
            }
        }
        tokio::select! {
            m = inbound.message() => {
                last_heard = Instant::now();
                match m {
                    Ok(None) => return Ok(Outcome::SlaveClosed),
                    Err(s) => return Ok(Outcome::LinkLost(s.message().to_string())),
                    Ok(Some(pb::SlaveMessage { msg: Some(Msg::Ack(a)) })) => {
                        if a.session_id != session_id {
                            shared.stale_messages.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if a.first_send {
                            return Err(Status::failed_precondition("a second first-send ack in one session"));
                        }
                        window
                            .ack(a.batch_first_index, a.batch_last_index)
                            .map_err(|e| Status::out_of_range(e.to_string()))?;
                        if a.received_index > a.batch_last_index || a.applied_index > a.received_index {
                            return Err(Status::out_of_range(format!(
                                "ack positions received {} applied {} are beyond the acked batch end {}",
                                a.received_index, a.applied_index, a.batch_last_index
                            )));
                        }
                        shared.update_session(&slave_id, session_id, |e| {
                            e.received = a.received_index;
                            e.applied = a.applied_index;
                        });
                        received = a.received_index;
                        pin.update(received);
                    }
                    Ok(Some(pb::SlaveMessage { msg: Some(Msg::Heartbeat(h)) })) => {
                        if h.session_id != session_id {
                            shared.stale_messages.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if h.index > next.saturating_sub(1) || h.applied_index > h.index {
                            return Err(Status::out_of_range(format!(
                                "heartbeat positions received {} applied {} are beyond what was sent ({})",
                                h.index, h.applied_index, next.saturating_sub(1)
                            )));
                        }
                        shared.update_session(&slave_id, session_id, |e| {
                            e.received = e.received.max(h.index);
                            e.applied = e.applied.max(h.applied_index);
                        });
                        received = received.max(h.index);
                        pin.update(received);
                    }
                    Ok(Some(pb::SlaveMessage { msg: Some(Msg::TrySync(_)) })) => {
                        return Err(Status::failed_precondition("TrySync sent twice on one stream"));
                    }
                    Ok(Some(pb::SlaveMessage { msg: None })) => {
                        return Err(Status::invalid_argument("empty SlaveMessage"));
                    }
                }
            }
            r = shippable.changed() => {
                if r.is_err() {
                    return Ok(Outcome::Shutdown);
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > cfg.link_timeout() {
                    return Ok(Outcome::LinkTimeout);
                }
                let hb = pb::Heartbeat {
                    session_id,
                    now_ms: now_ms(),
                    index: *shippable.borrow(),
                    applied_index: 0,
                };
                // Never wait on a slave that stopped reading: the link timeout ends it.
                let _ = tx.try_send(master_msg(pb::master_message::Msg::Heartbeat(hb)));
            }
            _ = shared.shutdown.cancelled() => return Ok(Outcome::Shutdown),
        }
    }
}
