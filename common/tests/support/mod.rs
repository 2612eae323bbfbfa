//! Helpers for the server tests (each test file is its own process).

#![allow(dead_code)]

use std::time::Duration;

use tern_common::config::{CommonArgs, Config, Role};
use tern_common::server::ServeOptions;

/// Polls `f` every 10 ms until it holds; panics after a generous bound.
pub async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..6000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// The default server options with these three changed.
pub fn serve_options(
    max_connections: usize,
    idle_timeout: Option<Duration>,
    shutdown_timeout: Duration,
) -> ServeOptions {
    let cfg = Config::load_from_env(
        Role::Master,
        &CommonArgs::default(),
        &[],
        Some(Default::default()),
    )
    .expect("default configuration");
    let mut opts = ServeOptions::from_config(&cfg.server);
    opts.max_connections = max_connections;
    opts.idle_timeout = idle_timeout;
    opts.shutdown_timeout = shutdown_timeout;
    opts
}

/// A server under test: `serve` with no services of its own (health and
/// reflection only) on a free 127.0.0.1 port.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub stats: std::sync::Arc<tern_common::server::ConnectionStats>,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn start(opts: ServeOptions) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = opts.connections.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(tern_common::server::serve(
        listener,
        tonic::service::Routes::builder().routes(),
        opts,
        shutdown.clone(),
    ));
    TestServer {
        addr,
        stats,
        shutdown,
        task,
    }
}

impl TestServer {
    /// Cancels the shutdown token and waits (bounded) for `serve` to return Ok.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}
