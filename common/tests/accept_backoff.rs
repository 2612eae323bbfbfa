//! Accept failures back off and recover. With every file descriptor of the
//! process taken, a client in the listen backlog cannot be accepted
//! (`EMFILE`): the accept loop retries after a growing delay instead of
//! spinning, and accepts and serves the client once descriptors are free.
//!
//! A test binary of its own: it exhausts this process's descriptors on purpose.

mod support;

use std::time::Duration;

use support::{eventually, serve_options, start};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

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
    let server = start(serve_options(4096, None, Duration::from_secs(10))).await;
    let (addr, stats) = (server.addr, server.stats.clone());
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
    server.stop().await;
    // Both were idle: closed at shutdown, none had to be cut.
    assert_eq!((stats.idle_closed(), stats.aborted()), (2, 0));
}
