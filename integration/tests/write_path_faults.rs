//! The master's write path on a full disk, over real processes. The master's
//! data directory is a small tmpfs, most of it taken by a filler file; a load
//! of IncrBy counters and 32 KiB Puts fills the rest, and writes start failing
//! with RESOURCE_EXHAUSTED while gRPC health says NOT_SERVING and `Info` says
//! why. When the filler is removed, health and writes come back without a
//! restart. Then the disk is filled again, with only room for the
//! clean-shutdown marker: a SIGTERM while writes fail still exits 0 with the
//! marker. A slave is attached throughout. At the end every acknowledged write
//! is present exactly once on master and slave, no refused one is, both have
//! the same Checksum, and a SIGTERM stops the master cleanly (exit 0, a restart
//! replays nothing).
//!
//! Needs to mount a tmpfs (root); it says so and passes without checking
//! anything where that is not permitted.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use support::{DEADLINE, converge, slave_counters, wait_connected, wait_until};
use tern_common::proto::kv::v1 as kv;
use tern_integration::workload::{LOAD_REQUEST_TIMEOUT, get};
use tern_integration::{Node, TestDir};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const COUNTERS: usize = 16;
const BULK_BYTES: usize = 32 << 10;
/// Services whose health follows the write path.
const SERVICES: [&str; 2] = ["", "tern.kv.v1.Kv"];

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed out-struct.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0, "statvfs");
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Writes a file of `bytes` bytes, or (`None`) until the disk is full.
fn fill(path: &Path, bytes: Option<u64>) -> u64 {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = match bytes {
            Some(b) if written >= b => break,
            Some(b) => chunk.len().min((b - written) as usize),
            None => chunk.len(),
        };
        match f.write(&chunk[..n]) {
            Ok(0) => break,
            Ok(k) => written += k as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    written
}

/// What the clients were told, per counter key.
#[derive(Debug)]
struct Model {
    acked: Vec<i128>,
    /// RESOURCE_EXHAUSTED: must never be applied.
    refused: Vec<i128>,
    /// Any other error: applied at most once.
    uncertain: Vec<i128>,
    acked_ops: u64,
    refused_ops: u64,
    uncertain_ops: u64,
    bulk_acked: u64,
    bulk_refused: u64,
    /// Codes and a sample message of every error, for failure messages.
    errors: BTreeMap<String, (u64, String)>,
}

impl Model {
    fn new() -> Model {
        Model {
            acked: vec![0; COUNTERS],
            refused: vec![0; COUNTERS],
            uncertain: vec![0; COUNTERS],
            acked_ops: 0,
            refused_ops: 0,
            uncertain_ops: 0,
            bulk_acked: 0,
            bulk_refused: 0,
            errors: BTreeMap::new(),
        }
    }

    fn error(&mut self, s: &tonic::Status) {
        let e = self
            .errors
            .entry(format!("{:?}", s.code()))
            .or_insert((0, s.message().to_string()));
        e.0 += 1;
    }
}

fn counter_key(k: usize) -> Bytes {
    Bytes::from(format!("c{k}"))
}

struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `counters` clients doing IncrBy, `bulk` clients doing 32 KiB Puts.
    fn start(url: &str, model: &Arc<Mutex<Model>>, counters: usize, bulk: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..counters + bulk {
            let mut kv = tern_integration::node::kv_client(tern_integration::node::channel(
                url,
                LOAD_REQUEST_TIMEOUT,
            ));
            let (model, stop) = (model.clone(), stop.clone());
            let is_bulk = c >= counters;
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::from_os_rng();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if is_bulk {
                        let mut value = vec![0u8; BULK_BYTES];
                        rng.fill_bytes(&mut value);
                        let r = kv
                            .put(kv::PutRequest {
                                key: Bytes::from(format!("bulk{c}-{}", n % 64)),
                                value: Bytes::from(value),
                                ..Default::default()
                            })
                            .await;
                        let mut m = model.lock().unwrap();
                        match r {
                            Ok(_) => m.bulk_acked += 1,
                            Err(s) if s.code() == Code::ResourceExhausted => {
                                m.bulk_refused += 1;
                                m.error(&s);
                            }
                            Err(s) => m.error(&s),
                        }
                        continue;
                    }
                    let k = rng.random_range(0..COUNTERS);
                    let delta = rng.random_range(1..=1000i64);
                    let r = kv
                        .incr_by(kv::IncrByRequest {
                            key: counter_key(k),
                            delta,
                            ..Default::default()
                        })
                        .await;
                    let mut m = model.lock().unwrap();
                    match r {
                        Ok(_) => {
                            m.acked_ops += 1;
                            m.acked[k] += i128::from(delta);
                        }
                        Err(s) if s.code() == Code::ResourceExhausted => {
                            m.refused_ops += 1;
                            m.refused[k] += i128::from(delta);
                            m.error(&s);
                        }
                        Err(s) => {
                            m.uncertain_ops += 1;
                            m.uncertain[k] += i128::from(delta);
                            m.error(&s);
                        }
                    }
                }
            }));
        }
        Load { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

async fn health(node: &Node, service: &str) -> Result<i32, String> {
    HealthClient::new(node.channel())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// One 32 KiB Put of random bytes.
async fn put_bulk(node: &Node, key: &'static [u8]) -> Result<u64, tonic::Status> {
    let mut value = vec![0u8; BULK_BYTES];
    rand::rng().fill_bytes(&mut value);
    let r = node
        .kv()
        .put(kv::PutRequest {
            key: Bytes::from_static(key),
            value: Bytes::from(value),
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().index)
}

/// A write refused because the disk is full, with the message that says so.
fn assert_disk_full(err: &tonic::Status) {
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("binlog append failed: No space left on device")
            && err
                .message()
                .contains("nothing of this write was committed"),
        "{err:?}"
    );
}

/// A write answered UNAVAILABLE because of `cause`, its outcome unknown.
fn assert_outcome_unknown(err: &tonic::Status, cause: &str) {
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(cause)
            && err
                .message()
                .contains("the outcome of this write is unknown"),
        "{err:?}"
    );
}

/// Converges and asserts the master and the slave have the same Checksum;
/// returns the index they converged at.
async fn assert_same_data(master: &Node, slave: &Node) -> u64 {
    let target = converge(master, &[slave]).await;
    let mc = master.checksum().await.unwrap();
    assert_eq!(mc.index, target);
    assert_eq!(
        mc,
        slave.checksum().await.unwrap(),
        "master and slave Checksums"
    );
    target
}

/// One IncrBy; its commit index.
async fn incr(
    kv: &mut kv::kv_client::KvClient<tonic::transport::Channel>,
    key: Bytes,
    delta: i64,
) -> Result<u64, tonic::Status> {
    let r = kv
        .incr_by(kv::IncrByRequest {
            key,
            delta,
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().index)
}

/// Waits (bounded) until `node` exits by itself; its exit status.
async fn wait_exit(node: &mut Node) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(st) = node.try_wait().unwrap() {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not stop by itself within {DEADLINE:?}",
            node.role
        );
        tokio::time::sleep(support::POLL).await;
    }
}

/// Health of every service in [`SERVICES`] is `want`.
async fn assert_health(node: &Node, want: ServingStatus) {
    for svc in SERVICES {
        assert_eq!(
            health(node, svc).await,
            Ok(want as i32),
            "health of {svc:?}"
        );
    }
}

/// Every counter on `node` against the model: exactly the acknowledged sum
/// where no answer was uncertain (so no refused delta is in it), else within
/// [acked, acked + uncertain]. Returns how many keys had refused deltas and
/// were checked exactly.
async fn check_counters(what: &str, node: &Node, m: &Model) -> usize {
    let mut kv = node.kv();
    let mut exact_with_refused = 0;
    for k in 0..COUNTERS {
        let v = get(&mut kv, &counter_key(k)).await.unwrap();
        let value: i128 = v.map_or(0, |b| std::str::from_utf8(&b).unwrap().parse().unwrap());
        let (acked, refused, unc) = (m.acked[k], m.refused[k], m.uncertain[k]);
        if unc == 0 {
            assert_eq!(
                value, acked,
                "{what}: c{k} = {value}, acknowledged sum {acked}, refused sum {refused}"
            );
            if refused > 0 {
                exact_with_refused += 1;
            }
        } else {
            assert!(
                acked <= value && value <= acked + unc,
                "{what}: c{k} = {value} outside [acked {acked}, acked + uncertain {}]",
                acked + unc
            );
        }
    }
    exact_with_refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_writes_cleanly_and_they_resume_when_space_returns() {
    let dir = TestDir::new("write-path-faults");
    let master_dir = dir.join("master");
    // Declared before the nodes: dropped (unmounted) after they are killed.
    let _tmpfs = match Tmpfs::mount(&master_dir, "48m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "SKIPPED full_disk_fails_writes_cleanly_and_they_resume_when_space_returns: \
                 cannot mount a tmpfs ({e}); this test needs root"
            );
            return;
        }
    };
    let env = [
        ("TERN__BINLOG__FSYNC", "always"),
        ("TERN__BINLOG__SEGMENT_BYTES", "1048576"),
    ];
    let mut master = Node::start_master(&master_dir, &env, &[]).await.unwrap();
    let slave = support::start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;
    assert_health(&master, ServingStatus::Serving).await;
    let info = master.info().await.unwrap();
    assert!(info.writable && info.write_error.is_empty(), "{info:?}");

    // Leave about 6 MiB free, then write until that is gone too.
    let filler = master_dir.join("filler");
    fill(
        &filler,
        Some(free_bytes(&master_dir).saturating_sub(6 << 20)),
    );
    let model = Arc::new(Mutex::new(Model::new()));
    let load = Load::start(&master.url(), &model, 3, 2);
    wait_until(
        "writes refused with RESOURCE_EXHAUSTED",
        DEADLINE,
        || async {
            let m = model.lock().unwrap();
            if m.refused_ops >= 10 && m.bulk_refused >= 10 {
                Ok(Some(()))
            } else {
                Err(format!("{m:?}"))
            }
        },
    )
    .await;
    load.stop().await;

    // The last of the space too: now nothing (not even the master's idle
    // probe) can write, and a write that needs disk space is refused.
    let rest = master_dir.join("filler-rest");
    fill(&rest, None);
    let err = put_bulk(&master, b"bulk-full").await.unwrap_err();
    assert_disk_full(&err);
    assert_health(&master, ServingStatus::NotServing).await;
    let info = master.info().await.unwrap();
    assert!(!info.writable, "{info:?}");
    assert!(
        info.write_error.contains("No space left on device"),
        "{:?}",
        info.write_error
    );
    let write_errors = info.counters.unwrap_or_default().write_errors;
    {
        let m = model.lock().unwrap();
        assert!(
            write_errors >= 1 && write_errors >= m.refused_ops.min(1),
            "write_errors {write_errors}, {m:?}"
        );
        eprintln!("while full: {m:?}; Info.write_error {:?}", info.write_error);
    }
    // What was committed is whole: the master applied its whole binlog.
    assert_eq!(info.applied_index, info.last_index, "{info:?}");

    // Space comes back: health and writes return without a restart.
    fs::remove_file(&rest).unwrap();
    fs::remove_file(&filler).unwrap();
    wait_until("the master to report SERVING again", DEADLINE, || async {
        let h = health(&master, "").await?;
        let i = master.info().await.map_err(|e| format!("{e:#}"))?;
        if h == ServingStatus::Serving as i32 && i.writable && i.write_error.is_empty() {
            Ok(Some(()))
        } else {
            Err(format!(
                "health {h}, writable {}, {:?}",
                i.writable, i.write_error
            ))
        }
    })
    .await;
    let (acked_before, refused_before) = {
        let m = model.lock().unwrap();
        (m.acked_ops, m.refused_ops)
    };
    let load = Load::start(&master.url(), &model, 3, 0);
    wait_until("writes acknowledged again", DEADLINE, || async {
        let m = model.lock().unwrap();
        if m.acked_ops >= acked_before + 300 {
            Ok(Some(()))
        } else {
            Err(format!("{m:?}"))
        }
    })
    .await;
    load.stop().await;

    // Full again, with just enough room left for the clean-shutdown marker: a
    // SIGTERM while writes fail still stops cleanly.
    fill(
        &rest,
        Some(free_bytes(&master_dir).saturating_sub(16 << 10)),
    );
    // The zeros the binlog wrote ahead of its tail (up to 1 MiB) still take
    // writes: the first bulk puts may fit there.
    let mut refused = None;
    for _ in 0..64 {
        if let Err(e) = put_bulk(&master, b"bulk-full").await {
            refused = Some(e);
            break;
        }
    }
    assert_disk_full(&refused.expect("bulk puts refused once the disk is full"));
    assert_health(&master, ServingStatus::NotServing).await;
    let last = master.info().await.unwrap().last_index;
    let status = master.sigterm_and_wait().await.unwrap();
    assert!(
        status.success(),
        "exit status {status} of a SIGTERM while the disk is full"
    );
    assert!(master_dir.join("CLEAN_SHUTDOWN").exists());
    fs::remove_file(&rest).unwrap();
    let info = master.restart().await.unwrap();
    assert_eq!(info.last_index, last, "{info:?}");
    eprintln!(
        "restart after a SIGTERM on a full disk replayed {} events",
        info.replayed_on_start
    );

    let m = Arc::try_unwrap(model).unwrap().into_inner().unwrap();
    assert_eq!(
        m.refused_ops, refused_before,
        "no write refused once there is space: {m:?}"
    );
    eprintln!("final model: {m:?}");

    // Every acknowledged write exactly once on both nodes, no refused one.
    let target = assert_same_data(&master, &slave).await;
    let exact = check_counters("master", &master, &m).await;
    assert_eq!(check_counters("slave", &slave, &m).await, exact);
    assert!(
        exact >= 1,
        "no counter with refused writes could be checked exactly (every one had an uncertain \
         answer): {m:?}"
    );
    let si = slave.info().await.unwrap();
    assert_eq!(slave_counters(&si).duplicates_skipped, 0);

    // A clean stop after all that: exit 0, the marker, nothing replayed.
    let status = master.sigterm_and_wait().await.unwrap();
    assert!(status.success(), "master exit status {status}");
    assert!(master_dir.join("CLEAN_SHUTDOWN").exists());
    let info = master.restart().await.unwrap();
    assert_eq!(info.replayed_on_start, 0, "{info:?}");
    assert_eq!(info.last_index, target);
    check_counters("master after restart", &master, &m).await;
}

/// RocksDB refuses a write after the binlog took it: a background flush that
/// failed on the full disk (retention flushes every second here) leaves
/// RocksDB failing every write, even once there is space again. The group is
/// committed in the binlog (and shipped) but cannot be applied: its client is
/// held, then told the outcome is unknown, and the master stops with a
/// non-zero status and no clean-shutdown marker. A restart replays the binlog
/// into a fresh RocksDB: the held write is applied exactly once, on the master
/// and the slave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_write_failure_after_the_append_stops_the_master_and_a_restart_recovers() {
    let dir = TestDir::new("write-path-rocksdb");
    let master_dir = dir.join("master");
    let _tmpfs = match Tmpfs::mount(&master_dir, "48m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "SKIPPED rocksdb_write_failure_after_the_append_stops_the_master_and_a_restart_\
                 recovers: cannot mount a tmpfs ({e}); this test needs root"
            );
            return;
        }
    };
    let env = [
        ("TERN__BINLOG__FSYNC", "always"),
        ("TERN__BINLOG__SEGMENT_BYTES", "262144"),
        ("TERN__BINLOG__RETAIN_BYTES", "524288"),
    ];
    let mut master = Node::start_master(&master_dir, &env, &[]).await.unwrap();
    let slave = support::start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;
    let filler = master_dir.join("filler");
    fill(
        &filler,
        Some(free_bytes(&master_dir).saturating_sub(6 << 20)),
    );
    let model = Arc::new(Mutex::new(Model::new()));
    let load = Load::start(&master.url(), &model, 3, 2);
    wait_until(
        "a RocksDB flush (before a binlog purge) to fail on the full disk",
        DEADLINE,
        || async {
            let failed = support::log_count(&master, "rocksdb flush before purge");
            if failed > 0 {
                Ok(Some(()))
            } else {
                Err(format!("{:?}", model.lock().unwrap()))
            }
        },
    )
    .await;
    load.stop().await;
    fs::remove_file(&filler).unwrap();

    // There is space, but RocksDB keeps its error: the binlog takes the write,
    // RocksDB does not.
    let held = Bytes::from_static(b"held");
    let mut kv = tern_integration::node::kv_client(tern_integration::node::channel(
        &master.url(),
        std::time::Duration::from_secs(60),
    ));
    let err = incr(&mut kv, held.clone(), 7).await.unwrap_err();
    assert_outcome_unknown(&err, "rocksdb write");
    let status = wait_exit(&mut master).await;
    assert!(!status.success(), "exit status {status}");
    assert!(!master_dir.join("CLEAN_SHUTDOWN").exists());

    let info = master.restart().await.unwrap();
    assert!(info.replayed_on_start > 0, "{info:?}");
    assert!(info.writable, "{info:?}");
    assert_eq!(
        get(&mut master.kv(), &held).await.unwrap(),
        Some(Bytes::from_static(b"7")),
        "the committed write is applied exactly once after the restart"
    );
    let load = Load::start(&master.url(), &model, 2, 0);
    let acked = model.lock().unwrap().acked_ops;
    wait_until(
        "writes acknowledged after the restart",
        DEADLINE,
        || async {
            let m = model.lock().unwrap();
            if m.acked_ops >= acked + 100 {
                Ok(Some(()))
            } else {
                Err(format!("{m:?}"))
            }
        },
    )
    .await;
    load.stop().await;
    let m = Arc::try_unwrap(model).unwrap().into_inner().unwrap();
    assert_same_data(&master, &slave).await;
    assert_eq!(
        get(&mut slave.kv(), &held).await.unwrap(),
        Some(Bytes::from_static(b"7"))
    );
    check_counters("master", &master, &m).await;
    check_counters("slave", &slave, &m).await;
}

/// Runs a command; its stderr on failure. `ok` lists the exit codes that count
/// as success (e2fsck says 1 when it fixed something).
fn run(cmd: &str, args: &[&str], ok: &[i32]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("running {cmd}: {e}"))?;
    match out.status.code() {
        Some(c) if ok.contains(&c) => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        _ => Err(format!(
            "{cmd} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// An ext4 file system on a loop device whose sparse backing file lives on a
/// small tmpfs: once that tmpfs is full, writes still succeed (page cache) but
/// writeback fails, so fsync fails (as a thin-provisioned volume that ran out).
struct LoopFs {
    mnt: PathBuf,
    dev: String,
    backing: Tmpfs,
}

impl LoopFs {
    fn setup(dir: &Path) -> Result<LoopFs, String> {
        let backing = Tmpfs::mount(&dir.join("backing"), "24m")?;
        let img = backing.0.join("img");
        fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| e.to_string())?;
        let img = img.to_str().unwrap().to_string();
        let dev = run("losetup", &["-f", "--show", &img], &[0])?;
        let mnt = dir.join("binfs");
        let lfs = LoopFs { mnt, dev, backing };
        fs::create_dir_all(&lfs.mnt).map_err(|e| e.to_string())?;
        run("mkfs.ext4", &["-q", "-b", "4096", &lfs.dev], &[0])?;
        lfs.mount()?;
        Ok(lfs)
    }

    fn mount(&self) -> Result<(), String> {
        run("mount", &[&self.dev, self.mnt.to_str().unwrap()], &[0]).map(|_| ())
    }

    /// Unmounts, repairs and mounts again (the kernel may have aborted the
    /// journal after the write errors).
    fn repair(&self) -> Result<(), String> {
        run("umount", &[self.mnt.to_str().unwrap()], &[0])?;
        run("e2fsck", &["-fy", &self.dev], &[0, 1])?;
        self.mount()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = run("umount", &[self.mnt.to_str().unwrap()], &[0])
            .or_else(|_| run("umount", &["-l", self.mnt.to_str().unwrap()], &[0]));
        let _ = run("losetup", &["-d", &self.dev], &[0]);
    }
}

/// A binlog fsync fails (the volume under it ran out of space; a second fsync
/// would report success although the data is gone): the write it covered is
/// answered "outcome unknown", nothing more is acknowledged, and the master
/// exits non-zero without a clean-shutdown marker. Restarted on the repaired
/// volume it recovers what is really on disk (see below for what this volume
/// may lose).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binlog_fsync_failure_stops_the_master_and_a_restart_recovers_what_is_on_disk() {
    let dir = TestDir::new("write-path-fsync");
    let lfs = match LoopFs::setup(dir.path()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "SKIPPED binlog_fsync_failure_stops_the_master_and_a_restart_recovers_what_is_on_\
                 disk: cannot set up a loop-device file system ({e}); this test needs root"
            );
            return;
        }
    };
    let master_dir = dir.join("master");
    fs::create_dir_all(&master_dir).unwrap();
    fs::create_dir_all(lfs.mnt.join("binlog")).unwrap();
    std::os::unix::fs::symlink(lfs.mnt.join("binlog"), master_dir.join("binlog")).unwrap();
    let env = [("TERN__BINLOG__FSYNC", "always")];
    let mut master = Node::start_master(&master_dir, &env, &[]).await.unwrap();
    let slave = support::start_slave(&dir, "slave", &master, &[]).await;
    wait_connected(&slave, 1).await;

    let key = counter_key(0);
    let mut kv = master.kv();
    let mut acked = 0i128;
    for _ in 0..50 {
        incr(&mut kv, key.clone(), 1).await.unwrap();
        acked += 1;
    }
    // The volume's backing store is full from now on.
    fill(&lfs.backing.0.join("filler"), None);
    let err = loop {
        match incr(&mut kv, key.clone(), 1).await {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 100_000, "no fsync failed");
    };
    assert_outcome_unknown(&err, "binlog fsync failed");
    // Nothing is acknowledged any more.
    let next = incr(&mut kv, key.clone(), 1).await;
    assert!(
        next.is_err(),
        "a write acknowledged after a failed fsync: {next:?}"
    );
    let status = wait_exit(&mut master).await;
    assert!(!status.success(), "exit status {status}");
    assert!(!master_dir.join("CLEAN_SHUTDOWN").exists());
    assert!(support::log_count(&master, "binlog fsync failed") > 0);

    // The volume gets its space back and is repaired; the master starts on it
    // and recovers what is really on disk. This volume (a loop device over a
    // full tmpfs) sometimes reports a failed block write to the fsync after the
    // one that wrote it, so a write acknowledged just before can be missing
    // after the repair (a device that lies): then the master must refuse to
    // start (with fsync = always the binlog lost events that were durable),
    // rather than serve a state its binlog cannot back.
    fs::remove_file(lfs.backing.0.join("filler")).unwrap();
    lfs.repair().unwrap();
    let info = match master.restart().await {
        Ok(info) => info,
        Err(e) => {
            assert!(
                support::log_count(&master, "the binlog lost events that were durable") > 0,
                "restart failed for another reason: {e:#}"
            );
            eprintln!("the volume lost an acknowledged write; the master refused to start: {e:#}");
            return;
        }
    };
    eprintln!(
        "restart after the fsync failure: last_index {} replayed {} ({} writes acknowledged)",
        info.last_index, info.replayed_on_start, acked
    );
    let value: i128 = get(&mut master.kv(), &key)
        .await
        .unwrap()
        .map_or(0, |b| std::str::from_utf8(&b).unwrap().parse().unwrap());
    assert!(
        value == acked || value == acked + 1,
        "value {value}: {acked} acknowledged increments and one uncertain"
    );
    kv = master.kv();
    incr(&mut kv, key.clone(), 1).await.unwrap();
    assert_same_data(&master, &slave).await;
    drop(slave);
    drop(master);
    drop(lfs);
}
