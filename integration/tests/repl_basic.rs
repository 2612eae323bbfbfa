//! A master and one slave under concurrent load: the slave converges to the
//! master's exact data; a client reads its own master write from the slave
//! with `min_index`; the slave refuses writes ("read-only replica"); Scan on
//! the slave equals Scan on the master; an unreachable `min_index` is
//! OUT_OF_RANGE after `wait_ms`.

mod support;

use bytes::Bytes;
use support::{assert_replicas_equal, assert_status, scan_all, start_slave, wait_connected};
use tern_common::proto::kv::v1 as kv;
use tern_integration::{Node, TestDir, Workload};
use tonic::Code;

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slave_converges_serves_reads_and_refuses_writes() {
    let dir = TestDir::new("repl-basic");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;

    let work = Workload::new(8, 4);
    let load = work.start_load(&master.url(), 8);
    load.wait_acked(300, support::DEADLINE).await.unwrap();

    // Read-your-writes through the slave while the load runs.
    let mut mkv = master.kv();
    let mut skv = slave.kv();
    for i in 0..20 {
        let key = b(&format!("ryw/{i}"));
        let value = b(&format!("value-{i}"));
        let index = mkv
            .put(kv::PutRequest {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            })
            .await
            .expect("Put on the master")
            .into_inner()
            .index;
        let r = skv
            .get(kv::GetRequest {
                key: key.clone(),
                min_index: index,
                wait_ms: 10_000,
            })
            .await
            .unwrap_or_else(|e| panic!("Get ryw/{i} with min_index {index} on the slave: {e}"))
            .into_inner();
        assert!(
            r.found,
            "ryw/{i}: the slave served min_index {index} without the write"
        );
        assert_eq!(r.value, value, "ryw/{i}: value on the slave");
        assert!(
            r.index >= index,
            "ryw/{i}: served at index {} below min_index {index}",
            r.index
        );
    }

    // Writes on the slave are refused, whatever their kind, and change nothing.
    let op = |o| kv::Op { op: Some(o) };
    let attempts: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "Put",
            skv.put(kv::PutRequest {
                key: b("ryw/0"),
                value: b("x"),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "Delete",
            skv.delete(kv::DeleteRequest {
                key: b("ryw/0"),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "IncrBy",
            skv.incr_by(kv::IncrByRequest {
                key: b("c0"),
                delta: 1,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "Append",
            skv.append(kv::AppendRequest {
                key: b("a0"),
                value: b("zz;"),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "Txn",
            skv.txn(kv::TxnRequest {
                ops: vec![
                    op(kv::op::Op::Put(kv::PutRequest {
                        key: b("ryw/1"),
                        value: b("x"),
                        ..Default::default()
                    })),
                    op(kv::op::Op::IncrBy(kv::IncrByRequest {
                        key: b("c1"),
                        delta: 1,
                        ..Default::default()
                    })),
                ],
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
    ];
    for (what, r) in attempts {
        let s = r.expect_err(&format!("{what} on the slave must fail"));
        assert_status(
            &format!("{what} on the slave"),
            &s,
            Code::FailedPrecondition,
            "read-only replica",
        );
    }

    let stats = load.stop().await;
    assert!(
        stats.unexpected.is_empty(),
        "errors a correct master never returns: {:?}",
        stats.unexpected
    );
    assert_eq!(
        stats.failed, 0,
        "writes failed on a healthy master: {stats:?}"
    );

    let target = assert_replicas_equal(&master, &[&slave], &work).await;

    // Scan on the slave equals Scan on the master (paged, at the same index).
    let (m_items, m_index) = scan_all(&mut mkv).await;
    let (s_items, s_index) = scan_all(&mut skv).await;
    assert_eq!(m_index, target);
    assert_eq!(s_index, target);
    assert!(m_items.len() > 20, "the load wrote keys");
    assert_eq!(
        s_items.len(),
        m_items.len(),
        "Scan returns as many items on the slave as on the master"
    );
    assert!(
        s_items == m_items,
        "Scan on the slave differs from the master"
    );
    // A bounded range too.
    let req = kv::ScanRequest {
        start: b("ryw/"),
        end: b("ryw0"),
        limit: 0,
        min_index: target,
        wait_ms: 1000,
    };
    let ms = mkv.scan(req.clone()).await.unwrap().into_inner();
    let ss = skv.scan(req).await.unwrap().into_inner();
    assert_eq!(ms.items.len(), 20);
    assert_eq!(ms.items, ss.items);

    // The slave wrote nothing: the refused ryw/0 and ryw/1 are the master's values.
    for i in [0, 1] {
        let r = skv
            .get(kv::GetRequest {
                key: b(&format!("ryw/{i}")),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.value, b(&format!("value-{i}")));
    }

    // A min_index the slave will not reach in time: OUT_OF_RANGE, for Get and Scan.
    let far = target + 1_000_000;
    let s = skv
        .get(kv::GetRequest {
            key: b("ryw/0"),
            min_index: far,
            wait_ms: 200,
        })
        .await
        .expect_err("Get with an unreachable min_index must fail");
    assert_status("Get min_index far ahead", &s, Code::OutOfRange, "min_index");
    let s = skv
        .scan(kv::ScanRequest {
            min_index: far,
            wait_ms: 200,
            ..Default::default()
        })
        .await
        .expect_err("Scan with an unreachable min_index must fail");
    assert_eq!(
        s.code(),
        Code::OutOfRange,
        "Scan min_index far ahead: {s:?}"
    );

    // Still healthy and equal after all that.
    assert_replicas_equal(&master, &[&slave], &work).await;
}
