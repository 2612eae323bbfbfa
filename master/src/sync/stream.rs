//! The streaming half of a sync session, after the handshake: two halves under
//! one `select!` with the master's shutdown, the first to end ends the session.
//!
//! - [`Sender`]: reads the binlog up to what the committer published as
//!   shippable and sends `BinlogBatch`es while the window has room; sends a
//!   heartbeat every `sync.heartbeat_ms`.
//! - [`ReplyReader`]: reads the slave's acks (each must match the window
//!   head, and slides it) and heartbeats, moves the session's pin with what
//!   the slave has received, and ends the session when the slave says
//!   nothing for `sync.link_timeout_ms`.
//!
//! They share the window through [`Flow`]: the reader wakes the sender when an
//! ack makes room. A message carrying another session's id is ignored and
//! counted (`stale_messages`); it never touches the window.

use std::sync::Mutex;
use std::sync::atomic::Ordering;

use tern_common::binlog::BinlogReader;
use tern_common::proto::replication::v1 as pb;
use tern_common::window::{InFlight, SyncWindow};
use tokio::sync::{Notify, watch};
use tonic::{Status, Streaming};

use super::handshake::Accepted;
use super::{Outbound, Outcome, SyncShared, Unsent, master_msg, now_ms, send_bounded};
use crate::pins::PinGuard;

/// The window shared by the two halves of one session.
struct Flow {
    state: Mutex<FlowState>,
    /// Signalled by the reader when an ack frees room in the window.
    room: Notify,
}

struct FlowState {
    window: SyncWindow,
    /// Last index sent to the slave (the TrySync index before any batch).
    sent: u64,
}

impl Flow {
    fn state(&self) -> std::sync::MutexGuard<'_, FlowState> {
        // Only this session's two halves take the lock, for a field update.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Streams the binlog after `accepted.index` until the slave goes, the link
/// times out, a protocol error, or shutdown.
pub(super) async fn stream(
    shared: &SyncShared,
    inbound: Streaming<pb::SlaveMessage>,
    tx: &Outbound,
    accepted: Accepted,
) -> Result<Outcome, Status> {
    let cfg = &shared.cfg;
    let flow = Flow {
        state: Mutex::new(FlowState {
            window: SyncWindow::new(cfg.window_batches, cfg.window_bytes),
            sent: accepted.index,
        }),
        room: Notify::new(),
    };
    let mut sender = Sender {
        shared,
        tx,
        flow: &flow,
        session_id: accepted.session_id,
        reader: shared.new_reader(),
        need_seek: true,
        next: accepted.index + 1,
        shippable: shared.progress.shippable.clone(),
    };
    let mut reader = ReplyReader {
        shared,
        inbound,
        flow: &flow,
        slave_id: accepted.slave_id,
        session_id: accepted.session_id,
        received: accepted.index,
        pin: accepted.pin,
    };
    tokio::select! {
        r = sender.run() => r,
        r = reader.run() => r,
        _ = shared.shutdown.cancelled() => Ok(Outcome::Shutdown),
    }
}

/// What one [`Sender::send_batch`] did.
enum Step {
    Sent,
    /// Nothing readable up to the shippable index yet.
    Idle,
    End(Outcome),
}

/// Sends batches under the window, and heartbeats.
struct Sender<'a> {
    shared: &'a SyncShared,
    tx: &'a Outbound,
    flow: &'a Flow,
    session_id: u64,
    reader: BinlogReader,
    need_seek: bool,
    /// Next index to send.
    next: u64,
    shippable: watch::Receiver<u64>,
}

impl Sender<'_> {
    async fn run(&mut self) -> Result<Outcome, Status> {
        let cfg = &self.shared.cfg;
        let mut heartbeat = tokio::time::interval(cfg.heartbeat());
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = Vec::with_capacity(cfg.batch_bytes + 4096);
        loop {
            let upto = *self.shippable.borrow_and_update();
            while self.flow.state().window.has_room() && self.next <= upto {
                match self.send_batch(upto, &mut buf).await? {
                    Step::Sent => {}
                    Step::Idle => break,
                    Step::End(outcome) => return Ok(outcome),
                }
            }
            tokio::select! {
                r = self.shippable.changed() => {
                    if r.is_err() {
                        return Ok(Outcome::Shutdown);
                    }
                }
                _ = self.flow.room.notified() => {}
                _ = heartbeat.tick() => {
                    let hb = pb::Heartbeat {
                        session_id: self.session_id,
                        now_ms: now_ms(),
                        index: *self.shippable.borrow(),
                        applied_index: 0,
                    };
                    // Never wait on a slave that stopped reading: the link timeout ends it.
                    let _ = self.tx.try_send(master_msg(pb::master_message::Msg::Heartbeat(hb)));
                }
            }
        }
    }

    /// Reads and sends one batch of events from `next`, at most up to `upto`.
    async fn send_batch(&mut self, upto: u64, buf: &mut Vec<u8>) -> Result<Step, Status> {
        let cfg = &self.shared.cfg;
        buf.clear();
        let (next, need_seek, reader) = (self.next, self.need_seek, &mut self.reader);
        let read = tokio::task::block_in_place(|| {
            if need_seek {
                reader.seek(next)?;
            }
            reader.read_batch(upto, cfg.batch_bytes, buf)
        });
        self.need_seek = false;
        let (f, l) = match read {
            Ok(Some(r)) => r,
            // Nothing readable yet: wait for the next shippable index.
            Ok(None) => return Ok(Step::Idle),
            Err(e) => {
                return Err(Status::internal(format!(
                    "reading the binlog at {next}: {e}"
                )));
            }
        };
        {
            let mut st = self.flow.state();
            st.window.push(InFlight {
                first_index: f,
                last_index: l,
                bytes: buf.len(),
            });
            st.sent = l;
        }
        self.next = l + 1;
        let batch = pb::BinlogBatch {
            session_id: self.session_id,
            first_index: f,
            last_index: l,
            records: bytes::Bytes::copy_from_slice(buf),
        };
        let msg = master_msg(pb::master_message::Msg::Batch(batch));
        Ok(match send_bounded(self.shared, self.tx, msg).await {
            Ok(()) => Step::Sent,
            Err(Unsent::Closed) => Step::End(Outcome::SlaveClosed),
            Err(Unsent::Timeout) => Step::End(Outcome::LinkTimeout),
            Err(Unsent::Shutdown) => Step::End(Outcome::Shutdown),
        })
    }
}

/// Reads the slave's acks and heartbeats.
struct ReplyReader<'a> {
    shared: &'a SyncShared,
    inbound: Streaming<pb::SlaveMessage>,
    flow: &'a Flow,
    slave_id: String,
    session_id: u64,
    /// What this session's slave has received (its pin).
    received: u64,
    pin: PinGuard,
}

impl ReplyReader<'_> {
    async fn run(&mut self) -> Result<Outcome, Status> {
        let link_timeout = self.shared.cfg.link_timeout();
        loop {
            let m = match tokio::time::timeout(link_timeout, self.inbound.message()).await {
                Err(_) => return Ok(Outcome::LinkTimeout),
                Ok(Ok(None)) => return Ok(Outcome::SlaveClosed),
                Ok(Err(s)) => return Ok(Outcome::LinkLost(s.message().to_string())),
                Ok(Ok(Some(m))) => m,
            };
            self.handle(m)?;
        }
    }

    fn handle(&mut self, m: pb::SlaveMessage) -> Result<(), Status> {
        use pb::slave_message::Msg;
        let shared = self.shared;
        match m.msg {
            Some(Msg::Ack(a)) => {
                if a.session_id != self.session_id {
                    shared.stale_messages.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                if a.first_send {
                    return Err(Status::failed_precondition(
                        "a second first-send ack in one session",
                    ));
                }
                self.flow
                    .state()
                    .window
                    .ack(a.batch_first_index, a.batch_last_index)
                    .map_err(|e| Status::out_of_range(e.to_string()))?;
                self.flow.room.notify_one();
                if a.received_index > a.batch_last_index || a.applied_index > a.received_index {
                    return Err(Status::out_of_range(format!(
                        "ack positions received {} applied {} are beyond the acked batch end {}",
                        a.received_index, a.applied_index, a.batch_last_index
                    )));
                }
                shared
                    .registry
                    .update_session(&self.slave_id, self.session_id, |e| {
                        e.received = a.received_index;
                        e.applied = a.applied_index;
                    });
                self.received = a.received_index;
                self.pin.update(self.received);
            }
            Some(Msg::Heartbeat(h)) => {
                if h.session_id != self.session_id {
                    shared.stale_messages.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                let sent = self.flow.state().sent;
                if h.index > sent || h.applied_index > h.index {
                    return Err(Status::out_of_range(format!(
                        "heartbeat positions received {} applied {} are beyond what was sent ({sent})",
                        h.index, h.applied_index
                    )));
                }
                shared
                    .registry
                    .update_session(&self.slave_id, self.session_id, |e| {
                        e.received = e.received.max(h.index);
                        e.applied = e.applied.max(h.applied_index);
                    });
                self.received = self.received.max(h.index);
                self.pin.update(self.received);
            }
            Some(Msg::TrySync(_)) => {
                return Err(Status::failed_precondition(
                    "TrySync sent twice on one stream",
                ));
            }
            None => return Err(Status::invalid_argument("empty SlaveMessage")),
        }
        Ok(())
    }
}
