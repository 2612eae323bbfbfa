//! The master's per-slave sync window (after Pika's `SyncWindow`).
//!
//! Every BinlogBatch sent is pushed at the tail; the slave acknowledges batches
//! one at a time, **in order**: an ack must name exactly the batch at the head.
//! The window bounds what is in flight, in batches and in bytes, so a slow slave
//! costs the master a fixed amount of memory and never slows its writes.

use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub first_index: u64,
    pub last_index: u64,
    pub bytes: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    #[error("ack for batch [{first}, {last}] but nothing is in flight")]
    Empty { first: u64, last: u64 },
    #[error(
        "ack for batch [{first}, {last}] does not match the window head [{head_first}, {head_last}]"
    )]
    NotHead {
        first: u64,
        last: u64,
        head_first: u64,
        head_last: u64,
    },
}

pub struct SyncWindow {
    in_flight: VecDeque<InFlight>,
    bytes: usize,
    max_batches: usize,
    max_bytes: usize,
}

impl SyncWindow {
    pub fn new(max_batches: usize, max_bytes: usize) -> SyncWindow {
        SyncWindow {
            in_flight: VecDeque::with_capacity(max_batches),
            bytes: 0,
            max_batches: max_batches.max(1),
            max_bytes: max_bytes.max(1),
        }
    }

    /// Whether another batch may be sent. An empty window always has room, so a
    /// single record larger than `max_bytes` still goes out alone.
    pub fn has_room(&self) -> bool {
        self.in_flight.is_empty()
            || (self.in_flight.len() < self.max_batches && self.bytes < self.max_bytes)
    }

    pub fn push(&mut self, b: InFlight) {
        self.bytes += b.bytes;
        self.in_flight.push_back(b);
    }

    /// Slides the window by one batch if `[first, last]` is its head.
    pub fn ack(&mut self, first: u64, last: u64) -> Result<InFlight, WindowError> {
        let Some(head) = self.in_flight.front().copied() else {
            return Err(WindowError::Empty { first, last });
        };
        if head.first_index != first || head.last_index != last {
            return Err(WindowError::NotHead {
                first,
                last,
                head_first: head.first_index,
                head_last: head.last_index,
            });
        }
        self.in_flight.pop_front();
        self.bytes -= head.bytes;
        Ok(head)
    }

    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Last index sent (0 when nothing is in flight).
    pub fn last_sent(&self) -> Option<u64> {
        self.in_flight.back().map(|b| b.last_index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(first: u64, last: u64, bytes: usize) -> InFlight {
        InFlight {
            first_index: first,
            last_index: last,
            bytes,
        }
    }

    #[test]
    fn bounded_by_batches_and_bytes() {
        let mut w = SyncWindow::new(2, 100);
        assert!(w.has_room());
        w.push(b(1, 4, 10));
        assert!(w.has_room());
        w.push(b(5, 9, 10));
        assert!(!w.has_room(), "two batches is the limit");
        assert_eq!(w.ack(1, 4), Ok(b(1, 4, 10)));
        assert!(w.has_room());
        w.push(b(10, 12, 95));
        assert!(!w.has_room(), "105 bytes is over the limit");
        assert_eq!(w.bytes(), 105);
        let mut big = SyncWindow::new(4, 10);
        assert!(big.has_room());
        big.push(b(1, 1, 1000));
        assert!(!big.has_room());
    }

    #[test]
    fn acks_must_match_the_head_in_order() {
        let mut w = SyncWindow::new(8, 1 << 20);
        assert_eq!(w.ack(1, 2), Err(WindowError::Empty { first: 1, last: 2 }));
        w.push(b(1, 4, 1));
        w.push(b(5, 9, 1));
        let err = WindowError::NotHead {
            first: 5,
            last: 9,
            head_first: 1,
            head_last: 4,
        };
        assert_eq!(w.ack(5, 9), Err(err));
        assert_eq!(w.len(), 2, "a bad ack changes nothing");
        assert_eq!(
            w.ack(1, 3).unwrap_err().to_string(),
            "ack for batch [1, 3] does not match the window head [1, 4]"
        );
        assert!(w.ack(1, 4).is_ok());
        assert!(w.ack(5, 9).is_ok());
        assert!(w.is_empty());
        assert_eq!(w.bytes(), 0);
        assert_eq!(w.last_sent(), None);
    }
}
