//! Applying binlog events to the state machine, in whole transactions.
//!
//! Used at start-up to replay the binlog after the state's applied index (the
//! state is only durable at RocksDB flushes; the binlog is the log), and by the
//! slave's applier. Events are grouped so that each group ends at a
//! transaction boundary, each applied together with its applied index (I2).

use crate::binlog::{Binlog, BinlogError};
use crate::boundary::{BoundaryError, BoundaryParser, Step};
use crate::record::{Event, EventKind};
use crate::state::{GroupBatch, State, StateError};

/// Bytes of binlog read per replay step.
const REPLAY_CHUNK_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("binlog: {0}")]
    Binlog(#[from] BinlogError),
    #[error("state: {0}")]
    State(#[from] StateError),
    #[error("binlog is not a sequence of transactions: {0}")]
    Boundary(#[from] BoundaryError),
    #[error(
        "state applied index {applied} is outside the binlog [{first}, {last}]: the binlog cannot bring it up to date"
    )]
    Gap { applied: u64, first: u64, last: u64 },
}

/// Adds the data effect of one event (Put/Delete) to a batch; Begin, Commit
/// and the consistency-check events add nothing. The event's key and value
/// move into the batch (no reference count is touched).
pub fn add_to_batch(batch: &mut GroupBatch, ev: Event) {
    match ev.kind {
        EventKind::Put { key, value } => batch.put(key, value),
        EventKind::Delete { key } => batch.delete(key),
        EventKind::Begin { .. }
        | EventKind::Commit { .. }
        | EventKind::VerifyPoint
        | EventKind::VerifyDigest { .. } => {}
    }
}

/// Replays every event after the state's applied index; returns how many.
pub fn replay(binlog: &Binlog, state: &State) -> Result<u64, ReplayError> {
    let applied = state.applied_index();
    let last = binlog.last_index();
    if applied >= last {
        return Ok(0);
    }
    if applied + 1 < binlog.first_index() {
        return Err(ReplayError::Gap {
            applied,
            first: binlog.first_index(),
            last,
        });
    }
    let mut reader = binlog.reader();
    reader.seek(applied + 1)?;
    let mut parser = BoundaryParser::new(applied, None);
    let mut pending = GroupBatch::default();
    let mut replayed = 0u64;
    loop {
        let events = reader.read_events(last, REPLAY_CHUNK_BYTES)?;
        if events.is_empty() {
            break;
        }
        let mut batch = std::mem::take(&mut pending);
        let mut boundary = None;
        for ev in events {
            if let Step::Boundary { index, seq } = parser.feed(&ev)? {
                boundary = Some((index, seq));
            }
            add_to_batch(&mut batch, ev);
            replayed += 1;
        }
        match boundary {
            Some((index, seq)) if parser.last_index() == index => {
                state.apply(batch, index, seq)?;
            }
            _ => {
                // The chunk ended inside a transaction: carry on reading; the
                // transaction's events stay in the batch until its Commit.
                pending = batch;
            }
        }
        if parser.last_index() >= last {
            break;
        }
    }
    Ok(replayed)
}
