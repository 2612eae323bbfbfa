//! Binlog pins: who still needs the binlog after which index.
//!
//! A pin `(owner, index)` says "`owner` has everything up to `index` and needs
//! the events after it": retention never purges a segment holding an event
//! after the smallest pin, unless the binlog is over `binlog.max_retain_bytes`
//! (see [`crate::committer`]). Owners are `slave:<id>` (a connected sync
//! session, at the slave's received index) and `snapshot:<id>` (a full-sync
//! checkpoint, at its applied index).
//!
//! A pin belongs to its holder (the [`PinGuard`]), not to the owner name: two
//! sessions using the same slave id each hold their own pin, and one of them
//! ending (or moving its pin) never strips the other's.
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

#[derive(Clone, Debug)]
struct Entry {
    owner: String,
    index: u64,
}

/// Pins by holder token.
type Entries = HashMap<u64, Entry>;

/// The registry, shared by the committer, sync sessions and snapshots.
#[derive(Default)]
pub struct Pins {
    entries: Mutex<Entries>,
    next_token: AtomicU64,
}

/// The registry while locked (see the module docs).
pub struct PinsLocked<'a> {
    entries: MutexGuard<'a, Entries>,
}

impl PinsLocked<'_> {
    /// Smallest pin whose owner starts with `prefix` (any owner for `""`).
    pub fn min_with_prefix(&self, prefix: &str) -> Option<u64> {
        self.entries
            .values()
            .filter(|e| e.owner.starts_with(prefix))
            .map(|e| e.index)
            .min()
    }

    /// Owners with a pin below `index`, sorted, each once.
    pub fn owners_below(&self, index: u64) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .values()
            .filter(|e| e.index < index)
            .map(|e| e.owner.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

impl Pins {
    pub fn new() -> Arc<Pins> {
        Arc::new(Pins::default())
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
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

    /// Pins `owner` at `index` for the returned holder; other holders of the
    /// same owner name keep theirs. Released when the guard is dropped.
    pub fn pin(self: &Arc<Pins>, owner: String, index: u64) -> PinGuard {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.entries().insert(
            token,
            Entry {
                owner: owner.clone(),
                index,
            },
        );
        PinGuard {
            pins: self.clone(),
            owner,
            token,
        }
    }

    /// Every owner with its smallest pin, sorted by owner, for `Admin.Info`.
    pub fn list(&self) -> Vec<(String, u64)> {
        let mut by_owner: HashMap<String, u64> = HashMap::new();
        for e in self.entries().values() {
            let i = by_owner.entry(e.owner.clone()).or_insert(e.index);
            *i = (*i).min(e.index);
        }
        let mut v: Vec<(String, u64)> = by_owner.into_iter().collect();
        v.sort();
        v
    }
}

/// A held pin; moving it or dropping it only affects this holder's pin.
pub struct PinGuard {
    pins: Arc<Pins>,
    owner: String,
    token: u64,
}

impl PinGuard {
    /// Moves the pin to `index` (the owner now needs the events after it).
    pub fn update(&self, index: u64) {
        if let Some(e) = self.pins.entries().get_mut(&self.token) {
            e.index = index;
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.pins.entries().remove(&self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_of_one_owner_name_keep_their_own_pins() {
        let pins = Pins::new();
        let live = pins.pin("slave:a".into(), 10);
        // A second session with the same slave id: its pin and its end leave
        // the live session's pin where it was.
        let rogue = pins.pin("slave:a".into(), 20);
        rogue.update(40);
        assert_eq!(pins.list(), vec![("slave:a".to_string(), 10)]);
        drop(rogue);
        assert_eq!(pins.list(), vec![("slave:a".to_string(), 10)]);
        assert_eq!(pins.lock().owners_below(11), vec!["slave:a".to_string()]);
        live.update(30);
        assert_eq!(pins.lock().min_with_prefix(SLAVE_PREFIX), Some(30));
        drop(live);
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
