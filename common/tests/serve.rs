//! The gRPC server's connection limit, idle timeout and shutdown, in process.

mod support;

use std::time::Duration;

use support::{eventually, serve_options, start};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Three idle clients, two slots: two are accepted, the third waits in the
/// backlog; idle ones are closed (end-of-file), which lets the third in, and
/// it is closed in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_and_idle_timeout() {
    let server = start(serve_options(
        2,
        Some(Duration::from_millis(300)),
        Duration::from_secs(5),
    ))
    .await;
    let (addr, stats) = (server.addr, server.stats.clone());
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually("two connections accepted", || stats.accepted() >= 2).await;
    eventually("the accept loop waiting for a slot", || {
        stats.limited() >= 1
    })
    .await;
    let mut max_open = 0;
    for c in &mut clients {
        // The server's SETTINGS, then end-of-file once it closed the idle connection.
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut buf));
        read.await.expect("closed by the server").unwrap();
        max_open = max_open.max(stats.open());
    }
    assert!(max_open <= 2, "{max_open} connections open with 2 slots");
    eventually("every connection closed", || stats.open() == 0).await;
    assert_eq!(stats.accepted(), 3);
    assert_eq!(stats.idle_closed(), 3);
    assert_eq!(stats.aborted(), 0);
    server.stop().await;
}

/// A health `Watch` stream (it never ends by itself) ends with UNAVAILABLE
/// on shutdown, so the server stops without cutting any connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_waiting_streams_without_the_hard_stop() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let server = start(serve_options(16, None, Duration::from_secs(600))).await;
    let stats = server.stats.clone();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(ch)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    server.shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match watch.message().await {
                Ok(Some(m)) => assert_eq!(m.status(), ServingStatus::NotServing),
                Ok(None) => panic!("the Watch stream ended without a status"),
                Err(s) => return s,
            }
        }
    })
    .await
    .expect("the Watch stream ends on shutdown");
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    server.stop().await;
    assert_eq!(stats.aborted(), 0);
    assert_eq!(stats.accepted(), 1);
}
