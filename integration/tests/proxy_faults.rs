//! The fault proxy between a slave and its master (`tern_integration::proxy`),
//! each fault on its own, under a paced load: connections dropped, a blackhole
//! longer than the link timeout (no RST: both sides must time out), latency
//! and a bandwidth cap, the stream cut after N bytes mid-batch, and a DbSync
//! cut mid-stream. After each: the slave converges to the master's Checksum,
//! every acknowledged write is there exactly once, no duplicate is skipped and
//! the relay log is byte-identical to the master's binlog.
//!
//! Needs binaries built with `--features tern-slave/fault-injection`.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use support::{
    DEADLINE, PacedLoad, assert_replicas_equal, describe_slave, slave_counters, slave_link,
    wait_connected, wait_until,
};
use tern_integration::proxy::Proxy;
use tern_integration::{Node, TestDir, Workload};

const LINK: [(&str, &str); 2] = [
    ("TERN__SYNC__LINK_TIMEOUT_MS", "1500"),
    ("TERN__SYNC__HEARTBEAT_MS", "300"),
];

async fn master_and_proxied_slave(dir: &TestDir) -> (Node, Proxy, Node) {
    let master = Node::start_master(&dir.join("master"), &LINK, &[])
        .await
        .unwrap();
    let proxy = Proxy::start(&master.addr()).await.unwrap();
    let slave = Node::start_slave(&dir.join("slave"), &proxy.url(), &LINK, &[])
        .await
        .unwrap();
    wait_connected(&slave, 1).await;
    (master, proxy, slave)
}

async fn finish(load: PacedLoad, master: &Node, slave: &Node, work: &Workload) {
    let stats = load.stop().await;
    assert!(stats.unexpected.is_empty(), "{:?}", stats.unexpected);
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
    assert_replicas_equal(master, &[slave], work).await;
}

/// Link drop and blackhole: the slave reconnects (after a timeout for the
/// blackhole) with a partial sync, never a full one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_drop_and_blackhole() {
    let dir = TestDir::new("proxy-blackhole");
    let (master, proxy, slave) = master_and_proxied_slave(&dir).await;
    let full0 = slave_counters(&slave.info().await.unwrap()).full_syncs;
    let work = Workload::new(8, 32);
    let load = PacedLoad::start(&work, &master.url(), 4, Duration::from_millis(2));
    load.wait_more(100).await;

    let r0 = slave_counters(&slave.info().await.unwrap()).reconnects;
    proxy.drop_all();
    let i = wait_connected(&slave, 2).await;
    assert!(slave_counters(&i).reconnects > r0, "{}", describe_slave(&i));
    load.wait_more(100).await;

    // Blackhole past the link timeout (1.5 s): nothing passes, nothing is
    // closed; the session must die of the timeout and come back.
    let r1 = slave_counters(&slave.info().await.unwrap()).reconnects;
    proxy.blackhole(Duration::from_millis(3500));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let i = wait_connected(&slave, 3).await;
    assert!(
        slave_counters(&i).reconnects > r1,
        "the blackhole must end the session by timeout: {}",
        describe_slave(&i)
    );
    load.wait_more(100).await;
    finish(load, &master, &slave, &work).await;
    let i = slave.info().await.unwrap();
    assert_eq!(
        slave_counters(&i).full_syncs,
        full0,
        "{}",
        describe_slave(&i)
    );
}

/// Latency and a bandwidth cap slow the link; nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_latency_and_bandwidth() {
    let dir = TestDir::new("proxy-slow");
    let (master, proxy, slave) = master_and_proxied_slave(&dir).await;
    let work = Workload::new(8, 32);
    let load = PacedLoad::start(&work, &master.url(), 4, Duration::from_millis(2));
    proxy.set_latency(Duration::from_millis(80));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set_latency(Duration::ZERO);
    proxy.set_bandwidth(Some(30_000));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let i = slave.info().await.unwrap();
    let mi = master.info().await.unwrap();
    eprintln!(
        "under a 30 kB/s cap: master last {}, slave {}",
        mi.last_index,
        describe_slave(&i)
    );
    proxy.set_bandwidth(None);
    finish(load, &master, &slave, &work).await;
    assert!(proxy.stats().bytes_to_slave.load(Ordering::Relaxed) > 0);
}

/// The stream towards the slave is cut after a random number of bytes, many
/// times: mostly in the middle of a batch (and of a transaction's records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cut_mid_batch() {
    let dir = TestDir::new("proxy-cut");
    let (master, proxy, slave) = master_and_proxied_slave(&dir).await;
    let work = Workload::new(8, 32);
    let load = PacedLoad::start(&work, &master.url(), 4, Duration::from_millis(2));
    let seed = rand::rng().random::<u64>();
    eprintln!("proxy_cut_mid_batch: seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for cycle in 1..=8u64 {
        let before = slave_counters(&slave.info().await.unwrap()).partial_syncs;
        proxy.cut_after(rng.random_range(1..20_000));
        wait_until("the cut to happen", DEADLINE, || {
            let p = &proxy;
            async move {
                if p.cut_pending() {
                    Err("pending".into())
                } else {
                    Ok(Some(()))
                }
            }
        })
        .await;
        let i = wait_connected(&slave, before + 1).await;
        eprintln!("cut {cycle}: {}", describe_slave(&i));
        assert_eq!(slave_counters(&i).duplicates_skipped, 0);
        load.wait_more(50).await;
    }
    assert_eq!(proxy.stats().cuts.load(Ordering::Relaxed), 8);
    finish(load, &master, &slave, &work).await;
}

/// A new slave's DbSync goes through the proxy, which cuts it after a few
/// hundred kilobytes: the full sync must resume (or restart) and finish, and
/// the slave then stream like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cut_mid_dbsync() {
    let dir = TestDir::new("proxy-dbsync");
    let master = Node::start_master(&dir.join("master"), &LINK, &[])
        .await
        .unwrap();
    let work = Workload::new(8, 64);
    // Some data first, so the snapshot is more than a chunk or two.
    let load = PacedLoad::start(&work, &master.url(), 4, Duration::from_millis(1));
    load.wait_more(3000).await;
    let proxy = Proxy::start(&master.addr()).await.unwrap();
    proxy.cut_after(8_000);
    let slave = Node::start_slave(&dir.join("slave"), &proxy.url(), &LINK, &[])
        .await
        .unwrap();
    let i = wait_until("the slave to finish its full sync", DEADLINE, || {
        let s = &slave;
        async move {
            let i = s.info().await.map_err(|e| format!("{e:#}"))?;
            if slave_counters(&i).full_syncs >= 1 && slave_link(&i).state == "connected" {
                Ok(Some(i))
            } else {
                Err(describe_slave(&i))
            }
        }
    })
    .await;
    eprintln!("after the cut DbSync: {}", describe_slave(&i));
    assert!(!proxy.cut_pending(), "the DbSync stream was not cut");
    assert_eq!(proxy.stats().cuts.load(Ordering::Relaxed), 1);
    assert!(
        support::log_count(&slave, "receiving snapshot") >= 2,
        "the cut must interrupt the DbSync stream, which is then retried"
    );
    load.wait_more(200).await;
    finish(load, &master, &slave, &work).await;
}

/// The slave's relay fsyncs so far (`tern_fsync_duration_seconds_count` on its
/// metrics endpoint).
async fn relay_fsyncs(metrics: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: tern\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let line = body
        .lines()
        .find(|l| l.starts_with("tern_fsync_duration_seconds_count "))
        .unwrap_or_else(|| panic!("no fsync count in:\n{body}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Batches held up on the way (a blackhole shorter than the link timeout)
/// arrive together: the slave appends them under one relay fsync (or a few)
/// instead of one each, and acks each of them. Nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_burst_is_fsynced_together() {
    let dir = TestDir::new("proxy-burst");
    let link = [
        ("TERN__SYNC__LINK_TIMEOUT_MS", "8000"),
        ("TERN__SYNC__HEARTBEAT_MS", "300"),
        ("TERN__BINLOG__FSYNC", "always"),
    ];
    let master = Node::start_master(&dir.join("master"), &link, &[])
        .await
        .unwrap();
    let proxy = Proxy::start(&master.addr()).await.unwrap();
    let metrics = format!("127.0.0.1:{}", tern_integration::pick_port());
    let mut slave_env = link.to_vec();
    slave_env.push(("TERN__SERVER__METRICS_LISTEN", &metrics));
    let slave = Node::start_slave(&dir.join("slave"), &proxy.url(), &slave_env, &[])
        .await
        .unwrap();
    wait_connected(&slave, 1).await;
    let work = Workload::new(8, 32);
    let batches = |i: &tern_common::proto::admin::v1::InfoResponse| {
        let c = slave_counters(i);
        c.batches_from_memory + c.batches_from_files
    };
    let b0 = batches(&master.info().await.unwrap());
    let f0 = relay_fsyncs(&metrics).await;

    // One writer, one write in flight: each write its own group and batch.
    proxy.blackhole(Duration::from_millis(3000));
    let load = PacedLoad::start(&work, &master.url(), 1, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = load.stop().await;
    assert!(stats.unexpected.is_empty(), "{:?}", stats.unexpected);
    assert_eq!(stats.failed, 0, "master writes failed: {stats:?}");
    assert_replicas_equal(&master, &[&slave], &work).await;

    let b = batches(&master.info().await.unwrap()) - b0;
    let f = relay_fsyncs(&metrics).await - f0;
    let i = slave.info().await.unwrap();
    eprintln!("{b} batches sent, {f} relay fsyncs: {}", describe_slave(&i));
    // The window (64 batches) filled during the blackhole and was delivered at once.
    assert!(b >= 48, "{b} batches: the load did not fill the window");
    assert!(
        2 * f <= b,
        "{f} relay fsyncs for {b} batches: a burst must share its fsyncs"
    );
    assert_eq!(slave_counters(&i).reconnects, 0, "{}", describe_slave(&i));
    assert_eq!(slave_counters(&i).duplicates_skipped, 0);
}
