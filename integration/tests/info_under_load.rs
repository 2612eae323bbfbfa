//! `Admin.Info` polled flat out on a master and a slave while writes run:
//! Info must never stop the write path or the applier. Info once read one
//! watch twice in one expression (the master's write-path state, the
//! slave's applied index); a writer arriving between the two reads then
//! deadlocked with it: the slave stopped answering (seen once in CI) and on
//! the master the committer would have stopped.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::{DEADLINE, converge, start_slave, wait_connected};
use tern_integration::{Node, TestDir, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_polled_flat_out_never_stops_writes_or_apply() {
    let dir = TestDir::new("info-under-load");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;
    let work = Workload::new(16, 8);
    let load = work.start_load(&master.url(), 8);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut pollers = Vec::new();
    for node in [&master, &slave] {
        for _ in 0..4 {
            let (mut admin, stop, answered) = (node.admin(), stop.clone(), answered.clone());
            pollers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        admin.info(tern_common::proto::admin::v1::InfoRequest {}),
                    )
                    .await;
                    match r {
                        Ok(Ok(_)) => answered.fetch_add(1, Ordering::Relaxed),
                        Ok(Err(e)) => panic!("Info failed: {e}"),
                        Err(_) => panic!("Info did not answer within 10 s"),
                    };
                }
            }));
        }
    }
    // Writes keep being acknowledged while Info runs flat out.
    for step in 1..=12u64 {
        load.wait_acked(step * 300, DEADLINE).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for p in pollers {
        p.await.unwrap();
    }
    let stats = load.stop().await;
    assert!(stats.unexpected.is_empty(), "{stats:?}");
    assert!(answered.load(Ordering::Relaxed) > 100);
    // And the slave applied everything.
    converge(&master, &[&slave]).await;
    assert_eq!(
        master.checksum().await.unwrap(),
        slave.checksum().await.unwrap()
    );
}
