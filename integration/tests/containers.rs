//! Containers (issue 13): `docker/compose.yaml` brought up in a real
//! container engine (podman and podman-compose, as root), replication checked
//! across containers.
//!
//! `scripts/containers.sh prepare` installs what is missing (podman,
//! podman-compose, debootstrap, runc, netavark, aardvark-dns, slirp4netns),
//! writes the containers.conf podman needs here (runc, cgroupfs, explicit
//! ulimits), makes the base image `debian:bookworm-slim` locally with
//! debootstrap when it does not exist (no image registry is reachable), and
//! builds the `prebuilt` target of `docker/Dockerfile` from the binaries this
//! test runs with. Then, with tokens on every port, a short link timeout and
//! the ports published on free 127.0.0.1 ports:
//!
//! - writes on the master are read on both slaves (gRPC with `min_index`, and
//!   RESP);
//! - a slave container stopped (SIGTERM: a clean shutdown) and started again
//!   replays nothing and reads what was written meanwhile;
//! - a slave's network is disconnected (a real partition: nothing passes, no
//!   RST), the master sees its session time out, more is written, the network
//!   is connected again and the slave reads what was written meanwhile;
//! - the three Checksums are equal, nothing was applied twice.
//!
//! The compose project is always taken down (`podman-compose down -v`), with
//! the containers' logs printed when the test fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tern_common::config::Secret;
use tern_common::proto::admin::v1::{self as admin, admin_client::AdminClient};
use tern_common::proto::kv::v1::{self as kv, kv_client::KvClient};
use tern_common::server::auth::BearerInterceptor;
use tern_integration::node::{AuthedChannel, channel};
use tern_integration::{bin_path, pick_port};
use tonic::service::interceptor::InterceptedService;

/// `sync.link_timeout_ms` of every node in the test.
const LINK_TIMEOUT_MS: u64 = 3000;
/// How long a state may take to appear (containers starting, a session timing
/// out, a slave catching up). Only bounds a wait; nothing asserts on timing.
const WAIT: Duration = Duration::from_secs(90);
const IMAGE: &str = "localhost/tern:containers-test";
const SERVICES: [&str; 3] = ["tern-master", "tern-slave-1", "tern-slave-2"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

fn containers_dir() -> PathBuf {
    match std::env::var_os("TERN_CONTAINERS_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/tern-containers"),
    }
}

/// Runs `cmd` with podman's configuration; its stdout, or an error with both
/// outputs.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    cmd.env("CONTAINERS_CONF", containers_dir().join("containers.conf"));
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn podman(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("podman").args(args))
}

/// One compose project of `docker/compose.yaml`, taken down when dropped.
struct Compose {
    project: String,
    env: Vec<(String, String)>,
}

impl Compose {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman-compose");
        c.current_dir(repo_root())
            .args(["-p", &self.project, "-f", "docker/compose.yaml"])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    /// The name of `service`'s container.
    fn container(&self, service: &str) -> anyhow::Result<String> {
        let out = podman(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
            "--format",
            "{{.Names}}",
        ])?;
        let names: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        match names[..] {
            [name] => Ok(name.to_string()),
            _ => bail!("expected one container of {service}, found {names:?}"),
        }
    }

    /// The networks `container` is attached to.
    fn networks(&self, container: &str) -> anyhow::Result<Vec<String>> {
        let out = podman(&[
            "inspect",
            "--format",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
            container,
        ])?;
        Ok(out.split_whitespace().map(str::to_string).collect())
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in SERVICES {
                if let Ok(c) = self.container(s) {
                    let logs = Command::new("podman")
                        .args(["logs", "--tail", "60", &c])
                        .env("CONTAINERS_CONF", containers_dir().join("containers.conf"))
                        .output();
                    if let Ok(o) = logs {
                        eprintln!(
                            "==== {s} ({c}) log tail:\n{}{}",
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        );
                    }
                }
            }
        }
        if let Err(e) = run(&mut self.command(&["down", "-v"])) {
            eprintln!("taking down compose project {}: {e:#}", self.project);
        }
        // podman-compose 1.0.3 leaves the project's network behind.
        let label = format!("label=com.docker.compose.project={}", self.project);
        match podman(&["network", "ls", "-q", "--filter", &label]) {
            Ok(nets) => {
                for net in nets.split_whitespace() {
                    if let Err(e) = podman(&["network", "rm", "-f", net]) {
                        eprintln!("removing network {net}: {e:#}");
                    }
                }
            }
            Err(e) => eprintln!("listing the networks of {}: {e:#}", self.project),
        }
    }
}

/// A node's published ports and clients carrying the client token.
struct Endpoint {
    name: &'static str,
    grpc: u16,
    resp: u16,
    metrics: u16,
    token: Secret,
}

impl Endpoint {
    fn authed(&self) -> AuthedChannel {
        InterceptedService::new(
            channel(
                &format!("http://127.0.0.1:{}", self.grpc),
                Duration::from_secs(10),
            ),
            BearerInterceptor::new(Some(&self.token)),
        )
    }

    fn kv(&self) -> KvClient<AuthedChannel> {
        KvClient::new(self.authed())
    }

    fn admin(&self) -> AdminClient<AuthedChannel> {
        AdminClient::new(self.authed())
    }

    async fn info(&self) -> anyhow::Result<admin::InfoResponse> {
        let r = self.admin().info(admin::InfoRequest {}).await;
        Ok(r.with_context(|| format!("Admin.Info on {}", self.name))?
            .into_inner())
    }

    async fn checksum(&self) -> anyhow::Result<admin::ChecksumResponse> {
        let r = self.admin().checksum(admin::ChecksumRequest {}).await;
        Ok(
            r.with_context(|| format!("Admin.Checksum on {}", self.name))?
                .into_inner(),
        )
    }

    /// `key`'s value read at an applied index of at least `min_index`.
    async fn get(&self, key: &[u8], min_index: u64) -> anyhow::Result<Option<Vec<u8>>> {
        let r = self
            .kv()
            .get(kv::GetRequest {
                key: key.to_vec().into(),
                min_index,
                wait_ms: 5000,
            })
            .await
            .with_context(|| format!("Get on {}", self.name))?
            .into_inner();
        anyhow::ensure!(
            r.index >= min_index,
            "{} served index {} < min_index {min_index}",
            self.name,
            r.index
        );
        Ok(r.found.then_some(r.value.to_vec()))
    }

    /// RESP commands on the published RESP port; the raw replies.
    fn resp(&self, commands: &[&[&str]]) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.resp))
            .with_context(|| format!("RESP port of {}", self.name))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut req = Vec::new();
        for args in commands {
            req.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in *args {
                req.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
            }
        }
        req.extend_from_slice(b"*1\r\n$4\r\nQUIT\r\n");
        s.write_all(&req)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The body of `GET /metrics` on the published metrics port.
    fn metrics(&self) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics))
            .with_context(|| format!("metrics port of {}", self.name))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        anyhow::ensure!(
            out.starts_with("HTTP/1.") && out.lines().next().is_some_and(|l| l.contains(" 200")),
            "metrics of {}: {}",
            self.name,
            out.lines().next().unwrap_or("")
        );
        Ok(out)
    }
}

/// Polls `f` every 250 ms until it returns `Some`, for at most [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match f().await {
            Ok(Some(v)) => return v,
            Ok(None) => "not yet".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            panic!("{what}: still not after {WAIT:?}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Puts `prefix/0..n` = `value-of-prefix/i` on `master`; the last index.
async fn write_keys(master: &Endpoint, prefix: &str, n: usize) -> anyhow::Result<u64> {
    let mut kv = master.kv();
    let mut last = 0;
    for i in 0..n {
        let key = format!("{prefix}/{i}");
        let r = kv
            .put(kv::PutRequest {
                key: key.clone().into_bytes().into(),
                value: format!("value-of-{key}").into_bytes().into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("Put {key}"))?
            .into_inner();
        anyhow::ensure!(r.index > last, "index went from {last} to {}", r.index);
        last = r.index;
    }
    Ok(last)
}

/// Reads `prefix/0..n` on `node` at `min_index` and checks every value.
async fn check_keys(node: &Endpoint, prefix: &str, n: usize, min_index: u64) -> anyhow::Result<()> {
    for i in 0..n {
        let key = format!("{prefix}/{i}");
        let v = node.get(key.as_bytes(), min_index).await?;
        anyhow::ensure!(
            v.as_deref() == Some(format!("value-of-{key}").as_bytes()),
            "{}: {key} = {:?}",
            node.name,
            v.map(|v| String::from_utf8_lossy(&v).into_owned())
        );
    }
    Ok(())
}

/// The row of the slave with id `id` in the master's Info.
async fn slave_row(master: &Endpoint, id: &str) -> anyhow::Result<Option<admin::SlaveInfo>> {
    Ok(master.info().await?.slaves.into_iter().find(|s| s.id == id))
}

/// Waits until the master's row of slave `id` satisfies `ok`; that row.
async fn wait_row(
    master: &Endpoint,
    id: &str,
    what: &str,
    ok: impl Fn(&admin::SlaveInfo) -> bool,
) -> admin::SlaveInfo {
    eventually(&format!("{id}: {what}"), || async {
        Ok(slave_row(master, id).await?.filter(|s| ok(s)))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_master_and_two_slaves_replicate_across_containers() {
    let started = Instant::now();
    let bin_dir = bin_path("tern-master")
        .expect("tern-master is built")
        .parent()
        .expect("a binary has a directory")
        .to_path_buf();
    bin_path("tern-slave").expect("tern-slave is built");
    run(Command::new("bash")
        .arg(repo_root().join("scripts/containers.sh"))
        .arg("prepare")
        .env("TERN_BIN_DIR", &bin_dir)
        .env("TERN_IMAGE", IMAGE)
        .env("TERN_CONTAINERS_DIR", containers_dir()))
    .expect("scripts/containers.sh prepare");
    eprintln!("image {IMAGE} ready after {:?}", started.elapsed());

    let client_token = format!("client-{:016x}", rand::random::<u64>());
    let repl_token = format!("repl-{:016x}", rand::random::<u64>());
    let token = Secret::new(client_token.clone()).expect("a valid token");
    let ports: Vec<u16> = (0..9).map(|_| pick_port()).collect();
    let nodes: Vec<Endpoint> = SERVICES
        .iter()
        .enumerate()
        .map(|(i, name)| Endpoint {
            name,
            grpc: ports[i],
            resp: ports[3 + i],
            metrics: ports[6 + i],
            token: token.clone(),
        })
        .collect();
    let (master, slave1, slave2) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut env: Vec<(String, String)> = vec![
        ("TERN_IMAGE".into(), IMAGE.into()),
        ("TERN_TOKEN".into(), client_token.clone()),
        ("TERN_REPLICATION_TOKEN".into(), repl_token),
        ("TERN_PUBLISH_ADDR".into(), "127.0.0.1".into()),
        ("TERN_HEARTBEAT_MS".into(), "500".into()),
        ("TERN_LINK_TIMEOUT_MS".into(), LINK_TIMEOUT_MS.to_string()),
        // Both slaves start empty and full-sync at once: let the second one
        // have its own snapshot a second later.
        ("TERN_SNAPSHOT_MIN_INTERVAL_MS".into(), "1000".into()),
    ];
    for (n, prefix) in nodes.iter().zip(["MASTER", "SLAVE1", "SLAVE2"]) {
        env.push((format!("TERN_{prefix}_PORT"), n.grpc.to_string()));
        env.push((format!("TERN_{prefix}_RESP_PORT"), n.resp.to_string()));
        env.push((format!("TERN_{prefix}_METRICS_PORT"), n.metrics.to_string()));
    }
    let compose = Compose {
        project: format!("terntest{}", std::process::id()),
        env,
    };
    run(&mut compose.command(&["up", "-d"])).expect("podman-compose up -d");

    // Every node answers, the slaves stream from the master by service name.
    for n in &nodes {
        eventually(&format!("{} answers Admin.Info", n.name), || async {
            Ok(Some(n.info().await?))
        })
        .await;
    }
    for id in ["tern-slave-1", "tern-slave-2"] {
        wait_row(master, id, "streams from the master", |s| {
            s.state == "streaming"
        })
        .await;
    }
    let synced = master.info().await.unwrap().counters.unwrap_or_default();
    // The tokens are enforced across the published ports.
    let open = kv_without_token(master.grpc)
        .get(kv::GetRequest {
            key: b"x".to_vec().into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        open.expect_err("a Get without the token is refused").code(),
        tonic::Code::Unauthenticated
    );

    // 1. Writes on the master, read on both slaves.
    let idx = write_keys(master, "a", 100).await.unwrap();
    for s in [slave1, slave2] {
        check_keys(s, "a", 100, idx).await.unwrap();
    }
    for n in [master, slave2] {
        let out = n
            .resp(&[&["AUTH", &client_token], &["GET", "a/7"]])
            .unwrap();
        assert!(
            out.starts_with("+OK\r\n$12\r\nvalue-of-a/7\r\n"),
            "RESP on {}: {out:?}",
            n.name
        );
    }
    for n in &nodes {
        let m = n.metrics().unwrap();
        assert!(m.contains("tern_"), "metrics of {}: {m}", n.name);
    }

    // 2. A slave container stopped (cleanly) and started again.
    let c1 = compose.container("tern-slave-1").unwrap();
    podman(&["stop", "-t", "30", &c1]).unwrap();
    wait_row(master, "tern-slave-1", "its session ends", |s| {
        s.state != "streaming"
    })
    .await;
    let idx = write_keys(master, "b", 100).await.unwrap();
    podman(&["start", &c1]).unwrap();
    eventually(
        "tern-slave-1 reads what was written while it was stopped",
        || async { check_keys(slave1, "b", 100, idx).await.map(Some) },
    )
    .await;
    check_keys(slave1, "a", 100, idx).await.unwrap();
    let info = slave1.info().await.unwrap();
    assert_eq!(
        info.replayed_on_start, 0,
        "a slave stopped cleanly replays nothing: {info:?}"
    );

    // 3. A real partition: tern-slave-2's network disconnected past the link
    // timeout, more writes, connected again.
    let c2 = compose.container("tern-slave-2").unwrap();
    let networks = compose.networks(&c2).unwrap();
    assert_eq!(networks.len(), 1, "{c2} networks: {networks:?}");
    let net = &networks[0];
    let before = slave_row(master, "tern-slave-2")
        .await
        .unwrap()
        .expect("tern-slave-2 has a row on the master");
    podman(&["network", "disconnect", net, &c2]).unwrap();
    wait_row(
        master,
        "tern-slave-2",
        "the master times its session out",
        |s| s.state != "streaming",
    )
    .await;
    let idx = write_keys(master, "c", 100).await.unwrap();
    let row = slave_row(master, "tern-slave-2").await.unwrap().unwrap();
    assert!(
        row.received_index < idx,
        "tern-slave-2 got writes while partitioned: {row:?} (master at {idx})"
    );
    // Meanwhile tern-slave-1 gets them.
    check_keys(slave1, "c", 100, idx).await.unwrap();
    podman(&["network", "connect", net, &c2]).unwrap();
    wait_row(
        master,
        "tern-slave-2",
        "streams again in a new session",
        |s| s.state == "streaming" && s.session_id != before.session_id,
    )
    .await;
    eventually(
        "tern-slave-2 reads what was written during the partition",
        || async { check_keys(slave2, "c", 100, idx).await.map(Some) },
    )
    .await;
    check_keys(slave2, "b", 100, idx).await.unwrap();

    // 4. Equal Checksums, nothing applied twice, no full sync needed.
    let last = master.info().await.unwrap().last_index;
    assert_eq!(last, idx, "nothing else was written");
    let want = master.checksum().await.unwrap();
    assert_eq!(want.index, idx);
    assert_eq!(want.keys, 300);
    for s in [slave1, slave2] {
        let got = eventually(&format!("{} reaches index {idx}", s.name), || async {
            let c = s.checksum().await?;
            Ok((c.index == idx).then_some(c))
        })
        .await;
        assert_eq!(
            (got.index, &got.digest, got.keys),
            (want.index, &want.digest, want.keys),
            "Checksum of {}",
            s.name
        );
        let info = s.info().await.unwrap();
        let counters = info.counters.unwrap_or_default();
        assert_eq!(counters.duplicates_skipped, 0, "{}: {info:?}", s.name);
    }
    // The restarted and the partitioned slave both continued where they were.
    let counters = master.info().await.unwrap().counters.unwrap_or_default();
    assert_eq!(
        counters.full_syncs, synced.full_syncs,
        "no full sync after the first ones: {counters:?}"
    );
    assert!(
        counters.partial_syncs >= synced.partial_syncs + 2,
        "two partial syncs at least: {synced:?} then {counters:?}"
    );
    eprintln!("containers test took {:?}", started.elapsed());
}

fn kv_without_token(port: u16) -> KvClient<tonic::transport::Channel> {
    KvClient::new(channel(
        &format!("http://127.0.0.1:{port}"),
        Duration::from_secs(10),
    ))
}
