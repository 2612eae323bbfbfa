//! Three slaves follow one master under concurrent load (one with a single
//! apply worker, one with four, one with a relay log synced every second):
//! all converge to the master's exact data, and the master's Info lists the
//! three of them streaming. The master's sync window is kept small.

mod support;

use support::{
    DEADLINE, assert_replicas_equal, describe_slave, slave_counters, start_slave, wait_connected,
    wait_more_acked, wait_until,
};
use tern_integration::{Node, TestDir, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_slaves_converge_under_load() {
    let dir = TestDir::new("repl-three-slaves");
    // A small sync window (3 batches of at most 16 KB in flight per slave):
    // acks and window slides happen all the time.
    let master = Node::start_master(
        &dir.join("master"),
        &[
            ("TERN__SYNC__WINDOW_BATCHES", "3"),
            ("TERN__SYNC__BATCH_BYTES", "16384"),
        ],
        &[],
    )
    .await
    .unwrap();
    let work = Workload::new(8, 4);
    // Some history before the slaves exist, so they start by catching up.
    let load = work.start_load(&master.url(), 6);
    wait_more_acked(&load, 300).await;

    let s1 = start_slave(
        &dir,
        "slave-1",
        &master,
        &[("TERN__SLAVE__APPLY_WORKERS", "1")],
    )
    .await;
    let s2 = start_slave(
        &dir,
        "slave-2",
        &master,
        &[("TERN__SLAVE__APPLY_WORKERS", "4")],
    )
    .await;
    let s3 = start_slave(
        &dir,
        "slave-3",
        &master,
        &[
            ("TERN__SLAVE__APPLY_WORKERS", "2"),
            ("TERN__BINLOG__FSYNC", "everysec"),
        ],
    )
    .await;
    let slaves = [&s1, &s2, &s3];
    // A new slave may start with a full sync; every later sync is partial.
    let mut full = Vec::new();
    for s in slaves {
        full.push(slave_counters(&wait_connected(s, 1).await).full_syncs);
    }
    wait_more_acked(&load, 1000).await;

    // The master sees all three, streaming, with their addresses and sessions.
    let mi = wait_until(
        "the master to list three streaming slaves",
        DEADLINE,
        || {
            let master = &master;
            async move {
                let mi = master.info().await.map_err(|e| format!("{e:#}"))?;
                let streaming = mi.slaves.iter().filter(|s| s.state == "streaming").count();
                if mi.slaves.len() == 3 && streaming == 3 {
                    Ok(Some(mi))
                } else {
                    Err(format!("{:?}", mi.slaves))
                }
            }
        },
    )
    .await;
    let mut sessions: Vec<u64> = mi.slaves.iter().map(|s| s.session_id).collect();
    sessions.sort();
    sessions.dedup();
    assert_eq!(sessions.len(), 3, "one session per slave: {:?}", mi.slaves);
    for s in slaves {
        let si = s.info().await.unwrap();
        let link = support::slave_link(&si);
        assert!(
            mi.slaves.iter().any(|r| r.session_id == link.session_id),
            "the slave's session {} is one the master lists: {:?}",
            link.session_id,
            mi.slaves
        );
    }

    let stats = load.stop().await;
    assert!(
        stats.unexpected.is_empty(),
        "errors a correct master never returns: {:?}",
        stats.unexpected
    );
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
    let target = assert_replicas_equal(&master, &slaves, &work).await;

    // Once converged, the master's view of every slave catches up too.
    wait_until(
        "the master to see every slave at the last index",
        DEADLINE,
        || {
            let master = &master;
            async move {
                let mi = master.info().await.map_err(|e| format!("{e:#}"))?;
                let ok = mi.slaves.len() == 3
                    && mi.slaves.iter().all(|s| {
                        s.state == "streaming"
                            && s.received_index == target
                            && s.applied_index == target
                            && s.lag_events == 0
                    });
                if ok {
                    Ok(Some(()))
                } else {
                    Err(format!("{:?}", mi.slaves))
                }
            }
        },
    )
    .await;
    for (s, full) in slaves.iter().zip(full) {
        let si = s.info().await.unwrap();
        let c = slave_counters(&si);
        assert_eq!(
            c.reconnects,
            0,
            "a healthy link never dropped: {}",
            describe_slave(&si)
        );
        assert_eq!(c.partial_syncs, 1, "{}", describe_slave(&si));
        assert_eq!(c.full_syncs, full, "{}", describe_slave(&si));
    }
}
