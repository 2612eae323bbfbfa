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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tern_common::binlog::BinlogReader;
use tern_common::config::SyncConfig;
use tern_common::position::ReplId;
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
    pub progress: Arc<Progress>,
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
        repl_id: ReplId,
        progress: Arc<Progress>,
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
            repl_id,
            progress,
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

    /// Decides whether the master can continue a slave from `(repl_id, index)`.
    fn check_position(
        &self,
        repl_id: &str,
        index: u64,
    ) -> Result<(), (pb::FullSyncReason, String)> {
        use pb::FullSyncReason as R;
        let known = if repl_id.is_empty() {
            index == 0
        } else {
            repl_id.parse::<ReplId>().ok() == Some(self.repl_id)
        };
        if !known {
            return Err((
                R::UnknownReplId,
                format!(
                    "repl id {repl_id:?} is not this master's history {}",
                    self.repl_id
                ),
            ));
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
        if index == last {
            return Ok(());
        }
        // `index` is a boundary iff the event after it is a Begin.
        let mut reader = self.new_reader();
        let next = tokio::task::block_in_place(|| {
            reader.seek(index + 1)?;
            reader.read_events(index + 1, 1)
        });
        match next {
            Ok(evs) if matches!(evs.first().map(|e| &e.kind), Some(EventKind::Begin { .. })) => {
                Ok(())
            }
            Ok(_) => Err((
                R::NotABoundary,
                format!("index {index} is not a transaction boundary"),
            )),
            Err(e) => Err((
                R::Purged,
                format!("cannot read the binlog after {index}: {e}"),
            )),
        }
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
                let result = run_session(&shared, inbound, &tx, &mut slave_id).await;
                if !slave_id.is_empty() {
                    shared.update(&slave_id, |e| e.state = "disconnected");
                }
                match result {
                    Ok(outcome) => {
                        span2.record("outcome", tracing::field::debug(&outcome));
                        tracing::info!(?outcome, "sync session ended");
                    }
                    Err(status) => {
                        span2.record("outcome", status.message());
                        tracing::warn!(code = ?status.code(), message = status.message(), "sync session failed");
                        let _ = tx.send(Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn db_sync(
        &self,
        _req: Request<pb::DbSyncRequest>,
    ) -> Result<Response<Self::DbSyncStream>, Status> {
        Err(Status::unimplemented(
            "full sync (DbSync) is not available in this version: the slave must be new or its position still in the binlog",
        ))
    }
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
    let first = shared.progress.first_index.load(Ordering::Acquire);
    let last = shared.progress.last_index.load(Ordering::Acquire);
    if let Err((reason, message)) = shared.check_position(&try_sync.repl_id, index) {
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
        };
        let _ = tx
            .send(master_msg(pb::master_message::Msg::TrySyncResponse(resp)))
            .await;
        return Ok(Outcome::NeedFullSync(reason));
    }
    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
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
    shared.update(&slave_id, |e| e.state = "streaming");
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
            match tokio::time::timeout(cfg.link_timeout(), tx.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ok(Outcome::SlaveClosed),
                Err(_) => return Ok(Outcome::LinkTimeout),
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
                        shared.update(&slave_id, |e| {
                            e.received = a.received_index;
                            e.applied = a.applied_index;
                        });
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
                        shared.update(&slave_id, |e| {
                            e.received = e.received.max(h.index);
                            e.applied = e.applied.max(h.applied_index);
                        });
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
