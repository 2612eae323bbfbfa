//! The RESP front at the protocol level, with a raw TCP client (the
//! real-client tests with redis-cli, redis-benchmark and redis-py are in
//! `resp_clients.rs`):
//!
//! - a pipeline of writes and reads sent in one packet is answered in order,
//!   each read seeing the writes before it (read-your-writes), and the writes
//!   reach the slave (gRPC `Get`);
//! - SET NX/XX that do not apply, and reads inside MULTI, log nothing (the
//!   master's last index does not move); MULTI/EXEC is one transaction (one
//!   commit index for all its writes) whose reads see its own writes;
//! - a malformed frame is answered `-ERR Protocol error` and the connection
//!   closed, and the node keeps serving; an oversized bulk length is refused
//!   before anything is buffered;
//! - with `auth.token`, commands are `-NOAUTH` until `AUTH`, a wrong token is
//!   `-WRONGPASS` and counted in `auth_failures`;
//! - a SIGTERM with a RESP client connected stops the master cleanly.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{FAST_LINK, converge};
use tern_common::proto::kv::v1 as kv;
use tern_integration::{Node, TestDir, pick_port};

/// A blocking RESP client that sends raw bytes and reads raw replies.
struct Raw(TcpStream);

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the RESP port");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw(s)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// Sends commands (words split on spaces) as one packet.
    fn pipeline(&mut self, cmds: &[&str]) {
        let mut wire = Vec::new();
        for c in cmds {
            let words: Vec<&str> = c.split(' ').collect();
            wire.extend_from_slice(format!("*{}\r\n", words.len()).as_bytes());
            for w in words {
                wire.extend_from_slice(format!("${}\r\n{w}\r\n", w.len()).as_bytes());
            }
        }
        self.send(&wire);
    }

    /// Reads until `n` complete top-level replies arrived; returns the text.
    fn replies(&mut self, n: usize) -> Vec<String> {
        let mut buf = Vec::new();
        loop {
            let mut out = Vec::new();
            let mut at = 0;
            while out.len() < n {
                match reply_end(&buf, at) {
                    Some(end) => {
                        out.push(String::from_utf8_lossy(&buf[at..end]).into_owned());
                        at = end;
                    }
                    None => break,
                }
            }
            if out.len() == n {
                return out;
            }
            let mut chunk = [0u8; 4096];
            let r = self.0.read(&mut chunk).expect("reading replies");
            assert!(r > 0, "connection closed after {out:?}");
            buf.extend_from_slice(&chunk[..r]);
        }
    }

    fn cmd(&mut self, c: &str) -> String {
        self.pipeline(&[c]);
        self.replies(1).remove(0)
    }

    /// Whether the server closed the connection (reads EOF).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.0.read(&mut b), Ok(0))
    }
}

/// End of the RESP2 reply starting at `at`, if complete.
fn reply_end(buf: &[u8], at: usize) -> Option<usize> {
    let line_end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    let head: i64 = std::str::from_utf8(&buf[at + 1..line_end])
        .ok()?
        .parse()
        .unwrap_or(0);
    match buf[at] {
        b'+' | b'-' | b':' => Some(line_end + 2),
        b'$' if head < 0 => Some(line_end + 2),
        b'$' => {
            let end = line_end + 2 + head as usize + 2;
            (buf.len() >= end).then_some(end)
        }
        b'*' => {
            let mut pos = line_end + 2;
            for _ in 0..head.max(0) {
                pos = reply_end(buf, pos)?;
            }
            Some(pos)
        }
        _ => None,
    }
}

fn resp_env(port: u16) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = FAST_LINK
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.push((
        "TERN__SERVER__RESP_LISTEN".into(),
        format!("127.0.0.1:{port}"),
    ));
    v
}

fn refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_transactions_and_bad_frames() {
    let dir = TestDir::new("resp-front");
    let (mp, sp) = (pick_port(), pick_port());
    let menv = resp_env(mp);
    let mut master = Node::start_master(&dir.join("master"), &refs(&menv), &[])
        .await
        .unwrap();
    let senv = resp_env(sp);
    let slave = Node::start_slave(&dir.join("slave"), &master.url(), &refs(&senv), &[])
        .await
        .unwrap();

    let mut c = Raw::connect(mp);
    // One packet: writes and reads interleaved, answered in order, each read
    // after the writes before it.
    c.pipeline(&[
        "SET k 1",
        "GET k",
        "INCR k",
        "INCRBY k 40",
        "GET k",
        "APPEND s ab",
        "APPEND s cd",
        "STRLEN s",
        "MSET a 1 b 2",
        "MGET a b nope",
        "DEL a nope",
        "EXISTS a b",
    ]);
    assert_eq!(
        c.replies(12),
        vec![
            "+OK\r\n",
            "$1\r\n1\r\n",
            ":2\r\n",
            ":42\r\n",
            "$2\r\n42\r\n",
            ":2\r\n",
            ":4\r\n",
            ":4\r\n",
            "+OK\r\n",
            "*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n",
            ":1\r\n",
            ":1\r\n",
        ]
    );

    // Conditional sets that do not apply log nothing.
    let before = master.info().await.unwrap().last_index;
    assert_eq!(c.cmd("SET k 9 NX"), "$-1\r\n");
    assert_eq!(c.cmd("SET nokey 9 XX"), "$-1\r\n");
    assert_eq!(master.info().await.unwrap().last_index, before);
    assert_eq!(c.cmd("SET k 43 XX GET"), "$2\r\n42\r\n");

    // MULTI/EXEC: one transaction whose reads see its own writes.
    c.pipeline(&["MULTI", "INCR t", "GET t", "SET u x", "GET u", "EXEC"]);
    assert_eq!(
        c.replies(6),
        vec![
            "+OK\r\n",
            "+QUEUED\r\n",
            "+QUEUED\r\n",
            "+QUEUED\r\n",
            "+QUEUED\r\n",
            "*4\r\n:1\r\n$1\r\n1\r\n+OK\r\n$1\r\nx\r\n",
        ]
    );
    let after = master.info().await.unwrap().last_index;
    // Begin, two Puts, Commit: one transaction of 4 events.
    assert_eq!(
        after,
        before + 3 + 4,
        "SET XX GET (3 events), then the EXEC (4)"
    );
    // A refused command aborts the EXEC; reads only inside MULTI log nothing.
    c.pipeline(&["MULTI", "SET x", "EXEC", "MULTI", "GET t", "EXEC"]);
    let r = c.replies(6);
    assert!(r[1].starts_with("-ERR wrong number of arguments"), "{r:?}");
    assert!(r[2].starts_with("-EXECABORT"), "{r:?}");
    assert_eq!(r[5], "*1\r\n$1\r\n1\r\n");
    assert_eq!(master.info().await.unwrap().last_index, after);
    assert!(c.cmd("SET k v EX 10").contains("no TTLs"));
    assert!(c.cmd("WATCH k").starts_with("-ERR WATCH is not supported"));

    // The slave has the writes; RESP writes there are refused.
    converge(&master, &[&slave]).await;
    let got = slave
        .kv()
        .get(kv::GetRequest {
            key: "u".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, "x");
    let mut sc = Raw::connect(sp);
    assert_eq!(
        sc.cmd("SET u y"),
        "-READONLY You can't write against a read only replica.\r\n"
    );
    assert_eq!(sc.cmd("GET t"), "$1\r\n1\r\n");

    // A malformed frame: an error, then the connection closes.
    let mut bad = Raw::connect(mp);
    bad.send(b"*1\r\n*1\r\n$4\r\nPING\r\n");
    let r = bad.replies(1);
    assert!(r[0].starts_with("-ERR Protocol error"), "{r:?}");
    assert!(bad.closed());
    // A huge bulk length is refused at once, nothing buffered.
    let mut huge = Raw::connect(mp);
    huge.send(b"*2\r\n$3\r\nSET\r\n$999999999999\r\n");
    assert!(huge.replies(1)[0].starts_with("-ERR Protocol error: invalid bulk length"));
    assert!(huge.closed());
    assert_eq!(c.cmd("PING"), "+PONG\r\n");

    // A clean stop with a RESP client connected.
    let st = master.sigterm_and_wait().await.unwrap();
    assert!(st.success(), "{st:?}");
    assert!(c.closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_token_guards_resp() {
    let dir = TestDir::new("resp-auth");
    let port = pick_port();
    let mut env = resp_env(port);
    env.push(("TERN__AUTH__TOKEN".into(), "s3cret-token".into()));
    let master = Node::start_ready_with_access(
        "tern-master",
        &dir.join("master"),
        &[],
        &refs(&env),
        tern_integration::node::ClientAccess {
            token: Some(tern_common::config::Secret::new("s3cret-token".into()).unwrap()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut c = Raw::connect(port);
    assert_eq!(c.cmd("GET k"), "-NOAUTH Authentication required.\r\n");
    assert_eq!(c.cmd("PING"), "-NOAUTH Authentication required.\r\n");
    assert!(c.cmd("AUTH wrong").starts_with("-WRONGPASS"));
    assert!(c.cmd("AUTH someone s3cret-token").starts_with("-WRONGPASS"));
    assert_eq!(c.cmd("AUTH default s3cret-token"), "+OK\r\n");
    assert_eq!(c.cmd("SET k v"), "+OK\r\n");
    let mut c2 = Raw::connect(port);
    assert_eq!(c2.cmd("AUTH s3cret-token"), "+OK\r\n");
    assert_eq!(c2.cmd("GET k"), "$1\r\nv\r\n");
    let failures = master
        .authed_admin()
        .info(tern_common::proto::admin::v1::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .counters
        .unwrap_or_default()
        .auth_failures;
    assert_eq!(failures, 2);
}
