//! I3 under `binlog.fsync = everysec` on a slave: what it acknowledges as
//! received is never beyond what is durable in its relay log, and an idle link
//! still advances `received` (the fsync timer), without any new batch.

mod support;

use std::time::Duration;

use support::{DEADLINE, PacedLoad, converge, wait_connected, wait_until};
use tern_integration::{Node, TestDir, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everysec_slave_acknowledges_only_what_its_relay_log_has_fsynced() {
    let dir = TestDir::new("relay-durability");
    let master = Node::start_master(
        &dir.join("master"),
        &[("TERN__BINLOG__FSYNC", "always")],
        &[],
    )
    .await
    .unwrap();
    let slave = support::start_slave(
        &dir,
        "slave",
        &master,
        &[
            ("TERN__BINLOG__FSYNC", "everysec"),
            ("TERN__SYNC__HEARTBEAT_MS", "200"),
        ],
    )
    .await;
    wait_connected(&slave, 1).await;

    let work = Workload::new(8, 0);
    let load = PacedLoad::start(&work, &master.url(), 4, Duration::from_millis(2));
    let mut samples = 0u64;
    // Samples where the slave had appended more than it had fsynced, and where
    // the master had shipped more than the slave acknowledged: the window the
    // check is about exists.
    let mut unsynced_seen = 0u64;
    let mut lagging_seen = 0u64;
    while samples < 150 || unsynced_seen < 5 || lagging_seen < 5 {
        assert!(
            samples < 3000,
            "{samples} samples, {unsynced_seen} unsynced, {lagging_seen} lagging"
        );
        // The master's view first: the relay's durable index can only grow
        // after that, so received <= durable must hold.
        let mi = master.info().await.unwrap();
        let si = slave.info().await.unwrap();
        let Some(row) = mi.slaves.iter().find(|s| s.state == "streaming") else {
            continue;
        };
        samples += 1;
        assert!(
            row.received_index <= si.durable_index,
            "the master holds received {} from the slave, beyond its relay's durable index {} \
             (last {})",
            row.received_index,
            si.durable_index,
            si.last_index
        );
        if si.last_index > si.durable_index {
            unsynced_seen += 1;
        }
        if row.received_index < mi.last_index {
            lagging_seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = load.stop().await;
    assert!(stats.unexpected.is_empty(), "{:?}", stats.unexpected);
    let target = converge(&master, &[&slave]).await;

    // No load, no batch: the fsync timer makes the tail durable and the
    // heartbeat reports it.
    wait_until(
        "the idle slave's received to reach the master's last index",
        DEADLINE,
        || async {
            let mi = master.info().await.map_err(|e| format!("{e:#}"))?;
            let si = slave.info().await.map_err(|e| format!("{e:#}"))?;
            let r = mi.slaves.first().map_or(0, |s| s.received_index);
            if r == target && si.durable_index == target {
                Ok(Some(()))
            } else {
                Err(format!(
                    "received {r}, durable {}, target {target}",
                    si.durable_index
                ))
            }
        },
    )
    .await;
    eprintln!(
        "{samples} samples: relay unsynced in {unsynced_seen}, ack behind the master in {lagging_seen}"
    );
    work.counters.check(&mut slave.kv()).await.unwrap();
    assert_eq!(
        master.checksum().await.unwrap(),
        slave.checksum().await.unwrap()
    );
}
