// Body of the `wire` fuzz target, kept in its own file so that
// `common/tests/wire_props.rs` can `include!` it and run it on stable.
//
// The property: bytes that decode as a `SlaveMessage` or a `DbSyncRequest`
// convert into the checked domain types (`tern_common::wire`) without a panic;
// what is accepted satisfies the documented bounds and converts back into a
// message that is accepted as the same value; what is refused is a typed
// error with a bounded message and the status class `status::from_wire` maps.

use prost::Message;
use tern_common::proto::replication::v1 as pb;
use tern_common::wire::{
    Ack, DbSyncReq, MAX_ADDR_BYTES, MAX_FILE_NAME_BYTES, MAX_HAVE, MAX_SLAVE_ID_BYTES,
    MAX_SNAPSHOT_ID_BYTES, SlaveHeartbeat, SlaveMsg, TrySyncRequest, WireError,
};

/// Longest error text a refused message may produce (they quote at most 64 chars).
const MAX_ERROR_TEXT: usize = 1024;

pub fn check(data: &[u8]) {
    if let Ok(m) = pb::SlaveMessage::decode(data) {
        slave_message(m);
    }
    if let Ok(r) = pb::DbSyncRequest::decode(data) {
        db_sync_request(r);
    }
}

fn refused(e: &WireError) {
    let text = e.to_string();
    assert!(!text.is_empty() && text.len() <= MAX_ERROR_TEXT, "{text:?}");
    let code = tern_common::status::from_wire(e).code();
    let want = if matches!(e, WireError::Positions(_)) {
        tonic::Code::OutOfRange
    } else {
        tonic::Code::InvalidArgument
    };
    assert_eq!(code, want);
}

pub fn slave_message(m: pb::SlaveMessage) {
    use pb::slave_message::Msg;
    let got = SlaveMsg::try_from(m.clone());
    match (m.msg, got) {
        (None, r) => assert_eq!(r, Err(WireError::Empty("SlaveMessage"))),
        (Some(Msg::TrySync(t)), r) => {
            let direct = TrySyncRequest::try_from(t.clone());
            match r {
                Ok(SlaveMsg::TrySync(ok)) => {
                    assert_eq!(direct.as_ref(), Ok(&ok));
                    try_sync_accepted(&t, &ok);
                }
                Err(e) => {
                    assert_eq!(direct, Err(e.clone()));
                    refused(&e);
                }
                Ok(other) => panic!("TrySync converted to {other:?}"),
            }
        }
        (Some(Msg::Ack(a)), r) => match r {
            Ok(SlaveMsg::Ack(ok)) => ack_accepted(&a, ok),
            Err(e) => {
                assert!(!a.first_send);
                assert!(
                    a.batch_first_index > a.batch_last_index
                        || a.received_index > a.batch_last_index
                        || a.applied_index > a.received_index
                );
                refused(&e);
            }
            Ok(other) => panic!("BinlogAck converted to {other:?}"),
        },
        (Some(Msg::Heartbeat(h)), r) => match r {
            Ok(SlaveMsg::Heartbeat(ok)) => {
                assert_eq!(
                    ok,
                    SlaveHeartbeat {
                        session_id: h.session_id,
                        received: h.index,
                        applied: h.applied_index
                    }
                );
                assert!(ok.applied <= ok.received);
            }
            Err(e) => {
                assert!(h.applied_index > h.index);
                refused(&e);
            }
            Ok(other) => panic!("Heartbeat converted to {other:?}"),
        },
    }
}

fn try_sync_accepted(t: &pb::TrySync, ok: &TrySyncRequest) {
    assert!((1..=MAX_SLAVE_ID_BYTES).contains(&ok.slave_id.len()));
    assert!(ok.addr.len() <= MAX_ADDR_BYTES);
    assert_ne!(t.index, u64::MAX);
    assert_eq!(
        (ok.slave_id.as_str(), ok.addr.as_str(), ok.seq),
        (t.slave_id.as_str(), t.addr.as_str(), t.seq)
    );
    match ok.position {
        None => assert!(t.repl_id.is_empty()),
        Some(p) => {
            assert_eq!(p.repl_id.to_string(), t.repl_id.to_ascii_lowercase());
            assert_eq!(p.index.get(), t.index);
            assert_eq!(ok.index(), t.index);
        }
    }
    // Round trip: the message the domain value stands for is accepted as it.
    let back = pb::TrySync {
        slave_id: ok.slave_id.clone(),
        repl_id: ok.position.map_or(String::new(), |p| p.repl_id.to_string()),
        index: t.index,
        addr: ok.addr.clone(),
        seq: ok.seq,
    };
    let again = TrySyncRequest::try_from(back.clone());
    assert_eq!(again.as_ref(), Ok(ok));
    let wire = pb::SlaveMessage {
        msg: Some(pb::slave_message::Msg::TrySync(back)),
    }
    .encode_to_vec();
    let decoded = pb::SlaveMessage::decode(wire.as_slice()).expect("own encoding");
    assert_eq!(
        SlaveMsg::try_from(decoded),
        Ok(SlaveMsg::TrySync(ok.clone()))
    );
}

fn ack_accepted(a: &pb::BinlogAck, ok: Ack) {
    assert_eq!(ok.session_id(), a.session_id);
    let back = match ok {
        Ack::FirstSend { session_id, index } => {
            assert!(a.first_send);
            assert_eq!(index, a.received_index);
            pb::BinlogAck {
                session_id,
                first_send: true,
                received_index: index,
                ..Default::default()
            }
        }
        Ack::Batch {
            session_id,
            first,
            last,
            received,
            applied,
        } => {
            assert!(!a.first_send);
            assert!(first <= last && received <= last && applied <= received);
            assert_eq!(
                (first, last, received, applied),
                (
                    a.batch_first_index,
                    a.batch_last_index,
                    a.received_index,
                    a.applied_index
                )
            );
            pb::BinlogAck {
                session_id,
                first_send: false,
                received_index: received,
                applied_index: applied,
                batch_first_index: first,
                batch_last_index: last,
            }
        }
    };
    assert_eq!(Ack::try_from(back), Ok(ok));
}

pub fn db_sync_request(r: pb::DbSyncRequest) {
    match DbSyncReq::try_from(r.clone()) {
        Ok(ok) => {
            assert!((1..=MAX_SLAVE_ID_BYTES).contains(&ok.slave_id.len()));
            assert!(ok.have.len() <= MAX_HAVE);
            assert!(ok.have.is_empty() || ok.snapshot_id.is_some());
            match &ok.snapshot_id {
                None => assert!(r.snapshot_id.is_empty()),
                Some(s) => assert!(!s.is_empty() && s.len() <= MAX_SNAPSHOT_ID_BYTES),
            }
            for (name, _) in &ok.have {
                assert!((1..=MAX_FILE_NAME_BYTES).contains(&name.len()));
            }
            let back = pb::DbSyncRequest {
                slave_id: ok.slave_id.clone(),
                snapshot_id: ok.snapshot_id.clone().unwrap_or_default(),
                have: ok
                    .have
                    .iter()
                    .map(|(name, offset)| pb::FileOffset {
                        name: name.clone(),
                        offset: *offset,
                    })
                    .collect(),
            };
            assert_eq!(back, r, "the conversion drops nothing");
            let decoded =
                pb::DbSyncRequest::decode(back.encode_to_vec().as_slice()).expect("own encoding");
            assert_eq!(DbSyncReq::try_from(decoded), Ok(ok));
        }
        Err(e) => refused(&e),
    }
}
