//! A hand-written client on `tern.replication.v1.Replication/Sync` breaks the
//! protocol in every way it can name, and each time gets a typed answer: a
//! TrySyncResponse NEED_FULL_SYNC with the right reason for a bad position, a
//! clear gRPC status for a bad stream (FAILED_PRECONDITION, OUT_OF_RANGE,
//! INVALID_ARGUMENT), and for an ack carrying a stale session id nothing but a
//! count (the session keeps streaming). Throughout, a real slave follows the
//! same master under load and still converges to equal data.
//!
//! A second test opens two sessions under one slave id (a reconnect the master
//! has not noticed yet) and checks that the old one cannot disturb what the
//! master reports about the live one.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use support::{
    DEADLINE, Rogue, assert_replicas_equal, assert_status, batch_ack, commit_seq, first_ack,
    start_slave, try_sync, wait_connected, wait_more_acked, wait_until,
};
use tern_common::proto::kv::v1 as kv;
use tern_common::proto::replication::v1 as pb;
use tern_common::record::{EventKind, Records};
use tern_integration::{Node, TestDir, Workload};
use tonic::Code;

static ROGUES: AtomicU64 = AtomicU64::new(0);

/// A fresh slave id for one rogue stream.
fn rogue_id(case: &str) -> String {
    format!("rogue-{case}-{}", ROGUES.fetch_add(1, Ordering::Relaxed))
}

/// TrySync at `(repl_id, index)` must be refused with NEED_FULL_SYNC `reason`,
/// and then the master ends the stream cleanly.
async fn expect_need_full_sync(
    url: &str,
    case: &str,
    repl_id: &str,
    index: u64,
    seq: u64,
    reason: pb::FullSyncReason,
) {
    let mut r = Rogue::open(url, try_sync(&rogue_id(case), repl_id, index, seq)).await;
    let resp = r.try_sync_response().await;
    assert_eq!(
        resp.code,
        pb::TrySyncCode::NeedFullSync as i32,
        "{case}: TrySync({repl_id}, {index}) must need a full sync: {resp:?}"
    );
    assert_eq!(
        resp.reason, reason as i32,
        "{case}: TrySync({repl_id}, {index}): wrong reason: {resp:?}"
    );
    assert_eq!(
        resp.session_id, 0,
        "{case}: no session for a refused TrySync"
    );
    assert!(
        !resp.repl_id.is_empty(),
        "{case}: the master names its history"
    );
    match r.next().await {
        Ok(None) => {}
        other => panic!("{case}: after NEED_FULL_SYNC the stream must end cleanly, got {other:?}"),
    }
}

/// Opens a session at `index` with a valid TrySync and first-send ack.
/// `seq` is that of the transaction ending at `index` (see `commit_seq`).
async fn open_session(url: &str, case: &str, repl_id: &str, index: u64, seq: u64) -> (Rogue, u64) {
    let mut r = Rogue::open(url, try_sync(&rogue_id(case), repl_id, index, seq)).await;
    let resp = r.try_sync_response().await;
    assert_eq!(
        resp.code,
        pb::TrySyncCode::Ok as i32,
        "{case}: TrySync({index}) with the real repl id must be OK: {resp:?}"
    );
    assert_eq!(resp.repl_id, repl_id);
    assert_ne!(resp.session_id, 0);
    (r, resp.session_id)
}

/// Checks a batch's records (contiguous from `expect_first`, CRCs valid) and
/// returns (last index, last Commit index in the batch if any).
fn check_batch(b: &pb::BinlogBatch, expect_first: u64) -> (u64, Option<u64>) {
    assert_eq!(b.first_index, expect_first, "batches are contiguous");
    let mut next = b.first_index;
    let mut commit = None;
    for rec in Records::new(&b.records) {
        let (ev, _) = rec.unwrap_or_else(|e| {
            panic!(
                "bad record in batch [{}, {}]: {e}",
                b.first_index, b.last_index
            )
        });
        assert_eq!(ev.index, next, "records of a batch are contiguous");
        if matches!(ev.kind, EventKind::Commit { .. }) {
            commit = Some(ev.index);
        }
        next += 1;
    }
    assert_eq!(
        next - 1,
        b.last_index,
        "the batch holds exactly [first, last]"
    );
    (b.last_index, commit)
}

async fn stale_messages(master: &Node) -> u64 {
    master
        .info()
        .await
        .unwrap()
        .counters
        .unwrap_or_default()
        .stale_messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_sync_clients_get_typed_errors_and_harm_no_one() {
    let dir = TestDir::new("repl-rogue");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let url = master.url();

    // History starts with one Txn of 3 puts: Begin 1, Put 2..4, Commit 5.
    let op = |k: &str| kv::Op {
        op: Some(kv::op::Op::Put(kv::PutRequest {
            key: Bytes::from(format!("first/{k}")),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        })),
    };
    let index = master
        .kv()
        .txn(kv::TxnRequest {
            ops: vec![op("a"), op("b"), op("c")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .index;
    assert_eq!(index, 5, "Begin + 3 Puts + Commit on an empty master");
    let repl_id = master.info().await.unwrap().repl_id;
    assert_eq!(repl_id.len(), 32, "repl id is 128 bits in hex: {repl_id:?}");

    // A real slave follows the master under load the whole time.
    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;
    let work = Workload::new(8, 4);
    let load = work.start_load(&url, 4);
    wait_more_acked(&load, 200).await;

    // (a) Unknown history.
    let mut bogus = format!("{:032x}", rand::random::<u128>());
    if bogus == repl_id {
        bogus = format!("{:032x}", !rand::random::<u128>());
    }
    expect_need_full_sync(&url, "a", &bogus, 5, 1, pb::FullSyncReason::UnknownReplId).await;
    expect_need_full_sync(&url, "a0", &bogus, 0, 0, pb::FullSyncReason::UnknownReplId).await;

    // (b) Positions that are not transaction boundaries: the Begin, and Puts.
    for i in [1, 2, 3, 4] {
        expect_need_full_sync(&url, "b", &repl_id, i, 1, pb::FullSyncReason::NotABoundary).await;
    }

    // (c) Beyond the master's last index.
    let last = master.info().await.unwrap().last_index;
    expect_need_full_sync(
        &url,
        "c",
        &repl_id,
        last + 1_000_000,
        1,
        pb::FullSyncReason::AheadOfMaster,
    )
    .await;

    // (c2) A real boundary of the master's history, but the slave's
    // transaction there is another one (its seq differs): I8, diverged.
    for wrong in [0, 2, u64::MAX] {
        expect_need_full_sync(&url, "c2", &repl_id, 5, wrong, pb::FullSyncReason::Diverged).await;
    }

    // (d) The first-send ack must repeat the TrySync index (F2).
    let (mut r, sid) = open_session(&url, "d", &repl_id, 5, 1).await;
    r.send(first_ack(sid, 0)).await;
    let s = r.expect_error("first-send ack with another index").await;
    assert_status(
        "(d) first-send ack 0 after TrySync 5",
        &s,
        Code::FailedPrecondition,
        "first-send",
    );
    // ... and must come before any other ack.
    let (mut r, sid) = open_session(&url, "d2", &repl_id, 5, 1).await;
    r.send(batch_ack(sid, 6, 10, 5)).await;
    let s = r.expect_error("batch ack before the first-send ack").await;
    assert_status(
        "(d2) batch ack before first-send",
        &s,
        Code::FailedPrecondition,
        "first-send",
    );

    // (e) An ack for a batch that is not the window head.
    let (mut r, sid) = open_session(&url, "e", &repl_id, 5, 1).await;
    r.send(first_ack(sid, 5)).await;
    let b = r.batch().await;
    check_batch(&b, 6);
    r.send(batch_ack(sid, b.first_index + 1, b.last_index, 5))
        .await;
    let s = r.expect_error("ack not at the window head").await;
    assert_eq!(s.code(), Code::OutOfRange, "(e) ack not at the head: {s:?}");

    // (f) A Heartbeat where TrySync must come first.
    let mut r = Rogue::open(
        &url,
        pb::slave_message::Msg::Heartbeat(pb::Heartbeat {
            session_id: 0,
            now_ms: 0,
            index: 0,
            applied_index: 0,
        }),
    )
    .await;
    let s = r.expect_error("Heartbeat as the first message").await;
    assert_status("(f) Heartbeat first", &s, Code::InvalidArgument, "TrySync");

    // (g) An empty SlaveMessage (no `msg`) while streaming.
    let (mut r, sid) = open_session(&url, "g", &repl_id, 5, 1).await;
    r.send(first_ack(sid, 5)).await;
    let b = r.batch().await;
    check_batch(&b, 6);
    r.send_raw(pb::SlaveMessage { msg: None }).await;
    let s = r.expect_error("empty SlaveMessage").await;
    assert_eq!(
        s.code(),
        Code::InvalidArgument,
        "(g) empty SlaveMessage: {s:?}"
    );

    // (h) Messages with a stale session id are ignored and counted; the
    // session keeps streaming, and the rogue, acking properly, receives a
    // byte-valid contiguous binlog up to the master's latest index.
    let stale_before = stale_messages(&master).await;
    let id_h = rogue_id("h");
    let mut r = Rogue::open(&url, try_sync(&id_h, &repl_id, 5, 1)).await;
    let resp = r.try_sync_response().await;
    assert_eq!(resp.code, pb::TrySyncCode::Ok as i32, "(h): {resp:?}");
    let sid = resp.session_id;
    let stale = sid ^ 0x5a5a;
    // Before the first-send ack ...
    r.send(first_ack(stale, 5)).await;
    r.send(first_ack(sid, 5)).await;
    let b = r.batch().await;
    let (mut last, commit) = check_batch(&b, 6);
    let mut received = commit.unwrap_or(5);
    // ... and while streaming: an ack of the real head, and a heartbeat.
    r.send(batch_ack(stale, b.first_index, b.last_index, received))
        .await;
    r.send(pb::slave_message::Msg::Heartbeat(pb::Heartbeat {
        session_id: stale,
        now_ms: 1,
        index: received,
        applied_index: received,
    }))
    .await;
    wait_until("the master to count 3 stale messages", DEADLINE, || {
        let master = &master;
        async move {
            let n = stale_messages(master).await;
            if n >= stale_before + 3 {
                Ok(Some(n))
            } else {
                Err(format!("stale_messages {n} (was {stale_before})"))
            }
        }
    })
    .await;
    // The stale ack did not slide the window: the real ack of the same head is accepted.
    r.send(batch_ack(sid, b.first_index, b.last_index, received))
        .await;
    let target = master.info().await.unwrap().last_index;
    while last < target {
        let b = r.batch().await;
        let (l, commit) = check_batch(&b, last + 1);
        last = l;
        if let Some(c) = commit {
            received = c;
        }
        r.send(batch_ack(sid, b.first_index, b.last_index, received))
            .await;
    }
    let mi = master.info().await.unwrap();
    let row = mi
        .slaves
        .iter()
        .find(|s| s.id == id_h)
        .unwrap_or_else(|| panic!("(h) the master lists the rogue: {:?}", mi.slaves));
    assert_eq!(
        row.state, "streaming",
        "(h) the session survived stale messages: {row:?}"
    );
    assert_eq!(row.session_id, sid);
    eprintln!("(h) rogue received a valid binlog up to {last} (target {target}); {row:?}");
    drop(r);

    // The real slave was never disturbed.
    let stats = load.stop().await;
    assert!(
        stats.unexpected.is_empty(),
        "errors a correct master never returns: {:?}",
        stats.unexpected
    );
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
    assert_replicas_equal(&master, &[&slave], &work).await;
    let si = slave.info().await.unwrap();
    let c = support::slave_counters(&si);
    assert_eq!(c.reconnects, 0, "{}", support::describe_slave(&si));
    let mi = master.info().await.unwrap();
    let real = support::slave_link(&si).session_id;
    assert!(
        mi.slaves
            .iter()
            .any(|s| s.session_id == real && s.state == "streaming"),
        "the real slave still streams: {:?}",
        mi.slaves
    );
}

/// (i) A slave that reconnects before the master noticed its old session died
/// (the F2 pattern: a half-open link, or a slave whose link timeout fires
/// first) has two sessions under one slave id for a while. When the old one
/// ends, the master must keep showing the new, live session as streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_an_old_session_does_not_hide_the_live_one() {
    let dir = TestDir::new("repl-rogue-two-sessions");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let url = master.url();
    let work = Workload::new(4, 2);
    let load = work.start_load(&url, 2);
    wait_more_acked(&load, 100).await;
    let repl_id = master.info().await.unwrap().repl_id;
    let id_i = rogue_id("i");
    let mut problems = Vec::new();

    // The old session, from the start of the history; it receives one batch.
    let mut old = Rogue::open(&url, try_sync(&id_i, &repl_id, 0, 0)).await;
    let resp = old.try_sync_response().await;
    assert_eq!(resp.code, pb::TrySyncCode::Ok as i32, "old: {resp:?}");
    let old_sid = resp.session_id;
    old.send(first_ack(old_sid, 0)).await;
    let old_batch = old.batch().await;
    check_batch(&old_batch, 1);
    let old_first_commit = Records::new(&old_batch.records)
        .map(|r| r.expect("valid record").0)
        .find(|ev| matches!(ev.kind, EventKind::Commit { .. }))
        .expect("the first batch holds a whole transaction")
        .index;

    // The same slave reconnects further on (a new session) and acks a batch.
    wait_more_acked(&load, 100).await;
    let from = master.info().await.unwrap().applied_index;
    let seq = commit_seq(&master.data_dir, from);
    let mut new = Rogue::open(&url, try_sync(&id_i, &repl_id, from, seq)).await;
    let resp = new.try_sync_response().await;
    assert_eq!(resp.code, pb::TrySyncCode::Ok as i32, "new: {resp:?}");
    let new_sid = resp.session_id;
    assert_ne!(new_sid, old_sid);
    new.send(first_ack(new_sid, from)).await;
    let b = new.batch().await;
    let (_, commit) = check_batch(&b, from + 1);
    let new_received = commit.unwrap_or(from);
    new.send(batch_ack(
        new_sid,
        b.first_index,
        b.last_index,
        new_received,
    ))
    .await;
    wait_until("the master to take the new session's ack", DEADLINE, || {
        let (master, id) = (&master, &id_i);
        async move {
            let mi = master.info().await.map_err(|e| format!("{e:#}"))?;
            match mi.slaves.iter().find(|s| &s.id == id) {
                Some(r) if r.received_index == new_received => Ok(Some(())),
                r => Err(format!("{r:?}")),
            }
        }
    })
    .await;

    // The old session, still alive on the master, acks its (valid) head batch.
    old.send(batch_ack(
        old_sid,
        old_batch.first_index,
        old_batch.last_index,
        old_first_commit,
    ))
    .await;
    // Then it ends; its error status reaches us only after the master is
    // done with it (the ack before was processed before this message).
    old.send_raw(pb::SlaveMessage { msg: None }).await;
    let s = old.expect_error("ending the old session").await;
    assert_eq!(s.code(), Code::InvalidArgument);

    let mi = master.info().await.unwrap();
    let row = mi
        .slaves
        .iter()
        .find(|s| s.id == id_i)
        .unwrap_or_else(|| panic!("the master lists {id_i}: {:?}", mi.slaves))
        .clone();
    if row.session_id != new_sid || row.state != "streaming" {
        problems.push(format!(
            "the end of old session {old_sid} changed the live session {new_sid} to state {:?} \
             (session {})",
            row.state, row.session_id
        ));
    }
    if row.received_index < new_received {
        problems.push(format!(
            "an ack of old session {old_sid} moved the slave's received index back to {} \
             although its live session {new_sid} received {new_received}",
            row.received_index
        ));
    }
    // Where the master reports binlog pins, the live session still pins its
    // slave's position (an old session must not release it either).
    let owner = format!("slave:{id_i}");
    if !mi.pins.is_empty() {
        match mi.pins.iter().find(|p| p.owner == owner) {
            Some(p) if p.index >= new_received => {}
            other => problems.push(format!(
                "the live session {new_sid} should pin the binlog at >= {new_received} as \
                 {owner:?}, found {other:?}"
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "master Info mixes two sessions of slave {id_i}:\n  {}\nInfo row: {row:?}\npins: {:?}",
        problems.join("\n  "),
        mi.pins
    );
    drop(new);
    let stats = load.stop().await;
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
}
