//! Kv requests that used to exhaust a master (issue "limits that hold against
//! hostile or broken peers"), over real processes:
//!
//! - four concurrent small Scans over large values: each answer holds at most
//!   `MAX_SCAN_BYTES` (one larger value alone), says `more` correctly, paging
//!   returns every key exactly once, and the master's RSS stays bounded;
//! - a Txn of 2,000 one-byte Appends to a 15 MB value: the Appends share one
//!   buffer, a concurrent Put is served, the value is exact; Txns over the
//!   read or write budget stop with INVALID_ARGUMENT and change nothing;
//! - 4,200 Gets parked on an unreachable `min_index`: they hold no slot of
//!   the Kv budget, the bound on parked reads sheds exactly the excess with
//!   RESOURCE_EXHAUSTED (`Info.counters.requests_shed`), and meanwhile Puts,
//!   Admin.Info, health checks and replication go on (equal Checksums).
//!
//! Latencies and RSS are printed, never asserted.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{assert_replicas_equal, start_slave, wait_connected, wait_until};
use tern_common::limits::MAX_SCAN_BYTES;
use tern_common::proto::admin::v1 as admin;
use tern_common::proto::kv::v1::{self as kv, kv_client::KvClient, op::Op};
use tern_integration::node::{channel, kv_client};
use tern_integration::{Node, TestDir, Workload};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Size of the large values (the 15 MB).
const BIG: usize = 15_000_000;

/// The resident set size of process `pid` in bytes (`VmRSS` of
/// /proc/PID/status).
fn rss(node: &Node) -> u64 {
    support::vm_rss(node.pid().expect("the node runs")).expect("VmRSS in /proc/PID/status")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// A value of `len` bytes that says which key it belongs to.
fn big_value(n: usize, len: usize) -> Bytes {
    let mut v = vec![b'a' + (n % 26) as u8; len];
    v[..8].copy_from_slice(&(n as u64).to_be_bytes());
    Bytes::from(v)
}

async fn put(kv: &mut KvClient<Channel>, key: &str, value: Bytes) -> u64 {
    kv.put(kv::PutRequest {
        key: Bytes::from(key.to_string()),
        value,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("Put {key}: {e:?}"))
    .into_inner()
    .index
}

async fn get(kv: &mut KvClient<Channel>, key: &str) -> Option<Bytes> {
    let r = kv
        .get(kv::GetRequest {
            key: Bytes::from(key.to_string()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("Get {key}: {e:?}"))
        .into_inner();
    r.found.then_some(r.value)
}

/// One page of a Scan paged through.
struct Page {
    items: Vec<(Bytes, Bytes)>,
    more: bool,
}

/// Pages through every key with `limit` per page.
async fn scan_pages(kv: &mut KvClient<Channel>, limit: u32) -> Vec<Page> {
    let mut pages = Vec::new();
    let mut start = Bytes::new();
    loop {
        let r = kv
            .scan(kv::ScanRequest {
                start: start.clone(),
                limit,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("Scan from {start:?}: {e:?}"))
            .into_inner();
        let items: Vec<(Bytes, Bytes)> = r.items.into_iter().map(|i| (i.key, i.value)).collect();
        let next = items.last().map(|(k, _)| {
            let mut n = k.to_vec();
            n.push(0);
            Bytes::from(n)
        });
        let more = r.more;
        pages.push(Page { items, more });
        match (more, next) {
            (true, Some(n)) => start = n,
            (true, None) => panic!("a Scan answer said `more` without items"),
            (false, _) => return pages,
        }
    }
}

/// Samples the master's RSS every 20 ms until `stop`; returns the peak.
fn sample_rss(node: &Node, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let pid = node.pid().expect("the master runs");
    tokio::spawn(async move {
        let mut peak = 0u64;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(support::vm_rss(pid).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_scans_over_large_values_are_bounded() {
    let dir = TestDir::new("rogue_kv_scan");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let mut kv = master.kv();
    // 12 values of 15 MB between small keys.
    let mut expected: Vec<(Bytes, Bytes)> = Vec::new();
    for n in 0..12 {
        let key = format!("big/{n:02}");
        let value = big_value(n, BIG);
        put(&mut kv, &key, value.clone()).await;
        expected.push((Bytes::from(key), value));
    }
    for n in 0..300 {
        let key = format!("small/{n:03}");
        let value = Bytes::from(format!("v{n}"));
        put(&mut kv, &key, value.clone()).await;
        expected.push((Bytes::from(key), value));
    }
    expected.sort();
    let before = rss(&master);

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(&master, stop.clone());
    // Four concurrent "small" Scans (limit 100), each on its own connection.
    let scans: Vec<_> = (0..4)
        .map(|_| {
            let mut kv = kv_client(master.channel());
            tokio::spawn(async move { scan_pages(&mut kv, 100).await })
        })
        .collect();
    let mut all_pages = Vec::new();
    for s in scans {
        all_pages.push(s.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let after = rss(&master);
    eprintln!(
        "master RSS: {:.0} MiB before the Scans, peak {:.0} MiB during four concurrent Scans, {:.0} \
         MiB after",
        mib(before),
        mib(peak),
        mib(after)
    );

    // Each answer holds at most MAX_SCAN_BYTES or one value, so four Scans
    // hold a few tens of MiB, plus the allocator's slack (unbounded, each of
    // these Scans took 180 MB of values per page, twice: read and encoded).
    assert!(
        peak.saturating_sub(before) < 768 << 20,
        "four small Scans grew the master by {:.0} MiB",
        mib(peak.saturating_sub(before))
    );
    for pages in &all_pages {
        // Every key exactly once, in order, with its value.
        let got: Vec<(Bytes, Bytes)> = pages.iter().flat_map(|p| p.items.clone()).collect();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "paging returned other keys or values");
        // `more` on every page but the last.
        let mores: Vec<bool> = pages.iter().map(|p| p.more).collect();
        let last = mores.len() - 1;
        assert!(
            mores[..last].iter().all(|m| *m) && !mores[last],
            "{mores:?}"
        );
        for p in pages {
            let bytes: usize = p.items.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(
                p.items.len() == 1 || bytes <= MAX_SCAN_BYTES,
                "a page of {} items holds {bytes} bytes",
                p.items.len()
            );
            assert!(p.items.len() <= 100);
        }
        // A 15 MB value is over the budget: it is served alone.
        let big_pages = pages
            .iter()
            .filter(|p| p.items.iter().any(|(_, v)| v.len() == BIG))
            .count();
        assert_eq!(big_pages, 12);
        assert!(
            pages
                .iter()
                .filter(|p| p.items.iter().any(|(_, v)| v.len() == BIG))
                .all(|p| p.items.len() == 1)
        );
        // 12 big pages and 300 small keys at 100 per page.
        assert_eq!(pages.len(), 12 + 3, "pages: {}", pages.len());
    }
}

fn append(key: &str, value: &[u8]) -> kv::Op {
    kv::Op {
        op: Some(Op::Append(kv::AppendRequest {
            key: Bytes::from(key.to_string()),
            value: Bytes::copy_from_slice(value),
            ..Default::default()
        })),
    }
}

fn delete(key: &str) -> kv::Op {
    kv::Op {
        op: Some(Op::Delete(kv::DeleteRequest {
            key: Bytes::from(key.to_string()),
            ..Default::default()
        })),
    }
}

fn put_op(key: &str, value: Bytes) -> kv::Op {
    kv::Op {
        op: Some(Op::Put(kv::PutRequest {
            key: Bytes::from(key.to_string()),
            value,
            ..Default::default()
        })),
    }
}

/// How long a Put of a small key takes, and its index.
async fn timed_put(kv: &mut KvClient<Channel>, key: &str) -> (Duration, u64) {
    let t = Instant::now();
    let index = put(kv, key, Bytes::from_static(b"x")).await;
    (t.elapsed(), index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_of_appends_to_a_large_value_does_not_stall_other_clients() {
    let dir = TestDir::new("rogue_kv_txn");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let mut kv = master.kv();
    for n in 0..9 {
        put(&mut kv, &format!("big/{n}"), big_value(n, BIG)).await;
    }
    let (idle_put, _) = timed_put(&mut kv, "probe/idle").await;

    // The Txn: 2,000 one-byte Appends to one 15 MB value, and a Put
    // sent while it runs.
    let ops: Vec<kv::Op> = (0..2000).map(|_| append("big/0", b"z")).collect();
    let mut txn_kv = kv_client(master.channel());
    let t = Instant::now();
    let txn = tokio::spawn(async move {
        txn_kv
            .txn(kv::TxnRequest {
                ops,
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (busy_put, put_index) = timed_put(&mut kv, "probe/busy").await;
    let txn = txn.await.unwrap().expect("the Txn of Appends").into_inner();
    let txn_took = t.elapsed();
    eprintln!(
        "Txn of 2,000 one-byte Appends to a 15 MB value took {txn_took:?}; a Put took \
         {idle_put:?} idle and {busy_put:?} sent while the Txn ran"
    );
    assert_eq!(txn.results.len(), 2000);
    for (i, r) in txn.results.iter().enumerate() {
        match &r.result {
            Some(kv::op_result::Result::Append(a)) => {
                assert_eq!(a.length, (BIG + i + 1) as u64, "op {i}")
            }
            other => panic!("op {i}: {other:?}"),
        }
    }
    assert_ne!(txn.index, put_index);
    let mut want = big_value(0, BIG).to_vec();
    want.extend_from_slice(&[b'z'; 2000]);
    assert!(get(&mut kv, "big/0").await.unwrap() == want);
    assert_eq!(get(&mut kv, "probe/busy").await.as_deref(), Some(&b"x"[..]));

    // Reading 9 stored values of 15 MB is over the read budget (128 MiB):
    // the Txn stops at the ninth and changes nothing.
    let last = master.info().await.unwrap().last_index;
    let mut ops = Vec::new();
    for n in 0..9 {
        ops.push(append(&format!("big/{n}"), b""));
        ops.push(delete(&format!("big/{n}")));
    }
    let e = kv
        .txn(kv::TxnRequest {
            ops,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        format!(
            "txn would read {} bytes of keys and values; the limit is {}",
            9 * BIG + 2000,
            128 << 20
        )
    );
    // Final values over the write budget: 8 Appends to 15 MB values plus a
    // 15 MB Put.
    let mut ops: Vec<kv::Op> = (1..9).map(|n| append(&format!("big/{n}"), b"y")).collect();
    ops.push(put_op("p", big_value(20, BIG)));
    let e = kv
        .txn(kv::TxnRequest {
            ops,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let written = 8 * ("big/1".len() + BIG + 1) + 1 + BIG;
    assert_eq!(
        e.message(),
        format!(
            "txn would write {written} bytes of keys and values; the limit is {}",
            128 << 20
        )
    );
    assert_eq!(master.info().await.unwrap().last_index, last);
    for n in 1..9 {
        assert!(get(&mut kv, &format!("big/{n}")).await.unwrap() == big_value(n, BIG));
    }
    assert_eq!(get(&mut kv, "p").await, None);
}

/// Parked Gets sent at once.
const PARKED: usize = 4200;
/// Reads the default budget lets park (`server.max_concurrent_requests`).
const PARK_LIMIT: usize = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_reads_do_not_starve_writes_admin_health_or_replication() {
    let dir = TestDir::new("rogue_kv_parked");
    // Parked reads wait MAX_WAIT_MS (60 s), longer than the default
    // request timeout would let them.
    let env = [("TERN__SERVER__REQUEST_TIMEOUT_MS", "120000")];
    let master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let slave = start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;
    let mut kv = master.kv();
    let admin = master.admin();
    let health = HealthClient::new(master.channel());

    let probe = |kv: KvClient<Channel>,
                 admin: tern_common::proto::admin::v1::admin_client::AdminClient<Channel>,
                 health: HealthClient<Channel>| async move {
        let (mut kv, mut admin, mut health) = (kv, admin, health);
        let (put_took, _) = timed_put(&mut kv, "probe").await;
        let t = Instant::now();
        let info = admin
            .info(admin::InfoRequest {})
            .await
            .expect("Admin.Info")
            .into_inner();
        let info_took = t.elapsed();
        let t = Instant::now();
        let h = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health Check")
            .into_inner();
        let health_took = t.elapsed();
        assert_eq!(h.status, ServingStatus::Serving as i32);
        (put_took, info_took, health_took, info)
    };
    let (put0, info0, health0, _) = probe(kv.clone(), admin.clone(), health.clone()).await;

    // 4,200 Gets on an index the master will never reach, with the longest
    // wait, over 6 connections (at most 1,024 streams each).
    let shed = Arc::new(AtomicU64::new(0));
    // Parked Gets that ended, however.
    let ended = Arc::new(AtomicU64::new(0));
    let conns: Vec<Channel> = (0..6)
        .map(|_| channel(&master.url(), Duration::from_secs(120)))
        .collect();
    let mut parked = tokio::task::JoinSet::new();
    for i in 0..PARKED {
        let mut kv = kv_client(conns[i % conns.len()].clone());
        let (shed, ended) = (shed.clone(), ended.clone());
        parked.spawn(async move {
            let r = kv
                .get(kv::GetRequest {
                    key: Bytes::from_static(b"parked"),
                    min_index: u64::MAX / 2,
                    wait_ms: u32::MAX,
                })
                .await;
            ended.fetch_add(1, Ordering::Relaxed);
            match r {
                Err(e) if e.code() == Code::ResourceExhausted => {
                    assert_eq!(
                        e.message(),
                        "4096 reads are already waiting for min_index on this node, its limit; \
                         retry later"
                    );
                    shed.fetch_add(1, Ordering::Relaxed);
                }
                other => panic!("a parked Get ended with {other:?}"),
            }
        });
    }
    // Exactly the reads beyond the bound are shed; the rest stay parked.
    let excess = (PARKED - PARK_LIMIT) as u64;
    let info = wait_until(
        "the excess parked reads to be shed",
        support::DEADLINE,
        || {
            let master = &master;
            let shed = shed.clone();
            async move {
                let i = master.info().await.map_err(|e| format!("{e:#}"))?;
                let c = i.counters.unwrap_or_default();
                if shed.load(Ordering::Relaxed) == excess {
                    Ok(Some(i))
                } else {
                    Err(format!(
                        "shed {} (Info: {}), in flight {}",
                        shed.load(Ordering::Relaxed),
                        c.requests_shed,
                        i.requests_in_flight
                    ))
                }
            }
        },
    )
    .await;
    assert_eq!(info.counters.unwrap_or_default().requests_shed, excess);
    assert_eq!(ended.load(Ordering::Relaxed), excess, "parked Gets ended");

    // Writes, Admin, health and replication while they are parked.
    let (put1, info1, health1, info) = probe(kv.clone(), admin.clone(), health.clone()).await;
    // Only the Info itself holds a slot: parked reads hold none.
    assert_eq!(info.requests_in_flight, 1);
    eprintln!(
        "before parking: Put {put0:?}, Admin.Info {info0:?}, health {health0:?}; with {PARK_LIMIT} \
         Gets parked and {excess} shed: Put {put1:?}, Admin.Info {info1:?}, health {health1:?}"
    );
    let work = Workload::new(16, 16);
    let load = work.start_load(&master.url(), 2);
    support::wait_more_acked(&load, 300).await;
    let stats = load.stop().await;
    assert!(stats.unexpected.is_empty(), "{:?}", stats.unexpected);
    assert_eq!(ended.load(Ordering::Relaxed), excess, "parked Gets ended");
    let t = Instant::now();
    assert_replicas_equal(&master, &[&slave], &work).await;
    eprintln!(
        "slave converged with {PARK_LIMIT} Gets parked: {} writes acked, {:?} to converge and \
         compare",
        stats.acked,
        t.elapsed()
    );
    assert_eq!(ended.load(Ordering::Relaxed), excess, "parked Gets ended");

    // Cancelled parked reads leave nothing behind.
    parked.abort_all();
    while parked.join_next().await.is_some() {}
    drop(conns);
    let info = wait_until("parked reads to be released", support::DEADLINE, || {
        let mut admin = admin.clone();
        async move {
            let i = admin
                .info(admin::InfoRequest {})
                .await
                .map_err(|e| format!("{e:?}"))?
                .into_inner();
            (i.requests_in_flight == 1)
                .then_some(i.clone())
                .ok_or_else(|| format!("in flight {}", i.requests_in_flight))
                .map(Some)
        }
    })
    .await;
    assert_eq!(info.counters.unwrap_or_default().requests_shed, excess);
    // The bound has room again: a read parks and is served once its index is.
    let target = info.last_index + 1;
    let mut reader = kv_client(master.channel());
    let waiting = tokio::spawn(async move {
        reader
            .get(kv::GetRequest {
                key: Bytes::from_static(b"late"),
                min_index: target,
                wait_ms: 30_000,
            })
            .await
    });
    let index = put(&mut kv, "late", Bytes::from_static(b"v")).await;
    assert!(index >= target);
    let r = waiting.await.unwrap().expect("the parked Get").into_inner();
    assert_eq!((r.found, &r.value[..]), (true, &b"v"[..]));
}
