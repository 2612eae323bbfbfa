//! TLS over real processes, with certificates made at run time (rcgen):
//!
//! - a master with `server.tls_cert`, `server.tls_key` and
//!   `server.tls_client_ca` (mutual TLS), and a slave of its `https://` URL
//!   with `slave.tls_ca`, `slave.tls_cert`, `slave.tls_key`: the slave
//!   full-syncs, streams and ends with the master's Checksum;
//! - a slave whose certificate another CA signed never connects, and its
//!   `last_error` says why; so does a slave that does not trust the master's CA;
//! - a plaintext client, and a TLS client without a certificate, are refused
//!   by the TLS port, and write nothing;
//! - a key that does not match its certificate, a missing or non-PEM file,
//!   or slave TLS keys with an `http://` master stop the node at start with
//!   a configuration error naming the keys.
//!
//! Run `cargo build --bins` first.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use support::{DEADLINE, assert_slave_matches, wait_link_refused};
use tern_common::proto::kv::v1::{self as kv, kv_client::KvClient};
use tern_integration::node::{ClientAccess, channel, channel_with_tls};
use tern_integration::{Node, TestDir};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A certificate authority of the test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}.ca.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Ca { issuer, pem }
    }

    /// A certificate for `name` signed by this CA: (certificate, key) PEM files.
    fn issue(&self, dir: &Path, name: &str, usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let sans = match usage {
            ExtendedKeyUsagePurpose::ServerAuth => vec!["127.0.0.1".into(), "localhost".into()],
            _ => Vec::<String>::new(),
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// TLS trusting `ca`, presenting `identity` (certificate, key) when given.
fn client_tls(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    tls
}

/// Puts `key-<i>` = `value-<i>` for `i` in `from..to` in one Txn.
async fn put_keys(node: &Node, from: u32, to: u32) {
    let ops = (from..to)
        .map(|i| kv::Op {
            op: Some(kv::op::Op::Put(kv::PutRequest {
                key: format!("key-{i:04}").into_bytes().into(),
                value: format!("value-{i}").into_bytes().into(),
                ..Default::default()
            })),
        })
        .collect();
    node.authed_kv()
        .txn(kv::TxnRequest {
            ops,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|st| panic!("Txn of keys {from}..{to} over mutual TLS: {st:?}"));
}

/// Starts a slave of `url` trusting `ca` and presenting `identity`.
async fn start_tls_slave(
    dir: &TestDir,
    name: &str,
    url: &str,
    ca: &Path,
    identity: &(PathBuf, PathBuf),
) -> Node {
    let env = [
        ("TERN__SLAVE__TLS_CA", s(ca)),
        ("TERN__SLAVE__TLS_CERT", s(&identity.0)),
        ("TERN__SLAVE__TLS_KEY", s(&identity.1)),
    ];
    Node::start_slave(&dir.join(name), url, &env, &[])
        .await
        .unwrap_or_else(|e| panic!("starting slave {name}: {e:#}"))
}

async fn put_refused(what: &str, mut kv: KvClient<tonic::transport::Channel>) -> tonic::Status {
    let st = kv
        .put(kv::PutRequest {
            key: b"refused".to_vec().into(),
            value: b"x".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect_err(&format!("{what}: a Put was accepted"));
    eprintln!("{what}: {st:?}");
    // The TLS port's refusal reaches the client as a broken connection: which
    // of these codes depends on what of the refusal it read before the close
    // (a TLS alert read as HTTP/2, a closed connection).
    assert!(
        matches!(
            st.code(),
            Code::Unavailable | Code::Internal | Code::Unknown | Code::Cancelled
        ),
        "{what}: {st:?}"
    );
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slave_replicates_over_mutual_tls_and_strangers_are_refused() {
    let dir = TestDir::new("tls");
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = Ca::new(&pki, "tern-test");
    let other = Ca::new(&pki, "other");
    let server = ca.issue(&pki, "master", ExtendedKeyUsagePurpose::ServerAuth);
    let slave_id = ca.issue(&pki, "slave", ExtendedKeyUsagePurpose::ClientAuth);
    let harness_id = ca.issue(&pki, "harness", ExtendedKeyUsagePurpose::ClientAuth);
    let stranger_id = other.issue(&pki, "stranger", ExtendedKeyUsagePurpose::ClientAuth);

    let master = Node::start_ready_with_access(
        "tern-master",
        &dir.join("master"),
        &[],
        &[
            ("TERN__SERVER__TLS_CERT", s(&server.0)),
            ("TERN__SERVER__TLS_KEY", s(&server.1)),
            ("TERN__SERVER__TLS_CLIENT_CA", s(&ca.pem)),
        ],
        ClientAccess {
            token: None,
            tls: Some(client_tls(&ca.pem, Some(&harness_id))),
        },
    )
    .await
    .unwrap();
    let url = master.url();
    assert!(url.starts_with("https://"), "{url}");
    put_keys(&master, 0, 200).await;

    let slave = start_tls_slave(&dir, "slave", &url, &ca.pem, &slave_id).await;
    put_keys(&master, 200, 300).await;
    let mc = assert_slave_matches(&master, &slave, 1).await;
    assert_eq!(mc.keys, 300);

    // A slave whose certificate another CA signed: the master refuses it.
    let stranger = start_tls_slave(&dir, "stranger", &url, &ca.pem, &stranger_id).await;
    wait_link_refused(&stranger, &["unknownca"]).await;
    // A slave that does not trust the master's CA refuses the master.
    let distrustful = start_tls_slave(&dir, "distrustful", &url, &other.pem, &slave_id).await;
    wait_link_refused(&distrustful, &["unknownissuer"]).await;

    // Plaintext to the TLS port, and TLS without a client certificate.
    let plain_url = url.replacen("https://", "http://", 1);
    put_refused(
        "plaintext client",
        KvClient::new(channel(&plain_url, Duration::from_secs(5))),
    )
    .await;
    put_refused(
        "TLS client without a certificate",
        KvClient::new(channel_with_tls(
            &url,
            Duration::from_secs(5),
            Some(&client_tls(&ca.pem, None)),
        )),
    )
    .await;
    put_refused(
        "TLS client with a certificate of another CA",
        KvClient::new(channel_with_tls(
            &url,
            Duration::from_secs(5),
            Some(&client_tls(&ca.pem, Some(&stranger_id))),
        )),
    )
    .await;

    // Nothing refused was written; only the trusted slave is known.
    put_keys(&master, 300, 301).await;
    assert_eq!(assert_slave_matches(&master, &slave, 1).await.keys, 301);
    let mi = master.info().await.unwrap();
    assert_eq!(mi.slaves.len(), 1, "{:?}", mi.slaves);
}

/// Waits (bounded) for `node` to exit; returns its log.
async fn exited_log(node: &mut Node) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(st) = node.try_wait().unwrap() {
            return (st, node.log_tail(20));
        }
        assert!(
            Instant::now() < deadline,
            "the node did not exit: {}",
            node.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_are_configuration_errors() {
    let dir = TestDir::new("tls-config");
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = Ca::new(&pki, "tern-test");
    let (cert, key) = ca.issue(&pki, "master", ExtendedKeyUsagePurpose::ServerAuth);
    let (_, other_key) = ca.issue(&pki, "other", ExtendedKeyUsagePurpose::ServerAuth);
    let missing = pki.join("missing.pem");

    // (what, environment, words the error must have); a case with
    // TERN__SLAVE__MASTER runs a slave, the others a master.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a [&'a str]);
    let cases: [Case; 5] = [
        (
            "a key that does not match the certificate",
            vec![
                ("TERN__SERVER__TLS_CERT", s(&cert)),
                ("TERN__SERVER__TLS_KEY", s(&other_key)),
            ],
            &["server.tls_key", "KeyMismatch"],
        ),
        (
            "a missing client CA file",
            vec![
                ("TERN__SERVER__TLS_CERT", s(&cert)),
                ("TERN__SERVER__TLS_KEY", s(&key)),
                ("TERN__SERVER__TLS_CLIENT_CA", s(&missing)),
            ],
            &["server.tls_client_ca", "missing.pem"],
        ),
        (
            "a key file that holds a certificate",
            vec![
                ("TERN__SERVER__TLS_CERT", s(&cert)),
                ("TERN__SERVER__TLS_KEY", s(&cert)),
            ],
            &["server.tls_key", "no PEM private key"],
        ),
        (
            "a slave key that does not match its certificate",
            vec![
                ("TERN__SLAVE__MASTER", "https://127.0.0.1:9"),
                ("TERN__SLAVE__TLS_CA", s(&ca.pem)),
                ("TERN__SLAVE__TLS_CERT", s(&cert)),
                ("TERN__SLAVE__TLS_KEY", s(&other_key)),
            ],
            &["slave.tls_cert", "KeyMismatch"],
        ),
        (
            "slave TLS keys with an http:// master",
            vec![
                ("TERN__SLAVE__MASTER", "http://127.0.0.1:9"),
                ("TERN__SLAVE__TLS_CA", s(&ca.pem)),
            ],
            &["slave.tls_ca", "not an https:// URL"],
        ),
    ];
    for (n, (what, env, words)) in cases.iter().enumerate() {
        let bin = if env.iter().any(|(k, _)| *k == "TERN__SLAVE__MASTER") {
            "tern-slave"
        } else {
            "tern-master"
        };
        let mut node = Node::start(bin, &dir.join(format!("n{n}")), &[], env).unwrap();
        let (st, log) = exited_log(&mut node).await;
        assert!(!st.success(), "{what}: {bin} started: {log}");
        for w in *words {
            assert!(
                log.contains(w),
                "{what}: the error should mention {w:?}:\n{log}"
            );
        }
    }
}
