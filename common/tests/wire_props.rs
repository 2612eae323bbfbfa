//! Property tests that run the bodies of the fuzz targets over tern-common's
//! decoders of network and disk bytes on stable (cargo-fuzz needs nightly):
//! `wire` (SlaveMessage / DbSyncRequest -> domain types), `sync_session` (a
//! sequence of SlaveMessages against a session's window), `history` (the
//! stored ancestor list) and `clean_shutdown_marker`. Each runs on random
//! bytes and on mutated valid encodings, with a bounded number of cases.

use proptest::prelude::*;
use prost::Message;
use tern_common::history::{Histories, HistoryEntry};
use tern_common::marker::{CleanStop, parse_clean_shutdown};
use tern_common::position::{Index, Position, ReplId};
use tern_common::proto::replication::v1 as pb;

mod mutations {
    include!("../../fuzz/support/mutations.rs");
}
mod wire_body {
    include!("../../fuzz/fuzz_targets/wire_check.rs");
}
mod session_body {
    include!("../../fuzz/fuzz_targets/sync_session_check.rs");
}
mod history_body {
    include!("../../fuzz/fuzz_targets/history_check.rs");
}
mod marker_body {
    include!("../../fuzz/fuzz_targets/marker_check.rs");
}

use mutations::{apply, arb_mutations};
use session_body::{BATCH_LEN, End, MAX_BATCHES, SESSION_ID};

const CASES: u32 = 2000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(prop::char::range('a', 'z'), 0..max)
            .prop_map(|v| v.into_iter().collect()),
        Just(String::new()),
        (max.saturating_sub(2)..max + 3).prop_map(|n| "x".repeat(n)),
        "\\PC{0,8}",
    ]
}

fn arb_repl_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<u128>().prop_map(|id| ReplId(id).to_string()),
        1 => any::<u128>().prop_map(|id| ReplId(id).to_string().to_ascii_uppercase()),
        1 => Just(String::new()),
        1 => "[0-9a-gz]{0,34}",
    ]
}

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![0..20u64, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

fn arb_slave_message() -> impl Strategy<Value = pb::SlaveMessage> {
    use pb::slave_message::Msg;
    let try_sync = (
        arb_text(260),
        arb_repl_id(),
        edge_u64(),
        arb_text(260),
        any::<u64>(),
    )
        .prop_map(|(slave_id, repl_id, index, addr, seq)| {
            Msg::TrySync(pb::TrySync {
                slave_id,
                repl_id,
                index,
                addr,
                seq,
            })
        });
    let ack = (
        any::<u64>(),
        any::<bool>(),
        edge_u64(),
        edge_u64(),
        edge_u64(),
        edge_u64(),
    )
        .prop_map(|(session_id, first_send, a, b, c, d)| {
            // Mostly ordered positions (accepted), some not.
            let mut v = [a, b, c, d];
            if !d.is_multiple_of(4) {
                v.sort_unstable();
            }
            Msg::Ack(pb::BinlogAck {
                session_id,
                first_send,
                applied_index: v[0],
                received_index: v[1],
                batch_first_index: v[2].min(v[3]),
                batch_last_index: v[3],
            })
        });
    let hb = (any::<u64>(), any::<u64>(), edge_u64(), edge_u64()).prop_map(
        |(session_id, now_ms, index, applied_index)| {
            Msg::Heartbeat(pb::Heartbeat {
                session_id,
                now_ms,
                index,
                applied_index,
            })
        },
    );
    prop::option::weighted(0.95, prop_oneof![try_sync, ack, hb])
        .prop_map(|msg| pb::SlaveMessage { msg })
}

fn arb_db_sync_request() -> impl Strategy<Value = pb::DbSyncRequest> {
    (
        arb_text(260),
        arb_text(130),
        prop::collection::vec((arb_text(20), edge_u64()), 0..6),
    )
        .prop_map(|(slave_id, snapshot_id, have)| pb::DbSyncRequest {
            slave_id,
            snapshot_id,
            have: have
                .into_iter()
                .map(|(name, offset)| pb::FileOffset { name, offset })
                .collect(),
        })
}

/// One message of a session's reply stream, as the generator means it.
#[derive(Clone, Debug)]
enum Reply {
    /// The ack of the batch at the window head.
    AckHead { lag: u64 },
    /// A heartbeat at most at what was sent.
    Heartbeat { back: u64 },
    /// Another session's ack or heartbeat (ignored).
    Stale(u64),
}

fn arb_reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        4 => (0..=BATCH_LEN).prop_map(|lag| Reply::AckHead { lag }),
        2 => (0..20u64).prop_map(|back| Reply::Heartbeat { back }),
        1 => any::<u64>().prop_filter("another session", |s| *s != SESSION_ID).prop_map(Reply::Stale),
    ]
}

/// The replies, encoded length-delimited as a valid session of `sync_session`
/// would send them, and the number of acks among them.
fn encode_session(replies: &[Reply]) -> (Vec<u8>, u64) {
    use pb::slave_message::Msg;
    let mut out = Vec::new();
    let mut acked = 0u64;
    for r in replies {
        // The window starts full and the sender refills it after each ack.
        let sent = (MAX_BATCHES as u64 + acked) * BATCH_LEN;
        let msg = match *r {
            Reply::AckHead { lag } => {
                let b = session_body::batch(acked);
                acked += 1;
                let received = b.last_index - lag;
                Msg::Ack(pb::BinlogAck {
                    session_id: SESSION_ID,
                    first_send: false,
                    received_index: received,
                    applied_index: received.saturating_sub(1),
                    batch_first_index: b.first_index,
                    batch_last_index: b.last_index,
                })
            }
            Reply::Heartbeat { back } => Msg::Heartbeat(pb::Heartbeat {
                session_id: SESSION_ID,
                now_ms: 1,
                index: sent.saturating_sub(back),
                applied_index: sent.saturating_sub(back + 1),
            }),
            Reply::Stale(session_id) => Msg::Ack(pb::BinlogAck {
                session_id,
                first_send: true,
                ..Default::default()
            }),
        };
        pb::SlaveMessage { msg: Some(msg) }
            .encode_length_delimited(&mut out)
            .expect("a Vec grows");
    }
    (out, acked)
}

fn arb_ancestors() -> impl Strategy<Value = Vec<HistoryEntry>> {
    prop::collection::vec(
        (any::<u128>(), edge_u64()).prop_map(|(id, end)| HistoryEntry {
            repl_id: ReplId(id),
            end: Index(end),
        }),
        0..=tern_common::history::MAX_ANCESTORS,
    )
}

fn arb_marker_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"none\n".to_vec()),
        (any::<u128>(), edge_u64()).prop_map(|(id, index)| {
            let p = Position {
                repl_id: ReplId(id),
                index: Index(index),
            };
            format!("{p}\n").into_bytes()
        }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn wire_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        wire_body::check(&data);
    }

    #[test]
    fn wire_slave_messages(m in arb_slave_message(), muts in arb_mutations(3)) {
        // The message itself, then its mutated encoding.
        wire_body::slave_message(m.clone());
        wire_body::check(&apply(m.encode_to_vec(), &muts));
    }

    #[test]
    fn wire_db_sync_requests(r in arb_db_sync_request(), muts in arb_mutations(3)) {
        wire_body::db_sync_request(r.clone());
        wire_body::check(&apply(r.encode_to_vec(), &muts));
    }

    #[test]
    fn session_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        session_body::check(&data);
    }

    #[test]
    fn session_valid_and_mutated(
        replies in prop::collection::vec(arb_reply(), 0..24),
        muts in arb_mutations(3),
    ) {
        let (bytes, acks) = encode_session(&replies);
        // The valid session is taken whole, every ack sliding the window.
        prop_assert_eq!(session_body::check(&bytes), (End::Open, acks));
        let (_, acked) = session_body::check(&apply(bytes, &muts));
        prop_assert!(acked <= acks + 1 + muts.len() as u64);
    }

    #[test]
    fn history_random_bytes(data in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (0..=70usize).prop_flat_map(|n| prop::collection::vec(any::<u8>(), n * 24)),
    ]) {
        history_body::check(&data);
    }

    #[test]
    fn history_valid_and_mutated(ancestors in arb_ancestors(), muts in arb_mutations(3)) {
        let h = Histories { current: ReplId(1), ancestors };
        let bytes = h.encode_ancestors();
        prop_assert_eq!(Histories::decode_ancestors(&bytes), Ok(h.ancestors.clone()));
        history_body::check(&bytes);
        history_body::check(&apply(bytes, &muts));
    }

    #[test]
    fn marker_random_bytes(data in prop::collection::vec(any::<u8>(), 0..400)) {
        marker_body::check(&data);
    }

    #[test]
    fn marker_valid_and_mutated(text in arb_marker_text(), muts in arb_mutations(3)) {
        prop_assert!(matches!(parse_clean_shutdown(&text), CleanStop::At(_)));
        marker_body::check(&text);
        marker_body::check(&apply(text, &muts));
    }
}
