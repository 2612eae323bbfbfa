//! The one gRPC port of a node: its services plus server reflection (v1 and
//! v1alpha, so `grpcurl list` works without proto files) and the standard health
//! service, behind tower middleware (a node-wide concurrency limit and a request
//! timeout). Also the `tern.admin.v1.Admin` service, whose `Info` each role fills in.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::proto::admin::v1 as pb;
use crate::state::State;

/// Fills in `Admin.Info` for a node.
pub trait InfoSource: Send + Sync + 'static {
    fn info(&self) -> pb::InfoResponse;
}

pub struct AdminService {
    state: State,
    info: Arc<dyn InfoSource>,
}

impl AdminService {
    pub fn new(state: State, info: Arc<dyn InfoSource>) -> AdminService {
        AdminService { state, info }
    }

    pub fn into_server(self) -> pb::admin_server::AdminServer<AdminService> {
        pb::admin_server::AdminServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.info.info()))
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
}

pub struct ServeOptions {
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
}

/// Serves `routes` (plus reflection and health) on `listener` until `shutdown`
/// is cancelled, then waits for in-flight requests to finish.
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
    let routes = routes
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(health);
    let layer = tower::ServiceBuilder::new()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            opts.max_concurrent_requests,
        ))
        .into_inner();
    let shutdown_health = shutdown.clone();
    // Accepted sockets are ours, not tonic's: without TCP_NODELAY a response
    // written in two segments waits for the peer's delayed ACK (~40 ms).
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
        })
    });
    tonic::transport::Server::builder()
        .timeout(opts.request_timeout)
        .tcp_nodelay(true)
        .layer(layer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown_health.cancelled().await;
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
        .await?;
    Ok(())
}
