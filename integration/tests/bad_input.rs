//! Bad input over gRPC gets a clear status and changes nothing; good input
//! round-trips with consistent indexes.

use bytes::Bytes;
use tern_common::limits::{LimitError, MAX_KEY_BYTES, MAX_TXN_BYTES, MAX_TXN_OPS, MAX_VALUE_BYTES};
use tern_common::proto::kv::v1::{self as kv, kv_client::KvClient};
use tern_integration::workload::get;
use tern_integration::{Node, TestDir};
use tonic::Code;
use tonic::transport::Channel;

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

fn put_op(key: Bytes, value: Bytes) -> kv::Op {
    kv::Op {
        op: Some(kv::op::Op::Put(kv::PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

fn incr_op(key: Bytes, delta: i64) -> kv::Op {
    kv::Op {
        op: Some(kv::op::Op::IncrBy(kv::IncrByRequest {
            key,
            delta,
            ..Default::default()
        })),
    }
}

fn append_op(key: Bytes, value: Bytes) -> kv::Op {
    kv::Op {
        op: Some(kv::op::Op::Append(kv::AppendRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

/// Asserts `r` failed with `code` and a message containing every one of `words`.
fn expect_status<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    words: &[&str],
) {
    match r {
        Ok(resp) => panic!("{what}: expected {code:?}, got OK {:?}", resp.into_inner()),
        Err(s) => {
            assert_eq!(
                s.code(),
                code,
                "{what}: wrong code, message {:?}",
                s.message()
            );
            for w in words {
                assert!(
                    s.message().contains(w),
                    "{what}: message {:?} should mention {w:?}",
                    s.message()
                );
            }
        }
    }
}

async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> u64 {
    kv.put(kv::PutRequest {
        key: b(key),
        value: b(value),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("Put {key}: {e}"))
    .into_inner()
    .index
}

#[tokio::test]
async fn oversized_and_empty_input_is_invalid_argument() {
    let dir = TestDir::new("bad-input-limits");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let mut kv = master.kv();
    let before = master.checksum().await.unwrap();

    let r = kv
        .put(kv::PutRequest {
            key: Bytes::new(),
            value: b("v"),
            ..Default::default()
        })
        .await;
    expect_status(
        "Put empty key",
        r,
        Code::InvalidArgument,
        &[&LimitError::EmptyKey.to_string()],
    );
    let r = kv.get(kv::GetRequest::default()).await;
    expect_status(
        "Get empty key",
        r,
        Code::InvalidArgument,
        &["key must not be empty"],
    );

    let long_key = Bytes::from(vec![b'k'; MAX_KEY_BYTES + 1]);
    let r = kv
        .put(kv::PutRequest {
            key: long_key.clone(),
            value: b("v"),
            ..Default::default()
        })
        .await;
    let msg = LimitError::KeyTooLong {
        len: MAX_KEY_BYTES + 1,
    }
    .to_string();
    expect_status("Put 64 KiB + 1 key", r, Code::InvalidArgument, &[&msg]);
    let r = kv
        .incr_by(kv::IncrByRequest {
            key: long_key.clone(),
            delta: 1,
            ..Default::default()
        })
        .await;
    expect_status("IncrBy 64 KiB + 1 key", r, Code::InvalidArgument, &[&msg]);

    let big_value = Bytes::from(vec![b'v'; MAX_VALUE_BYTES + 1]);
    let r = kv
        .put(kv::PutRequest {
            key: b("k"),
            value: big_value.clone(),
            ..Default::default()
        })
        .await;
    let msg = LimitError::ValueTooLong {
        len: MAX_VALUE_BYTES + 1,
    }
    .to_string();
    expect_status("Put 16 MiB + 1 value", r, Code::InvalidArgument, &[&msg]);
    let r = kv
        .append(kv::AppendRequest {
            key: b("k"),
            value: big_value,
            ..Default::default()
        })
        .await;
    expect_status("Append 16 MiB + 1 value", r, Code::InvalidArgument, &[&msg]);

    let ops: Vec<kv::Op> = (0..=MAX_TXN_OPS)
        .map(|i| put_op(Bytes::from(format!("t{i}")), b("v")))
        .collect();
    let r = kv
        .txn(kv::TxnRequest {
            ops,
            ..Default::default()
        })
        .await;
    let msg = LimitError::TooManyOps {
        ops: MAX_TXN_OPS + 1,
    }
    .to_string();
    expect_status("Txn with 10,001 ops", r, Code::InvalidArgument, &[&msg]);

    let r = kv
        .txn(kv::TxnRequest {
            ops: vec![],
            ..Default::default()
        })
        .await;
    expect_status(
        "empty Txn",
        r,
        Code::InvalidArgument,
        &[&LimitError::EmptyTxn.to_string()],
    );

    // Five values just under the value limit: each op is valid, the total is not.
    let value = Bytes::from(vec![b'x'; MAX_TXN_BYTES / 5 + 1024]);
    assert!(value.len() <= MAX_VALUE_BYTES && 5 * value.len() > MAX_TXN_BYTES);
    let ops: Vec<kv::Op> = (0..5)
        .map(|i| put_op(Bytes::from(format!("big{i}")), value.clone()))
        .collect();
    let r = kv
        .txn(kv::TxnRequest {
            ops,
            ..Default::default()
        })
        .await;
    expect_status(
        "Txn over 64 MiB",
        r,
        Code::InvalidArgument,
        &["txn holds", &format!("the limit is {MAX_TXN_BYTES}")],
    );

    // A bad op deep inside a Txn is named by its position.
    let ops = vec![
        put_op(b("ok1"), b("v")),
        put_op(b("ok2"), b("v")),
        put_op(Bytes::new(), b("v")),
    ];
    let r = kv
        .txn(kv::TxnRequest {
            ops,
            ..Default::default()
        })
        .await;
    expect_status(
        "Txn with an empty key at op 2",
        r,
        Code::InvalidArgument,
        &["op 2", "empty"],
    );
    let r = kv
        .txn(kv::TxnRequest {
            ops: vec![kv::Op { op: None }],
            ..Default::default()
        })
        .await;
    expect_status("Txn with an unset op", r, Code::InvalidArgument, &["op 0"]);

    // None of that wrote anything.
    let after = master.checksum().await.unwrap();
    assert_eq!(after, before, "rejected requests must not change the data");
    assert_eq!(get(&mut kv, b"ok1").await.unwrap(), None);

    // Exactly at the limits is fine.
    let max_key = Bytes::from(vec![b'k'; MAX_KEY_BYTES]);
    kv.put(kv::PutRequest {
        key: max_key.clone(),
        value: b("at the key limit"),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        get(&mut kv, &max_key).await.unwrap(),
        Some(b("at the key limit"))
    );
}

#[tokio::test]
async fn failed_preconditions_leave_no_effect() {
    let dir = TestDir::new("bad-input-precondition");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let mut kv = master.kv();

    put(&mut kv, "text", "not a number").await;
    put(&mut kv, "max", &i64::MAX.to_string()).await;
    put(&mut kv, "min", &i64::MIN.to_string()).await;
    put(&mut kv, "k", "old").await;
    put(&mut kv, "n", "10").await;

    let r = kv
        .incr_by(kv::IncrByRequest {
            key: b("text"),
            delta: 1,
            ..Default::default()
        })
        .await;
    expect_status(
        "IncrBy on a non-integer",
        r,
        Code::FailedPrecondition,
        &["integer", "text"],
    );
    let r = kv
        .incr_by(kv::IncrByRequest {
            key: b("max"),
            delta: 1,
            ..Default::default()
        })
        .await;
    expect_status(
        "IncrBy overflow",
        r,
        Code::FailedPrecondition,
        &["overflow", "max"],
    );
    let r = kv
        .incr_by(kv::IncrByRequest {
            key: b("min"),
            delta: -1,
            ..Default::default()
        })
        .await;
    expect_status(
        "IncrBy underflow",
        r,
        Code::FailedPrecondition,
        &["overflow", "min"],
    );
    assert_eq!(
        get(&mut kv, b"max").await.unwrap(),
        Some(b(&i64::MAX.to_string()))
    );
    assert_eq!(
        get(&mut kv, b"text").await.unwrap(),
        Some(b("not a number"))
    );

    let before = master.checksum().await.unwrap();
    // The first op of each Txn would succeed alone; the second fails it all.
    let r = kv
        .txn(kv::TxnRequest {
            ops: vec![put_op(b("k"), b("new")), incr_op(b("text"), 1)],
            ..Default::default()
        })
        .await;
    expect_status(
        "Txn put + bad incr",
        r,
        Code::FailedPrecondition,
        &["integer"],
    );
    let r = kv
        .txn(kv::TxnRequest {
            ops: vec![incr_op(b("n"), 5), incr_op(b("max"), 1)],
            ..Default::default()
        })
        .await;
    expect_status(
        "Txn incr + overflowing incr",
        r,
        Code::FailedPrecondition,
        &["overflow"],
    );
    assert_eq!(
        master.checksum().await.unwrap(),
        before,
        "failed Txns changed the data"
    );
    // The second op sees the first op's effect (MAX - 10 + 10 is fine, + 1
    // overflows only because of it), and the whole Txn still has no effect.
    put(&mut kv, "near", &(i64::MAX - 10).to_string()).await;
    let before_near = master.checksum().await.unwrap();
    let r = kv
        .txn(kv::TxnRequest {
            ops: vec![incr_op(b("near"), 10), incr_op(b("near"), 1)],
            ..Default::default()
        })
        .await;
    expect_status(
        "Txn whose 2nd incr overflows the 1st",
        r,
        Code::FailedPrecondition,
        &["overflow"],
    );
    assert_eq!(master.checksum().await.unwrap(), before_near);
    let r = kv
        .txn(kv::TxnRequest {
            ops: vec![append_op(b("k"), b("-tail")), incr_op(b("k"), 1)],
            ..Default::default()
        })
        .await;
    expect_status(
        "Txn append + incr on the appended text",
        r,
        Code::FailedPrecondition,
        &[],
    );

    assert_eq!(
        get(&mut kv, b"k").await.unwrap(),
        Some(b("old")),
        "Txn's 1st op leaked"
    );
    assert_eq!(
        get(&mut kv, b"n").await.unwrap(),
        Some(b("10")),
        "Txn's 1st op leaked"
    );
    assert_eq!(
        get(&mut kv, b"near").await.unwrap(),
        Some(b(&(i64::MAX - 10).to_string()))
    );

    // An Append that would grow a value past the value limit.
    let full = Bytes::from(vec![b'f'; MAX_VALUE_BYTES]);
    kv.put(kv::PutRequest {
        key: b("full"),
        value: full.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let before_full = master.checksum().await.unwrap();
    let r = kv
        .append(kv::AppendRequest {
            key: b("full"),
            value: b("!"),
            ..Default::default()
        })
        .await;
    expect_status(
        "Append past the value limit",
        r,
        Code::FailedPrecondition,
        &["full"],
    );
    assert_eq!(master.checksum().await.unwrap(), before_full);
    assert_eq!(
        get(&mut kv, b"full").await.unwrap().map(|v| v.len()),
        Some(MAX_VALUE_BYTES)
    );

    let info = master.info().await.unwrap();
    assert_eq!(info.applied_index, info.last_index);
}

#[tokio::test]
async fn writes_round_trip_with_consistent_indexes() {
    let dir = TestDir::new("bad-input-roundtrip");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let mut kv = master.kv();

    let mut last = 0;
    for i in 0..20 {
        let w = put(&mut kv, &format!("rt/{i:02}"), &format!("value-{i}")).await;
        assert!(w > last, "commit indexes increase: {w} after {last}");
        last = w;
        let g = kv
            .get(kv::GetRequest {
                key: Bytes::from(format!("rt/{i:02}")),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(g.found);
        assert_eq!(g.value, Bytes::from(format!("value-{i}")));
        assert!(g.index >= w, "read index {} < write index {w}", g.index);
    }
    let s = kv
        .scan(kv::ScanRequest {
            start: b("rt/"),
            end: b("rt0"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.index >= last,
        "scan index {} < last write index {last}",
        s.index
    );
    assert!(!s.more);
    let got: Vec<(Bytes, Bytes)> = s.items.into_iter().map(|kv| (kv.key, kv.value)).collect();
    let want: Vec<(Bytes, Bytes)> = (0..20)
        .map(|i| {
            (
                Bytes::from(format!("rt/{i:02}")),
                Bytes::from(format!("value-{i}")),
            )
        })
        .collect();
    assert_eq!(got, want);

    // Scan limit and continuation.
    let s = kv
        .scan(kv::ScanRequest {
            start: b("rt/"),
            end: b("rt0"),
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.items.len(), 5);
    assert!(s.more);
    assert_eq!(s.items[4].key, b("rt/04"));

    // IncrBy / Append / Delete / Txn results.
    let r = kv
        .incr_by(kv::IncrByRequest {
            key: b("ctr"),
            delta: 41,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.value, 41);
    assert!(r.index > last);
    let r = kv
        .incr_by(kv::IncrByRequest {
            key: b("ctr"),
            delta: -42,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.value, -1);
    let r = kv
        .append(kv::AppendRequest {
            key: b("log"),
            value: b("ab"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.length, 2);
    let t = kv
        .txn(kv::TxnRequest {
            ops: vec![
                append_op(b("log"), b("cd")),
                incr_op(b("ctr"), 3),
                put_op(b("rt/00"), b("changed")),
                kv::Op {
                    op: Some(kv::op::Op::Delete(kv::DeleteRequest {
                        key: b("rt/01"),
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.results.len(), 4);
    match &t.results[0].result {
        Some(kv::op_result::Result::Append(a)) => assert_eq!(a.length, 4),
        other => panic!("Txn result 0: {other:?}"),
    }
    match &t.results[1].result {
        Some(kv::op_result::Result::IncrBy(i)) => assert_eq!(i.value, 2),
        other => panic!("Txn result 1: {other:?}"),
    }
    let g = kv
        .get(kv::GetRequest {
            key: b("log"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.value, b("abcd"));
    assert!(g.index >= t.index);
    assert_eq!(get(&mut kv, b"ctr").await.unwrap(), Some(b("2")));
    assert_eq!(get(&mut kv, b"rt/00").await.unwrap(), Some(b("changed")));
    assert_eq!(get(&mut kv, b"rt/01").await.unwrap(), None);
    let d = kv
        .delete(kv::DeleteRequest {
            key: b("rt/02"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.index > t.index);
    assert_eq!(get(&mut kv, b"rt/02").await.unwrap(), None);

    // min_index: a read waits for (or is served at) the index asked for.
    let g = kv
        .get(kv::GetRequest {
            key: b("ctr"),
            min_index: d.index,
            wait_ms: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(g.index >= d.index);

    let info = master.info().await.unwrap();
    assert_eq!(info.role, "master");
    assert_eq!(info.applied_index, d.index);
    assert_eq!(info.last_index, d.index);
    let c = master.checksum().await.unwrap();
    assert_eq!(c.index, d.index);
    // 20 rt/ keys - 2 deleted + ctr + log.
    assert_eq!(c.keys, 20);
}
