//! Reads on one slave never go back in time, across crashes and relay log
//! repairs (TESTING.md, finding 2).
//!
//! The sequence from the field: a slave applied and served many transactions
//! that its RocksDB (no WAL, flushed every 30 s) does not hold durably; it is
//! SIGKILLed, a relay record after the durable applied index is damaged, it
//! restarts (discarding the relay log from the damage), is SIGKILLed again
//! before any flush and restarts again. It used to serve an older state at the
//! first restart and the empty state at the second. Now every read answers at
//! an index at least the highest one served, or UNAVAILABLE saying why, and
//! the slave converges once its master is back. The master is stopped while
//! the slave is repaired, so the slave cannot catch up behind the test's back:
//! what it serves then is what it has on disk.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use support::{DEADLINE, POLL, TailDamage, converge, log_count, slave_counters};
use tern_common::proto::admin::v1 as admin;
use tern_common::proto::kv::v1 as kv;
use tern_common::record::{HEADER_LEN, KindTag, Records};
use tern_integration::{Node, TestDir};
use tonic::Code;

const KEYS: usize = 4;
const WRITERS: usize = 4;
const INCRS_PER_WRITER: usize = 700;
const SEGMENT_BYTES: &str = "65536";

fn key(k: usize) -> Bytes {
    Bytes::from(format!("c{k}"))
}

/// IncrBy(+1) on the counters from `WRITERS` clients; returns the final value
/// of each counter as the master answered it.
async fn write_counters(master: &Node) -> Vec<i64> {
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut c = master.kv();
            tokio::spawn(async move {
                for i in 0..INCRS_PER_WRITER {
                    c.incr_by(kv::IncrByRequest {
                        key: key((w + i) % KEYS),
                        delta: 1,
                        ..Default::default()
                    })
                    .await
                    .expect("IncrBy on the master");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = master.kv();
    let mut out = Vec::new();
    for k in 0..KEYS {
        let r = c
            .get(kv::GetRequest {
                key: key(k),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.push(std::str::from_utf8(&r.value).unwrap().parse().unwrap());
    }
    assert_eq!(out.iter().sum::<i64>(), (WRITERS * INCRS_PER_WRITER) as i64);
    out
}

/// Every read of one slave, checked against what it served before.
struct Reads {
    /// Highest index served so far.
    served: u64,
    /// Highest value served so far, per counter.
    values: BTreeMap<usize, i64>,
    refused: u64,
}

impl Reads {
    /// Reads every counter with `Get` and all of them with one `Scan`. Each
    /// read is either served at an index and values at least the highest ones
    /// served before, or refused with UNAVAILABLE naming the floor; returns
    /// whether every read was served.
    async fn read_all(&mut self, slave: &Node) -> bool {
        let mut c = slave.kv();
        let mut served_all = true;
        for k in 0..KEYS {
            let r = c
                .get(kv::GetRequest {
                    key: key(k),
                    min_index: 0,
                    wait_ms: 200,
                })
                .await;
            match r {
                Ok(r) => {
                    let r = r.into_inner();
                    assert!(r.found, "c{k} not found at index {}", r.index);
                    let v: i64 = std::str::from_utf8(&r.value).unwrap().parse().unwrap();
                    self.served(k, v, r.index);
                }
                Err(s) => {
                    self.refused(&s);
                    served_all = false;
                }
            }
        }
        match c
            .scan(kv::ScanRequest {
                wait_ms: 200,
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.items.len(), KEYS, "scan at {}", r.index);
                for item in &r.items {
                    let k: usize = std::str::from_utf8(&item.key[1..])
                        .unwrap()
                        .parse()
                        .unwrap();
                    let v: i64 = std::str::from_utf8(&item.value).unwrap().parse().unwrap();
                    self.served(k, v, r.index);
                }
            }
            Err(s) => {
                self.refused(&s);
                served_all = false;
            }
        }
        served_all
    }

    fn served(&mut self, k: usize, v: i64, index: u64) {
        assert!(
            index >= self.served,
            "c{k} read at index {index}, after index {} was served: reads went back",
            self.served
        );
        let before = self.values.get(&k).copied().unwrap_or(0);
        assert!(
            v >= before,
            "c{k} read {v} at index {index}, after {before} was served: reads went back"
        );
        self.served = index;
        self.values.insert(k, v);
    }

    fn refused(&mut self, s: &tonic::Status) {
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(
            s.message()
                .starts_with("replica is catching up to the state it already served: applied "),
            "{s:?}"
        );
        assert!(
            s.message().ends_with(&format!(" < {}", self.served)),
            "the floor is the highest index served ({}): {s:?}",
            self.served
        );
        self.refused += 1;
    }
}

fn blocked_message(applied: u64, floor: u64) -> String {
    format!("replica is catching up to the state it already served: applied {applied} < {floor}")
}

/// Asserts what Info says of a slave that must not serve yet.
fn assert_blocked(i: &admin::InfoResponse, floor: u64, refused: u64) {
    assert!(i.applied_index < floor, "applied {}", i.applied_index);
    assert_eq!(i.read_floor, floor);
    assert_eq!(i.reads_blocked, blocked_message(i.applied_index, floor));
    assert_eq!(slave_counters(i).reads_refused, refused);
}

/// Flips a payload byte of the `Begin` in the middle of the last sealed relay
/// segment of a stopped slave; returns its index. Replay then applies (to
/// memory only) every transaction before it, and stops there.
fn corrupt_a_begin(data_dir: &Path) -> u64 {
    let segments = tern_integration::binlog_segments(data_dir).unwrap();
    assert!(segments.len() >= 2, "the relay log has sealed segments");
    let path = &segments[segments.len() - 2].1;
    let mut bytes = std::fs::read(path).unwrap();
    let mut begins = Vec::new();
    let mut offset = 0;
    for r in Records::new(&bytes) {
        let (ev, raw) = r.unwrap();
        if ev.kind.tag() == KindTag::Begin {
            begins.push((offset, ev.index));
        }
        offset += raw.len();
    }
    let (offset, index) = begins[begins.len() / 2];
    bytes[offset + HEADER_LEN + 1] ^= 0x40;
    std::fs::write(path, &bytes).unwrap();
    std::fs::File::open(path).unwrap().sync_all().unwrap();
    eprintln!(
        "flipped a byte of relay record {index} in {}",
        path.display()
    );
    index
}

/// Starts a master and a slave with small relay segments, writes the
/// counters, waits until the slave applied everything and reads it there;
/// then SIGKILLs the slave (before it flushed: it flushes every 30 s and on a
/// clean stop, so its RocksDB holds the state as of its first sync) and stops
/// the master.
async fn setup_then_stop(dir: &TestDir) -> (Node, Node, Reads, Vec<i64>, u64) {
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let slave = Node::start_slave(
        &dir.join("slave"),
        &master.url(),
        &[("TERN__BINLOG__SEGMENT_BYTES", SEGMENT_BYTES)],
        &[],
    )
    .await
    .unwrap();
    let values = write_counters(&master).await;
    let last = converge(&master, &[&slave]).await;
    let mut reads = Reads {
        served: 0,
        values: BTreeMap::new(),
        refused: 0,
    };
    assert!(reads.read_all(&slave).await);
    assert_eq!(reads.served, last);
    assert_eq!(reads.values.values().copied().collect::<Vec<_>>(), values);
    let (mut master, mut slave) = (master, slave);
    slave.sigkill().unwrap();
    master.sigterm_and_wait().await.unwrap();
    (master, slave, reads, values, last)
}

/// Brings the master back and waits until the slave serves again; then every
/// read is at the master's last index with its values, and the slave has the
/// master's Checksum.
async fn recover(master: &mut Node, slave: &Node, reads: &mut Reads, values: &[i64], last: u64) {
    master.restart().await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !reads.read_all(slave).await {
        assert!(
            Instant::now() < deadline,
            "the slave does not serve reads {DEADLINE:?} after its master came back ({} refused)",
            reads.refused
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(converge(master, &[slave]).await, last);
    assert!(reads.read_all(slave).await);
    assert_eq!(reads.served, last);
    assert_eq!(reads.values.values().copied().collect::<Vec<_>>(), values);
    assert_eq!(
        slave.checksum().await.unwrap(),
        master.checksum().await.unwrap()
    );
    let i = slave.info().await.unwrap();
    assert_eq!(i.read_floor, last);
    assert_eq!(i.reads_blocked, "");
    assert_eq!(slave_counters(&i).duplicates_skipped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_discard_after_unflushed_apply_never_serves_an_older_state() {
    let dir = TestDir::new("monotonic-reads-discard");
    let (mut master, mut slave, mut reads, values, last) = setup_then_stop(&dir).await;
    let damaged = corrupt_a_begin(&slave.data_dir);
    assert!(damaged < last);

    // Start 1: replay stops at the damaged record and the relay log is cut there.
    let i = slave.restart().await.unwrap();
    assert_eq!(
        log_count(&slave, "relay log is corrupt after the applied index"),
        1,
        "the damaged record was after the durable applied index"
    );
    let applied = i.applied_index;
    assert_eq!(
        applied,
        damaged - 1,
        "replay applied everything before the damage"
    );
    assert!(!reads.read_all(&slave).await);
    assert_eq!(reads.refused, (KEYS + 1) as u64);
    assert_blocked(&slave.info().await.unwrap(), last, reads.refused);

    // Start 2, after a SIGKILL before any flush: the state the first start
    // replayed was flushed before the relay log was cut, so nothing more is
    // lost, and the floor is still there.
    slave.sigkill().unwrap();
    let i = slave.restart().await.unwrap();
    assert_eq!(i.applied_index, applied);
    assert_eq!(i.replayed_on_start, 0);
    assert_eq!(
        log_count(&slave, "relay log does not continue the state"),
        0
    );
    assert!(!reads.read_all(&slave).await);
    assert_blocked(&slave.info().await.unwrap(), last, KEYS as u64 + 1);
    assert_eq!(reads.refused, 2 * (KEYS + 1) as u64);

    recover(&mut master, &slave, &mut reads, &values, last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_relay_tail_never_serves_an_older_state() {
    let dir = TestDir::new("monotonic-reads-tail");
    let (mut master, mut slave, mut reads, values, last) = setup_then_stop(&dir).await;
    // The Commit of the last transaction, served above, fails its checksum:
    // opening the relay log cuts that transaction.
    let (index, kind) = support::damage_binlog_tail(&slave.data_dir, TailDamage::BadCrc);
    assert_eq!((index, kind), (last, KindTag::Commit));
    let i = slave.restart().await.unwrap();
    assert!(i.applied_index < last, "applied {}", i.applied_index);
    assert!(!reads.read_all(&slave).await);
    assert_blocked(&slave.info().await.unwrap(), last, reads.refused);
    recover(&mut master, &slave, &mut reads, &values, last).await;
}
