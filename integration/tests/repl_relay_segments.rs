//! The slave's relay log is the master's binlog byte for byte, and it is cut
//! into segments like a binlog: a segment is closed once it reaches
//! `binlog.segment_bytes` at the next transaction boundary, so no segment is
//! much larger than `segment_bytes` (retention purges whole segments, and
//! recovery scans the whole tail segment at every start).
//!
//! A slave that catches up (here: after a clean stop while the master wrote
//! ~8 MB) receives full BinlogBatches, cut by `sync.batch_bytes` and so
//! usually inside a transaction; its segments must still stay near
//! `segment_bytes`.

mod support;

use std::time::Duration;

use support::{BigTxnLoad, assert_replicas_equal, start_slave, wait_connected};
use tern_integration::{Node, TestDir, Workload};

const SEGMENT_BYTES: u64 = 256 << 10;
const BATCH_BYTES: u64 = 64 << 10;
/// Puts per transaction and value size: ~40 KB transactions.
const PUTS: usize = 200;
const VALUE_LEN: usize = 200;

/// (file name, size) of every segment in `<data_dir>/binlog`, by name.
fn segments(node: &Node) -> Vec<(String, u64)> {
    let dir = node.data_dir.join("binlog");
    let mut v: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            // Record bytes, not the zeros written ahead of the tail.
            let bytes = std::fs::read(e.path()).ok()?;
            let (len, _) = tern_integration::segment_records_len(&bytes);
            name.ends_with(".binlog").then_some((name, len as u64))
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_slave_keeps_relay_segments_near_segment_bytes() {
    let dir = TestDir::new("repl-relay-segments");
    let seg = SEGMENT_BYTES.to_string();
    let batch = BATCH_BYTES.to_string();
    let env = [
        ("TERN__BINLOG__SEGMENT_BYTES", seg.as_str()),
        ("TERN__SYNC__BATCH_BYTES", batch.as_str()),
    ];
    let master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();

    let work = Workload::new(4, 0);
    let mut slave = start_slave(&dir, "slave", &master, &env).await;
    wait_connected(&slave, 1).await;
    let slow = BigTxnLoad::start(
        &work,
        &master.url(),
        1,
        PUTS,
        VALUE_LEN,
        Duration::from_millis(20),
    );
    slow.wait_more(10).await;

    // The slave stops cleanly; ~8 MB of history are written meanwhile; it
    // comes back with a partial sync and catches up in full batches.
    let status = slave.sigterm_and_wait().await.unwrap();
    assert!(status.success(), "slave SIGTERM: {status}");
    let fast = BigTxnLoad::start(&work, &master.url(), 2, PUTS, VALUE_LEN, Duration::ZERO);
    fast.wait_more(200).await;
    let stats = fast.stop().await;
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
    let info = slave.restart().await.unwrap();
    let relay_before: u64 = segments(&slave).iter().map(|(_, n)| n).sum();
    eprintln!(
        "relay log at restart: {relay_before} bytes; {}",
        support::describe_slave(&info)
    );
    let info = wait_connected(&slave, 1).await;
    assert_eq!(
        support::slave_counters(&info).full_syncs,
        0,
        "a slave with a position catches up with a partial sync"
    );
    slow.wait_more(10).await;
    let stats = slow.stop().await;
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
    // Same data, and the relay log is byte-identical to the binlog.
    assert_replicas_equal(&master, &[&slave], &work).await;

    let m = segments(&master);
    let s = segments(&slave);
    let m_max = m.iter().map(|(_, n)| *n).max().unwrap_or(0);
    eprintln!(
        "master: {} segments of at most {m_max} bytes; slave relay segments: {s:?}",
        m.len()
    );
    let total: u64 = s.iter().map(|(_, n)| n).sum();
    assert!(
        total > 4 * SEGMENT_BYTES,
        "the test needs a relay log of several segments' worth ({total} bytes)"
    );
    // A segment may pass segment_bytes by what one append brings (a batch)
    // plus the rest of the transaction it ends inside.
    let limit = SEGMENT_BYTES + BATCH_BYTES + (PUTS * (VALUE_LEN + 64)) as u64;
    let too_big: Vec<_> = s.iter().filter(|(_, n)| *n > limit).collect();
    assert!(
        too_big.is_empty(),
        "relay segments far larger than segment_bytes = {SEGMENT_BYTES} (limit {limit}): \
         {too_big:?} (of {} relay segments); the master cut the same history into {} \
         segments of at most {m_max} bytes",
        s.len(),
        m.len()
    );
}
