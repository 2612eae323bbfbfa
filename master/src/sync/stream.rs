//! The streaming half of a sync session, after the handshake: two halves under
//! one `select!` with the master's shutdown, the first to end ends the session.
//!
//! - [`Sender`]: sends `BinlogBatch`es up to what the committer published as
//!   shippable while the window has room, from the in-memory tail
//!   ([`crate::tail`]) when its next index is there, else from the segment
//!   files (read on a blocking thread, off the async workers); sends a
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
use std::time::Instant;

use bytes::Bytes;
use tern_common::binlog::BinlogReader;
use tern_common::proto::replication::v1 as pb;
use tern_common::window::{InFlight, SyncWindow};
use tern_common::wire::{Ack, SlaveMsg};
use tokio::sync::{Notify, watch};
use tonic::{Status, Streaming};

use super::handshake::{Accepted, checked};
use super::{Outbound, Outcome, SyncShared, Unsent, master_msg, now_ms, send_bounded};
use crate::pins::PinGuard;
use crate::tail::Batch;

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
    /// When the slave last acknowledged a batch (the session's start before).
    last_ack: Instant,
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
            last_ack: Instant::now(),
        }),
        room: Notify::new(),
    };
    let mut sender = Sender {
        shared,
        tx,
        flow: &flow,
        session_id: accepted.session_id,
        reader: None,
        reader_at: None,
        next: accepted.index + 1,
        shippable: shared.progress.shippable.clone(),
        generation: accepted.generation,
        history: shared.generation.subscribe(),
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
    /// Reads the segment files when the next index is older than the tail
    /// (made on first use; `None` too while a read has it on a blocking thread).
    reader: Option<BinlogReader>,
    /// Index the reader is positioned at (`None`: it must seek first).
    reader_at: Option<u64>,
    /// Next index to send.
    next: u64,
    shippable: watch::Receiver<u64>,
    /// The history generation the session was accepted in.
    generation: u64,
    /// The current generation: a change ends the session, idle or not.
    history: watch::Receiver<u64>,
}

impl Sender<'_> {
    async fn run(&mut self) -> Result<Outcome, Status> {
        let cfg = &self.shared.cfg;
        let mut heartbeat = tokio::time::interval(cfg.heartbeat());
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when the window is full (None: it has room).
        let mut full_since: Option<Instant> = None;
        loop {
            let now = *self.history.borrow_and_update();
            if now != self.generation {
                return Ok(Outcome::HistoryChanged);
            }
            let upto = *self.shippable.borrow_and_update();
            while self.flow.state().window.has_room() && self.next <= upto {
                match self.send_batch(upto).await? {
                    Step::Sent => {}
                    Step::Idle => break,
                    Step::End(outcome) => return Ok(outcome),
                }
            }
            // A window that stays full with no ack for a link timeout is a
            // stalled slave (or one that only sends heartbeats): drop it and
            // its pin, whatever else it sends.
            let (full, last_ack) = {
                let st = self.flow.state();
                (!st.window.has_room(), st.last_ack)
            };
            let stall_deadline = if full {
                let since = *full_since.get_or_insert_with(Instant::now);
                Some(since.max(last_ack) + cfg.link_timeout())
            } else {
                full_since = None;
                None
            };
            if stall_deadline.is_some_and(|d| d <= Instant::now()) {
                return Ok(Outcome::Stalled);
            }
            let stalled = async {
                match stall_deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stalled => {}
                r = self.shippable.changed() => {
                    if r.is_err() {
                        return Ok(Outcome::Shutdown);
                    }
                }
                _ = self.flow.room.notified() => {}
                _ = self.history.changed() => {}
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

    /// Sends one batch of events from `next`, at most up to `upto`: from the
    /// in-memory tail when `next` is there, else from the segment files.
    async fn send_batch(&mut self, upto: u64) -> Result<Step, Status> {
        let cfg = &self.shared.cfg;
        let batch = match self
            .shared
            .progress
            .tail
            .read(self.next, upto, cfg.batch_bytes)
        {
            Some(b) => {
                self.shared
                    .batches_from_memory
                    .fetch_add(1, Ordering::Relaxed);
                b
            }
            None => match self.read_files(upto).await? {
                Some(b) => {
                    self.shared
                        .batches_from_files
                        .fetch_add(1, Ordering::Relaxed);
                    b
                }
                // Nothing readable yet: wait for the next shippable index.
                None => return Ok(Step::Idle),
            },
        };
        // Read after it was appended, so after any history change that came
        // before it: events of a newer history never go out under an older one.
        if self.shared.generation() != self.generation {
            return Ok(Step::End(Outcome::HistoryChanged));
        }
        let (f, l) = (batch.first, batch.last);
        {
            let mut st = self.flow.state();
            st.window.push(InFlight {
                first_index: f,
                last_index: l,
                bytes: batch.records.len(),
            });
            st.sent = l;
        }
        self.next = l + 1;
        let batch = pb::BinlogBatch {
            session_id: self.session_id,
            first_index: f,
            last_index: l,
            records: batch.records,
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

impl Sender<'_> {
    /// Reads the batch from `next` from the segment files, on a blocking
    /// thread (the reader moves there and back).
    async fn read_files(&mut self, upto: u64) -> Result<Option<Batch>, Status> {
        let next = self.next;
        let max_bytes = self.shared.cfg.batch_bytes;
        let mut reader = self
            .reader
            .take()
            .unwrap_or_else(|| self.shared.new_reader());
        let seek = self.reader_at != Some(next);
        let (reader, read) = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(max_bytes + 4096);
            let read = (|| {
                if seek {
                    reader.seek(next)?;
                }
                reader.read_batch(upto, max_bytes, &mut buf)
            })();
            (reader, read.map(|r| r.map(|(f, l)| (f, l, buf))))
        })
        .await
        .map_err(|e| Status::internal(format!("reading the binlog at {next}: {e}")))?;
        self.reader = Some(reader);
        match read {
            Ok(Some((first, last, buf))) => {
                self.reader_at = Some(last + 1);
                Ok(Some(Batch {
                    first,
                    last,
                    records: Bytes::from(buf),
                }))
            }
            Ok(None) => {
                self.reader_at = Some(next);
                Ok(None)
            }
            Err(e) => {
                self.reader_at = None;
                Err(Status::internal(format!(
                    "reading the binlog at {next}: {e}"
                )))
            }
        }
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
        // The validated TrySync index is durable in the slave's relay log.
        self.report_received();
        loop {
            let m = match tokio::time::timeout(link_timeout, self.inbound.message()).await {
                Err(_) => return Ok(Outcome::LinkTimeout),
                Ok(m) => match checked(m)? {
                    Ok(m) => m,
                    Err(outcome) => return Ok(outcome),
                },
            };
            self.handle(m)?;
        }
    }

    fn handle(&mut self, m: SlaveMsg) -> Result<(), Status> {
        let shared = self.shared;
        match m {
            SlaveMsg::Ack(a) if a.session_id() != self.session_id => {
                shared.stale_messages.fetch_add(1, Ordering::Relaxed);
            }
            SlaveMsg::Ack(Ack::FirstSend { .. }) => {
                return Err(Status::failed_precondition(
                    "a second first-send ack in one session",
                ));
            }
            SlaveMsg::Ack(Ack::Batch {
                first,
                last,
                received,
                applied,
                ..
            }) => {
                {
                    let mut st = self.flow.state();
                    st.window
                        .ack(first, last)
                        .map_err(|e| Status::out_of_range(e.to_string()))?;
                    st.last_ack = Instant::now();
                }
                self.flow.room.notify_one();
                // Monotone, as for heartbeats: the acks of batches a slave
                // received together may report less than a heartbeat did.
                shared
                    .registry
                    .update_session(&self.slave_id, self.session_id, |e| {
                        e.received = e.received.max(received);
                        e.applied = e.applied.max(applied);
                    });
                self.received = self.received.max(received);
                self.pin.update(self.received);
                self.report_received();
            }
            SlaveMsg::Heartbeat(h) if h.session_id != self.session_id => {
                shared.stale_messages.fetch_add(1, Ordering::Relaxed);
            }
            SlaveMsg::Heartbeat(h) => {
                let sent = self.flow.state().sent;
                if h.received > sent {
                    return Err(Status::out_of_range(format!(
                        "heartbeat positions received {} applied {} are beyond what was sent ({sent})",
                        h.received, h.applied
                    )));
                }
                shared
                    .registry
                    .update_session(&self.slave_id, self.session_id, |e| {
                        e.received = e.received.max(h.received);
                        e.applied = e.applied.max(h.applied);
                    });
                self.received = self.received.max(h.received);
                self.pin.update(self.received);
                self.report_received();
            }
            SlaveMsg::TrySync(_) => {
                return Err(Status::failed_precondition(
                    "TrySync sent twice on one stream",
                ));
            }
        }
        Ok(())
    }

    /// Tells the ack tracker what this session's slave holds durably.
    fn report_received(&self) {
        self.shared
            .acks
            .report(&self.slave_id, self.session_id, self.received.into());
    }
}
