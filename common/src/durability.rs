//! The one durability policy of a binlog (the master's binlog and the slave's
//! relay log alike): when to fsync under `binlog.fsync`, and which index counts
//! as durable for what.
//!
//! Every [`Binlog`](crate::binlog::Binlog) owns a [`Durability`] and asks it;
//! nothing else decides to fsync on its own:
//!
//! - **after each append** of a group ([`Binlog::sync_if_due`]): `always` fsyncs
//!   now (group commit: one fsync per group), `everysec` only if the last fsync
//!   is at least [`EVERYSEC`] old, `no` never;
//! - **from a timer** ([`Binlog::tick`]): under `everysec`, whatever is pending
//!   once the last fsync is [`EVERYSEC`] old, so an idle writer still becomes
//!   durable (and an idle slave link still advances `received`) within about a
//!   second;
//! - **before a RocksDB flush** ([`Binlog::sync_before_state_flush`]), whatever
//!   the policy: a flushed state whose applied index is ahead of the binlog's
//!   durable end could, after a power loss, be ahead of the binlog it is replayed
//!   from.
//!
//! What counts as durable follows from the policy:
//!
//! - the master **ships** ([`Durability::shippable`]) under `always` only what is
//!   fsynced, so a power loss on the master can never leave a slave ahead of it;
//!   under `everysec`/`no` as soon as it is written: the user accepted losing that
//!   window, and a master that lost it starts a new history (I8);
//! - a slave counts a transaction as **received** ([`Durability::received`]), the
//!   position it acknowledges, only once its Commit is fsynced in the relay log,
//!   under `always` and `everysec` (I3: under `everysec` up to about a second
//!   later); under `no` when it is written: nothing is ever fsynced outside a
//!   segment roll or a clean stop, so the user accepted that a slave's power loss
//!   can lose what it acknowledged (it re-fetches it, or reports itself ahead).
//!
//! [`Binlog::sync_if_due`]: crate::binlog::Binlog::sync_if_due
//! [`Binlog::tick`]: crate::binlog::Binlog::tick
//! [`Binlog::sync_before_state_flush`]: crate::binlog::Binlog::sync_before_state_flush

use std::time::{Duration, Instant};

use crate::binlog::FsyncPolicy;

/// Under `everysec`, the longest time between fsyncs while something is pending.
pub const EVERYSEC: Duration = Duration::from_secs(1);

/// The fsync decisions of one binlog; see the module docs.
#[derive(Clone, Debug)]
pub struct Durability {
    policy: FsyncPolicy,
    last_sync: Instant,
}

impl Durability {
    pub fn new(policy: FsyncPolicy) -> Durability {
        Durability {
            policy,
            last_sync: Instant::now(),
        }
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// Whether to fsync right after an append, `pending` being whether anything
    /// written is not durable yet.
    pub fn due_after_append(&self, pending: bool) -> bool {
        pending
            && match self.policy {
                FsyncPolicy::Always => true,
                FsyncPolicy::Everysec => self.last_sync.elapsed() >= EVERYSEC,
                FsyncPolicy::No => false,
            }
    }

    /// Whether a periodic tick should fsync what is pending.
    pub fn due_on_tick(&self, pending: bool) -> bool {
        pending && self.policy == FsyncPolicy::Everysec && self.last_sync.elapsed() >= EVERYSEC
    }

    /// How often a writer that may be idle should call [`Binlog::tick`], if at
    /// all: `everysec` needs a timer, the other policies do not.
    ///
    /// [`Binlog::tick`]: crate::binlog::Binlog::tick
    pub fn tick_interval(&self) -> Option<Duration> {
        (self.policy == FsyncPolicy::Everysec).then_some(EVERYSEC / 4)
    }

    /// Records that an fsync just succeeded.
    pub fn synced(&mut self) {
        self.last_sync = Instant::now();
    }

    /// The last index a master may ship, given the last index written and the
    /// last index fsynced.
    pub fn shippable(&self, written: u64, fsynced: u64) -> u64 {
        match self.policy {
            FsyncPolicy::Always => fsynced,
            FsyncPolicy::Everysec | FsyncPolicy::No => written,
        }
    }

    /// The transaction boundary a slave may report as received, given the last
    /// boundary written and the last boundary fsynced in its relay log.
    pub fn received(&self, written_boundary: u64, fsynced_boundary: u64) -> u64 {
        match self.policy {
            FsyncPolicy::Always | FsyncPolicy::Everysec => fsynced_boundary,
            FsyncPolicy::No => written_boundary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn always_syncs_every_append_and_counts_only_fsynced() {
        let d = Durability::new(FsyncPolicy::Always);
        assert!(d.due_after_append(true));
        assert!(!d.due_after_append(false));
        assert!(!d.due_on_tick(true));
        assert_eq!(d.tick_interval(), None);
        assert_eq!(d.shippable(10, 7), 7);
        assert_eq!(d.received(10, 7), 7);
    }

    #[test]
    fn everysec_waits_a_second_ships_written_and_receives_fsynced() {
        let mut d = Durability::new(FsyncPolicy::Everysec);
        d.synced();
        assert!(!d.due_after_append(true));
        assert!(!d.due_on_tick(true));
        d.last_sync = Instant::now() - EVERYSEC;
        assert!(d.due_after_append(true));
        assert!(d.due_on_tick(true));
        assert!(!d.due_on_tick(false));
        assert_eq!(d.tick_interval(), Some(EVERYSEC / 4));
        assert_eq!(d.shippable(10, 7), 10);
        assert_eq!(d.received(10, 7), 7);
    }

    #[test]
    fn no_never_syncs_and_counts_written() {
        let mut d = Durability::new(FsyncPolicy::No);
        d.last_sync = Instant::now() - 10 * EVERYSEC;
        assert!(!d.due_after_append(true));
        assert!(!d.due_on_tick(true));
        assert_eq!(d.shippable(10, 7), 10);
        assert_eq!(d.received(10, 7), 10);
    }
}
