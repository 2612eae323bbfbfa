//! The one gRPC port of a node: its services plus server reflection (v1 and
//! v1alpha, so `grpcurl list` works without proto files) and the standard health
//! service, behind tower middleware (a concurrency budget per service, see
//! [`budgets`], and a request timeout). Also the `tern.admin.v1.Admin` service,
//! whose `Info` each role fills in.
//!
//! Resources ([`connections`], [`fd_limit`]): at most `server.max_connections`
//! connections (lowered to what the open-file limit leaves room for), idle ones
//! closed after `server.idle_timeout_ms`, HTTP/2 and TCP keepalives, accept
//! errors backed off. Shutdown is bounded: on the shutdown token the server
//! stops accepting and shuts every connection down gracefully (streams observe
//! the same token and end); after `server.shutdown_timeout_ms` every connection
//! still open is cut, whatever its clients do, and [`serve`] returns.
//!
//! Security ([`auth`], [`tls`]): bearer tokens checked by one layer in front
//! of every service, and TLS (optionally mutual) on the port.

/// A boxed future: the tower services of this module (auth, budgets, connection
/// tracking) and a queued write ([`crate::kv::PendingWrite`]).
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
/// A boxed gRPC response stream.
pub type BoxStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

pub mod arenas;
pub mod auth;
pub mod budgets;
pub mod connections;
pub mod fd_limit;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::config::{Config, ConfigError, ServerConfig};
use crate::proto::admin::v1 as pb;
use crate::state::State;

pub use connections::ConnectionStats;
pub use fd_limit::{ConnectionBudget, connection_budget, fd_limit, raise_fd_limit};

/// HTTP/2 PING on a connection silent this long; no answer within
/// [`HTTP2_KEEPALIVE_TIMEOUT`] closes it (a peer that vanished without a FIN).
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP keepalive probes start after this much silence.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// After the hard stop cut every connection, how long [`serve`] still waits
/// for their tasks to notice before it returns anyway.
const HARD_STOP_MARGIN: Duration = Duration::from_secs(2);

/// Fills in `Admin.Info` for a node.
pub trait InfoSource: Send + Sync + 'static {
    fn info(&self) -> pb::InfoResponse;
}

/// The Admin calls that act on a node: `Wait` (a master) and `SetMaster` (a
/// slave). A node answers FAILED_PRECONDITION for the one its role does not
/// have.
#[tonic::async_trait]
pub trait AdminControl: Send + Sync + 'static {
    async fn wait(&self, _req: pb::WaitRequest) -> Result<pb::WaitResponse, Status> {
        Err(Status::failed_precondition(
            "Wait: this node is a slave; wait on the master",
        ))
    }

    async fn set_master(
        &self,
        _req: pb::SetMasterRequest,
    ) -> Result<pb::SetMasterResponse, Status> {
        Err(Status::failed_precondition(
            "SetMaster: this node is a master; stop it and start tern-slave on its data directory to make it a slave",
        ))
    }
}

/// A node without Wait and SetMaster.
struct NoControl;

impl AdminControl for NoControl {}

pub struct AdminService {
    state: State,
    info: Arc<dyn InfoSource>,
    control: Arc<dyn AdminControl>,
    connections: Option<Arc<ConnectionStats>>,
    auth: Option<auth::Auth>,
}

impl AdminService {
    pub fn new(state: State, info: Arc<dyn InfoSource>) -> AdminService {
        AdminService {
            state,
            info,
            control: Arc::new(NoControl),
            connections: None,
            auth: None,
        }
    }

    /// `Info.counters.auth_failures` is read from `auth` (that of the server it runs in).
    pub fn with_auth(mut self, auth: auth::Auth) -> AdminService {
        self.auth = Some(auth);
        self
    }

    /// `Wait` and `SetMaster` go to `control`.
    pub fn with_control(mut self, control: Arc<dyn AdminControl>) -> AdminService {
        self.control = control;
        self
    }

    /// `Info.connections` is read from `stats` (those of the server it runs in).
    pub fn with_connections(mut self, stats: Arc<ConnectionStats>) -> AdminService {
        self.connections = Some(stats);
        self
    }

    pub fn into_server(self) -> pb::admin_server::AdminServer<AdminService> {
        pb::admin_server::AdminServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let mut info = self.info.info();
        if let Some(r) = req.extensions().get::<Arc<budgets::RequestStats>>() {
            info.requests_in_flight = u32::try_from(r.in_flight()).unwrap_or(u32::MAX);
            info.counters.get_or_insert_default().requests_shed = r.shed();
        }
        if let Some(c) = &self.connections {
            info.connections = u32::try_from(c.open()).unwrap_or(u32::MAX);
        }
        if let Some(a) = &self.auth {
            info.counters.get_or_insert_default().auth_failures = a.failures();
        }
        Ok(Response::new(info))
    }

    async fn checksum(
        &self,
        _: Request<pb::ChecksumRequest>,
    ) -> Result<Response<pb::ChecksumResponse>, Status> {
        let state = self.state.clone();
        let c = tokio::task::spawn_blocking(move || state.checksum())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ChecksumResponse {
            index: c.index,
            digest: c.digest,
            keys: c.keys,
        }))
    }

    async fn wait(
        &self,
        req: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::WaitResponse>, Status> {
        self.control.wait(req.into_inner()).await.map(Response::new)
    }

    async fn set_master(
        &self,
        req: Request<pb::SetMasterRequest>,
    ) -> Result<Response<pb::SetMasterResponse>, Status> {
        self.control
            .set_master(req.into_inner())
            .await
            .map(Response::new)
    }
}

pub struct ServeOptions {
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// `server.max_connections`; [`serve`] lowers it to the [`connection_budget`].
    pub max_connections: usize,
    /// `None`: idle connections stay open.
    pub idle_timeout: Option<Duration>,
    /// How long after the shutdown token connections may still run.
    pub shutdown_timeout: Duration,
    /// The server's connection counters (share them with [`AdminService::with_connections`]).
    pub connections: Arc<ConnectionStats>,
    /// When set, health of service "" and [`KV_SERVICE`] follows it (`false`:
    /// NOT_SERVING, e.g. a master whose write path cannot write).
    pub serving: Option<tokio::sync::watch::Receiver<bool>>,
    /// Bearer tokens required (share it with [`AdminService::with_auth`]).
    pub auth: auth::Auth,
    /// TLS of the port (`None`: plaintext).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Where requests are counted (`tern_requests_total`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl ServeOptions {
    pub fn from_config(c: &ServerConfig) -> ServeOptions {
        ServeOptions {
            request_timeout: Duration::from_millis(c.request_timeout_ms),
            max_concurrent_requests: c.max_concurrent_requests,
            max_connections: c.max_connections,
            idle_timeout: c.idle_timeout(),
            shutdown_timeout: c.shutdown_timeout(),
            connections: Arc::new(ConnectionStats::default()),
            serving: None,
            auth: auth::Auth::open(),
            tls: None,
            metrics: None,
        }
    }

    /// Applies `[auth]` and the TLS keys of `[server]` (TLS files are read now).
    pub fn secure(&mut self, cfg: &Config) -> Result<(), ConfigError> {
        self.auth = auth::Auth::from_config(&cfg.auth);
        self.tls = tls::server_tls(&cfg.server)?;
        Ok(())
    }
}

/// Pending connections the kernel queues on the listen socket (capped by
/// `net.core.somaxconn`): clients beyond `server.max_connections` wait here.
/// The standard library's 128 would make a burst of clients retry their SYNs.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the gRPC port (with `SO_REUSEADDR`, as the standard library does)
/// with a [`LISTEN_BACKLOG`] queue.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds the listener of an optional `HOST:PORT` config key (`key`, e.g.
/// `server.resp_listen`) that serves `what`: `None` when the key is unset;
/// errors name the key or `what`.
pub fn bind_optional(
    key: &str,
    addr: Option<&str>,
    what: &str,
) -> anyhow::Result<Option<(TcpListener, std::net::SocketAddr)>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("{key} {addr:?}: {e}"))?;
    let listener = bind(addr).map_err(|e| anyhow::anyhow!("binding {what} on {addr}: {e}"))?;
    Ok(Some((listener, addr)))
}

/// The connection budget under the current open-file limit, logged.
fn budget(configured: usize) -> ConnectionBudget {
    match fd_limit() {
        Ok(limit) => {
            let b = connection_budget(limit, configured);
            if b.max_connections < configured {
                tracing::warn!(
                    fd_limit = b.fd_limit,
                    reserved_fds = b.reserved,
                    max_connections = b.max_connections,
                    configured,
                    "server.max_connections lowered to what the open-file limit leaves room for"
                );
            } else {
                tracing::info!(
                    fd_limit = b.fd_limit,
                    reserved_fds = b.reserved,
                    max_connections = b.max_connections,
                    "connection limit"
                );
            }
            b
        }
        Err(e) => {
            tracing::warn!(error = %e, configured, "cannot read the open-file limit; using server.max_connections as is");
            ConnectionBudget {
                fd_limit: 0,
                reserved: 0,
                max_connections: configured,
            }
        }
    }
}

/// Serves `routes` (plus reflection and health) on `listener` until `shutdown`
/// is cancelled; then stops accepting, lets requests and streams finish for at
/// most `opts.shutdown_timeout`, cuts whatever connection is still open, and
/// returns.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    opts: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    if let Some(serving) = opts.serving.clone() {
        tokio::spawn(report_serving(
            health_reporter.clone(),
            serving,
            shutdown.clone(),
        ));
    }
    let routes = routes
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(health);
    if let Ok(addr) = listener.local_addr() {
        opts.auth.log_at_start(addr, opts.tls.is_some());
        tracing::info!(
            %addr,
            tls = opts.tls.is_some(),
            "gRPC port TLS (server.tls_cert)"
        );
    }
    let layer = tower::ServiceBuilder::new()
        // Outermost: counts what the client gets (after the remapping below).
        .layer(crate::metrics::RequestsLayer {
            metrics: opts.metrics.clone(),
        })
        // Requests tonic cannot decode: RESOURCE_EXHAUSTED / INVALID_ARGUMENT
        // on every service (see crate::status).
        .layer(tower::util::MapResponseLayer::new(
            crate::status::remap_decode_failures,
        ))
        .layer(connections::TrackStreamsLayer {
            shutdown: shutdown.clone(),
        })
        .layer(auth::AuthLayer {
            auth: opts.auth.clone(),
        })
        .layer(budgets::BudgetsLayer::new(opts.max_concurrent_requests))
        .into_inner();
    let stats = opts.connections.clone();
    // Cancelled `shutdown_timeout` after `shutdown`: every connection's I/O fails.
    let hard_stop = CancellationToken::new();
    let (incoming, acceptor) = connections::spawn_acceptor(
        TcpIncoming::from(listener),
        connections::AcceptOptions {
            max_connections: budget(opts.max_connections).max_connections,
            idle_timeout: opts.idle_timeout,
            tcp_keepalive: TCP_KEEPALIVE,
            stats: stats.clone(),
            shutdown: shutdown.clone(),
            stop: hard_stop.clone(),
        },
    );
    let watchdog = tokio::spawn(stop_after_timeout(
        shutdown.clone(),
        opts.shutdown_timeout,
        hard_stop.clone(),
        stats.clone(),
    ));
    let shutdown_health = shutdown.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = opts.tls.clone() {
        builder = builder
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("server TLS: {}", tls::error_chain(&e)))?;
    }
    let server = builder
        .timeout(opts.request_timeout)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(budgets::MAX_CONCURRENT_STREAMS)
        .layer(layer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown_health.cancelled().await;
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        });
    let result = tokio::select! {
        r = server => r.map_err(anyhow::Error::from),
        _ = async {
            hard_stop.cancelled().await;
            tokio::time::sleep(HARD_STOP_MARGIN).await;
        } => {
            tracing::warn!(open = stats.open(), "connections still open after the hard stop; not waiting for them");
            Ok(())
        }
    };
    watchdog.abort();
    acceptor.abort();
    let _ = acceptor.await;
    tracing::info!(
        accepted = stats.accepted(),
        limited = stats.limited(),
        idle_closed = stats.idle_closed(),
        aborted = stats.aborted(),
        accept_errors = stats.accept_errors(),
        "server stopped"
    );
    result
}

/// Waits for `shutdown`, then `timeout`, then cancels `hard_stop`.
async fn stop_after_timeout(
    shutdown: CancellationToken,
    timeout: Duration,
    hard_stop: CancellationToken,
    stats: Arc<ConnectionStats>,
) {
    shutdown.cancelled().await;
    tokio::time::sleep(timeout).await;
    tracing::warn!(
        open = stats.open(),
        timeout_ms = timeout.as_millis() as u64,
        "shutdown: connections still open after server.shutdown_timeout_ms; closing them"
    );
    hard_stop.cancel();
}

/// The gRPC name of the Kv service, as health checks name it.
pub const KV_SERVICE: &str = "tern.kv.v1.Kv";

/// Keeps the health of "" and [`KV_SERVICE`] equal to `serving` until shutdown,
/// then reports [`KV_SERVICE`] NOT_SERVING ("" is the shutdown's own).
async fn report_serving(
    reporter: tonic_health::server::HealthReporter,
    mut serving: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    loop {
        let status = if *serving.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if shutdown.is_cancelled() {
            break;
        }
        for service in ["", KV_SERVICE] {
            reporter.set_service_status(service, status).await;
        }
        tokio::select! {
            changed = serving.changed() => if changed.is_err() { break },
            _ = shutdown.cancelled() => break,
        }
    }
    reporter
        .set_service_status(KV_SERVICE, ServingStatus::NotServing)
        .await;
}
