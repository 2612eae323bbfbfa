//! The slave's link to its master: connection state machine, reconnect barrier
//! and receiver.
//!
//! ```text
//! NoConnect → TryConnect → WaitReply → Connected
//!                             └──────→ WaitDbSync (master needs a full sync)
//! any failure → reconnect with backoff (reason logged and counted); Error when
//! the master's answer means retrying cannot help.
//! ```
//!
//! **Reconnect barrier (I4).** Before every TrySync the old session is gone (its
//! stream dropped, so nothing of it can still be appended), the relay log is
//! rolled back to the last transaction boundary, and the applier is drained until
//! `applied == received`. Only then does the slave name a position, and the
//! first-send ack repeats exactly that position, so what it reports can never be
//! stale (F2).
//!
//! **Receiver (I3).** Each BinlogBatch is checked (session id, index contiguity,
//! CRCs, the boundary parser) and its bytes are appended unchanged to the relay
//! log, so the relay log is byte-identical to the master's binlog. `received`
//! moves only at Commit boundaries that are durable under the relay log's fsync
//! policy (`always`: fsynced with the batch, and with the batches that arrived
//! behind it meanwhile, under one fsync; `everysec`: at the next fsync, at
//! most about a second later, driven by a timer so an idle link advances too;
//! `no`: when written; see [`tern_common::durability`]). The events it decoded
//! while checking are kept, and the transactions `received` newly covers are
//! handed to the applier (a bounded queue; dropped when full) just before
//! `received` moves. The applier applies only up to `received`, from the
//! hand-off or the relay log, so the slave's RocksDB is never ahead of its
//! durable relay log and may be flushed at any time. Heartbeats run on their own task and
//! never wait for apply (I7).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tern_common::binlog::Binlog;
use tern_common::boundary::{BoundaryParser, ParserState};
use tern_common::config::Config;
use tern_common::history::{Histories, HistoryEntry};
use tern_common::position::ReplId;
use tern_common::proto::replication::v1 as pb;
use tern_common::proto::replication::v1::replication_client::ReplicationClient;
use tern_common::record::{BytesRecords, Event, EventKind};
use tern_common::state::State;
use tokio::sync::{mpsc, watch};

use crate::applier::{Chunk, HandOff};
use crate::fullsync::{self, Staged};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Connection states, as Info shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    NoConnect,
    TryConnect,
    WaitReply,
    Connected,
    WaitDbSync,
    Error,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::NoConnect => "no_connect",
            LinkState::TryConnect => "try_connect",
            LinkState::WaitReply => "wait_reply",
            LinkState::Connected => "connected",
            LinkState::WaitDbSync => "wait_db_sync",
            LinkState::Error => "error",
        }
    }
}

/// Why a session ended and the slave reconnects.
#[derive(Debug, thiserror::Error)]
pub enum ReconnectReason {
    #[error("cannot connect to the master: {0}")]
    ConnectFailed(String),
    #[error("link lost: {0}")]
    LinkLost(String),
    #[error("no message from the master for {0:?}")]
    LinkTimeout(Duration),
    #[error("the master closed the stream")]
    MasterClosed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("relay log: {0}")]
    Relay(String),
    #[error("master needs a full sync of this slave ({}): {message}", reason.as_str_name())]
    NeedFullSync {
        reason: pb::FullSyncReason,
        message: String,
    },
    #[error("full sync: {0}")]
    FullSync(String),
    #[error("{0}")]
    Fatal(String),
    #[error("re-pointed to master {0} (Admin.SetMaster)")]
    MasterChanged(String),
}

impl ReconnectReason {
    /// A short stable name (`tern_reconnects_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            ReconnectReason::ConnectFailed(_) => "connect_failed",
            ReconnectReason::LinkLost(_) => "link_lost",
            ReconnectReason::LinkTimeout(_) => "link_timeout",
            ReconnectReason::MasterClosed => "master_closed",
            ReconnectReason::Protocol(_) => "protocol",
            ReconnectReason::Relay(_) => "relay",
            ReconnectReason::NeedFullSync { .. } => "need_full_sync",
            ReconnectReason::FullSync(_) => "full_sync",
            ReconnectReason::Fatal(_) => "fatal",
            ReconnectReason::MasterChanged(_) => "master_changed",
        }
    }
}

/// Events the receiver keeps for the hand-off before it gives up on it (the
/// applier then reads them from the relay log).
const PENDING_EVENTS: usize = 256 * 1024;

/// At most this many messages (batches or not), or about this many bytes of
/// records, that have already arrived are taken together: their batches are
/// appended under one fsync.
const DRAIN_MESSAGES: usize = 64;
const DRAIN_BYTES: usize = 8 << 20;

/// What the link shares with Info.
pub struct LinkStatus {
    inner: Mutex<LinkStatusInner>,
    pub reconnects: AtomicU64,
    pub partial_syncs: AtomicU64,
    pub full_syncs: AtomicU64,
    pub stale_messages: AtomicU64,
    pub duplicates_skipped: Arc<AtomicU64>,
    pub relay_first: AtomicU64,
    pub relay_last: AtomicU64,
    pub relay_durable: AtomicU64,
    pub relay_bytes: AtomicU64,
    pub full_sync: fullsync::Progress,
    /// The node's metrics: like these counters they outlive restarts of
    /// the node (a full sync).
    pub metrics: Arc<tern_common::metrics::Metrics>,
}

#[derive(Clone, Debug)]
pub struct LinkStatusInner {
    pub state: LinkState,
    pub session_id: u64,
    pub last_error: String,
    pub repl_id: Option<ReplId>,
}

impl LinkStatus {
    pub fn new(repl_id: Option<ReplId>) -> Arc<LinkStatus> {
        Arc::new(LinkStatus {
            inner: Mutex::new(LinkStatusInner {
                state: LinkState::NoConnect,
                session_id: 0,
                last_error: String::new(),
                repl_id,
            }),
            reconnects: AtomicU64::new(0),
            partial_syncs: AtomicU64::new(0),
            full_syncs: AtomicU64::new(0),
            stale_messages: AtomicU64::new(0),
            duplicates_skipped: Arc::new(AtomicU64::new(0)),
            relay_first: AtomicU64::new(0),
            relay_last: AtomicU64::new(0),
            relay_durable: AtomicU64::new(0),
            relay_bytes: AtomicU64::new(0),
            full_sync: fullsync::Progress::default(),
            metrics: tern_common::metrics::Metrics::new(),
        })
    }

    pub fn snapshot(&self) -> LinkStatusInner {
        self.inner.lock().expect("link status").clone()
    }

    pub fn set(&self, f: impl FnOnce(&mut LinkStatusInner)) {
        f(&mut self.inner.lock().expect("link status"));
    }

    fn publish_relay(&self, relay: &Binlog) {
        self.relay_first
            .store(relay.first_index(), Ordering::Release);
        self.relay_last.store(relay.last_index(), Ordering::Release);
        self.relay_durable
            .store(relay.durable_index(), Ordering::Release);
        self.relay_bytes
            .store(relay.total_bytes(), Ordering::Release);
    }
}

pub struct Link {
    pub cfg: Config,
    pub slave_id: String,
    pub state: State,
    pub relay: Binlog,
    pub received_tx: watch::Sender<u64>,
    /// Decoded transactions go to the applier once durable ([`crate::applier`]).
    pub handoff: HandOff,
    /// Events appended to the relay log but not handed off yet (not durable,
    /// or the tail of an open transaction), from a Begin on.
    pub pending: Vec<Event>,
    pub applied: watch::Receiver<u64>,
    pub status: Arc<LinkStatus>,
    pub shutdown: CancellationToken,
    /// What this slave serves to its own slaves (cascading): the relay log's
    /// progress and the histories it follows.
    pub downstream: Arc<tern_master::sync::SyncShared>,
    /// The master to follow (`slave.master`, changed by `Admin.SetMaster`):
    /// a change ends the session; the next one, after the barrier, goes there.
    pub master: watch::Receiver<String>,
}

enum SessionEnd {
    Shutdown,
    FullSyncStaged(Staged),
}

/// Why [`Link::run`] returned.
pub enum LinkExit {
    /// The node is shutting down.
    Shutdown,
    /// A full sync is downloaded and verified: the node must close RocksDB and
    /// the relay log and install it ([`crate::fullsync::apply_staged`]).
    FullSyncStaged(Staged),
    /// The node must close and reopen its data (the applier failed).
    Restart(String),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The master's histories from a TrySyncResponse, validated.
fn histories_from_reply(
    current: ReplId,
    list: &[pb::History],
) -> Result<Histories, ReconnectReason> {
    if list.len() > tern_common::history::MAX_ANCESTORS {
        return Err(ReconnectReason::Protocol(format!(
            "TrySyncResponse carries {} histories; at most {} are kept",
            list.len(),
            tern_common::history::MAX_ANCESTORS
        )));
    }
    let ancestors = list
        .iter()
        .map(|h| {
            Ok(HistoryEntry {
                repl_id: h.repl_id.parse().map_err(|e| {
                    ReconnectReason::Protocol(format!("TrySyncResponse.histories: {e}"))
                })?,
                end: h.end_index.into(),
            })
        })
        .collect::<Result<Vec<_>, ReconnectReason>>()?;
    Ok(Histories { current, ancestors })
}

/// A status from the master, with the causes of a transport error (a TLS
/// alert, a refused connection) that its message alone does not say.
fn status_text(s: &tonic::Status) -> String {
    let head = format!("{}: {}", s.code(), s.message());
    tern_common::server::tls::with_sources(head, std::error::Error::source(s))
}

fn slave_msg(msg: pb::slave_message::Msg) -> pb::SlaveMessage {
    pb::SlaveMessage { msg: Some(msg) }
}

impl Link {
    /// Follows the master until shutdown or until a full sync is staged; returns
    /// the relay log for a clean close.
    pub async fn run(mut self) -> (Binlog, LinkExit) {
        self.relay.observe_fsyncs(self.status.metrics.fsync.clone());
        self.publish_relay();
        let mut exit = LinkExit::Shutdown;
        let mut backoff = Duration::from_millis(100);
        let max_backoff = Duration::from_secs(5);
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            if let Err(e) = self.barrier().await {
                // The applier stopped (e.g. a corrupt relay record): restart the
                // node, whose recovery discards the bad relay tail.
                self.fail(LinkState::Error, &e);
                exit = LinkExit::Restart(e.to_string());
                break;
            }
            let started = Instant::now();
            match self.session().await {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::FullSyncStaged(staged)) => {
                    exit = LinkExit::FullSyncStaged(staged);
                    break;
                }
                Err(reason) => {
                    let state = match reason {
                        // A slave ahead of its master, or holding events beyond a
                        // fork of its history, never discards data by itself.
                        ReconnectReason::NeedFullSync {
                            reason: pb::FullSyncReason::AheadOfMaster | pb::FullSyncReason::Diverged,
                            ..
                        } => LinkState::Error,
                        ReconnectReason::NeedFullSync { .. } | ReconnectReason::FullSync(_) => {
                            LinkState::WaitDbSync
                        }
                        ReconnectReason::Fatal(_) => LinkState::Error,
                        _ => LinkState::NoConnect,
                    };
                    self.fail(state, &reason);
                    self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.status.metrics.reconnect(reason.label());
                    if matches!(reason, ReconnectReason::MasterChanged(_)) {
                        // Straight to the barrier and the new master.
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    if matches!(
                        reason,
                        ReconnectReason::NeedFullSync { .. } | ReconnectReason::Fatal(_)
                    ) {
                        backoff = max_backoff;
                    } else if started.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(100);
                    }
                }
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 50);
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                // A new master is tried at once (after the barrier).
                r = self.master.changed() => if r.is_ok() { backoff = Duration::from_millis(100) },
                _ = self.shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(max_backoff);
        }
        self.status.set(|s| s.state = LinkState::NoConnect);
        // Nothing half-received is left behind for the next start.
        let received = *self.received_tx.borrow();
        if self.relay.last_index() > received
            && let Err(e) = self.relay.truncate_after(received)
        {
            tracing::error!(error = %e, "rolling back the relay log to {received}");
        }
        (self.relay, exit)
    }

    /// Publishes the relay log's extent to Info and to this slave's own
    /// sync sessions (which ship up to `received`).
    fn publish_relay(&self) {
        self.status.publish_relay(&self.relay);
        self.downstream.progress.publish_relay(&self.relay);
    }

    fn fail(&self, state: LinkState, reason: &dyn std::fmt::Display) {
        let msg = reason.to_string();
        match state {
            LinkState::Error | LinkState::WaitDbSync => {
                tracing::error!(reason = %msg, "replication stopped")
            }
            _ => tracing::warn!(reason = %msg, "replication link down; reconnecting"),
        }
        self.status.set(|s| {
            s.state = state;
            s.session_id = 0;
            s.last_error = msg;
        });
    }

    /// I4: roll the relay back to a boundary and drain the applier to it.
    async fn barrier(&mut self) -> Result<(), ReconnectReason> {
        let received = *self.received_tx.borrow();
        if self.relay.last_index() > received {
            tracing::info!(
                from = self.relay.last_index(),
                to = received,
                "rolling back a partial transaction at the relay tail"
            );
            tokio::task::block_in_place(|| self.relay.truncate_after(received))
                .map_err(|e| ReconnectReason::Relay(e.to_string()))?;
            self.publish_relay();
        }
        let mut applied = self.applied.clone();
        tokio::select! {
            r = applied.wait_for(|a| *a >= received) => {
                r.map_err(|_| ReconnectReason::Fatal("the applier stopped".into()))?;
            }
            _ = self.shutdown.cancelled() => {}
        }
        Ok(())
    }

    async fn session(&mut self) -> Result<SessionEnd, ReconnectReason> {
        self.cfg.slave.master = self.master.borrow_and_update().clone();
        let index = *self.received_tx.borrow();
        let repl_id = self.status.snapshot().repl_id;
        let span = tracing::info_span!(
            parent: None,
            "sync_session",
            side = "slave",
            slave_id = %self.slave_id,
            master = %self.cfg.slave.master,
            session_id = tracing::field::Empty,
            repl_id = tracing::field::Empty,
            start_index = index,
            outcome = tracing::field::Empty,
        );
        if let Some(id) = repl_id {
            span.record("repl_id", tracing::field::display(id));
        }
        let mut master = self.master.clone();
        let result = tokio::select! {
            r = self.session_inner(index, repl_id, &span).instrument(span.clone()) => r,
            // Dropped at an await point, as when the link is lost: the barrier
            // before the next session rolls the relay log back to `received`.
            Ok(()) = master.changed() => {
                Err(ReconnectReason::MasterChanged(master.borrow_and_update().clone()))
            }
        };
        match &result {
            Ok(SessionEnd::Shutdown) => span.record("outcome", "shutdown"),
            Ok(SessionEnd::FullSyncStaged(s)) => span.record(
                "outcome",
                tracing::field::display(format!("full sync staged at {}", s.index)),
            ),
            Err(e) => span.record("outcome", tracing::field::display(e)),
        };
        result
    }

    async fn session_inner(
        &mut self,
        index: u64,
        repl_id: Option<ReplId>,
        span: &tracing::Span,
    ) -> Result<SessionEnd, ReconnectReason> {
        let cfg = self.cfg.sync.clone();
        self.status.set(|s| s.state = LinkState::TryConnect);
        // With an https:// master: TLS (slave.tls_ca, slave.tls_cert, slave.tls_key).
        let endpoint = tern_common::server::tls::master_endpoint(&self.cfg.slave)
            .map_err(|e| ReconnectReason::Fatal(e.to_string()))?
            .connect_timeout(cfg.link_timeout())
            .tcp_nodelay(true);
        let channel = tokio::select! {
            c = endpoint.connect() => c.map_err(|e| ReconnectReason::ConnectFailed(format!("{e:?}")))?,
            _ = self.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        let mut client = ReplicationClient::new(channel)
            .max_decoding_message_size(tern_common::limits::MAX_MESSAGE_BYTES * 2);
        let (out_tx, out_rx) = mpsc::channel::<pb::SlaveMessage>(256);
        let try_sync = pb::TrySync {
            slave_id: self.slave_id.clone(),
            repl_id: repl_id.map(|r| r.to_string()).unwrap_or_default(),
            index,
            addr: self.cfg.server.listen.clone(),
            // After the barrier applied == received == index, so the state's
            // last seq is that of the transaction ending at `index`.
            seq: if index == 0 { 0 } else { self.state.last_seq() },
        };
        let _ = out_tx
            .send(slave_msg(pb::slave_message::Msg::TrySync(try_sync)))
            .await;
        let mut request = tonic::Request::new(ReceiverStream::new(out_rx));
        tern_common::telemetry::inject_context(span, request.metadata_mut());
        let master_token = self.cfg.slave.master_token.as_ref();
        tern_common::server::auth::insert_bearer(request.metadata_mut(), master_token);
        self.status.set(|s| s.state = LinkState::WaitReply);
        let timeout = cfg.link_timeout();
        let mut inbound = tokio::select! {
            r = tokio::time::timeout(timeout, client.sync(request)) => match r {
                Ok(Ok(resp)) => resp.into_inner(),
                Ok(Err(s)) => return Err(ReconnectReason::LinkLost(status_text(&s))),
                Err(_) => return Err(ReconnectReason::LinkTimeout(timeout)),
            },
            _ = self.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        let reply = tokio::select! {
            r = tokio::time::timeout(timeout, inbound.message()) => match r {
                Ok(Ok(Some(pb::MasterMessage { msg: Some(pb::master_message::Msg::TrySyncResponse(t)) }))) => t,
                Ok(Ok(Some(_))) => return Err(ReconnectReason::Protocol("expected TrySyncResponse".into())),
                Ok(Ok(None)) => return Err(ReconnectReason::MasterClosed),
                Ok(Err(s)) => return Err(ReconnectReason::LinkLost(status_text(&s))),
                Err(_) => return Err(ReconnectReason::LinkTimeout(timeout)),
            },
            _ = self.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        if reply.code != pb::TrySyncCode::Ok as i32 {
            let reason = pb::FullSyncReason::try_from(reply.reason)
                .unwrap_or(pb::FullSyncReason::Unspecified);
            let keeps_data = matches!(
                reason,
                pb::FullSyncReason::AheadOfMaster | pb::FullSyncReason::Diverged
            );
            if keeps_data && !self.cfg.slave.resync_when_ahead {
                return Err(ReconnectReason::NeedFullSync {
                    reason,
                    message: format!(
                        "{}; keeping this slave's data (set slave.resync_when_ahead = true to replace it with the master's)",
                        reply.message
                    ),
                });
            }
            drop(inbound);
            drop(out_tx);
            tracing::info!(reason = reason.as_str_name(), message = %reply.message, "master asks for a full sync");
            self.status.set(|s| s.state = LinkState::WaitDbSync);
            let mut md = tonic::metadata::MetadataMap::new();
            tern_common::telemetry::inject_context(span, &mut md);
            tern_common::server::auth::insert_bearer(&mut md, master_token);
            let fetched = tokio::select! {
                r = fullsync::fetch(&mut client, &self.cfg.server.data_dir, &self.slave_id, &self.status.full_sync, &md) => r,
                _ = self.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            };
            return match fetched {
                Ok(staged) => {
                    self.status.full_syncs.fetch_add(1, Ordering::Relaxed);
                    Ok(SessionEnd::FullSyncStaged(staged))
                }
                Err(e) => Err(ReconnectReason::FullSync(e.to_string())),
            };
        }
        let master_repl: ReplId = reply
            .repl_id
            .parse()
            .map_err(|e| ReconnectReason::Protocol(format!("TrySyncResponse.repl_id: {e}")))?;
        if repl_id != Some(master_repl) {
            // A new slave, or one the master accepted from an ancestor of its
            // current history (I8): from here on this slave follows the master's
            // history. Stored before anything of it is appended, so a crash can
            // never leave new-history events under the old repl id.
            let histories = histories_from_reply(master_repl, &reply.histories)?;
            if let Some(old) = repl_id {
                tracing::info!(old_repl_id = %old, repl_id = %master_repl, index, "the master continues this slave in a newer history");
            }
            let state = self.state.clone();
            tokio::task::block_in_place(|| state.set_histories(&histories))
                .map_err(|e| ReconnectReason::Fatal(format!("storing repl id: {e}")))?;
            // This slave's own slaves follow the new history too (they
            // reconnect and adopt it), before anything of it is appended.
            self.downstream.set_histories(histories);
            self.status.set(|s| s.repl_id = Some(master_repl));
            span.record("repl_id", tracing::field::display(master_repl));
        }
        let session_id = reply.session_id;
        span.record("session_id", session_id);
        let first_ack = pb::BinlogAck {
            session_id,
            first_send: true,
            received_index: index,
            applied_index: *self.applied.borrow(),
            batch_first_index: 0,
            batch_last_index: 0,
        };
        if out_tx
            .send(slave_msg(pb::slave_message::Msg::Ack(first_ack)))
            .await
            .is_err()
        {
            return Err(ReconnectReason::MasterClosed);
        }
        self.status.set(|s| {
            s.state = LinkState::Connected;
            s.session_id = session_id;
        });
        self.status.partial_syncs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session_id, index, "connected to the master");

        // Heartbeats on their own task: never behind apply or disk (I7).
        let hb_stop = CancellationToken::new();
        let hb_guard = hb_stop.clone().drop_guard();
        let hb_tx = out_tx.clone();
        let received_rx = self.received_tx.subscribe();
        let applied_rx = self.applied.clone();
        let period = cfg.heartbeat();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = hb_stop.cancelled() => return,
                }
                let hb = pb::Heartbeat {
                    session_id,
                    now_ms: now_ms(),
                    index: *received_rx.borrow(),
                    applied_index: *applied_rx.borrow(),
                };
                if hb_tx
                    .try_send(slave_msg(pb::slave_message::Msg::Heartbeat(hb)))
                    .is_err()
                    && hb_tx.is_closed()
                {
                    return;
                }
            }
        });

        let mut parser = BoundaryParser::new(index, Some(self.state.last_seq()));
        // The session starts at a boundary: the hand-off starts with it.
        self.pending.clear();
        let mut last_heard = Instant::now();
        let mut check = tokio::time::interval(cfg.heartbeat());
        let durability_period = self.relay.durability().tick_interval();
        let mut durability =
            tokio::time::interval(durability_period.unwrap_or(Duration::from_secs(3600)));
        durability.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                m = inbound.message() => {
                    last_heard = Instant::now();
                    // This message, and the batches that arrived behind it
                    // while the last ones were fsynced: appended together and
                    // fsynced once.
                    let (batches, mut end) = self.take_arrived(m, &mut inbound, session_id);
                    if !batches.is_empty() {
                        let (acks, bad) = tokio::task::block_in_place(|| self.receive(&batches, &mut parser))?;
                        for ack in acks {
                            if out_tx.send(slave_msg(pb::slave_message::Msg::Ack(ack))).await.is_err() {
                                end = Some(ReconnectReason::MasterClosed);
                                break;
                            }
                        }
                        if let Some(e) = bad {
                            end = Some(e);
                        }
                    }
                    if let Some(e) = end {
                        break Err(e);
                    }
                }
                _ = check.tick() => {
                    if last_heard.elapsed() > timeout {
                        break Err(ReconnectReason::LinkTimeout(timeout));
                    }
                }
                _ = durability.tick(), if durability_period.is_some() => {
                    tokio::task::block_in_place(|| self.durability_tick())?;
                }
                _ = self.shutdown.cancelled() => break Ok(SessionEnd::Shutdown),
            }
        };
        drop(hb_guard);
        result
    }

    /// `received` = the last Commit boundary that counts as durable in the
    /// relay log under its fsync policy (I3; see [`tern_common::durability`]).
    /// Returns it.
    /// The transactions it newly covers are handed to the applier first (so
    /// the applier, woken by the move, finds them queued).
    fn advance_received(&mut self) -> u64 {
        let received = self.relay.received_index();
        let n = self.pending.partition_point(|e| e.index <= received);
        if n > 0 {
            let events: Vec<Event> = self.pending.drain(..n).collect();
            self.handoff.offer(Chunk {
                first: events[0].index,
                last: events[n - 1].index,
                events,
            });
        }
        let moved = self.received_tx.send_if_modified(|r| {
            let changed = *r != received;
            *r = received;
            changed
        });
        if moved {
            // The callers published the relay log (and so this index) already.
            self.downstream.progress.record_commit(received);
        }
        received
    }

    /// The fsync policy's timer (`everysec`): what was appended becomes durable,
    /// and `received` advances, even when no batch arrives; the heartbeat
    /// reports it.
    fn durability_tick(&mut self) -> Result<(), ReconnectReason> {
        if self
            .relay
            .tick()
            .map_err(|e| ReconnectReason::Relay(e.to_string()))?
        {
            self.publish_relay();
            self.advance_received();
        }
        Ok(())
    }

    /// The batches of `first` and of the messages that have already arrived
    /// behind it: at most [`DRAIN_MESSAGES`] messages of any kind (so a flood
    /// of heartbeats cannot keep the receive task from yielding) or about
    /// [`DRAIN_BYTES`] of records. Stops at a message that ends the session,
    /// returning why with the batches before it.
    fn take_arrived(
        &self,
        first: Result<Option<pb::MasterMessage>, tonic::Status>,
        inbound: &mut tonic::Streaming<pb::MasterMessage>,
        session_id: u64,
    ) -> (Vec<pb::BinlogBatch>, Option<ReconnectReason>) {
        let mut batches = Vec::new();
        let mut bytes = 0;
        let mut m = first;
        for taken in 1.. {
            match self.inbound_step(m, session_id) {
                Step::Batch(b) => {
                    bytes += b.records.len();
                    batches.push(b);
                }
                Step::Skip => {}
                Step::End(e) => return (batches, Some(e)),
            }
            if taken >= DRAIN_MESSAGES || bytes >= DRAIN_BYTES {
                break;
            }
            match ready_message(inbound) {
                Some(next) => m = next,
                None => break,
            }
        }
        (batches, None)
    }

    /// What one message of the stream means for the receive loop.
    fn inbound_step(
        &self,
        m: Result<Option<pb::MasterMessage>, tonic::Status>,
        session_id: u64,
    ) -> Step {
        match m {
            Ok(Some(pb::MasterMessage {
                msg: Some(pb::master_message::Msg::Batch(b)),
            })) => {
                if b.session_id != session_id {
                    self.status.stale_messages.fetch_add(1, Ordering::Relaxed);
                    return Step::Skip;
                }
                Step::Batch(b)
            }
            Ok(Some(pb::MasterMessage {
                msg: Some(pb::master_message::Msg::Heartbeat(h)),
            })) => {
                if h.session_id != session_id {
                    self.status.stale_messages.fetch_add(1, Ordering::Relaxed);
                }
                Step::Skip
            }
            Ok(Some(_)) => Step::End(ReconnectReason::Protocol(
                "unexpected message while streaming".into(),
            )),
            Ok(None) => Step::End(ReconnectReason::MasterClosed),
            Err(s) => Step::End(ReconnectReason::LinkLost(status_text(&s))),
        }
    }

    /// Checks batches received together, appends their bytes unchanged,
    /// fsyncs once under the relay log's policy, advances `received` to the
    /// last Commit boundary that is durable and returns one ack per batch.
    /// Each reports `received` up to the last boundary within its own batch
    /// (an ack's `received` never passes its batch's end). A batch that fails
    /// its checks ends the session (the error returned with the acks of the
    /// batches before it).
    fn receive(
        &mut self,
        batches: &[pb::BinlogBatch],
        parser: &mut BoundaryParser,
    ) -> Result<(Vec<pb::BinlogAck>, Option<ReconnectReason>), ReconnectReason> {
        let mut appended = false;
        // The last Commit boundary at the end of each batch.
        let mut ends = Vec::with_capacity(batches.len());
        let mut bad = None;
        for b in batches {
            match self.append_batch(b, parser) {
                Ok(a) => appended |= a,
                Err(e) => {
                    // The batches before it are kept (made durable and
                    // acked) as if it had come alone.
                    bad = Some(e);
                    break;
                }
            }
            ends.push(parser.last_boundary());
        }
        if appended {
            // The relay log's durability policy decides whether to fsync now.
            self.relay
                .sync_if_due()
                .map_err(|e| ReconnectReason::Relay(e.to_string()))?;
            self.publish_relay();
        }
        // (A batch that failed may have fed the parser part of itself.)
        debug_assert!(bad.is_some() || self.relay.last_boundary() == parser.last_boundary());
        let received = self.advance_received();
        let applied = *self.applied.borrow();
        let acks = batches
            .iter()
            .zip(ends)
            .map(|(b, end)| {
                // `end` passes the batch's end only for a batch that was
                // all duplicates.
                let received = received.min(end).min(b.last_index);
                pb::BinlogAck {
                    session_id: b.session_id,
                    first_send: false,
                    received_index: received,
                    applied_index: applied.min(received),
                    batch_first_index: b.first_index,
                    batch_last_index: b.last_index,
                }
            })
            .collect();
        Ok((acks, bad))
    }

    /// Checks one batch and appends its new records' bytes unchanged (not
    /// fsynced). Returns whether it appended anything.
    fn append_batch(
        &mut self,
        b: &pb::BinlogBatch,
        parser: &mut BoundaryParser,
    ) -> Result<bool, ReconnectReason> {
        let proto = |m: String| ReconnectReason::Protocol(m);
        if b.first_index == 0 {
            return Err(proto("batch starts at index 0; indexes start at 1".into()));
        }
        if b.last_index < b.first_index {
            return Err(proto(format!(
                "batch [{}, {}] is empty",
                b.first_index, b.last_index
            )));
        }
        let next = self.relay.next_index();
        if b.first_index > next {
            return Err(proto(format!(
                "batch starts at {} but the relay log continues at {next}",
                b.first_index
            )));
        }
        let mut expected = b.first_index;
        let mut skip_bytes = 0usize;
        let mut offset = 0usize;
        // The hand-off's events slice a copy of the batch: slices of the
        // received buffer share one reference count with the messages still
        // being decoded from it, which the applier, dropping them on its own
        // thread, fought this task for (10 % of a slave's samples at 16
        // writes per request; 6 % with the copy).
        for item in BytesRecords::new(bytes::Bytes::copy_from_slice(&b.records)) {
            let (ev, raw) = item
                .map_err(|e| proto(format!("batch [{}, {}]: {e}", b.first_index, b.last_index)))?;
            if ev.index != expected {
                return Err(proto(format!(
                    "batch record has index {} where {expected} was expected",
                    ev.index
                )));
            }
            expected += 1;
            offset += raw.len();
            if ev.index < next {
                // Already in the relay log: a duplicate, never appended twice (I5).
                self.status
                    .duplicates_skipped
                    .fetch_add(1, Ordering::Relaxed);
                skip_bytes = offset;
                continue;
            }
            parser
                .feed(&ev)
                .map_err(|e| proto(format!("boundary parser: {e}")))?;
            // Kept for the hand-off, from a Begin on (after the hand-off gave
            // up, it resumes at the next transaction).
            if !self.pending.is_empty() || matches!(ev.kind, EventKind::Begin { .. }) {
                self.pending.push(ev);
            }
        }
        if self.pending.len() > PENDING_EVENTS {
            // Not made durable for a long time: the applier will read these
            // from the relay log.
            self.pending.clear();
        }
        if offset != b.records.len() || Some(expected) != b.last_index.checked_add(1) {
            return Err(proto(format!(
                "batch claims [{}, {}] but holds records up to {}",
                b.first_index,
                b.last_index,
                expected - 1
            )));
        }
        if b.last_index < next {
            return Ok(false);
        }
        let at_boundary = matches!(parser.state(), ParserState::Outside);
        self.relay
            .append(&b.records[skip_bytes..], next, b.last_index, at_boundary)
            .map_err(|e| ReconnectReason::Relay(e.to_string()))?;
        Ok(true)
    }
}

/// One message of the master's stream, for the receive loop.
enum Step {
    Batch(pb::BinlogBatch),
    Skip,
    End(ReconnectReason),
}

/// The stream's next message if it has already arrived (decoded from what
/// the connection has buffered), without waiting.
fn ready_message(
    inbound: &mut tonic::Streaming<pb::MasterMessage>,
) -> Option<Result<Option<pb::MasterMessage>, tonic::Status>> {
    use tokio_stream::Stream;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(inbound).poll_next(&mut cx) {
        std::task::Poll::Ready(m) => Some(m.transpose()),
        std::task::Poll::Pending => None,
    }
}
