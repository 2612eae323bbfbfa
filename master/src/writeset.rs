//! WRITESET dependency tracking: each transaction's `last_committed` is the
//! newest earlier transaction that wrote one of its keys, so a slave may apply
//! two transactions in parallel when neither depends on the other.
//!
//! The history maps a key hash to the last seq that wrote it and is bounded:
//! when it would grow past its capacity it is cleared and becomes a **barrier**
//! — every later transaction depends at least on the last one committed before
//! the reset. A restart starts from such a barrier too.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

pub struct WriteSet {
    history: HashMap<u64, u64>,
    /// Every transaction depends at least on this seq.
    base: u64,
    capacity: usize,
    hasher: std::hash::BuildHasherDefault<std::hash::DefaultHasher>,
}

impl WriteSet {
    /// A history that starts as a barrier at `last_seq`.
    pub fn new(last_seq: u64, capacity: usize) -> WriteSet {
        WriteSet {
            history: HashMap::with_capacity(capacity.min(1 << 16)),
            base: last_seq,
            capacity,
            hasher: Default::default(),
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(key);
        h.finish()
    }

    /// Computes `last_committed` for transaction `seq` writing `keys`, and records
    /// the writes. `seq` must be greater than every seq seen before.
    pub fn commit<'a>(&mut self, seq: u64, keys: impl Iterator<Item = &'a [u8]> + Clone) -> u64 {
        let hashes: Vec<u64> = keys.map(|k| self.hash(k)).collect();
        if self.history.len() + hashes.len() > self.capacity {
            self.history.clear();
            self.base = seq - 1;
        }
        let mut last_committed = self.base;
        for h in &hashes {
            if let Some(&s) = self.history.get(h) {
                last_committed = last_committed.max(s);
            }
        }
        for h in hashes {
            self.history.insert(h, seq);
        }
        last_committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<'a>(ks: &'a [&'a str]) -> impl Iterator<Item = &'a [u8]> + Clone {
        ks.iter().map(|k| k.as_bytes())
    }

    #[test]
    fn independent_transactions_share_a_parent_conflicting_ones_chain() {
        let mut ws = WriteSet::new(0, 100);
        assert_eq!(ws.commit(1, keys(&["a"])), 0);
        assert_eq!(ws.commit(2, keys(&["b"])), 0);
        assert_eq!(ws.commit(3, keys(&["a", "c"])), 1);
        assert_eq!(ws.commit(4, keys(&["c", "b"])), 3);
        assert_eq!(ws.commit(5, keys(&["d"])), 0);
    }

    #[test]
    fn restart_and_overflow_are_barriers() {
        let mut ws = WriteSet::new(10, 3);
        assert_eq!(ws.commit(11, keys(&["a"])), 10);
        assert_eq!(ws.commit(12, keys(&["b", "c"])), 10);
        // Would exceed capacity 3: history resets, barrier at 12.
        assert_eq!(ws.commit(13, keys(&["d"])), 12);
        assert_eq!(ws.commit(14, keys(&["a"])), 12);
        assert_eq!(ws.commit(15, keys(&["d"])), 13);
    }
}
