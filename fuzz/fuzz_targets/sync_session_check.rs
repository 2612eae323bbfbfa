// Body of the `sync_session` fuzz target, kept in its own file so that
// `common/tests/wire_props.rs` can `include!` it and run it on stable.
//
// A sequence of length-delimited `SlaveMessage`s, as a slave sends them on a
// streaming session, fed to the parts of the master's session that do not
// need a network stream: the checks of `tern_common::wire` and the
// `SyncWindow` the reply reader slides (master/src/sync/stream.rs, whose
// `handle` is tied to tonic streams and the registry; its decisions are
// mirrored here). A reference queue checks the window: acks slide it only at
// its head, a refused ack changes nothing, the bytes and batches in flight
// stay bounded, and nothing panics.

use std::collections::VecDeque;

use prost::Message;
use tern_common::proto::replication::v1 as pb;
use tern_common::window::{InFlight, SyncWindow, WindowError};
use tern_common::wire::{Ack, SlaveMsg};

/// The session the messages belong to (others are stale and ignored).
pub const SESSION_ID: u64 = 7;
/// Window limits of the checked session.
pub const MAX_BATCHES: usize = 4;
pub const MAX_BYTES: usize = 1000;
/// Every batch the simulated sender pushes: `BATCH_LEN` indexes, `BATCH_BYTES` bytes.
pub const BATCH_LEN: u64 = 2;
pub const BATCH_BYTES: usize = 300;

/// Batch `n` (0-based) of a session that started after index 0.
pub fn batch(n: u64) -> InFlight {
    InFlight {
        first_index: n * BATCH_LEN + 1,
        last_index: (n + 1) * BATCH_LEN,
        bytes: BATCH_BYTES,
    }
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Every message was taken.
    Open,
    /// The message did not decode as a `SlaveMessage` (INVALID_ARGUMENT).
    Undecodable,
    /// `tern_common::wire` refused a message.
    Refused,
    /// The session refused a valid message (a second TrySync or first-send
    /// ack, an ack that is not the window head, a heartbeat beyond what was sent).
    Protocol,
}

/// Runs the session over `data`; returns how it ended and how many batches
/// were acknowledged.
pub fn check(data: &[u8]) -> (End, u64) {
    let mut window = SyncWindow::new(MAX_BATCHES, MAX_BYTES);
    let mut model: VecDeque<InFlight> = VecDeque::new();
    let mut pushed = 0u64;
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut acked = 0u64;
    let mut rest = data;
    let end = loop {
        // The sender fills the window.
        while window.has_room() {
            let b = batch(pushed);
            window.push(b);
            model.push_back(b);
            pushed += 1;
            sent = b.last_index;
        }
        assert!(window.len() <= MAX_BATCHES);
        assert!(window.bytes() < MAX_BYTES + BATCH_BYTES);
        assert_eq!(window.len(), model.len());
        assert_eq!(window.bytes(), model.iter().map(|b| b.bytes).sum::<usize>());
        assert_eq!(window.last_sent(), model.back().map(|b| b.last_index));
        if rest.is_empty() {
            break End::Open;
        }
        let mut buf = rest;
        let Ok(m) = pb::SlaveMessage::decode_length_delimited(&mut buf) else {
            break End::Undecodable;
        };
        assert!(buf.len() < rest.len(), "a decoded message consumes bytes");
        rest = buf;
        let Ok(m) = SlaveMsg::try_from(m) else {
            break End::Refused;
        };
        match m {
            SlaveMsg::Ack(a) if a.session_id() != SESSION_ID => {}
            SlaveMsg::Ack(Ack::FirstSend { .. }) | SlaveMsg::TrySync(_) => break End::Protocol,
            SlaveMsg::Ack(Ack::Batch {
                first,
                last,
                received: r,
                applied,
                ..
            }) => {
                assert!(applied <= r && r <= last);
                let before = (window.len(), window.bytes());
                match window.ack(first, last) {
                    Ok(head) => {
                        assert_eq!(Some(head), model.pop_front());
                        assert_eq!((head.first_index, head.last_index), (first, last));
                        assert_eq!(window.bytes(), before.1 - head.bytes);
                        acked += 1;
                        received = r;
                    }
                    Err(e) => {
                        assert_eq!((window.len(), window.bytes()), before);
                        match (e, model.front()) {
                            (WindowError::Empty { .. }, None) => {}
                            (
                                WindowError::NotHead {
                                    head_first,
                                    head_last,
                                    ..
                                },
                                Some(h),
                            ) => {
                                assert_eq!((head_first, head_last), (h.first_index, h.last_index));
                                assert_ne!((first, last), (h.first_index, h.last_index));
                            }
                            (e, h) => panic!("window said {e:?} with head {h:?}"),
                        }
                        break End::Protocol;
                    }
                }
            }
            SlaveMsg::Heartbeat(h) if h.session_id != SESSION_ID => {}
            SlaveMsg::Heartbeat(h) => {
                if h.received > sent {
                    break End::Protocol;
                }
                received = received.max(h.received);
            }
        }
        assert!(received <= sent);
    };
    (end, acked)
}
