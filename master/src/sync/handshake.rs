//! The start of a sync session: TrySync validation and the first-send ack.
//!
//! ```text
//! slave: TrySync(repl_id, index, seq) ─▶ validate ─▶ TrySyncResponse(Ok, session_id)
//! slave: BinlogAck(first_send, index) ─▶ must equal the validated index (F2)
//! ```
//!
//! A position is accepted only when it is a prefix of this master's log (I8)
//! and a transaction boundary it still stores. The session's pin is taken
//! before validating, so either it holds the binlog or the check sees it
//! purged; it belongs to this session alone (see [`crate::pins`]), and a
//! refused TrySync drops it and leaves no row in the registry.

use std::sync::atomic::Ordering;

use tern_common::history::{Histories, HistoryError};
use tern_common::position::Position;
use tern_common::proto::replication::v1 as pb;
use tern_common::record::EventKind;
use tern_common::status::{Inbound, inbound};
use tern_common::wire::{Ack, SlaveMsg, TrySyncRequest};
use tonic::{Status, Streaming};

use super::{Outbound, Outcome, SyncShared, master_msg};
use crate::pins::{PinGuard, SLAVE_PREFIX};

impl SyncShared {
    /// Decides whether the master can continue a slave from `(repl_id, index)`
    /// with `seq` the slave's transaction ending there: the position must be a
    /// prefix of this master's log (I8: its current history, or an ancestor at
    /// or before where it ended), a transaction boundary still stored (or just
    /// purged up to), and the master's Commit at `index` must carry the same seq.
    /// A slave without a history (empty repl id) always gets a full sync.
    fn check_position(
        &self,
        histories: &Histories,
        position: Option<Position>,
        seq: u64,
    ) -> Result<(), (pb::FullSyncReason, String)> {
        use pb::FullSyncReason as R;
        let Some(position) = position else {
            return Err((R::UnknownReplId, "new slave: full sync".to_string()));
        };
        let index = position.index.get();
        match histories.check(position) {
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
                    EventKind::Put { .. }
                    | EventKind::Delete { .. }
                    | EventKind::Commit { .. }
                    | EventKind::VerifyPoint
                    | EventKind::VerifyDigest { .. },
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
    fn history_list(&self, h: &Histories) -> Vec<pb::History> {
        h.replication_list()
    }
}

/// A session the handshake accepted.
pub(super) struct Accepted {
    pub slave_id: String,
    pub session_id: u64,
    /// The validated TrySync index, confirmed by the first-send ack.
    pub index: u64,
    /// The session's binlog pin, at `index`.
    pub pin: PinGuard,
    /// [`SyncShared`]'s history generation the session was accepted in.
    pub generation: u64,
}

/// The next message of the stream, checked. `Err` ends the call with that
/// status (a message that is not valid, over the size limit, undecodable);
/// `Ok(Err)` ends the session without one.
pub(super) async fn recv(
    shared: &SyncShared,
    inbound_stream: &mut Streaming<pb::SlaveMessage>,
) -> Result<Result<SlaveMsg, Outcome>, Status> {
    tokio::select! {
        m = inbound_stream.message() => checked(m),
        _ = tokio::time::sleep(shared.cfg.link_timeout()) => Ok(Err(Outcome::LinkTimeout)),
        _ = shared.shutdown.cancelled() => Ok(Err(Outcome::Shutdown)),
    }
}

/// Converts what `Streaming::message` gave (see [`recv`]).
pub(super) fn checked(
    m: Result<Option<pb::SlaveMessage>, Status>,
) -> Result<Result<SlaveMsg, Outcome>, Status> {
    match m {
        Ok(Some(m)) => Ok(Ok(SlaveMsg::try_from(m)?)),
        Ok(None) => Ok(Err(Outcome::SlaveClosed)),
        Err(s) => match inbound(s) {
            Inbound::Refused(status) => Err(status),
            Inbound::Gone(s) => Ok(Err(Outcome::LinkLost(s.message().to_string()))),
        },
    }
}

/// Runs the handshake up to and including the first-send ack. `slave_id_out`
/// and `session_id_out` are set once the session is accepted, so the caller
/// can mark the slave's row when the session ends however it ends.
pub(super) async fn handshake(
    shared: &SyncShared,
    inbound_stream: &mut Streaming<pb::SlaveMessage>,
    tx: &Outbound,
    slave_id_out: &mut String,
    session_id_out: &mut u64,
) -> Result<Result<Accepted, Outcome>, Status> {
    let span = tracing::Span::current();
    // 1. TrySync.
    let try_sync: TrySyncRequest = match recv(shared, inbound_stream).await? {
        Ok(SlaveMsg::TrySync(t)) => t,
        Ok(_) => {
            return Err(Status::invalid_argument(
                "the first message of a Sync stream must be TrySync",
            ));
        }
        Err(o) => return Ok(Err(o)),
    };
    let slave_id = try_sync.slave_id.clone();
    let index = try_sync.index();
    span.record("slave_id", slave_id.as_str());
    span.record("start_index", index);
    // Pin before validating: retention publishes the new first index before it
    // lets go of the pins, so either this pin holds the binlog or the check
    // below sees it purged. The pin is this session's own: it never replaces
    // another session's of the same slave.
    let pin = shared.pins.pin(format!("{SLAVE_PREFIX}{slave_id}"), index);
    // The session follows the histories as they are now; if they change (a
    // slave serving its own slaves adopts its master's), it ends.
    let generation = shared.generation();
    let histories = shared.histories();
    let first = shared.progress.first_index.load(Ordering::Acquire);
    let last = shared.progress.last_index.load(Ordering::Acquire);
    if let Err((reason, message)) =
        shared.check_position(&histories, try_sync.position, try_sync.seq)
    {
        drop(pin);
        tracing::info!(?reason, %message, "TrySync: slave needs a full sync");
        if let Some(m) = shared.metrics.get() {
            m.partial_resync_denied(reason.as_str_name());
        }
        shared.registry.update_if_gone(&slave_id, |e| {
            e.state = "need_full_sync";
        });
        let resp = pb::TrySyncResponse {
            code: pb::TrySyncCode::NeedFullSync as i32,
            reason: reason as i32,
            message,
            repl_id: histories.current.to_string(),
            first_index: first,
            last_index: last,
            session_id: 0,
            histories: shared.history_list(&histories),
        };
        let _ = tx
            .send(master_msg(pb::master_message::Msg::TrySyncResponse(resp)))
            .await;
        return Ok(Err(Outcome::NeedFullSync(reason)));
    }
    // Its own pin now holds the binlog: a snapshot it came from may go.
    shared.snapshots.slave_connected(&slave_id);
    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    *slave_id_out = slave_id.clone();
    *session_id_out = session_id;
    span.record("session_id", session_id);
    shared.registry.connect(&slave_id, |e| {
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
        repl_id: histories.current.to_string(),
        first_index: first,
        last_index: last,
        session_id,
        histories: shared.history_list(&histories),
    };
    if tx
        .send(master_msg(pb::master_message::Msg::TrySyncResponse(resp)))
        .await
        .is_err()
    {
        return Ok(Err(Outcome::SlaveClosed));
    }
    // 2. The first-send ack must carry exactly the validated index (F2).
    loop {
        match recv(shared, inbound_stream).await? {
            Err(o) => return Ok(Err(o)),
            Ok(SlaveMsg::Ack(a)) if a.session_id() != session_id => {
                shared.stale_messages.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(stale = a.session_id(), "ignoring ack of another session");
            }
            Ok(SlaveMsg::Ack(Ack::FirstSend { index: got, .. })) => {
                if got != index {
                    return Err(Status::failed_precondition(format!(
                        "first-send ack index {got} is not the TrySync index {index}"
                    )));
                }
                break;
            }
            Ok(SlaveMsg::Ack(Ack::Batch { .. })) => {
                return Err(Status::failed_precondition(
                    "expected the first-send BinlogAck before any other ack",
                ));
            }
            Ok(SlaveMsg::Heartbeat(_)) => {}
            Ok(SlaveMsg::TrySync(_)) => {
                return Err(Status::failed_precondition(
                    "TrySync sent twice on one stream",
                ));
            }
        }
    }
    shared.partial_syncs.fetch_add(1, Ordering::Relaxed);
    shared
        .registry
        .update_session(&slave_id, session_id, |e| e.state = "streaming");
    tracing::info!(index, "slave connected; streaming binlog");
    Ok(Ok(Accepted {
        slave_id,
        session_id,
        index,
        pin,
        generation,
    }))
}
