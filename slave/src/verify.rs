//! The slave's side of the online consistency checks
//! (`sync.verify_interval_secs` on the master).
//!
//! The master logs a check point (a transaction holding a `VerifyPoint`
//! event) and, later, its keyspace digest at that point (`VerifyDigest`).
//! The applier applies a check point in a group of its own and hands it
//! here at once: a thread takes a RocksDB snapshot (the applier waits for it,
//! a moment) and digests it exactly as `Admin.Checksum` does. When the
//! master's digest is applied, the two are compared (whichever comes second
//! compares). A mismatch is logged as an error, counted
//! (`Info.counters.verify_mismatches`) and, with
//! `slave.stop_reads_on_mismatch` (the default), stops every read (gRPC and
//! RESP answer UNAVAILABLE) until the slave is resynced: the reason is kept
//! in `data_dir/VERIFY_MISMATCH`, so a restart keeps reads stopped, and
//! installing a full sync removes it. A slave that did not digest a point
//! (it was started, or full-synced, after it) skips that check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tern_common::state::State;

/// Name of the file holding why reads are stopped.
pub const MISMATCH_FILE: &str = "VERIFY_MISMATCH";
/// Check points whose digests are kept while the master's is awaited.
const KEPT_POINTS: usize = 16;

/// Counters and the read stop, shared by every incarnation of the node.
#[derive(Default)]
pub struct VerifyStats {
    pub checks: AtomicU64,
    pub mismatches: AtomicU64,
    /// The last check point compared.
    pub last_index: AtomicU64,
    /// Why reads are stopped (the read floor refuses reads while it is set).
    pub stopped: Arc<Mutex<Option<String>>>,
}

/// A digest of this slave's state at a check point.
#[derive(Clone, Debug)]
enum Ours {
    Computing,
    Done { digest: String, keys: u64 },
    Failed,
}

#[derive(Default)]
struct Points {
    ours: BTreeMap<u64, Ours>,
    /// The master's digest of a point whose own digest is still computing.
    theirs: BTreeMap<u64, (String, u64)>,
}

#[derive(Clone)]
pub struct Verifier {
    state: State,
    data_dir: PathBuf,
    stop_reads: bool,
    stats: Arc<VerifyStats>,
    points: Arc<Mutex<Points>>,
}

/// Reads the reason a previous run stopped reads, if any (at start).
pub fn load_stop(data_dir: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(data_dir.join(MISMATCH_FILE)) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Forgets a stop (a full sync replaced the data).
pub fn clear_stop(data_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(data_dir.join(MISMATCH_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Verifier {
    pub fn new(
        state: State,
        data_dir: &Path,
        stop_reads: bool,
        stats: Arc<VerifyStats>,
    ) -> Verifier {
        Verifier {
            state,
            data_dir: data_dir.to_path_buf(),
            stop_reads,
            stats,
            points: Arc::new(Mutex::new(Points::default())),
        }
    }

    fn points(&self) -> std::sync::MutexGuard<'_, Points> {
        self.points.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state was just applied up to check point `point`: digests it on a
    /// thread of its own, returning once the snapshot is taken (so nothing
    /// applied later is in it).
    pub fn point(&self, point: u64) {
        {
            let mut p = self.points();
            p.ours.insert(point, Ours::Computing);
            while p.ours.len() > KEPT_POINTS {
                p.ours.pop_first();
            }
        }
        let me = self.clone();
        let spawned = self.state.digest_in_background(move |r| {
            let ours = match r {
                Ok(c) if c.index == point => Ours::Done {
                    digest: c.digest,
                    keys: c.keys,
                },
                Ok(c) => {
                    tracing::error!(
                        point,
                        snapshot = c.index,
                        "consistency check: snapshot not at the point"
                    );
                    Ours::Failed
                }
                Err(e) => {
                    tracing::error!(point, error = %e, "consistency check: digest failed");
                    Ours::Failed
                }
            };
            me.finished(point, ours);
        });
        if let Err(e) = spawned {
            tracing::error!(point, error = %e, "consistency check: no digest thread");
            self.points().ours.insert(point, Ours::Failed);
        }
    }

    /// The master's digest of check point `point` was applied.
    pub fn digest(&self, point: u64, digest: &Bytes, keys: u64) {
        let theirs = hex::encode(digest);
        let ours = {
            let mut p = self.points();
            match p.ours.get(&point).cloned() {
                Some(Ours::Computing) => {
                    p.theirs.insert(point, (theirs, keys));
                    return;
                }
                other => other,
            }
        };
        match ours {
            Some(Ours::Done { digest, keys: k }) => self.compare(point, &theirs, keys, &digest, k),
            Some(Ours::Failed) | Some(Ours::Computing) => {}
            None => tracing::info!(
                point,
                "consistency check skipped: this slave did not digest that point (it started or \
                 full-synced after it)"
            ),
        }
    }

    fn finished(&self, point: u64, ours: Ours) {
        let waiting = {
            let mut p = self.points();
            p.ours.insert(point, ours.clone());
            p.theirs.remove(&point)
        };
        if let (Some((theirs, keys)), Ours::Done { digest, keys: k }) = (waiting, ours) {
            self.compare(point, &theirs, keys, &digest, k);
        }
    }

    fn compare(&self, point: u64, theirs: &str, their_keys: u64, ours: &str, our_keys: u64) {
        self.stats.checks.fetch_add(1, Ordering::Relaxed);
        self.stats.last_index.store(point, Ordering::Release);
        if theirs == ours && their_keys == our_keys {
            tracing::info!(point, keys = our_keys, "consistency check passed");
            return;
        }
        self.stats.mismatches.fetch_add(1, Ordering::Relaxed);
        let why = format!(
            "consistency check failed at index {point}: the master's keyspace digest is {theirs} \
             ({their_keys} keys), this slave's is {ours} ({our_keys} keys); resync this slave \
             (remove its data directory and restart it: it full-syncs)"
        );
        tracing::error!(
            point,
            master_digest = theirs,
            digest = ours,
            master_keys = their_keys,
            keys = our_keys,
            "{why}"
        );
        if self.stop_reads {
            let record = format!("reads stopped: {why}\n");
            if let Err(e) = crate::floor::replace_file(&self.data_dir, MISMATCH_FILE, &record) {
                tracing::error!(error = %e, "recording the read stop");
            }
            *self.stats.stopped.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("reads stopped: {why}"));
        }
    }
}
