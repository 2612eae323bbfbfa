//! Sharding tern behind twemproxy (Debian's `nutcracker`), over real
//! processes: two tern masters, each with one slave, RESP on everywhere;
//! nutcracker with the configuration of README's "Sharding" section
//! (`redis: true`, `hash: fnv1a_64`, `distribution: ketama`, the two masters
//! as named servers, `auto_eject_hosts: false`).
//!
//! Written through the proxy: `redis-benchmark -t set,incr -r 1000` (random
//! keys), 200 keys by `redis-cli` (SETs and one MSET the proxy splits by
//! shard) and 600 keys and 20 counters by redis-py (`tests/resp/clients.py
//! proxy`, which also reads them back through the proxy). Then, through each
//! node's gRPC and RESP ports: every key lives on exactly one master; each
//! slave has exactly its master's keys and Checksum (and the same keys over
//! RESP); the union over both masters is exactly what was written (known
//! keys with their values, redis-benchmark's keys by their shape, and its
//! counters summing to the number of INCRs it sent); both shards got keys.
//! A second nutcracker pool with the same server names listing the slaves
//! reads every key back from the right slave and refuses writes (READONLY).
//! Every check is on data.

#[path = "support/resp.rs"]
mod resp;
mod support;

use std::collections::{BTreeMap, BTreeSet};

use resp::{
    RespNode, Twemproxy, benchmark, binary_value, cli, cli_output, cli_output_with, expect,
    out_text, run_python,
};
use support::{converge, scan_all};
use tern_integration::TestDir;
use tern_integration::node::ClientAccess;

/// redis-benchmark's requests of each command (SET and INCR).
const BENCH_N: u64 = 4000;
/// Keys from the Python client.
const PY_KEYS: u32 = 600;
/// Keys from redis-cli.
const CLI_KEYS: u32 = 200;

struct Shard {
    name: &'static str,
    master: RespNode,
    slave: RespNode,
}

async fn start_shard(dir: &TestDir, name: &'static str) -> Shard {
    let master =
        resp::start_master(dir, &format!("{name}-master"), &[], ClientAccess::default()).await;
    let slave = resp::start_slave(
        dir,
        &format!("{name}-slave"),
        &master.node,
        &[],
        ClientAccess::default(),
    )
    .await;
    Shard {
        name,
        master,
        slave,
    }
}

/// Is `k` a key redis-benchmark writes with `-r`: `<prefix><12 digits>`?
fn bench_key(k: &[u8], prefix: &str) -> bool {
    k.strip_prefix(prefix.as_bytes())
        .is_some_and(|d| d.len() == 12 && d.iter().all(u8::is_ascii_digit))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twemproxy_shards_over_two_masters() {
    let dir = TestDir::new("resp-twemproxy");
    let shards = vec![
        start_shard(&dir, "shard-a").await,
        start_shard(&dir, "shard-b").await,
    ];
    let servers: Vec<(&str, String)> = shards
        .iter()
        .map(|s| (s.name, s.master.resp_addr()))
        .collect();
    let proxy = Twemproxy::start(&dir, &servers).await;
    eprintln!("nutcracker configuration:\n{}", proxy.config);
    let p = proxy.port;

    // Writes through the proxy.
    let n = BENCH_N.to_string();
    benchmark(
        p,
        &[
            "-t", "set,incr", "-n", &n, "-r", "1000", "-P", "16", "-c", "20", "-d", "32", "-q",
        ],
    );
    let mut want: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for i in 0..CLI_KEYS / 2 {
        let (k, v) = (format!("shard:cli:{i:03}"), format!("cli-{i}"));
        expect(p, &["SET", &k, &v], "OK");
        want.insert(k.into_bytes(), v.into_bytes());
    }
    let mut mset = vec!["MSET".to_string()];
    for i in CLI_KEYS / 2..CLI_KEYS {
        let (k, v) = (format!("shard:cli:{i:03}"), format!("cli-{i}"));
        mset.extend([k.clone(), v.clone()]);
        want.insert(k.into_bytes(), v.into_bytes());
    }
    let mset: Vec<&str> = mset.iter().map(String::as_str).collect();
    expect(p, &mset, "OK");
    run_python(
        "redis-py through twemproxy",
        "clients.py",
        &[
            "proxy".into(),
            "--port".into(),
            p.to_string(),
            "--n".into(),
            PY_KEYS.to_string(),
        ],
    );
    for i in 0..PY_KEYS {
        want.insert(format!("shard:py:{i:04}").into_bytes(), binary_value(i));
    }
    let half = PY_KEYS / 2;
    for c in 0..20u32 {
        let sum: u32 = (0..half).filter(|i| i % 20 == c).sum();
        want.insert(
            format!("shard:py:ctr:{c:02}").into_bytes(),
            sum.to_string().into_bytes(),
        );
    }
    // Reads through the proxy find what redis-cli wrote.
    expect(p, &["GET", "shard:cli:000"], "\"cli-0\"");
    expect(p, &["GET", "shard:cli:199"], "\"cli-199\"");

    // Each pair converged, with equal Checksums; each node's keys by gRPC.
    let mut owner: BTreeMap<Vec<u8>, &str> = BTreeMap::new();
    let mut union: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for s in &shards {
        let at = converge(&s.master.node, &[&s.slave.node]).await;
        let mc = s
            .master
            .node
            .checksum()
            .await
            .expect("Checksum on a master");
        let sc = s.slave.node.checksum().await.expect("Checksum on a slave");
        assert_eq!(mc, sc, "{}: the slave's Checksum differs at {at}", s.name);
        let (mkeys, _) = scan_all(&mut s.master.node.kv()).await;
        let (skeys, _) = scan_all(&mut s.slave.node.kv()).await;
        assert_eq!(
            mkeys, skeys,
            "{}: the slave's keys and values differ from its master's",
            s.name
        );
        assert!(!mkeys.is_empty(), "{}: no key was sharded here", s.name);
        // The same keys over RESP, on the master and on the slave.
        for node in [&s.master, &s.slave] {
            let over_resp: BTreeSet<String> =
                resp::scan_keys(node.resp, None, 500).into_iter().collect();
            let over_grpc: BTreeSet<String> = mkeys
                .iter()
                .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                .collect();
            assert_eq!(
                over_resp, over_grpc,
                "{} {}: SCAN over RESP",
                s.name, node.node.role
            );
            expect(
                node.resp,
                &["DBSIZE"],
                &format!("(integer) {}", mkeys.len()),
            );
        }
        eprintln!("{}: {} keys at index {at}", s.name, mkeys.len());
        for (k, v) in mkeys {
            if let Some(other) = owner.insert(k.to_vec(), s.name) {
                panic!(
                    "key {:?} lives on {other} and on {}",
                    String::from_utf8_lossy(&k),
                    s.name
                );
            }
            union.insert(k.to_vec(), v.to_vec());
        }
    }

    // The union is exactly what was written.
    let mut counters = 0u64;
    let mut bench_keys = 0;
    for (k, v) in &union {
        if let Some(w) = want.get(k) {
            assert_eq!(v, w, "{:?}", String::from_utf8_lossy(k));
        } else if bench_key(k, "key:") {
            assert_eq!(v.len(), 32, "{:?}", String::from_utf8_lossy(k));
            bench_keys += 1;
        } else if bench_key(k, "counter:") {
            counters += std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("counter {:?} = {v:?}", String::from_utf8_lossy(k)));
            bench_keys += 1;
        } else {
            panic!("a key nobody wrote: {:?}", String::from_utf8_lossy(k));
        }
    }
    let missing: Vec<String> = want
        .keys()
        .filter(|k| !union.contains_key(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert!(missing.is_empty(), "written but on no master: {missing:?}");
    assert_eq!(
        counters, BENCH_N,
        "redis-benchmark's INCRs summed over every counter on both masters"
    );
    assert!(bench_keys > 0, "no redis-benchmark key on either master");

    // The proxy reads every known key back from the shard that holds it.
    let script: String = want
        .keys()
        .filter(|k| k.starts_with(b"shard:cli:"))
        .map(|k| format!("GET {}\n", String::from_utf8_lossy(k)))
        .collect();
    let out = cli_output(p, &[], Some(script.as_bytes()));
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let wanted: Vec<String> = (0..CLI_KEYS).map(|i| format!("\"cli-{i}\"")).collect();
    assert_eq!(got, wanted, "GETs through the proxy");

    // A second pool with the same names, listing the slaves: each key goes
    // to the slave of the master that owns it, and writes are refused.
    let slave_servers: Vec<(&str, String)> = shards
        .iter()
        .map(|s| (s.name, s.slave.resp_addr()))
        .collect();
    let reads = Twemproxy::start(&dir, &slave_servers).await;
    let out = cli_output(reads.port, &[], Some(script.as_bytes()));
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(got, wanted, "GETs through the pool of slaves");
    run_python(
        "redis-py reads through the pool of slaves",
        "clients.py",
        &[
            "proxy-read".into(),
            "--port".into(),
            reads.port.to_string(),
            "--n".into(),
            PY_KEYS.to_string(),
        ],
    );
    expect(
        reads.port,
        &["SET", "shard:cli:000", "no"],
        "(error) READONLY You can't write against a read only replica.",
    );
    eprintln!(
        "{} keys over {} shards: {}",
        union.len(),
        shards.len(),
        shards
            .iter()
            .map(|s| format!(
                "{} {}",
                s.name,
                owner.values().filter(|o| **o == s.name).count()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// nutcracker's `redis_auth` in front of a master with `auth.token`: the
/// proxy authenticates to tern with the token and asks its own clients for
/// the same one (answering AUTH itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twemproxy_with_redis_auth() {
    const TOKEN: &str = "proxy-token-8c2f41";
    let dir = TestDir::new("resp-twemproxy-auth");
    let access = ClientAccess {
        token: Some(tern_common::config::Secret::new(TOKEN.to_string()).expect("a valid token")),
        tls: None,
    };
    let master = resp::start_master(&dir, "master", &[("TERN__AUTH__TOKEN", TOKEN)], access).await;
    let proxy =
        Twemproxy::start_with_auth(&dir, &[("shard-a", master.resp_addr())], Some(TOKEN)).await;
    let p = proxy.port;
    let noauth = cli(p, &["SET", "k", "v"]);
    assert!(noauth.contains("NOAUTH"), "SET without AUTH: {noauth}");
    let out = cli_output_with(
        p,
        &["--no-auth-warning", "-a", "wrong"],
        &["GET", "k"],
        None,
    );
    assert!(
        out_text(&out).contains("NOAUTH") || out_text(&out).contains("invalid password"),
        "a wrong token: {}",
        out_text(&out)
    );
    let with_token = |args: &[&str]| {
        let out = cli_output_with(p, &["--no-auth-warning", "-a", TOKEN], args, None);
        out_text(&out).trim_end().to_string()
    };
    assert_eq!(with_token(&["SET", "k", "through the proxy"]), "OK");
    assert_eq!(with_token(&["INCRBY", "n", "7"]), "(integer) 7");
    assert_eq!(with_token(&["GET", "k"]), "\"through the proxy\"");
    // On tern itself (its own token), not only through the proxy.
    let out = cli_output_with(
        master.resp,
        &["--no-auth-warning", "-a", TOKEN],
        &["MGET", "k", "n"],
        None,
    );
    assert_eq!(
        out_text(&out).trim_end(),
        "1) \"through the proxy\"\n2) \"7\""
    );
    expect(
        master.resp,
        &["GET", "k"],
        "(error) NOAUTH Authentication required.",
    );
}
