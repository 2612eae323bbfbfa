//! Replication histories (I8): which `(repl_id, index)` positions name a
//! prefix of this node's log.
//!
//! A master starts a new history (a new [`ReplId`]) whenever it cannot prove
//! that everything it may have shipped is still its own: after a crash with
//! `binlog.fsync = everysec | no` (events were shipped before they were
//! durable, and the disk may have lost them), and at promotion. The history it
//! leaves becomes an **ancestor** that ended at the last index it still holds.
//! A position `(ancestor, i)` is a prefix of the current log iff `i` is at or
//! before the ancestor's end (and before the end of every later ancestor); a
//! slave at `(ancestor, i > end)` holds events beyond the fork: it has
//! **diverged** and must never be continued from there.
//!
//! Stored in the state's meta column family next to the repl id, so a
//! checkpoint (full sync) carries the histories of the data it holds.

use std::fmt;

use crate::position::{Index, Position, ReplId};

/// Ancestors kept: each unclean restart under `everysec`/`no` adds one. A
/// slave that still follows an older one gets a full sync.
pub const MAX_ANCESTORS: usize = 64;
/// Bytes of one encoded entry: repl id (16) + end index (8, big endian).
const ENTRY_BYTES: usize = 24;

/// A history this node's log descends from, and the last index it holds of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub repl_id: ReplId,
    pub end: Index,
}

impl fmt::Display for HistoryEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (ended at {})", self.repl_id, self.end)
    }
}

/// Why a position is not a prefix of this node's log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("repl id {0} is not this node's history nor one of its ancestors")]
    Unknown(ReplId),
    #[error(
        "history {repl_id} ended at index {end} here, but the position is at {index}: it holds \
         events beyond the fork"
    )]
    Diverged {
        repl_id: ReplId,
        end: Index,
        index: Index,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("corrupt history list: {0}")]
pub struct DecodeHistoryError(pub String);

/// The current history and its ancestors (oldest first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histories {
    pub current: ReplId,
    pub ancestors: Vec<HistoryEntry>,
}

impl Histories {
    pub fn new(current: ReplId) -> Histories {
        Histories {
            current,
            ancestors: Vec::new(),
        }
    }

    /// Checks that `pos` names a prefix of this log. `Ok` for the current
    /// history at any index (the caller checks it against the log's extent),
    /// and for an ancestor at or before where it (and every later ancestor)
    /// ended.
    pub fn check(&self, pos: Position) -> Result<(), HistoryError> {
        if pos.repl_id == self.current {
            return Ok(());
        }
        let i = self
            .ancestors
            .iter()
            .rposition(|h| h.repl_id == pos.repl_id)
            .ok_or(HistoryError::Unknown(pos.repl_id))?;
        // A later history can only have kept less of the common prefix.
        let end = self.ancestors[i..]
            .iter()
            .map(|h| h.end)
            .min()
            .expect("non-empty");
        if pos.index > end {
            return Err(HistoryError::Diverged {
                repl_id: pos.repl_id,
                end,
                index: pos.index,
            });
        }
        Ok(())
    }

    /// Ends the current history at `end` and starts `next`.
    pub fn fork(&mut self, end: Index, next: ReplId) {
        self.ancestors.push(HistoryEntry {
            repl_id: self.current,
            end,
        });
        if self.ancestors.len() > MAX_ANCESTORS {
            let extra = self.ancestors.len() - MAX_ANCESTORS;
            self.ancestors.drain(..extra);
        }
        self.current = next;
    }

    /// Encodes the ancestors (the current id is stored on its own).
    pub fn encode_ancestors(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ancestors.len() * ENTRY_BYTES);
        for h in &self.ancestors {
            out.extend_from_slice(&h.repl_id.to_bytes());
            out.extend_from_slice(&h.end.get().to_be_bytes());
        }
        out
    }

    /// Decodes what [`encode_ancestors`](Self::encode_ancestors) wrote.
    pub fn decode_ancestors(bytes: &[u8]) -> Result<Vec<HistoryEntry>, DecodeHistoryError> {
        if !bytes.len().is_multiple_of(ENTRY_BYTES) {
            return Err(DecodeHistoryError(format!(
                "{} bytes is not a multiple of {ENTRY_BYTES}",
                bytes.len()
            )));
        }
        if bytes.len() / ENTRY_BYTES > MAX_ANCESTORS {
            return Err(DecodeHistoryError(format!(
                "{} entries; at most {MAX_ANCESTORS} are kept",
                bytes.len() / ENTRY_BYTES
            )));
        }
        Ok(bytes
            .chunks_exact(ENTRY_BYTES)
            .map(|c| HistoryEntry {
                repl_id: ReplId::from_bytes(c[..16].try_into().expect("16 bytes")),
                end: Index(u64::from_be_bytes(c[16..].try_into().expect("8 bytes"))),
            })
            .collect())
    }
}

impl Histories {
    /// The ancestors as `Admin.Info` shows them.
    pub fn admin_list(&self) -> Vec<crate::proto::admin::v1::History> {
        self.ancestors
            .iter()
            .map(|h| crate::proto::admin::v1::History {
                repl_id: h.repl_id.to_string(),
                end_index: h.end.get(),
            })
            .collect()
    }

    /// The ancestors as a TrySyncResponse carries them.
    pub fn replication_list(&self) -> Vec<crate::proto::replication::v1::History> {
        self.ancestors
            .iter()
            .map(|h| crate::proto::replication::v1::History {
                repl_id: h.repl_id.to_string(),
                end_index: h.end.get(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(r: u128, i: u64) -> Position {
        Position {
            repl_id: ReplId(r),
            index: Index(i),
        }
    }

    #[test]
    fn current_history_accepts_any_index() {
        let h = Histories::new(ReplId(7));
        assert_eq!(h.check(pos(7, 0)), Ok(()));
        assert_eq!(h.check(pos(7, 1_000_000)), Ok(()));
        assert_eq!(h.check(pos(8, 0)), Err(HistoryError::Unknown(ReplId(8))));
    }

    #[test]
    fn ancestor_accepts_up_to_its_end_only() {
        let mut h = Histories::new(ReplId(1));
        h.fork(Index(100), ReplId(2));
        assert_eq!(h.check(pos(1, 0)), Ok(()));
        assert_eq!(h.check(pos(1, 100)), Ok(()));
        assert_eq!(
            h.check(pos(1, 101)),
            Err(HistoryError::Diverged {
                repl_id: ReplId(1),
                end: Index(100),
                index: Index(101)
            })
        );
        assert_eq!(h.check(pos(2, 150)), Ok(()));
    }

    #[test]
    fn a_later_fork_that_kept_less_bounds_older_ancestors() {
        let mut h = Histories::new(ReplId(1));
        h.fork(Index(100), ReplId(2));
        // History 2 lost its tail back to 80 (only possible if something
        // outside tern cut the log, but the check must not rely on that).
        h.fork(Index(80), ReplId(3));
        assert_eq!(h.check(pos(1, 80)), Ok(()));
        assert!(matches!(
            h.check(pos(1, 90)),
            Err(HistoryError::Diverged { end: Index(80), .. })
        ));
        assert_eq!(h.check(pos(2, 80)), Ok(()));
        assert!(h.check(pos(2, 81)).is_err());
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let mut h = Histories::new(ReplId(1));
        h.fork(Index(10), ReplId(2));
        h.fork(Index(u64::MAX), ReplId(3));
        let bytes = h.encode_ancestors();
        assert_eq!(Histories::decode_ancestors(&bytes).unwrap(), h.ancestors);
        assert!(Histories::decode_ancestors(&bytes[..23]).is_err());
        assert!(Histories::decode_ancestors(&vec![0; ENTRY_BYTES * (MAX_ANCESTORS + 1)]).is_err());
        assert_eq!(Histories::decode_ancestors(&[]).unwrap(), vec![]);
    }

    #[test]
    fn ancestors_are_bounded() {
        let mut h = Histories::new(ReplId(1));
        for i in 0..(MAX_ANCESTORS as u128 + 10) {
            h.fork(Index(i as u64), ReplId(i + 2));
        }
        assert_eq!(h.ancestors.len(), MAX_ANCESTORS);
        assert_eq!(h.current, ReplId(MAX_ANCESTORS as u128 + 11));
        // The oldest were dropped: following one of them needs a full sync.
        assert_eq!(h.check(pos(1, 0)), Err(HistoryError::Unknown(ReplId(1))));
    }
}
