//! tern's RESP front (`server.resp_listen`) driven by real Redis clients over
//! real processes: a `tern-master` and a `tern-slave`, each with RESP on.
//!
//! - `redis_cli_round_trips`: every command of the RESP front through
//!   `redis-cli`, with the exact reply redis-cli prints; commands on one
//!   connection (CLIENT SETNAME/GETNAME, MULTI/EXEC/DISCARD) and
//!   binary-safe values through its stdin; `redis-cli --pipe`; READONLY,
//!   INFO and ROLE on the slave; the slave converges to the master's Checksum.
//! - `redis_benchmark_writes_are_all_there`: `redis-benchmark -t
//!   set,get,incr,mset -n 2000 -P 16`, then the data: the INCR counter is
//!   exactly 2000, the keys and value sizes are what it wrote, and the slave's
//!   Checksum equals the master's.
//! - `python_redis_client`: `tests/resp/clients.py` (redis-py): every
//!   command, a pipeline, MULTI/EXEC seen all-or-nothing by a concurrent
//!   reader, binary keys and values, SCAN with MATCH/COUNT, INFO/ROLE parsed
//!   by redis-py, WAIT, READONLY; RESP writes read back through gRPC `Get` on
//!   the slave (with the master's index as `min_index`) and gRPC `Put`s read
//!   back through RESP on the slave.
//! - `resp_auth_token`: with `auth.token` set, NOAUTH before AUTH, WRONGPASS
//!   for a wrong token, `AUTH <token>`, `AUTH default <token>` and `HELLO 2
//!   AUTH default <token>` accepted, on the master and the slave.
//!
//! The tools come from Debian's `redis-tools` and `python3-redis`
//! (`scripts/setup.sh`). Every assertion is on data (replies, values,
//! counts, Checksums), never on timing.

#[path = "support/resp.rs"]
mod resp;
mod support;

use resp::{
    RespNode, benchmark, binary_value, cli, cli_output, cli_output_with, expect, info, info_field,
    int_reply, out_text, run_python, scan_keys,
};
use support::converge;
use tern_common::proto::kv::v1 as kv;
use tern_integration::TestDir;
use tern_integration::node::ClientAccess;

/// A master and its slave, both with RESP on; the slave streams from the
/// master (INFO's `slave0` is `state=online`).
async fn pair(dir: &TestDir, env: &[(&str, &str)], access: ClientAccess) -> (RespNode, RespNode) {
    let master = resp::start_master(dir, "master", env, access.clone()).await;
    let slave = resp::start_slave(dir, "slave", &master.node, env, access).await;
    support::wait_until("the slave to connect", support::DEADLINE, || async {
        let i = master.node.info().await.map_err(|e| format!("{e:#}"))?;
        let streaming = i
            .slaves
            .iter()
            .filter(|s| s.session_id != 0 && s.state == "streaming")
            .count();
        Ok((i.slaves.len() == 1 && streaming == 1).then_some(()))
    })
    .await;
    (master, slave)
}

/// Converges, then asserts equal Checksums on the master and the slave.
async fn assert_same_data(master: &RespNode, slave: &RespNode) -> u64 {
    let at = converge(&master.node, &[&slave.node]).await;
    let mc = master
        .node
        .checksum()
        .await
        .expect("Checksum on the master");
    let sc = slave.node.checksum().await.expect("Checksum on the slave");
    assert_eq!(
        mc, sc,
        "the slave's Checksum differs from the master's at {at}"
    );
    at
}

/// The items of a flat array as redis-cli --no-raw prints it (`1) "a"`).
fn array_items(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            let l = l.trim_start();
            match l.split_once(") ") {
                Some((n, rest)) if n.chars().all(|c| c.is_ascii_digit()) => rest.to_string(),
                _ => l.to_string(),
            }
        })
        .collect()
}

/// The field after `name` in a flat array of field/value pairs.
fn pair_value(items: &[String], name: &str) -> String {
    let quoted = format!("\"{name}\"");
    let at = items
        .iter()
        .position(|i| *i == quoted)
        .unwrap_or_else(|| panic!("no field {name} in {items:?}"));
    items
        .get(at + 1)
        .cloned()
        .unwrap_or_else(|| panic!("no value after {name} in {items:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_round_trips() {
    let dir = TestDir::new("resp-cli");
    let (master, slave) = pair(&dir, &[], ClientAccess::default()).await;
    let m = master.resp;
    let s = slave.resp;

    // Connection commands.
    expect(m, &["PING"], "PONG");
    expect(m, &["PING", "hello there"], "\"hello there\"");
    expect(m, &["ECHO", "a b"], "\"a b\"");
    expect(m, &["SELECT", "0"], "OK");
    expect(m, &["SELECT", "1"], "(error) ERR DB index is out of range");
    let hello = array_items(&cli(m, &["HELLO", "2"]));
    assert_eq!(pair_value(&hello, "proto"), "(integer) 2", "{hello:?}");
    assert_eq!(pair_value(&hello, "role"), "\"master\"", "{hello:?}");
    assert!(
        int_reply(&cli(m, &["COMMAND", "COUNT"])) > 0,
        "COMMAND COUNT"
    );
    expect(
        m,
        &["NOSUCH", "a", "b"],
        "(error) ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b'",
    );

    // Strings.
    expect(m, &["GET", "k"], "(nil)");
    expect(m, &["SET", "k", "v1"], "OK");
    expect(m, &["GET", "k"], "\"v1\"");
    expect(m, &["SET", "k", "v2", "NX"], "(nil)");
    expect(m, &["SET", "nx", "n", "NX"], "OK");
    expect(m, &["SET", "k", "v3", "XX"], "OK");
    expect(m, &["SET", "xx", "x", "XX"], "(nil)");
    expect(m, &["GET", "xx"], "(nil)");
    for ttl in [
        &["EX", "10"][..],
        &["PX", "10000"],
        &["EXAT", "4102444800"],
        &["PXAT", "4102444800000"],
        &["KEEPTTL"],
    ] {
        let mut args = vec!["SET", "k", "ttl"];
        args.extend_from_slice(ttl);
        let got = cli(m, &args);
        assert!(
            got.starts_with("(error) ERR") && got.contains("TTL"),
            "SET with {ttl:?}: {got}"
        );
    }
    expect(m, &["GET", "k"], "\"v3\"");
    expect(m, &["SET", "d1", "1"], "OK");
    expect(m, &["SET", "d2", "2"], "OK");
    expect(m, &["EXISTS", "d1", "d1", "d2", "nope"], "(integer) 3");
    expect(m, &["DEL", "d1", "d2", "nope"], "(integer) 2");
    expect(m, &["EXISTS", "d1", "d2"], "(integer) 0");
    expect(m, &["MSET", "m1", "a", "m2", "", "m3", "c"], "OK");
    expect(
        m,
        &["MGET", "m1", "nope", "m2", "m3"],
        "1) \"a\"\n2) (nil)\n3) \"\"\n4) \"c\"",
    );
    expect(
        m,
        &["MSET", "m1"],
        "(error) ERR wrong number of arguments for 'mset' command",
    );
    expect(m, &["INCR", "n"], "(integer) 1");
    expect(m, &["INCRBY", "n", "41"], "(integer) 42");
    expect(m, &["DECR", "n"], "(integer) 41");
    expect(m, &["DECRBY", "n", "50"], "(integer) -9");
    expect(m, &["GET", "n"], "\"-9\"");
    expect(
        m,
        &["INCR", "k"],
        "(error) ERR value is not an integer or out of range",
    );
    expect(m, &["APPEND", "ap", "ab"], "(integer) 2");
    expect(m, &["APPEND", "ap", "cde"], "(integer) 5");
    expect(m, &["STRLEN", "ap"], "(integer) 5");
    expect(m, &["STRLEN", "nope"], "(integer) 0");
    expect(m, &["GET", "ap"], "\"abcde\"");

    // One connection: CLIENT names, MULTI/EXEC/DISCARD, a MULTI aborted by a
    // command refused while queueing, binary-safe values (redis-cli's "\x00"
    // escapes).
    let script = "CLIENT SETNAME cli-test\n\
                  CLIENT GETNAME\n\
                  MULTI\n\
                  SET t1 x\n\
                  INCRBY t2 5\n\
                  APPEND t1 y\n\
                  GET t1\n\
                  EXEC\n\
                  MULTI\n\
                  SET t1 discarded\n\
                  DISCARD\n\
                  MULTI\n\
                  SET t1 aborted\n\
                  SET t1\n\
                  EXEC\n\
                  GET t1\n\
                  SET bin \"a\\x00b\\r\\n\\xff\"\n\
                  GET bin\n\
                  STRLEN bin\n";
    let out = cli_output(m, &[], Some(script.as_bytes()));
    assert!(out.status.success(), "{}", out_text(&out));
    let got = String::from_utf8_lossy(&out.stdout);
    let want = "OK\n\
                \"cli-test\"\n\
                OK\n\
                QUEUED\n\
                QUEUED\n\
                QUEUED\n\
                QUEUED\n\
                1) OK\n\
                2) (integer) 5\n\
                3) (integer) 2\n\
                4) \"xy\"\n\
                OK\n\
                QUEUED\n\
                OK\n\
                OK\n\
                QUEUED\n\
                (error) ERR wrong number of arguments for 'set' command\n\
                (error) EXECABORT Transaction discarded because of previous errors.\n\
                \"xy\"\n\
                OK\n\
                \"a\\x00b\\r\\n\\xff\"\n\
                (integer) 6\n";
    let got_lines: Vec<&str> = got.lines().map(str::trim_end).collect();
    let want_lines: Vec<&str> = want.lines().collect();
    assert_eq!(got_lines, want_lines, "one connection through stdin");
    expect(m, &["QUIT"], "OK");
    let watch = cli(m, &["WATCH", "t1"]);
    assert!(
        watch.starts_with("(error) ERR") && watch.to_lowercase().contains("not supported"),
        "WATCH: {watch}"
    );

    // Pipelining: 2,000 commands in RESP through `redis-cli --pipe`.
    let mut proto = Vec::new();
    let mut sum = 0u64;
    for i in 0..1000u64 {
        let key = format!("pipe:{i:04}");
        let val = format!("value-{i}");
        proto.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{val}\r\n",
                key.len(),
                val.len()
            )
            .as_bytes(),
        );
        let d = i.to_string();
        proto.extend_from_slice(
            format!(
                "*3\r\n$6\r\nINCRBY\r\n$12\r\npipe:counter\r\n${}\r\n{d}\r\n",
                d.len()
            )
            .as_bytes(),
        );
        sum += i;
    }
    let out = cli_output_with(m, &["--pipe"], &[], Some(&proto));
    let text = out_text(&out);
    assert!(out.status.success(), "redis-cli --pipe: {text}");
    assert!(
        text.contains("errors: 0, replies: 2000"),
        "redis-cli --pipe: {text}"
    );
    expect(m, &["GET", "pipe:counter"], &format!("\"{sum}\""));
    expect(m, &["GET", "pipe:0999"], "\"value-999\"");
    // Many commands in one stdin, answered in order.
    let mut script = String::new();
    let mut want = Vec::new();
    for i in 0..300 {
        script.push_str(&format!("INCR stdin:counter\nGET pipe:{i:04}\n"));
        want.push(format!("(integer) {}", i + 1));
        want.push(format!("\"value-{i}\""));
    }
    let out = cli_output(m, &[], Some(script.as_bytes()));
    assert!(out.status.success(), "{}", out_text(&out));
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect();
    assert_eq!(got, want, "300 INCR/GET pairs through one stdin");

    // SCAN with MATCH and COUNT, DBSIZE, INFO keyspace.
    let all_pipe: Vec<String> = (0..1000).map(|i| format!("pipe:{i:04}")).collect();
    for count in [1, 10, 1000] {
        assert_eq!(
            scan_keys(m, Some("pipe:0*"), count),
            all_pipe,
            "SCAN MATCH pipe:0* COUNT {count}"
        );
    }
    let everything = scan_keys(m, None, 100);
    let want_keys = [
        "ap",
        "bin",
        "k",
        "m1",
        "m2",
        "m3",
        "n",
        "nx",
        "pipe:counter",
        "stdin:counter",
        "t1",
        "t2",
    ];
    let mut want_all: Vec<String> = want_keys.iter().map(|s| s.to_string()).collect();
    want_all.extend(all_pipe.iter().cloned());
    want_all.sort();
    assert_eq!(everything, want_all, "SCAN of every key");
    expect(m, &["DBSIZE"], &format!("(integer) {}", want_all.len()));
    let mi = info(m, None);
    assert!(
        info_field(&mi, "db0").starts_with(&format!("keys={},", want_all.len())),
        "INFO keyspace: {mi:?}"
    );

    // Replication: WAIT, INFO and ROLE on both sides, READONLY on the slave.
    expect(m, &["WAIT", "1", "0"], "(integer) 1");
    assert_same_data(&master, &slave).await;
    let mi = info(m, Some("replication"));
    assert_eq!(info_field(&mi, "role"), "master");
    assert_eq!(info_field(&mi, "connected_slaves"), "1");
    let last = master.node.info().await.expect("Info").last_index;
    assert_eq!(info_field(&mi, "master_repl_offset"), last.to_string());
    // The master learns what its slave holds from its acknowledgements.
    let s0 = support::wait_until(
        "slave0's offset to reach the last index",
        support::DEADLINE,
        || async {
            let mi = info(m, Some("replication"));
            let s0 = info_field(&mi, "slave0").to_string();
            if s0.contains(&format!(",offset={last},")) {
                Ok(Some(s0))
            } else {
                Err(format!("slave0:{s0} (last index {last})"))
            }
        },
    )
    .await;
    assert!(
        s0.starts_with("ip=127.0.0.1,port=")
            && s0.contains(",state=online,")
            && s0.contains(",lag="),
        "slave0: {s0}"
    );
    let role = array_items(&cli(m, &["ROLE"]));
    assert_eq!(role[0], "\"master\"", "{role:?}");
    assert_eq!(role[1], format!("(integer) {last}"), "{role:?}");
    assert!(role[2].contains("\"127.0.0.1\""), "{role:?}");
    let si = info(s, Some("replication"));
    assert_eq!(info_field(&si, "role"), "slave");
    assert_eq!(info_field(&si, "master_link_status"), "up");
    assert_eq!(info_field(&si, "master_sync_in_progress"), "0");
    let role = array_items(&cli(s, &["ROLE"]));
    assert_eq!(role[0], "\"slave\"", "{role:?}");
    assert_eq!(role[1], "\"127.0.0.1\"", "{role:?}");
    assert!(role[2].starts_with("(integer) "), "{role:?}");
    assert_eq!(role[3], "\"connected\"", "{role:?}");
    assert_eq!(role[4], format!("(integer) {last}"), "{role:?}");
    let readonly = "(error) READONLY You can't write against a read only replica.";
    for w in [
        &["SET", "k", "no"][..],
        &["DEL", "k"],
        &["INCR", "n"],
        &["INCRBY", "n", "2"],
        &["DECR", "n"],
        &["DECRBY", "n", "2"],
        &["APPEND", "k", "no"],
        &["MSET", "k", "no"],
    ] {
        expect(s, w, readonly);
    }
    expect(s, &["GET", "k"], "\"v3\"");
    expect(s, &["GET", "n"], "\"-9\"");
    expect(s, &["GET", "bin"], "\"a\\x00b\\r\\n\\xff\"");
    expect(s, &["DBSIZE"], &format!("(integer) {}", want_all.len()));
    assert_eq!(scan_keys(s, None, 1000), want_all, "SCAN on the slave");
    // The refused writes changed nothing.
    assert_same_data(&master, &slave).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_writes_are_all_there() {
    let dir = TestDir::new("resp-bench");
    let (master, slave) = pair(&dir, &[], ClientAccess::default()).await;
    let m = master.resp;
    // Without -r every request uses the same keys: `key:__rand_int__` (SET,
    // GET, MSET of 10 pairs) and `counter:__rand_int__` (INCR), so the
    // counter counts every INCR that was applied.
    let out = benchmark(
        m,
        &["-t", "set,get,incr,mset", "-n", "2000", "-P", "16", "-q"],
    );
    eprintln!("{out}");
    expect(m, &["GET", "counter:__rand_int__"], "\"2000\"");
    expect(m, &["STRLEN", "key:__rand_int__"], "(integer) 3");
    expect(m, &["DBSIZE"], "(integer) 2");
    // With -r: random keys `key:<12 digits>` out of 1000, 64-byte values.
    benchmark(
        m,
        &[
            "-t", "set", "-n", "3000", "-P", "16", "-r", "1000", "-d", "64", "-c", "20", "-q",
        ],
    );
    let keys = scan_keys(m, Some("key:0*"), 500);
    assert!(
        !keys.is_empty() && keys.len() <= 1000,
        "{} random keys",
        keys.len()
    );
    for k in &keys {
        let digits = &k["key:".len()..];
        assert!(
            digits.len() == 12 && digits.chars().all(|c| c.is_ascii_digit()),
            "{k}"
        );
        expect(m, &["STRLEN", k], "(integer) 64");
    }
    expect(m, &["DBSIZE"], &format!("(integer) {}", keys.len() + 2));
    assert_same_data(&master, &slave).await;
    let s = slave.resp;
    expect(s, &["GET", "counter:__rand_int__"], "\"2000\"");
    expect(s, &["DBSIZE"], &format!("(integer) {}", keys.len() + 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_redis_client() {
    let dir = TestDir::new("resp-python");
    let (master, slave) = pair(&dir, &[], ClientAccess::default()).await;
    let mp = master.resp.to_string();
    let sp = slave.resp.to_string();
    let py = |phase: &str, port: &str, extra: &[&str]| {
        let mut args = vec![phase.to_string(), "--port".into(), port.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        run_python(phase, "clients.py", &args)
    };
    py("commands", &mp, &[]);
    // The slave has what the master acknowledged once it converged.
    converge(&master.node, &[&slave.node]).await;
    py("slave", &sp, &[]);
    py("pipeline", &mp, &["--n", "500"]);
    py("atomicity", &mp, &["--n", "200"]);
    py("binary", &mp, &["--n", "100"]);
    py("scan", &mp, &["--n", "400"]);

    // RESP writes, read through gRPC Get on the slave at the master's index.
    let last = master.node.info().await.expect("Info").last_index;
    let mut skv = slave.node.kv();
    for i in 0..100u32 {
        let key = format!("resp:py:{i:03}");
        let r = skv
            .get(kv::GetRequest {
                key: key.clone().into_bytes().into(),
                min_index: last,
                wait_ms: 30_000,
            })
            .await
            .unwrap_or_else(|e| panic!("gRPC Get {key} on the slave: {e}"))
            .into_inner();
        assert!(r.found, "{key} is not on the slave at index {last}");
        assert_eq!(r.value.as_ref(), binary_value(i).as_slice(), "{key}");
    }
    // gRPC Puts on the master, read through RESP on the slave.
    let mut mkv = master.node.kv();
    for i in 0..50u32 {
        mkv.put(kv::PutRequest {
            key: format!("grpc:{i:03}").into_bytes().into(),
            value: binary_value(i).into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("gRPC Put grpc:{i:03}: {e}"));
    }
    py("grpc-readback", &sp, &["--n", "50"]);
    assert_same_data(&master, &slave).await;
}

const TOKEN: &str = "resp-client-token-5d1e";
const REPL_TOKEN: &str = "resp-repl-token-0b7c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_auth_token() {
    let dir = TestDir::new("resp-auth");
    let env = [
        ("TERN__AUTH__TOKEN", TOKEN),
        ("TERN__AUTH__REPLICATION_TOKEN", REPL_TOKEN),
        ("TERN__SLAVE__MASTER_TOKEN", REPL_TOKEN),
    ];
    let access = ClientAccess {
        token: Some(tern_common::config::Secret::new(TOKEN.to_string()).expect("a valid token")),
        tls: None,
    };
    let (master, slave) = pair(&dir, &env, access).await;
    for n in [&master, &slave] {
        let p = n.resp;
        expect(p, &["GET", "k"], "(error) NOAUTH Authentication required.");
        expect(p, &["PING"], "(error) NOAUTH Authentication required.");
        expect(
            p,
            &["AUTH", "wrong"],
            "(error) WRONGPASS invalid username-password pair or user is disabled.",
        );
        let out = cli_output_with(p, &["--no-auth-warning", "-a", TOKEN], &["PING"], None);
        assert_eq!(out_text(&out).trim_end(), "PONG", "redis-cli -a on {p}");
        let out = cli_output(
            p,
            &[],
            Some(format!("AUTH default {TOKEN}\nDBSIZE\n").as_bytes()),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim_end(),
            "OK\n(integer) 0",
            "AUTH default then DBSIZE on {p}"
        );
    }
    let mp = master.resp.to_string();
    let sp = slave.resp.to_string();
    run_python(
        "auth on the master",
        "clients.py",
        &[
            "auth".into(),
            "--port".into(),
            mp,
            "--token".into(),
            TOKEN.into(),
        ],
    );
    run_python(
        "auth on the slave",
        "clients.py",
        &[
            "auth".into(),
            "--port".into(),
            sp,
            "--token".into(),
            TOKEN.into(),
            "--writable".into(),
            "0".into(),
        ],
    );
    assert_same_data(&master, &slave).await;
    let out = cli_output_with(
        slave.resp,
        &["--no-auth-warning", "-a", TOKEN],
        &["GET", "py:auth:n"],
        None,
    );
    assert_eq!(out_text(&out).trim_end(), "\"1\"");
}
