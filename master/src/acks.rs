//! Which connected slaves hold what: the ack tracker behind semi-synchronous
//! writes (`min_replicas`) and `Admin.Wait`.
//!
//! Each sync session reports its slave's `received` index (the last
//! transaction durable in the slave's relay log, from its batch acks and
//! heartbeats, see [`crate::sync`]) and is removed when it ends: only
//! **connected** slaves count, because a disconnected one may have been wiped
//! or may come back behind what it acknowledged. One entry per slave id: the
//! latest session of a slave that reconnected replaces the older one, and an
//! older session still open never overwrites it.
//!
//! Waiters ([`Acks::wait`]) are woken by every change (a tokio `watch`); no
//! lock is held across an await, and the sessions never wait for a waiter: a
//! report is one map update under the watch's lock. The committer never sees
//! any of this: a write waits for slaves after its commit answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tern_common::position::Index;
use tokio::sync::watch;

/// What the connected slaves hold, by slave id.
#[derive(Debug, Default)]
struct Held {
    slaves: HashMap<String, Entry>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    session: u64,
    received: u64,
}

impl Held {
    fn count(&self, index: u64) -> u32 {
        let n = self.slaves.values().filter(|e| e.received >= index).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn acked(&self, index: u64) -> Acked {
        Acked {
            acked: self.count(index),
            connected: u32::try_from(self.slaves.len()).unwrap_or(u32::MAX),
        }
    }
}

/// How many connected slaves held an index when asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Acked {
    /// Slaves holding it durably.
    pub acked: u32,
    /// Slaves connected (each counted once, whatever its sessions).
    pub connected: u32,
}

/// The ack tracker of one master; see the module docs.
#[derive(Debug)]
pub struct Acks {
    held: watch::Sender<Held>,
}

impl Default for Acks {
    fn default() -> Self {
        Acks {
            held: watch::channel(Held::default()).0,
        }
    }
}

impl Acks {
    pub fn new() -> Arc<Acks> {
        Arc::new(Acks::default())
    }

    /// Session `session` of slave `slave` holds every event up to `received`
    /// durably in its relay log. Wakes the waiters when that changes
    /// anything.
    pub fn report(&self, slave: &str, session: u64, received: Index) {
        let received = received.get();
        self.held
            .send_if_modified(|h| match h.slaves.get_mut(slave) {
                None => {
                    h.slaves
                        .insert(slave.to_string(), Entry { session, received });
                    true
                }
                Some(e) if e.session == session => {
                    let moved = received > e.received;
                    e.received = e.received.max(received);
                    moved
                }
                // The slave reconnected: its latest session says what it holds.
                Some(e) if session > e.session => {
                    *e = Entry { session, received };
                    true
                }
                // An older session of a slave that reconnected.
                Some(_) => false,
            });
    }

    /// Session `session` of slave `slave` ended: the slave no longer counts
    /// (unless a newer session of it took its place).
    pub fn remove(&self, slave: &str, session: u64) {
        self.held.send_if_modified(|h| {
            if h.slaves.get(slave).is_some_and(|e| e.session == session) {
                h.slaves.remove(slave);
                true
            } else {
                false
            }
        });
    }

    /// How many connected slaves hold every event up to `index` now.
    pub fn acked(&self, index: Index) -> Acked {
        self.held.borrow().acked(index.get())
    }

    /// Waits until at least `replicas` connected slaves hold every event up
    /// to `index` durably, or until `deadline`; returns the count then (at
    /// least `replicas` unless the deadline passed). Returns at once when
    /// `replicas` is 0 or already reached.
    pub async fn wait(&self, index: Index, replicas: u32, deadline: Instant) -> Acked {
        let index = index.get();
        let mut rx = self.held.subscribe();
        let reached =
            tokio::time::timeout_at(deadline.into(), rx.wait_for(|h| h.count(index) >= replicas))
                .await
                .map(|r| r.map(|h| h.acked(index)));
        match reached {
            Ok(Ok(acked)) => acked,
            // Timed out (or, impossibly, the sender is gone: self holds it).
            _ => rx.borrow().acked(index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn i(n: u64) -> Index {
        Index::from(n)
    }

    fn held(acked: u32, connected: u32) -> Acked {
        Acked { acked, connected }
    }

    #[test]
    fn one_entry_per_slave_latest_session_wins() {
        let acks = Acks::default();
        assert_eq!(acks.acked(i(0)), held(0, 0));
        acks.report("a", 10, i(5));
        acks.report("b", 20, i(9));
        assert_eq!(acks.acked(i(5)), held(2, 2));
        assert_eq!(acks.acked(i(6)), held(1, 2));
        // Positions of one session never go back.
        acks.report("b", 20, i(3));
        assert_eq!(acks.acked(i(9)), held(1, 2));
        // "a" reconnects behind: its new session says what it holds...
        acks.report("a", 11, i(2));
        assert_eq!(acks.acked(i(5)), held(1, 2));
        // ...and its old session, still open, cannot overwrite it nor remove it.
        acks.report("a", 10, i(8));
        acks.remove("a", 10);
        assert_eq!(acks.acked(i(2)), held(2, 2));
        acks.remove("a", 11);
        assert_eq!(acks.acked(i(0)), held(1, 1));
        // The old session reports again after the new one left: it counts.
        acks.report("a", 10, i(8));
        assert_eq!(acks.acked(i(8)), held(2, 2));
    }

    #[tokio::test]
    async fn wait_wakes_on_acks_and_returns_the_count_at_the_deadline() {
        let acks = Acks::new();
        acks.report("a", 1, i(4));
        // Already there, and 0 replicas: at once.
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(acks.wait(i(4), 1, far).await.acked, 1);
        assert_eq!(acks.wait(i(100), 0, far).await.acked, 0);
        // Woken by a report, long before its deadline.
        let waiting = {
            let acks = acks.clone();
            tokio::spawn(async move { acks.wait(i(7), 2, far).await })
        };
        acks.report("b", 2, i(9));
        acks.report("a", 1, i(7));
        assert_eq!(waiting.await.unwrap(), held(2, 2));
        // Never reached: the count at the deadline.
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(acks.wait(i(8), 2, soon).await, held(1, 2));
    }
}
