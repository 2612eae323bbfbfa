//! The master's side of full resync and binlog retention, over real processes
//! with a hand-written `DbSync` / `Sync` client:
//!
//! - a DbSync stream is a consistent RocksDB checkpoint: its header's index is
//!   the applied index read from inside the checkpoint, every chunk and every
//!   reassembled file matches its crc32c, and the reassembled checkpoint holds
//!   exactly the master's data (same Checksum);
//! - two DbSyncs in quick succession share one snapshot; the snapshot pins the
//!   binlog (Info.pins) until it has been idle for `sync.snapshot_idle_ms`, then
//!   its pin and directory go; a resume of a gone snapshot is NOT_FOUND;
//! - bad requests are INVALID_ARGUMENT; resume sends only what is missing;
//! - snapshots do not survive a master restart;
//! - retention by size, never past a connected (SIGSTOPped) slave until the
//!   hard cap, then Info says that slave needs a full sync;
//! - TrySync with an empty repl id is NEED_FULL_SYNC / UNKNOWN_REPL_ID.
//!
//! Run `cargo build --bins` first.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tern_common::proto::admin::v1 as admin;
use tern_common::proto::kv::v1 as kv;
use tern_common::proto::replication::v1 as pb;
use tern_common::proto::replication::v1::replication_client::ReplicationClient;
use tern_integration::{Node, TestDir};
use tonic::Code;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------- helpers

/// crc32c (Castagnoli), bitwise: the integration crate has no crc32c dependency.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[test]
fn crc32c_matches_the_reference_vector() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
}

fn repl(node: &Node) -> ReplicationClient<Channel> {
    ReplicationClient::new(node.channel()).max_decoding_message_size(64 << 20)
}

async fn start_master(dir: &TestDir, name: &str, env: &[(&str, &str)]) -> Node {
    Node::start_master(&dir.join(name), env, &[])
        .await
        .unwrap_or_else(|e| panic!("starting master {name}: {e:#}"))
}

fn db_sync_req(snapshot_id: &str, have: &[(&str, u64)]) -> pb::DbSyncRequest {
    pb::DbSyncRequest {
        slave_id: "test-client".into(),
        snapshot_id: snapshot_id.into(),
        have: have
            .iter()
            .map(|(n, o)| pb::FileOffset {
                name: n.to_string(),
                offset: *o,
            })
            .collect(),
    }
}

/// Everything one DbSync stream delivered.
#[derive(Debug)]
struct Received {
    header: pb::DbSyncHeader,
    chunks: Vec<pb::FileChunk>,
    done: pb::DbSyncDone,
}

/// Calls DbSync and reads the stream to its end (or to `max_chunks` data
/// chunks, then drops it: `done` is then the default).
async fn db_sync(
    node: &Node,
    req: pb::DbSyncRequest,
    max_chunks: Option<usize>,
) -> Result<Received, tonic::Status> {
    let mut stream = repl(node).db_sync(req).await?.into_inner();
    let header = match stream.message().await? {
        Some(pb::DbSyncChunk {
            kind: Some(pb::db_sync_chunk::Kind::Header(h)),
        }) => h,
        other => panic!("the first DbSync message is not a header: {other:?}"),
    };
    let mut chunks = Vec::new();
    loop {
        if max_chunks.is_some_and(|m| chunks.len() >= m) {
            return Ok(Received {
                header,
                chunks,
                done: pb::DbSyncDone::default(),
            });
        }
        match stream.message().await? {
            Some(pb::DbSyncChunk {
                kind: Some(pb::db_sync_chunk::Kind::Data(c)),
            }) => chunks.push(c),
            Some(pb::DbSyncChunk {
                kind: Some(pb::db_sync_chunk::Kind::Done(d)),
            }) => {
                assert!(
                    stream.message().await?.is_none(),
                    "a message after DbSyncDone"
                );
                return Ok(Received {
                    header,
                    chunks,
                    done: d,
                });
            }
            other => panic!("unexpected DbSync message: {other:?}"),
        }
    }
}

/// Applies `chunks` to `files` (name → bytes so far), checking every chunk's
/// crc32c, that it belongs to a file of the header and continues it exactly.
fn reassemble(
    header: &pb::DbSyncHeader,
    files: &mut HashMap<String, Vec<u8>>,
    chunks: &[pb::FileChunk],
) {
    let order: Vec<&str> = header.files.iter().map(|f| f.name.as_str()).collect();
    let mut last_file = 0;
    for c in chunks {
        let pos = order
            .iter()
            .position(|n| *n == c.name)
            .unwrap_or_else(|| panic!("chunk for {:?}, not a file of the header", c.name));
        assert!(pos >= last_file, "chunks are not in header file order");
        last_file = pos;
        assert_eq!(
            crc32c(&c.data),
            c.crc32c,
            "chunk {} @ {} crc32c",
            c.name,
            c.offset
        );
        assert!(c.data.len() <= 1 << 20, "chunk larger than 1 MiB");
        let buf = files.entry(c.name.clone()).or_default();
        assert_eq!(
            c.offset,
            buf.len() as u64,
            "chunk of {} does not continue the file",
            c.name
        );
        buf.extend_from_slice(&c.data);
    }
}

/// Every file of the header is complete and matches its size and crc32c.
fn assert_files_match(header: &pb::DbSyncHeader, files: &HashMap<String, Vec<u8>>) {
    let mut total = 0;
    for f in &header.files {
        let data = files
            .get(&f.name)
            .unwrap_or_else(|| panic!("file {} never received", f.name));
        assert_eq!(data.len() as u64, f.size, "size of {}", f.name);
        assert_eq!(crc32c(data), f.crc32c, "crc32c of {}", f.name);
        total += f.size;
    }
    assert_eq!(total, header.total_bytes, "header total_bytes");
    assert_eq!(files.len(), header.files.len(), "files outside the header");
}

fn write_files(dir: &Path, files: &HashMap<String, Vec<u8>>) {
    for (name, data) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: incompressible enough for LZ4, reproducible.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `n` puts of `value_bytes` random bytes each, 8 concurrent writers.
async fn write_load(node: &Node, prefix: &str, n: usize, value_bytes: usize) {
    let writers = 8;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut kv = node.kv();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(writers) {
                kv.put(kv::PutRequest {
                    key: format!("{prefix}-{i:08}").into_bytes().into(),
                    value: random_bytes(value_bytes, (i as u64) << 8 | 7).into(),
                    ..Default::default()
                })
                .await
                .expect("put on the master");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
}

async fn info(node: &Node) -> admin::InfoResponse {
    node.info().await.expect("Admin.Info")
}

fn pins(i: &admin::InfoResponse) -> Vec<(String, u64)> {
    i.pins.iter().map(|p| (p.owner.clone(), p.index)).collect()
}

fn full_syncs(i: &admin::InfoResponse) -> u64 {
    i.counters.unwrap_or_default().full_syncs
}

/// Polls `f` until it returns `Some`, at most `timeout`; panics with the last
/// state `f` described.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(state) => {
                if Instant::now() > deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last state: {state}");
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

fn snapshot_entries(data_dir: &Path) -> Vec<String> {
    match std::fs::read_dir(data_dir.join("snapshots")) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn db_sync_streams_a_self_consistent_checkpoint_shared_and_then_released() {
    let dir = TestDir::new("fullsync-master-stream");
    let master = start_master(&dir, "master", &[("TERN__SYNC__SNAPSHOT_IDLE_MS", "1500")]).await;
    // ~6 MB of incompressible values: the SST spans several 1 MiB chunks.
    write_load(&master, "k", 1500, 4096).await;
    let mut kvc = master.kv();
    kvc.incr_by(kv::IncrByRequest {
        key: b"counter".to_vec().into(),
        delta: 42,
        ..Default::default()
    })
    .await
    .unwrap();
    let before = info(&master).await;

    let r = db_sync(&master, db_sync_req("", &[]), None).await.unwrap();
    let h = &r.header;
    // A second full sync right after shares the snapshot (the first one's
    // idle time is short: ask before checking anything).
    let r2 = db_sync(&master, db_sync_req("", &[]), None).await.unwrap();
    assert_eq!(r2.header.snapshot_id, h.snapshot_id, "snapshot shared");
    assert_eq!(r2.header.index, h.index);
    // It is pinned while it lives, and counted.
    let i = info(&master).await;
    let owner = format!("snapshot:{}", h.snapshot_id);
    assert!(
        pins(&i).contains(&(owner.clone(), h.index)),
        "pins {:?} lack {owner}@{}",
        pins(&i),
        h.index
    );
    assert_eq!(full_syncs(&i), 2);
    assert_eq!(
        snapshot_entries(&master.data_dir),
        vec![h.snapshot_id.clone()]
    );

    assert_eq!(h.repl_id, before.repl_id);
    assert_eq!(
        h.index, before.applied_index,
        "no writes since: index = applied"
    );
    assert_eq!(h.last_seq, before.last_seq);
    assert_eq!(h.bytes_to_send, h.total_bytes);
    assert_eq!(r.done.bytes_sent, h.total_bytes);
    assert!(
        h.total_bytes > 4 << 20,
        "checkpoint of {} bytes",
        h.total_bytes
    );
    assert!(
        r.chunks.len() > h.files.len(),
        "a big file should take several chunks"
    );
    let mut files = HashMap::new();
    reassemble(h, &mut files, &r.chunks);
    assert_files_match(h, &files);

    // The reassembled checkpoint tells its own position (I2) and holds exactly
    // the master's data.
    let copy = dir.join("copy");
    write_files(&copy, &files);
    let meta = tern_common::state::read_checkpoint_meta(&copy).expect("open the copied checkpoint");
    assert_eq!(meta.applied_index, h.index);
    assert_eq!(meta.last_seq, h.last_seq);
    assert_eq!(meta.repl_id.map(|r| r.to_string()), Some(h.repl_id.clone()));
    let state = tern_common::state::State::open(&copy).expect("open the copy as a state");
    let sum = state.checksum().unwrap();
    let master_sum = master.checksum().await.unwrap();
    assert_eq!(
        (sum.index, sum.digest.clone(), sum.keys),
        (master_sum.index, master_sum.digest.clone(), master_sum.keys)
    );
    assert_eq!(state.get(b"counter").unwrap(), Some(b"42".to_vec()));
    drop(state);

    // Idle for sync.snapshot_idle_ms: pin and directory go.
    wait_for(
        "the idle snapshot to be removed",
        Duration::from_secs(20),
        || async {
            let i = info(&master).await;
            let entries = snapshot_entries(&master.data_dir);
            if i.pins.is_empty() && entries.is_empty() {
                Ok(())
            } else {
                Err(format!("pins {:?}, snapshots dir {entries:?}", pins(&i)))
            }
        },
    )
    .await;
    // ... and a resume of it is refused cleanly.
    let e = db_sync(&master, db_sync_req(&h.snapshot_id, &[]), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("gone"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn db_sync_rejects_bad_requests() {
    let dir = TestDir::new("fullsync-master-bad");
    let master = start_master(&dir, "master", &[]).await;
    write_load(&master, "k", 50, 100).await;

    let e = db_sync(&master, db_sync_req("0123456789abcdef", &[]), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let mut req = db_sync_req("", &[]);
    req.slave_id = String::new();
    let e = db_sync(&master, req, None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut req = db_sync_req("", &[]);
    req.slave_id = "x".repeat(257);
    let e = db_sync(&master, req, None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = db_sync(&master, db_sync_req("", &[("CURRENT", 0)]), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "have without a snapshot: {e:?}"
    );

    let r = db_sync(&master, db_sync_req("", &[]), None).await.unwrap();
    let id = r.header.snapshot_id.clone();
    let f = r
        .header
        .files
        .iter()
        .max_by_key(|f| f.size)
        .unwrap()
        .clone();
    for have in [
        vec![("no-such-file".to_string(), 0)],
        vec![("../CURRENT".to_string(), 0)],
        vec![(f.name.clone(), f.size + 1)],
        vec![(f.name.clone(), 0), (f.name.clone(), 1)],
    ] {
        let have: Vec<(&str, u64)> = have.iter().map(|(n, o)| (n.as_str(), *o)).collect();
        let e = db_sync(&master, db_sync_req(&id, &have), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "have {have:?}: {e:?}");
    }
    // The snapshot is still usable after bad requests.
    let r2 = db_sync(&master, db_sync_req(&id, &[]), None).await.unwrap();
    assert_eq!(r2.header.snapshot_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn db_sync_resumes_with_what_the_slave_has() {
    let dir = TestDir::new("fullsync-master-resume");
    let master = start_master(&dir, "master", &[]).await;
    write_load(&master, "k", 1200, 4096).await;

    // A first attempt breaks after 2 chunks.
    let first = db_sync(&master, db_sync_req("", &[]), Some(2))
        .await
        .unwrap();
    let h = first.header.clone();
    let mut files = HashMap::new();
    reassemble(&h, &mut files, &first.chunks);
    let have: Vec<(String, u64)> = files
        .iter()
        .map(|(n, d)| (n.clone(), d.len() as u64))
        .collect();
    assert!(!have.is_empty());
    // Writes in between do not change the snapshot.
    write_load(&master, "later", 100, 100).await;
    let have_ref: Vec<(&str, u64)> = have.iter().map(|(n, o)| (n.as_str(), *o)).collect();
    let second = db_sync(&master, db_sync_req(&h.snapshot_id, &have_ref), None)
        .await
        .unwrap();
    let already: u64 = have.iter().map(|(_, o)| o).sum();
    assert_eq!(second.header.snapshot_id, h.snapshot_id);
    assert_eq!(second.header.index, h.index);
    assert_eq!(second.header.files, h.files);
    assert_eq!(second.header.bytes_to_send, h.total_bytes - already);
    assert_eq!(second.done.bytes_sent, h.total_bytes - already);
    let resent: u64 = second.chunks.iter().map(|c| c.data.len() as u64).sum();
    assert_eq!(resent, h.total_bytes - already, "only the rest is sent");
    reassemble(&second.header, &mut files, &second.chunks);
    assert_files_match(&h, &files);

    // Resume from a cut in the middle of the biggest file, the others whole.
    let big = h.files.iter().max_by_key(|f| f.size).unwrap();
    let mut partial: HashMap<String, Vec<u8>> = files.clone();
    let cut = big.size / 2 + 12345;
    partial.get_mut(&big.name).unwrap().truncate(cut as usize);
    let have: Vec<(&str, u64)> = partial
        .iter()
        .map(|(n, d)| (n.as_str(), d.len() as u64))
        .collect();
    let third = db_sync(&master, db_sync_req(&h.snapshot_id, &have), None)
        .await
        .unwrap();
    assert_eq!(third.header.bytes_to_send, big.size - cut);
    assert!(third.chunks.iter().all(|c| c.name == big.name));
    assert_eq!(third.chunks[0].offset, cut);
    reassemble(&third.header, &mut partial, &third.chunks);
    assert_files_match(&h, &partial);
    assert_eq!(
        full_syncs(&info(&master).await),
        2,
        "the broken attempt is not counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_do_not_survive_a_restart() {
    let dir = TestDir::new("fullsync-master-restart");
    let mut master = start_master(&dir, "master", &[]).await;
    write_load(&master, "k", 100, 1000).await;
    let r = db_sync(&master, db_sync_req("", &[]), None).await.unwrap();
    let id = r.header.snapshot_id.clone();
    assert_eq!(snapshot_entries(&master.data_dir), vec![id.clone()]);
    assert_eq!(pins(&info(&master).await).len(), 1);

    // A crash leaves the checkpoint behind; the restart removes it.
    master.sigkill().unwrap();
    assert!(master.data_dir.join("snapshots").join(&id).exists());
    master.restart().await.unwrap();
    assert!(
        !master.data_dir.join("snapshots").exists(),
        "snapshots dir still there after a restart: {:?}",
        snapshot_entries(&master.data_dir)
    );
    assert!(info(&master).await.pins.is_empty());
    let e = db_sync(&master, db_sync_req(&id, &[]), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A clean stop removes it too.
    db_sync(&master, db_sync_req("", &[]), None).await.unwrap();
    assert_eq!(snapshot_entries(&master.data_dir).len(), 1);
    master.sigterm_and_wait().await.unwrap();
    assert!(!master.data_dir.join("snapshots").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_purges_by_size() {
    let dir = TestDir::new("fullsync-master-retain");
    let master = start_master(
        &dir,
        "master",
        &[
            ("TERN__BINLOG__SEGMENT_BYTES", "65536"),
            ("TERN__BINLOG__RETAIN_BYTES", "200000"),
        ],
    )
    .await;
    for round in 0..4 {
        write_load(&master, &format!("r{round}"), 250, 4000).await;
    }
    let i = wait_for(
        "the binlog to be purged down to retain_bytes",
        DEADLINE,
        || async {
            let i = info(&master).await;
            // At most retain_bytes + one sealed segment (+ one transaction) + the tail.
            if i.first_index > 1 && i.binlog_bytes <= 200_000 + 2 * (65_536 + 8192) {
                Ok(i)
            } else {
                Err(format!(
                    "first_index {} binlog_bytes {}",
                    i.first_index, i.binlog_bytes
                ))
            }
        },
    )
    .await;
    assert!(
        i.binlog_bytes >= 200_000,
        "purged below retain_bytes: {}",
        i.binlog_bytes
    );
    // What is left on disk is what Info says (the records; the tail file
    // goes on with at most PREALLOC_AHEAD and a page of zeros).
    let (mut records, mut files) = (0u64, 0u64);
    for (_, path) in tern_integration::binlog_segments(&master.data_dir).unwrap() {
        let bytes = std::fs::read(&path).unwrap();
        let (len, zeros) = tern_integration::segment_records_len(&bytes);
        assert!(zeros, "{}: damaged after {len} bytes", path.display());
        records += len as u64;
        files += bytes.len() as u64;
    }
    let i2 = info(&master).await;
    assert_eq!(records, i2.binlog_bytes);
    assert!(files - records <= tern_common::binlog::PREALLOC_AHEAD + 4096);
    // The data is all there.
    assert_eq!(master.checksum().await.unwrap().keys, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_keeps_a_stopped_slaves_binlog_until_the_hard_cap() {
    let dir = TestDir::new("fullsync-master-cap");
    let master = start_master(
        &dir,
        "master",
        &[
            ("TERN__BINLOG__SEGMENT_BYTES", "65536"),
            ("TERN__BINLOG__RETAIN_BYTES", "100000"),
            ("TERN__BINLOG__MAX_RETAIN_BYTES", "2000000"),
            // The stopped slave stays connected for the whole test.
            ("TERN__SYNC__LINK_TIMEOUT_MS", "300000"),
        ],
    )
    .await;
    write_load(&master, "base", 200, 1000).await;
    let slave = Node::start_slave(&dir.join("slave"), &master.url(), &[], &[])
        .await
        .expect("starting the slave");
    // The empty slave full-syncs, then streams; once it is connected its own
    // pin holds the binlog and the snapshot goes (long before its idle time).
    let (slave_id, received) = wait_for("the slave to stream", DEADLINE, || async {
        let i = info(&master).await;
        let last = i.last_index;
        match i.slaves.iter().find(|s| s.state == "streaming") {
            Some(s)
                if s.received_index == last && pins(&i) == [(format!("slave:{}", s.id), last)] =>
            {
                Ok((s.id.clone(), s.received_index))
            }
            _ => Err(format!("slaves {:?} pins {:?}", i.slaves, pins(&i))),
        }
    })
    .await;
    assert!(full_syncs(&info(&master).await) >= 1);
    let owner = format!("slave:{slave_id}");
    slave.sigstop().unwrap();

    // 1.2 MB, under the cap: the binlog is kept from the slave's position.
    write_load(&master, "under", 300, 4000).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let i = info(&master).await;
    assert!(
        i.first_index <= received + 1,
        "purged past the stopped slave: first_index {} received {received}",
        i.first_index
    );
    assert!(
        pins(&i).contains(&(owner.clone(), received)),
        "pins {:?}",
        pins(&i)
    );
    assert!(i.binlog_bytes > 1_000_000, "binlog {}", i.binlog_bytes);
    let row = i.slaves.iter().find(|s| s.id == slave_id).unwrap();
    assert!(!row.needs_full_sync);

    // Past the cap: the slave's binlog goes, and Info says it needs a full sync.
    write_load(&master, "over", 400, 4000).await;
    let i = wait_for("the hard cap to purge past the slave", DEADLINE, || async {
        let i = info(&master).await;
        let row = i.slaves.iter().find(|s| s.id == slave_id).cloned();
        match row {
            Some(r)
                if r.needs_full_sync
                    && i.first_index > received + 1
                    && i.binlog_bytes <= 2_000_000 =>
            {
                Ok(i)
            }
            _ => Err(format!(
                "first_index {} binlog {} slaves {:?}",
                i.first_index, i.binlog_bytes, i.slaves
            )),
        }
    })
    .await;
    // The cap purges only what it must: retain_bytes alone would keep ~100 kB.
    assert!(i.binlog_bytes > 1_000_000, "binlog {}", i.binlog_bytes);
    assert!(
        master
            .log_tail(1_000_000)
            .contains("binlog over binlog.max_retain_bytes"),
        "no warning about the cap in the master's log"
    );
    slave.sigcont().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn try_sync_with_an_empty_repl_id_needs_a_full_sync() {
    let dir = TestDir::new("fullsync-master-empty");
    let master = start_master(&dir, "master", &[]).await;
    // Even on an empty master: a slave without a history always full-syncs.
    for _ in 0..2 {
        let (r, _tx, _stream) = try_sync(&master, "rogue", "", 0, 0).await;
        assert_eq!(r.code, pb::TrySyncCode::NeedFullSync as i32);
        assert_eq!(r.reason, pb::FullSyncReason::UnknownReplId as i32);
        assert!(r.message.contains("new slave"), "{}", r.message);
        assert_eq!(r.repl_id, info(&master).await.repl_id);
        write_load(&master, "k", 10, 10).await;
    }
    let i = info(&master).await;
    assert!(
        i.pins.is_empty(),
        "a refused TrySync left a pin: {:?}",
        pins(&i)
    );
}

/// Opens a `Sync` stream and sends `TrySync`; returns the answer and the
/// sender (dropping it ends the session).
async fn try_sync(
    node: &Node,
    slave_id: &str,
    repl_id: &str,
    index: u64,
    seq: u64,
) -> (
    pb::TrySyncResponse,
    tokio::sync::mpsc::Sender<pb::SlaveMessage>,
    tonic::Streaming<pb::MasterMessage>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::SlaveMessage {
        msg: Some(pb::slave_message::Msg::TrySync(pb::TrySync {
            slave_id: slave_id.into(),
            repl_id: repl_id.into(),
            index,
            addr: String::new(),
            seq,
        })),
    })
    .await
    .unwrap();
    let mut stream = repl(node)
        .sync(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a TrySync answer")
        .unwrap()
        .expect("a message");
    let Some(pb::master_message::Msg::TrySyncResponse(r)) = msg.msg else {
        panic!("not a TrySyncResponse: {msg:?}");
    };
    (r, tx, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_goes_once_the_slave_that_downloaded_it_connects() {
    let dir = TestDir::new("fullsync-master-handover");
    // Default sync.snapshot_idle_ms (60 s): the handover, not idleness, removes it.
    let master = start_master(&dir, "master", &[]).await;
    write_load(&master, "k", 200, 1000).await;
    let r = db_sync(&master, db_sync_req("", &[]), None).await.unwrap();
    let h = r.header;
    // Writes after the snapshot: the slave continues from its index.
    write_load(&master, "after", 50, 100).await;
    assert_eq!(
        pins(&info(&master).await),
        vec![(format!("snapshot:{}", h.snapshot_id), h.index)]
    );
    let (resp, tx, mut stream) =
        try_sync(&master, "test-client", &h.repl_id, h.index, h.last_seq).await;
    assert_eq!(resp.code, pb::TrySyncCode::Ok as i32, "{resp:?}");
    // First-send ack at the TrySync index; the binlog after it then streams.
    tx.send(pb::SlaveMessage {
        msg: Some(pb::slave_message::Msg::Ack(pb::BinlogAck {
            session_id: resp.session_id,
            first_send: true,
            received_index: h.index,
            applied_index: h.index,
            batch_first_index: 0,
            batch_last_index: 0,
        })),
    })
    .await
    .unwrap();
    let batch = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a batch")
            .unwrap()
            .expect("a message");
        if let Some(pb::master_message::Msg::Batch(b)) = m.msg {
            break b;
        }
    };
    assert_eq!(batch.first_index, h.index + 1);
    wait_for(
        "the snapshot to be handed over to the slave's pin",
        Duration::from_secs(10),
        || async {
            let i = info(&master).await;
            let p = pins(&i);
            if p == [("slave:test-client".to_string(), h.index)]
                && snapshot_entries(&master.data_dir).is_empty()
            {
                Ok(())
            } else {
                Err(format!(
                    "pins {p:?} snapshots {:?}",
                    snapshot_entries(&master.data_dir)
                ))
            }
        },
    )
    .await;
    // A refused TrySync under the same slave id does not take the live pin.
    let (refused, _tx2, _stream2) = try_sync(&master, "test-client", "", 0, 0).await;
    assert_eq!(refused.code, pb::TrySyncCode::NeedFullSync as i32);
    assert_eq!(
        pins(&info(&master).await),
        [("slave:test-client".to_string(), h.index)]
    );
    // When the session ends, so does its pin: a disconnected slave is not protected.
    drop(tx);
    drop(stream);
    wait_for("the slave's pin to go", Duration::from_secs(10), || async {
        let i = info(&master).await;
        if i.pins.is_empty() {
            Ok(())
        } else {
            Err(format!("{:?}", pins(&i)))
        }
    })
    .await;
}
