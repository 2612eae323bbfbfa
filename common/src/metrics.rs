//! Prometheus metrics of a node (`server.metrics_listen`): `GET /metrics`
//! answers the Prometheus text format (version 0.0.4).
//!
//! - Most values are read at scrape time from the node's `Admin.Info`
//!   ([`InfoSource`]) by a collector, so they never disagree with `Info`.
//!   Names follow redis_exporter's where the meaning is the same
//!   (`tern_master_repl_offset`, `tern_connected_slaves`,
//!   `tern_connected_slave_lag_seconds`, `tern_master_link_up`, ...).
//! - The rest are counted where they happen, through the node's one
//!   [`Metrics`]: binlog fsync latency (master's binlog and slave's relay
//!   log), transactions per group commit, partial resyncs denied by reason,
//!   the slave's reconnects by reason, and gRPC requests by method and status
//!   ([`RequestsLayer`], in front of every service of the port).
//! - A slave restarts its services on a full sync: [`Metrics`] and the HTTP
//!   server outlive those restarts (the node swaps the [`InfoSource`] with
//!   [`Metrics::set_source`]), so counters never go back while it runs.
//!
//! The HTTP server ([`start`]) is hyper's HTTP/1.1: request heads of at most
//! [`MAX_HEAD_BYTES`], read within [`HEAD_TIMEOUT`]; a connection lives at
//! most [`CONNECTION_LIFETIME`]; at most [`MAX_CONNECTIONS`] at once (more
//! are closed at once). Request bodies are never read. Any other path is 404,
//! any other method on `/metrics` is 405.

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;

use crate::proto::admin::v1 as admin;
use crate::server::{BoxFuture, ConnectionStats, InfoSource};

pub use prometheus_client::metrics::histogram::Histogram;

/// Content type of the answer (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// Largest request head (request line and headers) read; hyper's minimum.
pub const MAX_HEAD_BYTES: usize = 8192;
/// A request head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A metrics connection is closed after this long, whatever it does.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Metrics connections open at once at most.
pub const MAX_CONNECTIONS: usize = 32;
/// Label value of a request to a method the node does not serve (and of a
/// RESP command it does not know).
pub const OTHER_METHOD: &str = "other";

/// A label set of one label.
type OneLabel = [(&'static str, String); 1];
/// A label set of one label whose values are a fixed set of names.
type StaticLabel = [(&'static str, &'static str); 1];
/// `method` and `code`.
type RequestLabels = [(&'static str, String); 2];

/// What the collector reads at scrape time.
pub struct NodeSource {
    pub info: Arc<dyn InfoSource>,
    /// The gRPC port's connections (`tern_connected_clients`).
    pub connections: Option<Arc<ConnectionStats>>,
}

#[derive(Default)]
struct SourceSlot(RwLock<Option<NodeSource>>);

impl std::fmt::Debug for SourceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceSlot")
    }
}

/// The metrics of one node (one per process: a slave keeps it across the
/// restarts of a full sync).
pub struct Metrics {
    registry: Registry,
    source: Arc<SourceSlot>,
    /// fdatasync of the binlog's (or relay log's) tail, in seconds.
    pub fsync: Histogram,
    /// Transactions in one group commit of the master's committer.
    pub group_transactions: Histogram,
    partial_resync_denied: Family<OneLabel, Counter>,
    reconnects: Family<StaticLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    resp_commands: Family<StaticLabel, Counter>,
    /// gRPC paths the node serves (`/package.Service/Method`).
    methods: HashSet<String>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("tern");
        // 10 µs .. about 5 s.
        let fsync = Histogram::new(exponential_buckets(0.00001, 2.0, 20));
        // 1 .. 4096 transactions.
        let group_transactions = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        let partial_resync_denied = Family::<OneLabel, Counter>::default();
        let reconnects = Family::<StaticLabel, Counter>::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let resp_commands = Family::<StaticLabel, Counter>::default();
        registry.register(
            "fsync_duration_seconds",
            "Time of one fdatasync of the binlog (master) or relay log (slave) tail",
            fsync.clone(),
        );
        registry.register(
            "group_commit_transactions",
            "Transactions written and fsynced together in one group commit (master)",
            group_transactions.clone(),
        );
        registry.register(
            "replica_partial_resync_denied",
            "TrySyncs this node answered with NeedFullSync, by FullSyncReason",
            partial_resync_denied.clone(),
        );
        registry.register(
            "reconnects",
            "Slave: sessions with the master that ended (the slave reconnects), by reason",
            reconnects.clone(),
        );
        registry.register(
            "requests",
            "gRPC requests answered, by method path and status code",
            requests.clone(),
        );
        registry.register(
            "commands",
            "RESP front: commands received, by name (lower case; `other` for names it does not know)",
            resp_commands.clone(),
        );
        let source = Arc::new(SourceSlot::default());
        registry.register_collector(Box::new(InfoCollector {
            source: source.clone(),
        }));
        Arc::new(Metrics {
            registry,
            source,
            fsync,
            group_transactions,
            partial_resync_denied,
            reconnects,
            requests,
            resp_commands,
            methods: known_methods(),
        })
    }

    /// From now on scrapes read `source` (a slave calls it for every start of
    /// its services).
    pub fn set_source(&self, source: NodeSource) {
        *self.source.0.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Forgets the source (and whatever it holds, e.g. RocksDB): scrapes show
    /// only the counters until the next [`set_source`](Self::set_source).
    /// Waits for a scrape reading it to finish.
    pub fn clear_source(&self) {
        *self.source.0.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A TrySync answered NeedFullSync; `reason` is the proto enum's name
    /// (`FULL_SYNC_REASON_PURGED` counts as `purged`).
    pub fn partial_resync_denied(&self, reason: &str) {
        let reason = reason
            .strip_prefix("FULL_SYNC_REASON_")
            .unwrap_or(reason)
            .to_ascii_lowercase();
        self.partial_resync_denied
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// A slave's session with its master ended for `reason` (a short stable name).
    pub fn reconnect(&self, reason: &'static str) {
        self.reconnects.get_or_create(&[("reason", reason)]).inc();
    }

    /// The RESP front received a command named `name` (any case): counted
    /// under its lower-case name if the front serves it, else as
    /// [`OTHER_METHOD`].
    pub fn resp_command(&self, name: &[u8]) {
        let cmd = crate::resp::command_names()
            .find(|c| c.as_bytes().eq_ignore_ascii_case(name))
            .unwrap_or(OTHER_METHOD);
        self.resp_commands.get_or_create(&[("cmd", cmd)]).inc();
    }

    /// A gRPC request to `path` was answered with `code`.
    fn request(&self, path: &str, code: tonic::Code) {
        let method = if self.methods.contains(path) {
            path.to_string()
        } else {
            OTHER_METHOD.to_string()
        };
        self.requests
            .get_or_create(&[("method", method), ("code", code_name(code).to_string())])
            .inc();
    }

    /// The Prometheus text of every metric now.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// The paths of every gRPC method a node's port serves: tern's services,
/// health and reflection (other paths count as [`OTHER_METHOD`], so a client
/// cannot make up label values).
fn known_methods() -> HashSet<String> {
    let sets: [&[u8]; 4] = [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut out = HashSet::new();
    for bytes in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(bytes) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    let full = if package.is_empty() {
                        service_name.clone()
                    } else {
                        format!("{package}.{service_name}")
                    };
                    out.insert(format!("/{full}/{}", method.name.unwrap_or_default()));
                }
            }
        }
    }
    out
}

/// The gRPC code's name as gRPC's own libraries print it (`OK`,
/// `InvalidArgument`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "Canceled",
        C::Unknown => "Unknown",
        C::InvalidArgument => "InvalidArgument",
        C::DeadlineExceeded => "DeadlineExceeded",
        C::NotFound => "NotFound",
        C::AlreadyExists => "AlreadyExists",
        C::PermissionDenied => "PermissionDenied",
        C::ResourceExhausted => "ResourceExhausted",
        C::FailedPrecondition => "FailedPrecondition",
        C::Aborted => "Aborted",
        C::OutOfRange => "OutOfRange",
        C::Unimplemented => "Unimplemented",
        C::Internal => "Internal",
        C::Unavailable => "Unavailable",
        C::DataLoss => "DataLoss",
        C::Unauthenticated => "Unauthenticated",
    }
}

/// Reads `Admin.Info` at scrape time.
#[derive(Debug)]
struct InfoCollector {
    source: Arc<SourceSlot>,
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// One gauge per slave, labelled `slave_id`.
fn per_slave<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    slaves: &[admin::SlaveInfo],
    value: impl Fn(&admin::SlaveInfo) -> V,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for s in slaves {
        let labels = [("slave_id", s.id.as_str())];
        m.encode_family(&labels)?.encode_gauge(&value(s))?;
    }
    Ok(())
}

/// A slave the master streams to (or is about to).
fn connected(s: &admin::SlaveInfo) -> bool {
    !matches!(s.state.as_str(), "disconnected" | "need_full_sync")
}

impl Collector for InfoCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let slot = self.source.0.read().unwrap_or_else(|p| p.into_inner());
        let Some(source) = slot.as_ref() else {
            return Ok(());
        };
        let info = source.info.info();
        let c = info.counters.unwrap_or_default();
        let e = &mut enc;
        let labels = [
            ("role", info.role.as_str()),
            ("repl_id", info.repl_id.as_str()),
            ("version", info.version.as_str()),
            ("fsync", info.fsync.as_str()),
        ];
        e.encode_descriptor(
            "instance",
            "The node: role (master or slave), replication history, version, fsync policy",
            None,
            MetricType::Info,
        )?
        .encode_info(&labels)?;
        gauge(
            e,
            "master_repl_offset",
            "Last event index in the binlog (a slave: in its relay log)",
            info.last_index,
        )?;
        gauge(
            e,
            "first_index",
            "First event index still in the binlog (0 when empty)",
            info.first_index,
        )?;
        gauge(
            e,
            "applied_index",
            "Last index applied to RocksDB",
            info.applied_index,
        )?;
        gauge(
            e,
            "durable_index",
            "Last index durable in the binlog under the fsync policy",
            info.durable_index,
        )?;
        gauge(
            e,
            "binlog_bytes",
            "Bytes of binlog (relay log) segments on disk",
            info.binlog_bytes,
        )?;
        gauge(
            e,
            "replayed_on_start",
            "Events replayed from the binlog at start-up (0 after a clean shutdown)",
            info.replayed_on_start,
        )?;
        gauge(
            e,
            "writable",
            "1 when the node takes writes (a master whose write path works)",
            u64::from(info.writable),
        )?;
        gauge(
            e,
            "pins",
            "Holders of the binlog against purging (slaves' sessions, snapshots)",
            info.pins.len() as u64,
        )?;
        gauge(
            e,
            "pinned_index",
            "Lowest index a pin holds (0 without pins)",
            info.pins.iter().map(|p| p.index).min().unwrap_or(0),
        )?;
        if let Some(conns) = &source.connections {
            gauge(
                e,
                "connected_clients",
                "Client connections open on the gRPC port",
                conns.open(),
            )?;
        }
        gauge(
            e,
            "connected_slaves",
            "Slaves streaming from this node (or waiting for their first ack)",
            info.slaves.iter().filter(|s| connected(s)).count() as u64,
        )?;
        gauge(
            e,
            "sync_sessions",
            "Replication Sync streams open",
            u64::from(info.sync_sessions),
        )?;
        gauge(
            e,
            "db_sync_streams",
            "Replication DbSync (full sync) streams open",
            u64::from(info.db_sync_streams),
        )?;
        per_slave(
            e,
            "connected_slave_lag_seconds",
            "Per slave: seconds since the master committed the first event the slave has not applied",
            &info.slaves,
            |s| s.lag_ms as f64 / 1000.0,
        )?;
        per_slave(
            e,
            "connected_slave_lag_events",
            "Per slave: events committed on this node the slave has not applied",
            &info.slaves,
            |s| s.lag_events,
        )?;
        per_slave(
            e,
            "connected_slave_received_index",
            "Per slave: last index durable in its relay log, as it acknowledged",
            &info.slaves,
            |s| s.received_index,
        )?;
        per_slave(
            e,
            "connected_slave_applied_index",
            "Per slave: last index it applied, as it acknowledged",
            &info.slaves,
            |s| s.applied_index,
        )?;
        if let Some(link) = &info.link {
            gauge(
                e,
                "master_link_up",
                "Slave: 1 while the link to the master is connected (streaming)",
                u64::from(link.state == "connected"),
            )?;
            gauge(
                e,
                "master_sync_in_progress",
                "Slave: 1 while a full sync (DbSync) is wanted or running",
                u64::from(link.state == "wait_db_sync"),
            )?;
            gauge(
                e,
                "slave_repl_offset",
                "Slave: last index received durably in the relay log",
                link.received_index,
            )?;
            let fs = info.full_sync.unwrap_or_default();
            gauge(
                e,
                "full_sync_size_bytes",
                "Slave: bytes of the full sync in progress (0 when none)",
                fs.bytes_total,
            )?;
            gauge(
                e,
                "full_sync_done_bytes",
                "Slave: bytes of the full sync in progress received so far",
                fs.bytes_done,
            )?;
            gauge(
                e,
                "read_floor",
                "Slave: reads wait until applied_index reaches this index",
                info.read_floor,
            )?;
            gauge(
                e,
                "reads_blocked",
                "Slave: 1 while reads are refused (applied_index below read_floor)",
                u64::from(!info.reads_blocked.is_empty()),
            )?;
            gauge(
                e,
                "verify_reads_stopped",
                "Slave: 1 while reads are stopped after a failed consistency check",
                u64::from(!info.verify_mismatch.is_empty()),
            )?;
        }
        gauge(
            e,
            "last_verify_index",
            "Index of the last consistency check point verified (0 if none yet)",
            info.last_verify_index,
        )?;
        counter(
            e,
            "replica_resyncs_full",
            "Full syncs (a master: DbSyncs served; a slave: full syncs it did)",
            c.full_syncs,
        )?;
        counter(
            e,
            "replica_partial_resync_accepted",
            "Partial resyncs (a master: TrySyncs accepted; a slave: sessions continued from its position)",
            c.partial_syncs,
        )?;
        counter(
            e,
            "duplicates_skipped",
            "Slave: replicated events at or below the applied index, skipped",
            c.duplicates_skipped,
        )?;
        counter(
            e,
            "stale_messages",
            "Replication messages of an older session, ignored",
            c.stale_messages,
        )?;
        counter(
            e,
            "transactions_committed",
            "Master: transactions committed",
            c.transactions_committed,
        )?;
        counter(
            e,
            "write_errors",
            "Master: failed binlog appends, binlog fsyncs and RocksDB writes of the write path",
            c.write_errors,
        )?;
        counter(
            e,
            "reads_refused",
            "Slave: reads refused because applied_index stayed below read_floor",
            c.reads_refused,
        )?;
        counter(
            e,
            "sessions_refused",
            "Sync and DbSync calls refused because sync.max_sessions or sync.max_db_syncs was reached",
            c.sessions_refused,
        )?;
        counter(
            e,
            "sessions_dropped",
            "Sync sessions ended because the slave went silent or stalled",
            c.sessions_dropped,
        )?;
        counter(
            e,
            "batches_from_memory",
            "Binlog batches sent from the in-memory tail",
            c.batches_from_memory,
        )?;
        counter(
            e,
            "batches_from_files",
            "Binlog batches read from segment files (a slave behind the in-memory tail)",
            c.batches_from_files,
        )?;
        counter(
            e,
            "verify_checks",
            "Consistency check points verified",
            c.verify_checks,
        )?;
        counter(
            e,
            "verify_mismatches",
            "Consistency check points whose digests did not match",
            c.verify_mismatches,
        )?;
        Ok(())
    }
}

/// Counts every gRPC request in [`Metrics`] `tern_requests_total{method,code}`
/// once it is answered: by the `grpc-status` of its response headers (an
/// error answered at once) or of its trailers; a response body dropped
/// before its trailers counts as `Canceled`.
#[derive(Clone)]
pub struct RequestsLayer {
    pub metrics: Option<Arc<Metrics>>,
}

impl<S> tower::Layer<S> for RequestsLayer {
    type Service = Requests<S>;

    fn layer(&self, inner: S) -> Requests<S> {
        Requests {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Requests<S> {
    inner: S,
    metrics: Option<Arc<Metrics>>,
}

fn header_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

impl<S> tower::Service<http::Request<Body>> for Requests<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let Some(metrics) = self.metrics.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let path = req.uri().path().to_string();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if let Some(code) = header_code(resp.headers()) {
                metrics.request(&path, code);
                return Ok(resp);
            }
            Ok(resp.map(|inner| {
                Body::new(CountedBody {
                    inner,
                    pending: Some((metrics, path)),
                })
            }))
        })
    }
}

/// A response body that counts its request when its trailers pass (or it
/// ends or is dropped without them).
struct CountedBody {
    inner: Body,
    pending: Option<(Arc<Metrics>, String)>,
}

impl CountedBody {
    fn count(&mut self, code: tonic::Code) {
        if let Some((metrics, path)) = self.pending.take() {
            metrics.request(&path, code);
        }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.count(tonic::Code::Cancelled);
    }
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(header_code) {
                    this.count(code);
                }
            }
            Poll::Ready(Some(Err(s))) => this.count(s.code()),
            // The body ended without a grpc-status: not a gRPC answer.
            Poll::Ready(None) => this.count(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Binds `server.metrics_listen` (when set) and serves `GET /metrics` there
/// until `shutdown`; the returned task ends then (open metrics connections
/// are cut).
pub fn start(
    cfg: &crate::config::ServerConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some((listener, addr)) = crate::server::bind_optional(
        "server.metrics_listen",
        cfg.metrics_listen.as_deref(),
        "the metrics endpoint",
    )?
    else {
        return Ok(None);
    };
    tracing::info!(metrics_listen = %addr, "Prometheus metrics at http://{addr}/metrics");
    Ok(Some(tokio::spawn(serve(listener, metrics, shutdown))))
}

/// Serves the metrics endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        while tasks.try_join_next().is_some() {}
        // Over the limit: the connection is closed unanswered.
        if tasks.len() >= MAX_CONNECTIONS {
            continue;
        }
        let metrics = metrics.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            // A timeout (CONNECTION_LIFETIME) drops the connection: it is closed.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
    drop(listener);
    tasks.shutdown().await;
}

fn answer(req: &http::Request<Incoming>, metrics: &Metrics) -> http::Response<Full<bytes::Bytes>> {
    let plain = |status: http::StatusCode, text: &'static str| {
        let mut r = http::Response::new(Full::new(bytes::Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(http::StatusCode::NOT_FOUND, "not found; try /metrics\n");
    }
    if !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
        let mut r = plain(http::StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
        r.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let mut r = http::Response::new(Full::new(bytes::Bytes::from(metrics.encode())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(admin::InfoResponse);

    impl InfoSource for Fixed {
        fn info(&self) -> admin::InfoResponse {
            self.0.clone()
        }
    }

    #[test]
    fn known_methods_hold_tern_health_and_reflection() {
        let m = known_methods();
        for p in [
            "/tern.kv.v1.Kv/Put",
            "/tern.admin.v1.Admin/Info",
            "/tern.replication.v1.Replication/Sync",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(m.contains(p), "{p} missing from {m:?}");
        }
        assert!(!m.contains("/tern.kv.v1.Kv/Nope"));
    }

    #[test]
    fn encodes_info_and_counters() {
        let m = Metrics::new();
        m.set_source(NodeSource {
            info: Arc::new(Fixed(admin::InfoResponse {
                role: "master".into(),
                last_index: 42,
                slaves: vec![
                    admin::SlaveInfo {
                        id: "s\"1\n".into(),
                        state: "streaming".into(),
                        lag_events: 7,
                        lag_ms: 1500,
                        ..Default::default()
                    },
                    admin::SlaveInfo {
                        id: "gone".into(),
                        state: "disconnected".into(),
                        ..Default::default()
                    },
                ],
                counters: Some(admin::Counters {
                    verify_mismatches: 3,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            connections: None,
        });
        m.partial_resync_denied("FULL_SYNC_REASON_UNKNOWN_REPL_ID");
        m.reconnect("link_lost");
        m.request("/tern.kv.v1.Kv/Put", tonic::Code::Ok);
        m.request("/made/up", tonic::Code::Unimplemented);
        m.fsync.observe(0.001);
        let text = m.encode();
        for line in [
            "tern_master_repl_offset 42\n",
            "tern_connected_slaves 1\n",
            "tern_connected_slave_lag_events{slave_id=\"s\\\"1\\n\"} 7\n",
            "tern_connected_slave_lag_seconds{slave_id=\"s\\\"1\\n\"} 1.5\n",
            "tern_verify_mismatches_total 3\n",
            "tern_replica_partial_resync_denied_total{reason=\"unknown_repl_id\"} 1\n",
            "tern_reconnects_total{reason=\"link_lost\"} 1\n",
            "tern_requests_total{method=\"/tern.kv.v1.Kv/Put\",code=\"OK\"} 1\n",
            "tern_requests_total{method=\"other\",code=\"Unimplemented\"} 1\n",
            "tern_fsync_duration_seconds_count 1\n",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        assert!(
            text.contains("tern_instance_info{role=\"master\""),
            "{text}"
        );
        // A master has no link.
        assert!(!text.contains("tern_master_link_up"), "{text}");
        m.clear_source();
        let text = m.encode();
        assert!(!text.contains("tern_master_repl_offset"), "{text}");
        assert!(text.contains("tern_reconnects_total{reason=\"link_lost\"} 1\n"));
    }
}
