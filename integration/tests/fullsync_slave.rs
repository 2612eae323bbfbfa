//! Full sync (DbSync) seen from the slave, over real processes: new slaves
//! full-sync while the master keeps taking writes (the Pika bgsave race, F1),
//! a slave whose position was purged full-syncs by itself, a broken DbSync
//! stream resumes, a crash at every step of the swap leaves a consistent state,
//! bad snapshots are refused without swapping anything, and a slave ahead of
//! its master keeps its data unless told otherwise.

mod support;

use support::{DEADLINE, describe_slave, slave_counters, slave_link, wait_until};
use tern_common::proto::kv::v1::PutRequest;
use tern_integration::{Node, TestDir, Workload};

/// Converges (load stopped) and checks master and slaves hold the same data:
/// equal Checksum at the same index, the workload's exactly-once checks on
/// every node, no duplicate skipped.
async fn assert_same_data(master: &Node, slaves: &[&Node], work: &Workload) -> u64 {
    let target = support::converge(master, slaves).await;
    let mc = master.checksum().await.unwrap();
    assert_eq!(mc.index, target);
    work.check(&mut master.kv()).await.unwrap();
    for (n, s) in slaves.iter().enumerate() {
        let sc = s.checksum().await.unwrap();
        assert_eq!(
            sc, mc,
            "slave {n} (port {}) differs from the master",
            s.port
        );
        work.check(&mut s.kv())
            .await
            .unwrap_or_else(|e| panic!("workload check on slave {n}: {e:#}"));
        let si = s.info().await.unwrap();
        assert_eq!(
            slave_counters(&si).duplicates_skipped,
            0,
            "slave {n}: {}",
            describe_slave(&si)
        );
    }
    target
}

async fn wait_full_synced(slave: &Node, at_least: u64) {
    wait_until(
        &format!(
            "slave on port {} to finish {at_least} full sync(s) and stream",
            slave.port
        ),
        DEADLINE,
        || async move {
            let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
            let c = slave_counters(&i);
            let l = slave_link(&i);
            if c.full_syncs >= at_least && l.state == "connected" {
                Ok(Some(()))
            } else {
                Err(describe_slave(&i))
            }
        },
    )
    .await
}

async fn put_bulk(master: &Node, n: usize, value_len: usize) {
    let mut kv = master.kv();
    for i in 0..n {
        kv.put(PutRequest {
            key: format!("bulk-{i:06}").into(),
            value: vec![b'x' + (i % 7) as u8; value_len].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// F1: five new slaves in a row full-sync while IncrBy, Append and multi-key
/// Txn writes never pause; each converges to the master's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_slaves_full_sync_under_load_five_times() {
    let dir = TestDir::new("fullsync-f1");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let work = Workload::new(16, 8);
    let load = work.start_load(&master.url(), 12);
    load.wait_acked(300, DEADLINE).await.unwrap();
    let mut slaves = Vec::new();
    for round in 0..5 {
        let s = Node::start_slave(&dir.join(format!("slave{round}")), &master.url(), &[], &[])
            .await
            .unwrap();
        wait_full_synced(&s, 1).await;
        // Let writes land on top of the snapshot before the next round.
        let acked = load.acked();
        load.wait_acked(acked + 100, DEADLINE).await.unwrap();
        slaves.push(s);
    }
    let stats = load.stop().await;
    assert!(stats.unexpected.is_empty(), "{stats:?}");
    let refs: Vec<&Node> = slaves.iter().collect();
    assert_same_data(&master, &refs, &work).await;
    for s in &slaves {
        let i = s.info().await.unwrap();
        assert_eq!(slave_counters(&i).full_syncs, 1, "{}", describe_slave(&i));
    }
    assert!(master.info().await.unwrap().counters.unwrap().full_syncs >= 5);
}

/// A slave stopped while the master writes past its retention comes back,
/// finds its position purged, full-syncs by itself and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_position_full_syncs_by_itself() {
    let dir = TestDir::new("fullsync-purged");
    let env = [
        ("TERN__BINLOG__SEGMENT_BYTES", "65536"),
        ("TERN__BINLOG__RETAIN_BYTES", "131072"),
    ];
    let master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let work = Workload::new(8, 4);
    let mut slave = Node::start_slave(&dir.join("slave"), &master.url(), &[], &[])
        .await
        .unwrap();
    wait_full_synced(&slave, 1).await;
    let load = work.start_load(&master.url(), 8);
    load.wait_acked(200, DEADLINE).await.unwrap();
    assert!(slave.sigterm_and_wait().await.unwrap().success());
    let stopped_at = slave_stopped_index(&master).await;
    // Write well past the retention while it is down.
    put_bulk(&master, 3000, 200).await;
    let first = master.info().await.unwrap().first_index;
    assert!(
        first > stopped_at + 1,
        "the master purged past the stopped slave (first index {first}, slave at {stopped_at})"
    );
    slave.restart().await.unwrap();
    // The restart is a new process: its first (and only) full sync.
    wait_full_synced(&slave, 1).await;
    let stats = load.stop().await;
    assert!(stats.unexpected.is_empty(), "{stats:?}");
    assert_same_data(&master, &[&slave], &work).await;
}

async fn slave_stopped_index(master: &Node) -> u64 {
    let i = master.info().await.unwrap();
    i.slaves.iter().map(|s| s.received_index).max().unwrap_or(0)
}

/// The DbSync stream breaks after every 2 chunks: each attempt resumes where
/// the last stopped, with the same snapshot, and the result is identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_dbsync_streams_resume() {
    let dir = TestDir::new("fullsync-resume");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    // Several MiB of data, so the snapshot takes several 1 MiB chunks.
    put_bulk(&master, 6000, 1000).await;
    {
        let mut admin = master.admin();
        let _ = admin
            .checksum(tern_common::proto::admin::v1::ChecksumRequest {})
            .await
            .unwrap();
    }
    let work = Workload::new(4, 2);
    let slave = Node::start_slave(
        &dir.join("slave"),
        &master.url(),
        &[("TERN_FAULT_DBSYNC_CUT_AFTER", "2")],
        &[],
    )
    .await
    .unwrap();
    wait_full_synced(&slave, 1).await;
    let load = work.start_load(&master.url(), 4);
    load.wait_acked(100, DEADLINE).await.unwrap();
    load.stop().await;
    assert_same_data(&master, &[&slave], &work).await;
    let log = std::fs::read_to_string(format!("{}.log", slave.data_dir.display())).unwrap();
    let cuts = log.matches("fault injection: stream cut").count();
    assert!(
        cuts >= 2,
        "the stream was cut and resumed several times ({cuts} cuts)"
    );
    let i = slave.info().await.unwrap();
    assert_eq!(slave_counters(&i).full_syncs, 1, "{}", describe_slave(&i));
}

/// A crash at each step of the swap: the restarted slave finishes the swap
/// (or starts over) and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_swap_step_recovers() {
    let dir = TestDir::new("fullsync-swap-crash");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let work = Workload::new(4, 2);
    let load = work.start_load(&master.url(), 4);
    load.wait_acked(200, DEADLINE).await.unwrap();
    for step in 1..=5u32 {
        let data = dir.join(format!("slave-step{step}"));
        let step_s = step.to_string();
        // First life: dies inside the swap at `step`.
        let mut doomed = Node::start(
            "tern-slave",
            &data,
            &["--master", &master.url()],
            &[("TERN_FAULT_SWAP_CRASH_AT", step_s.as_str())],
        )
        .unwrap();
        let status = wait_until("the slave to abort in the swap", DEADLINE, || {
            let r = doomed.try_wait();
            async move {
                match r {
                    Ok(Some(st)) => Ok(Some(st)),
                    Ok(None) => Err("still running".to_string()),
                    Err(e) => Err(format!("{e:#}")),
                }
            }
        })
        .await;
        assert!(
            !status.success(),
            "step {step}: the fault knob aborts the process"
        );
        drop(doomed);
        // Second life on the same data directory, without the knob.
        let slave = Node::start_slave(&data, &master.url(), &[], &[])
            .await
            .unwrap();
        wait_until("the restarted slave to stream", DEADLINE, || async {
            let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
            if slave_link(&i).state == "connected" && i.applied_index > 0 {
                Ok(Some(()))
            } else {
                Err(describe_slave(&i))
            }
        })
        .await;
        assert!(
            !data.join("db.old").exists()
                && !data.join("binlog.old").exists()
                && !data.join("fullsync").exists(),
            "step {step}: swap leftovers remain"
        );
        if step == 5 {
            let stats = load.stop().await;
            assert!(stats.unexpected.is_empty(), "{stats:?}");
            assert_same_data(&master, &[&slave], &work).await;
            return;
        }
    }
}

/// A slave ahead of its master (the master's data was rolled back) stops in
/// the error state and keeps its data; with `slave.resync_when_ahead` it
/// replaces it with the master's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slave_ahead_of_master_keeps_its_data_unless_told() {
    let dir = TestDir::new("fullsync-ahead");
    let mut master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    put_bulk(&master, 50, 10).await;
    assert!(master.sigterm_and_wait().await.unwrap().success());
    let backup = dir.join("master-backup");
    copy_dir(&master.data_dir, &backup);
    master.restart().await.unwrap();
    let mut slave = Node::start_slave(&dir.join("slave"), &master.url(), &[], &[])
        .await
        .unwrap();
    wait_full_synced(&slave, 1).await;
    put_bulk(&master, 80, 10).await;
    support::converge(&master, &[&slave]).await;
    let slave_sum = slave.checksum().await.unwrap();
    // Roll the master back to the backup: same history, shorter.
    assert!(master.sigterm_and_wait().await.unwrap().success());
    std::fs::remove_dir_all(&master.data_dir).unwrap();
    copy_dir(&backup, &master.data_dir);
    master.restart().await.unwrap();
    assert!(slave.sigterm_and_wait().await.unwrap().success());
    slave.restart().await.unwrap();
    let i = wait_until("the slave to refuse its master", DEADLINE, || async {
        let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
        if slave_link(&i).state == "error" {
            Ok(Some(i))
        } else {
            Err(describe_slave(&i))
        }
    })
    .await;
    let err = slave_link(&i).last_error;
    assert!(
        err.contains("AHEAD_OF_MASTER") && err.contains("resync_when_ahead"),
        "{err}"
    );
    assert_eq!(
        slave.checksum().await.unwrap(),
        slave_sum,
        "the slave kept its data"
    );
    // Told to resync: it takes the master's data.
    assert!(slave.sigterm_and_wait().await.unwrap().success());
    let slave2 = Node::start_slave(
        &slave.data_dir,
        &master.url(),
        &[("TERN__SLAVE__RESYNC_WHEN_AHEAD", "true")],
        &[],
    )
    .await
    .unwrap();
    wait_full_synced(&slave2, 1).await;
    support::converge(&master, &[&slave2]).await;
    assert_eq!(
        slave2.checksum().await.unwrap(),
        master.checksum().await.unwrap()
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}
