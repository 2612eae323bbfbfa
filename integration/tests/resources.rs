//! Resources under an idle-connection flood. A master whose open-file limit is
//! 256 (soft and hard, so raising it does not help), with 64 KiB binlog
//! segments and a small retention, has a slave and a write load; then 400 idle
//! TCP connections (more than the limit) are opened to its port and held.
//!
//! The master serves at most the connections its budget leaves room for
//! (`connection_budget(256, server.max_connections)`), the rest wait in the
//! listen backlog and get in as idle ones are closed: every one of the 400 is
//! eventually accepted and closed by the server, `Info.connections` never
//! exceeds the budget, no file-descriptor error is ever logged, writes go on,
//! segments roll and are purged, the slave converges to an equal Checksum, and
//! the master still stops cleanly on SIGTERM.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use support::{assert_replicas_equal, log_count, start_slave, wait_connected, wait_more_acked};
use tern_common::proto::admin::v1::{self as admin, admin_client::AdminClient};
use tern_integration::node::{REQUEST_TIMEOUT, channel};
use tern_integration::{Node, TestDir, Workload, binlog_segments};
use tokio::io::AsyncReadExt;

/// The master's RLIMIT_NOFILE.
const NOFILE: u64 = 256;
/// Idle connections opened at once.
const FLOOD: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_flood_under_a_low_fd_limit() {
    let dir = TestDir::new("resources");
    let env = [
        ("TERN__BINLOG__SEGMENT_BYTES", "65536"),
        ("TERN__BINLOG__RETAIN_BYTES", "262144"),
        ("TERN__SERVER__IDLE_TIMEOUT_MS", "2000"),
    ];
    let mut master =
        Node::start_ready_with_nofile("tern-master", &dir.join("master"), &[], &env, Some(NOFILE))
            .await
            .unwrap();
    let budget = tern_common::server::connection_budget(NOFILE, 4096);
    assert!(
        budget.max_connections < FLOOD,
        "the flood must exceed the connection budget {budget:?}"
    );
    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;

    let work = Workload::new(16, 32);
    let load = work.start_load(&master.url(), 4);
    wait_more_acked(&load, 200).await;
    // One connection for Info, used every 100 ms so it is never idle.
    let admin_client = AdminClient::new(channel(&master.url(), REQUEST_TIMEOUT));
    let before = admin_client
        .clone()
        .info(admin::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let last_segment_before = binlog_segments(&master.data_dir).unwrap().last().unwrap().0;

    // Info every 100 ms on one connection (so it is never idle) until the
    // flood is over; the most connections it saw open.
    let flood_over = Arc::new(AtomicBool::new(false));
    let sampler = {
        let mut admin_client = admin_client.clone();
        let flood_over = flood_over.clone();
        tokio::spawn(async move {
            let (mut max_seen, mut samples) = (0, 0u32);
            while !flood_over.load(Ordering::Relaxed) {
                let i = admin_client
                    .info(admin::InfoRequest {})
                    .await
                    .expect("Info during the flood")
                    .into_inner();
                max_seen = max_seen.max(i.connections);
                samples += 1;
                tokio::time::sleep(support::POLL).await;
            }
            (max_seen, samples)
        })
    };
    // Each idle connection reads (the server's SETTINGS) until the server
    // closes it; the client side stays open until the test ends.
    let closed_by_server = Arc::new(AtomicU32::new(0));
    let mut readers = Vec::with_capacity(FLOOD);
    for n in 0..FLOOD {
        let mut s = tokio::net::TcpStream::connect(master.addr())
            .await
            .unwrap_or_else(|e| panic!("idle connection {n}: {e}"));
        let closed = closed_by_server.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = Vec::new();
            if s.read_to_end(&mut buf).await.is_ok() {
                closed.fetch_add(1, Ordering::Relaxed);
            }
            s
        }));
    }
    support::wait_until(
        "the master to accept and close every idle connection",
        Duration::from_secs(120),
        || {
            let closed = closed_by_server.load(Ordering::Relaxed) as usize;
            async move {
                if closed == FLOOD {
                    Ok(Some(()))
                } else {
                    Err(format!("{closed} of {FLOOD} closed by the server"))
                }
            }
        },
    )
    .await;
    flood_over.store(true, Ordering::Relaxed);
    let (max_seen, samples) = sampler.await.unwrap();
    eprintln!(
        "connections: at most {max_seen} open in {samples} samples; budget {budget:?}; \
         acked writes so far {}",
        load.acked()
    );
    assert_eq!(
        max_seen as usize, budget.max_connections,
        "with {FLOOD} clients waiting, every connection slot is taken, never more"
    );

    // The write path kept working: more writes, new segments, old ones purged.
    wait_more_acked(&load, 200).await;
    let stats = load.stop().await;
    assert_eq!(
        stats.failed, 0,
        "no write may fail under the flood: {:?}",
        stats.errors
    );
    let after = master.info().await.unwrap();
    let last_segment_after = binlog_segments(&master.data_dir).unwrap().last().unwrap().0;
    assert!(
        last_segment_after > last_segment_before,
        "binlog segments rolled during the flood ({last_segment_before} then {last_segment_after})"
    );
    assert!(
        after.first_index > before.first_index,
        "retention purged segments during the flood (first index {} then {})",
        before.first_index,
        after.first_index
    );
    assert_eq!(log_count(&master, "Too many open files"), 0);
    assert_eq!(log_count(&master, "os error 24"), 0);
    assert_eq!(log_count(&master, "write path failed"), 0);

    assert_replicas_equal(&master, &[&slave], &work).await;
    for r in readers {
        drop(r.await.unwrap());
    }
    let status = master.sigterm_and_wait().await.unwrap();
    assert!(status.success(), "master exit status {status}");
    assert!(master.data_dir.join("CLEAN_SHUTDOWN").exists());
}
