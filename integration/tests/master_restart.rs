//! A clean stop (SIGTERM) of a master: exit status 0, the data is identical
//! after restart and start-up replays nothing (I6).

use std::time::Duration;

use tern_integration::{Node, TestDir, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_then_restart_keeps_data_and_replays_nothing() {
    let dir = TestDir::new("master-restart");
    let mut master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let work = Workload::new(8, 4);

    let load = work.start_load(&master.url(), 8);
    load.wait_acked(500, Duration::from_secs(20)).await.unwrap();
    let stats = load.stop().await;
    assert_eq!(
        stats.failed, 0,
        "writes failed on a healthy master: {stats:?}"
    );
    work.check(&mut master.kv()).await.unwrap();

    let before = master.checksum().await.unwrap();
    let info_before = master.info().await.unwrap();
    assert!(before.keys > 0, "the load wrote keys: {before:?}");
    assert_eq!(before.index, info_before.applied_index);

    let status = master.sigterm_and_wait().await.unwrap();
    assert!(status.success(), "SIGTERM exit status: {status}");
    assert!(
        master.data_dir.join("CLEAN_SHUTDOWN").exists(),
        "a clean shutdown writes the CLEAN_SHUTDOWN marker"
    );

    let info = master.restart().await.unwrap();
    assert_eq!(
        info.replayed_on_start, 0,
        "restart after a clean shutdown must replay nothing"
    );
    assert_eq!(info.repl_id, info_before.repl_id);
    assert_eq!(info.last_index, info_before.last_index);
    assert_eq!(info.applied_index, info_before.applied_index);
    let after = master.checksum().await.unwrap();
    assert_eq!(after, before, "Checksum before and after a clean restart");
    work.check(&mut master.kv()).await.unwrap();
}

/// SIGTERM while clients are writing: the master drains its write path, so
/// every acknowledged write survives and the next start replays nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_replays_nothing() {
    let dir = TestDir::new("master-restart-load");
    let mut master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let work = Workload::new(8, 4);

    let load = work.start_load(&master.url(), 16);
    load.wait_acked(300, Duration::from_secs(20)).await.unwrap();
    let status = master.sigterm_and_wait().await.unwrap();
    let stats = load.stop().await;
    assert!(status.success(), "SIGTERM exit status under load: {status}");
    assert!(
        stats.unexpected.is_empty(),
        "errors a correct master never returns: {:?}",
        stats.unexpected
    );

    let info = master.restart().await.unwrap();
    assert_eq!(
        info.replayed_on_start, 0,
        "restart after a clean shutdown under load must replay nothing"
    );
    assert_eq!(info.applied_index, info.last_index);
    assert!(info.applied_index >= work.max_acked_index());
    let c = master.checksum().await.unwrap();
    assert_eq!(c.index, info.applied_index);
    let summary = work.check(&mut master.kv()).await.unwrap();
    eprintln!("after SIGTERM under load ({stats:?}): {summary}");
}
