//! Accept failures back off and recover. With every file descriptor of the
//! process taken, a client in the listen backlog cannot be accepted
//! (`EMFILE`): the accept loop retries after a growing delay instead of
//! spinning, and accepts and serves the client once descriptors are free.
//!
//! A test binary of its own: it exhausts this process's descriptors on purpose.

use std::sync::Arc;
use std::time::Duration;

use tern_common::config::{CommonArgs, Config, Role};
use tern_common::server::{ConnectionStats, ServeOptions, serve};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Polls `f` until it holds; panics after a generous bound.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..6000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// Reads the first HTTP/2 frame header the server sends and checks it is SETTINGS.
async fn expect_settings(client: &mut TcpStream) {
    let mut header = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(60), client.read_exact(&mut header))
        .await
        .expect("the server speaks first")
        .unwrap();
    assert_eq!(header[3], 0x4, "first frame is SETTINGS: {header:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_emfile_backs_off_and_recovers() {
    let cfg = Config::load_from_env(
        Role::Master,
        &CommonArgs::default(),
        &[],
        Some(Default::default()),
    )
    .unwrap();
    let mut opts = ServeOptions::from_config(&cfg.server);
    opts.idle_timeout = None;
    let stats: Arc<ConnectionStats> = opts.connections.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        tonic::service::Routes::builder().routes(),
        opts,
        shutdown.clone(),
    ));
    let mut first = TcpStream::connect(addr).await.unwrap();
    expect_settings(&mut first).await;
    assert_eq!(stats.accepted(), 1);

    // Every descriptor but one taken; the client's socket takes that one.
    let mut filler = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
    drop(filler.pop());
    let mut second = TcpStream::connect(addr).await.unwrap();
    eventually("accepts failing with EMFILE, retried", || {
        stats.accept_errors() >= 3
    })
    .await;
    assert_eq!(stats.accepted(), 1, "nothing accepted without a descriptor");

    drop(filler);
    eventually("the waiting client accepted", || stats.accepted() == 2).await;
    expect_settings(&mut second).await;
    assert_eq!(stats.open(), 2);
    shutdown.cancel();
    server.await.unwrap().unwrap();
    // Both were idle: closed at shutdown, none had to be cut.
    assert_eq!((stats.idle_closed(), stats.aborted()), (2, 0));
}
