//! Failover and topologies (issue 11): promotion with partial resync,
//! `Admin.SetMaster`, the old master rejoining, and cascading slaves.
//!
//! - `promotion_keeps_partial_resync`: a master with two slaves (one behind)
//!   and writes no slave got is killed; the most advanced slave is stopped and
//!   `tern-master` started on its data: a new history whose parent ends where
//!   the slave's relay log ended. The other slave is re-pointed with
//!   `Admin.SetMaster` and continues with a partial resync (full_syncs does not
//!   move). The old master, restarted as a slave of the new one, holds events
//!   beyond the fork: it stays in `error` (diverged) with its data unchanged,
//!   until `slave.resync_when_ahead` full-syncs it. Everyone ends with the new
//!   master's Checksum.
//! - `cascading_chain_survives_the_middle`: master → middle → leaf, the leaf
//!   full-synced from the middle (a checkpoint of a slave) and following its
//!   relay log; the middle is killed and restarted, then frozen past the link
//!   timeout, under load: the leaf resumes partially each time, its relay log
//!   stays byte-identical to the master's binlog, and all three end equal.
//! - `set_master_validates`: bad URLs, and SetMaster on a master / Wait on a
//!   slave, get clear errors.

mod support;

use std::time::Duration;

use support::{
    DEADLINE, FAST_LINK, PacedLoad, assert_relay_identical, converge, describe_slave, put_keys,
    sigstop_and_wait, slave_counters, slave_link, wait_until,
};
use tern_common::proto::admin::v1 as admin;
use tern_integration::{Node, TestDir, Workload};
use tonic::Code;

async fn set_master(slave: &Node, master: &Node) -> String {
    slave
        .admin()
        .set_master(admin::SetMasterRequest {
            master: master.url(),
        })
        .await
        .unwrap_or_else(|e| panic!("SetMaster on port {}: {e}", slave.port))
        .into_inner()
        .previous
}

/// Waits until `slave` follows `repl_id` and is connected.
async fn wait_following(slave: &Node, repl_id: &str) -> admin::InfoResponse {
    wait_until(
        &format!("slave on port {} to follow history {repl_id}", slave.port),
        DEADLINE,
        || async move {
            let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
            if i.repl_id == repl_id && slave_link(&i).state == "connected" {
                Ok(Some(i))
            } else {
                Err(format!("repl_id {} {}", i.repl_id, describe_slave(&i)))
            }
        },
    )
    .await
}

/// A master in `<dir>/<master>` and one slave of it per name in `slaves`.
async fn start_cluster(dir: &TestDir, master: &str, slaves: &[&str]) -> (Node, Vec<Node>) {
    let m = Node::start_master(&dir.join(master), &FAST_LINK, &[])
        .await
        .unwrap();
    let mut out = Vec::new();
    for name in slaves {
        out.push(start_slave_of(dir, name, &m).await);
    }
    (m, out)
}

/// A slave in `<dir>/<name>` following `upstream` (a master or a slave).
async fn start_slave_of(dir: &TestDir, name: &str, upstream: &Node) -> Node {
    Node::start_slave(&dir.join(name), &upstream.url(), &FAST_LINK, &[])
        .await
        .unwrap_or_else(|e| panic!("starting {name}: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_keeps_partial_resync() {
    let dir = TestDir::new("failover-promote");
    let (mut old, slaves) = start_cluster(&dir, "old", &["a", "b"]).await;
    let [mut a, mut b]: [Node; 2] = slaves.try_into().ok().unwrap();
    put_keys(&old, "x", 200).await;
    let b_at = converge(&old, &[&a, &b]).await;
    // b stops behind; a gets 100 more and stops; then nobody gets the last 20
    // (acknowledged asynchronously by the old master alone).
    b.sigterm_and_wait().await.unwrap();
    put_keys(&old, "y", 100).await;
    let a_at = converge(&old, &[&a]).await;
    assert!(a_at > b_at);
    a.sigterm_and_wait().await.unwrap();
    let lost_last = put_keys(&old, "z", 20).await;
    assert!(lost_last > a_at);
    let old_info = old.info().await.unwrap();
    let old_checksum = old.checksum().await.unwrap();
    old.sigkill().unwrap();
    // b comes back, still pointing at the dead master.
    b.restart().await.unwrap();
    let b_before = b.info().await.unwrap();
    assert_eq!(
        b_before.applied_index,
        b_at,
        "{}",
        describe_slave(&b_before)
    );

    // Promote a: start tern-master on its (stopped) data directory.
    let a_dir = a.data_dir.clone();
    drop(a);
    let new = Node::start_master(&a_dir, &FAST_LINK, &[]).await.unwrap();
    let ni = new.info().await.unwrap();
    assert_eq!(ni.role, "master");
    assert_ne!(
        ni.repl_id, old_info.repl_id,
        "promotion starts a new history"
    );
    assert_eq!(
        ni.histories
            .last()
            .map(|h| (h.repl_id.clone(), h.end_index)),
        Some((old_info.repl_id.clone(), a_at)),
        "the old history ends where the promoted slave's relay log ended: {:?}",
        ni.histories
    );
    assert_eq!(ni.last_index, a_at);
    assert_eq!(ni.applied_index, a_at);

    // b, behind the fork, is re-pointed without a restart and continues partially.
    let previous = set_master(&b, &new).await;
    assert_eq!(previous, old.url());
    let bi = wait_following(&b, &ni.repl_id).await;
    assert_eq!(slave_link(&bi).master, new.url());
    assert_eq!(
        slave_counters(&bi).full_syncs,
        slave_counters(&b_before).full_syncs,
        "re-pointed after a promotion, a slave behind the fork resyncs partially: {}",
        describe_slave(&bi)
    );
    put_keys(&new, "n", 100).await;
    converge(&new, &[&b]).await;
    let nc = new.checksum().await.unwrap();
    assert_eq!(b.checksum().await.unwrap(), nc);
    let new_counters = new.info().await.unwrap().counters.unwrap_or_default();
    assert_eq!(new_counters.full_syncs, 0, "{new_counters:?}");
    assert!(new_counters.partial_syncs >= 1, "{new_counters:?}");
    // Histories show in Info on the slave too.
    let bi = b.info().await.unwrap();
    assert_eq!(bi.histories.last().map(|h| h.end_index), Some(a_at));

    // The old master rejoins as a slave of the new one: it holds 20
    // acknowledged-but-unreplicated transactions beyond the fork.
    let old_dir = old.data_dir.clone();
    drop(old);
    let rejoined = Node::start_slave(&old_dir.clone(), &new.url(), &FAST_LINK, &[])
        .await
        .unwrap();
    let ri = wait_until(
        "the old master, as a slave, to report diverged",
        DEADLINE,
        || async {
            let i = rejoined.info().await.map_err(|e| format!("{e:#}"))?;
            let l = slave_link(&i);
            if l.state == "error" && l.last_error.to_lowercase().contains("diverged") {
                Ok(Some(i))
            } else {
                Err(describe_slave(&i))
            }
        },
    )
    .await;
    assert_eq!(ri.applied_index, lost_last);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rejoined.checksum().await.unwrap(),
        old_checksum,
        "a node beyond the fork is never silently truncated"
    );
    let mut rejoined = rejoined;
    rejoined.sigterm_and_wait().await.unwrap();
    drop(rejoined);
    let resync_env = [
        FAST_LINK[0],
        FAST_LINK[1],
        ("TERN__SLAVE__RESYNC_WHEN_AHEAD", "true"),
    ];
    let rejoined = Node::start_slave(&old_dir, &new.url(), &resync_env, &[])
        .await
        .unwrap();
    wait_following(&rejoined, &ni.repl_id).await;
    converge(&new, &[&rejoined, &b]).await;
    let nc = new.checksum().await.unwrap();
    assert_eq!(rejoined.checksum().await.unwrap(), nc);
    assert_eq!(b.checksum().await.unwrap(), nc);
    let ri = rejoined.info().await.unwrap();
    assert_eq!(slave_counters(&ri).full_syncs, 1, "{}", describe_slave(&ri));
    // The asynchronous writes only the old master had are gone everywhere;
    // the ones a slave had survived the failover.
    for n in [&new, &rejoined, &b] {
        let mut kv = n.kv();
        assert_eq!(
            tern_integration::workload::get(&mut kv, b"z00000")
                .await
                .unwrap(),
            None
        );
        assert!(
            tern_integration::workload::get(&mut kv, b"y00099")
                .await
                .unwrap()
                .is_some()
        );
    }
    for n in [&b, &rejoined] {
        let c = slave_counters(&n.info().await.unwrap());
        assert_eq!(c.duplicates_skipped, 0, "port {}", n.port);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascading_chain_survives_the_middle() {
    let dir = TestDir::new("failover-cascade");
    let (master, slaves) = start_cluster(&dir, "master", &["middle"]).await;
    let [mut middle]: [Node; 1] = slaves.try_into().ok().unwrap();
    put_keys(&master, "pre", 300).await;
    converge(&master, &[&middle]).await;
    // The leaf full-syncs from the middle (a checkpoint of a slave's RocksDB).
    let leaf = start_slave_of(&dir, "leaf", &middle).await;
    let mi = master.info().await.unwrap();
    let li = wait_following(&leaf, &mi.repl_id).await;
    assert_eq!(slave_counters(&li).full_syncs, 1, "{}", describe_slave(&li));
    converge(&middle, &[&leaf]).await;
    let middle_info = middle.info().await.unwrap();
    assert_eq!(middle_info.slaves.len(), 1, "{:?}", middle_info.slaves);
    assert_eq!(middle_info.slaves[0].state, "streaming");
    // The master sees only its direct slave.
    assert_eq!(master.info().await.unwrap().slaves.len(), 1);

    let work = Workload::new(32, 32);
    let load = PacedLoad::start(&work, &master.url(), 2, Duration::from_millis(2));
    load.wait_more(200).await;
    // The middle is killed and restarted.
    middle.sigkill().unwrap();
    load.wait_more(200).await;
    middle.restart().await.unwrap();
    load.wait_more(200).await;
    // Then frozen past the link timeout.
    sigstop_and_wait(&middle).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    middle.sigcont().unwrap();
    load.wait_more(200).await;
    let stats = load.stop().await;
    assert!(stats.acked > 0);

    let last = converge(&master, &[&middle]).await;
    converge(&middle, &[&leaf]).await;
    let mc = master.checksum().await.unwrap();
    assert_eq!(middle.checksum().await.unwrap(), mc);
    assert_eq!(leaf.checksum().await.unwrap(), mc);
    let li = leaf.info().await.unwrap();
    assert_eq!(
        li.repl_id, mi.repl_id,
        "positions stay the original master's"
    );
    let c = slave_counters(&li);
    assert_eq!(
        c.full_syncs,
        1,
        "only the first sync was full: {}",
        describe_slave(&li)
    );
    assert!(c.partial_syncs >= 3, "{}", describe_slave(&li));
    assert_eq!(c.duplicates_skipped, 0);
    assert_relay_identical(&master, &leaf, last);
    work.check(&mut leaf.kv()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_master_validates() {
    let dir = TestDir::new("failover-setmaster");
    let (master, slaves) = start_cluster(&dir, "master", &["slave"]).await;
    let [slave]: [Node; 1] = slaves.try_into().ok().unwrap();
    for bad in ["", "127.0.0.1:7400", "ftp://x", "http://"] {
        let e = slave
            .admin()
            .set_master(admin::SetMasterRequest { master: bad.into() })
            .await
            .expect_err(bad);
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e}");
    }
    let e = master
        .admin()
        .set_master(admin::SetMasterRequest {
            master: slave.url(),
        })
        .await
        .expect_err("SetMaster on a master");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = slave
        .admin()
        .wait(admin::WaitRequest::default())
        .await
        .expect_err("Wait on a slave");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    // Still following the master after the refused calls.
    put_keys(&master, "k", 10).await;
    converge(&master, &[&slave]).await;
    assert_eq!(
        slave_link(&slave.info().await.unwrap()).master,
        master.url()
    );
}

/// A chain under a failover: the middle slave is re-pointed to a promoted
/// slave, adopts the new history, and its own slave follows it there with a
/// partial resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_follows_a_promotion() {
    let dir = TestDir::new("failover-chain");
    let (mut old, slaves) = start_cluster(&dir, "old", &["a", "middle"]).await;
    let [mut a, middle]: [Node; 2] = slaves.try_into().ok().unwrap();
    put_keys(&old, "x", 100).await;
    converge(&old, &[&a, &middle]).await;
    let leaf = start_slave_of(&dir, "leaf", &middle).await;
    put_keys(&old, "y", 100).await;
    converge(&old, &[&a, &middle]).await;
    let at = converge(&middle, &[&leaf]).await;
    let leaf_full_syncs = slave_counters(&leaf.info().await.unwrap()).full_syncs;
    assert_eq!(leaf_full_syncs, 1);
    old.sigkill().unwrap();
    a.sigterm_and_wait().await.unwrap();
    let a_dir = a.data_dir.clone();
    drop(a);
    let new = Node::start_master(&a_dir, &FAST_LINK, &[]).await.unwrap();
    let ni = new.info().await.unwrap();
    assert_eq!(ni.histories.last().map(|h| h.end_index), Some(at));
    set_master(&middle, &new).await;
    wait_following(&middle, &ni.repl_id).await;
    // The leaf was never re-pointed: it follows the middle into the new history.
    let li = wait_following(&leaf, &ni.repl_id).await;
    assert_eq!(
        slave_counters(&li).full_syncs,
        leaf_full_syncs,
        "{}",
        describe_slave(&li)
    );
    put_keys(&new, "n", 100).await;
    converge(&new, &[&middle]).await;
    let last = converge(&middle, &[&leaf]).await;
    let nc = new.checksum().await.unwrap();
    assert_eq!(middle.checksum().await.unwrap(), nc);
    assert_eq!(leaf.checksum().await.unwrap(), nc);
    assert_relay_identical(&new, &leaf, last);
    drop(old);
}
