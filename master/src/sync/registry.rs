//! The slave registry: what `Admin.Info` shows about each slave that held a
//! sync session, keyed by slave id. A row belongs to the slave's latest
//! session: an older session of a slave that reconnected never touches it.

use std::collections::HashMap;
use std::sync::Mutex;

use tern_common::proto::admin::v1 as admin;

use crate::committer::Progress;

/// What Info shows about one slave.
#[derive(Clone, Debug, Default)]
pub(super) struct SlaveEntry {
    pub addr: String,
    pub state: &'static str,
    pub session_id: u64,
    pub received: u64,
    pub applied: u64,
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

    /// Creates or rewrites the slave's row.
    pub fn update(&self, slave_id: &str, f: impl FnOnce(&mut SlaveEntry)) {
        let mut slaves = self.slaves();
        let e = slaves.entry(slave_id.to_string()).or_default();
        f(e);
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
