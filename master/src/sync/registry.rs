//! The slave registry: what `Admin.Info` shows about each slave that held a
//! sync session, keyed by slave id. A row belongs to the slave's latest
//! session: an older session of a slave that reconnected never touches it.
//!
//! Bounded for peers that are authenticated but broken: only an accepted
//! TrySync creates a row (a refused one only updates the row of a slave that
//! is not connected), ids and addresses are capped by [`tern_common::wire`],
//! a row whose slave has been gone for [`GONE_TTL`] is pruned, and at most
//! [`MAX_ROWS`] rows are kept (the longest-gone go first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tern_common::proto::admin::v1 as admin;

use crate::committer::Progress;

/// A row whose slave has been disconnected this long is removed.
pub const GONE_TTL: Duration = Duration::from_secs(3600);
/// Most rows kept.
pub const MAX_ROWS: usize = 1024;

/// What Info shows about one slave.
#[derive(Clone, Debug, Default)]
pub(super) struct SlaveEntry {
    pub addr: String,
    pub state: &'static str,
    pub session_id: u64,
    pub received: u64,
    pub applied: u64,
    /// Since when no session of this slave is connected.
    pub gone_since: Option<Instant>,
}

impl SlaveEntry {
    fn live(&self) -> bool {
        self.gone_since.is_none()
    }
}

#[derive(Default)]
pub(super) struct SlaveRegistry {
    slaves: Mutex<HashMap<String, SlaveEntry>>,
}

impl SlaveRegistry {
    fn slaves(&self) -> std::sync::MutexGuard<'_, HashMap<String, SlaveEntry>> {
        // Every update is a single field write: a panic elsewhere cannot leave
        // a row half-written in a way that matters.
        self.slaves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Per-slave rows for `Admin.Info`, sorted by id.
    pub fn infos(&self, progress: &Progress) -> Vec<admin::SlaveInfo> {
        use std::sync::atomic::Ordering;
        let last = progress.last_index.load(Ordering::Acquire);
        let first = progress.first_index.load(Ordering::Acquire);
        let mut rows: Vec<admin::SlaveInfo> = self
            .slaves()
            .iter()
            .map(|(id, e)| admin::SlaveInfo {
                id: id.clone(),
                addr: e.addr.clone(),
                state: e.state.to_string(),
                session_id: e.session_id,
                received_index: e.received,
                applied_index: e.applied,
                lag_events: last.saturating_sub(e.applied),
                lag_ms: progress.lag_since(e.applied).as_millis() as u64,
                needs_full_sync: e.received + 1 < first,
            })
            .collect();
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        rows
    }

    /// Creates or rewrites the row of a slave whose session was accepted;
    /// makes room first (see the module docs).
    pub fn connect(&self, slave_id: &str, f: impl FnOnce(&mut SlaveEntry)) {
        let mut slaves = self.slaves();
        if !slaves.contains_key(slave_id) {
            slaves.retain(|_, e| e.gone_since.is_none_or(|t| t.elapsed() < GONE_TTL));
            while slaves.len() >= MAX_ROWS {
                // Evict the longest-gone row; with none gone (more live sessions
                // than rows cannot happen under sync.max_sessions) the oldest id.
                let Some(victim) = slaves
                    .iter()
                    .filter_map(|(id, e)| e.gone_since.map(|t| (t, id)))
                    .min()
                    .map(|(_, id)| id.clone())
                    .or_else(|| slaves.keys().min().cloned())
                else {
                    break;
                };
                slaves.remove(&victim);
            }
        }
        let e = slaves.entry(slave_id.to_string()).or_default();
        e.gone_since = None;
        f(e);
    }

    /// Rewrites the row of a slave that is known and not connected (a refused
    /// TrySync never creates a row, nor touches a live session's).
    pub fn update_if_gone(&self, slave_id: &str, f: impl FnOnce(&mut SlaveEntry)) {
        if let Some(e) = self.slaves().get_mut(slave_id)
            && !e.live()
        {
            f(e);
        }
    }

    /// Marks the slave's row disconnected when `session_id` is its latest.
    pub fn disconnect(&self, slave_id: &str, session_id: u64) {
        self.update_session(slave_id, session_id, |e| {
            e.state = "disconnected";
            e.gone_since = Some(Instant::now());
        });
    }

    /// Updates the slave's row only while `session_id` is its latest session.
    pub fn update_session(&self, slave_id: &str, session_id: u64, f: impl FnOnce(&mut SlaveEntry)) {
        let mut slaves = self.slaves();
        if let Some(e) = slaves.get_mut(slave_id)
            && e.session_id == session_id
        {
            f(e);
        }
    }
}
