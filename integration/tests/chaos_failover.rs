//! Seeded failover schedules (CI-sized; see `tern_integration::failover`): a
//! master, two slaves and a chain (a slave of the first slave), a
//! semi-synchronous and an asynchronous load; each round, slaves (the chain's
//! middle included) SIGKILLed or frozen past the link timeout, then the master
//! SIGKILLed under load, the most advanced slave promoted, the others
//! re-pointed with `Admin.SetMaster` and the old master rejoined as a slave.
//! Every run must end with no divergence: no acknowledged `min_replicas = 1`
//! write beyond a fork, asynchronous writes beyond it counted as lost and
//! never duplicated, re-pointed slaves resyncing partially, the old master
//! full-syncing exactly when it held writes beyond the fork, every node with
//! the new master's Checksum and every acknowledged write exactly once.
//! Replay a seed with `tern-chaos --failover --seed N --runs 1`.

use tern_integration::TestDir;
use tern_integration::failover::{self, FailoverConfig};

async fn run_seed(seed: u64) {
    let dir = TestDir::new(&format!("chaos-failover-{seed}"));
    let cfg = FailoverConfig {
        seed,
        failovers: 3,
        dir: dir.path().to_path_buf(),
    };
    let report = failover::run(&cfg)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: the run failed: {e:#}"));
    eprintln!("{report}");
    assert_eq!(report.failovers, 3);
    assert!(report.semi_acked > 0 && report.async_acked > 0, "{report}");
    assert!(
        report.divergences.is_empty(),
        "seed {seed} diverged:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_seed_1() {
    run_seed(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_seed_2() {
    run_seed(2).await;
}
