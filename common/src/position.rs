//! Positions in a replication history.
//!
//! Every binlog event has an [`Index`]: contiguous, starting at 1, never reused.
//! A [`Position`] is `(repl_id, index)` where `index` is a transaction boundary
//! (0, or the index of a Commit event). Hazard: an index alone means nothing
//! across histories; compare positions only when their `ReplId`s are equal.

use std::fmt;
use std::str::FromStr;

/// Index of a binlog event. `Index(0)` is "before the first event".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Index(pub u64);

impl Index {
    pub const ZERO: Index = Index(0);

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn next(self) -> Index {
        Index(self.0 + 1)
    }
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for Index {
    fn from(v: u64) -> Self {
        Index(v)
    }
}

/// Random 128-bit id of a master's history, created with its data directory.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplId(pub u128);

impl ReplId {
    pub fn random() -> ReplId {
        ReplId(rand::random::<u128>() | 1)
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(b: [u8; 16]) -> ReplId {
        ReplId(u128::from_be_bytes(b))
    }
}

impl fmt::Display for ReplId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ReplId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplId({self})")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid repl id {0:?}: expected 32 hex digits")]
pub struct ParseReplIdError(pub String);

impl FromStr for ReplId {
    type Err = ParseReplIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseReplIdError(s.to_string()));
        }
        u128::from_str_radix(s, 16)
            .map(ReplId)
            .map_err(|_| ParseReplIdError(s.to_string()))
    }
}

/// A transaction boundary in one replication history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub repl_id: ReplId,
    pub index: Index,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repl_id, self.index)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid position {0:?}: expected <32 hex digits>:<index>")]
pub struct ParsePositionError(pub String);

impl FromStr for Position {
    type Err = ParsePositionError;

    /// Parses what `Display` writes: `<repl id>:<index>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError(s.chars().take(80).collect());
        let (id, index) = s.split_once(':').ok_or_else(err)?;
        if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        Ok(Position {
            repl_id: id.parse().map_err(|_| err())?,
            index: Index(index.parse().map_err(|_| err())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repl_id_round_trips_through_hex() {
        let id = ReplId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let s = id.to_string();
        assert_eq!(s, "0123456789abcdef0011223344556677");
        assert_eq!(s.parse::<ReplId>(), Ok(id));
        assert_eq!(ReplId::from_bytes(id.to_bytes()), id);
    }

    #[test]
    fn position_round_trips_and_rejects_bad_text() {
        let p = Position {
            repl_id: ReplId(0xabc),
            index: Index(42),
        };
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        for bad in [
            "",
            ":",
            "00000000000000000000000000000abc",
            "00000000000000000000000000000abc:",
            "00000000000000000000000000000abc:-1",
            "00000000000000000000000000000abc:+1",
            "00000000000000000000000000000abc:99999999999999999999999",
            "xyz:1",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repl_id_rejects_bad_text() {
        assert!("xyz".parse::<ReplId>().is_err());
        assert!("0123456789abcdef001122334455667".parse::<ReplId>().is_err());
        assert!(
            "0123456789abcdef00112233445566zz"
                .parse::<ReplId>()
                .is_err()
        );
        assert!(
            "+123456789abcdef0011223344556677"
                .parse::<ReplId>()
                .is_err()
        );
    }
}
