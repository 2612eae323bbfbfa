//! Pika F2: a slave whose apply is slow (fault knob TERN_FAULT_APPLY_DELAY_MS,
//! binaries built with `--features tern-slave/fault-injection`) is frozen
//! (SIGSTOP) for longer than the link timeout, three times, while the master
//! keeps writing. Each time both sides drop the session and the slave comes
//! back through the reconnect barrier (I4): it must report a position that is
//! neither stale nor half a transaction, so the master never re-sends what the
//! slave already has (duplicates_skipped == 0) and the data converges exactly.

mod support;

use std::time::Duration;

use rand::Rng;
use support::{
    DEADLINE, PacedLoad, assert_replicas_equal, describe_slave, slave_counters, slave_link,
    start_slave, wait_connected, wait_until,
};
use tern_integration::{Node, TestDir, Workload};

const LINK: [(&str, &str); 2] = [
    ("TERN__SYNC__LINK_TIMEOUT_MS", "1500"),
    ("TERN__SYNC__HEARTBEAT_MS", "300"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_slow_slave_reconnects_without_stale_ack() {
    let dir = TestDir::new("repl-stale-ack");
    let master = Node::start_master(&dir.join("master"), &LINK, &[])
        .await
        .unwrap();
    let mut slave_env = LINK.to_vec();
    slave_env.push(("TERN_FAULT_APPLY_DELAY_MS", "300"));
    let slave = start_slave(&dir, "slave", &master, &slave_env).await;
    // A new slave may start with a full sync; every later sync is partial.
    let slave_full = slave_counters(&wait_connected(&slave, 1).await).full_syncs;
    let master_full = support::node_counters(&master).await.full_syncs;

    // Paced, with many append keys: the binlog stays small (appends log
    // after-images) however long the freezes take.
    let work = Workload::new(8, 32);
    let load = PacedLoad::start(&work, &master.url(), 6, Duration::from_millis(2));
    load.wait_more(200).await;

    for cycle in 1..=3u64 {
        // Freeze at a random moment at which the applier is behind what was
        // received (the F2 situation: acks must not report a stale position).
        let pause = rand::rng().random_range(100..600);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let before = wait_until("the slave's applier to be behind", DEADLINE, || {
            let slave = &slave;
            async move {
                let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
                if i.applied_index < slave_link(&i).received_index {
                    Ok(Some(i))
                } else {
                    Err(describe_slave(&i))
                }
            }
        })
        .await;
        slave.sigstop().unwrap();
        // Longer than the link timeout (1.5 s) on both sides.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        slave.sigcont().unwrap();
        // Back through the barrier: a new session (one more partial sync).
        let after = wait_connected(&slave, cycle + 1).await;
        eprintln!(
            "cycle {cycle}: before stop: {}; reconnected: {}",
            describe_slave(&before),
            describe_slave(&after)
        );
        assert_eq!(
            slave_counters(&after).duplicates_skipped,
            0,
            "cycle {cycle}: the master re-sent events the slave had: {}",
            describe_slave(&after)
        );
        // The master keeps writing (and the slave receiving) before the next freeze.
        load.wait_more(100).await;
    }

    let stats = load.stop().await;
    assert!(
        stats.unexpected.is_empty(),
        "errors a correct master never returns: {:?}",
        stats.unexpected
    );
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");

    assert_replicas_equal(&master, &[&slave], &work).await;
    let si = slave.info().await.unwrap();
    let c = slave_counters(&si);
    eprintln!("final: {}", describe_slave(&si));
    assert!(
        c.reconnects >= 3,
        "each freeze longer than the link timeout must end the session: {}",
        describe_slave(&si)
    );
    assert!(
        c.partial_syncs >= 4,
        "one partial sync at start and one after each freeze: {}",
        describe_slave(&si)
    );
    assert_eq!(c.duplicates_skipped, 0);
    assert_eq!(
        c.full_syncs, slave_full,
        "a partial sync always suffices after a freeze"
    );
    let mi = master.info().await.unwrap();
    let mc = mi.counters.unwrap_or_default();
    assert!(
        mc.partial_syncs >= 4,
        "the master counts the same partial syncs: {mc:?}"
    );
    assert_eq!(mc.full_syncs, master_full);
    let rows: Vec<_> = mi
        .slaves
        .iter()
        .map(|s| (s.id.clone(), s.state.clone()))
        .collect();
    assert!(
        mi.slaves.len() == 1 && mi.slaves[0].state == "streaming",
        "the master sees its one slave streaming: {rows:?}"
    );
}
