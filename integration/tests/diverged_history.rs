//! I8: a master that loses its unsynced binlog tail (fsync = everysec or no)
//! and writes new, different transactions past the index its slaves hold must
//! never let them continue silently.
//!
//! Three slaves follow a master; one ("behind") is frozen early. The master is
//! SIGKILLed after more writes, its binlog is cut back to a boundary between
//! the frozen slave's position and the others' (what a power loss does to an
//! unsynced tail), and it restarts: it must start a new history whose parent
//! ended at the cut. New writes then reuse the lost indexes. The slave that
//! holds events beyond the fork stops in `error` with `diverged` and keeps its
//! data; the one with `slave.resync_when_ahead` full-syncs; the frozen one,
//! whose position is a prefix of the new history, continues with a partial
//! sync and adopts the new repl id. Everyone that runs ends with the master's
//! Checksum.

mod support;

use std::time::Duration;

use support::{
    DEADLINE, FAST_LINK, converge, describe_slave, put_keys, sigstop_and_wait, slave_counters,
    wait_until,
};
use tern_common::proto::kv::v1 as kv;
use tern_integration::{Node, TestDir, binlog_boundaries, lose_binlog_tail};

fn env_with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v: Vec<(&str, &str)> = FAST_LINK.to_vec();
    v.extend_from_slice(extra);
    v
}

async fn lost_tail_never_continues_silently(fsync: &str) {
    let dir = TestDir::new(&format!("diverged-{fsync}"));
    let master_env = env_with(&[("TERN__BINLOG__FSYNC", fsync)]);
    let mut master = Node::start_master(&dir.join("master"), &master_env, &[])
        .await
        .unwrap();
    let url = master.url();
    let keeper = Node::start_slave(&dir.join("keeper"), &url, &FAST_LINK, &[])
        .await
        .unwrap();
    let resync_env = env_with(&[("TERN__SLAVE__RESYNC_WHEN_AHEAD", "true")]);
    let resyncer = Node::start_slave(&dir.join("resyncer"), &url, &resync_env, &[])
        .await
        .unwrap();
    let behind = Node::start_slave(&dir.join("behind"), &url, &FAST_LINK, &[])
        .await
        .unwrap();

    put_keys(&master, "a", 150).await;
    converge(&master, &[&keeper, &resyncer, &behind]).await;
    let behind_full_syncs = slave_counters(&behind.info().await.unwrap()).full_syncs;
    let old = master.info().await.unwrap();
    sigstop_and_wait(&behind).await;
    let behind_at = old.last_index;

    put_keys(&master, "b", 150).await;
    let l0 = converge(&master, &[&keeper, &resyncer]).await;
    let keeper_before = keeper.checksum().await.unwrap();
    assert_eq!(keeper_before.index, l0);

    // Power loss: the master dies and its binlog keeps only a prefix, which
    // must still hold everything RocksDB has durably applied.
    master.sigkill().unwrap();
    let durable_applied = tern_common::state::read_checkpoint_meta(&master.data_dir.join("db"))
        .unwrap()
        .applied_index;
    let candidates: Vec<u64> = binlog_boundaries(&master.data_dir)
        .unwrap()
        .into_iter()
        .filter(|&b| b > behind_at.max(durable_applied) && b < l0)
        .collect();
    assert!(
        !candidates.is_empty(),
        "no boundary between {behind_at}/{durable_applied} and {l0} to cut at"
    );
    let l1 = candidates[candidates.len() / 2];
    let removed = lose_binlog_tail(&master.data_dir, l1).unwrap();
    eprintln!(
        "{fsync}: slaves at {l0}, behind at {behind_at}; master binlog cut to {l1} ({removed} bytes)"
    );

    let info = master.restart().await.unwrap();
    assert_eq!(info.last_index, l1);
    assert_ne!(
        info.repl_id, old.repl_id,
        "a crash with fsync = {fsync} must start a new history"
    );
    assert_eq!(info.histories.len(), 1, "{:?}", info.histories);
    assert_eq!(info.histories[0].repl_id, old.repl_id);
    assert_eq!(info.histories[0].end_index, l1);

    // New, different transactions reuse the lost indexes and go past l0.
    let n = (l0 - l1) as usize + 20;
    let last = put_keys(&master, "c", n).await;
    assert!(
        last > l0 + 10,
        "new writes end at {last}, slaves were at {l0}"
    );

    // The slave beyond the fork stops and keeps its data.
    let keeper_info = wait_until("the keeper to stop in error", DEADLINE, || async {
        let i = keeper.info().await.map_err(|e| format!("{e:#}"))?;
        let link = i.link.clone().unwrap_or_default();
        if link.state == "error" {
            Ok(Some(i))
        } else {
            Err(describe_slave(&i))
        }
    })
    .await;
    let err = keeper_info.link.clone().unwrap_or_default().last_error;
    assert!(err.contains("DIVERGED"), "keeper's last error: {err}");
    // It stays there: never connects, never applies the new history.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let keeper_info = keeper.info().await.unwrap();
    assert_eq!(keeper_info.link.clone().unwrap_or_default().state, "error");
    assert_eq!(keeper_info.repl_id, old.repl_id);
    assert_eq!(keeper.checksum().await.unwrap(), keeper_before);

    // The frozen slave's position is a prefix of the new history: partial sync.
    behind.sigcont().unwrap();
    let target = converge(&master, &[&resyncer, &behind]).await;
    let mc = master.checksum().await.unwrap();
    assert_eq!(mc.index, target);
    assert_eq!(resyncer.checksum().await.unwrap(), mc);
    assert_eq!(behind.checksum().await.unwrap(), mc);
    let bi = behind.info().await.unwrap();
    assert_eq!(
        slave_counters(&bi).full_syncs,
        behind_full_syncs,
        "the slave behind the fork must continue partially: {}",
        describe_slave(&bi)
    );
    assert_eq!(bi.repl_id, info.repl_id, "it adopts the new history");
    assert_eq!(bi.histories.len(), 1);
    assert_eq!(bi.histories[0].end_index, l1);
    let ri = resyncer.info().await.unwrap();
    assert!(
        slave_counters(&ri).full_syncs >= 1,
        "{}",
        describe_slave(&ri)
    );
    assert_eq!(ri.repl_id, info.repl_id);
    for s in [&behind, &resyncer] {
        let c = slave_counters(&s.info().await.unwrap());
        assert_eq!(c.duplicates_skipped, 0);
    }

    // The operator decides: the keeper, restarted with resync_when_ahead,
    // replaces its data with the master's.
    let keeper_dir = keeper.data_dir.clone();
    let mut keeper = keeper;
    assert!(keeper.sigterm_and_wait().await.unwrap().success());
    let keeper = Node::start_slave(&keeper_dir, &url, &resync_env, &[])
        .await
        .unwrap();
    let target = converge(&master, &[&keeper, &resyncer, &behind]).await;
    let mc = master.checksum().await.unwrap();
    assert_eq!(mc.index, target);
    assert_eq!(keeper.checksum().await.unwrap(), mc);
    // The keys written before the cut survive where the master kept them, and
    // the lost ones are gone everywhere: no node holds a mix of histories.
    let mut kv = keeper.kv();
    let got = kv
        .get(kv::GetRequest {
            key: b"a00000".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_tail_everysec_never_continues_silently() {
    lost_tail_never_continues_silently("everysec").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_tail_no_fsync_never_continues_silently() {
    lost_tail_never_continues_silently("no").await;
}

/// With fsync = always nothing is shipped before it is durable, so a crash
/// never forks the history: slaves continue partially after a master SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_always_crash_keeps_the_history() {
    let dir = TestDir::new("diverged-always");
    let env = env_with(&[("TERN__BINLOG__FSYNC", "always")]);
    let mut master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let slave = Node::start_slave(&dir.join("slave"), &master.url(), &FAST_LINK, &[])
        .await
        .unwrap();
    put_keys(&master, "a", 50).await;
    converge(&master, &[&slave]).await;
    let before = master.info().await.unwrap();
    let full = slave_counters(&slave.info().await.unwrap()).full_syncs;
    master.sigkill().unwrap();
    let after = master.restart().await.unwrap();
    assert_eq!(after.repl_id, before.repl_id);
    assert!(after.histories.is_empty());
    put_keys(&master, "b", 50).await;
    converge(&master, &[&slave]).await;
    assert_eq!(
        slave.checksum().await.unwrap(),
        master.checksum().await.unwrap()
    );
    assert_eq!(
        slave_counters(&slave.info().await.unwrap()).full_syncs,
        full
    );
}

/// Under everysec/no a power loss can take binlog events that RocksDB had
/// already made durable (it flushes by itself when a memtable fills). The
/// master must still start: it continues its binlog after the state and forks
/// the history at the state's applied index. A slave at that index continues
/// partially; one behind it (its events are gone) full-syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_ahead_of_a_lost_binlog_tail_continues_after_the_state() {
    let dir = TestDir::new("diverged-state-ahead");
    let env = env_with(&[
        ("TERN__BINLOG__FSYNC", "everysec"),
        ("TERN__SERVER__SHUTDOWN_TIMEOUT_MS", "2000"),
    ]);
    let mut master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let url = master.url();
    let level = Node::start_slave(&dir.join("level"), &url, &FAST_LINK, &[])
        .await
        .unwrap();
    let behind = Node::start_slave(&dir.join("behind"), &url, &FAST_LINK, &[])
        .await
        .unwrap();
    put_keys(&master, "a", 100).await;
    let behind_at = converge(&master, &[&level, &behind]).await;
    let behind_full = slave_counters(&behind.info().await.unwrap()).full_syncs;
    sigstop_and_wait(&behind).await;
    put_keys(&master, "b", 100).await;
    let applied = converge(&master, &[&level]).await;
    let level_full = slave_counters(&level.info().await.unwrap()).full_syncs;
    let before = master.info().await.unwrap();

    // RocksDB durable at `applied` (a clean stop flushes it), then the machine
    // dies before anything records that the stop was clean, and the binlog
    // loses events the state holds.
    assert!(master.sigterm_and_wait().await.unwrap().success());
    std::fs::remove_file(master.data_dir.join("CLEAN_SHUTDOWN")).unwrap();
    let meta = tern_common::state::read_checkpoint_meta(&master.data_dir.join("db")).unwrap();
    assert_eq!(meta.applied_index, applied);
    let boundaries: Vec<u64> = binlog_boundaries(&master.data_dir)
        .unwrap()
        .into_iter()
        .filter(|&b| b > behind_at && b < applied)
        .collect();
    let cut = boundaries[boundaries.len() / 2];
    lose_binlog_tail(&master.data_dir, cut).unwrap();

    let info = master.restart().await.unwrap();
    assert_eq!(info.applied_index, applied);
    assert_eq!(info.last_index, applied);
    assert_eq!(
        info.first_index,
        applied + 1,
        "the binlog continues after the state"
    );
    assert_ne!(info.repl_id, before.repl_id);
    assert_eq!(info.histories.len(), 1, "{:?}", info.histories);
    assert_eq!(info.histories[0].repl_id, before.repl_id);
    assert_eq!(info.histories[0].end_index, applied);

    put_keys(&master, "c", 50).await;
    behind.sigcont().unwrap();
    let target = converge(&master, &[&level, &behind]).await;
    let mc = master.checksum().await.unwrap();
    assert_eq!(mc.index, target);
    assert_eq!(mc.keys, 250);
    assert_eq!(level.checksum().await.unwrap(), mc);
    assert_eq!(behind.checksum().await.unwrap(), mc);
    let li = level.info().await.unwrap();
    assert_eq!(
        slave_counters(&li).full_syncs,
        level_full,
        "the slave at the state's index continues partially: {}",
        describe_slave(&li)
    );
    let bi = behind.info().await.unwrap();
    assert!(
        slave_counters(&bi).full_syncs > behind_full,
        "the slave behind the lost events full-syncs: {}",
        describe_slave(&bi)
    );
}
