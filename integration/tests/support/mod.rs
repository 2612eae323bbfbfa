//! Helpers shared by the `repl_*` replication tests: starting a master and its
//! slaves, waiting (bounded) for convergence, comparing data on every node,
//! a load of large multi-key transactions, and a hand-written `Sync` client
//! for protocol abuse.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_common::proto::admin::v1 as admin;
use tern_common::proto::kv::v1::{self as kv, kv_client::KvClient};
use tern_common::proto::replication::v1 as pb;
use tern_common::proto::replication::v1::replication_client::ReplicationClient;
use tern_integration::workload::LOAD_REQUEST_TIMEOUT;
use tern_integration::{Node, Workload};
use tonic::Code;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Overall deadline of every "wait until" loop in these tests.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// Poll period of the "wait until" loops.
pub const POLL: Duration = Duration::from_millis(100);

/// Link timeout and heartbeat for tests that kill or freeze nodes: a dead
/// link is noticed within 1.5 s.
pub const FAST_LINK: [(&str, &str); 2] = [
    ("TERN__SYNC__LINK_TIMEOUT_MS", "1500"),
    ("TERN__SYNC__HEARTBEAT_MS", "300"),
];

/// Puts `<prefix><i:05>` = `<prefix>-value-<i>` for `i` in `0..n`, one
/// request each; returns the last commit index.
pub async fn put_keys(node: &Node, prefix: &str, n: usize) -> u64 {
    let mut kv = node.kv();
    let mut last = 0;
    for i in 0..n {
        let r = kv
            .put(kv::PutRequest {
                key: format!("{prefix}{i:05}").into_bytes().into(),
                value: format!("{prefix}-value-{i}").into_bytes().into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("put {prefix}{i}: {e}"));
        last = r.into_inner().index;
    }
    last
}

/// Polls `f` every [`POLL`] until it returns `Ok(Some(v))`; panics with `what`
/// and the last `Err`/state description after `timeout`. `f` returning
/// `Ok(None)` means "not yet"; `Err(e)` means "not yet, and here is why" (the
/// last such error is shown on timeout).
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("(no answer yet)");
    loop {
        match f().await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Starts a slave of `master` in `<dir>/<name>`.
pub async fn start_slave(
    dir: &tern_integration::TestDir,
    name: &str,
    master: &Node,
    env: &[(&str, &str)],
) -> Node {
    Node::start_slave(&dir.join(name), &master.url(), env, &[])
        .await
        .unwrap_or_else(|e| panic!("starting slave {name}: {e:#}"))
}

fn counters(i: &admin::InfoResponse) -> admin::Counters {
    i.counters.unwrap_or_default()
}

fn link(i: &admin::InfoResponse) -> admin::LinkInfo {
    i.link.clone().unwrap_or_default()
}

/// One line describing a slave's Info, for failure messages and logs.
pub fn describe_slave(i: &admin::InfoResponse) -> String {
    let l = link(i);
    let c = counters(i);
    format!(
        "applied {} last {} received {} link {:?} session {} last_error {:?} \
         partial_syncs {} full_syncs {} reconnects {} dups {} stale {}",
        i.applied_index,
        i.last_index,
        l.received_index,
        l.state,
        l.session_id,
        l.last_error,
        c.partial_syncs,
        c.full_syncs,
        c.reconnects,
        c.duplicates_skipped,
        c.stale_messages
    )
}

pub fn slave_counters(i: &admin::InfoResponse) -> admin::Counters {
    counters(i)
}

pub fn slave_link(i: &admin::InfoResponse) -> admin::LinkInfo {
    link(i)
}

/// Waits (bounded) until the master has applied its whole binlog and every
/// slave has applied exactly up to the master's last index; returns that index.
/// The load must be stopped, or the target keeps moving.
pub async fn converge(master: &Node, slaves: &[&Node]) -> u64 {
    wait_until(
        "slaves to apply up to the master's last index",
        DEADLINE,
        || async move {
            let mi = master.info().await.map_err(|e| format!("{e:#}"))?;
            let target = mi.last_index;
            let mut states = vec![format!(
                "master applied {} last {}",
                mi.applied_index, mi.last_index
            )];
            let mut done = mi.applied_index == target;
            for (n, s) in slaves.iter().enumerate() {
                match s.info().await {
                    Ok(si) => {
                        if si.applied_index > target {
                            let d = describe_slave(&si);
                            panic!("slave {n} is AHEAD of the master's last index {target}: {d}");
                        }
                        done &= si.applied_index == target;
                        states.push(format!(
                            "slave {n} (port {}): {}",
                            s.port,
                            describe_slave(&si)
                        ));
                    }
                    Err(e) => {
                        done = false;
                        states.push(format!("slave {n}: {e:#}"));
                    }
                }
            }
            if done {
                Ok(Some(target))
            } else {
                Err(states.join("; "))
            }
        },
    )
    .await
}

/// Converges, then asserts: the same Checksum (index, digest, keys) on the
/// master and every slave, the workload's exactly-once checks pass on every
/// node, and no slave skipped a duplicate. Returns the converged index.
pub async fn assert_replicas_equal(master: &Node, slaves: &[&Node], work: &Workload) -> u64 {
    let target = converge(master, slaves).await;
    let mc = master.checksum().await.expect("Checksum on the master");
    assert_eq!(
        mc.index, target,
        "the master moved after convergence (is a load still running?)"
    );
    let summary = work
        .check(&mut master.kv())
        .await
        .unwrap_or_else(|e| panic!("workload check on the master: {e:#}"));
    eprintln!("master at {target}: {} keys; {summary}", mc.keys);
    for (n, s) in slaves.iter().enumerate() {
        let sc = s.checksum().await.expect("Checksum on a slave");
        assert_eq!(
            sc, mc,
            "slave {n} (port {}) Checksum differs from the master's at index {target}",
            s.port
        );
        work.check(&mut s.kv())
            .await
            .unwrap_or_else(|e| panic!("workload check on slave {n} (port {}): {e:#}", s.port));
        let si = s.info().await.expect("Info on a slave");
        assert_eq!(
            counters(&si).duplicates_skipped,
            0,
            "slave {n} skipped duplicate events (the master re-sent applied binlog): {}",
            describe_slave(&si)
        );
        assert_eq!(si.role, "slave");
        let mi = master.info().await.expect("Info on the master");
        assert_eq!(si.repl_id, mi.repl_id, "slave {n} follows another history");
        assert_relay_identical(master, s, target);
    }
    target
}

/// The valid records of `<data_dir>/binlog` with index in `[from, upto]`,
/// concatenated as on disk, and the index of the first record of the log.
pub fn binlog_records(data_dir: &std::path::Path, from: u64, upto: u64) -> (u64, Vec<u8>) {
    let segs = tern_integration::binlog_segments(data_dir).unwrap_or_else(|e| panic!("{e:#}"));
    let mut out = Vec::new();
    let mut first = None;
    let mut next = None;
    for (_, path) in &segs {
        let bytes =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for r in tern_common::record::Records::new(&bytes) {
            let Ok((ev, raw)) = r else { break };
            first.get_or_insert(ev.index);
            if ev.index > upto {
                break;
            }
            if let Some(n) = next {
                assert_eq!(
                    ev.index,
                    n,
                    "{}: records are not contiguous",
                    path.display()
                );
            }
            next = Some(ev.index + 1);
            if ev.index >= from {
                out.extend_from_slice(raw);
            }
        }
    }
    (first.unwrap_or(0), out)
}

/// The slave's relay log holds exactly the master's binlog bytes, from where
/// the relay log starts (1, or after the snapshot of a full sync) up to `upto`.
pub fn assert_relay_identical(master: &Node, slave: &Node, upto: u64) {
    let (sf, _) = binlog_records(&slave.data_dir, u64::MAX, 0);
    let (mf, _) = binlog_records(&master.data_dir, u64::MAX, 0);
    let from = sf.max(mf).max(1);
    let (_, m) = binlog_records(&master.data_dir, from, upto);
    let (_, s) = binlog_records(&slave.data_dir, from, upto);
    if m != s {
        let at = m
            .iter()
            .zip(&s)
            .position(|(a, b)| a != b)
            .unwrap_or(m.len().min(s.len()));
        panic!(
            "the slave's relay log (port {}) is not byte-identical to the master's binlog over \
             [{from}, {upto}]: {} vs {} bytes, first difference at byte {at}",
            slave.port,
            s.len(),
            m.len()
        );
    }
}

/// The master's (or a slave's) `counters` from Info.
pub async fn node_counters(node: &Node) -> admin::Counters {
    counters(&node.info().await.expect("Admin.Info"))
}

/// Waits until the slave's link is `connected` with at least `min_partial`
/// partial syncs in this process; returns its Info.
pub async fn wait_connected(slave: &Node, min_partial: u64) -> admin::InfoResponse {
    wait_until(
        &format!("slave on port {} to (re)connect", slave.port),
        DEADLINE,
        || async move {
            let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
            if link(&i).state == "connected" && counters(&i).partial_syncs >= min_partial {
                Ok(Some(i))
            } else {
                Err(describe_slave(&i))
            }
        },
    )
    .await
}

/// Converges, then asserts `slave` has the master's Checksum, its link is
/// connected and it full-synced `full_syncs` times in this process; returns
/// the Checksum.
pub async fn assert_slave_matches(
    master: &Node,
    slave: &Node,
    full_syncs: u64,
) -> admin::ChecksumResponse {
    let index = converge(master, &[slave]).await;
    let mc = master.checksum().await.expect("Checksum on the master");
    let sc = slave.checksum().await.expect("Checksum on the slave");
    assert_eq!(sc, mc, "the slave's Checksum differs at index {index}");
    let si = slave.info().await.expect("Info on the slave");
    let d = describe_slave(&si);
    assert_eq!(counters(&si).full_syncs, full_syncs, "{d}");
    assert_eq!(link(&si).state, "connected", "{d}");
    mc
}

/// Waits until the slave's link has failed at least twice with a
/// `last_error` containing one of `words` (lowercase), then asserts it never
/// connected nor received anything (a refused token or certificate); returns
/// its Info.
pub async fn wait_link_refused(slave: &Node, words: &[&str]) -> admin::InfoResponse {
    let i = wait_until(
        &format!("slave on port {} to report a refusal {words:?}", slave.port),
        DEADLINE,
        || async move {
            let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
            let e = link(&i).last_error.to_lowercase();
            if counters(&i).reconnects >= 2 && words.iter().any(|w| e.contains(w)) {
                Ok(Some(i))
            } else {
                Err(describe_slave(&i))
            }
        },
    )
    .await;
    let d = describe_slave(&i);
    assert_ne!(link(&i).state, "connected", "{d}");
    assert_eq!(link(&i).session_id, 0, "{d}");
    assert_eq!(counters(&i).full_syncs, 0, "{d}");
    assert_eq!(i.applied_index, 0, "{d}");
    eprintln!(
        "slave on port {}: last_error {:?}",
        slave.port,
        link(&i).last_error
    );
    i
}

/// Every (key, value) of a node, paging through Scan; also the index of the
/// first page.
pub async fn scan_all(kv: &mut KvClient<Channel>) -> (Vec<(Bytes, Bytes)>, u64) {
    let mut out = Vec::new();
    let mut start = Bytes::new();
    let mut index = None;
    loop {
        let r = kv
            .scan(kv::ScanRequest {
                start: start.clone(),
                limit: 500,
                ..Default::default()
            })
            .await
            .expect("Scan")
            .into_inner();
        index.get_or_insert(r.index);
        let last = r.items.last().map(|kv| kv.key.clone());
        out.extend(r.items.into_iter().map(|i| (i.key, i.value)));
        match (r.more, last) {
            (true, Some(k)) => {
                let mut next = k.to_vec();
                next.push(0);
                start = Bytes::from(next);
            }
            _ => break,
        }
    }
    (out, index.unwrap_or(0))
}

/// A load of large transactions: each Txn puts (or, one in seven, deletes)
/// `puts` keys of `value_len` bytes (`big/<client>/<j>`) and adds to two
/// counters of `work` (recorded in its model, so the exactly-once counter
/// check covers them). Each client pauses `pause` after each acknowledged
/// transaction, so a slave can keep up.
pub struct BigTxnLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<(u64, u64, Vec<String>)>>,
}

/// (acked, failed, unexpected errors) of a [`BigTxnLoad`].
#[derive(Debug)]
pub struct BigTxnStats {
    pub acked: u64,
    pub failed: u64,
    pub unexpected: Vec<String>,
}

impl BigTxnLoad {
    pub fn start(
        work: &Arc<Workload>,
        url: &str,
        clients: u64,
        puts: usize,
        value_len: usize,
        pause: Duration,
    ) -> BigTxnLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|client| {
                let work = work.clone();
                let stop = stop.clone();
                let acked = acked.clone();
                let mut kv = tern_integration::node::kv_client(tern_integration::node::channel(
                    url,
                    LOAD_REQUEST_TIMEOUT,
                ));
                tokio::spawn(async move {
                    let mut rng = StdRng::from_os_rng();
                    let (mut ok, mut failed, mut unexpected) = (0u64, 0u64, Vec::new());
                    let nc = work.counters.keys();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let mut ops = Vec::with_capacity(puts + 2);
                        let a = rng.random_range(0..nc);
                        let b = (a + rng.random_range(1..nc.max(2))) % nc;
                        let (da, db) =
                            (rng.random_range(1..=1000i64), rng.random_range(1..=1000i64));
                        let incr = |k: usize, delta: i64| kv::Op {
                            op: Some(kv::op::Op::IncrBy(kv::IncrByRequest {
                                key: work.counters.key(k),
                                delta,
                                ..Default::default()
                            })),
                        };
                        ops.push(incr(a, da));
                        for j in 0..puts {
                            if j == puts / 2 {
                                ops.push(incr(b, db));
                            }
                            let key = Bytes::from(format!("big/{client}/{j:04}"));
                            // Every 7th key (a different set each time) is deleted instead.
                            let op = if (j as u64 + n).is_multiple_of(7) {
                                kv::op::Op::Delete(kv::DeleteRequest {
                                    key,
                                    ..Default::default()
                                })
                            } else {
                                let mut v = format!("{client}:{n}:{j}:").into_bytes();
                                v.resize(value_len, b'a' + (n % 26) as u8);
                                kv::op::Op::Put(kv::PutRequest {
                                    key,
                                    value: Bytes::from(v),
                                    ..Default::default()
                                })
                            };
                            ops.push(kv::Op { op: Some(op) });
                        }
                        let r = kv
                            .txn(kv::TxnRequest {
                                ops,
                                ..Default::default()
                            })
                            .await
                            .map(|r| r.into_inner().index);
                        work.counters
                            .record(&[(a, da), (b, db)], r.as_ref().map(|i| *i));
                        match r {
                            Ok(_) => {
                                ok += 1;
                                acked.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(pause).await;
                            }
                            Err(s) => {
                                failed += 1;
                                if unexpected_code(s.code()) && unexpected.len() < 20 {
                                    unexpected.push(format!("{:?}: {}", s.code(), s.message()));
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    (ok, failed, unexpected)
                })
            })
            .collect();
        BigTxnLoad { stop, acked, tasks }
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` more transactions than now are acknowledged.
    pub async fn wait_more(&self, n: u64) {
        let target = self.acked() + n;
        wait_until(
            "the big-Txn load to make progress",
            DEADLINE,
            || async move {
                let a = self.acked();
                if a >= target {
                    Ok(Some(()))
                } else {
                    Err(format!("{a} of {target} acknowledged"))
                }
            },
        )
        .await
    }

    pub async fn stop(self) -> BigTxnStats {
        self.stop.store(true, Ordering::Relaxed);
        let mut st = BigTxnStats {
            acked: 0,
            failed: 0,
            unexpected: Vec::new(),
        };
        for t in self.tasks {
            let (a, f, u) = t.await.expect("big-Txn client panicked");
            st.acked += a;
            st.failed += f;
            st.unexpected.extend(u);
        }
        st
    }
}

pub use tern_integration::workload::unexpected_code;

/// Waits until the load has `n` more acknowledged writes than now.
pub async fn wait_more_acked(load: &tern_integration::Load, n: u64) {
    let target = load.acked() + n;
    load.wait_acked(target, DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// A hand-written replication client on one `Sync` stream.
pub struct Rogue {
    pub tx: tokio::sync::mpsc::Sender<pb::SlaveMessage>,
    pub rx: tonic::Streaming<pb::MasterMessage>,
}

/// How long a rogue waits for one message from the master.
pub const ROGUE_RECV_TIMEOUT: Duration = Duration::from_secs(20);

impl Rogue {
    /// Opens a `Sync` stream to `url` whose first message is `first`.
    pub async fn open(url: &str, first: pb::slave_message::Msg) -> Rogue {
        Rogue::open_raw(url, pb::SlaveMessage { msg: Some(first) }).await
    }

    pub async fn open_raw(url: &str, first: pb::SlaveMessage) -> Rogue {
        let ch = Endpoint::from_shared(url.to_string())
            .expect("URL")
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connecting the rogue client");
        let mut client = ReplicationClient::new(ch)
            .max_decoding_message_size(tern_common::limits::MAX_MESSAGE_BYTES * 2);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(first).await.expect("queueing the first message");
        let resp = tokio::time::timeout(ROGUE_RECV_TIMEOUT, client.sync(ReceiverStream::new(rx)))
            .await
            .expect("Sync call did not answer")
            .expect("Sync call failed");
        Rogue {
            tx,
            rx: resp.into_inner(),
        }
    }

    pub async fn send(&self, msg: pb::slave_message::Msg) {
        self.send_raw(pb::SlaveMessage { msg: Some(msg) }).await
    }

    pub async fn send_raw(&self, msg: pb::SlaveMessage) {
        self.tx
            .send(msg)
            .await
            .expect("the rogue's request stream is closed");
    }

    /// The next message that is not a Heartbeat: `Ok(Some)`, `Ok(None)` at the
    /// end of the stream, `Err(status)` when the master ended it with an error.
    pub async fn next(&mut self) -> Result<Option<pb::master_message::Msg>, tonic::Status> {
        loop {
            let m = tokio::time::timeout(ROGUE_RECV_TIMEOUT, self.rx.message())
                .await
                .expect("no message from the master within the rogue timeout")?;
            match m {
                None => return Ok(None),
                Some(pb::MasterMessage {
                    msg: Some(pb::master_message::Msg::Heartbeat(_)),
                }) => continue,
                Some(pb::MasterMessage { msg }) => return Ok(msg),
            }
        }
    }

    /// Reads the TrySyncResponse.
    pub async fn try_sync_response(&mut self) -> pb::TrySyncResponse {
        match self.next().await {
            Ok(Some(pb::master_message::Msg::TrySyncResponse(r))) => r,
            other => panic!("expected a TrySyncResponse, got {other:?}"),
        }
    }

    /// The next BinlogBatch.
    pub async fn batch(&mut self) -> pb::BinlogBatch {
        match self.next().await {
            Ok(Some(pb::master_message::Msg::Batch(b))) => b,
            other => panic!("expected a BinlogBatch, got {other:?}"),
        }
    }

    /// Reads (skipping batches and heartbeats) until the master ends the
    /// stream with an error status, and returns it.
    pub async fn expect_error(&mut self, what: &str) -> tonic::Status {
        loop {
            match self.next().await {
                Err(s) => return s,
                Ok(None) => panic!("{what}: the master ended the stream without an error status"),
                Ok(Some(pb::master_message::Msg::Batch(_))) => continue,
                Ok(Some(m)) => panic!("{what}: unexpected message {m:?}"),
            }
        }
    }
}

/// A TrySync message.
pub fn try_sync(slave_id: &str, repl_id: &str, index: u64, seq: u64) -> pb::slave_message::Msg {
    pb::slave_message::Msg::TrySync(pb::TrySync {
        slave_id: slave_id.to_string(),
        repl_id: repl_id.to_string(),
        index,
        addr: String::new(),
        seq,
    })
}

/// The seq of the transaction whose Commit is event `index` in the binlog of
/// `data_dir` (0 for index 0), read from the segment files; what a real slave
/// at `index` sends in its TrySync.
pub fn commit_seq(data_dir: &std::path::Path, index: u64) -> u64 {
    if index == 0 {
        return 0;
    }
    let segs = tern_integration::binlog_segments(data_dir).unwrap_or_else(|e| panic!("{e:#}"));
    for (first, path) in segs.iter().rev() {
        if *first > index {
            continue;
        }
        let bytes =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for r in tern_common::record::Records::new(&bytes) {
            match r {
                Ok((ev, _)) if ev.index == index => match ev.kind {
                    tern_common::record::EventKind::Commit { seq } => return seq,
                    other => panic!("event {index} is not a Commit: {other:?}"),
                },
                Ok(_) => {}
                Err(e) => panic!("reading {}: {e}", path.display()),
            }
        }
    }
    panic!("no Commit at {index} in {}", data_dir.display())
}

/// The first-send ack of a session.
pub fn first_ack(session_id: u64, index: u64) -> pb::slave_message::Msg {
    pb::slave_message::Msg::Ack(pb::BinlogAck {
        session_id,
        first_send: true,
        received_index: index,
        applied_index: index,
        batch_first_index: 0,
        batch_last_index: 0,
    })
}

/// An ack of batch `[first, last]` claiming `received` durable (applied = received).
pub fn batch_ack(session_id: u64, first: u64, last: u64, received: u64) -> pb::slave_message::Msg {
    pb::slave_message::Msg::Ack(pb::BinlogAck {
        session_id,
        first_send: false,
        received_index: received,
        applied_index: received,
        batch_first_index: first,
        batch_last_index: last,
    })
}

/// Asserts `s` has `code` and a message containing `word`.
pub fn assert_status(what: &str, s: &tonic::Status, code: Code, word: &str) {
    assert_eq!(
        s.code(),
        code,
        "{what}: wrong status code; message {:?}",
        s.message()
    );
    assert!(
        s.message().contains(word),
        "{what}: status message {:?} should mention {word:?}",
        s.message()
    );
}

/// The last complete event of the binlog (or relay log) in `<data_dir>/binlog`,
/// read straight from the segment files (`{first_index:020}.binlog`, framed
/// records): `(index, kind)`, or None when it holds no event. Meant for a
/// stopped or killed process.
pub fn binlog_tail(data_dir: &std::path::Path) -> Option<(u64, tern_common::record::KindTag)> {
    let segs = tern_integration::binlog_segments(data_dir).unwrap_or_else(|e| panic!("{e:#}"));
    for (_, path) in segs.iter().rev() {
        let bytes =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut last = None;
        for r in tern_common::record::Records::new(&bytes) {
            match r {
                Ok((ev, _)) => last = Some((ev.index, ev.kind.tag())),
                Err(_) => break,
            }
        }
        if last.is_some() {
            return last;
        }
    }
    None
}

/// SIGSTOPs `node` and waits until every one of its threads is really stopped
/// (kill(2) returns before the signal takes effect, so a thread may still be
/// inside a write), so that its files can be inspected.
pub async fn sigstop_and_wait(node: &Node) {
    node.sigstop().unwrap();
    let pid = node.pid().expect("the node runs");
    let tasks = format!("/proc/{pid}/task");
    wait_until("every thread of the node to stop", DEADLINE, || {
        let tasks = tasks.clone();
        async move {
            let mut running = Vec::new();
            for e in std::fs::read_dir(&tasks).map_err(|e| format!("{tasks}: {e}"))? {
                let Ok(e) = e else { continue };
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    continue;
                };
                // "pid (comm) S ...": the state follows the last ')'.
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .unwrap_or("?");
                if state != "T" && state != "t" {
                    running.push(format!("{}={state}", e.file_name().to_string_lossy()));
                }
            }
            if running.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!("threads not stopped: {running:?}"))
            }
        }
    })
    .await;
}

/// Lines of a node's log containing `needle`.
pub fn log_count(node: &Node, needle: &str) -> usize {
    std::fs::read_to_string(&node.log_path)
        .map(|t| t.lines().filter(|l| l.contains(needle)).count())
        .unwrap_or(0)
}

/// A paced [`Workload`] load ([`Workload::start_paced_load`]) for the fault tests.
pub struct PacedLoad(tern_integration::Load);

impl PacedLoad {
    pub fn start(work: &Arc<Workload>, url: &str, clients: usize, pause: Duration) -> PacedLoad {
        PacedLoad(work.start_paced_load(url, clients, pause))
    }

    pub fn acked(&self) -> u64 {
        self.0.acked()
    }

    /// Waits (bounded) until `n` more writes than now are acknowledged.
    pub async fn wait_more(&self, n: u64) {
        let target = self.acked() + n;
        wait_until("the paced load to make progress", DEADLINE, || async move {
            let a = self.acked();
            if a >= target {
                Ok(Some(()))
            } else {
                Err(format!("{a} of {target} acknowledged"))
            }
        })
        .await
    }

    pub async fn stop(self) -> tern_integration::LoadStats {
        self.0.stop().await
    }
}

/// How [`damage_binlog_tail`] damages the last record of a binlog.
#[derive(Clone, Copy, Debug)]
pub enum TailDamage {
    /// Cut the last record short (a torn write).
    Torn,
    /// Flip a bit in the last record's payload (its CRC no longer matches).
    BadCrc,
}

/// Damages the last complete record of `<data_dir>/binlog` (of a stopped
/// process); returns that record's `(index, kind)`.
pub fn damage_binlog_tail(
    data_dir: &std::path::Path,
    how: TailDamage,
) -> (u64, tern_common::record::KindTag) {
    let segs = tern_integration::binlog_segments(data_dir).unwrap_or_else(|e| panic!("{e:#}"));
    for (_, path) in segs.iter().rev() {
        let bytes =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut it = tern_common::record::Records::new(&bytes);
        let mut last = None;
        loop {
            let start = it.offset();
            match it.next() {
                Some(Ok((ev, raw))) => last = Some((start, raw.len(), ev.index, ev.kind.tag())),
                _ => break,
            }
        }
        let Some((start, len, index, kind)) = last else {
            continue;
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        match how {
            TailDamage::Torn => f.set_len((start + len - 3) as u64).unwrap(),
            TailDamage::BadCrc => {
                use std::os::unix::fs::FileExt;
                let at = start + len - 1;
                f.write_all_at(&[bytes[at] ^ 0x01], at as u64).unwrap();
            }
        }
        f.sync_all().unwrap();
        return (index, kind);
    }
    panic!("no record to damage in {}/binlog", data_dir.display());
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/PID/status`),
/// or None once the process is gone.
pub fn vm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(kb * 1024)
}
