//! Workloads that remember what the server acknowledged, and the checkers that
//! hold the server to it (exactly-once).
//!
//! Every write is recorded after its reply: **acked** (the server answered OK,
//! so the write must be present exactly once, forever) or **uncertain** (the
//! call failed: a crash, a timeout, a reset connection — the write may or may
//! not have committed, but at most once). Nothing is retried: a retry of a
//! non-idempotent write would be a second write.
//!
//! A third outcome exists only when a test cuts the master's binlog back to
//! an index, as a power loss does to the unsynced tail under `binlog.fsync =
//! everysec | no` ([`Workload::lose_after`]): acked writes whose commit index
//! is beyond the cut become **lost**, held like uncertain ones (at most once).
//! Each write remembers how many cuts had happened when it was *sent*, so a
//! reply that arrives after a cut is still judged by it, and a write sent after
//! a cut never is (the master that served it already had the new history).
//!
//! - [`Counters`]: IncrBy with positive deltas on a few keys. Check: with no
//!   uncertain or lost delta on a key its value equals the acked sum;
//!   otherwise `acked <= value <= acked + uncertain + lost`.
//! - [`AppendLog`]: Append of unique tokens `"<client>-<n>;"`. Check: every
//!   acked token appears exactly once, an uncertain or lost one at most once,
//!   no token appears that was never sent, and one client's acked tokens
//!   appear in the order it sent them.
//! - [`Load`]: concurrent clients mixing IncrBy, Append and a two-key IncrBy Txn.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_common::proto::kv::v1::{self as kv, kv_client::KvClient};
use tonic::Code;
use tonic::transport::Channel;

/// Deadline of one workload request: short, so a frozen node turns into
/// uncertain writes instead of a stuck test.
pub const LOAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many problems are listed in a failed check.
const MAX_REPORTED: usize = 20;

/// Reads `key` from a node; `None` when absent.
pub async fn get(kv: &mut KvClient<Channel>, key: &[u8]) -> anyhow::Result<Option<Bytes>> {
    let r = kv
        .get(kv::GetRequest {
            key: Bytes::copy_from_slice(key),
            ..Default::default()
        })
        .await
        .with_context(|| format!("Get {}", String::from_utf8_lossy(key)))?
        .into_inner();
    Ok(r.found.then_some(r.value))
}

/// Whether a write acknowledged at commit index `index`, sent when `sent` of
/// the `cuts` (indexes the master's binlog was cut back to, in order) had
/// happened, was lost by a later one.
fn lost_by_cuts(cuts: &[u64], sent: usize, index: u64) -> bool {
    cuts.get(sent..)
        .is_some_and(|later| later.iter().any(|&cut| index > cut))
}

/// An acknowledged counter write: commit index, deltas.
type AckedDeltas = (u64, Vec<(usize, i64)>);

#[derive(Default)]
struct CounterModel {
    acked: Vec<i128>,
    uncertain: Vec<i128>,
    /// Acknowledged deltas whose events the master lost.
    lost: Vec<i128>,
    acked_ops: u64,
    uncertain_ops: u64,
    lost_ops: u64,
    max_acked_index: u64,
    /// Every acknowledged write not lost, for later cuts.
    acked_writes: Vec<AckedDeltas>,
    /// Indexes the master's binlog was cut back to ([`Counters::lose_after`]).
    cuts: Vec<u64>,
}

/// IncrBy counters with a model of acknowledged and uncertain deltas.
pub struct Counters {
    prefix: String,
    model: Mutex<CounterModel>,
}

/// What a counter check saw, per key: (value, acked sum, uncertain sum, lost sum).
#[derive(Debug)]
pub struct CounterReport {
    pub values: Vec<(i128, i128, i128, i128)>,
    pub acked_ops: u64,
    pub uncertain_ops: u64,
    pub lost_ops: u64,
}

impl Counters {
    /// `keys` counters named `<prefix><i>`.
    pub fn new(prefix: &str, keys: usize) -> Counters {
        Counters {
            prefix: prefix.to_string(),
            model: Mutex::new(CounterModel {
                acked: vec![0; keys],
                uncertain: vec![0; keys],
                lost: vec![0; keys],
                ..Default::default()
            }),
        }
    }

    pub fn keys(&self) -> usize {
        self.model.lock().unwrap().acked.len()
    }

    pub fn key(&self, i: usize) -> Bytes {
        Bytes::from(format!("{}{i}", self.prefix))
    }

    /// Records the outcome of one write that added `deltas` (key, delta)
    /// atomically: `Ok(commit index)` or the error. The write counts as sent
    /// after every cut so far (see [`Counters::record_sent`]).
    pub fn record(&self, deltas: &[(usize, i64)], result: Result<u64, &tonic::Status>) {
        let sent = self.model.lock().unwrap().cuts.len();
        self.record_sent(sent, deltas, result);
    }

    /// As [`Counters::record`], for a write sent when `sent` cuts
    /// ([`Counters::lose_after`]) had happened: acknowledged beyond a later
    /// cut, it is lost.
    pub fn record_sent(
        &self,
        sent: usize,
        deltas: &[(usize, i64)],
        result: Result<u64, &tonic::Status>,
    ) {
        let mut m = self.model.lock().unwrap();
        match result {
            Ok(index) if lost_by_cuts(&m.cuts, sent, index) => {
                m.lost_ops += 1;
                for &(k, d) in deltas {
                    m.lost[k] += i128::from(d);
                }
            }
            Ok(index) => {
                m.acked_ops += 1;
                m.max_acked_index = m.max_acked_index.max(index);
                for &(k, d) in deltas {
                    m.acked[k] += i128::from(d);
                }
                m.acked_writes.push((index, deltas.to_vec()));
            }
            Err(_) => {
                m.uncertain_ops += 1;
                for &(k, d) in deltas {
                    m.uncertain[k] += i128::from(d);
                }
            }
        }
    }

    /// The master's binlog was cut back to `index` (its unsynced tail lost):
    /// acknowledged writes with a commit index beyond it become lost, and so
    /// do those sent before this call and recorded later.
    pub fn lose_after(&self, index: u64) {
        let mut m = self.model.lock().unwrap();
        m.cuts.push(index);
        let writes = std::mem::take(&mut m.acked_writes);
        for (at, deltas) in writes {
            if at <= index {
                m.acked_writes.push((at, deltas));
                continue;
            }
            m.acked_ops -= 1;
            m.lost_ops += 1;
            for (k, d) in deltas {
                m.acked[k] -= i128::from(d);
                m.lost[k] += i128::from(d);
            }
        }
    }

    /// Highest commit index of an acknowledged counter write.
    pub fn max_acked_index(&self) -> u64 {
        self.model.lock().unwrap().max_acked_index
    }

    pub fn acked_ops(&self) -> u64 {
        self.model.lock().unwrap().acked_ops
    }

    /// Acknowledged writes the master lost ([`Counters::lose_after`]).
    pub fn lost_ops(&self) -> u64 {
        self.model.lock().unwrap().lost_ops
    }

    /// Checks stored values (`None` = absent = 0) against the model.
    pub fn check_values(&self, values: &[Option<Bytes>]) -> anyhow::Result<CounterReport> {
        let m = self.model.lock().unwrap();
        anyhow::ensure!(values.len() == m.acked.len(), "one value per counter key");
        let mut problems = Vec::new();
        let mut report = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let value: i128 = match v {
                None => 0,
                Some(b) => match std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()) {
                    Some(n) => n,
                    None => {
                        problems.push(format!(
                            "{}{i}: value {:?} is not an integer",
                            self.prefix,
                            String::from_utf8_lossy(b)
                        ));
                        continue;
                    }
                },
            };
            let (acked, unc, lost) = (m.acked[i], m.uncertain[i], m.lost[i]);
            report.push((value, acked, unc, lost));
            if unc == 0 && lost == 0 && value != acked {
                problems.push(format!(
                    "{}{i}: value {value} != acknowledged sum {acked} (no uncertain or lost \
                     writes): {}",
                    self.prefix,
                    if value < acked {
                        "acknowledged increments lost"
                    } else {
                        "increments applied twice or never sent"
                    }
                ));
            } else if value < acked || value > acked + unc + lost {
                problems.push(format!(
                    "{}{i}: value {value} outside [acked {acked}, acked + uncertain + lost {}]",
                    self.prefix,
                    acked + unc + lost
                ));
            }
        }
        if !problems.is_empty() {
            problems.truncate(MAX_REPORTED);
            bail!("counter check failed:\n  {}", problems.join("\n  "));
        }
        Ok(CounterReport {
            values: report,
            acked_ops: m.acked_ops,
            uncertain_ops: m.uncertain_ops,
            lost_ops: m.lost_ops,
        })
    }

    /// Reads every counter from a node and checks it.
    pub async fn check(&self, kv: &mut KvClient<Channel>) -> anyhow::Result<CounterReport> {
        let mut values = Vec::new();
        for i in 0..self.keys() {
            values.push(get(kv, &self.key(i)).await?);
        }
        self.check_values(&values)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenState {
    /// Acknowledged at commit index `index`.
    Acked {
        index: u64,
    },
    Uncertain,
    /// Acknowledged, but the master lost it ([`AppendLog::lose_after`]).
    Lost,
}

#[derive(Default)]
struct AppendModel {
    /// Per key: token (without `;`) -> state.
    tokens: Vec<HashMap<String, TokenState>>,
    acked_ops: u64,
    uncertain_ops: u64,
    lost_ops: u64,
    max_acked_index: u64,
    /// Indexes the master's binlog was cut back to ([`AppendLog::lose_after`]).
    cuts: Vec<u64>,
}

/// Appends of unique tokens `"<client>-<n>;"` with a model of their outcomes.
pub struct AppendLog {
    prefix: String,
    model: Mutex<AppendModel>,
}

#[derive(Debug)]
pub struct AppendReport {
    /// Tokens found per key.
    pub tokens: Vec<usize>,
    pub acked_ops: u64,
    pub uncertain_ops: u64,
    pub lost_ops: u64,
}

impl AppendLog {
    pub fn new(prefix: &str, keys: usize) -> AppendLog {
        AppendLog {
            prefix: prefix.to_string(),
            model: Mutex::new(AppendModel {
                tokens: vec![HashMap::new(); keys],
                ..Default::default()
            }),
        }
    }

    pub fn keys(&self) -> usize {
        self.model.lock().unwrap().tokens.len()
    }

    pub fn key(&self, i: usize) -> Bytes {
        Bytes::from(format!("{}{i}", self.prefix))
    }

    /// The token client `client` sends as its `n`-th append (with the `;`).
    pub fn token(client: u64, n: u64) -> String {
        format!("{client}-{n};")
    }

    /// Records the outcome of appending `token` (as made by [`AppendLog::token`]) to key `k`.
    /// The write counts as sent after every cut so far (see [`AppendLog::record_sent`]).
    pub fn record(&self, k: usize, token: &str, result: Result<u64, &tonic::Status>) {
        let sent = self.model.lock().unwrap().cuts.len();
        self.record_sent(sent, k, token, result);
    }

    /// As [`AppendLog::record`], for an append sent when `sent` cuts
    /// ([`AppendLog::lose_after`]) had happened: acknowledged beyond a later
    /// cut, it is lost.
    pub fn record_sent(
        &self,
        sent: usize,
        k: usize,
        token: &str,
        result: Result<u64, &tonic::Status>,
    ) {
        let t = token.trim_end_matches(';').to_string();
        let mut m = self.model.lock().unwrap();
        let state = match result {
            Ok(index) if lost_by_cuts(&m.cuts, sent, index) => {
                m.lost_ops += 1;
                TokenState::Lost
            }
            Ok(index) => {
                m.acked_ops += 1;
                m.max_acked_index = m.max_acked_index.max(index);
                TokenState::Acked { index }
            }
            Err(_) => {
                m.uncertain_ops += 1;
                TokenState::Uncertain
            }
        };
        let prev = m.tokens[k].insert(t, state);
        assert!(
            prev.is_none(),
            "token {token} recorded twice: tokens must be unique"
        );
    }

    /// The master's binlog was cut back to `index` (its unsynced tail lost):
    /// acknowledged appends with a commit index beyond it become lost, and so
    /// do those sent before this call and recorded later.
    pub fn lose_after(&self, index: u64) {
        let mut m = self.model.lock().unwrap();
        m.cuts.push(index);
        let mut lost = 0;
        for state in m.tokens.iter_mut().flat_map(|t| t.values_mut()) {
            if let TokenState::Acked { index: at } = *state
                && at > index
            {
                *state = TokenState::Lost;
                lost += 1;
            }
        }
        m.acked_ops -= lost;
        m.lost_ops += lost;
    }

    pub fn max_acked_index(&self) -> u64 {
        self.model.lock().unwrap().max_acked_index
    }

    pub fn acked_ops(&self) -> u64 {
        self.model.lock().unwrap().acked_ops
    }

    /// Acknowledged appends the master lost ([`AppendLog::lose_after`]).
    pub fn lost_ops(&self) -> u64 {
        self.model.lock().unwrap().lost_ops
    }

    /// Checks stored values (`None` = absent = empty) against the model.
    pub fn check_values(&self, values: &[Option<Bytes>]) -> anyhow::Result<AppendReport> {
        let m = self.model.lock().unwrap();
        anyhow::ensure!(values.len() == m.tokens.len(), "one value per append key");
        let mut problems = Vec::new();
        let mut found_per_key = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let key = format!("{}{i}", self.prefix);
            let bytes = v.clone().unwrap_or_default();
            let Ok(text) = std::str::from_utf8(&bytes) else {
                problems.push(format!("{key}: value is not UTF-8"));
                continue;
            };
            if !text.is_empty() && !text.ends_with(';') {
                problems.push(format!("{key}: value does not end with ';' (torn append?)"));
            }
            let mut seen: HashMap<&str, usize> = HashMap::new();
            // client -> last n among its acked tokens, to check per-client order.
            let mut last_n: HashMap<u64, u64> = HashMap::new();
            let mut found = 0;
            for tok in text.split(';').filter(|t| !t.is_empty()) {
                found += 1;
                *seen.entry(tok).or_default() += 1;
                match m.tokens[i].get(tok) {
                    None => problems.push(format!("{key}: token {tok:?} was never sent")),
                    Some(TokenState::Acked { .. }) => {
                        if let Some((c, n)) = parse_token(tok) {
                            if let Some(&prev) = last_n.get(&c)
                                && prev >= n
                            {
                                problems.push(format!(
                                    "{key}: client {c}'s acked token {n} appears after its token {prev}"
                                ));
                            }
                            last_n.insert(c, n);
                        }
                    }
                    Some(TokenState::Uncertain | TokenState::Lost) => {}
                }
            }
            for (tok, count) in &seen {
                if *count > 1 {
                    problems.push(format!("{key}: token {tok:?} appears {count} times"));
                }
            }
            for (tok, state) in &m.tokens[i] {
                if matches!(state, TokenState::Acked { .. }) && !seen.contains_key(tok.as_str()) {
                    problems.push(format!("{key}: acknowledged token {tok:?} is missing"));
                }
            }
            found_per_key.push(found);
        }
        if !problems.is_empty() {
            problems.sort();
            let total = problems.len();
            problems.truncate(MAX_REPORTED);
            bail!(
                "append check failed ({total} problems):\n  {}",
                problems.join("\n  ")
            );
        }
        Ok(AppendReport {
            tokens: found_per_key,
            acked_ops: m.acked_ops,
            uncertain_ops: m.uncertain_ops,
            lost_ops: m.lost_ops,
        })
    }

    pub async fn check(&self, kv: &mut KvClient<Channel>) -> anyhow::Result<AppendReport> {
        let mut values = Vec::new();
        for i in 0..self.keys() {
            values.push(get(kv, &self.key(i)).await?);
        }
        self.check_values(&values)
    }
}

fn parse_token(tok: &str) -> Option<(u64, u64)> {
    let (c, n) = tok.split_once('-')?;
    Some((c.parse().ok()?, n.parse().ok()?))
}

/// Counters and appends together, with client ids unique across loads.
pub struct Workload {
    pub counters: Counters,
    pub appends: AppendLog,
    next_client: AtomicU64,
    /// `min_replicas` of every write (0: the master's default).
    min_replicas: u32,
    /// `replica_timeout_ms` of every write (0: the master's default).
    replica_timeout_ms: u32,
    /// Cuts made so far ([`Workload::lose_after`]); a request is sent "after"
    /// the ones counted when it starts.
    cuts: AtomicUsize,
}

/// Outcomes of a load run, by gRPC code.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    pub acked: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    /// Errors that a correct server never returns to this workload
    /// (INVALID_ARGUMENT, FAILED_PRECONDITION, ...): always a bug.
    pub unexpected: Vec<String>,
}

impl LoadStats {
    /// Adds the outcomes of another load.
    pub fn merge(&mut self, o: LoadStats) {
        self.acked += o.acked;
        self.failed += o.failed;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.unexpected.extend(o.unexpected);
    }

    fn record_err(&mut self, s: &tonic::Status) {
        self.failed += 1;
        *self.errors.entry(format!("{:?}", s.code())).or_default() += 1;
        if unexpected_code(s.code()) && self.unexpected.len() < MAX_REPORTED {
            self.unexpected
                .push(format!("{:?}: {}", s.code(), s.message()));
        }
    }
}

/// A running load; stop it with [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<LoadStats>>,
}

impl Workload {
    /// `counter_keys` counters `c<i>` and `append_keys` append keys `a<i>`.
    pub fn new(counter_keys: usize, append_keys: usize) -> Arc<Workload> {
        Workload::semi_sync("", counter_keys, append_keys, 0, 0)
    }

    /// Keys `<prefix>c<i>` and `<prefix>a<i>`; every write asks for
    /// `min_replicas` slaves within `replica_timeout_ms` (semi-synchronous
    /// writes; a timeout answer is an error, so the write is uncertain).
    pub fn semi_sync(
        prefix: &str,
        counter_keys: usize,
        append_keys: usize,
        min_replicas: u32,
        replica_timeout_ms: u32,
    ) -> Arc<Workload> {
        Arc::new(Workload {
            counters: Counters::new(&format!("{prefix}c"), counter_keys),
            appends: AppendLog::new(&format!("{prefix}a"), append_keys),
            next_client: AtomicU64::new(1),
            min_replicas,
            replica_timeout_ms,
            cuts: AtomicUsize::new(0),
        })
    }

    /// The master's binlog was cut back to `index`, as a power loss does to
    /// its unsynced tail (`binlog.fsync = everysec | no`). Call it with the
    /// master down, before it restarts: acknowledged writes with a commit index
    /// beyond `index` become lost, including those still in flight (sent
    /// before this call); writes sent after it are not affected.
    pub fn lose_after(&self, index: u64) {
        self.counters.lose_after(index);
        self.appends.lose_after(index);
        self.cuts.fetch_add(1, Ordering::SeqCst);
    }

    /// Acknowledged writes the master lost ([`Workload::lose_after`]).
    pub fn lost_ops(&self) -> u64 {
        self.counters.lost_ops() + self.appends.lost_ops()
    }

    /// Starts `clients` concurrent clients against `url`, each on its own
    /// connection, each issuing (sequentially) IncrBy (45%), Append (40%) or
    /// a Txn of IncrBy on two distinct counters (15%).
    pub fn start_load(self: &Arc<Self>, url: &str, clients: usize) -> Load {
        self.start_paced_load(url, clients, Duration::ZERO)
    }

    /// As [`Workload::start_load`], each client pausing `pause` after every
    /// acknowledged write. Appends log after-images, so an unpaced load on a few
    /// append keys makes the binlog grow quadratically with time; pacing keeps
    /// long fault tests small.
    pub fn start_paced_load(self: &Arc<Self>, url: &str, clients: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let client = self.next_client.fetch_add(1, Ordering::Relaxed);
                let kv = crate::node::kv_client(crate::node::channel(url, LOAD_REQUEST_TIMEOUT));
                tokio::spawn(self.clone().client_loop(
                    client,
                    kv,
                    stop.clone(),
                    acked.clone(),
                    pause,
                ))
            })
            .collect();
        Load { stop, acked, tasks }
    }

    async fn client_loop(
        self: Arc<Self>,
        client: u64,
        mut kv: KvClient<Channel>,
        stop: Arc<AtomicBool>,
        acked: Arc<AtomicU64>,
        pause: Duration,
    ) -> LoadStats {
        let mut rng = StdRng::from_os_rng();
        let mut stats = LoadStats::default();
        let mut n = 0u64;
        let nc = self.counters.keys();
        let na = self.appends.keys();
        while !stop.load(Ordering::Relaxed) {
            let sent = self.cuts.load(Ordering::SeqCst);
            let roll = rng.random_range(0..100);
            let result: Result<(), tonic::Status> = if roll < 45 || (na == 0 && roll < 85) {
                let k = rng.random_range(0..nc);
                let delta = rng.random_range(1..=1000i64);
                let r = kv
                    .incr_by(kv::IncrByRequest {
                        key: self.counters.key(k),
                        delta,
                        min_replicas: self.min_replicas,
                        replica_timeout_ms: self.replica_timeout_ms,
                    })
                    .await
                    .map(|r| r.into_inner().index);
                self.counters
                    .record_sent(sent, &[(k, delta)], r.as_ref().map(|i| *i));
                r.map(|_| ())
            } else if roll < 85 {
                let k = rng.random_range(0..na);
                n += 1;
                let token = AppendLog::token(client, n);
                let r = kv
                    .append(kv::AppendRequest {
                        key: self.appends.key(k),
                        value: Bytes::from(token.clone()),
                        min_replicas: self.min_replicas,
                        replica_timeout_ms: self.replica_timeout_ms,
                    })
                    .await
                    .map(|r| r.into_inner().index);
                self.appends
                    .record_sent(sent, k, &token, r.as_ref().map(|i| *i));
                r.map(|_| ())
            } else {
                let a = rng.random_range(0..nc);
                let b = (a + rng.random_range(1..nc.max(2))) % nc;
                let (da, db) = (rng.random_range(1..=1000i64), rng.random_range(1..=1000i64));
                let op = |k: usize, delta: i64| kv::Op {
                    op: Some(kv::op::Op::IncrBy(kv::IncrByRequest {
                        key: self.counters.key(k),
                        delta,
                        ..Default::default()
                    })),
                };
                let r = kv
                    .txn(kv::TxnRequest {
                        ops: vec![op(a, da), op(b, db)],
                        min_replicas: self.min_replicas,
                        replica_timeout_ms: self.replica_timeout_ms,
                    })
                    .await
                    .map(|r| r.into_inner().index);
                self.counters
                    .record_sent(sent, &[(a, da), (b, db)], r.as_ref().map(|i| *i));
                r.map(|_| ())
            };
            match result {
                Ok(()) => {
                    stats.acked += 1;
                    acked.fetch_add(1, Ordering::Relaxed);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                Err(s) => {
                    stats.record_err(&s);
                    // The node is probably down or restarting: do not spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        stats
    }

    /// Highest commit index of any acknowledged write.
    pub fn max_acked_index(&self) -> u64 {
        self.counters
            .max_acked_index()
            .max(self.appends.max_acked_index())
    }

    /// Checks counters and appends against a node; returns a one-line summary.
    pub async fn check(&self, kv: &mut KvClient<Channel>) -> anyhow::Result<String> {
        let c = self.counters.check(kv).await?;
        let a = self.appends.check(kv).await?;
        Ok(format!(
            "counters: {} acked / {} uncertain / {} lost writes; appends: {} acked / {} \
             uncertain / {} lost, {} tokens stored",
            c.acked_ops,
            c.uncertain_ops,
            c.lost_ops,
            a.acked_ops,
            a.uncertain_ops,
            a.lost_ops,
            a.tokens.iter().sum::<usize>()
        ))
    }
}

impl Load {
    /// Writes acknowledged so far by this load.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until this load has `n` acknowledged writes (fails after `timeout`).
    pub async fn wait_acked(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.acked() < n {
            if Instant::now() > deadline {
                bail!(
                    "load made no progress: {} of {n} writes acknowledged within {timeout:?}",
                    self.acked()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stops every client after its current request and sums their outcomes.
    pub async fn stop(self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadStats::default();
        for t in self.tasks {
            total.merge(t.await.expect("load client task panicked"));
        }
        total
    }
}

/// Codes a correct server never returns to these workloads, whatever faults
/// are injected (a crash or a link fault gives UNAVAILABLE, CANCELLED, ...).
pub fn unexpected_code(c: Code) -> bool {
    matches!(
        c,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::DataLoss
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st() -> tonic::Status {
        tonic::Status::unavailable("down")
    }

    /// Stored values, one per key.
    fn vals(v: &[&str]) -> Vec<Option<Bytes>> {
        v.iter().map(|s| Some(Bytes::from(s.to_string()))).collect()
    }

    #[test]
    fn counters_exact_and_bounded() {
        let c = Counters::new("c", 2);
        c.record(&[(0, 5), (1, 7)], Ok(3));
        c.record(&[(0, 2)], Ok(5));
        c.record(&[(1, 10)], Err(&st()));
        let v = |a: &str, b: &str| vals(&[a, b]);
        assert!(c.check_values(&v("7", "7")).is_ok());
        assert!(c.check_values(&v("7", "17")).is_ok());
        // Lost acked increment.
        assert!(c.check_values(&v("5", "7")).is_err());
        // Applied twice.
        assert!(c.check_values(&v("9", "7")).is_err());
        assert!(c.check_values(&v("7", "18")).is_err());
        assert!(c.check_values(&v("7", "x")).is_err());
        assert!(c.check_values(&[None, None]).is_err());
        assert_eq!(c.max_acked_index(), 5);
    }

    #[test]
    fn appends_exactly_once_and_ordered() {
        let a = AppendLog::new("a", 1);
        a.record(0, &AppendLog::token(1, 1), Ok(1));
        a.record(0, &AppendLog::token(1, 2), Err(&st()));
        a.record(0, &AppendLog::token(1, 3), Ok(9));
        a.record(0, &AppendLog::token(2, 1), Ok(4));
        let v = |s: &str| vals(&[s]);
        assert!(a.check_values(&v("1-1;2-1;1-3;")).is_ok());
        assert!(a.check_values(&v("1-1;2-1;1-2;1-3;")).is_ok());
        // Missing acked token.
        assert!(a.check_values(&v("1-1;1-3;")).is_err());
        // Duplicate acked / uncertain token.
        assert!(a.check_values(&v("1-1;2-1;1-3;1-1;")).is_err());
        assert!(a.check_values(&v("1-1;1-2;2-1;1-2;1-3;")).is_err());
        // Never sent.
        assert!(a.check_values(&v("1-1;2-1;1-3;7-7;")).is_err());
        // Out of order for one client.
        assert!(a.check_values(&v("1-3;2-1;1-1;")).is_err());
        // Torn.
        assert!(a.check_values(&v("1-1;2-1;1-3")).is_err());
    }

    #[test]
    fn counters_lost_beyond_a_cut() {
        let c = Counters::new("c", 2);
        c.record(&[(0, 5)], Ok(3));
        c.record(&[(0, 2), (1, 7)], Ok(8));
        // Sent before the cut, answered after it.
        let sent = 0;
        c.lose_after(5);
        c.record_sent(sent, &[(1, 100)], Ok(9));
        // Sent after the cut: the new history reuses the lost indexes.
        c.record_sent(1, &[(0, 1000)], Ok(6));
        assert_eq!(c.acked_ops(), 2);
        assert_eq!(c.lost_ops(), 2);
        for (stored, ok) in [
            // Lost writes absent, or present once.
            (["1005", "0"], true),
            (["1007", "107"], true),
            // Twice, or an acked one missing.
            (["1009", "0"], false),
            (["1007", "207"], false),
            (["5", "0"], false),
        ] {
            assert_eq!(c.check_values(&vals(&stored)).is_ok(), ok, "{stored:?}");
        }
    }

    #[test]
    fn appends_lost_beyond_a_cut() {
        let a = AppendLog::new("a", 1);
        a.record(0, &AppendLog::token(1, 1), Ok(2));
        a.record(0, &AppendLog::token(1, 2), Ok(7));
        a.lose_after(4);
        a.record_sent(0, 0, &AppendLog::token(2, 1), Ok(9));
        a.record_sent(1, 0, &AppendLog::token(1, 3), Ok(5));
        assert_eq!(a.acked_ops(), 2);
        assert_eq!(a.lost_ops(), 2);
        for (stored, ok) in [
            ("1-1;1-3;", true),
            ("1-1;1-2;2-1;1-3;", true),
            // A lost token twice, an acked one missing, a token never sent.
            ("1-1;1-2;1-2;1-3;", false),
            ("1-1;1-2;", false),
            ("1-1;1-3;3-1;", false),
        ] {
            assert_eq!(a.check_values(&vals(&[stored])).is_ok(), ok, "{stored}");
        }
    }
}
