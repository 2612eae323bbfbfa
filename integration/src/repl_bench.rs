//! `tern-bench repl`: replication lag and catch-up rate, against a running
//! master and slave.
//!
//! **Lag.** Writers put at a fixed total rate on the master. For a sample of the
//! acknowledged writes, a reader asks the slave for that key with `min_index` =
//! the write's commit index; the slave answers as soon as its applied index
//! reaches it. Lag = answer time − acknowledgement time (it includes one slave
//! round trip, about 0.1 ms here).
//!
//! **Catch-up** (with `--slave-pid`): the slave is frozen (SIGSTOP) while
//! writers run flat out on the master for `--catchup-secs`; the master's
//! sustained write rate is measured in binlog events/s. Then the writers stop,
//! the slave is resumed (SIGCONT), and the catch-up rate is the backlog in
//! events divided by the time until the slave's applied index reaches the
//! master's last index.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use tern_common::proto::admin::v1::{InfoRequest, admin_client::AdminClient};
use tern_common::proto::kv::v1::{
    GetRequest, Op, PipelineRequest, PipelineResponse, PutRequest, kv_client::KvClient, op,
};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tonic::transport::{Channel, Endpoint};

pub struct ReplBenchArgs {
    pub master: String,
    pub slave: String,
    pub slave_pid: Option<i32>,
    /// Total writes per second during the lag phase.
    pub rate: u64,
    pub concurrency: usize,
    pub duration: Duration,
    pub value_size: usize,
    pub keys: u64,
    /// Measure the lag of one write in this many.
    pub sample_every: u64,
    pub catchup: Duration,
    /// Each writer puts on one `Kv.Pipeline` stream, one write in flight (as
    /// `tern-bench kv --pipeline 1`), instead of unary `Kv.Put` calls.
    pub pipeline: bool,
}

/// How one writer sends its Puts: unary calls, or one `Kv.Pipeline` stream
/// with one write in flight (opened again after it fails).
enum Putter {
    Unary(KvClient<Channel>),
    Stream {
        master: Channel,
        open: Option<(
            mpsc::Sender<PipelineRequest>,
            tonic::Streaming<PipelineResponse>,
        )>,
        id: u64,
    },
}

impl Putter {
    fn new(master: Channel, pipeline: bool) -> Putter {
        if pipeline {
            Putter::Stream {
                master,
                open: None,
                id: 0,
            }
        } else {
            Putter::Unary(KvClient::new(master))
        }
    }

    /// Puts `key` and returns its commit index; `None` when it failed.
    async fn put(&mut self, key: Bytes, value: Bytes) -> Option<u64> {
        let put = PutRequest {
            key,
            value,
            ..Default::default()
        };
        match self {
            Putter::Unary(kv) => kv.put(put).await.ok().map(|r| r.into_inner().index),
            Putter::Stream { master, open, id } => {
                if open.is_none() {
                    let (tx, rx) = mpsc::channel(1);
                    let answers = KvClient::new(master.clone())
                        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await;
                    match answers {
                        Ok(a) => *open = Some((tx, a.into_inner())),
                        Err(_) => {
                            // Not straight back: the caller may loop flat out.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            return None;
                        }
                    }
                }
                let (tx, answers) = open.as_mut()?;
                *id += 1;
                let req = PipelineRequest {
                    id: *id,
                    ops: vec![Op {
                        op: Some(op::Op::Put(put)),
                    }],
                    ..Default::default()
                };
                let answer = match tx.send(req).await {
                    Ok(()) => answers.message().await,
                    Err(_) => Ok(None),
                };
                match answer {
                    Ok(Some(a)) if a.code == 0 => Some(a.index),
                    // A refused write: the stream goes on.
                    Ok(Some(_)) => None,
                    // The stream ended: the next Put opens another.
                    Ok(None) | Err(_) => {
                        *open = None;
                        None
                    }
                }
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct ReplBenchReport {
    pub writes: u64,
    pub write_rate: f64,
    pub lag_samples: u64,
    pub lag_p50_us: u64,
    pub lag_p99_us: u64,
    pub lag_max_us: u64,
    pub lag_errors: u64,
    pub sustained_events_per_sec: f64,
    pub backlog_events: u64,
    pub catchup_secs: f64,
    pub catchup_events_per_sec: f64,
}

impl ReplBenchReport {
    pub fn print(&self, json: bool) {
        if json {
            println!(
                "{{\"writes\":{},\"write_rate\":{:.1},\"lag_samples\":{},\"lag_p50_us\":{},\"lag_p99_us\":{},\"lag_max_us\":{},\"lag_errors\":{},\"sustained_events_per_sec\":{:.1},\"backlog_events\":{},\"catchup_secs\":{:.3},\"catchup_events_per_sec\":{:.1}}}",
                self.writes,
                self.write_rate,
                self.lag_samples,
                self.lag_p50_us,
                self.lag_p99_us,
                self.lag_max_us,
                self.lag_errors,
                self.sustained_events_per_sec,
                self.backlog_events,
                self.catchup_secs,
                self.catchup_events_per_sec
            );
        } else {
            println!(
                "repl: writes={} rate={:.0}/s lag_us p50={} p99={} max={} samples={} errors={}",
                self.writes,
                self.write_rate,
                self.lag_p50_us,
                self.lag_p99_us,
                self.lag_max_us,
                self.lag_samples,
                self.lag_errors
            );
            if self.backlog_events > 0 {
                println!(
                    "catch-up: master sustained {:.0} events/s; backlog {} events applied in {:.2}s = {:.0} events/s ({:.1}x)",
                    self.sustained_events_per_sec,
                    self.backlog_events,
                    self.catchup_secs,
                    self.catchup_events_per_sec,
                    self.catchup_events_per_sec / self.sustained_events_per_sec.max(1.0)
                );
            }
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("URL {url}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

async fn last_index(admin: &mut AdminClient<Channel>) -> anyhow::Result<u64> {
    Ok(admin.info(InfoRequest {}).await?.into_inner().last_index)
}

async fn applied_index(admin: &mut AdminClient<Channel>) -> anyhow::Result<u64> {
    Ok(admin.info(InfoRequest {}).await?.into_inner().applied_index)
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("bench-{i:012}"))
}

pub async fn run(a: ReplBenchArgs) -> anyhow::Result<ReplBenchReport> {
    anyhow::ensure!(
        a.concurrency > 0 && a.keys > 0 && a.sample_every > 0,
        "--concurrency, --keys and --sample-every must be > 0"
    );
    let master = connect(&a.master).await?;
    let slave = connect(&a.slave).await?;
    let value = Bytes::from(vec![b'v'; a.value_size]);
    let mut report = ReplBenchReport::default();

    // Lag phase: paced writers, sampled min_index reads on the slave.
    let lag = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let lag_errors = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let readers = Arc::new(Semaphore::new(64));
    let stop_at = Instant::now() + a.duration;
    let per_task = Duration::from_secs_f64(a.concurrency as f64 / a.rate.max(1) as f64);
    let mut tasks = Vec::new();
    for t in 0..a.concurrency as u64 {
        let mut putter = Putter::new(master.clone(), a.pipeline);
        let slave_kv = KvClient::new(slave.clone());
        let (value, lag, lag_errors, writes, readers) = (
            value.clone(),
            lag.clone(),
            lag_errors.clone(),
            writes.clone(),
            readers.clone(),
        );
        let (keys, sample_every) = (a.keys, a.sample_every);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(per_task);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = t;
            while Instant::now() < stop_at {
                tick.tick().await;
                let k = key(n % keys);
                n += 1;
                let Some(index) = putter.put(k.clone(), value.clone()).await else {
                    lag_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let acked = Instant::now();
                let w = writes.fetch_add(1, Ordering::Relaxed);
                if w % sample_every != 0 {
                    continue;
                }
                let Ok(permit) = readers.clone().try_acquire_owned() else {
                    continue;
                };
                let (mut skv, lag, lag_errors) =
                    (slave_kv.clone(), lag.clone(), lag_errors.clone());
                tokio::spawn(async move {
                    let r = skv
                        .get(GetRequest {
                            key: k,
                            min_index: index,
                            wait_ms: 30_000,
                        })
                        .await;
                    let took = acked.elapsed();
                    drop(permit);
                    match r {
                        Ok(_) => {
                            let _ = lag.lock().await.record(took.as_micros().max(1) as u64);
                        }
                        Err(_) => {
                            lag_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let the last sampled reads finish.
    let _ = readers.acquire_many(64).await?;
    report.writes = writes.load(Ordering::Relaxed);
    report.write_rate = report.writes as f64 / elapsed;
    {
        let h = lag.lock().await;
        report.lag_samples = h.len();
        report.lag_p50_us = h.value_at_quantile(0.5);
        report.lag_p99_us = h.value_at_quantile(0.99);
        report.lag_max_us = h.max();
    }
    report.lag_errors = lag_errors.load(Ordering::Relaxed);

    // Catch-up phase.
    let Some(pid) = a.slave_pid else {
        return Ok(report);
    };
    let mut madmin = AdminClient::new(master.clone());
    let mut sadmin = AdminClient::new(slave.clone());
    // SAFETY: kill(2) with a pid given by the user; no memory is involved.
    anyhow::ensure!(
        unsafe { libc::kill(pid, libc::SIGSTOP) } == 0,
        "SIGSTOP {pid} failed"
    );
    let from = last_index(&mut madmin).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..a.concurrency as u64 {
        let mut putter = Putter::new(master.clone(), a.pipeline);
        let (value, stop, keys) = (value.clone(), stop.clone(), a.keys);
        tasks.push(tokio::spawn(async move {
            let mut n = t;
            while !stop.load(Ordering::Relaxed) {
                let _ = putter.put(key(n % keys), value.clone()).await;
                n += 1;
            }
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(a.catchup).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let write_secs = t0.elapsed().as_secs_f64();
    let target = last_index(&mut madmin).await?;
    report.sustained_events_per_sec = (target - from) as f64 / write_secs;
    // SAFETY: as above.
    anyhow::ensure!(
        unsafe { libc::kill(pid, libc::SIGCONT) } == 0,
        "SIGCONT {pid} failed"
    );
    let resumed = Instant::now();
    let behind = applied_index(&mut sadmin).await?;
    report.backlog_events = target.saturating_sub(behind);
    loop {
        let applied = applied_index(&mut sadmin).await?;
        if applied >= target {
            break;
        }
        anyhow::ensure!(
            resumed.elapsed() < Duration::from_secs(300),
            "slave did not catch up in 300 s ({applied} < {target})"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    report.catchup_secs = resumed.elapsed().as_secs_f64();
    report.catchup_events_per_sec = report.backlog_events as f64 / report.catchup_secs;
    Ok(report)
}

/// `tern-bench fill`: writes `keys` keys of `value_size` bytes (keys
/// `fill-000000000000`…), `concurrency` at a time; prints the rate.
pub async fn fill(
    target: &str,
    keys: u64,
    value_size: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let ch = connect(target).await?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency.max(1) {
        let mut kv = KvClient::new(ch.clone())
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(usize::MAX);
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            // Incompressible, so the dataset's size on disk is what was written.
            let mut v = vec![0u8; value_size];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut v);
            v[0] = t as u8;
            let value = Bytes::from(v);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return anyhow::Ok(());
                }
                kv.put(PutRequest {
                    key: Bytes::from(format!("fill-{i:012}")),
                    value: value.clone(),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("put fill-{i:012}"))?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fill: {keys} keys of {value_size} B in {secs:.1}s ({:.1} MB/s)",
        (keys as f64 * value_size as f64) / secs / 1e6
    );
    Ok(())
}

/// `tern-bench wait-synced`: waits until the slave has finished a full sync and
/// streams from the master (its link is connected), then until it has applied
/// the master's last index; prints both times.
pub async fn wait_synced(master: &str, slave: &str, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut madmin = AdminClient::new(connect(master).await?);
    let mut sadmin = loop {
        match connect(slave).await {
            Ok(c) => break AdminClient::new(c),
            Err(e) if started.elapsed() < timeout => {
                tracing::debug!(error = %e, "slave not up yet");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let mut connected_at = None;
    loop {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "slave not synced after {timeout:?}"
        );
        if let Ok(i) = sadmin.info(InfoRequest {}).await.map(|r| r.into_inner()) {
            let full = i.counters.map(|c| c.full_syncs).unwrap_or(0);
            let connected = i.link.as_ref().is_some_and(|l| l.state == "connected");
            if connected_at.is_none() && full >= 1 && connected {
                connected_at = Some(started.elapsed());
            }
            if connected_at.is_some() && i.applied_index >= last_index(&mut madmin).await? {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "wait-synced: streaming after {:.2}s, caught up after {:.2}s",
        connected_at.unwrap_or_default().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
