//! Semi-synchronous writes and `Admin.Wait`, over real processes.
//!
//! A write with `min_replicas = N` is answered once N connected slaves hold it
//! durably in their relay logs; if that does not happen within
//! `replica_timeout_ms` the write is still committed on the master and the
//! answer is DEADLINE_EXCEEDED naming its commit index and how many slaves
//! acknowledged it. Slaves are frozen with SIGSTOP (their sessions stay
//! connected, they acknowledge nothing). Every check is on data: counts,
//! indexes, codes and values, never on how long something took.

mod support;

use bytes::Bytes;
use support::{assert_status, sigstop_and_wait, slave_link, start_slave, wait_connected};
use tern_common::proto::admin::v1 as admin;
use tern_common::proto::kv::v1 as kv;
use tern_integration::{Node, TestDir};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Long enough that a healthy slave always acknowledges in time.
const GENEROUS_MS: u32 = 15_000;
/// Short: used only when the outcome is a timeout anyway.
const SHORT_MS: u32 = 300;

fn b(s: impl Into<String>) -> Bytes {
    Bytes::from(s.into())
}

fn put(key: &str, value: &str, min_replicas: u32, replica_timeout_ms: u32) -> kv::PutRequest {
    kv::PutRequest {
        key: b(key),
        value: b(value),
        min_replicas,
        replica_timeout_ms,
    }
}

fn op(o: kv::op::Op) -> kv::Op {
    kv::Op { op: Some(o) }
}

/// Asserts `s` is the answer to a write committed on the master that
/// `acked` of `required` slaves acknowledged in time; returns its index.
fn assert_short(what: &str, s: &tonic::Status, acked: u32, required: u32) -> u64 {
    assert_eq!(s.code(), Code::DeadlineExceeded, "{what}: {s:?}");
    let m = s.message();
    let index: u64 = s
        .metadata()
        .get("tern-commit-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no tern-commit-index metadata: {s:?}"));
    assert!(index > 0, "{what}: commit index 0");
    let acked_meta = s
        .metadata()
        .get("tern-replicas-acked")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(
        acked_meta.as_deref(),
        Some(acked.to_string().as_str()),
        "{what}: tern-replicas-acked: {s:?}"
    );
    for word in [
        format!("committed on the master at index {index};"),
        format!("{acked} of {required} slaves acknowledged"),
        "do not retry".to_string(),
    ] {
        assert!(m.contains(&word), "{what}: message {m:?} lacks {word:?}");
    }
    index
}

/// Asserts `slave` holds `index` in its relay log (Info.link.received_index).
async fn assert_holds(slave: &Node, index: u64) {
    let received = slave_link(&slave.info().await.unwrap()).received_index;
    assert!(
        received >= index,
        "slave on port {}: received index {received} is below the acknowledged write's {index}",
        slave.port
    );
}

async fn master_get(master: &Node, key: &str) -> kv::GetResponse {
    master
        .kv()
        .get(kv::GetRequest {
            key: b(key),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("Get {key} on the master: {e}"))
        .into_inner()
}

async fn wait_call(
    node: &Node,
    index: u64,
    replicas: u32,
    timeout_ms: u32,
) -> Result<admin::WaitResponse, tonic::Status> {
    node.admin()
        .wait(admin::WaitRequest {
            index,
            replicas,
            timeout_ms,
        })
        .await
        .map(|r| r.into_inner())
}

/// One slave: every kind of write acknowledged by it; Admin.Wait; then the
/// slave frozen: writes time out committed, Wait counts 0; after SIGCONT the
/// slave has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_the_slave_and_time_out_committed_when_it_is_frozen() {
    let dir = TestDir::new("semi-sync-one");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;
    let mut mkv = master.kv();

    // (a) Put acknowledged by the slave: its relay log holds the write when
    // the answer comes.
    let r = mkv
        .put(put("a", "1", 1, GENEROUS_MS))
        .await
        .expect("Put with min_replicas 1")
        .into_inner();
    assert_eq!(r.replicas_acked, 1, "Put: {r:?}");
    assert_holds(&slave, r.index).await;
    // An asynchronous write still says 0.
    let r0 = mkv.put(put("a0", "x", 0, 0)).await.unwrap().into_inner();
    assert_eq!(r0.replicas_acked, 0);

    // (e) Every other kind of write honours min_replicas.
    let d = mkv
        .delete(kv::DeleteRequest {
            key: b("a0"),
            min_replicas: 1,
            replica_timeout_ms: GENEROUS_MS,
        })
        .await
        .expect("Delete")
        .into_inner();
    assert_eq!(d.replicas_acked, 1, "Delete: {d:?}");
    let i = mkv
        .incr_by(kv::IncrByRequest {
            key: b("ctr"),
            delta: 5,
            min_replicas: 1,
            replica_timeout_ms: GENEROUS_MS,
        })
        .await
        .expect("IncrBy")
        .into_inner();
    assert_eq!((i.value, i.replicas_acked), (5, 1), "IncrBy: {i:?}");
    let a = mkv
        .append(kv::AppendRequest {
            key: b("log"),
            value: b("x;"),
            min_replicas: 1,
            replica_timeout_ms: GENEROUS_MS,
        })
        .await
        .expect("Append")
        .into_inner();
    assert_eq!((a.length, a.replicas_acked), (2, 1), "Append: {a:?}");
    let t = mkv
        .txn(kv::TxnRequest {
            ops: vec![
                op(kv::op::Op::Put(put("t1", "A", 0, 0))),
                op(kv::op::Op::IncrBy(kv::IncrByRequest {
                    key: b("ctr"),
                    delta: 1,
                    ..Default::default()
                })),
            ],
            min_replicas: 1,
            replica_timeout_ms: GENEROUS_MS,
        })
        .await
        .expect("Txn")
        .into_inner();
    assert_eq!(t.replicas_acked, 1, "Txn: {t:?}");
    let mut answers = pipeline(
        &master,
        vec![
            kv::PipelineRequest {
                id: 1,
                ops: vec![op(kv::op::Op::Put(put("p1", "v", 0, 0)))],
                min_replicas: 1,
                replica_timeout_ms: GENEROUS_MS,
            },
            kv::PipelineRequest {
                id: 2,
                ops: vec![op(kv::op::Op::Put(put("p2", "v", 0, 0)))],
                ..Default::default()
            },
        ],
    )
    .await;
    let p2 = answers.pop().unwrap();
    let p1 = answers.pop().unwrap();
    assert_eq!((p1.id, p1.code, p1.replicas_acked), (1, 0, 1), "{p1:?}");
    assert_eq!((p2.id, p2.code, p2.replicas_acked), (2, 0, 0), "{p2:?}");

    // Options that cannot be honoured are refused before anything is written.
    let s = mkv.put(put("never", "x", 33, 0)).await.unwrap_err();
    assert_status(
        "min_replicas 33",
        &s,
        Code::InvalidArgument,
        "sync.max_sessions",
    );
    let s = mkv.put(put("never", "x", 1, 30_000)).await.unwrap_err();
    assert_status(
        "replica_timeout_ms 30000",
        &s,
        Code::InvalidArgument,
        "server.request_timeout_ms",
    );
    let s = mkv
        .txn(kv::TxnRequest {
            ops: vec![op(kv::op::Op::Put(put("never", "x", 1, 0)))],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        "min_replicas on an op",
        &s,
        Code::InvalidArgument,
        "on the op",
    );
    assert!(
        !master_get(&master, "never").await.found,
        "a refused write was written"
    );

    // (d) Admin.Wait with the slave connected.
    let last = master.info().await.unwrap().last_index;
    let w = wait_call(&master, 0, 1, GENEROUS_MS).await.expect("Wait");
    assert_eq!((w.acked, w.index), (1, last), "Wait for the last index");
    let w = wait_call(&master, last, 0, 0)
        .await
        .expect("Wait 0 replicas");
    assert_eq!((w.acked, w.index), (1, last), "Wait for 0 replicas counts");
    let s = wait_call(&master, last + 1000, 1, SHORT_MS)
        .await
        .unwrap_err();
    assert_status(
        "Wait past the end",
        &s,
        Code::OutOfRange,
        "past the master's last index",
    );
    let s = wait_call(&slave, 0, 1, SHORT_MS).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "Wait on a slave: {s:?}");
    // Writes on a slave still fail as before, options or not.
    let s = slave.kv().put(put("a", "2", 1, 0)).await.unwrap_err();
    assert_status(
        "Put on the slave",
        &s,
        Code::FailedPrecondition,
        "read-only replica",
    );

    // (b) The slave frozen: its session stays connected, it acknowledges nothing.
    sigstop_and_wait(&slave).await;
    let s = mkv
        .put(put("frozen", "committed anyway", 1, SHORT_MS))
        .await
        .expect_err("a Put nobody acknowledges must time out");
    let index = assert_short("Put, slave frozen", &s, 0, 1);
    assert!(s.message().contains("(1 connected)"), "{s:?}");
    let g = master_get(&master, "frozen").await;
    assert!(g.found, "the timed-out write is not on the master");
    assert_eq!(g.value, b("committed anyway"));
    assert!(g.index >= index);
    // (e) a pipelined write times out the same way, its index and results filled.
    let answers = pipeline(
        &master,
        vec![kv::PipelineRequest {
            id: 7,
            ops: vec![op(kv::op::Op::IncrBy(kv::IncrByRequest {
                key: b("ctr"),
                delta: 10,
                ..Default::default()
            }))],
            min_replicas: 1,
            replica_timeout_ms: SHORT_MS,
        }],
    )
    .await;
    let p = &answers[0];
    assert_eq!(p.code, Code::DeadlineExceeded as i32, "{p:?}");
    assert!(p.index > index, "{p:?}");
    assert!(
        p.message
            .contains(&format!("committed on the master at index {};", p.index))
            && p.message.contains("0 of 1 slaves acknowledged"),
        "{p:?}"
    );
    assert_eq!(p.results.len(), 1, "{p:?}");
    let ctr = master_get(&master, "ctr").await;
    assert_eq!(ctr.value, b("16"), "the pipelined IncrBy is committed once");
    // (d) Wait counts 0 at its timeout, without an error.
    let w = wait_call(&master, 0, 1, SHORT_MS)
        .await
        .expect("Wait, frozen");
    assert_eq!(
        (w.acked, w.index),
        (0, p.index),
        "Wait with the slave frozen"
    );

    // Thawed, the slave gets every write, each once.
    slave.sigcont().unwrap();
    let w = wait_call(&master, p.index, 1, GENEROUS_MS)
        .await
        .expect("Wait, thawed");
    assert_eq!(w.acked, 1, "the thawed slave acknowledges");
    let mut skv = slave.kv();
    for (key, value) in [("frozen", "committed anyway"), ("ctr", "16"), ("log", "x;")] {
        let r = skv
            .get(kv::GetRequest {
                key: b(key),
                min_index: p.index,
                wait_ms: 10_000,
            })
            .await
            .unwrap_or_else(|e| panic!("Get {key} on the thawed slave: {e}"))
            .into_inner();
        assert_eq!(r.value, b(value), "{key} on the slave");
    }
    let at = support::converge(&master, &[&slave]).await;
    let mc = master.checksum().await.unwrap();
    assert_eq!(mc.index, at);
    assert_eq!(
        slave.checksum().await.unwrap(),
        mc,
        "the slave's data differs"
    );
}

/// Sends `reqs` on one Pipeline stream and returns the answers.
async fn pipeline(master: &Node, reqs: Vec<kv::PipelineRequest>) -> Vec<kv::PipelineResponse> {
    let n = reqs.len();
    let (tx, rx) = tokio::sync::mpsc::channel(n.max(1));
    for r in reqs {
        tx.send(r).await.unwrap();
    }
    drop(tx);
    let mut answers = master
        .kv()
        .pipeline(ReceiverStream::new(rx))
        .await
        .expect("Pipeline")
        .into_inner();
    let mut out = Vec::new();
    while let Some(a) = answers.message().await.expect("a Pipeline answer") {
        out.push(a);
    }
    assert_eq!(out.len(), n, "one answer per pipelined write");
    out
}

/// (c) `sync.min_replicas` from the environment applies to writes that say 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_masters_default_applies_to_plain_writes() {
    let dir = TestDir::new("semi-sync-default");
    let env = [
        ("TERN__SYNC__MIN_REPLICAS", "1"),
        ("TERN__SYNC__REPLICA_TIMEOUT_MS", "300"),
    ];
    let master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let mut mkv = master.kv();
    // No slave yet: a plain Put waits for one, then is answered committed.
    let s = mkv
        .put(put("k", "v1", 0, 0))
        .await
        .expect_err("no slave can acknowledge");
    let index = assert_short("plain Put, no slave", &s, 0, 1);
    assert!(s.message().contains("within 300 ms (0 connected)"), "{s:?}");
    assert_eq!(master_get(&master, "k").await.value, b("v1"));

    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 0).await;
    // The default timeout is short: give this one room, the default count holds.
    let r = mkv
        .put(put("k", "v2", 0, GENEROUS_MS))
        .await
        .expect("plain Put with a slave")
        .into_inner();
    assert_eq!(r.replicas_acked, 1, "{r:?}");
    assert!(r.index > index);
    assert_holds(&slave, r.index).await;
    // Wait's default timeout is the master's too: the slave holds it all.
    let w = wait_call(&master, 0, 1, 0)
        .await
        .expect("Wait with the default timeout");
    assert_eq!(w.acked, 1);
}

/// (f) Two slaves, one frozen: min_replicas 2 times out with 1 of 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_slaves_one_frozen_times_out_one_of_two() {
    let dir = TestDir::new("semi-sync-two");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let s1 = start_slave(&dir, "s1", &master, &[]).await;
    let s2 = start_slave(&dir, "s2", &master, &[]).await;
    wait_connected(&s1, 1).await;
    wait_connected(&s2, 1).await;
    let mut mkv = master.kv();
    let r = mkv
        .put(put("k", "both", 2, GENEROUS_MS))
        .await
        .expect("Put with both slaves")
        .into_inner();
    assert_eq!(r.replicas_acked, 2, "{r:?}");
    for s in [&s1, &s2] {
        assert_holds(s, r.index).await;
    }

    sigstop_and_wait(&s2).await;
    let s = mkv
        .put(put("k", "one", 2, SHORT_MS))
        .await
        .expect_err("only one slave can acknowledge");
    let index = assert_short("Put, one of two frozen", &s, 1, 2);
    assert!(s.message().contains("(2 connected)"), "{s:?}");
    // One is enough for min_replicas 1.
    let r = mkv
        .put(put("k2", "x", 1, GENEROUS_MS))
        .await
        .expect("Put with min_replicas 1, one slave frozen")
        .into_inner();
    assert_eq!(r.replicas_acked, 1);
    let w = wait_call(&master, index, 2, SHORT_MS).await.unwrap();
    assert_eq!(w.acked, 1, "Wait for 2 with one frozen");
    assert_eq!(master_get(&master, "k").await.value, b("one"));

    s2.sigcont().unwrap();
    let w = wait_call(&master, 0, 2, GENEROUS_MS).await.unwrap();
    assert_eq!(w.acked, 2, "both hold everything once thawed");
    let got = s2
        .kv()
        .get(kv::GetRequest {
            key: b("k"),
            min_index: index,
            wait_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b("one"));
}

/// A master asked to stop answers the writes waiting for slaves at once,
/// committed and with the count it has, and keeps them across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_master_answers_waiting_writes_as_committed() {
    let dir = TestDir::new("semi-sync-stop");
    let mut master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;
    sigstop_and_wait(&slave).await;
    let before = master.info().await.unwrap().last_index;
    let mut kv = master.kv();
    let waiting = tokio::spawn(async move { kv.put(put("k", "kept", 1, GENEROUS_MS)).await });
    // Committed (the master's binlog has it), now waiting for the frozen slave.
    support::wait_until("the write to commit", support::DEADLINE, || {
        let master = &master;
        async move {
            let last = master
                .info()
                .await
                .map_err(|e| format!("{e:#}"))?
                .last_index;
            Ok((last > before).then_some(()))
        }
    })
    .await;
    let status = master.sigterm_and_wait().await.unwrap();
    assert!(status.success(), "clean stop: {status}");
    let s = waiting
        .await
        .unwrap()
        .expect_err("the master stopped before a slave acknowledged");
    let index = assert_short("Put at shutdown", &s, 0, 1);
    assert!(index > before);
    // The wait ended with the stop, not at its own timeout.
    assert!(
        !s.message().contains(&format!("within {GENEROUS_MS} ms")),
        "{s:?}"
    );
    master.restart().await.unwrap();
    assert_eq!(master_get(&master, "k").await.value, b("kept"));
    slave.sigcont().unwrap();
}
