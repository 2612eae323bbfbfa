//! Binlog pins: who still needs the binlog after which index.
//!
//! A pin `(owner, index)` says "`owner` has everything up to `index` and needs
//! the events after it": retention never purges a segment holding an event
//! after the smallest pin, unless the binlog is over `binlog.max_retain_bytes`
//! (see [`crate::committer`]). Owners are `slave:<id>` (a connected sync
//! session, at the slave's received index) and `snapshot:<id>` (a full-sync
//! checkpoint, at its applied index).
//!
//! Registering a pin and purging are serialised by the registry's lock: the
//! committer holds [`Pins::lock`] while it decides, purges and publishes the
//! new first index, so a pin set before that sees the binlog kept, and one set
//! after sees the new first index (and the caller can tell it came too late).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Owner prefix of a connected slave's pin.
pub const SLAVE_PREFIX: &str = "slave:";
/// Owner prefix of a full-sync snapshot's pin.
pub const SNAPSHOT_PREFIX: &str = "snapshot:";

#[derive(Clone, Copy, Debug)]
struct Entry {
    index: u64,
    /// Which holder set it last: an older holder of the same owner name (a
    /// slave's previous session) can neither move nor release it.
    token: u64,
}

/// The registry, shared by the committer, sync sessions and snapshots.
#[derive(Default)]
pub struct Pins {
    entries: Mutex<HashMap<String, Entry>>,
    next_token: AtomicU64,
}

/// The registry while locked (see the module docs).
pub struct PinsLocked<'a> {
    entries: MutexGuard<'a, HashMap<String, Entry>>,
}

impl PinsLocked<'_> {
    /// Smallest pin whose owner starts with `prefix` (any owner for `""`).
    pub fn min_with_prefix(&self, prefix: &str) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(o, _)| o.starts_with(prefix))
            .map(|(_, e)| e.index)
            .min()
    }

    /// Owners whose pin is below `index`, sorted.
    pub fn owners_below(&self, index: u64) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.index < index)
            .map(|(o, _)| o.clone())
            .collect();
        v.sort();
        v
    }
}

impl Pins {
    pub fn new() -> Arc<Pins> {
        Arc::new(Pins::default())
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every update is a single insert or remove): keep going.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the registry; retention holds this while it purges.
    pub fn lock(&self) -> PinsLocked<'_> {
        PinsLocked {
            entries: self.entries(),
        }
    }

    /// Pins `owner` at `index`, replacing whoever held that owner name. The
    /// pin is released when the returned guard is dropped.
    pub fn pin(self: &Arc<Pins>, owner: String, index: u64) -> PinGuard {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.entries().insert(owner.clone(), Entry { index, token });
        PinGuard {
            pins: self.clone(),
            owner,
            token,
        }
    }

    /// Every pin, sorted by owner, for `Admin.Info`.
    pub fn list(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .entries()
            .iter()
            .map(|(o, e)| (o.clone(), e.index))
            .collect();
        v.sort();
        v
    }
}

/// A held pin; moving it or dropping it only affects the registry while this
/// holder is still the owner's latest.
pub struct PinGuard {
    pins: Arc<Pins>,
    owner: String,
    token: u64,
}

impl PinGuard {
    /// Moves the pin to `index` (the owner now needs the events after it).
    pub fn update(&self, index: u64) {
        if let Some(e) = self.pins.entries().get_mut(&self.owner)
            && e.token == self.token
        {
            e.index = index;
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut entries = self.pins.entries();
        if entries
            .get(&self.owner)
            .is_some_and(|e| e.token == self.token)
        {
            entries.remove(&self.owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_holder_wins_and_older_release_is_ignored() {
        let pins = Pins::new();
        let old = pins.pin("slave:a".into(), 10);
        let new = pins.pin("slave:a".into(), 20);
        old.update(5);
        assert_eq!(pins.list(), vec![("slave:a".to_string(), 20)]);
        drop(old);
        assert_eq!(pins.list(), vec![("slave:a".to_string(), 20)]);
        new.update(30);
        assert_eq!(pins.lock().min_with_prefix(SLAVE_PREFIX), Some(30));
        drop(new);
        assert!(pins.list().is_empty());
    }

    #[test]
    fn minimum_by_prefix_and_owners_below() {
        let pins = Pins::new();
        let _a = pins.pin("slave:a".into(), 50);
        let _b = pins.pin("slave:b".into(), 7);
        let _s = pins.pin("snapshot:x".into(), 30);
        let l = pins.lock();
        assert_eq!(l.min_with_prefix(""), Some(7));
        assert_eq!(l.min_with_prefix(SNAPSHOT_PREFIX), Some(30));
        assert_eq!(l.min_with_prefix(SLAVE_PREFIX), Some(7));
        assert_eq!(
            l.owners_below(40),
            vec!["slave:b".to_string(), "snapshot:x".to_string()]
        );
    }
}
