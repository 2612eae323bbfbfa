//! Seeded failover schedules over real processes, and their checker.
//!
//! A run starts a master, two direct slaves and a **chain**: a third slave
//! that follows the first one (cascading). Two loads write to the master all
//! the time: a **semi-synchronous** one (every write with `min_replicas = 1`)
//! and an asynchronous one. Each round the seed draws faults on the slaves
//! while the loads run (a slave, or the middle of the chain, SIGKILLed and
//! restarted, or frozen past the link timeout), then a **failover**:
//!
//! 1. the master is SIGKILLed under load;
//! 2. the slave with the highest received index is promoted: stopped, and
//!    `tern-master` started on its data directory;
//! 3. every other slave whose master was the old one (or the promoted node)
//!    is re-pointed with `Admin.SetMaster`; the chain's last slave keeps
//!    following its middle, which adopts the new history and passes it on;
//! 4. the old master comes back as a slave of the new one (with
//!    `slave.resync_when_ahead = true`);
//! 5. the loads go on against the new master.
//!
//! The checker holds the cluster to:
//!
//! - **no acknowledged semi-synchronous write is lost**: at every failover,
//!   the highest commit index of an acknowledged `min_replicas = 1` write is at
//!   or before the fork (the promoted slave's received index);
//! - asynchronous writes acknowledged after the fork may be lost: they are
//!   counted (`async_lost`), and held like uncertain ones (at most once);
//! - the new master's history names the old one ending exactly at the fork;
//!   every re-pointed slave (and the chain's last slave) continues with a
//!   **partial** resync (its `full_syncs` does not move); the old master
//!   full-syncs exactly when it held events beyond the fork, else continues
//!   partially;
//! - at the end every node has the new master's Checksum, every acknowledged
//!   write of both loads is present exactly once on every node (uncertain and
//!   lost ones at most once), and `duplicates_skipped` is 0 everywhere.
//!
//! Any failed check is a **divergence** in the [`FailoverReport`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_common::proto::admin::v1 as admin;

use crate::chaos::as_refs;
use crate::node::Node;
use crate::workload::{Load, Workload};

/// Link timeout and heartbeat of every node (short, so freezes time out quickly).
pub const LINK_TIMEOUT_MS: u64 = 1500;
const HEARTBEAT_MS: u64 = 300;
/// How long a semi-synchronous write waits for a slave before its answer
/// says it is committed on the master only.
const REPLICA_TIMEOUT_MS: u32 = 1000;
/// Bound of every wait for the cluster (a reconnect, a full sync, convergence).
const WAIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(50);
/// Clients of each load, and their pause after an acknowledged write.
const CLIENTS: usize = 2;
const PAUSE: Duration = Duration::from_millis(2);

/// One run: the seed draws the faults of each round.
#[derive(Clone, Debug)]
pub struct FailoverConfig {
    pub seed: u64,
    /// Failovers (rounds) in the run.
    pub failovers: usize,
    /// Data directories and logs.
    pub dir: PathBuf,
}

/// What a run did and found.
#[derive(Clone, Debug, Default)]
pub struct FailoverReport {
    pub seed: u64,
    pub failovers: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    pub semi_acked: u64,
    /// Semi-synchronous writes that failed (a timeout naming the commit
    /// index, or the master died): held at most once.
    pub semi_uncertain: u64,
    pub async_acked: u64,
    pub async_uncertain: u64,
    /// Acknowledged asynchronous writes beyond a fork: allowed to be lost.
    pub async_lost: u64,
    /// Re-pointed slaves (and chain ends) that continued with a partial resync.
    pub partial_resyncs: u64,
    /// The old master rejoining: partially (nothing beyond the fork) or by a
    /// full sync (it held acknowledged asynchronous writes beyond it).
    pub rejoined_partial: u64,
    pub rejoined_full: u64,
    /// The fork of the last failover (the promoted slave's received index).
    pub last_fork: u64,
    pub divergences: Vec<String>,
}

impl fmt::Display for FailoverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "failover seed {}:", self.seed)?;
        self.fmt_counts(f)?;
        if self.divergences.is_empty() {
            writeln!(f, "  no divergence")
        } else {
            writeln!(f, "  DIVERGENCES:")?;
            for d in &self.divergences {
                writeln!(f, "    {d}")?;
            }
            Ok(())
        }
    }
}

impl FailoverReport {
    /// The counts, one topic per line.
    fn fmt_counts(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  {} failovers; faults {:?}",
            self.failovers, self.faults
        )?;
        writeln!(
            f,
            "  semi-sync writes: {} acked, {} uncertain; async writes: {} acked, {} uncertain, \
             {} lost beyond a fork",
            self.semi_acked,
            self.semi_uncertain,
            self.async_acked,
            self.async_uncertain,
            self.async_lost
        )?;
        writeln!(
            f,
            "  partial resyncs after re-pointing: {}; old master rejoined partially {}, by full sync {}",
            self.partial_resyncs, self.rejoined_partial, self.rejoined_full
        )
    }
}

/// One node of the cluster and whom it follows (`None`: the master).
struct Member {
    name: String,
    node: Node,
    upstream: Option<usize>,
}

struct Cluster {
    members: Vec<Member>,
}

fn env() -> Vec<(String, String)> {
    vec![
        (
            "TERN__SYNC__LINK_TIMEOUT_MS".into(),
            LINK_TIMEOUT_MS.to_string(),
        ),
        ("TERN__SYNC__HEARTBEAT_MS".into(), HEARTBEAT_MS.to_string()),
        // A small window: a frozen slave falls behind within a few batches.
        ("TERN__SYNC__WINDOW_BATCHES".into(), "8".into()),
        // A rejoining old master that holds events beyond the fork full-syncs.
        ("TERN__SLAVE__RESYNC_WHEN_AHEAD".into(), "true".into()),
    ]
}

fn counters(i: &admin::InfoResponse) -> admin::Counters {
    i.counters.unwrap_or_default()
}

fn link(i: &admin::InfoResponse) -> admin::LinkInfo {
    i.link.clone().unwrap_or_default()
}

/// Polls `f` until it gives `Some`, for at most [`WAIT`].
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {WAIT:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

impl Cluster {
    fn master(&self) -> usize {
        self.members
            .iter()
            .position(|m| m.upstream.is_none())
            .expect("one master")
    }

    /// The master's own slaves.
    fn direct_slaves(&self) -> Vec<usize> {
        let master = self.master();
        (0..self.members.len())
            .filter(|&i| self.members[i].upstream == Some(master))
            .collect()
    }

    fn slaves(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].upstream.is_some())
            .collect()
    }

    /// Waits until every slave follows the master's history, is connected
    /// and has received at least `min_index`.
    async fn settled(&self, min_index: u64) -> anyhow::Result<()> {
        let repl_id = self.members[self.master()].node.info().await?.repl_id;
        for i in self.slaves() {
            let m = &self.members[i];
            let repl_id = repl_id.clone();
            wait_for(&format!("{} to follow {repl_id}", m.name), || {
                let repl_id = repl_id.clone();
                async move {
                    let i = m.node.info().await.map_err(|e| format!("{e:#}"))?;
                    let l = link(&i);
                    if i.repl_id == repl_id
                        && l.state == "connected"
                        && l.received_index >= min_index
                    {
                        Ok(Some(()))
                    } else {
                        Err(format!(
                            "repl_id {} link {} received {} ({})",
                            i.repl_id, l.state, l.received_index, l.last_error
                        ))
                    }
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Waits until every node has applied the master's last index (loads stopped).
    async fn converge(&self) -> anyhow::Result<u64> {
        let master = &self.members[self.master()].node;
        wait_for("every node to apply the master's last index", || async {
            let mi = master.info().await.map_err(|e| format!("{e:#}"))?;
            let target = mi.last_index;
            let mut behind = Vec::new();
            if mi.applied_index != target {
                behind.push(format!("master applied {}", mi.applied_index));
            }
            for i in self.slaves() {
                let m = &self.members[i];
                let si = m.node.info().await.map_err(|e| format!("{e:#}"))?;
                if si.applied_index != target {
                    behind.push(format!(
                        "{} applied {} link {} {}",
                        m.name,
                        si.applied_index,
                        link(&si).state,
                        link(&si).last_error
                    ));
                }
            }
            if behind.is_empty() {
                Ok(Some(target))
            } else {
                Err(format!("target {target}: {}", behind.join("; ")))
            }
        })
        .await
    }
}

/// Runs one failover schedule.
pub async fn run(cfg: &FailoverConfig) -> anyhow::Result<FailoverReport> {
    let mut report = FailoverReport {
        seed: cfg.seed,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let env = env();
    let master = Node::start_master(&cfg.dir.join("n0"), &as_refs(&env), &[]).await?;
    let murl = master.url();
    let mut members = vec![Member {
        name: "n0".into(),
        node: master,
        upstream: None,
    }];
    for n in 1..=2 {
        let node =
            Node::start_slave(&cfg.dir.join(format!("n{n}")), &murl, &as_refs(&env), &[]).await?;
        members.push(Member {
            name: format!("n{n}"),
            node,
            upstream: Some(0),
        });
    }
    // The chain: n3 follows n1.
    let n1 = members[1].node.url();
    let node = Node::start_slave(&cfg.dir.join("n3"), &n1, &as_refs(&env), &[]).await?;
    members.push(Member {
        name: "n3".into(),
        node,
        upstream: Some(1),
    });
    let mut cluster = Cluster { members };
    cluster.settled(0).await?;

    let semi = Workload::semi_sync("s", 8, 16, 1, REPLICA_TIMEOUT_MS);
    let asy = Workload::semi_sync("x", 8, 16, 0, 0);
    let mut loads = start_loads(&cluster, &semi, &asy);
    let mut semi_stats = crate::LoadStats::default();
    let mut async_stats = crate::LoadStats::default();
    // Every slave holds at least this (the last fork) before the next failover.
    let mut fork = 0;

    for round in 0..cfg.failovers {
        // Faults on the slaves while the loads run.
        for _ in 0..rng.random_range(0..=2) {
            wait_acked(&loads, 50).await?;
            slave_fault(&mut cluster, &mut rng, &mut report, fork).await?;
        }
        wait_acked(&loads, 100).await?;
        cluster.settled(fork).await?;
        // Half of the failovers find one of the master's slaves behind: it is
        // frozen for a while before the master dies, so its window fills and
        // the others get further.
        let lagging = rng.random_bool(0.5).then(|| {
            let direct = cluster.direct_slaves();
            let i = direct[rng.random_range(0..direct.len())];
            (i, Duration::from_millis(rng.random_range(300..800)))
        });
        // The master dies under load: writes in flight at the crash.
        let (s, a) = failover(
            &mut cluster,
            &semi,
            &asy,
            loads,
            &mut report,
            round,
            lagging,
        )
        .await?;
        semi_stats.merge(s);
        async_stats.merge(a);
        fork = report.last_fork;
        loads = start_loads(&cluster, &semi, &asy);
        report.failovers += 1;
    }
    let (s, a) = stop_loads(loads).await;
    semi_stats.merge(s);
    async_stats.merge(a);
    for stats in [&semi_stats, &async_stats] {
        for u in &stats.unexpected {
            report.divergences.push(format!(
                "a load got an error a correct server never returns: {u}"
            ));
        }
    }

    cluster.settled(fork).await?;
    let last = cluster.converge().await?;
    let master = &cluster.members[cluster.master()].node;
    let mc = master.checksum().await?;
    for m in &cluster.members {
        let c = m.node.checksum().await?;
        if c != mc {
            report.divergences.push(format!(
                "{}: Checksum {} at {} differs from the master's {} at {last}",
                m.name, c.digest, c.index, mc.digest
            ));
        }
        for (w, what) in [(&semi, "semi-sync"), (&asy, "async")] {
            if let Err(e) = w.check(&mut m.node.kv()).await {
                report
                    .divergences
                    .push(format!("{}: {what} writes: {e:#}", m.name));
            }
        }
        let i = m.node.info().await?;
        if counters(&i).duplicates_skipped != 0 {
            report.divergences.push(format!(
                "{}: duplicates_skipped = {}",
                m.name,
                counters(&i).duplicates_skipped
            ));
        }
    }
    report.semi_acked = semi.counters.acked_ops() + semi.appends.acked_ops();
    report.semi_uncertain = semi_stats.failed;
    report.async_acked = asy.counters.acked_ops() + asy.appends.acked_ops();
    report.async_uncertain = async_stats.failed;
    report.async_lost = asy.lost_ops();
    if semi.lost_ops() != 0 {
        report.divergences.push(format!(
            "{} acknowledged semi-synchronous writes were beyond a fork",
            semi.lost_ops()
        ));
    }
    Ok(report)
}

fn start_loads(cluster: &Cluster, semi: &Arc<Workload>, asy: &Arc<Workload>) -> (Load, Load) {
    let url = cluster.members[cluster.master()].node.url();
    (
        semi.start_paced_load(&url, CLIENTS, PAUSE),
        asy.start_paced_load(&url, CLIENTS, PAUSE),
    )
}

async fn stop_loads(loads: (Load, Load)) -> (crate::LoadStats, crate::LoadStats) {
    (loads.0.stop().await, loads.1.stop().await)
}

/// Waits until both loads made `n` more acknowledged writes.
async fn wait_acked(loads: &(Load, Load), n: u64) -> anyhow::Result<()> {
    let (s0, a0) = (loads.0.acked(), loads.1.acked());
    wait_for("the loads to make progress", || async move {
        let (s, a) = (loads.0.acked(), loads.1.acked());
        if s >= s0 + n && a >= a0 + n {
            Ok(Some(()))
        } else {
            Err(format!(
                "semi {} of {}, async {} of {}",
                s,
                s0 + n,
                a,
                a0 + n
            ))
        }
    })
    .await
}

/// A SIGKILL (and restart) or a freeze past the link timeout of one slave,
/// the middle of the chain included.
async fn slave_fault(
    cluster: &mut Cluster,
    rng: &mut StdRng,
    report: &mut FailoverReport,
    fork: u64,
) -> anyhow::Result<()> {
    let slaves = cluster.slaves();
    let i = slaves[rng.random_range(0..slaves.len())];
    let is_middle = cluster.members.iter().any(|m| m.upstream == Some(i));
    let kill = rng.random_bool(0.5);
    let kind = match (is_middle, kill) {
        (true, true) => "chain middle SIGKILL",
        (true, false) => "chain middle frozen past link timeout",
        (false, true) => "slave SIGKILL",
        (false, false) => "slave frozen past link timeout",
    };
    *report.faults.entry(kind).or_default() += 1;
    let m = &mut cluster.members[i];
    tracing::info!(node = %m.name, kind, "fault");
    if kill {
        let down = Duration::from_millis(rng.random_range(0..1000));
        m.node.sigkill()?;
        tokio::time::sleep(down).await;
        m.node
            .restart()
            .await
            .with_context(|| format!("restarting {}", m.name))?;
    } else {
        let ms = LINK_TIMEOUT_MS + rng.random_range(300..1500);
        m.node.sigstop()?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        m.node.sigcont()?;
    }
    cluster.settled(fork).await
}

/// Kills the master, promotes the most advanced slave, re-points the others,
/// brings the old master back as a slave, and checks what each did.
/// Returns the stopped loads' outcomes; the caller starts new ones on the
/// new master.
async fn failover(
    cluster: &mut Cluster,
    semi: &Arc<Workload>,
    asy: &Arc<Workload>,
    loads: (Load, Load),
    report: &mut FailoverReport,
    round: usize,
    lagging: Option<(usize, Duration)>,
) -> anyhow::Result<(crate::LoadStats, crate::LoadStats)> {
    *report
        .faults
        .entry("master SIGKILL + promotion")
        .or_default() += 1;
    let old = cluster.master();
    let old_repl = cluster.members[old].node.info().await?.repl_id;
    if let Some((i, frozen)) = lagging {
        *report
            .faults
            .entry("a slave frozen (behind) when the master dies")
            .or_default() += 1;
        cluster.members[i].node.sigstop()?;
        tokio::time::sleep(frozen).await;
    }
    cluster.members[old].node.sigkill()?;
    if let Some((i, _)) = lagging {
        cluster.members[i].node.sigcont()?;
    }
    // Writes in flight fail (uncertain); nothing is sent after the kill.
    let stats = stop_loads(loads).await;
    // Every direct slave notices the master is gone (no batch may still be
    // on its way), then the most advanced one is chosen.
    let direct: Vec<usize> = cluster
        .slaves()
        .into_iter()
        .filter(|&i| cluster.members[i].upstream == Some(old))
        .collect();
    for &i in &direct {
        let m = &cluster.members[i];
        wait_for(&format!("{} to lose its master", m.name), || async move {
            let i = m.node.info().await.map_err(|e| format!("{e:#}"))?;
            Ok((link(&i).state != "connected").then_some(()))
        })
        .await?;
    }
    let mut best: Option<(u64, usize)> = None;
    let mut before = BTreeMap::new();
    for i in cluster.slaves() {
        let si = cluster.members[i].node.info().await?;
        let received = link(&si).received_index;
        before.insert(i, (counters(&si).full_syncs, counters(&si).partial_syncs));
        if si.repl_id == old_repl && best.is_none_or(|(r, _)| received > r) {
            best = Some((received, i));
        }
    }
    let (fork, p) = best.context("no slave to promote")?;
    // Semi-synchronous writes acknowledged by the old master are all at or
    // before what the most advanced slave holds.
    let semi_max = semi.max_acked_index();
    if semi_max > fork {
        report.divergences.push(format!(
            "round {round}: an acknowledged min_replicas=1 write at index {semi_max} is beyond \
             the fork at {fork} (the most advanced slave's received index)"
        ));
    }
    semi.lose_after(fork);
    asy.lose_after(fork);
    report.last_fork = fork;

    // Promote p: stop it, start tern-master on its data directory.
    let env = env();
    let pm = &mut cluster.members[p];
    tracing::info!(node = %pm.name, fork, "promoting");
    pm.node.sigterm_and_wait().await?;
    let dir = pm.node.data_dir.clone();
    pm.node = Node::start_master(&dir, &as_refs(&env), &[]).await?;
    pm.upstream = None;
    let ni = pm.node.info().await?;
    let new_url = pm.node.url();
    match ni.histories.last() {
        Some(h) if h.repl_id == old_repl && h.end_index == fork => {}
        other => report.divergences.push(format!(
            "round {round}: the promoted node's last ancestor is {other:?}, expected \
             ({old_repl}, {fork})"
        )),
    }
    // Re-point: the old master's other slaves, and the promoted node's own
    // slaves (it serves on a new port now).
    let mut repointed = Vec::new();
    for i in cluster.slaves() {
        let up = cluster.members[i].upstream;
        if up == Some(old) || up == Some(p) {
            let m = &mut cluster.members[i];
            m.node
                .admin()
                .set_master(admin::SetMasterRequest {
                    master: new_url.clone(),
                })
                .await
                .with_context(|| format!("SetMaster on {}", m.name))?;
            // Its next start follows the new master too.
            m.node.set_arg("--master", &new_url);
            m.upstream = Some(p);
            repointed.push(i);
        }
    }
    // The old master rejoins as a slave of the new one.
    let old_dir = cluster.members[old].node.data_dir.clone();
    let old_last = crate::binlog_boundaries(&old_dir)?
        .last()
        .copied()
        .unwrap_or(0);
    let m = &mut cluster.members[old];
    m.node = Node::start_slave(&old_dir, &new_url, &as_refs(&env), &[]).await?;
    m.upstream = Some(p);
    cluster.settled(fork).await?;

    // Who resynced how.
    for i in cluster.slaves() {
        let m = &cluster.members[i];
        let si = m.node.info().await?;
        let c = counters(&si);
        if i == old {
            let ahead = old_last > fork;
            match (ahead, c.full_syncs) {
                (true, 1) => report.rejoined_full += 1,
                (false, 0) => report.rejoined_partial += 1,
                (ahead, n) => report.divergences.push(format!(
                    "round {round}: the old master (last index {old_last}, fork {fork}, \
                     ahead: {ahead}) full-synced {n} times when rejoining"
                )),
            }
            continue;
        }
        let Some(&(full_before, partial_before)) = before.get(&i) else {
            continue;
        };
        if c.full_syncs != full_before {
            report.divergences.push(format!(
                "round {round}: {} full-synced after the failover ({} -> {}); at or behind the \
                 fork it must continue partially",
                m.name, full_before, c.full_syncs
            ));
        } else if c.partial_syncs > partial_before {
            report.partial_resyncs += 1;
        }
    }
    Ok(stats)
}

/// Sums of many runs: the figures of TESTING.md.
#[derive(Debug, Default)]
pub struct FailoverTotals {
    pub runs: u64,
    pub diverged_runs: u64,
    /// Every count of the runs' reports, added up (its divergences are not kept).
    pub sum: FailoverReport,
}

impl FailoverTotals {
    pub fn add(&mut self, r: &FailoverReport) {
        self.runs += 1;
        self.diverged_runs += u64::from(!r.divergences.is_empty());
        let t = &mut self.sum;
        t.failovers += r.failovers;
        for (k, v) in &r.faults {
            *t.faults.entry(k).or_default() += v;
        }
        t.semi_acked += r.semi_acked;
        t.semi_uncertain += r.semi_uncertain;
        t.async_acked += r.async_acked;
        t.async_uncertain += r.async_uncertain;
        t.async_lost += r.async_lost;
        t.partial_resyncs += r.partial_resyncs;
        t.rejoined_partial += r.rejoined_partial;
        t.rejoined_full += r.rejoined_full;
    }
}

impl fmt::Display for FailoverTotals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "runs {}, diverged runs {}",
            self.runs, self.diverged_runs
        )?;
        self.sum.fmt_counts(f)
    }
}
