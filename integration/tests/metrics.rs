//! The Prometheus endpoint (`server.metrics_listen`) of a master and a slave
//! during replication, read the way Prometheus reads it: fetched over HTTP
//! and parsed by Prometheus's own Python parser (`tests/metrics/scrape.py`,
//! `prometheus_client.parser`; Debian python3-prometheus-client, installed
//! by scripts/setup.sh). Values are checked against what the test did: the
//! writes it made, a TrySync it had refused, a restart of the master, the
//! full sync of the fresh slave (whose node restarts its services: the
//! endpoint and its counters stay). Also: another path is 404, another
//! method 405, garbage and oversized requests are refused and the node
//! keeps serving.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;
use tern_integration::{Node, TestDir, Workload, pick_port};

/// One scrape, as the Python parser read it.
#[derive(Debug)]
struct Scrape {
    status: u16,
    content_type: String,
    /// Family name → type (counter, gauge, histogram, info...).
    families: BTreeMap<String, String>,
    /// `name{label="value",...}` (labels sorted) → value.
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The value of `name` with exactly `labels` (any order).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels = labels.to_vec();
        labels.sort();
        let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        self.samples
            .get(&format!("{name}{{{}}}", inner.join(",")))
            .copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}; samples:\n{}", self.dump(name)))
    }

    /// The sum of every sample of `name` (whatever its labels).
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// The `role` label of the one `tern_instance_info` sample (whose value is 1).
    fn role(&self) -> String {
        let infos: Vec<(&String, &f64)> = self
            .samples
            .iter()
            .filter(|(k, _)| k.starts_with("tern_instance_info{"))
            .collect();
        assert_eq!(infos.len(), 1, "one tern_instance_info: {infos:?}");
        assert_eq!(*infos[0].1, 1.0);
        let (_, rest) = infos[0].0.split_once("role=\"").expect("a role label");
        rest.split('"').next().unwrap_or_default().to_string()
    }

    /// The samples whose name starts with `prefix`, one a line.
    fn dump(&self, prefix: &str) -> String {
        let root = prefix.split('{').next().unwrap_or(prefix);
        let root = root.strip_suffix("_total").unwrap_or(root);
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(root))
            .map(|(k, v)| format!("  {k} {v}\n"))
            .collect()
    }
}

/// A Python 3 with Prometheus's parser.
fn python() -> PathBuf {
    tern_integration::python_with("prometheus_client.parser", "python3-prometheus-client")
}

/// Fetches and parses `http://<addr>/metrics`.
async fn scrape(addr: &str) -> Scrape {
    let url = format!("http://{addr}/metrics");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/metrics/scrape.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .expect("running scrape.py")
    })
    .await
    .expect("scrape task");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scrape.py of {addr} failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut s = Scrape {
        status: 0,
        content_type: String::new(),
        families: BTreeMap::new(),
        samples: BTreeMap::new(),
    };
    for line in stdout.lines() {
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kind {
            "status" => s.status = rest.parse().expect("status"),
            "content_type" => s.content_type = rest.to_string(),
            "family" => {
                let (name, ty) = rest.rsplit_once(' ').expect("family line");
                s.families.insert(name.to_string(), ty.to_string());
            }
            "sample" => {
                let (key, v) = rest.rsplit_once(' ').expect("sample line");
                s.samples
                    .insert(key.to_string(), v.parse().expect("sample value"));
            }
            other => panic!("unexpected line kind {other:?} in {line:?}"),
        }
    }
    s
}

/// Sends `request` raw to `addr` (HTTP, or RESP) and returns what came back
/// until the server closed the connection (or 10 s passed).
fn raw_http(addr: &str, request: &[u8]) -> String {
    let mut c = std::net::TcpStream::connect(addr).expect("connecting to the metrics port");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (and close) before it read everything.
    let _ = c.write_all(request);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_and_slave_metrics_during_replication() {
    let dir = TestDir::new("metrics");
    let master_metrics = format!("127.0.0.1:{}", pick_port());
    let master_resp = format!("127.0.0.1:{}", pick_port());
    let slave_metrics = format!("127.0.0.1:{}", pick_port());
    let mut master_env = FAST_LINK.to_vec();
    master_env.push(("TERN__SERVER__METRICS_LISTEN", master_metrics.as_str()));
    master_env.push(("TERN__SERVER__RESP_LISTEN", master_resp.as_str()));
    let mut slave_env = FAST_LINK.to_vec();
    slave_env.push(("TERN__SERVER__METRICS_LISTEN", slave_metrics.as_str()));
    let mut master = Node::start_master(&dir.join("master"), &master_env, &[])
        .await
        .expect("starting the master");

    // Writes before the slave exists: the fresh slave full-syncs (its node
    // restarts its services once the snapshot is in).
    const PUTS: usize = 40;
    let last_put = put_keys(&master, "metrics-", PUTS).await;
    let slave = start_slave(&dir, "slave", &master, &slave_env).await;
    let info = wait_connected(&slave, 1).await;
    let slave_id = master
        .info()
        .await
        .expect("master Info")
        .slaves
        .first()
        .map(|s| s.id.clone())
        .expect("the master lists its slave");

    // Scrape both during a load.
    let work = Workload::new(8, 4);
    let load = PacedLoad::start(&work, &master.url(), 2, Duration::from_millis(2));
    load.wait_more(200).await;
    let acked_before_scrape = work.max_acked_index();
    let m = scrape(&master_metrics).await;
    let s = scrape(&slave_metrics).await;

    for (who, x) in [("master", &m), ("slave", &s)] {
        assert_eq!(x.status, 200, "{who}");
        assert!(
            x.content_type.starts_with("text/plain; version=0.0.4"),
            "{who} content type {:?}",
            x.content_type
        );
        assert_eq!(
            x.families
                .get("tern_fsync_duration_seconds")
                .map(String::as_str),
            Some("histogram"),
            "{who} families {:?}",
            x.families
        );
        assert!(
            x.value("tern_fsync_duration_seconds_count", &[]) > 0.0,
            "{who}: binlog fsyncs (fsync = always) are timed"
        );
        assert_eq!(
            x.value("tern_fsync_duration_seconds_bucket", &[("le", "+Inf")]),
            x.value("tern_fsync_duration_seconds_count", &[]),
            "{who}"
        );
    }

    // The master.
    assert_eq!(m.role(), "master", "{}", m.dump("tern_instance"));
    let offset = m.value("tern_master_repl_offset", &[]);
    assert!(
        offset >= acked_before_scrape as f64 && offset >= last_put as f64,
        "tern_master_repl_offset {offset} below the last acknowledged write {acked_before_scrape} / {last_put}"
    );
    assert_eq!(m.value("tern_connected_slaves", &[]), 1.0);
    assert!(
        m.get(
            "tern_connected_slave_lag_events",
            &[("slave_id", &slave_id)]
        )
        .is_some(),
        "lag of slave {slave_id}:\n{}",
        m.dump("tern_connected_slave")
    );
    assert!(
        m.get(
            "tern_connected_slave_lag_seconds",
            &[("slave_id", &slave_id)]
        )
        .is_some()
    );
    assert!(
        m.value(
            "tern_connected_slave_received_index",
            &[("slave_id", &slave_id)]
        ) >= last_put as f64,
        "the slave acknowledged the writes made before it connected"
    );
    let puts_ok = m.value(
        "tern_requests_total",
        &[("method", "/tern.kv.v1.Kv/Put"), ("code", "OK")],
    );
    assert!(
        puts_ok >= PUTS as f64,
        "{puts_ok} Puts counted, {PUTS} made:\n{}",
        m.dump("tern_requests")
    );
    let groups = m.value("tern_group_commit_transactions_count", &[]);
    let txns = m.value("tern_group_commit_transactions_sum", &[]);
    assert!(
        groups > 0.0 && txns >= groups,
        "groups {groups}, transactions {txns}"
    );
    assert!(
        txns >= (PUTS as u64 + 200) as f64,
        "at least every acknowledged write was committed in some group: {txns}"
    );
    assert_eq!(m.value("tern_replica_resyncs_full_total", &[]), 1.0);
    assert!(
        m.get("tern_master_link_up", &[]).is_none(),
        "a master has no link"
    );

    // The slave: it full-synced (its node restarted its services on the
    // snapshot; the endpoint stayed), then connected.
    assert_eq!(s.role(), "slave", "{}", s.dump("tern_instance"));
    assert_eq!(s.value("tern_master_link_up", &[]), 1.0);
    assert_eq!(s.value("tern_master_sync_in_progress", &[]), 0.0);
    assert_eq!(s.value("tern_replica_resyncs_full_total", &[]), 1.0);
    assert!(s.value("tern_slave_repl_offset", &[]) >= info.applied_index as f64);
    assert!(s.value("tern_applied_index", &[]) >= last_put as f64);
    assert!(
        s.value(
            "tern_requests_total",
            &[("method", "/tern.admin.v1.Admin/Info"), ("code", "OK")]
        ) >= 1.0,
        "the test's Info calls:\n{}",
        s.dump("tern_requests")
    );
    assert_eq!(s.value("tern_duplicates_skipped_total", &[]), 0.0);

    // A TrySync the master refuses: counted under its reason.
    let denied = |x: &Scrape| {
        x.get(
            "tern_replica_partial_resync_denied_total",
            &[("reason", "unknown_repl_id")],
        )
        .unwrap_or(0.0)
    };
    let before = denied(&m);
    assert!(before >= 1.0, "the fresh slave's own TrySync was refused");
    let mut rogue = Rogue::open(&master.url(), try_sync("metrics-rogue", "", 0, 0)).await;
    let r = rogue.try_sync_response().await;
    assert_eq!(
        r.reason,
        tern_common::proto::replication::v1::FullSyncReason::UnknownReplId as i32
    );
    drop(rogue);
    let m2 = scrape(&master_metrics).await;
    assert_eq!(
        denied(&m2),
        before + 1.0,
        "{}",
        m2.dump("tern_replica_partial")
    );

    // RESP commands, by name: two PINGs (one inline) and one unknown command.
    let a = raw_http(
        &master_resp,
        b"*1\r\n$4\r\nPING\r\nping\r\n*1\r\n$5\r\nBOGUS\r\n*1\r\n$4\r\nQUIT\r\n",
    );
    assert!(a.starts_with("+PONG\r\n+PONG\r\n-ERR"), "{a:?}");
    let m3 = scrape(&master_metrics).await;
    assert_eq!(m3.value("tern_commands_total", &[("cmd", "ping")]), 2.0);
    assert_eq!(m3.value("tern_commands_total", &[("cmd", "other")]), 1.0);
    assert_eq!(m3.value("tern_commands_total", &[("cmd", "quit")]), 1.0);

    // Not /metrics; not GET; garbage; a head over the limit. Then the node
    // still serves.
    let a = raw_http(
        &master_metrics,
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status_line(&a).starts_with("HTTP/1.1 404"), "{a}");
    let a = raw_http(
        &master_metrics,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    );
    assert!(status_line(&a).starts_with("HTTP/1.1 405"), "{a}");
    let a = raw_http(&master_metrics, b"\x00\xff\xfe garbage \r\n\r\n\r\n");
    assert!(
        status_line(&a).starts_with("HTTP/1.1 400"),
        "garbage answered {a:?}"
    );
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 64 << 10));
    big.extend_from_slice(b"\r\n\r\n");
    let a = raw_http(&master_metrics, &big);
    assert!(
        a.is_empty() || status_line(&a).starts_with("HTTP/1.1 4"),
        "an oversized head answered {}",
        status_line(&a)
    );
    let a = raw_http(
        &slave_metrics,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        status_line(&a).starts_with("HTTP/1.1 200"),
        "{}",
        status_line(&a)
    );
    assert!(a.contains("\ntern_master_link_up 1\n"), "{a}");

    // Restart the master: the slave reconnects, and says why.
    let reconnects_before = s.sum("tern_reconnects_total");
    load.stop().await;
    let m_idle = scrape(&master_metrics).await;
    assert_eq!(
        m_idle.value("tern_transactions_committed_total", &[]),
        m_idle.value("tern_group_commit_transactions_sum", &[]),
        "the group sizes add up to the committed transactions"
    );
    master
        .sigterm_and_wait()
        .await
        .expect("stopping the master");
    master.restart().await.expect("restarting the master");
    let connected =
        wait_connected(&slave, info.counters.unwrap_or_default().partial_syncs + 1).await;
    let s2 = scrape(&slave_metrics).await;
    let after = slave.info().await.expect("slave Info");
    let by_reason = s2.sum("tern_reconnects_total");
    assert!(
        by_reason > reconnects_before,
        "reconnects {reconnects_before} before the restart:\n{}",
        s2.dump("tern_reconnects")
    );
    // By reason they add up to Info's count (read before and after the scrape).
    let count = |i: &tern_common::proto::admin::v1::InfoResponse| {
        i.counters.unwrap_or_default().reconnects as f64
    };
    assert!(
        count(&connected) <= by_reason && by_reason <= count(&after),
        "{} <= {by_reason} <= {}",
        count(&connected),
        count(&after)
    );
    assert_eq!(s2.value("tern_master_link_up", &[]), 1.0);
    let m4 = scrape(&master_metrics).await;
    assert_eq!(m4.value("tern_connected_slaves", &[]), 1.0);
    assert!(master.info().await.is_ok(), "the master still serves");
}
