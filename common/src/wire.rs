//! Replication messages from the network, converted once into checked domain
//! types. Everything a master reads from a `Sync` or `DbSync` stream goes
//! through here: lengths are capped, positions are ordered, repl ids parse,
//! and the arithmetic the session does on them later cannot overflow.
//! [`crate::status`] turns a [`WireError`] into the gRPC status the peer gets.

use crate::position::{Index, Position, ReplId};
use crate::proto::replication::v1 as pb;

/// Longest slave id accepted (TrySync and DbSync).
pub const MAX_SLAVE_ID_BYTES: usize = 256;
/// Longest `TrySync.addr` accepted.
pub const MAX_ADDR_BYTES: usize = 256;
/// Longest snapshot id accepted.
pub const MAX_SNAPSHOT_ID_BYTES: usize = 128;
/// Most `have` entries one `DbSyncRequest` may carry.
pub const MAX_HAVE: usize = 1 << 16;
/// Longest file name in a `have` entry.
pub const MAX_FILE_NAME_BYTES: usize = 1024;

/// Why a message from the network was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{field} must be 1 to {max} bytes, it is {len}")]
    BadLength {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is longer than {max} bytes ({len})")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} lists {len} entries; the limit is {max}")]
    TooMany {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("TrySync.repl_id {0:?} is not a repl id (32 hex digits)")]
    BadReplId(String),
    #[error("{0} carries no message")]
    Empty(&'static str),
    #[error("{0}")]
    Invalid(String),
    /// Positions that contradict each other (applied beyond received, ...).
    #[error("{0}")]
    Positions(String),
}

fn check_len(field: &'static str, s: &str, max: usize, allow_empty: bool) -> Result<(), WireError> {
    if s.len() > max || (!allow_empty && s.is_empty()) {
        return Err(if allow_empty {
            WireError::TooLong {
                field,
                len: s.len(),
                max,
            }
        } else {
            WireError::BadLength {
                field,
                len: s.len(),
                max,
            }
        });
    }
    Ok(())
}

/// A checked `TrySync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrySyncRequest {
    pub slave_id: String,
    /// `None` for a slave without a history (it needs a full sync).
    pub position: Option<Position>,
    /// Seq of the slave's transaction ending at the position's index.
    pub seq: u64,
    pub addr: String,
}

impl TrySyncRequest {
    /// The index the slave asks to continue after (0 without a history).
    pub fn index(&self) -> u64 {
        self.position.map_or(0, |p| p.index.get())
    }
}

impl TryFrom<pb::TrySync> for TrySyncRequest {
    type Error = WireError;

    fn try_from(t: pb::TrySync) -> Result<Self, WireError> {
        check_len("TrySync.slave_id", &t.slave_id, MAX_SLAVE_ID_BYTES, false)?;
        check_len("TrySync.addr", &t.addr, MAX_ADDR_BYTES, true)?;
        let position = if t.repl_id.is_empty() {
            None
        } else {
            let repl_id: ReplId = t.repl_id.parse().map_err(|_| {
                WireError::BadReplId(t.repl_id.chars().take(64).collect::<String>())
            })?;
            Some(Position {
                repl_id,
                index: Index(t.index),
            })
        };
        // Every later position is compared with `index + 1`: keep it representable.
        if t.index == u64::MAX {
            return Err(WireError::Positions(format!(
                "TrySync.index {} is not a binlog index",
                t.index
            )));
        }
        Ok(TrySyncRequest {
            slave_id: t.slave_id,
            position,
            seq: t.seq,
            addr: t.addr,
        })
    }
}

/// A checked `BinlogAck`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// The first ack of a session: the slave has everything up to `index`.
    FirstSend { session_id: u64, index: u64 },
    /// The slave has the batch `[first, last]` durably; `applied <= received <= last`.
    Batch {
        session_id: u64,
        first: u64,
        last: u64,
        received: u64,
        applied: u64,
    },
}

impl Ack {
    pub fn session_id(&self) -> u64 {
        match *self {
            Ack::FirstSend { session_id, .. } | Ack::Batch { session_id, .. } => session_id,
        }
    }
}

impl TryFrom<pb::BinlogAck> for Ack {
    type Error = WireError;

    fn try_from(a: pb::BinlogAck) -> Result<Self, WireError> {
        if a.first_send {
            return Ok(Ack::FirstSend {
                session_id: a.session_id,
                index: a.received_index,
            });
        }
        if a.batch_first_index > a.batch_last_index
            || a.received_index > a.batch_last_index
            || a.applied_index > a.received_index
        {
            return Err(WireError::Positions(format!(
                "ack positions received {} applied {} are beyond the acked batch end {} \
                 (batch starts at {})",
                a.received_index, a.applied_index, a.batch_last_index, a.batch_first_index
            )));
        }
        Ok(Ack::Batch {
            session_id: a.session_id,
            first: a.batch_first_index,
            last: a.batch_last_index,
            received: a.received_index,
            applied: a.applied_index,
        })
    }
}

/// A checked slave `Heartbeat`: `applied <= received`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlaveHeartbeat {
    pub session_id: u64,
    pub received: u64,
    pub applied: u64,
}

impl TryFrom<pb::Heartbeat> for SlaveHeartbeat {
    type Error = WireError;

    fn try_from(h: pb::Heartbeat) -> Result<Self, WireError> {
        if h.applied_index > h.index {
            return Err(WireError::Positions(format!(
                "heartbeat applied index {} is beyond its received index {}",
                h.applied_index, h.index
            )));
        }
        Ok(SlaveHeartbeat {
            session_id: h.session_id,
            received: h.index,
            applied: h.applied_index,
        })
    }
}

/// A checked message of a slave's `Sync` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlaveMsg {
    TrySync(TrySyncRequest),
    Ack(Ack),
    Heartbeat(SlaveHeartbeat),
}

impl TryFrom<pb::SlaveMessage> for SlaveMsg {
    type Error = WireError;

    fn try_from(m: pb::SlaveMessage) -> Result<Self, WireError> {
        use pb::slave_message::Msg;
        match m.msg {
            Some(Msg::TrySync(t)) => Ok(SlaveMsg::TrySync(t.try_into()?)),
            Some(Msg::Ack(a)) => Ok(SlaveMsg::Ack(a.try_into()?)),
            Some(Msg::Heartbeat(h)) => Ok(SlaveMsg::Heartbeat(h.try_into()?)),
            None => Err(WireError::Empty("SlaveMessage")),
        }
    }
}

/// A checked `DbSyncRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbSyncReq {
    pub slave_id: String,
    /// `None`: a new full sync; `Some`: resume this snapshot.
    pub snapshot_id: Option<String>,
    /// Files the slave already has a prefix of (only with a snapshot id).
    pub have: Vec<(String, u64)>,
}

impl TryFrom<pb::DbSyncRequest> for DbSyncReq {
    type Error = WireError;

    fn try_from(r: pb::DbSyncRequest) -> Result<Self, WireError> {
        check_len(
            "DbSyncRequest.slave_id",
            &r.slave_id,
            MAX_SLAVE_ID_BYTES,
            false,
        )?;
        check_len(
            "DbSyncRequest.snapshot_id",
            &r.snapshot_id,
            MAX_SNAPSHOT_ID_BYTES,
            true,
        )?;
        if r.have.len() > MAX_HAVE {
            return Err(WireError::TooMany {
                field: "DbSyncRequest.have",
                len: r.have.len(),
                max: MAX_HAVE,
            });
        }
        if r.snapshot_id.is_empty()
            && let Some(h) = r.have.first()
        {
            return Err(WireError::Invalid(format!(
                "have: {:?} without a snapshot_id; `have` resumes a given snapshot",
                h.name.chars().take(64).collect::<String>()
            )));
        }
        let mut have = Vec::with_capacity(r.have.len());
        for h in r.have {
            check_len(
                "DbSyncRequest.have.name",
                &h.name,
                MAX_FILE_NAME_BYTES,
                false,
            )?;
            have.push((h.name, h.offset));
        }
        Ok(DbSyncReq {
            slave_id: r.slave_id,
            snapshot_id: (!r.snapshot_id.is_empty()).then_some(r.snapshot_id),
            have,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_sync(slave_id: &str, repl_id: &str, index: u64, addr: &str) -> pb::TrySync {
        pb::TrySync {
            slave_id: slave_id.into(),
            repl_id: repl_id.into(),
            index,
            addr: addr.into(),
            seq: 1,
        }
    }

    #[test]
    fn try_sync_lengths_repl_ids_and_indexes() {
        let id = format!("{:032x}", 7u128);
        let ok = TrySyncRequest::try_from(try_sync("s", &id, 9, "h:1")).unwrap();
        assert_eq!(ok.index(), 9);
        assert_eq!(ok.position.unwrap().repl_id, ReplId(7));
        let new = TrySyncRequest::try_from(try_sync("s", "", 0, "")).unwrap();
        assert_eq!(new.position, None);
        let long = "x".repeat(MAX_SLAVE_ID_BYTES + 1);
        assert!(matches!(
            TrySyncRequest::try_from(try_sync(&long, &id, 0, "")),
            Err(WireError::BadLength { len, .. }) if len == MAX_SLAVE_ID_BYTES + 1
        ));
        assert!(matches!(
            TrySyncRequest::try_from(try_sync("", &id, 0, "")),
            Err(WireError::BadLength { len: 0, .. })
        ));
        let addr = "a".repeat(64 << 10);
        assert!(matches!(
            TrySyncRequest::try_from(try_sync("s", &id, 0, &addr)),
            Err(WireError::TooLong {
                field: "TrySync.addr",
                ..
            })
        ));
        assert!(matches!(
            TrySyncRequest::try_from(try_sync("s", "zz", 0, "")),
            Err(WireError::BadReplId(_))
        ));
        assert!(matches!(
            TrySyncRequest::try_from(try_sync("s", &id, u64::MAX, "")),
            Err(WireError::Positions(_))
        ));
    }

    #[test]
    fn acks_and_heartbeats_must_be_ordered() {
        let ack = |first, last, received, applied| pb::BinlogAck {
            session_id: 3,
            first_send: false,
            received_index: received,
            applied_index: applied,
            batch_first_index: first,
            batch_last_index: last,
        };
        assert_eq!(
            Ack::try_from(ack(5, 9, 9, 7)),
            Ok(Ack::Batch {
                session_id: 3,
                first: 5,
                last: 9,
                received: 9,
                applied: 7
            })
        );
        for bad in [ack(9, 5, 5, 5), ack(5, 9, 10, 7), ack(5, 9, 8, 9)] {
            assert!(matches!(Ack::try_from(bad), Err(WireError::Positions(_))));
        }
        let hb = |index, applied_index| pb::Heartbeat {
            session_id: 1,
            now_ms: 0,
            index,
            applied_index,
        };
        assert!(SlaveHeartbeat::try_from(hb(4, 4)).is_ok());
        assert!(SlaveHeartbeat::try_from(hb(4, 5)).is_err());
        assert_eq!(
            SlaveMsg::try_from(pb::SlaveMessage { msg: None }),
            Err(WireError::Empty("SlaveMessage"))
        );
    }

    #[test]
    fn db_sync_requests() {
        let req = |snapshot_id: &str, have: Vec<(&str, u64)>| pb::DbSyncRequest {
            slave_id: "s".into(),
            snapshot_id: snapshot_id.into(),
            have: have
                .into_iter()
                .map(|(n, o)| pb::FileOffset {
                    name: n.into(),
                    offset: o,
                })
                .collect(),
        };
        let r = DbSyncReq::try_from(req("snap", vec![("a.sst", 4)])).unwrap();
        assert_eq!(r.snapshot_id.as_deref(), Some("snap"));
        assert_eq!(r.have, vec![("a.sst".to_string(), 4)]);
        assert_eq!(
            DbSyncReq::try_from(req("", vec![])).unwrap().snapshot_id,
            None
        );
        assert!(matches!(
            DbSyncReq::try_from(req("", vec![("a", 1)])),
            Err(WireError::Invalid(_))
        ));
        assert!(matches!(
            DbSyncReq::try_from(req(&"s".repeat(MAX_SNAPSHOT_ID_BYTES + 1), vec![])),
            Err(WireError::TooLong { .. })
        ));
    }
}
