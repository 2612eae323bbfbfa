//! `Kv.Pipeline`: many writes on one stream, sent without waiting, answered
//! in request order. Each write is its own transaction, committed in stream
//! order; a failing write is answered with its code and the stream goes on;
//! the slave holds exactly what the master answered; a slave refuses the
//! stream ("read-only replica"); a master that shuts down answers what it
//! queued and ends the stream with UNAVAILABLE.

mod support;

use bytes::Bytes;
use support::{assert_status, converge, start_slave, wait_connected};
use tern_common::proto::kv::v1 as kv;
use tern_integration::{Node, TestDir};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Writes sent before the first answer is read: more than the server's
/// in-flight bound (1024), so its back-pressure is on the path.
const WRITES: u64 = 3000;

fn b(s: impl Into<String>) -> Bytes {
    Bytes::from(s.into())
}

fn put(key: Bytes, value: Bytes) -> kv::Op {
    kv::Op {
        op: Some(kv::op::Op::Put(kv::PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

fn incr(key: &str, delta: i64) -> kv::Op {
    kv::Op {
        op: Some(kv::op::Op::IncrBy(kv::IncrByRequest {
            key: b(key),
            delta,
            ..Default::default()
        })),
    }
}

/// What write `id` is, and the code its answer must carry.
fn request(id: u64) -> (kv::PipelineRequest, Code) {
    let (ops, code) = if id == 1 {
        (vec![put(b("text"), b("not a number"))], Code::Ok)
    } else if id == 2 {
        (vec![put(b("n"), b("5"))], Code::Ok)
    } else if id == 3 {
        // Reads what write 2 left, most likely in the same group.
        (vec![incr("n", 1)], Code::Ok)
    } else if id.is_multiple_of(97) {
        // Empty key: refused before it is queued.
        (vec![put(Bytes::new(), b("x"))], Code::InvalidArgument)
    } else if id.is_multiple_of(89) {
        // Refused by the committer: the value is not an integer.
        (vec![incr("text", 1)], Code::FailedPrecondition)
    } else if id.is_multiple_of(10) {
        (vec![incr("ctr", 1)], Code::Ok)
    } else if id.is_multiple_of(7) {
        // A transaction of three ops.
        (
            vec![
                put(b(format!("t/{id}/a")), b("A")),
                put(b(format!("t/{id}/b")), b("B")),
                incr("ctr", 1),
            ],
            Code::Ok,
        )
    } else {
        (
            vec![put(b(format!("p/{id}")), b(format!("v{id}")))],
            Code::Ok,
        )
    };
    (
        kv::PipelineRequest {
            id,
            ops,
            ..Default::default()
        },
        code,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_writes_answer_and_commit_in_order() {
    let dir = TestDir::new("pipeline");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;

    // Queue every write before reading any answer.
    let (tx, rx) = tokio::sync::mpsc::channel(WRITES as usize);
    let mut expected = Vec::new();
    for id in 1..=WRITES {
        let (req, code) = request(id);
        expected.push((id, code, req.ops.len()));
        tx.send(req).await.unwrap();
    }
    drop(tx);
    let mut answers = master
        .kv()
        .pipeline(ReceiverStream::new(rx))
        .await
        .expect("Pipeline on the master")
        .into_inner();

    let mut last_index = 0;
    let mut ctr = 0i64;
    let mut committed = 0u64;
    for (id, code, ops) in expected {
        let a = answers
            .message()
            .await
            .unwrap_or_else(|e| panic!("answer {id}: stream failed: {e}"))
            .unwrap_or_else(|| panic!("the stream ended before answer {id}"));
        assert_eq!(a.id, id, "answers come in request order");
        assert_eq!(
            Code::from_i32(a.code),
            code,
            "write {id}: {:?} {}",
            a.code,
            a.message
        );
        if code != Code::Ok {
            assert_eq!((a.index, a.results.len()), (0, 0), "write {id} failed");
            assert!(!a.message.is_empty(), "write {id}: an error says why");
            continue;
        }
        committed += 1;
        assert!(
            a.index > last_index,
            "write {id} committed at {} after {last_index}: stream order is commit order",
            a.index
        );
        last_index = a.index;
        assert_eq!(a.results.len(), ops, "write {id}: one result per op");
        for r in &a.results {
            if let Some(kv::op_result::Result::IncrBy(v)) = &r.result {
                if id == 3 {
                    assert_eq!(v.value, 6, "write 3 reads the 5 that write 2 put");
                    continue;
                }
                ctr += 1;
                assert_eq!(
                    v.value, ctr,
                    "write {id}: the counter counts every IncrBy once"
                );
                assert_eq!(v.index, a.index);
            }
        }
    }
    assert!(
        answers.message().await.unwrap().is_none(),
        "one answer per write, then the end"
    );
    assert!(committed > WRITES * 9 / 10, "{committed} writes committed");

    // The master's state and the slave's equal what the answers said.
    let target = converge(&master, &[&slave]).await;
    assert_eq!(
        target, last_index,
        "the last answer is the master's last index"
    );
    let (mc, sc) = (
        master.checksum().await.unwrap(),
        slave.checksum().await.unwrap(),
    );
    assert_eq!(mc, sc, "slave Checksum equals the master's");
    for node in [&master, &slave] {
        let mut c = node.kv();
        let get = |key: &str| kv::GetRequest {
            key: b(key),
            min_index: target,
            wait_ms: 10_000,
        };
        let v = c.get(get("ctr")).await.unwrap().into_inner();
        assert_eq!(v.value, b(ctr.to_string()), "counter on port {}", node.port);
        let v = c.get(get("p/4")).await.unwrap().into_inner();
        assert_eq!(v.value, b("v4"));
        let v = c.get(get("n")).await.unwrap().into_inner();
        assert_eq!(v.value, b("6"));
        let v = c.get(get("t/7/b")).await.unwrap().into_inner();
        assert_eq!(v.value, b("B"));
        let v = c.get(get("text")).await.unwrap().into_inner();
        assert_eq!(v.value, b("not a number"), "failed IncrBys changed nothing");
    }

    // A slave refuses the stream.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(request(4).0).await.unwrap();
    let refused = slave
        .kv()
        .pipeline(ReceiverStream::new(rx))
        .await
        .expect_err("Pipeline on a slave");
    assert_status(
        "Pipeline on a slave",
        &refused,
        Code::FailedPrecondition,
        "read-only replica",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_queued_writes_and_ends_the_stream() {
    let dir = TestDir::new("pipeline-shutdown");
    let mut master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut answers = master
        .kv()
        .pipeline(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(request(4).0).await.unwrap();
    let a = answers.message().await.unwrap().unwrap();
    assert_eq!((a.id, a.code), (4, 0));
    // The stream stays open (the client keeps its side open) while the
    // master stops: the stream ends with UNAVAILABLE and the stop is clean.
    let status = master.sigterm_and_wait().await.unwrap();
    assert!(status.success(), "master exit: {status:?}");
    let end = answers
        .message()
        .await
        .expect_err("the stream ends with an error");
    assert_status(
        "stream end at shutdown",
        &end,
        Code::Unavailable,
        "shutting down",
    );
    drop(tx);
    // The write it answered is durable: it is there after a restart.
    master.restart().await.unwrap();
    let v = master
        .kv()
        .get(kv::GetRequest {
            key: b("p/4"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.value, b("v4"));
}
