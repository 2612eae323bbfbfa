//! `tern-bench`: load generator for the tern Kv service, and the raw RocksDB
//! baseline it is compared with.
//!
//! ```text
//! tern-bench kv  --target http://127.0.0.1:7400 --concurrency 64 --duration 10s \
//!                --value-size 100 --keys 100000 --mix put=100 [--connections 8] [--json] \
//!                [--min-replicas 1 --replica-timeout-ms 10000]   # semi-synchronous writes
//! tern-bench raw --dir /tmp/raw --batch 64 --value-size 100 --duration 10s [--sync] [--json]
//! tern-bench wait --target http://127.0.0.1:7400 --timeout 60s
//! ```
//!
//! Both print one summary line (ops, ops/s, latency p50/p99/p999/max in
//! microseconds, errors by gRPC code); `--json` prints it as one JSON object.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tern_common::proto::kv::v1::{self as kv, kv_client::KvClient};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(
    name = "tern-bench",
    version,
    about = "Load generator for tern, and a raw RocksDB baseline"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Drive a node's tern.kv.v1.Kv service with concurrent clients.
    Kv(KvArgs),
    /// Write Put batches straight into RocksDB (WAL on), one writer thread.
    Raw(RawArgs),
    /// Wait until a node answers Admin.Info (for scripts; polls every 100 ms).
    Wait(WaitArgs),
    /// Replication lag (master ack -> slave applied) and catch-up rate.
    Repl(ReplArgs),
    /// Write N keys of a given size (to make a dataset).
    Fill(FillArgs),
    /// Wait until a slave has full-synced, streams, and caught up with its master.
    WaitSynced(WaitSyncedArgs),
}

#[derive(Args, Debug)]
struct FillArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    target: String,
    #[arg(long)]
    keys: u64,
    #[arg(long, default_value_t = 65536)]
    value_size: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

#[derive(Args, Debug)]
struct WaitSyncedArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    master: String,
    #[arg(long, default_value = "http://127.0.0.1:7401")]
    slave: String,
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args, Debug)]
struct ReplArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    master: String,
    #[arg(long, default_value = "http://127.0.0.1:7401")]
    slave: String,
    /// Pid of the slave, to freeze it (SIGSTOP) for the catch-up measurement.
    #[arg(long)]
    slave_pid: Option<i32>,
    /// Total Puts per second on the master during the lag measurement.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Measure the replication lag of one write in this many.
    #[arg(long, default_value_t = 10)]
    sample_every: u64,
    /// How long the slave stays frozen while the master writes flat out.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    catchup: Duration,
    /// Each writer puts on one Kv.Pipeline stream with one write in flight
    /// (as `kv --pipeline 1`) instead of unary Kv.Put calls.
    #[arg(long)]
    pipeline: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct WaitArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    target: String,
    /// Give up (exit status 1) after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args, Debug)]
struct KvArgs {
    /// URL of the node.
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    target: String,
    /// Requests in flight (one task each, each sending the next after the reply).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// gRPC connections, shared round-robin by the tasks.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How long to run: 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Bytes per Put / Append value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Keys are drawn uniformly from this many.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Operation weights, e.g. put=80,get=20 (ops: put, get, incr, append, txn).
    #[arg(long, default_value = "put=100", value_parser = parse_mix)]
    mix: Mix,
    /// Puts per txn operation.
    #[arg(long, default_value_t = 4)]
    txn_ops: usize,
    /// 0: one unary call per op. N > 0: each client opens one Kv.Pipeline
    /// stream and keeps up to N writes in flight on it (like redis-benchmark
    /// -P N); writes only (put, incr, append, txn).
    #[arg(long, default_value_t = 0)]
    pipeline: usize,
    /// Client threads: 0 = one per core (tokio's default); 1 = every client
    /// on one thread (no hand-offs between threads, like redis-benchmark's
    /// single event loop).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Semi-synchronous writes: each write is answered once this many slaves
    /// hold it (its `min_replicas`; 0 = the master's sync.min_replicas). A
    /// write they did not acknowledge in time counts as a DeadlineExceeded
    /// error (it is committed all the same).
    #[arg(long, default_value_t = 0)]
    min_replicas: u32,
    /// Each write's `replica_timeout_ms` (0 = the master's sync.replica_timeout_ms).
    #[arg(long, default_value_t = 0)]
    replica_timeout_ms: u32,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RawArgs {
    /// RocksDB directory (created; should be empty).
    #[arg(long)]
    dir: PathBuf,
    /// Puts per WriteBatch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// fsync the WAL on every batch (WriteOptions::set_sync).
    #[arg(long)]
    sync: bool,
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?}: duration must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Put,
    Get,
    Incr,
    Append,
    Txn,
}

/// Cumulative weights: pick the first entry whose bound exceeds a roll in 0..total.
#[derive(Clone, Debug)]
struct Mix {
    table: Vec<(u32, OpKind)>,
    total: u32,
}

impl Mix {
    fn pick(&self, rng: &mut impl Rng) -> OpKind {
        let roll = rng.random_range(0..self.total);
        self.table
            .iter()
            .find(|(bound, _)| roll < *bound)
            .map(|(_, k)| *k)
            .expect("roll below total")
    }
}

fn parse_mix(s: &str) -> Result<Mix, String> {
    let mut table = Vec::new();
    let mut total = 0u32;
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, w) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected op=weight"))?;
        let kind = match name {
            "put" => OpKind::Put,
            "get" => OpKind::Get,
            "incr" => OpKind::Incr,
            "append" => OpKind::Append,
            "txn" => OpKind::Txn,
            _ => return Err(format!("unknown op {name:?} (put, get, incr, append, txn)")),
        };
        let w: u32 = w.parse().map_err(|_| format!("{part:?}: bad weight"))?;
        if w > 0 {
            total += w;
            table.push((total, kind));
        }
    }
    if total == 0 {
        return Err("the mix needs at least one op with a weight > 0".into());
    }
    Ok(Mix { table, total })
}

/// What one run measured.
struct Summary {
    mode: &'static str,
    ops: u64,
    /// Puts written (raw mode; in kv mode puts including those inside Txns).
    puts: u64,
    /// Raw mode: WriteBatches.
    batches: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    label: String,
}

impl Summary {
    fn rate(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self, json: bool) {
        let h = &self.latency_us;
        let q = |p: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(p)
            }
        };
        if json {
            let errors = self
                .errors
                .iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect::<Vec<_>>()
                .join(",");
            println!(
                "{{\"mode\":\"{}\",\"label\":\"{}\",\"ops\":{},\"ops_per_sec\":{:.1},\"puts\":{},\
                 \"puts_per_sec\":{:.1},\"batches\":{},\"batches_per_sec\":{:.1},\"elapsed_sec\":{:.3},\
                 \"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"errors\":{{{errors}}}}}",
                self.mode,
                self.label,
                self.ops,
                self.rate(self.ops),
                self.puts,
                self.rate(self.puts),
                self.batches,
                self.rate(self.batches),
                self.elapsed.as_secs_f64(),
                q(0.5),
                q(0.99),
                q(0.999),
                h.max(),
            );
        } else {
            let errors = if self.errors.is_empty() {
                "none".to_string()
            } else {
                self.errors
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let extra = if self.mode == "raw" {
                format!(
                    " puts/s={:.0} batches={} batches/s={:.0}",
                    self.rate(self.puts),
                    self.batches,
                    self.rate(self.batches)
                )
            } else {
                format!(" puts/s={:.0}", self.rate(self.puts))
            };
            println!(
                "{} [{}]: ops={} ops/s={:.0}{extra} latency_us p50={} p99={} p999={} max={} errors={errors}",
                self.mode,
                self.label,
                self.ops,
                self.rate(self.ops),
                q(0.5),
                q(0.99),
                q(0.999),
                h.max(),
            );
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Kv(a) => {
            let rt = match a.threads {
                0 => tokio::runtime::Runtime::new()?,
                1 => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
                n => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(n)
                    .enable_all()
                    .build()?,
            };
            let json = a.json;
            let s = rt.block_on(run_kv(a))?;
            s.print(json);
        }
        Cmd::Raw(a) => {
            let s = run_raw(&a)?;
            s.print(a.json);
        }
        Cmd::Wait(a) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(wait_ready(&a))?;
        }
        Cmd::Fill(a) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(tern_integration::repl_bench::fill(
                &a.target,
                a.keys,
                a.value_size,
                a.concurrency,
            ))?;
        }
        Cmd::WaitSynced(a) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(tern_integration::repl_bench::wait_synced(
                &a.master, &a.slave, a.timeout,
            ))?;
        }
        Cmd::Repl(a) => {
            let rt = tokio::runtime::Runtime::new()?;
            let json = a.json;
            let report = rt.block_on(tern_integration::repl_bench::run(
                tern_integration::repl_bench::ReplBenchArgs {
                    master: a.master,
                    slave: a.slave,
                    slave_pid: a.slave_pid,
                    rate: a.rate,
                    concurrency: a.concurrency,
                    duration: a.duration,
                    value_size: a.value_size,
                    keys: a.keys,
                    sample_every: a.sample_every,
                    catchup: a.catchup,
                    pipeline: a.pipeline,
                },
            ))?;
            report.print(json);
        }
    }
    Ok(())
}

struct KvTaskResult {
    ops: u64,
    puts: u64,
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl KvTaskResult {
    fn new() -> KvTaskResult {
        KvTaskResult {
            ops: 0,
            puts: 0,
            latency: histogram(),
            errors: BTreeMap::new(),
        }
    }
}

async fn run_kv(a: KvArgs) -> anyhow::Result<Summary> {
    if a.concurrency == 0 || a.connections == 0 || a.keys == 0 {
        bail!("--concurrency, --connections and --keys must be > 0");
    }
    if a.pipeline > 0 && a.mix.table.iter().any(|(_, k)| *k == OpKind::Get) {
        bail!("--pipeline streams writes only: drop get from --mix");
    }
    let mut channels = Vec::new();
    for _ in 0..a.connections {
        let ch = Endpoint::from_shared(a.target.clone())
            .with_context(|| format!("--target {}", a.target))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {}", a.target))?;
        channels.push(ch);
    }
    let mut rng = StdRng::from_os_rng();
    let mut value = vec![0u8; a.value_size];
    rng.fill_bytes(&mut value);
    let value = Bytes::from(value);
    let a = Arc::new(a);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..a.concurrency)
        .map(|i| {
            let client = KvClient::new(channels[i % channels.len()].clone())
                .max_encoding_message_size(tern_common::limits::MAX_MESSAGE_BYTES)
                .max_decoding_message_size(tern_common::limits::MAX_MESSAGE_BYTES);
            if a.pipeline > 0 {
                tokio::spawn(pipeline_task(
                    client,
                    a.clone(),
                    value.clone(),
                    stop.clone(),
                ))
            } else {
                tokio::spawn(kv_task(client, a.clone(), value.clone(), stop.clone()))
            }
        })
        .collect();
    tokio::time::sleep(a.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = KvTaskResult::new();
    for t in tasks {
        let r = t.await?;
        total.ops += r.ops;
        total.puts += r.puts;
        total.latency.add(&r.latency)?;
        for (k, v) in r.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let elapsed = start.elapsed();
    let mix = a
        .mix
        .table
        .iter()
        .scan(0, |prev, (bound, k)| {
            let w = bound - *prev;
            *prev = *bound;
            Some(format!("{k:?}={w}").to_lowercase())
        })
        .collect::<Vec<_>>()
        .join(",");
    Ok(Summary {
        mode: "kv",
        ops: total.ops,
        puts: total.puts,
        batches: 0,
        elapsed,
        latency_us: total.latency,
        errors: total.errors,
        label: format!(
            "{} c={} conns={} pipeline={} value={}B keys={} mix={mix} min_replicas={}",
            a.target,
            a.concurrency,
            a.connections,
            a.pipeline,
            a.value_size,
            a.keys,
            a.min_replicas
        ),
    })
}

async fn kv_task(
    mut client: KvClient<Channel>,
    a: Arc<KvArgs>,
    value: Bytes,
    stop: Arc<AtomicBool>,
) -> KvTaskResult {
    let mut rng = StdRng::from_os_rng();
    let mut r = KvTaskResult::new();
    let key = |rng: &mut StdRng, prefix: &str| random_key(rng, a.keys, prefix);
    while !stop.load(Ordering::Relaxed) {
        let kind = a.mix.pick(&mut rng);
        let t0 = Instant::now();
        // Put/Get share the "k" keys; counters and append logs get their own,
        // so an IncrBy never meets a non-integer value.
        let (res, puts) = match kind {
            OpKind::Put => (
                client
                    .put(kv::PutRequest {
                        key: key(&mut rng, "k"),
                        value: value.clone(),
                        min_replicas: a.min_replicas,
                        replica_timeout_ms: a.replica_timeout_ms,
                    })
                    .await
                    .map(drop),
                1,
            ),
            OpKind::Get => (
                client
                    .get(kv::GetRequest {
                        key: key(&mut rng, "k"),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                0,
            ),
            OpKind::Incr => (
                client
                    .incr_by(kv::IncrByRequest {
                        key: key(&mut rng, "c"),
                        delta: 1,
                        min_replicas: a.min_replicas,
                        replica_timeout_ms: a.replica_timeout_ms,
                    })
                    .await
                    .map(drop),
                0,
            ),
            OpKind::Append => (
                client
                    .append(kv::AppendRequest {
                        key: key(&mut rng, "a"),
                        value: value.clone(),
                        min_replicas: a.min_replicas,
                        replica_timeout_ms: a.replica_timeout_ms,
                    })
                    .await
                    .map(drop),
                0,
            ),
            OpKind::Txn => {
                let ops = (0..a.txn_ops)
                    .map(|_| kv::Op {
                        op: Some(kv::op::Op::Put(kv::PutRequest {
                            key: key(&mut rng, "k"),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                (
                    client
                        .txn(kv::TxnRequest {
                            ops,
                            min_replicas: a.min_replicas,
                            replica_timeout_ms: a.replica_timeout_ms,
                        })
                        .await
                        .map(drop),
                    a.txn_ops as u64,
                )
            }
        };
        match res {
            Ok(()) => {
                record(&mut r.latency, t0.elapsed());
                r.ops += 1;
                r.puts += puts;
            }
            Err(s) => {
                *r.errors.entry(format!("{:?}", s.code())).or_default() += 1;
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                    // Do not spin on a node that is down.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    r
}

/// A key drawn uniformly from `keys`, after `prefix` ("k" for Put/Get,
/// "c" for counters, "a" for append logs).
fn random_key(rng: &mut StdRng, keys: u64, prefix: &str) -> Bytes {
    Bytes::from(format!("{prefix}{:012}", rng.random_range(0..keys)))
}

/// One write of the mix as the ops of a transaction, and how many Puts it holds.
fn write_ops(kind: OpKind, a: &KvArgs, rng: &mut StdRng, value: &Bytes) -> (Vec<kv::Op>, u64) {
    let key = |rng: &mut StdRng, prefix: &str| random_key(rng, a.keys, prefix);
    let put = |rng: &mut StdRng| {
        kv::op::Op::Put(kv::PutRequest {
            key: key(rng, "k"),
            value: value.clone(),
            ..Default::default()
        })
    };
    let (ops, puts) = match kind {
        OpKind::Put => (vec![put(rng)], 1),
        OpKind::Txn => ((0..a.txn_ops).map(|_| put(rng)).collect(), a.txn_ops as u64),
        OpKind::Incr => (
            vec![kv::op::Op::IncrBy(kv::IncrByRequest {
                key: key(rng, "c"),
                delta: 1,
                ..Default::default()
            })],
            0,
        ),
        OpKind::Append => (
            vec![kv::op::Op::Append(kv::AppendRequest {
                key: key(rng, "a"),
                value: value.clone(),
                ..Default::default()
            })],
            0,
        ),
        OpKind::Get => unreachable!("run_kv refuses get with --pipeline"),
    };
    (
        ops.into_iter().map(|op| kv::Op { op: Some(op) }).collect(),
        puts,
    )
}

/// One client on one Kv.Pipeline stream, keeping `--pipeline` writes in
/// flight; latency is from sending a write to reading its answer.
async fn pipeline_task(
    mut client: KvClient<Channel>,
    a: Arc<KvArgs>,
    value: Bytes,
    stop: Arc<AtomicBool>,
) -> KvTaskResult {
    let mut rng = StdRng::from_os_rng();
    let mut r = KvTaskResult::new();
    let (tx, rx) = tokio::sync::mpsc::channel(a.pipeline);
    let mut answers = match client
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => {
            *r.errors.entry(format!("{:?}", s.code())).or_default() += 1;
            return r;
        }
    };
    // Send time and Puts of each write in flight, in order.
    let mut in_flight = std::collections::VecDeque::with_capacity(a.pipeline);
    let mut id = 0u64;
    loop {
        while in_flight.len() < a.pipeline && !stop.load(Ordering::Relaxed) {
            let (ops, puts) = write_ops(a.mix.pick(&mut rng), &a, &mut rng, &value);
            id += 1;
            in_flight.push_back((Instant::now(), puts));
            if tx
                .send(kv::PipelineRequest {
                    id,
                    ops,
                    min_replicas: a.min_replicas,
                    replica_timeout_ms: a.replica_timeout_ms,
                })
                .await
                .is_err()
            {
                break;
            }
        }
        let Some((t0, puts)) = in_flight.pop_front() else {
            break;
        };
        match answers.message().await {
            Ok(Some(answer)) if answer.code == 0 => {
                record(&mut r.latency, t0.elapsed());
                r.ops += 1;
                r.puts += puts;
            }
            Ok(Some(answer)) => {
                let code = tonic::Code::from_i32(answer.code);
                *r.errors.entry(format!("{code:?}")).or_default() += 1;
            }
            Ok(None) => {
                *r.errors.entry("stream ended".into()).or_default() += 1;
                break;
            }
            Err(s) => {
                *r.errors.entry(format!("{:?}", s.code())).or_default() += 1;
                break;
            }
        }
    }
    r
}

async fn wait_ready(a: &WaitArgs) -> anyhow::Result<()> {
    use tern_common::proto::admin::v1::{InfoRequest, admin_client::AdminClient};
    let ch = Endpoint::from_shared(a.target.clone())
        .with_context(|| format!("--target {}", a.target))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    let deadline = Instant::now() + a.timeout;
    loop {
        match AdminClient::new(ch.clone()).info(InfoRequest {}).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "{} did not answer Admin.Info within {:?}: {e}",
                    a.target,
                    a.timeout
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn run_raw(a: &RawArgs) -> anyhow::Result<Summary> {
    if a.batch == 0 || a.keys == 0 {
        bail!("--batch and --keys must be > 0");
    }
    // The same options as tern's state machine (common/src/state.rs), but with
    // the WAL on: this is what RocksDB alone does for a durable batched put.
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.increase_parallelism(2);
    opts.set_max_background_jobs(2);
    opts.set_write_buffer_size(16 << 20);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let db = rocksdb::DB::open(&opts, &a.dir)
        .with_context(|| format!("opening RocksDB in {}", a.dir.display()))?;
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(a.sync);
    wo.disable_wal(false);
    let mut rng = StdRng::from_os_rng();
    let mut value = vec![0u8; a.value_size];
    rng.fill_bytes(&mut value);
    let mut latency = histogram();
    let (mut batches, mut puts) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < a.duration {
        let mut batch = rocksdb::WriteBatch::default();
        for _ in 0..a.batch {
            let key = format!("k{:012}", rng.random_range(0..a.keys));
            batch.put(key.as_bytes(), &value);
        }
        let t0 = Instant::now();
        db.write_opt(batch, &wo).context("RocksDB write")?;
        record(&mut latency, t0.elapsed());
        batches += 1;
        puts += a.batch as u64;
    }
    let elapsed = start.elapsed();
    Ok(Summary {
        mode: "raw",
        ops: puts,
        puts,
        batches,
        elapsed,
        latency_us: latency,
        errors: BTreeMap::new(),
        label: format!(
            "{} batch={} value={}B keys={} sync={}",
            a.dir.display(),
            a.batch,
            a.value_size,
            a.keys,
            a.sync
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn mixes() {
        let m = parse_mix("put=80,get=20").unwrap();
        assert_eq!(m.total, 100);
        let mut rng = StdRng::seed_from_u64(1);
        let mut puts = 0;
        for _ in 0..1000 {
            match m.pick(&mut rng) {
                OpKind::Put => puts += 1,
                OpKind::Get => {}
                k => panic!("picked {k:?}"),
            }
        }
        assert!((700..900).contains(&puts), "{puts}");
        assert!(parse_mix("put=0").is_err());
        assert!(parse_mix("scan=1").is_err());
        assert!(parse_mix("put").is_err());
        assert_eq!(parse_mix("txn=1").unwrap().pick(&mut rng), OpKind::Txn);
    }
}
