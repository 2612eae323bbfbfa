//! Full resync of a slave from a master's RocksDB checkpoint (`DbSync`).
//!
//! Download: files go to `data_dir/fullsync/<snapshot_id>/files/`, the header to
//! `HEADER.pb` beside them. Every chunk's crc32c is checked and chunks must be
//! contiguous; a broken stream is **resumed** with the same snapshot id, sending
//! the master the size of every file already here; a snapshot the master no
//! longer has (NOT_FOUND) is dropped and the download starts again. When every
//! file has its size and whole-file crc32c, everything is fsynced and a `READY`
//! marker is written.
//!
//! Swap ([`apply_staged`], run before RocksDB is opened): with the old RocksDB
//! and relay log closed, the relay log is replaced by an empty one that starts
//! after the snapshot index, then `db` is replaced by the staged files, each
//! step a rename that is redone or skipped idempotently after a crash, so a
//! crash at any point leaves either the old state (no `READY`) or the new one.
//! Before the old relay log goes, the read floor is set (see [`crate::floor`]).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use tern_common::binlog::{Binlog, BinlogOptions};
use tern_common::position::ReplId;
use tern_common::proto::replication::v1 as pb;
use tern_common::proto::replication::v1::replication_client::ReplicationClient;
use tern_common::state::read_checkpoint_meta;
use tonic::transport::Channel;

use crate::floor::{self, FloorError};

const STAGING: &str = "fullsync";
const HEADER: &str = "HEADER.pb";
const READY: &str = "READY";
const FILES: &str = "files";

#[derive(Debug, thiserror::Error)]
pub enum FullSyncError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("DbSync: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("DbSync stream broken: {0}")]
    Protocol(String),
    #[error("snapshot {0} is gone on the master")]
    Gone(String),
    #[error("relay log: {0}")]
    Relay(String),
    #[error("{0}")]
    Floor(#[from] FloorError),
}

/// Progress shown in `Info.full_sync`.
#[derive(Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
}

/// What a finished download holds.
#[derive(Clone, Debug)]
pub struct Staged {
    pub snapshot_id: String,
    pub repl_id: String,
    pub index: u64,
    pub last_seq: u64,
}

fn staging_root(data_dir: &Path) -> PathBuf {
    data_dir.join(STAGING)
}

/// A relative path inside the snapshot: no `..`, no root, not empty.
fn safe_name(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if name.is_empty() || p.is_absolute() {
        return None;
    }
    p.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| p.to_path_buf())
}

/// What a checked [`pb::DbSyncHeader`] lists: file name -> (size, whole-file
/// crc32c, path under `files_dir`).
pub type Manifest = HashMap<String, (u64, u32, PathBuf)>;

/// Checks a DbSync header from the master before anything is written for it:
/// a snapshot id that is one safe path component of at most 128 bytes, file
/// names that stay inside `files_dir` (no `..`, no root, no duplicates), and a
/// `total_bytes` that is the sum of the file sizes (without overflow). Returns
/// the files and their total.
#[doc(hidden)]
pub fn check_header(
    header: &pb::DbSyncHeader,
    files_dir: &Path,
) -> Result<(Manifest, u64), FullSyncError> {
    let proto = |m: String| FullSyncError::Protocol(m);
    if header.snapshot_id.is_empty()
        || header.snapshot_id.len() > 128
        || safe_name(&header.snapshot_id).is_none_or(|p| p.components().count() != 1)
    {
        return Err(proto(format!("bad snapshot id {:?}", header.snapshot_id)));
    }
    let mut sizes = Manifest::with_capacity(header.files.len());
    // Paths compare by component: `a//b` and `a/b/` are the file `a/b`.
    let mut paths = HashSet::with_capacity(header.files.len());
    let mut total = 0u64;
    for f in &header.files {
        let rel = safe_name(&f.name).ok_or_else(|| proto(format!("bad file name {:?}", f.name)))?;
        let path = files_dir.join(rel);
        if !paths.insert(path.clone()) {
            return Err(proto(format!("file {:?} listed twice", f.name)));
        }
        sizes.insert(f.name.clone(), (f.size, f.crc32c, path));
        total = total
            .checked_add(f.size)
            .ok_or_else(|| proto(format!("file sizes add up to more than {} bytes", u64::MAX)))?;
    }
    if total != header.total_bytes {
        return Err(proto(format!(
            "header total {} is not the sum of its files {total}",
            header.total_bytes
        )));
    }
    Ok((sizes, total))
}

/// Checks one DbSync data chunk against the header's files: a listed file, a
/// matching crc32c, and `offset + len` within the file's size (without
/// overflow). Whether it continues what the file already holds is the
/// caller's check. Returns the file's entry.
#[doc(hidden)]
pub fn check_chunk<'m>(
    sizes: &'m Manifest,
    c: &pb::FileChunk,
) -> Result<&'m (u64, u32, PathBuf), FullSyncError> {
    let proto = |m: String| FullSyncError::Protocol(m);
    let entry = sizes
        .get(&c.name)
        .ok_or_else(|| proto(format!("chunk for unknown file {:?}", c.name)))?;
    if crc32c::crc32c(&c.data) != c.crc32c {
        return Err(proto(format!(
            "chunk of {} at {} fails its crc32c",
            c.name, c.offset
        )));
    }
    let size = entry.0;
    if c.offset
        .checked_add(c.data.len() as u64)
        .is_none_or(|end| end > size)
    {
        return Err(proto(format!(
            "chunk of {} at {} runs past its size {size}",
            c.name, c.offset
        )));
    }
    Ok(entry)
}

/// Test knob (`fault-injection` feature): `TERN_FAULT_SWAP_CRASH_AT=N` aborts
/// the process at step N of [`apply_staged`], as a crash there would.
fn crash_point(_step: u32) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("TERN_FAULT_SWAP_CRASH_AT")
        .ok()
        .and_then(|v| v.parse().ok())
        == Some(_step)
    {
        eprintln!("fault injection: aborting at swap step {_step}");
        std::process::abort();
    }
}

fn fsync_dir(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

/// The partial download left by an earlier attempt, if any: (snapshot id, header).
fn existing_staging(data_dir: &Path) -> Option<(String, pb::DbSyncHeader)> {
    let root = staging_root(data_dir);
    for entry in fs::read_dir(&root).ok()?.flatten() {
        let dir = entry.path();
        let Ok(bytes) = fs::read(dir.join(HEADER)) else {
            continue;
        };
        if let Ok(h) = pb::DbSyncHeader::decode(bytes.as_slice()) {
            return Some((h.snapshot_id.clone(), h));
        }
    }
    None
}

/// Downloads (or resumes) a full sync into the staging area; returns when every
/// file is verified and `READY` is durable.
pub async fn fetch(
    client: &mut ReplicationClient<Channel>,
    data_dir: &Path,
    slave_id: &str,
    progress: &Progress,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Staged, FullSyncError> {
    let mut resume = existing_staging(data_dir);
    loop {
        let mut req = pb::DbSyncRequest {
            slave_id: slave_id.to_string(),
            snapshot_id: String::new(),
            have: vec![],
        };
        if let Some((id, h)) = &resume {
            req.snapshot_id = id.clone();
            let files = staging_root(data_dir).join(id).join(FILES);
            for f in &h.files {
                if let Some(rel) = safe_name(&f.name)
                    && let Ok(md) = fs::metadata(files.join(rel))
                {
                    req.have.push(pb::FileOffset {
                        name: f.name.clone(),
                        offset: md.len().min(f.size),
                    });
                }
            }
        }
        let mut request = tonic::Request::new(req);
        *request.metadata_mut() = metadata.clone();
        let stream = match client.db_sync(request).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound && resume.is_some() => {
                tracing::info!(
                    message = s.message(),
                    "snapshot gone; starting the full sync again"
                );
                let _ = fs::remove_dir_all(staging_root(data_dir));
                resume = None;
                continue;
            }
            Err(s) => return Err(s.into()),
        };
        return receive(stream, data_dir, resume.map(|(_, h)| h), progress).await;
    }
}

async fn receive(
    mut stream: tonic::Streaming<pb::DbSyncChunk>,
    data_dir: &Path,
    previous: Option<pb::DbSyncHeader>,
    progress: &Progress,
) -> Result<Staged, FullSyncError> {
    let proto = |m: String| FullSyncError::Protocol(m);
    let header = match stream.message().await? {
        Some(pb::DbSyncChunk {
            kind: Some(pb::db_sync_chunk::Kind::Header(h)),
        }) => h,
        _ => return Err(proto("the first DbSync message must be the header".into())),
    };
    // The same snapshot, whatever this attempt still has to send.
    let same = |a: &pb::DbSyncHeader, b: &pb::DbSyncHeader| {
        pb::DbSyncHeader {
            bytes_to_send: 0,
            ..a.clone()
        } == pb::DbSyncHeader {
            bytes_to_send: 0,
            ..b.clone()
        }
    };
    if let Some(prev) = &previous
        && !same(prev, &header)
    {
        return Err(proto(format!(
            "snapshot {} changed between attempts",
            header.snapshot_id
        )));
    }
    let dir = staging_root(data_dir).join(&header.snapshot_id);
    let files_dir = dir.join(FILES);
    let (sizes, total) = check_header(&header, &files_dir)?;
    if previous.is_none() {
        // A fresh download: nothing else stays in the staging area.
        let _ = fs::remove_dir_all(staging_root(data_dir));
        fs::create_dir_all(&files_dir)?;
        let tmp = dir.join(format!("{HEADER}.tmp"));
        fs::write(&tmp, header.encode_to_vec())?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, dir.join(HEADER))?;
    }
    let mut done: u64 = sizes
        .values()
        .map(|(size, _, p)| fs::metadata(p).map(|m| m.len().min(*size)).unwrap_or(0))
        .sum();
    progress.bytes_total.store(total, Ordering::Relaxed);
    progress.bytes_done.store(done, Ordering::Relaxed);
    tracing::info!(
        snapshot_id = %header.snapshot_id,
        index = header.index,
        total_bytes = total,
        already = done,
        "full sync: receiving snapshot"
    );
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut open: Option<(String, File, u64)> = None;
    // Test knob (`fault-injection`): `TERN_FAULT_DBSYNC_CUT_AFTER=N` breaks every
    // attempt after N chunks, as a dropped connection would, to exercise resume.
    #[cfg(feature = "fault-injection")]
    let cut_after: Option<u64> = std::env::var("TERN_FAULT_DBSYNC_CUT_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    #[cfg(feature = "fault-injection")]
    let mut chunks = 0u64;
    loop {
        let Some(msg) = stream.message().await? else {
            return Err(proto("stream ended before DbSyncDone".into()));
        };
        match msg.kind {
            Some(pb::db_sync_chunk::Kind::Data(c)) => {
                #[cfg(feature = "fault-injection")]
                {
                    chunks += 1;
                    if cut_after.is_some_and(|n| chunks > n) {
                        if let Some((_, f, _)) = open.take() {
                            f.sync_all()?;
                        }
                        return Err(proto(format!(
                            "fault injection: stream cut after {} chunks",
                            chunks - 1
                        )));
                    }
                }
                let (_, _, path) = check_chunk(&sizes, &c)?;
                if open.as_ref().is_none_or(|(n, _, _)| n != &c.name) {
                    if let Some((_, f, _)) = open.take() {
                        f.sync_all()?;
                    }
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    let f = OpenOptions::new().create(true).append(true).open(path)?;
                    let len = f.metadata()?.len();
                    open = Some((c.name.clone(), f, len));
                }
                let (_, f, len) = open.as_mut().expect("opened above");
                if c.offset != *len {
                    return Err(proto(format!(
                        "chunk of {} starts at {} but the file has {len} bytes",
                        c.name, c.offset
                    )));
                }
                f.write_all(&c.data)?;
                *len += c.data.len() as u64;
                done += c.data.len() as u64;
                progress.bytes_done.store(done, Ordering::Relaxed);
                if last_log.elapsed() >= Duration::from_secs(2) {
                    last_log = Instant::now();
                    let secs = started.elapsed().as_secs_f64().max(1e-3);
                    tracing::info!(
                        percent = format!("{:.1}", done as f64 * 100.0 / total.max(1) as f64),
                        mb_per_s = format!("{:.1}", progress_rate(done, secs)),
                        "full sync: receiving"
                    );
                }
            }
            Some(pb::db_sync_chunk::Kind::Done(_)) => break,
            _ => return Err(proto("unexpected message in a DbSync stream".into())),
        }
    }
    if let Some((_, f, _)) = open.take() {
        f.sync_all()?;
    }
    // Verify every file, whole; a mismatch throws the download away.
    for (name, (size, crc, path)) in &sizes {
        let data = fs::read(path).map_err(|e| proto(format!("{name}: {e}")))?;
        if data.len() as u64 != *size || crc32c::crc32c(&data) != *crc {
            let _ = fs::remove_dir_all(staging_root(data_dir));
            return Err(proto(format!(
                "{name}: {} bytes with a wrong checksum (expected {size} bytes, crc32c {crc:#x}); download discarded",
                data.len()
            )));
        }
        File::open(path)?.sync_all()?;
    }
    sync_tree(&files_dir)?;
    let ready_tmp = dir.join(format!("{READY}.tmp"));
    fs::write(&ready_tmp, header.encode_to_vec())?;
    File::open(&ready_tmp)?.sync_all()?;
    fs::rename(&ready_tmp, dir.join(READY))?;
    fsync_dir(&dir)?;
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    tracing::info!(
        snapshot_id = %header.snapshot_id,
        index = header.index,
        bytes = total,
        secs = format!("{secs:.2}"),
        mb_per_s = format!("{:.1}", progress_rate(total, secs)),
        "full sync: snapshot received and verified"
    );
    Ok(Staged {
        snapshot_id: header.snapshot_id,
        repl_id: header.repl_id,
        index: header.index,
        last_seq: header.last_seq,
    })
}

fn progress_rate(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / (1 << 20) as f64
}

fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        }
    }
    fsync_dir(dir)
}

/// Sets the read floor for a snapshot about to replace the state (see
/// [`crate::floor`]): in the history the slave already follows, it is raised to
/// what the old relay log received (the snapshot may be older than a state this
/// slave served: reads then wait until it has caught up past it); a snapshot of
/// another history starts the floor over in that history.
pub(crate) fn floor_before_swap(
    data_dir: &Path,
    db: &Path,
    relay: &Path,
    h: &pb::DbSyncHeader,
) -> Result<(), FullSyncError> {
    let new_history = h.repl_id.parse::<ReplId>().ok();
    let old_history = match read_checkpoint_meta(db) {
        Ok(meta) => meta.repl_id,
        Err(e) => {
            tracing::warn!(error = %e, "reading the history of the state being replaced");
            None
        }
    }
    .or(floor::load(data_dir)?.and_then(|f| f.repl_id));
    if old_history.is_some() && old_history != new_history {
        floor::reset(data_dir, new_history)?;
    } else {
        floor::raise(data_dir, new_history, floor::relay_extent(relay)?)?;
    }
    Ok(())
}

/// Completes a staged full sync, if one is `READY`: the relay log is replaced by
/// an empty one continuing after the snapshot index, and `db` by the snapshot.
/// Idempotent; must run while neither RocksDB nor the relay log is open.
/// Returns the snapshot applied, if any.
pub fn apply_staged(
    data_dir: &Path,
    binlog_opts: BinlogOptions,
) -> Result<Option<Staged>, FullSyncError> {
    let root = staging_root(data_dir);
    let db = data_dir.join("db");
    let db_old = data_dir.join("db.old");
    let relay = data_dir.join("binlog");
    let relay_old = data_dir.join("binlog.old");
    let mut ready = None;
    if let Ok(entries) = fs::read_dir(&root) {
        for e in entries.flatten() {
            if let Ok(bytes) = fs::read(e.path().join(READY))
                && let Ok(h) = pb::DbSyncHeader::decode(bytes.as_slice())
            {
                ready = Some((e.path(), h));
            }
        }
    }
    let Some((dir, h)) = ready else {
        // No complete download: leftovers of a finished swap go.
        for old in [&db_old, &relay_old] {
            if old.exists() && db.exists() {
                fs::remove_dir_all(old)?;
            }
        }
        return Ok(None);
    };
    tracing::info!(snapshot_id = %h.snapshot_id, index = h.index, "installing full sync snapshot");
    // 0. The read floor, before the relay log goes (first attempt only: later
    // ones find it moved to binlog.old, and the floor already set).
    if relay.exists() && !relay_old.exists() {
        floor_before_swap(data_dir, &db, &relay, &h)?;
    }
    // 1. Relay log: a new, empty one that continues after the snapshot.
    if relay.exists() && !relay_old.exists() {
        fs::rename(&relay, &relay_old)?;
        fsync_dir(data_dir)?;
    }
    crash_point(1);
    if relay_old.exists() {
        if relay.exists() {
            fs::remove_dir_all(&relay)?;
        }
        let (mut b, _) =
            Binlog::open(&relay, binlog_opts).map_err(|e| FullSyncError::Relay(e.to_string()))?;
        b.reset(h.index + 1, Some(h.last_seq))
            .map_err(|e| FullSyncError::Relay(e.to_string()))?;
        b.sync().map_err(|e| FullSyncError::Relay(e.to_string()))?;
    } else if !relay.exists() {
        let (mut b, _) =
            Binlog::open(&relay, binlog_opts).map_err(|e| FullSyncError::Relay(e.to_string()))?;
        b.reset(h.index + 1, Some(h.last_seq))
            .map_err(|e| FullSyncError::Relay(e.to_string()))?;
        b.sync().map_err(|e| FullSyncError::Relay(e.to_string()))?;
    }
    crash_point(2);
    // 2. The data: the staged files become `db`.
    let files = dir.join(FILES);
    if files.exists() {
        if db.exists() && !db_old.exists() {
            fs::rename(&db, &db_old)?;
            fsync_dir(data_dir)?;
        }
        crash_point(3);
        if db.exists() {
            // db.old already holds the previous data: this `db` is a torn copy.
            fs::remove_dir_all(&db)?;
        }
        fs::rename(&files, &db)?;
        fsync_dir(data_dir)?;
    }
    crash_point(4);
    // 3. Leftovers.
    fs::remove_dir_all(&root)?;
    crash_point(5);
    for old in [&db_old, &relay_old] {
        if old.exists() {
            fs::remove_dir_all(old)?;
        }
    }
    fsync_dir(data_dir)?;
    Ok(Some(Staged {
        snapshot_id: h.snapshot_id,
        repl_id: h.repl_id,
        index: h.index,
        last_seq: h.last_seq,
    }))
}
