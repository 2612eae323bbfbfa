//! Online consistency checks (`sync.verify_interval_secs`): the master logs
//! check points and its keyspace digest at each; every slave digests its
//! own state at the same point and compares.
//!
//! - `healthy_replication_never_mismatches`: two slaves under a paced load,
//!   one SIGKILLed and restarted and one frozen past the link timeout
//!   meanwhile: checks pass on both (`verify_checks` moves,
//!   `verify_mismatches` stays 0) and every node ends equal.
//! - `a_changed_value_is_caught_and_reads_stop`: a value changed directly in
//!   a stopped slave's RocksDB is detected at the next check: counted, named
//!   in `Info.verify_mismatch`, and reads are refused (UNAVAILABLE) over gRPC,
//!   also after a restart, while the master and a healthy slave are fine.

mod support;

use std::time::Duration;

use support::{
    DEADLINE, FAST_LINK, PacedLoad, converge, put_keys, sigstop_and_wait, slave_counters,
    wait_until,
};
use tern_common::proto::admin::v1 as admin;
use tern_common::proto::kv::v1 as kv;
use tern_integration::{Node, TestDir, Workload};
use tonic::Code;

fn env() -> Vec<(&'static str, &'static str)> {
    let mut v = FAST_LINK.to_vec();
    v.push(("TERN__SYNC__VERIFY_INTERVAL_SECS", "1"));
    v
}

/// Waits until `node` compared (or, a master, logged) `n` more digests.
async fn wait_checks(node: &Node, from: u64, n: u64) -> admin::InfoResponse {
    wait_until(
        &format!("{n} more consistency checks on port {}", node.port),
        DEADLINE,
        || async move {
            let i = node.info().await.map_err(|e| format!("{e:#}"))?;
            let c = i.counters.unwrap_or_default();
            if c.verify_checks >= from + n {
                Ok(Some(i))
            } else {
                Err(format!(
                    "checks {} mismatches {} last point {}",
                    c.verify_checks, c.verify_mismatches, i.last_verify_index
                ))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_replication_never_mismatches() {
    let dir = TestDir::new("verify-healthy");
    let env = env();
    let master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let mut a = Node::start_slave(&dir.join("a"), &master.url(), &env, &[])
        .await
        .unwrap();
    let b = Node::start_slave(&dir.join("b"), &master.url(), &env, &[])
        .await
        .unwrap();
    let work = Workload::new(16, 16);
    let load = PacedLoad::start(&work, &master.url(), 2, Duration::from_millis(2));
    load.wait_more(300).await;
    wait_checks(&b, 0, 1).await;
    a.sigkill().unwrap();
    load.wait_more(200).await;
    a.restart().await.unwrap();
    sigstop_and_wait(&b).await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    b.sigcont().unwrap();
    load.wait_more(300).await;
    // Checks after the faults, on both slaves.
    let ac = slave_counters(&a.info().await.unwrap()).verify_checks;
    let bc = slave_counters(&b.info().await.unwrap()).verify_checks;
    wait_checks(&a, ac, 2).await;
    wait_checks(&b, bc, 2).await;
    let stats = load.stop().await;
    assert!(stats.acked > 0);
    converge(&master, &[&a, &b]).await;
    let mc = master.checksum().await.unwrap();
    for n in [&a, &b] {
        assert_eq!(n.checksum().await.unwrap(), mc);
        let i = n.info().await.unwrap();
        let c = slave_counters(&i);
        assert_eq!(c.verify_mismatches, 0, "port {}", n.port);
        assert!(c.verify_checks >= 2, "port {}: {c:?}", n.port);
        assert_eq!(i.verify_mismatch, "");
        assert!(i.last_verify_index > 0);
        work.check(&mut n.kv()).await.unwrap();
    }
    let mi = master.info().await.unwrap();
    assert!(mi.counters.unwrap_or_default().verify_checks >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_value_is_caught_and_reads_stop() {
    let dir = TestDir::new("verify-tampered");
    let env = env();
    let master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let mut bad = Node::start_slave(&dir.join("bad"), &master.url(), &env, &[])
        .await
        .unwrap();
    let good = Node::start_slave(&dir.join("good"), &master.url(), &env, &[])
        .await
        .unwrap();
    put_keys(&master, "k", 100).await;
    converge(&master, &[&bad, &good]).await;
    wait_checks(&bad, 0, 1).await;
    assert_eq!(
        slave_counters(&bad.info().await.unwrap()).verify_mismatches,
        0
    );

    // Change one value behind tern's back, in the stopped slave's RocksDB.
    bad.sigterm_and_wait().await.unwrap();
    {
        let state = tern_common::state::State::open(&bad.data_dir.join("db")).unwrap();
        let mut batch = tern_common::state::GroupBatch::default();
        batch.put("k00042", "not what the master has");
        state
            .apply(batch, state.applied_index(), state.last_seq())
            .unwrap();
        state.flush().unwrap();
    }
    bad.restart().await.unwrap();
    // More writes: a new check point, then its digest.
    put_keys(&master, "m", 50).await;
    let i = wait_until("the changed value to be caught", DEADLINE, || async {
        let i = bad.info().await.map_err(|e| format!("{e:#}"))?;
        if slave_counters(&i).verify_mismatches >= 1 {
            Ok(Some(i))
        } else {
            Err(format!("{:?}", i.counters))
        }
    })
    .await;
    assert!(
        i.verify_mismatch
            .contains("consistency check failed at index"),
        "{}",
        i.verify_mismatch
    );
    let refused = |n: &Node| {
        let mut kv = n.kv();
        async move {
            kv.get(kv::GetRequest {
                key: "k00001".into(),
                ..Default::default()
            })
            .await
        }
    };
    let e = refused(&bad)
        .await
        .expect_err("reads stop after a mismatch");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("consistency check failed"), "{e}");
    // Still stopped after a restart.
    bad.sigterm_and_wait().await.unwrap();
    bad.restart().await.unwrap();
    let e = refused(&bad)
        .await
        .expect_err("still stopped after a restart");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    // The master and the healthy slave are unaffected and agree.
    converge(&master, &[&good]).await;
    assert_eq!(
        good.checksum().await.unwrap(),
        master.checksum().await.unwrap()
    );
    let g = good.info().await.unwrap();
    assert_eq!(slave_counters(&g).verify_mismatches, 0);
    assert!(slave_counters(&g).verify_checks >= 2);
    assert!(refused(&good).await.is_ok());
}
