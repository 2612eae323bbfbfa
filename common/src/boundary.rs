//! The transaction boundary parser (F5).
//!
//! A transaction is `Begin{seq} · (Put | Delete)* · Commit{seq}` with
//! contiguous event indexes. The parser is an explicit state machine over
//! events:
//!
//! | state      | event            | result                                              |
//! |------------|------------------|-----------------------------------------------------|
//! | any        | index ≠ last + 1 | `NonContiguous` (checked first)                     |
//! | `Outside`  | `Begin{seq}`     | `InTxn` (seq must be `last_seq + 1` when known)     |
//! | `Outside`  | `Put`/`Delete`   | `DataOutsideTxn`                                    |
//! | `Outside`  | `Commit`         | `CommitOutsideTxn`                                  |
//! | `InTxn`    | `Begin`          | `BeginInTxn`                                        |
//! | `InTxn`    | `Put`/`Delete`   | `InTxn`                                             |
//! | `InTxn`    | `Commit{seq}`    | `Outside`, a **boundary** (seq must match `Begin`)  |
//! | `Error`    | anything         | `Poisoned`                                          |
//!
//! Errors are sticky: the first one moves the parser to
//! [`ParserState::Error`] (which keeps it), and every later `feed` returns
//! [`BoundaryError::Poisoned`]. A failed feed changes nothing else: the last
//! index, last seq and last boundary stay those of the last accepted event.
//!
//! Only a `Commit` makes a transaction count: the slave's "received" position
//! moves at boundaries only, and binlog recovery truncates to the last one.

use crate::record::{Event, EventKind};

/// Why an event cannot follow the events fed so far.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BoundaryError {
    #[error("Begin at index {index} inside an open transaction")]
    BeginInTxn { index: u64 },
    #[error("Commit at index {index} outside any transaction")]
    CommitOutsideTxn { index: u64 },
    #[error("Put/Delete at index {index} outside any transaction")]
    DataOutsideTxn { index: u64 },
    #[error("non-contiguous event index: expected {expected}, got {got}")]
    NonContiguous { expected: u64, got: u64 },
    /// A `Begin`'s seq must be exactly the last committed seq plus one.
    #[error("Begin at index {index} has seq {got}, expected exactly {} (last seq {last} + 1)", last.saturating_add(1))]
    SeqNotNext { index: u64, last: u64, got: u64 },
    #[error(
        "Commit at index {index} has seq {commit_seq} but its transaction began with seq {begin_seq}"
    )]
    CommitSeqMismatch {
        index: u64,
        begin_seq: u64,
        commit_seq: u64,
    },
    /// The parser failed before (see [`BoundaryParser::state`]) and accepts nothing more.
    #[error("boundary parser is poisoned by an earlier error")]
    Poisoned,
}

/// Where the parser is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParserState {
    /// Between transactions: the last accepted event is a boundary.
    Outside,
    /// Inside transaction `seq`, opened by the `Begin` at `begin_index`.
    InTxn { seq: u64, begin_index: u64 },
    /// Failed with this error; sticky.
    Error(BoundaryError),
}

/// What an accepted event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The event opened or continued a transaction.
    InTxn,
    /// The event was the `Commit` of transaction `seq`: `index` is a boundary.
    Boundary { index: u64, seq: u64 },
}

/// The transaction boundary state machine; see the module docs.
#[derive(Clone, Debug)]
pub struct BoundaryParser {
    state: ParserState,
    last_index: u64,
    last_seq: Option<u64>,
    last_boundary: u64,
}

impl BoundaryParser {
    /// A parser positioned after event `last_index`, which must be a
    /// boundary (0 for an empty history). `last_seq` is the seq of the
    /// transaction that ends there; `None` accepts any seq for the first
    /// `Begin`.
    pub fn new(last_index: u64, last_seq: Option<u64>) -> BoundaryParser {
        BoundaryParser {
            state: ParserState::Outside,
            last_index,
            last_seq,
            last_boundary: last_index,
        }
    }

    /// Feeds the next event.
    pub fn feed(&mut self, ev: &Event) -> Result<Step, BoundaryError> {
        if matches!(self.state, ParserState::Error(_)) {
            return Err(BoundaryError::Poisoned);
        }
        match self.transition(ev) {
            Ok((state, step)) => {
                self.state = state;
                self.last_index = ev.index;
                if let Step::Boundary { index, seq } = step {
                    self.last_boundary = index;
                    self.last_seq = Some(seq);
                }
                Ok(step)
            }
            Err(e) => {
                self.state = ParserState::Error(e.clone());
                Err(e)
            }
        }
    }

    /// Computes the next state without changing anything.
    fn transition(&self, ev: &Event) -> Result<(ParserState, Step), BoundaryError> {
        if self.last_index.checked_add(1) != Some(ev.index) {
            return Err(BoundaryError::NonContiguous {
                expected: self.last_index.saturating_add(1),
                got: ev.index,
            });
        }
        let index = ev.index;
        match (&self.state, &ev.kind) {
            (ParserState::Outside, EventKind::Begin { seq, .. }) => {
                if let Some(last) = self.last_seq
                    && last.checked_add(1) != Some(*seq)
                {
                    return Err(BoundaryError::SeqNotNext {
                        index,
                        last,
                        got: *seq,
                    });
                }
                Ok((
                    ParserState::InTxn {
                        seq: *seq,
                        begin_index: index,
                    },
                    Step::InTxn,
                ))
            }
            (
                ParserState::Outside,
                EventKind::Put { .. }
                | EventKind::Delete { .. }
                | EventKind::VerifyPoint
                | EventKind::VerifyDigest { .. },
            ) => Err(BoundaryError::DataOutsideTxn { index }),
            (ParserState::Outside, EventKind::Commit { .. }) => {
                Err(BoundaryError::CommitOutsideTxn { index })
            }
            (ParserState::InTxn { .. }, EventKind::Begin { .. }) => {
                Err(BoundaryError::BeginInTxn { index })
            }
            (
                ParserState::InTxn { .. },
                EventKind::Put { .. }
                | EventKind::Delete { .. }
                | EventKind::VerifyPoint
                | EventKind::VerifyDigest { .. },
            ) => Ok((self.state.clone(), Step::InTxn)),
            (ParserState::InTxn { seq: begin_seq, .. }, EventKind::Commit { seq }) => {
                if seq != begin_seq {
                    return Err(BoundaryError::CommitSeqMismatch {
                        index,
                        begin_seq: *begin_seq,
                        commit_seq: *seq,
                    });
                }
                Ok((ParserState::Outside, Step::Boundary { index, seq: *seq }))
            }
            (ParserState::Error(_), _) => Err(BoundaryError::Poisoned),
        }
    }

    pub fn state(&self) -> &ParserState {
        &self.state
    }

    /// Index of the last `Commit` accepted, or the initial `last_index`.
    pub fn last_boundary(&self) -> u64 {
        self.last_boundary
    }

    /// Seq of the last transaction committed (or the initial `last_seq`).
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Index of the last event accepted (or the initial `last_index`).
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// True when the last accepted event is a boundary.
    pub fn is_outside(&self) -> bool {
        matches!(self.state, ParserState::Outside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Event;

    /// Which state a test starts from. All start after index 10 with last seq 4.
    #[derive(Clone, Copy, Debug)]
    enum Start {
        Outside,
        /// Outside, with an unknown last seq.
        OutsideFresh,
        /// In transaction 5, opened at index 9.
        InTxn,
        Error,
    }

    fn parser(from: Start) -> BoundaryParser {
        match from {
            Start::Outside => BoundaryParser::new(10, Some(4)),
            Start::OutsideFresh => BoundaryParser::new(10, None),
            Start::InTxn => {
                let mut p = BoundaryParser::new(8, Some(4));
                p.feed(&Event::begin(9, 5, 0)).unwrap();
                p.feed(&Event::put(10, &b"k"[..], &b"v"[..])).unwrap();
                p
            }
            Start::Error => {
                let mut p = BoundaryParser::new(10, Some(4));
                let err = p.feed(&Event::commit(11, 4)).unwrap_err();
                assert_eq!(err, BoundaryError::CommitOutsideTxn { index: 11 });
                p
            }
        }
    }

    /// Event of each kind at `index`, with the seq a valid continuation would use.
    fn kinds(index: u64) -> [(&'static str, Event); 4] {
        [
            ("begin", Event::begin(index, 5, 0)),
            ("put", Event::put(index, &b"k"[..], &b"v"[..])),
            ("delete", Event::delete(index, &b"k"[..])),
            ("commit", Event::commit(index, 5)),
        ]
    }

    fn expected(from: Start, kind: &str, index: u64) -> (Result<Step, BoundaryError>, ParserState) {
        use BoundaryError as E;
        let txn = ParserState::InTxn {
            seq: 5,
            begin_index: 9,
        };
        if let Start::Error = from {
            return (
                Err(E::Poisoned),
                ParserState::Error(E::CommitOutsideTxn { index: 11 }),
            );
        }
        if index != 11 {
            let e = E::NonContiguous {
                expected: 11,
                got: index,
            };
            return (Err(e.clone()), ParserState::Error(e));
        }
        let fail = |e: BoundaryError| (Err(e.clone()), ParserState::Error(e));
        match (from, kind) {
            (Start::Outside | Start::OutsideFresh, "begin") => (
                Ok(Step::InTxn),
                ParserState::InTxn {
                    seq: 5,
                    begin_index: 11,
                },
            ),
            (Start::Outside | Start::OutsideFresh, "put" | "delete") => {
                fail(E::DataOutsideTxn { index: 11 })
            }
            (Start::Outside | Start::OutsideFresh, "commit") => {
                fail(E::CommitOutsideTxn { index: 11 })
            }
            (Start::InTxn, "begin") => fail(E::BeginInTxn { index: 11 }),
            (Start::InTxn, "put" | "delete") => (Ok(Step::InTxn), txn),
            (Start::InTxn, "commit") => (
                Ok(Step::Boundary { index: 11, seq: 5 }),
                ParserState::Outside,
            ),
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_state_kind_and_contiguity() {
        let froms = [
            Start::Outside,
            Start::OutsideFresh,
            Start::InTxn,
            Start::Error,
        ];
        // 11 is the next index; 10 repeats, 12 skips one, 1 goes back, 0 is never valid.
        for from in froms {
            for index in [11u64, 10, 12, 1, 0] {
                for (name, ev) in kinds(index) {
                    let mut p = parser(from);
                    let (last_index, last_seq, last_boundary) =
                        (p.last_index(), p.last_seq(), p.last_boundary());
                    let got = p.feed(&ev);
                    let (want, want_state) = expected(from, name, index);
                    assert_eq!(got, want, "{from:?} + {name}@{index}");
                    assert_eq!(p.state(), &want_state, "{from:?} + {name}@{index}");
                    match got {
                        Ok(step) => {
                            assert_eq!(p.last_index(), index);
                            match step {
                                Step::Boundary { index: b, seq } => {
                                    assert_eq!(p.last_boundary(), b);
                                    assert_eq!(p.last_seq(), Some(seq));
                                }
                                Step::InTxn => {
                                    assert_eq!(p.last_boundary(), last_boundary);
                                    assert_eq!(p.last_seq(), last_seq);
                                }
                            }
                        }
                        Err(_) => {
                            // A failed feed changes nothing but the state.
                            assert_eq!(p.last_index(), last_index);
                            assert_eq!(p.last_seq(), last_seq);
                            assert_eq!(p.last_boundary(), last_boundary);
                            // ... and the parser stays poisoned for any later event.
                            for (_, next) in kinds(p.last_index() + 1) {
                                assert_eq!(p.feed(&next), Err(BoundaryError::Poisoned));
                            }
                            assert_eq!(p.state(), &want_state);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn begin_seq_must_be_exactly_next() {
        for (got, ok) in [
            (5u64, true),
            (4, false),
            (6, false),
            (1, false),
            (u64::MAX, false),
        ] {
            let mut p = BoundaryParser::new(10, Some(4));
            let r = p.feed(&Event::begin(11, got, 0));
            if ok {
                assert_eq!(r, Ok(Step::InTxn));
            } else {
                assert_eq!(
                    r,
                    Err(BoundaryError::SeqNotNext {
                        index: 11,
                        last: 4,
                        got
                    })
                );
            }
        }
        // last seq unknown: any seq starts; the next must follow it.
        let mut p = BoundaryParser::new(0, None);
        assert_eq!(p.feed(&Event::begin(1, 77, 0)), Ok(Step::InTxn));
        assert_eq!(
            p.feed(&Event::commit(2, 77)),
            Ok(Step::Boundary { index: 2, seq: 77 })
        );
        assert_eq!(p.last_seq(), Some(77));
        assert_eq!(
            p.feed(&Event::begin(3, 79, 0)),
            Err(BoundaryError::SeqNotNext {
                index: 3,
                last: 77,
                got: 79
            })
        );
        // No seq follows u64::MAX.
        let mut p = BoundaryParser::new(0, Some(u64::MAX));
        assert!(matches!(
            p.feed(&Event::begin(1, 1, 0)),
            Err(BoundaryError::SeqNotNext { .. })
        ));
    }

    #[test]
    fn commit_seq_must_match_begin() {
        let mut p = parser(Start::InTxn);
        assert_eq!(
            p.feed(&Event::commit(11, 6)),
            Err(BoundaryError::CommitSeqMismatch {
                index: 11,
                begin_seq: 5,
                commit_seq: 6
            })
        );
    }

    #[test]
    fn index_overflow_is_non_contiguous() {
        let mut p = BoundaryParser::new(u64::MAX, None);
        assert_eq!(
            p.feed(&Event::begin(0, 1, 0)),
            Err(BoundaryError::NonContiguous {
                expected: u64::MAX,
                got: 0
            })
        );
    }

    #[test]
    fn a_full_history() {
        let mut p = BoundaryParser::new(0, None);
        let evs = [
            Event::begin(1, 1, 0),
            Event::put(2, &b"a"[..], &b"1"[..]),
            Event::delete(3, &b"b"[..]),
            Event::commit(4, 1),
            Event::begin(5, 2, 0),
            Event::commit(6, 2),
            Event::begin(7, 3, 0),
        ];
        let steps: Vec<_> = evs.iter().map(|e| p.feed(e).unwrap()).collect();
        assert_eq!(
            steps,
            [
                Step::InTxn,
                Step::InTxn,
                Step::InTxn,
                Step::Boundary { index: 4, seq: 1 },
                Step::InTxn,
                Step::Boundary { index: 6, seq: 2 },
                Step::InTxn,
            ]
        );
        assert_eq!(p.last_boundary(), 6);
        assert_eq!(p.last_index(), 7);
        assert_eq!(p.last_seq(), Some(2));
        assert!(!p.is_outside());
        assert_eq!(
            p.state(),
            &ParserState::InTxn {
                seq: 3,
                begin_index: 7
            }
        );
    }
}
