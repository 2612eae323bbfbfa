//! Restarts under load. A slave stopped cleanly (SIGTERM) and restarted,
//! three times, replays nothing (I6) and continues with a partial sync; then
//! the master (fsync = always) is SIGKILLed and restarted while clients write:
//! both slaves reconnect by themselves, nothing acknowledged is lost, and
//! master and slaves converge to the same data. A clean master stop and
//! restart under load follows.

mod support;

use std::time::Duration;

use rand::Rng;
use support::{
    assert_replicas_equal, describe_slave, slave_counters, start_slave, wait_connected,
    wait_more_acked,
};
use tern_integration::{Node, TestDir, Workload};

/// Waits until the master lists `n` slaves streaming.
async fn wait_streaming(master: &Node, n: usize) {
    support::wait_until(
        &format!("{n} slaves to stream from the master"),
        support::DEADLINE,
        || async move {
            let mi = master.info().await.map_err(|e| format!("{e:#}"))?;
            let streaming = mi.slaves.iter().filter(|s| s.state == "streaming").count();
            if streaming == n {
                Ok(Some(()))
            } else {
                Err(format!("{:?}", mi.slaves))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slave_sigterm_cycles_and_master_sigkill_under_load() {
    let dir = TestDir::new("repl-restarts");
    let fsync = [("TERN__BINLOG__FSYNC", "always")];
    let mut master = Node::start_master(&dir.join("master"), &fsync, &[])
        .await
        .unwrap();
    let mut a = start_slave(&dir, "slave-a", &master, &fsync).await;
    let b = start_slave(&dir, "slave-b", &master, &fsync).await;
    wait_connected(&a, 1).await;
    // A new slave may start with a full sync; every later sync is partial.
    let b_full = slave_counters(&wait_connected(&b, 1).await).full_syncs;

    let work = Workload::new(8, 4);
    let load = work.start_load(&master.url(), 6);
    wait_more_acked(&load, 200).await;

    // Clean slave restarts while the master keeps writing.
    for cycle in 1..=3 {
        let ms = rand::rng().random_range(100..600);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let status = a.sigterm_and_wait().await.unwrap();
        assert!(
            status.success(),
            "cycle {cycle}: slave exit status {status}"
        );
        assert!(
            a.data_dir.join("CLEAN_SHUTDOWN").exists(),
            "cycle {cycle}: a clean stop writes the CLEAN_SHUTDOWN marker"
        );
        wait_more_acked(&load, 100).await;
        let info = a.restart().await.unwrap();
        eprintln!("cycle {cycle}: restarted: {}", describe_slave(&info));
        assert_eq!(
            info.replayed_on_start,
            0,
            "cycle {cycle}: restart after SIGTERM must replay nothing: {}",
            describe_slave(&info)
        );
        let info = wait_connected(&a, 1).await;
        let c = slave_counters(&info);
        assert_eq!(c.full_syncs, 0, "cycle {cycle}: {}", describe_slave(&info));
        assert_eq!(
            c.duplicates_skipped,
            0,
            "cycle {cycle}: {}",
            describe_slave(&info)
        );
        wait_more_acked(&load, 100).await;
    }

    // SIGKILL the master in the middle of the load, restart it on the same
    // port and data directory; the load keeps going across the outage.
    let ms = rand::rng().random_range(200..800);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let acked_before = load.acked();
    master.sigkill().unwrap();
    // Acknowledged by the killed process (the restarted one has not answered yet).
    let acked_by_killed = work.max_acked_index();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = master.restart().await.unwrap();
    eprintln!(
        "master restarted after SIGKILL ({acked_before} writes acked before): applied {} last {} \
         replayed {}",
        info.applied_index, info.last_index, info.replayed_on_start
    );
    // Start-up recovery applied the whole binlog; the load is already writing
    // again, so a group may sit between its binlog append and its apply when
    // Info is read: wait (bounded) for a moment with none in flight.
    support::wait_until(
        "the restarted master to apply its whole binlog",
        support::DEADLINE,
        || async {
            let i = master.info().await.map_err(|e| format!("{e:#}"))?;
            if i.applied_index == i.last_index {
                Ok(Some(()))
            } else {
                Err(format!("applied {} last {}", i.applied_index, i.last_index))
            }
        },
    )
    .await;
    assert!(
        info.last_index >= acked_by_killed,
        "acknowledged writes up to {acked_by_killed} but the restarted master's binlog ends at {}",
        info.last_index
    );
    wait_more_acked(&load, 300).await;
    // Both slaves come back to the restarted master (a new process: its
    // partial_syncs counts them again).
    wait_streaming(&master, 2).await;

    // A clean stop of the master under load: it restarts replaying nothing,
    // and the slaves come back again.
    let status = master.sigterm_and_wait().await.unwrap();
    assert!(status.success(), "master SIGTERM exit status: {status}");
    let acked_by_stopped = work.max_acked_index();
    let info = master.restart().await.unwrap();
    assert_eq!(
        info.replayed_on_start, 0,
        "master restart after SIGTERM must replay nothing"
    );
    assert!(
        info.last_index >= acked_by_stopped,
        "acknowledged writes up to {acked_by_stopped} but the restarted master's binlog ends at {}",
        info.last_index
    );
    wait_more_acked(&load, 300).await;
    wait_streaming(&master, 2).await;

    let stats = load.stop().await;
    eprintln!("load: {stats:?}");
    assert!(
        stats.unexpected.is_empty(),
        "errors a correct master never returns: {:?}",
        stats.unexpected
    );
    assert_replicas_equal(&master, &[&a, &b], &work).await;
    for (name, s) in [("a", &a), ("b", &b)] {
        let i = s.info().await.unwrap();
        let c = slave_counters(&i);
        assert!(
            c.reconnects >= 2,
            "slave {name} lost its master twice: {}",
            describe_slave(&i)
        );
        // a was restarted (its counters with it), b was not.
        let expected = if name == "a" { 0 } else { b_full };
        assert_eq!(
            c.full_syncs,
            expected,
            "slave {name} needed a full sync: {}",
            describe_slave(&i)
        );
    }
    // The master was restarted too: it made no full sync since.
    assert_eq!(support::node_counters(&master).await.full_syncs, 0);
}
