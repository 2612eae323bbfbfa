//! SIGKILL a master (fsync = always) in the middle of a concurrent load, three
//! times; after every restart each acknowledged write is present exactly once
//! and the state has caught up with the binlog.

use std::time::Duration;

use rand::Rng;
use tern_integration::{Node, TestDir, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_exactly_once() {
    let dir = TestDir::new("master-crash");
    let mut master = Node::start_master(
        &dir.join("master"),
        &[("TERN__BINLOG__FSYNC", "always")],
        &[],
    )
    .await
    .unwrap();
    let work = Workload::new(8, 4);

    for cycle in 1..=3 {
        let load = work.start_load(&master.url(), 16);
        // Kill only once the load is really running, at a random moment after.
        load.wait_acked(200, Duration::from_secs(20)).await.unwrap();
        let extra_ms = rand::rng().random_range(500..1500);
        tokio::time::sleep(Duration::from_millis(extra_ms)).await;
        let acked_before_kill = load.acked();
        master.sigkill().unwrap();
        // Let the clients see the dead connection while the master is down.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stats = load.stop().await;
        assert!(
            stats.unexpected.is_empty(),
            "cycle {cycle}: errors a correct master never returns: {:?}",
            stats.unexpected
        );

        let info = master.restart().await.unwrap();
        eprintln!(
            "cycle {cycle}: {acked_before_kill}+ writes acked before SIGKILL, load {stats:?}; \
             restart replayed {} events, applied {} last {}",
            info.replayed_on_start, info.applied_index, info.last_index
        );
        assert_eq!(
            info.applied_index, info.last_index,
            "cycle {cycle}: start-up recovery must apply the whole binlog"
        );
        assert!(
            info.applied_index >= work.max_acked_index(),
            "cycle {cycle}: applied index {} is behind acknowledged commit index {}",
            info.applied_index,
            work.max_acked_index()
        );
        let summary = work.check(&mut master.kv()).await.unwrap();
        eprintln!("cycle {cycle}: check ok: {summary}");
    }

    // The recovered master keeps taking writes, and a clean stop after a crash
    // recovery still leaves nothing to replay.
    let load = work.start_load(&master.url(), 4);
    load.wait_acked(100, Duration::from_secs(20)).await.unwrap();
    let stats = load.stop().await;
    assert_eq!(
        stats.failed, 0,
        "writes failed on a healthy master: {stats:?}"
    );
    work.check(&mut master.kv()).await.unwrap();
    let before = master.checksum().await.unwrap();
    let status = master.sigterm_and_wait().await.unwrap();
    assert!(status.success(), "SIGTERM exit status: {status}");
    let info = master.restart().await.unwrap();
    assert_eq!(info.replayed_on_start, 0);
    assert_eq!(master.checksum().await.unwrap(), before);
    work.check(&mut master.kv()).await.unwrap();
}
