//! Shutdown is bounded whatever clients do with their streams.
//!
//! - A master holding ~48 MiB of data has a `Sync` client that completed
//!   TrySync and the first-send ack and then never reads its stream, a `DbSync`
//!   client that never reads its snapshot, and a write load. On SIGTERM it
//!   exits 0 within `server.shutdown_timeout_ms` (3 s here; the harness waits
//!   up to 30 s), having cut the connections those clients held (its log says
//!   so), writes the clean-shutdown marker, and a restart replays 0 events with
//!   every acknowledged write present.
//! - A slave with a client holding `Get(min_index = huge, wait_ms = 60000)`,
//!   while the master's load replicates, stops cleanly too (the read ends with
//!   UNAVAILABLE) and a restart replays nothing.

mod support;

use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use support::{
    Rogue, first_ack, log_count, start_slave, wait_connected, wait_more_acked, wait_until,
};
use tern_common::proto::kv::v1 as kv;
use tern_common::proto::replication::v1 as pb;
use tern_common::proto::replication::v1::replication_client::ReplicationClient;
use tern_integration::node::{REQUEST_TIMEOUT, channel, kv_client};
use tern_integration::{Node, TestDir, Workload};

/// `server.shutdown_timeout_ms` of the nodes under test.
const SHUTDOWN_TIMEOUT_MS: &str = "3000";
/// The line the server logs when it cuts the connections still open.
const CUT_LOG: &str = "connections still open after server.shutdown_timeout_ms";
/// Data written before the rogue clients connect: far more than HTTP/2 flow
/// control windows and socket buffers hold, so their streams get stuck.
const FILL_BYTES: usize = 48 << 20;
const FILL_VALUE: usize = 64 << 10;

/// Puts `FILL_BYTES` of random 64 KiB values from 8 concurrent clients.
async fn fill(master: &Node) {
    let writers = 8;
    let per_writer = FILL_BYTES / FILL_VALUE / writers;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let mut kv = master.kv();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    let mut value = vec![0u8; FILL_VALUE];
                    rand::rng().fill(&mut value[..]);
                    kv.put(kv::PutRequest {
                        key: Bytes::from(format!("fill-{w}-{i}")),
                        value: Bytes::from(value),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("fill Put {w}/{i}: {e}"));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Restarts a node stopped by SIGTERM and checks it replays nothing (I6).
async fn restart_replays_nothing(node: &mut Node) {
    assert!(
        node.data_dir.join("CLEAN_SHUTDOWN").exists(),
        "{}: a clean stop writes the CLEAN_SHUTDOWN marker",
        node.role
    );
    let info = node.restart().await.unwrap();
    assert_eq!(
        info.replayed_on_start, 0,
        "{}: restart after a bounded clean shutdown must replay nothing",
        node.role
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_stops_within_the_bound_despite_clients_that_never_read() {
    let dir = TestDir::new("shutdown-master");
    let env = [
        ("TERN__SERVER__SHUTDOWN_TIMEOUT_MS", SHUTDOWN_TIMEOUT_MS),
        // The Sync client never acks: keep its session until the SIGTERM.
        ("TERN__SYNC__LINK_TIMEOUT_MS", "600000"),
    ];
    let mut master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    fill(&master).await;
    let repl_id = master.info().await.unwrap().repl_id;

    // Sync: TrySync from 0, the first-send ack, then never a read.
    let try_sync = pb::slave_message::Msg::TrySync(pb::TrySync {
        slave_id: "never-reads".into(),
        repl_id,
        index: 0,
        ..Default::default()
    });
    let mut rogue = Rogue::open(&master.url(), try_sync).await;
    let resp = rogue.try_sync_response().await;
    assert_eq!(resp.code, pb::TrySyncCode::Ok as i32, "{resp:?}");
    rogue.send(first_ack(resp.session_id, 0)).await;
    // DbSync: a fresh snapshot, never read.
    let mut repl = ReplicationClient::new(channel(&master.url(), Duration::from_secs(600)));
    let db_sync = repl
        .db_sync(pb::DbSyncRequest {
            slave_id: "never-reads-snapshot".into(),
            ..Default::default()
        })
        .await
        .expect("DbSync answers with its stream");
    wait_until(
        "the master to stream to both clients",
        support::DEADLINE,
        || async {
            let i = master.info().await.map_err(|e| format!("{e:#}"))?;
            let streaming = i
                .slaves
                .iter()
                .any(|s| s.id == "never-reads" && s.state == "streaming");
            let snapshot = i.pins.iter().any(|p| p.owner.starts_with("snapshot:"));
            if streaming && snapshot {
                Ok(Some(()))
            } else {
                Err(format!("slaves {:?}; pins {:?}", i.slaves, i.pins))
            }
        },
    )
    .await;

    let work = Workload::new(8, 4);
    let load = work.start_load(&master.url(), 4);
    wait_more_acked(&load, 100).await;
    let signalled = std::time::Instant::now();
    let status = master.sigterm_and_wait().await.unwrap();
    eprintln!("master exited {:?} after SIGTERM", signalled.elapsed());
    assert!(status.success(), "master exit status {status}");
    let stats = load.stop().await;
    assert!(
        stats.unexpected.is_empty(),
        "errors a stopping master never returns: {:?}",
        stats.unexpected
    );
    assert_eq!(
        log_count(&master, CUT_LOG),
        1,
        "the clients that never read held their connections until the bound"
    );
    restart_replays_nothing(&mut master).await;
    let summary = work
        .check(&mut master.kv())
        .await
        .unwrap_or_else(|e| panic!("acknowledged writes after the restart: {e:#}"));
    eprintln!("after the restart: {summary}; load {stats:?}");
    drop((rogue, db_sync));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slave_stops_within_the_bound_despite_a_long_min_index_read() {
    let dir = TestDir::new("shutdown-slave");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let mut slave = start_slave(
        &dir,
        "slave",
        &master,
        &[("TERN__SERVER__SHUTDOWN_TIMEOUT_MS", SHUTDOWN_TIMEOUT_MS)],
    )
    .await;
    wait_connected(&slave, 1).await;
    let work = Workload::new(8, 4);
    let load = work.start_load(&master.url(), 4);
    wait_more_acked(&load, 100).await;

    // One connection, opened by a first read, then a read that waits 60 s
    // for an index the master will not reach.
    let mut reader = kv_client(channel(&slave.url(), Duration::from_secs(120)));
    reader
        .get(kv::GetRequest {
            key: Bytes::from_static(b"c0"),
            ..Default::default()
        })
        .await
        .expect("a plain read on the slave");
    let held = tokio::spawn(async move {
        reader
            .get(kv::GetRequest {
                key: Bytes::from_static(b"c0"),
                min_index: u64::MAX / 2,
                wait_ms: 60_000,
            })
            .await
    });
    // Give the request time to reach the slave (it then waits there 60 s).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!held.is_finished(), "the min_index read returned early");

    let signalled = std::time::Instant::now();
    let status = slave.sigterm_and_wait().await.unwrap();
    eprintln!("slave exited {:?} after SIGTERM", signalled.elapsed());
    assert!(status.success(), "slave exit status {status}");
    let read = tokio::time::timeout(REQUEST_TIMEOUT, held)
        .await
        .expect("the held read ends when the slave stops")
        .unwrap();
    let err = read.expect_err("a read of an index the master never reached cannot succeed");
    assert_eq!(
        err.code(),
        tonic::Code::Unavailable,
        "the held read: {}",
        err.message()
    );
    eprintln!(
        "held read ended with {:?}: {}; connections cut: {}",
        err.code(),
        err.message(),
        log_count(&slave, CUT_LOG)
    );
    restart_replays_nothing(&mut slave).await;

    let stats = load.stop().await;
    assert_eq!(stats.failed, 0, "master writes: {:?}", stats.errors);
    support::assert_replicas_equal(&master, &[&slave], &work).await;
}
