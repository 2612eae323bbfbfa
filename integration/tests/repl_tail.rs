//! The master ships recent groups from its in-memory tail and older events
//! from the binlog's segment files, and both give the same bytes. A slave
//! stops; the master writes more and restarts (its tail starts empty); the
//! slave comes back while clients write: it catches up from the files, then
//! streams from memory. Small batches (4 KiB) split groups and span several.
//! Master and slave end with the same Checksum and a byte-identical relay log,
//! and the master's Info counts batches from both sources.

mod support;

use support::{
    assert_replicas_equal, node_counters, slave_counters, start_slave, wait_connected,
    wait_more_acked,
};
use tern_integration::{Node, TestDir, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slave_catches_up_from_files_then_streams_from_memory() {
    let dir = TestDir::new("repl-tail");
    let work = Workload::new(8, 4);
    // Batches of at most 4 KiB (groups are split, and batches span groups),
    // at most 4 in flight.
    let small_batches = [
        ("TERN__SYNC__BATCH_BYTES", "4096"),
        ("TERN__SYNC__WINDOW_BATCHES", "4"),
    ];
    let mut master = Node::start_master(&dir.join("master"), &small_batches, &[])
        .await
        .unwrap();
    let mut slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;

    // Attached while clients write: everything comes from the tail.
    let load = work.start_load(&master.url(), 6);
    wait_more_acked(&load, 300).await;
    let c = node_counters(&master).await;
    assert!(
        c.batches_from_memory > 0,
        "no batch from the master's memory: {c:?}"
    );

    // The slave goes; the master writes on and restarts with an empty tail.
    assert!(slave.sigterm_and_wait().await.unwrap().success());
    wait_more_acked(&load, 300).await;
    assert_ok(load.stop().await);
    assert!(master.sigterm_and_wait().await.unwrap().success());
    master.restart().await.unwrap();

    // The slave comes back under load: the files, then the tail.
    let load = work.start_load(&master.url(), 6);
    slave.restart().await.unwrap();
    let si = wait_connected(&slave, 1).await;
    assert_eq!(
        slave_counters(&si).full_syncs,
        0,
        "the slave needed a full sync"
    );
    wait_more_acked(&load, 300).await;
    assert_ok(load.stop().await);
    assert_replicas_equal(&master, &[&slave], &work).await;
    let c = node_counters(&master).await;
    assert!(
        c.batches_from_files > 0 && c.batches_from_memory > 0,
        "the restarted master should ship old events from its files and new ones from memory: \
         {c:?}"
    );
}

fn assert_ok(stats: tern_integration::LoadStats) {
    assert!(
        stats.unexpected.is_empty(),
        "errors a correct master never returns: {:?}",
        stats.unexpected
    );
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
}
