//! Writes committed inline: while one client writes alone and the write
//! path is idle, the master commits its write on the client's own thread
//! (`Info.counters.inline_commit_groups`), and otherwise on the committer's
//! thread. Either way every write is committed once, in each client's order,
//! and the slave holds what the master answered: one writer (unary calls and
//! a Pipeline stream sending one write at a time, then a burst), then eight
//! at once, then one again; and another client's read or write sends the
//! lone writer's next writes to the committer's thread.

mod support;

use bytes::Bytes;
use support::{converge, node_counters, start_slave, wait_connected};
use tern_common::proto::kv::v1 as kv;
use tern_common::proto::kv::v1::kv_client::KvClient;
use tern_integration::{Node, TestDir};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Writes of the lone writer, per phase.
const ALONE: u64 = 150;
/// Single groups in a row before a write may commit inline (the master's
/// `INLINE_AFTER_SINGLES`).
const INLINE_AFTER: u64 = 8;
/// Concurrent writers, and the writes of each.
const WRITERS: u64 = 8;
const EACH: u64 = 60;

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

/// One client, unary calls one after the other: each IncrBy answers the
/// count so far (every write once, in order), and each Append lands after
/// the one before.
async fn lone_unary(c: &mut KvClient<Channel>, phase: &str, from: u64) {
    for i in from..from + ALONE {
        let r = c
            .incr_by(kv::IncrByRequest {
                key: b("total"),
                delta: 1,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{phase}: IncrBy {i}: {e}"))
            .into_inner();
        assert_eq!(r.value as u64, i + 1, "{phase}: IncrBy {i} counts once");
        c.append(kv::AppendRequest {
            key: b("alone"),
            value: b(format!(",{i}")),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{phase}: Append {i}: {e}"));
    }
}

/// Pipeline write `id`: append `,id` to `piped`.
fn piped(id: u64) -> kv::PipelineRequest {
    kv::PipelineRequest {
        id,
        ops: vec![append_op("piped", format!(",{id}"))],
        ..Default::default()
    }
}

/// The next Pipeline answer: write `id`'s, committed; its index.
async fn next_answer(answers: &mut tonic::Streaming<kv::PipelineResponse>, id: u64) -> u64 {
    let a = answers
        .message()
        .await
        .unwrap_or_else(|e| panic!("pipeline answer {id}: {e}"))
        .unwrap_or_else(|| panic!("the stream ended before answer {id}"));
    assert_eq!((a.id, a.code), (id, 0), "{}", a.message);
    a.index
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
    let before = node_counters(&master).await;
    let mut lone = master.kv();
    lone_unary(&mut lone, "alone, first", 0).await;
    let alone = node_counters(&master).await;
    let inline = alone.inline_commit_groups - before.inline_commit_groups;
    let groups = alone.commit_groups - before.commit_groups;
    println!("one writer: {inline} of {groups} groups inline");
    assert!(
        inline > 0,
        "one writer's {} writes: none committed inline ({groups} groups)",
        2 * ALONE
    );
    assert!(inline <= groups, "{inline} inline of {groups} groups");

    // Another client's read, or write, makes the lone writer's next
    // INLINE_AFTER writes go through the committer's thread (its streak of
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
        let before = node_counters(&master).await;
        for i in 0..INLINE_AFTER {
            lone.append(kv::AppendRequest {
                key: b(format!("after-{other}")),
                value: b(format!(",{i}")),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("Append {i} after another client's {other}: {e}"));
        }
        let after = node_counters(&master).await;
        assert_eq!(
            after.inline_commit_groups - before.inline_commit_groups,
            0,
            "the {INLINE_AFTER} writes after another client's {other} committed on the thread"
        );
        assert_eq!(after.commit_groups - before.commit_groups, INLINE_AFTER);
    }

    // A Pipeline stream with one write in flight, then a burst of writes
    // sent before any answer: each answer in order, committed in order.
    let (tx, rx) = tokio::sync::mpsc::channel(4 * ALONE as usize);
    let mut answers = master
        .kv()
        .pipeline(ReceiverStream::new(rx))
        .await
        .expect("Pipeline on the master")
        .into_inner();
    let mut last_index = 0;
    for id in 0..ALONE {
        tx.send(piped(id)).await.unwrap();
        let index = next_answer(&mut answers, id).await;
        assert!(
            index > last_index,
            "write {id} at {index} after {last_index}"
        );
        last_index = index;
    }
    for id in ALONE..3 * ALONE {
        tx.send(piped(id)).await.unwrap();
    }
    for id in ALONE..3 * ALONE {
        let index = next_answer(&mut answers, id).await;
        assert!(
            index > last_index,
            "write {id} at {index} after {last_index}"
        );
        last_index = index;
    }
    drop(tx);

    // Eight writers at once, each on its own connection: each one's writes
    // in its order, the shared counter counting every one once.
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = master.kv();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                c.txn(kv::TxnRequest {
                    ops: vec![
                        append_op(&format!("w/{w}"), format!(",{i}")),
                        incr_op("total"),
                    ],
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("writer {w}, write {i}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("a writer panicked");
    }

    // One writer again.
    lone_unary(&mut master.kv(), "alone, last", ALONE + WRITERS * EACH).await;
    let end = node_counters(&master).await;
    println!(
        "in all: {} of {} groups inline",
        end.inline_commit_groups, end.commit_groups
    );

    // Master and slave hold exactly that.
    let target = converge(&master, &[&slave]).await;
    let total = 2 * ALONE + WRITERS * EACH;
    for node in [&master, &slave] {
        assert_eq!(get(node, "total", target).await, b(total.to_string()));
        let want_alone = format!("{}{}", sequence(0, ALONE), sequence(total - ALONE, total));
        assert_eq!(get(node, "alone", target).await, b(want_alone));
        assert_eq!(get(node, "piped", target).await, b(sequence(0, 3 * ALONE)));
        assert_eq!(get(node, "other", target).await, b("1"));
        for other in ["read", "write"] {
            let key = format!("after-{other}");
            assert_eq!(get(node, &key, target).await, b(sequence(0, INLINE_AFTER)));
        }
        for w in 0..WRITERS {
            assert_eq!(
                get(node, &format!("w/{w}"), target).await,
                b(sequence(0, EACH)),
                "writer {w} on port {}",
                node.port
            );
        }
    }
    let (mc, sc) = (
        master.checksum().await.unwrap(),
        slave.checksum().await.unwrap(),
    );
    assert_eq!(mc, sc, "slave Checksum equals the master's");
}
