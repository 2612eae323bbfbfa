//! `redis-lag`: replication lag of a Redis master and its replica, the
//! analogue of `tern-bench repl`'s lag phase (master ack -> replica read sees
//! the write), for `scripts/bench-vs-redis.sh`.
//!
//! ```text
//! redis-lag --master 127.0.0.1:6379 --replica 127.0.0.1:6380 --rate 20000 \
//!           --concurrency 50 --duration 10s [--value-size 100] [--keys 100000] \
//!           [--sample-every 10] [--json]
//! ```
//!
//! `--concurrency` connections write `SET` on the master at `--rate` writes/s
//! in total (each paced at rate / concurrency). One write in `--sample-every`
//! goes to a key of its own (`lag-N`) with a value naming N; after the master's
//! `+OK`, a sampler polls `GET lag-N` on the replica until it returns that
//! value: back to back for the first millisecond, then 100 us apart (slept on
//! a blocking-pool thread: tokio's timer would round it up to 1 ms), giving up
//! after 5 s (a timeout). Each
//! in-flight sample holds one of 64 replica connections of its own; a sampled
//! write finding none free is not measured (`samples_skipped`).
//!
//! The client speaks the minimum of RESP2 over a plain TCP connection: commands
//! as arrays of bulk strings; replies as simple strings, errors, integers, bulk
//! strings and nil. A malformed or oversized reply is an error, never a panic.
//!
//! The report is `tern-bench repl`'s (same text and `--json` fields: `writes`,
//! `write_rate`, `lag_samples`, `lag_p50_us`, `lag_p99_us`, `lag_max_us`,
//! `lag_errors` = timeouts + failed SETs + failed samples; its catch-up fields
//! are 0); a line on stderr splits `lag_errors` up and counts skipped samples.
//!
//! With `--wait-replicas N` it measures Redis's semi-synchronous write
//! instead, the analogue of `tern-bench kv --min-replicas N`: each of
//! `--concurrency` clients sends `SET` then `WAIT N <--wait-timeout-ms>` (0 =
//! wait as long as it takes) on its master connection, back to back, for
//! `--duration`; the latency of one write is from sending its SET to reading
//! WAIT's answer. It prints ops/s and latency p50/p99/max like `tern-bench
//! kv` (`--json`: `ops`, `ops_per_sec`, `p50_us`, `p99_us`, `max_us`,
//! `errors`, `short`: WAITs answered with fewer than N replicas).
//!
//! ```text
//! redis-lag --master 127.0.0.1:6379 --wait-replicas 1 --concurrency 1 --duration 10s --json
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use hdrhistogram::Histogram;
use tern_integration::repl_bench::ReplBenchReport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Replica connections, and so samples in flight at once.
const SAMPLERS: usize = 64;
/// A sample not visible on the replica after this long is a timeout.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll back to back for this long after the ack, then with `POLL_SLEEP`.
const SPIN: Duration = Duration::from_millis(1);
const POLL_SLEEP: Duration = Duration::from_micros(100);
/// Largest reply line (simple string, error, integer, bulk header) accepted.
const MAX_LINE: usize = 64 * 1024;
/// Largest bulk string accepted.
const MAX_BULK: usize = 16 * 1024 * 1024;

#[derive(Parser, Debug)]
#[command(
    name = "redis-lag",
    about = "Replication lag (master +OK -> replica GET sees the value) of Redis"
)]
struct Cli {
    /// Master address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:6379")]
    master: String,
    /// Replica address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:6380")]
    replica: String,
    /// Total SETs per second on the master.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Writer connections to the master.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How long to write: 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Unsampled writes go to keys bench-0 .. bench-(keys-1), in turn.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Measure the replication lag of one write in this many.
    #[arg(long, default_value_t = 10)]
    sample_every: u64,
    /// Instead of the lag: SET then `WAIT N` per write (see the module docs).
    #[arg(long)]
    wait_replicas: Option<u32>,
    /// WAIT's timeout in milliseconds (0 = none, as `WAIT 1 0`).
    #[arg(long, default_value_t = 0)]
    wait_timeout_ms: u64,
    #[arg(long)]
    json: bool,
}

/// "10s", "500ms", "2m", "250us" or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_digit() || c == '.'))
        .map_or(s.len(), |(i, _)| i);
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 10s, 500ms or 2m"))?;
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" => 1e-6,
        "m" => 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (us, ms, s, m)")),
    };
    Duration::try_from_secs_f64(n * scale).map_err(|e| format!("{s:?}: {e}"))
}

/// One RESP2 reply.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple(Vec<u8>),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
}

/// Parses one reply at the start of `buf`: `Ok(None)` if more bytes are needed,
/// else the reply and how many bytes it took.
fn parse_reply(buf: &[u8]) -> anyhow::Result<Option<(Reply, usize)>> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        ensure!(
            buf.len() <= MAX_LINE,
            "reply line longer than {MAX_LINE} bytes"
        );
        return Ok(None);
    };
    ensure!(nl <= MAX_LINE, "reply line longer than {MAX_LINE} bytes");
    ensure!(
        nl >= 1 && buf[nl - 1] == b'\r',
        "reply line not ended by CRLF"
    );
    let (kind, line) = (buf[0], &buf[1..nl - 1]);
    let after = nl + 1;
    let reply = match kind {
        b'+' => Reply::Simple(line.to_vec()),
        b'-' => Reply::Error(String::from_utf8_lossy(line).into_owned()),
        b':' => Reply::Int(parse_int(line)?),
        b'$' => {
            let len = parse_int(line)?;
            if len == -1 {
                return Ok(Some((Reply::Nil, after)));
            }
            let len = usize::try_from(len)
                .ok()
                .filter(|&l| l <= MAX_BULK)
                .with_context(|| format!("bulk length {len} out of range"))?;
            let end = after + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            ensure!(
                &buf[end..end + 2] == b"\r\n",
                "bulk string not ended by CRLF"
            );
            return Ok(Some((Reply::Bulk(buf[after..end].to_vec()), end + 2)));
        }
        other => bail!("unsupported reply type byte {other:#04x}"),
    };
    Ok(Some((reply, after)))
}

fn parse_int(line: &[u8]) -> anyhow::Result<i64> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad integer {:?}", String::from_utf8_lossy(line)))
}

/// A RESP2 connection: one request at a time.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Conn {
    async fn connect(addr: &str) -> anyhow::Result<Conn> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}: timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(4096),
        })
    }

    /// Sends one command (an array of bulk strings) and reads its reply.
    async fn call(&mut self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        self.out.clear();
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.out
                .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&self.out).await?;
        loop {
            if let Some((reply, used)) = parse_reply(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            self.buf.reserve(4096);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by the server");
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    write_errors: AtomicU64,
    sample_errors: AtomicU64,
    timeouts: AtomicU64,
    skipped: AtomicU64,
}

struct Shared {
    counters: Counters,
    lag_us: Mutex<Histogram<u64>>,
    /// Free replica connections; a sample takes one for its whole poll.
    replicas: Mutex<Vec<Conn>>,
}

/// Polls the replica until `key` holds `value`: its lag, or `None` on timeout.
async fn wait_visible(
    conn: &mut Conn,
    key: &[u8],
    value: &[u8],
    acked: Instant,
) -> anyhow::Result<Option<Duration>> {
    loop {
        match conn.call(&[b"GET", key]).await? {
            Reply::Bulk(v) if v == value => return Ok(Some(acked.elapsed())),
            Reply::Bulk(_) | Reply::Nil => {}
            other => bail!("GET on the replica: unexpected reply {other:?}"),
        }
        let waited = acked.elapsed();
        if waited >= SAMPLE_TIMEOUT {
            return Ok(None);
        }
        if waited >= SPIN {
            // tokio's timer has a 1 ms resolution: a blocking-pool thread
            // sleeps the 100 us instead.
            tokio::task::spawn_blocking(|| std::thread::sleep(POLL_SLEEP))
                .await
                .context("sleeping between polls")?;
        }
    }
}

async fn sample(shared: Arc<Shared>, mut conn: Conn, key: Vec<u8>, value: Vec<u8>, acked: Instant) {
    let c = &shared.counters;
    match wait_visible(&mut conn, &key, &value, acked).await {
        Ok(Some(lag)) => {
            let us = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX).max(1);
            let _ = shared.lag_us.lock().await.record(us);
            shared.replicas.lock().await.push(conn);
        }
        Ok(None) => {
            c.timeouts.fetch_add(1, Ordering::Relaxed);
            shared.replicas.lock().await.push(conn);
        }
        Err(e) => {
            // The connection may be out of step: drop it (one sampler fewer).
            eprintln!("redis-lag: sample {}: {e:#}", String::from_utf8_lossy(&key));
            c.sample_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The value of a sampled write: names its number, padded to `size` bytes.
fn sample_value(n: u64, size: usize) -> Vec<u8> {
    let mut v = format!("sample-{n:016}-").into_bytes();
    v.resize(size.max(v.len()), b's');
    v
}

async fn writer(
    shared: Arc<Shared>,
    mut conn: Conn,
    seq: Arc<AtomicU64>,
    a: Arc<Cli>,
    stop_at: Instant,
    samplers: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
) -> anyhow::Result<()> {
    let value = vec![b'v'; a.value_size];
    let period = Duration::from_secs_f64(a.concurrency as f64 / a.rate.max(1) as f64)
        .max(Duration::from_nanos(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let c = &shared.counters;
    while Instant::now() < stop_at {
        tick.tick().await;
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let sampled = n.is_multiple_of(a.sample_every);
        let (key, val) = if sampled {
            (
                format!("lag-{n:012}").into_bytes(),
                sample_value(n, a.value_size),
            )
        } else {
            (
                format!("bench-{:012}", n % a.keys).into_bytes(),
                value.clone(),
            )
        };
        match conn.call(&[b"SET", &key, &val]).await? {
            Reply::Simple(s) if s == b"OK" => {}
            Reply::Error(e) => {
                c.write_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("redis-lag: SET: {e}");
                continue;
            }
            other => bail!("SET on the master: unexpected reply {other:?}"),
        }
        let acked = Instant::now();
        c.writes.fetch_add(1, Ordering::Relaxed);
        if !sampled {
            continue;
        }
        let Some(rconn) = shared.replicas.lock().await.pop() else {
            c.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let h = tokio::spawn(sample(shared.clone(), rconn, key, val, acked));
        samplers.lock().await.push(h);
    }
    Ok(())
}

/// What `tern-bench repl` does not report: how the lag errors split up.
struct Detail {
    write_errors: u64,
    sample_errors: u64,
    timeouts: u64,
    skipped: u64,
}

async fn run(a: Cli) -> anyhow::Result<(ReplBenchReport, Detail)> {
    ensure!(
        a.concurrency > 0 && a.keys > 0 && a.sample_every > 0 && a.rate > 0,
        "--rate, --concurrency, --keys and --sample-every must be > 0"
    );
    let mut replicas = Vec::with_capacity(SAMPLERS);
    for _ in 0..SAMPLERS {
        replicas.push(Conn::connect(&a.replica).await?);
    }
    let mut writers = Vec::with_capacity(a.concurrency);
    for _ in 0..a.concurrency {
        writers.push(Conn::connect(&a.master).await?);
    }
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        lag_us: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
        replicas: Mutex::new(replicas),
    });
    let a = Arc::new(a);
    let seq = Arc::new(AtomicU64::new(0));
    let samplers = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let stop_at = started + a.duration;
    let tasks: Vec<_> = writers
        .into_iter()
        .map(|conn| {
            tokio::spawn(writer(
                shared.clone(),
                conn,
                seq.clone(),
                a.clone(),
                stop_at,
                samplers.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await.context("writer task")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The last samples (each ends within SAMPLE_TIMEOUT).
    for h in std::mem::take(&mut *samplers.lock().await) {
        h.await.context("sample task")?;
    }
    let c = &shared.counters;
    let h = shared.lag_us.lock().await;
    let q = |p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    let writes = c.writes.load(Ordering::Relaxed);
    let detail = Detail {
        write_errors: c.write_errors.load(Ordering::Relaxed),
        sample_errors: c.sample_errors.load(Ordering::Relaxed),
        timeouts: c.timeouts.load(Ordering::Relaxed),
        skipped: c.skipped.load(Ordering::Relaxed),
    };
    let report = ReplBenchReport {
        writes,
        write_rate: writes as f64 / elapsed,
        lag_samples: h.len(),
        lag_p50_us: q(0.5),
        lag_p99_us: q(0.99),
        lag_max_us: h.max(),
        lag_errors: detail.write_errors + detail.sample_errors + detail.timeouts,
        ..ReplBenchReport::default()
    };
    Ok((report, detail))
}

/// The `--wait-replicas` run: writes and their latency.
#[derive(Debug, Default)]
struct WaitReport {
    ops: u64,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    errors: u64,
    /// WAITs answered with fewer replicas than asked (only with a timeout).
    short: u64,
}

impl WaitReport {
    fn print(&self, json: bool, replicas: u32) {
        let fields = [
            ("ops", self.ops.to_string()),
            ("ops_per_sec", format!("{:.1}", self.ops_per_sec)),
            ("p50_us", self.p50_us.to_string()),
            ("p99_us", self.p99_us.to_string()),
            ("max_us", self.max_us.to_string()),
            ("errors", self.errors.to_string()),
            ("short", self.short.to_string()),
        ];
        let join = |f: &dyn Fn(&str, &str) -> String, sep: &str| {
            fields
                .iter()
                .map(|(k, v)| f(k, v))
                .collect::<Vec<_>>()
                .join(sep)
        };
        if json {
            let body = join(&|k, v| format!("\"{k}\":{v}"), ",");
            println!("{{\"mode\":\"redis-set-wait\",\"replicas\":{replicas},{body}}}");
        } else {
            println!(
                "redis SET + WAIT {replicas}: {}",
                join(&|k, v| format!("{k}={v}"), " ")
            );
        }
    }
}

/// One client of the `--wait-replicas` run: SET, WAIT, until `stop_at`.
async fn set_wait_client(
    mut conn: Conn,
    a: Arc<Cli>,
    replicas: u32,
    client: usize,
    stop_at: Instant,
) -> anyhow::Result<(Histogram<u64>, u64, u64)> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (mut errors, mut short) = (0u64, 0u64);
    let value = vec![b'v'; a.value_size];
    let (n, timeout) = (replicas.to_string(), a.wait_timeout_ms.to_string());
    let mut i = client as u64;
    while Instant::now() < stop_at {
        let key = format!("bench-{:012}", i % a.keys).into_bytes();
        i = i.wrapping_add(a.concurrency as u64);
        let t0 = Instant::now();
        match conn.call(&[b"SET", &key, &value]).await? {
            Reply::Simple(s) if s == b"OK" => {}
            Reply::Error(e) => {
                errors += 1;
                eprintln!("redis-lag: SET: {e}");
                continue;
            }
            other => bail!("SET on the master: unexpected reply {other:?}"),
        }
        match conn
            .call(&[b"WAIT", n.as_bytes(), timeout.as_bytes()])
            .await?
        {
            Reply::Int(got) => {
                if got < i64::from(replicas) {
                    short += 1;
                }
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = h.record(us.max(1));
            }
            Reply::Error(e) => {
                errors += 1;
                eprintln!("redis-lag: WAIT: {e}");
            }
            other => bail!("WAIT on the master: unexpected reply {other:?}"),
        }
    }
    Ok((h, errors, short))
}

async fn run_wait(a: Cli, replicas: u32) -> anyhow::Result<WaitReport> {
    ensure!(
        a.concurrency > 0 && a.keys > 0,
        "--concurrency and --keys must be > 0"
    );
    let mut conns = Vec::with_capacity(a.concurrency);
    for _ in 0..a.concurrency {
        conns.push(Conn::connect(&a.master).await?);
    }
    let a = Arc::new(a);
    let started = Instant::now();
    let stop_at = started + a.duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(set_wait_client(c, a.clone(), replicas, i, stop_at)))
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut report = WaitReport::default();
    for t in tasks {
        let (h, errors, short) = t.await.context("client task")??;
        all.add(&h)?;
        report.errors += errors;
        report.short += short;
    }
    let elapsed = started.elapsed().as_secs_f64();
    report.ops = all.len();
    report.ops_per_sec = all.len() as f64 / elapsed;
    if !all.is_empty() {
        report.p50_us = all.value_at_quantile(0.5);
        report.p99_us = all.value_at_quantile(0.99);
        report.max_us = all.max();
    }
    Ok(report)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let json = cli.json;
    if let Some(replicas) = cli.wait_replicas {
        let report = run_wait(cli, replicas).await?;
        report.print(json, replicas);
        return Ok(());
    }
    let (report, d) = run(cli).await?;
    report.print(json);
    eprintln!(
        "redis-lag: lag_errors = {} timeouts (> {}s) + {} failed SETs + {} failed samples; \
         {} sampled writes not measured (all {SAMPLERS} replica connections busy)",
        d.timeouts,
        SAMPLE_TIMEOUT.as_secs(),
        d.write_errors,
        d.sample_errors,
        d.skipped
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        let p = |b: &[u8]| parse_reply(b).unwrap();
        assert_eq!(p(b"+OK\r\n"), Some((Reply::Simple(b"OK".to_vec()), 5)));
        assert_eq!(p(b"-ERR x\r\n"), Some((Reply::Error("ERR x".into()), 8)));
        assert_eq!(p(b":-12\r\n"), Some((Reply::Int(-12), 6)));
        assert_eq!(p(b"$-1\r\n"), Some((Reply::Nil, 5)));
        assert_eq!(
            p(b"$3\r\nabc\r\n+"),
            Some((Reply::Bulk(b"abc".to_vec()), 9))
        );
        assert_eq!(p(b"$0\r\n\r\n"), Some((Reply::Bulk(Vec::new()), 6)));
        assert_eq!(p(b"$3\r\nab"), None);
        assert_eq!(p(b"+OK\r"), None);
        assert_eq!(p(b""), None);
    }

    #[test]
    fn rejects_malformed_replies() {
        for bad in [
            &b"+OK\n"[..],
            b"\n",
            b"$-2\r\n",
            b"$abc\r\n",
            b":1x\r\n",
            b"$3\r\nabcde",
            b"*1\r\n",
            b"?\r\n",
            b"$99999999999\r\n",
        ] {
            assert!(
                parse_reply(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_reply(&vec![b'+'; MAX_LINE + 1]).is_err());
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
