//! MySQL F5: transactions larger than one BinlogBatch (batch_bytes = 4096, each
//! Txn ~40 KB: 200 puts of 200 bytes plus two IncrBy) are streamed in pieces;
//! the slave is SIGKILLed mid-stream again and again, so its relay log often
//! ends inside a transaction. A half-received transaction must never count as
//! received (I3): restart truncates it, the slave asks again from the last
//! Commit, the master accepts that position, and the data converges exactly.
//! The last crashes also leave a torn or CRC-failing record at the tail.
//! A final clean stop restarts with nothing to replay (I6).

mod support;

use std::time::Duration;

use support::{
    BigTxnLoad, DEADLINE, TailDamage, assert_replicas_equal, binlog_tail, converge,
    damage_binlog_tail, describe_slave, log_count, node_counters, sigstop_and_wait, slave_counters,
    slave_link, start_slave, wait_connected, wait_until,
};
use tern_common::record::KindTag;
use tern_integration::{Node, TestDir, Workload};

/// Pause of each big-Txn client between transactions (keeps the binlog, and
/// the slave's catch-up, small).
const PAUSE: Duration = Duration::from_millis(20);

/// One batch in flight: a transaction's pieces reach the slave one by one.
/// (Batches that arrive together are appended together, so with a wider
/// window the relay log ends inside a transaction less often.)
const WINDOW_BATCHES: &str = "1";

/// What the slave logs when start-up truncates a torn or partial relay tail.
const TRUNCATED: &str = "truncated it";

/// Freezes (SIGSTOP) the slave at a moment its relay log on disk ends inside
/// a transaction (checked on the files while it is stopped) and leaves it
/// stopped. Returns the last event on disk.
async fn freeze_inside_a_transaction(slave: &Node) -> (u64, KindTag) {
    for _attempt in 0..500 {
        wait_until(
            "the relay tail to be inside a transaction",
            DEADLINE,
            || async move {
                let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
                if i.last_index > slave_link(&i).received_index {
                    Ok(Some(()))
                } else {
                    Err(describe_slave(&i))
                }
            },
        )
        .await;
        sigstop_and_wait(slave).await;
        match binlog_tail(&slave.data_dir) {
            Some((index, kind)) if kind != KindTag::Commit => return (index, kind),
            _ => slave.sigcont().unwrap(),
        }
    }
    panic!("never caught the slave's relay log inside a transaction in 500 attempts");
}

/// SIGKILLs the slave at a moment its relay log ends inside a transaction.
async fn kill_inside_a_transaction(slave: &mut Node) -> (u64, KindTag) {
    let tail = freeze_inside_a_transaction(slave).await;
    slave.sigkill().unwrap();
    tail
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_slave_never_keeps_half_a_transaction() {
    let dir = TestDir::new("repl-partial-txn");
    let env = [
        ("TERN__SYNC__BATCH_BYTES", "4096"),
        ("TERN__SYNC__WINDOW_BATCHES", WINDOW_BATCHES),
    ];
    let master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let mut slave = start_slave(&dir, "slave", &master, &env).await;
    wait_connected(&slave, 1).await;
    // A new slave may start with a full sync; every later one is partial.
    let master_full = node_counters(&master).await.full_syncs;

    let work = Workload::new(6, 0);
    let load = BigTxnLoad::start(&work, &master.url(), 2, 200, 200, PAUSE);
    load.wait_more(20).await;

    let mut replayed = Vec::new();
    for cycle in 1..=7 {
        let truncations_before = log_count(&slave, TRUNCATED);
        let (tail_index, tail_kind) = kill_inside_a_transaction(&mut slave).await;
        // The last two crashes also tear the last record or break its CRC
        // (it belongs to the unfinished transaction, so nothing received is lost).
        let damage = match cycle {
            6 => Some(TailDamage::Torn),
            7 => Some(TailDamage::BadCrc),
            _ => None,
        };
        if let Some(how) = damage {
            let (index, kind) = damage_binlog_tail(&slave.data_dir, how);
            assert_eq!((index, kind), (tail_index, tail_kind));
            eprintln!("cycle {cycle}: damaged relay record {index} ({kind:?}): {how:?}");
        }
        if cycle % 2 == 0 {
            // Stay down while the master keeps committing big transactions.
            load.wait_more(10).await;
        }
        let info = slave.restart().await.unwrap();
        eprintln!(
            "cycle {cycle}: killed with the relay tail at {tail_index} ({tail_kind:?}); \
             restarted: replayed_on_start {} {}",
            info.replayed_on_start,
            describe_slave(&info)
        );
        replayed.push(info.replayed_on_start);
        assert!(
            log_count(&slave, TRUNCATED) > truncations_before,
            "cycle {cycle}: the relay log ended inside a transaction (event {tail_index} is a \
             {tail_kind:?}) but start-up did not report truncating it"
        );
        assert!(
            info.applied_index <= info.last_index,
            "cycle {cycle}: applied beyond the relay log: {}",
            describe_slave(&info)
        );
        // It resumes from its last Commit with a partial sync: a relay log
        // that kept half a transaction would name a non-boundary position.
        let reconnected = wait_connected(&slave, 1).await;
        assert_eq!(
            slave_counters(&reconnected).duplicates_skipped,
            0,
            "cycle {cycle}: {}",
            describe_slave(&reconnected)
        );
        assert_eq!(slave_counters(&reconnected).full_syncs, 0);
        load.wait_more(5).await;
    }
    eprintln!("replayed_on_start after each SIGKILL: {replayed:?}");

    let stats = load.stop().await;
    eprintln!("big-Txn load: {stats:?}");
    assert!(
        stats.unexpected.is_empty(),
        "errors a correct master never returns: {:?}",
        stats.unexpected
    );
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
    assert_replicas_equal(&master, &[&slave], &work).await;

    // A clean stop, then a restart: nothing to replay, and the slave continues
    // with a partial sync (never a full one).
    let master_partial_before = master
        .info()
        .await
        .unwrap()
        .counters
        .unwrap_or_default()
        .partial_syncs;
    let status = slave.sigterm_and_wait().await.unwrap();
    assert!(status.success(), "slave SIGTERM exit status: {status}");
    let info = slave.restart().await.unwrap();
    assert_eq!(
        info.replayed_on_start,
        0,
        "restart after a clean shutdown must replay nothing: {}",
        describe_slave(&info)
    );
    let info = wait_connected(&slave, 1).await;
    assert_eq!(slave_counters(&info).full_syncs, 0);
    assert!(slave_counters(&info).partial_syncs >= 1);
    let mi = master.info().await.unwrap();
    let mc = mi.counters.unwrap_or_default();
    assert!(
        mc.partial_syncs > master_partial_before,
        "the master counts the reconnect as a partial sync ({} -> {})",
        master_partial_before,
        mc.partial_syncs
    );
    assert_eq!(
        mc.full_syncs, master_full,
        "a slave with a position never needs a full sync here"
    );

    // More big transactions after the clean restart still replicate exactly.
    let load = BigTxnLoad::start(&work, &master.url(), 2, 200, 200, PAUSE);
    load.wait_more(10).await;
    let stats = load.stop().await;
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
    converge(&master, &[&slave]).await;
    assert_replicas_equal(&master, &[&slave], &work).await;
}

/// The same without a crash: the link is lost (the slave frozen longer than
/// the link timeout) while the relay log ends inside a transaction. The
/// reconnect barrier (I4) rolls the relay back to the last Commit in-process
/// before it names a position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_lost_inside_a_transaction_rolls_back_to_a_boundary() {
    let dir = TestDir::new("repl-partial-txn-link");
    let env = [
        ("TERN__SYNC__BATCH_BYTES", "4096"),
        ("TERN__SYNC__WINDOW_BATCHES", WINDOW_BATCHES),
        ("TERN__SYNC__LINK_TIMEOUT_MS", "1500"),
        ("TERN__SYNC__HEARTBEAT_MS", "300"),
    ];
    let master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let slave = start_slave(&dir, "slave", &master, &env).await;
    // A new slave may start with a full sync; every later one is partial.
    let slave_full = slave_counters(&wait_connected(&slave, 1).await).full_syncs;
    let work = Workload::new(6, 0);
    let load = BigTxnLoad::start(&work, &master.url(), 2, 200, 200, PAUSE);
    load.wait_more(20).await;

    for cycle in 1..=3u64 {
        let (tail_index, tail_kind) = freeze_inside_a_transaction(&slave).await;
        // Longer than the link timeout: both sides drop the session.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        slave.sigcont().unwrap();
        let info = wait_connected(&slave, cycle + 1).await;
        eprintln!(
            "cycle {cycle}: frozen with the relay tail at {tail_index} ({tail_kind:?}); \
             reconnected: {}",
            describe_slave(&info)
        );
        assert_eq!(
            slave_counters(&info).duplicates_skipped,
            0,
            "{}",
            describe_slave(&info)
        );
        assert_eq!(
            slave_counters(&info).full_syncs,
            slave_full,
            "{}",
            describe_slave(&info)
        );
        load.wait_more(5).await;
    }
    let stats = load.stop().await;
    assert!(
        stats.unexpected.is_empty(),
        "errors a correct master never returns: {:?}",
        stats.unexpected
    );
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
    assert_replicas_equal(&master, &[&slave], &work).await;
    let si = slave.info().await.unwrap();
    let c = slave_counters(&si);
    assert!(c.reconnects >= 3, "{}", describe_slave(&si));
    assert!(c.partial_syncs >= 4, "{}", describe_slave(&si));
    eprintln!(
        "in-process rollbacks of a partial relay tail: {} (final: {})",
        log_count(&slave, "rolling back a partial transaction"),
        describe_slave(&si)
    );
}
