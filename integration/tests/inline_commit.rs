//! Writes committed inline: while one client writes alone and the write
//! path is idle, the master commits its write on the client's own thread
//! (`Info.counters.inline_commit_groups`), and otherwise on the committer's
//! thread. Either way every write is committed once, in each client's order,
//! and the slave holds what the master answered. A lone writer on a
//! `Pipeline` stream commits inline; another client's read or write sends
//! its next writes to the thread; unary calls (many clients may share one
//! connection) never commit inline; concurrent writers and a burst on one
//! stream keep their order.

mod support;

use bytes::Bytes;
use support::{converge, node_counters, start_slave, wait_connected};
use tern_common::proto::kv::v1 as kv;
use tern_integration::{Node, TestDir};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Writes of the lone writer, per phase (each an IncrBy and an Append).
const ALONE: u64 = 100;
/// Single groups in a row before a write may commit inline (the master's
/// `INLINE_AFTER_SINGLES`).
const INLINE_AFTER: u64 = 8;
/// Concurrent writers, and the writes of each.
const WRITERS: u64 = 8;
const EACH: u64 = 40;

fn b(s: impl Into<String>) -> Bytes {
    Bytes::from(s.into())
}

fn append_op(key: &str, tail: String) -> kv::Op {
    kv::Op {
        op: Some(kv::op::Op::Append(kv::AppendRequest {
            key: b(key),
            value: b(tail),
            ..Default::default()
        })),
    }
}

fn incr_op(key: &str) -> kv::Op {
    kv::Op {
        op: Some(kv::op::Op::IncrBy(kv::IncrByRequest {
            key: b(key),
            delta: 1,
            ..Default::default()
        })),
    }
}

/// `,from,from+1,...,to-1`: what appending each number in order makes.
fn sequence(from: u64, to: u64) -> String {
    (from..to).map(|i| format!(",{i}")).collect()
}

/// One client's `Pipeline` stream, one write in flight at a time.
struct Stream {
    tx: mpsc::Sender<kv::PipelineRequest>,
    answers: tonic::Streaming<kv::PipelineResponse>,
    next_id: u64,
}

impl Stream {
    async fn open(master: &Node) -> Stream {
        let (tx, rx) = mpsc::channel(1024);
        let answers = master
            .kv()
            .pipeline(ReceiverStream::new(rx))
            .await
            .expect("Pipeline on the master")
            .into_inner();
        Stream {
            tx,
            answers,
            next_id: 0,
        }
    }

    /// Sends `ops` as the next write without waiting; its id.
    async fn send(&mut self, ops: Vec<kv::Op>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let req = kv::PipelineRequest {
            id,
            ops,
            ..Default::default()
        };
        self.tx.send(req).await.expect("the stream is open");
        id
    }

    /// The next answer, which must be write `id`'s, committed.
    async fn answer(&mut self, id: u64) -> kv::PipelineResponse {
        let a = self
            .answers
            .message()
            .await
            .unwrap_or_else(|e| panic!("answer {id}: {e}"))
            .unwrap_or_else(|| panic!("the stream ended before answer {id}"));
        assert_eq!((a.id, a.code), (id, 0), "{}", a.message);
        a
    }

    /// One write, and its answer.
    async fn call(&mut self, ops: Vec<kv::Op>) -> kv::PipelineResponse {
        let id = self.send(ops).await;
        self.answer(id).await
    }
}

/// The lone writer's phase: `total` counted once per IncrBy, in order, and
/// each Append after the one before.
async fn lone_writes(s: &mut Stream, phase: &str, from: u64) {
    for i in from..from + ALONE {
        let a = s.call(vec![incr_op("total")]).await;
        match a.results.first().and_then(|r| r.result.as_ref()) {
            Some(kv::op_result::Result::IncrBy(v)) => {
                assert_eq!(v.value as u64, i + 1, "{phase}: IncrBy {i} counts once")
            }
            other => panic!("{phase}: IncrBy {i} answered {other:?}"),
        }
        s.call(vec![append_op("alone", format!(",{i}"))]).await;
    }
}

async fn get(node: &Node, key: &str, min_index: u64) -> Bytes {
    node.kv()
        .get(kv::GetRequest {
            key: b(key),
            min_index,
            wait_ms: 10_000,
        })
        .await
        .unwrap_or_else(|e| panic!("Get {key} on port {}: {e}", node.port))
        .into_inner()
        .value
}

/// Inline commit groups on `master` while `work` runs, and all groups.
async fn inline_during<F: Future<Output = ()>>(master: &Node, work: F) -> (u64, u64) {
    let before = node_counters(master).await;
    work.await;
    let after = node_counters(master).await;
    (
        after.inline_commit_groups - before.inline_commit_groups,
        after.commit_groups - before.commit_groups,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_commits_inline_and_every_write_lands_once_in_order() {
    let dir = TestDir::new("inline-commit");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;

    // One writer: after a few groups of one on the committer's thread, its
    // writes commit inline.
    let mut lone = Stream::open(&master).await;
    let (inline, groups) = inline_during(&master, lone_writes(&mut lone, "alone", 0)).await;
    println!("one writer: {inline} of {groups} groups inline");
    assert!(
        inline > 0,
        "one writer's {} writes: none committed inline ({groups} groups)",
        2 * ALONE
    );
    assert!(inline <= groups, "{inline} inline of {groups} groups");

    // Another client's read, or write, sends the lone writer's next
    // INLINE_AFTER writes through the committer's thread (its streak of
    // single groups starts again).
    for other in ["read", "write"] {
        let mut c = master.kv();
        if other == "read" {
            c.get(kv::GetRequest {
                key: b("total"),
                ..Default::default()
            })
            .await
            .expect("another client's Get");
        } else {
            c.incr_by(kv::IncrByRequest {
                key: b("other"),
                delta: 1,
                ..Default::default()
            })
            .await
            .expect("another client's IncrBy");
        }
        let key = format!("after-{other}");
        let (inline, groups) = inline_during(&master, async {
            for i in 0..INLINE_AFTER {
                lone.call(vec![append_op(&key, format!(",{i}"))]).await;
            }
        })
        .await;
        assert_eq!(
            (inline, groups),
            (0, INLINE_AFTER),
            "the {INLINE_AFTER} writes after another client's {other}: inline, groups"
        );
    }

    // Unary writers sharing one connection, one call each in flight: none
    // commits inline (their calls look alone), each one's order holds.
    let shared = master.kv();
    let (inline, _) = inline_during(&master, async {
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let mut c = shared.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..EACH {
                    c.txn(kv::TxnRequest {
                        ops: vec![
                            append_op(&format!("u/{w}"), format!(",{i}")),
                            incr_op("total"),
                        ],
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("unary writer {w}, write {i}: {e}"));
                }
            }));
        }
        for t in tasks {
            t.await.expect("a unary writer panicked");
        }
    })
    .await;
    assert_eq!(
        inline, 0,
        "unary writes on a shared connection committed inline"
    );

    // Streams at once, one write in flight each: each one's order holds.
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut s = Stream::open(&master).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                s.call(vec![
                    append_op(&format!("p/{w}"), format!(",{i}")),
                    incr_op("total"),
                ])
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("a stream writer panicked");
    }

    // A burst on the lone writer's stream, sent before any answer: answers
    // in order, committed in order.
    let mut ids = Vec::new();
    for i in 0..3 * ALONE {
        ids.push(lone.send(vec![append_op("burst", format!(",{i}"))]).await);
    }
    let mut last_index = 0;
    for id in ids {
        let index = lone.answer(id).await.index;
        assert!(
            index > last_index,
            "write {id} at {index} after {last_index}"
        );
        last_index = index;
    }

    // One writer again.
    let from = ALONE + 2 * WRITERS * EACH;
    lone_writes(&mut lone, "alone again", from).await;
    let end = node_counters(&master).await;
    println!(
        "in all: {} of {} groups inline",
        end.inline_commit_groups, end.commit_groups
    );

    // Master and slave hold exactly that.
    let target = converge(&master, &[&slave]).await;
    let total = from + ALONE;
    for node in [&master, &slave] {
        assert_eq!(get(node, "total", target).await, b(total.to_string()));
        let want_alone = format!("{}{}", sequence(0, ALONE), sequence(from, total));
        assert_eq!(get(node, "alone", target).await, b(want_alone));
        assert_eq!(get(node, "burst", target).await, b(sequence(0, 3 * ALONE)));
        assert_eq!(get(node, "other", target).await, b("1"));
        for other in ["read", "write"] {
            let key = format!("after-{other}");
            assert_eq!(get(node, &key, target).await, b(sequence(0, INLINE_AFTER)));
        }
        for w in 0..WRITERS {
            for prefix in ["u", "p"] {
                assert_eq!(
                    get(node, &format!("{prefix}/{w}"), target).await,
                    b(sequence(0, EACH)),
                    "writer {prefix}/{w} on port {}",
                    node.port
                );
            }
        }
    }
    let (mc, sc) = (
        master.checksum().await.unwrap(),
        slave.checksum().await.unwrap(),
    );
    assert_eq!(mc, sc, "slave Checksum equals the master's");
}
