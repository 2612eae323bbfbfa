//! Full-sync snapshots: RocksDB checkpoints that `DbSync` streams to slaves.
//!
//! A snapshot lives in `data_dir/snapshots/<id>/` (`id`: 128 random bits, hex).
//! Its position is the applied index read from **inside** the checkpoint (I2:
//! the index is written in the same WriteBatch as the data), never captured
//! beside it. While it exists it pins the binlog at that index (owner
//! `snapshot:<id>`), so a slave that installs it can continue with `TrySync`.
//!
//! - A `DbSync` without a snapshot id reuses a snapshot made less than
//!   [`REUSE_WINDOW`] ago (slaves asking at about the same time share one);
//!   otherwise it makes a new one. Concurrent creations are serialised, so the
//!   second request waits for the first one's checkpoint and shares it.
//! - A new checkpoint is made at most every `sync.snapshot_min_interval_ms`:
//!   within it a `DbSync` shares the newest live snapshot (it is only older;
//!   its pin holds the binlog after it), or, when there is none, gets
//!   RESOURCE_EXHAUSTED saying when to retry. So no client can make the master
//!   write checkpoints back to back.
//! - Each stream holds a [`SnapshotLease`]. The snapshot (directory and pin)
//!   is removed by a GC task once no stream uses it and **every slave that used
//!   it is done with it**: a slave that downloaded it whole is done when it
//!   connects with `Sync` (its own pin then holds the binlog); a slave whose
//!   stream broke is done when it finishes a resume. Slaves that never come
//!   back are waited for `sync.snapshot_idle_ms` at most: a snapshot no stream
//!   has used for that long is removed anyway.
//! - A snapshot whose binlog was purged anyway (over `binlog.max_retain_bytes`)
//!   is dead: it is not handed out any more, streams of it stop with NOT_FOUND,
//!   and it is removed as soon as no stream uses it.
//! - The whole `snapshots/` directory is removed at start (leftovers of an
//!   earlier run) and on clean shutdown.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tern_common::position::ReplId;
use tern_common::state::{State, StateError, read_checkpoint_meta};
use tokio_util::sync::CancellationToken;

use crate::committer::Progress;
use crate::pins::{PinGuard, Pins, SNAPSHOT_PREFIX};

/// Name of the directory under `data_dir` holding the snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// A snapshot younger than this is shared by new full syncs.
pub const REUSE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("checkpoint: {0}")]
    State(#[from] StateError),
    #[error(
        "the binlog after the snapshot index {index} is already purged (it starts at {first}); \
         the binlog is over binlog.max_retain_bytes"
    )]
    Purged { index: u64, first: u64 },
    #[error("checkpoint holds replication id {found}, expected {expected}")]
    WrongReplId { found: String, expected: String },
    #[error(
        "a full-sync snapshot was made {made_ms} ms ago and none is live to share \
         (sync.snapshot_min_interval_ms)"
    )]
    TooSoon { made_ms: u64, retry_after: Duration },
    #[error("snapshot task failed: {0}")]
    Task(String),
    #[error("file {name} of snapshot {id} changed or vanished: {detail}")]
    FileChanged {
        id: String,
        name: String,
        detail: String,
    },
}

/// One file of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    /// Path relative to the snapshot directory, `/`-separated.
    pub name: String,
    pub size: u64,
    pub crc32c: u32,
}

#[derive(Debug)]
struct Usage {
    streams: usize,
    idle_since: Instant,
    /// Slaves whose stream broke: they may resume.
    resuming: HashSet<String>,
    /// Slaves that downloaded it whole and have not connected with `Sync` yet.
    installing: HashSet<String>,
}

impl Usage {
    fn new() -> Usage {
        Usage {
            streams: 0,
            idle_since: Instant::now(),
            resuming: HashSet::new(),
            installing: HashSet::new(),
        }
    }

    /// No stream runs and no slave still needs it.
    fn unneeded(&self) -> bool {
        self.streams == 0 && self.resuming.is_empty() && self.installing.is_empty()
    }
}

/// A checkpoint on disk.
pub struct Snapshot {
    pub id: String,
    pub dir: PathBuf,
    /// Applied index read from inside the checkpoint.
    pub index: u64,
    pub last_seq: u64,
    pub repl_id: ReplId,
    pub files: Vec<SnapshotFile>,
    pub total_bytes: u64,
    created: Instant,
    usage: Mutex<Usage>,
    progress: Arc<Progress>,
    /// Released when the last reference goes (after the GC removed it).
    _pin: PinGuard,
}

impl Snapshot {
    /// The binlog after the snapshot index is still there, so a slave that
    /// installs it can continue from it.
    pub fn alive(&self) -> bool {
        self.index + 1 >= self.progress.first_index.load(Ordering::Acquire)
    }

    fn usage(&self) -> MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `len` bytes of file `f` (one of [`Snapshot::files`]) at `offset`.
    /// Blocking.
    pub fn read_at(
        &self,
        file: &File,
        f: &SnapshotFile,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, SnapshotError> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| SnapshotError::FileChanged {
                id: self.id.clone(),
                name: f.name.clone(),
                detail: format!("reading {len} bytes at {offset}: {e}"),
            })?;
        Ok(buf)
    }

    /// Opens file `f` for [`Snapshot::read_at`], checking its size. Blocking.
    pub fn open(&self, f: &SnapshotFile) -> Result<File, SnapshotError> {
        let changed = |detail: String| SnapshotError::FileChanged {
            id: self.id.clone(),
            name: f.name.clone(),
            detail,
        };
        let file = File::open(self.dir.join(&f.name)).map_err(|e| changed(e.to_string()))?;
        let len = file.metadata().map_err(|e| changed(e.to_string()))?.len();
        if len != f.size {
            return Err(changed(format!("{len} bytes, expected {}", f.size)));
        }
        Ok(file)
    }
}

/// A stream's use of a snapshot; the snapshot is not removed while any exists.
pub struct SnapshotLease {
    snap: Arc<Snapshot>,
    slave_id: String,
    completed: bool,
}

impl std::ops::Deref for SnapshotLease {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.snap
    }
}

impl SnapshotLease {
    /// The snapshot itself, e.g. to move into a blocking task.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.clone()
    }

    /// The slave received the whole snapshot: it is done with it once it
    /// connects (see [`SnapshotManager::slave_connected`]).
    pub fn mark_completed(&mut self) {
        self.completed = true;
    }
}

impl Drop for SnapshotLease {
    fn drop(&mut self) {
        let mut u = self.snap.usage();
        u.streams = u.streams.saturating_sub(1);
        u.idle_since = Instant::now();
        let slave = std::mem::take(&mut self.slave_id);
        if self.completed {
            u.resuming.remove(&slave);
            u.installing.insert(slave);
        } else {
            u.resuming.insert(slave);
        }
    }
}

/// Every live snapshot of this master. Shared (`Arc`).
pub struct SnapshotManager {
    root: PathBuf,
    state: State,
    /// The history every checkpoint must be of (a master's); `None` (a slave
    /// serving its own slaves, which adopts its master's histories): the one
    /// stored in the checkpoint.
    repl_id: Option<ReplId>,
    pins: Arc<Pins>,
    progress: Arc<Progress>,
    idle: Duration,
    /// Least time between two new checkpoints.
    min_interval: Duration,
    /// When the last checkpoint was made.
    last_made: Mutex<Option<Instant>>,
    snapshots: Mutex<HashMap<String, Arc<Snapshot>>>,
    /// Serialises creation so that requests arriving together share one.
    creating: tokio::sync::Mutex<()>,
}

/// Removes `data_dir/snapshots` (leftovers of an earlier run). Blocking.
pub fn remove_all(data_dir: &Path) -> std::io::Result<()> {
    let root = data_dir.join(SNAPSHOTS_DIR);
    match std::fs::remove_dir_all(&root) {
        Ok(()) => {
            tracing::info!(dir = %root.display(), "removed leftover full-sync snapshots");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl SnapshotManager {
    pub fn new(
        data_dir: &Path,
        state: State,
        repl_id: Option<ReplId>,
        pins: Arc<Pins>,
        progress: Arc<Progress>,
        idle: Duration,
        min_interval: Duration,
    ) -> Arc<SnapshotManager> {
        Arc::new(SnapshotManager {
            root: data_dir.join(SNAPSHOTS_DIR),
            state,
            repl_id,
            pins,
            progress,
            idle,
            min_interval,
            last_made: Mutex::new(None),
            snapshots: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
        })
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Snapshot>>> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_of(snap: &Arc<Snapshot>, slave_id: &str) -> SnapshotLease {
        snap.usage().streams += 1;
        SnapshotLease {
            snap: snap.clone(),
            slave_id: slave_id.to_string(),
            completed: false,
        }
    }

    /// A lease on snapshot `id` for `slave_id`, if it exists and is alive.
    pub fn lease(&self, id: &str, slave_id: &str) -> Option<SnapshotLease> {
        let map = self.map();
        let snap = map.get(id)?;
        snap.alive().then(|| Self::lease_of(snap, slave_id))
    }

    /// `slave_id` now streams the binlog under its own pin: no snapshot it
    /// downloaded or started to download needs to wait for it any more.
    pub fn slave_connected(&self, slave_id: &str) {
        for snap in self.map().values() {
            let mut u = snap.usage();
            u.installing.remove(slave_id);
            u.resuming.remove(slave_id);
        }
    }

    /// A lease for `slave_id` on a snapshot made less than [`REUSE_WINDOW`]
    /// ago, or on a new one.
    pub async fn get_or_create(&self, slave_id: &str) -> Result<SnapshotLease, SnapshotError> {
        let _creating = self.creating.lock().await;
        {
            let map = self.map();
            if let Some(snap) = map
                .values()
                .filter(|s| s.created.elapsed() < REUSE_WINDOW && s.alive())
                .max_by_key(|s| s.created)
            {
                tracing::info!(snapshot_id = %snap.id, index = snap.index, "sharing a recent snapshot");
                return Ok(Self::lease_of(snap, slave_id));
            }
        }
        let last_made = *self.last_made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(made) = last_made
            && made.elapsed() < self.min_interval
        {
            let map = self.map();
            if let Some(snap) = map.values().filter(|s| s.alive()).max_by_key(|s| s.created) {
                tracing::info!(
                    snapshot_id = %snap.id,
                    index = snap.index,
                    "sharing the newest snapshot (sync.snapshot_min_interval_ms)"
                );
                return Ok(Self::lease_of(snap, slave_id));
            }
            return Err(SnapshotError::TooSoon {
                made_ms: made.elapsed().as_millis() as u64,
                retry_after: self.min_interval - made.elapsed(),
            });
        }
        let snap = Arc::new(self.create().await?);
        *self.last_made.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let mut map = self.map();
        let lease = Self::lease_of(&snap, slave_id);
        map.insert(snap.id.clone(), snap);
        Ok(lease)
    }

    async fn create(&self) -> Result<Snapshot, SnapshotError> {
        let id = format!("{:032x}", rand::random::<u128>());
        let started = Instant::now();
        // Pin first, at an index the checkpoint cannot be below: the binlog
        // after it stays while the checkpoint is made.
        let before = *self.progress.applied.borrow();
        let pin = self.pins.pin(format!("{SNAPSHOT_PREFIX}{id}"), before);
        let root = self.root.clone();
        let dir = root.join(&id);
        let state = self.state.clone();
        let dir2 = dir.clone();
        let made = tokio::task::spawn_blocking(move || -> Result<_, SnapshotError> {
            std::fs::create_dir_all(&root)?;
            let index = state.checkpoint(&dir2)?;
            let meta = read_checkpoint_meta(&dir2)?;
            if meta.applied_index != index {
                return Err(SnapshotError::Task(format!(
                    "checkpoint meta read twice gave {index} then {}",
                    meta.applied_index
                )));
            }
            let files = list_files(&dir2)?;
            Ok((meta, files))
        })
        .await;
        let remove_dir = |dir: PathBuf| async move {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        };
        let (meta, files) = match made {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                remove_dir(dir).await;
                return Err(e);
            }
            Err(e) => {
                remove_dir(dir).await;
                return Err(SnapshotError::Task(e.to_string()));
            }
        };
        let repl_id = match (meta.repl_id, self.repl_id) {
            (Some(found), None) => found,
            (Some(found), Some(expected)) if found == expected => found,
            (found, expected) => {
                remove_dir(dir).await;
                return Err(SnapshotError::WrongReplId {
                    found: found
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "(none)".into()),
                    expected: expected
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "a replication history (this node has none yet)".into()),
                });
            }
        };
        pin.update(meta.applied_index);
        let first = self.progress.first_index.load(Ordering::Acquire);
        if meta.applied_index + 1 < first {
            remove_dir(dir).await;
            return Err(SnapshotError::Purged {
                index: meta.applied_index,
                first,
            });
        }
        let total_bytes = files.iter().map(|f| f.size).sum();
        tracing::info!(
            snapshot_id = %id,
            index = meta.applied_index,
            last_seq = meta.last_seq,
            files = files.len(),
            total_bytes,
            ms = started.elapsed().as_millis() as u64,
            "full-sync snapshot created"
        );
        Ok(Snapshot {
            id,
            dir,
            index: meta.applied_index,
            last_seq: meta.last_seq,
            repl_id,
            files,
            total_bytes,
            created: Instant::now(),
            usage: Mutex::new(Usage::new()),
            progress: self.progress.clone(),
            _pin: pin,
        })
    }

    /// Removes the snapshots no stream uses that no slave needs any more, that
    /// are idle for too long, or that are dead.
    pub async fn gc(&self) {
        let gone: Vec<(Arc<Snapshot>, &'static str)> = {
            let mut map = self.map();
            let ids: Vec<(String, &'static str)> = map
                .values()
                .filter_map(|s| {
                    let u = s.usage();
                    let why = if u.streams > 0 {
                        None
                    } else if !s.alive() {
                        Some("binlog purged")
                    } else if u.unneeded() {
                        Some("its slaves are done with it")
                    } else if u.idle_since.elapsed() >= self.idle {
                        Some("idle")
                    } else {
                        None
                    };
                    why.map(|why| (s.id.clone(), why))
                })
                .collect();
            ids.into_iter()
                .filter_map(|(id, why)| map.remove(&id).map(|s| (s, why)))
                .collect()
        };
        for (snap, why) in gone {
            let dir = snap.dir.clone();
            let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            match removed {
                Ok(Ok(())) => {
                    tracing::info!(snapshot_id = %snap.id, index = snap.index, why, "full-sync snapshot removed")
                }
                Ok(Err(e)) => {
                    tracing::warn!(snapshot_id = %snap.id, error = %e, "removing a full-sync snapshot failed")
                }
                Err(e) => {
                    tracing::warn!(snapshot_id = %snap.id, error = %e, "removing a full-sync snapshot failed")
                }
            }
            // Dropping the last reference releases the pin.
        }
    }

    /// Runs [`SnapshotManager::gc`] periodically until `shutdown`.
    pub fn spawn_gc(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let mgr = self.clone();
        let period = (self.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(period) => mgr.gc().await,
                }
            }
        })
    }

    /// Forgets every snapshot and removes the snapshots directory (clean shutdown).
    pub async fn remove_everything(&self) {
        self.map().clear();
        let root = self.root.clone();
        let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        })
        .await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "removing the snapshots directory"),
            Err(e) => tracing::warn!(error = %e, "removing the snapshots directory"),
        }
    }
}

/// Every regular file under `dir` (recursively), sorted by name, with size and
/// crc32c. RocksDB's info logs (`LOG`, `LOG.old.*`) are left out: they are
/// not data, and opening the checkpoint to read its meta writes one.
fn list_files(dir: &Path) -> Result<Vec<SnapshotFile>, SnapshotError> {
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<SnapshotFile>) -> Result<(), SnapshotError> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let rel = format!("{prefix}{name}");
        let ty = entry.file_type()?;
        if ty.is_dir() {
            walk(&entry.path(), &format!("{rel}/"), out)?;
        } else if ty.is_file() {
            if prefix.is_empty() && (name == "LOG" || name.starts_with("LOG.old")) {
                continue;
            }
            let (size, crc32c) = file_crc(&entry.path())?;
            out.push(SnapshotFile {
                name: rel,
                size,
                crc32c,
            });
        }
    }
    Ok(())
}

fn file_crc(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0u32;
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((size, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
}
