//! Generated `Sync` message sequences against one real `tern-master`: the
//! handshake and the streaming session of `master/src/sync/{handshake,stream}.rs`
//! over a real gRPC stream, which the `sync_session` fuzz target only mirrors.
//!
//! Each case opens a `Sync` stream and plays a structure-aware sequence: a
//! TrySync (the real repl id at a boundary with its seq, a wrong seq, a
//! non-boundary index, an unknown or malformed repl id, no repl id, an index
//! ahead of the master or `u64::MAX`, or no TrySync at all), then first-send
//! acks (right, wrong index, another session's id), batch acks (the window
//! head, off by one, beyond anything sent, another session's id, positions
//! past the batch), heartbeats (up to what was read, beyond the master's log,
//! any index, applied past received, another session's id), empty messages,
//! duplicates and a second TrySync, interleaved with reading the batches the
//! master sends so acks can be real.
//!
//! For every case: the master's process stays up and answers Info; every
//! batch is byte-identical to the master's binlog, made of valid records and
//! contiguous from the TrySync index; the stream continues or ends exactly as
//! the master's contract says (the code of `tern_common::status::from_wire`
//! for a message the wire conversion refuses; INVALID_ARGUMENT for a first
//! message that is not a TrySync; a NeedFullSync answer and OK for a refused
//! position; FAILED_PRECONDITION for a second TrySync or first-send ack, a
//! batch ack before the first-send ack, or a first-send ack at another index;
//! OUT_OF_RANGE for a batch ack that is not the window head or a heartbeat
//! beyond what was sent; messages of another session ignored). Where the
//! outcome depends on batches in flight that were not read yet, either
//! continuing or that code is accepted. INTERNAL and UNKNOWN never.
//!
//! After all cases: no Sync session is open, no `slave:` pin is left, the
//! registry rows (kept after a session ends, see
//! `master/src/sync/registry.rs`) are all `disconnected` or, after a refused
//! TrySync of a slave not connected, `need_full_sync`, and a real slave
//! started then replicates to an equal Checksum without skipping duplicates.

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::{
    DEADLINE, ROGUE_RECV_TIMEOUT, Rogue, batch_ack, converge, describe_slave, first_ack,
    slave_counters, start_slave, try_sync, wait_until,
};
use tern_common::proto::kv::v1 as kv;
use tern_common::proto::replication::v1 as pb;
use tern_common::record::{EventKind, Records};
use tern_common::wire::{Ack, SlaveMsg};
use tern_integration::{Node, TestDir};
use tonic::Code;

/// Cases played against the one master.
const CASES: u32 = 64;
/// `sync.window_batches` of the master: small, so the window fills.
const WINDOW_BATCHES: usize = 4;
/// Slave ids the cases use (registry rows are keyed by them).
const SLAVE_IDS: [&str; 3] = ["fuzz-a", "fuzz-b", "fuzz-c"];

/// The master's binlog, read once (nothing is written while cases run).
struct Fixture {
    url: String,
    repl_id: String,
    last: u64,
    /// Commit indexes and their seqs.
    boundaries: Vec<(u64, u64)>,
    /// Indexes that are not a Commit.
    non_boundaries: Vec<u64>,
    /// The raw record of event `i` at `raw[i - 1]`.
    raw: Vec<Vec<u8>>,
}

#[derive(Clone, Debug)]
enum Start {
    Good { b: usize },
    WrongSeq { b: usize, delta: u64 },
    NonBoundary { n: usize },
    UnknownRepl { b: usize, id: u128 },
    MalformedRepl,
    NoRepl { b: usize },
    Ahead { k: u64 },
    MaxIndex,
    NotTrySync(NotTrySync),
}

#[derive(Clone, Debug)]
enum NotTrySync {
    FirstAck(u64),
    Heartbeat(u64),
    Empty,
}

#[derive(Clone, Debug)]
enum FirstAckKind {
    Right,
    WrongIndex(u64),
    OtherSession(u64),
}

#[derive(Clone, Debug)]
enum HbKind {
    UpToRead,
    Beyond(u64),
    Any(u64),
    AppliedOverReceived,
    OtherSession(u64),
}

#[derive(Clone, Debug)]
enum Step {
    Read(u8),
    FirstAck(FirstAckKind),
    AckHead,
    /// The head with one of its ends moved by one.
    AckOffByOne(u8),
    AckBeyond(u64),
    AckOtherSession(u64),
    /// The head, received past its last index.
    AckReceivedPastBatch,
    Heartbeat(HbKind),
    Empty,
    Duplicate,
    TrySyncAgain,
}

#[derive(Clone, Debug)]
struct Case {
    slave: usize,
    start: Start,
    /// Start with a right first-send ack and a read, so most cases stream.
    lead: bool,
    steps: Vec<Step>,
}

fn other_session() -> impl Strategy<Value = u64> {
    prop_oneof![1u64..4, 1u64..u64::MAX]
}

fn start_strategy() -> impl Strategy<Value = Start> {
    prop_oneof![
        14 => any::<usize>().prop_map(|b| Start::Good { b }),
        1 => (any::<usize>(), 1u64..u64::MAX).prop_map(|(b, delta)| Start::WrongSeq { b, delta }),
        1 => any::<usize>().prop_map(|n| Start::NonBoundary { n }),
        1 => (any::<usize>(), any::<u128>()).prop_map(|(b, id)| Start::UnknownRepl { b, id }),
        1 => Just(Start::MalformedRepl),
        1 => any::<usize>().prop_map(|b| Start::NoRepl { b }),
        1 => (1u64..1000).prop_map(|k| Start::Ahead { k }),
        1 => Just(Start::MaxIndex),
        1 => prop_oneof![
            any::<u64>().prop_map(NotTrySync::FirstAck),
            any::<u64>().prop_map(NotTrySync::Heartbeat),
            Just(NotTrySync::Empty),
        ]
        .prop_map(Start::NotTrySync),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        9 => (1u8..4).prop_map(Step::Read),
        2 => prop_oneof![
            3 => Just(FirstAckKind::Right),
            1 => (1u64..u64::MAX).prop_map(FirstAckKind::WrongIndex),
            1 => other_session().prop_map(FirstAckKind::OtherSession),
        ]
        .prop_map(Step::FirstAck),
        10 => Just(Step::AckHead),
        1 => (0u8..4).prop_map(Step::AckOffByOne),
        1 => (0u64..1000).prop_map(Step::AckBeyond),
        1 => other_session().prop_map(Step::AckOtherSession),
        1 => Just(Step::AckReceivedPastBatch),
        3 => prop_oneof![
            3 => Just(HbKind::UpToRead),
            1 => (0u64..1000).prop_map(HbKind::Beyond),
            1 => any::<u64>().prop_map(HbKind::Any),
            1 => Just(HbKind::AppliedOverReceived),
            1 => other_session().prop_map(HbKind::OtherSession),
        ]
        .prop_map(Step::Heartbeat),
        1 => Just(Step::Empty),
        1 => Just(Step::Duplicate),
        1 => Just(Step::TrySyncAgain),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        0..SLAVE_IDS.len(),
        start_strategy(),
        proptest::bool::weighted(0.8),
        proptest::collection::vec(step_strategy(), 0..14),
    )
        .prop_map(|(slave, start, lead, steps)| Case {
            slave,
            start,
            lead,
            steps,
        })
}

/// What the master must do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Continue,
    End(Code),
    /// Depends on batches in flight: continue, or end with this code.
    Either(Code),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    WaitFirstAck,
    Streaming,
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn heartbeat(session_id: u64, index: u64, applied_index: u64) -> pb::slave_message::Msg {
    pb::slave_message::Msg::Heartbeat(pb::Heartbeat {
        session_id,
        now_ms: 0,
        index,
        applied_index,
    })
}

fn msg(m: pb::slave_message::Msg) -> pb::SlaveMessage {
    pb::SlaveMessage { msg: Some(m) }
}

/// The code of `s`, or the failure of a case for INTERNAL / UNKNOWN.
fn typed(s: &tonic::Status) -> Result<Code, TestCaseError> {
    if matches!(s.code(), Code::Internal | Code::Unknown) {
        return Err(fail(format!("untyped status from the master: {s:?}")));
    }
    Ok(s.code())
}

/// One open session of a case.
struct Session<'a> {
    fx: &'a Fixture,
    tx: Option<tokio::sync::mpsc::Sender<pb::SlaveMessage>>,
    rx: tonic::Streaming<pb::MasterMessage>,
    phase: Phase,
    session_id: u64,
    /// The TrySync index.
    index: u64,
    /// Last index read from a batch (the TrySync index before any).
    last_read: u64,
    /// Batches read and not acked yet, oldest first.
    unacked: VecDeque<(u64, u64)>,
    last_sent: pb::SlaveMessage,
    batches: u64,
}

impl Session<'_> {
    async fn send(&mut self, m: pb::SlaveMessage) -> Result<(), TestCaseError> {
        self.last_sent = m.clone();
        let tx = self.tx.as_ref().expect("the request stream is open");
        tx.send(m)
            .await
            .map_err(|_| fail("the request stream closed before the master ended it".into()))
    }

    /// Checks one batch: this session's, contiguous, valid records equal to
    /// the master's binlog.
    fn check_batch(&mut self, b: &pb::BinlogBatch) -> Result<(), TestCaseError> {
        prop_assert_eq!(b.session_id, self.session_id, "batch of another session");
        prop_assert_eq!(
            b.first_index,
            self.last_read + 1,
            "batch not contiguous with what was read"
        );
        prop_assert!(
            b.first_index <= b.last_index && b.last_index <= self.fx.last,
            "batch [{}, {}] outside the master's log (last {})",
            b.first_index,
            b.last_index,
            self.fx.last
        );
        let mut records = Records::new(&b.records);
        let mut next = b.first_index;
        for r in records.by_ref() {
            let (ev, raw) = r.map_err(|e| fail(format!("invalid record in a batch: {e}")))?;
            prop_assert_eq!(ev.index, next, "records of a batch not contiguous");
            prop_assert!(
                raw == &self.fx.raw[(next - 1) as usize][..],
                "record {} differs from the master's binlog",
                next
            );
            next += 1;
        }
        prop_assert_eq!(
            records.offset(),
            b.records.len(),
            "trailing bytes in a batch"
        );
        prop_assert_eq!(
            next,
            b.last_index + 1,
            "batch records do not end at last_index"
        );
        self.last_read = b.last_index;
        self.unacked.push_back((b.first_index, b.last_index));
        self.batches += 1;
        Ok(())
    }

    /// The next message from the master, which must come (`what` names it).
    async fn recv(
        &mut self,
        what: &str,
    ) -> Result<Result<Option<pb::MasterMessage>, tonic::Status>, TestCaseError> {
        tokio::time::timeout(ROGUE_RECV_TIMEOUT, self.rx.message())
            .await
            .map_err(|_| fail(format!("no {what} from the master")))
    }

    /// Reads the TrySyncResponse, the first message of an accepted TrySync.
    async fn try_sync_response(&mut self) -> Result<pb::TrySyncResponse, TestCaseError> {
        match self.recv("TrySyncResponse").await? {
            Ok(Some(pb::MasterMessage {
                msg: Some(pb::master_message::Msg::TrySyncResponse(r)),
            })) => Ok(r),
            other => Err(fail(format!("expected a TrySyncResponse, got {other:?}"))),
        }
    }

    /// Reads the next batch (skipping heartbeats); one must come.
    async fn read_batch(&mut self) -> Result<(), TestCaseError> {
        loop {
            match self.recv("batch although the window has room").await? {
                Ok(Some(pb::MasterMessage {
                    msg: Some(pb::master_message::Msg::Heartbeat(_)),
                })) => continue,
                Ok(Some(pb::MasterMessage {
                    msg: Some(pb::master_message::Msg::Batch(b)),
                })) => return self.check_batch(&b),
                other => return Err(fail(format!("expected a batch, got {other:?}"))),
            }
        }
    }

    /// Whether the master must send another batch: it streams, has more,
    /// and its window has room (everything it sent and was not acked is
    /// either read or in flight).
    fn batch_due(&self) -> bool {
        self.phase == Phase::Streaming
            && self.last_read < self.fx.last
            && self.unacked.len() < WINDOW_BATCHES
    }

    /// Reads up to the end of the stream, checking batches; the final status.
    async fn read_to_end(&mut self) -> Result<Result<(), tonic::Status>, TestCaseError> {
        loop {
            let m = tokio::time::timeout(DEADLINE, self.rx.message())
                .await
                .map_err(|_| fail("the master did not end the stream".into()))?;
            match m {
                Err(s) => return Ok(Err(s)),
                Ok(None) => return Ok(Ok(())),
                Ok(Some(pb::MasterMessage {
                    msg: Some(pb::master_message::Msg::Heartbeat(_)),
                })) => {}
                Ok(Some(pb::MasterMessage {
                    msg: Some(pb::master_message::Msg::Batch(b)),
                })) => self.check_batch(&b)?,
                Ok(Some(other)) => {
                    return Err(fail(format!("unexpected message while ending: {other:?}")));
                }
            }
        }
    }

    /// The window head as far as this client knows, or a range just past
    /// what it read.
    fn head(&self) -> (u64, u64) {
        self.unacked
            .front()
            .copied()
            .unwrap_or((self.last_read + 1, self.last_read + 1))
    }

    fn message(&self, step: &Step, slave_id: &str) -> pb::SlaveMessage {
        let sid = self.session_id;
        let (f, l) = self.head();
        match step {
            Step::Read(_) => unreachable!("not a message"),
            Step::FirstAck(k) => msg(match *k {
                FirstAckKind::Right => first_ack(sid, self.index),
                FirstAckKind::WrongIndex(d) => first_ack(sid, self.index.wrapping_add(d)),
                FirstAckKind::OtherSession(d) => first_ack(sid.wrapping_add(d), self.index),
            }),
            Step::AckHead => msg(batch_ack(sid, f, l, l)),
            Step::AckOffByOne(k) => {
                let (f, l) = match k % 4 {
                    0 => (f.saturating_sub(1), l),
                    1 => (f + 1, l),
                    2 => (f, l.saturating_sub(1)),
                    _ => (f, l + 1),
                };
                msg(batch_ack(sid, f, l, l))
            }
            Step::AckBeyond(k) => {
                let i = self.fx.last + 1 + k;
                msg(batch_ack(sid, i, i, i))
            }
            Step::AckOtherSession(d) => msg(batch_ack(sid.wrapping_add(*d), f, l, l)),
            Step::AckReceivedPastBatch => msg(batch_ack(sid, f, l, l + 1)),
            Step::Heartbeat(k) => msg(match *k {
                HbKind::UpToRead => heartbeat(sid, self.last_read, self.last_read),
                HbKind::Beyond(k) => {
                    let i = self.fx.last + 1 + k;
                    heartbeat(sid, i, i)
                }
                HbKind::Any(i) => heartbeat(sid, i, i / 2),
                HbKind::AppliedOverReceived => heartbeat(sid, self.last_read, self.last_read + 1),
                HbKind::OtherSession(d) => heartbeat(sid.wrapping_add(d), u64::MAX, 0),
            }),
            Step::Empty => pb::SlaveMessage { msg: None },
            Step::Duplicate => self.last_sent.clone(),
            Step::TrySyncAgain => msg(try_sync(
                slave_id,
                &self.fx.repl_id,
                self.index,
                self.fx
                    .boundaries
                    .iter()
                    .find(|b| b.0 == self.index)
                    .map_or(0, |b| b.1),
            )),
        }
    }

    /// What the master must do with `m` now (see the module docs).
    fn expect(&self, m: &pb::SlaveMessage) -> Expect {
        let checked = match SlaveMsg::try_from(m.clone()) {
            Err(e) => return Expect::End(tern_common::status::from_wire(&e).code()),
            Ok(c) => c,
        };
        match checked {
            SlaveMsg::TrySync(_) => Expect::End(Code::FailedPrecondition),
            SlaveMsg::Ack(a) if a.session_id() != self.session_id => Expect::Continue,
            SlaveMsg::Heartbeat(h) if h.session_id != self.session_id => Expect::Continue,
            SlaveMsg::Heartbeat(_) if self.phase == Phase::WaitFirstAck => Expect::Continue,
            SlaveMsg::Ack(Ack::FirstSend { index, .. }) => {
                if self.phase == Phase::WaitFirstAck && index == self.index {
                    Expect::Continue
                } else {
                    Expect::End(Code::FailedPrecondition)
                }
            }
            SlaveMsg::Ack(Ack::Batch { .. }) if self.phase == Phase::WaitFirstAck => {
                Expect::End(Code::FailedPrecondition)
            }
            SlaveMsg::Ack(Ack::Batch { first, last, .. }) => match self.unacked.front() {
                Some(&h) if h == (first, last) => Expect::Continue,
                Some(_) => Expect::End(Code::OutOfRange),
                // The head is unread (or the window empty): only a range
                // that cannot be it is certain.
                None if last <= self.last_read || first > self.fx.last => {
                    Expect::End(Code::OutOfRange)
                }
                None => Expect::Either(Code::OutOfRange),
            },
            SlaveMsg::Heartbeat(h) => {
                if h.received <= self.last_read {
                    Expect::Continue
                } else if h.received > self.fx.last {
                    Expect::End(Code::OutOfRange)
                } else {
                    Expect::Either(Code::OutOfRange)
                }
            }
        }
    }

    /// Updates the model after a message the master takes.
    fn apply(&mut self, m: &pb::SlaveMessage) {
        match SlaveMsg::try_from(m.clone()) {
            Ok(SlaveMsg::Ack(Ack::FirstSend { session_id, .. }))
                if session_id == self.session_id =>
            {
                self.phase = Phase::Streaming;
            }
            Ok(SlaveMsg::Ack(Ack::Batch { session_id, .. })) if session_id == self.session_id => {
                self.unacked.pop_front();
            }
            _ => {}
        }
    }
}

/// The first message of a case and whether the master accepts the position
/// (`Ok(true)`), refuses it with NeedFullSync (`Ok(false)`), or ends the
/// stream with a code (`Err`).
fn first_message(
    fx: &Fixture,
    slave_id: &str,
    start: &Start,
) -> (pb::SlaveMessage, Result<bool, Code>) {
    let boundary = |b: usize| fx.boundaries[b % fx.boundaries.len()];
    let m = match start {
        Start::Good { b } => {
            let (i, seq) = boundary(*b);
            return (msg(try_sync(slave_id, &fx.repl_id, i, seq)), Ok(true));
        }
        Start::WrongSeq { b, delta } => {
            let (i, seq) = boundary(*b);
            msg(try_sync(slave_id, &fx.repl_id, i, seq.wrapping_add(*delta)))
        }
        Start::NonBoundary { n } => {
            let i = fx.non_boundaries[n % fx.non_boundaries.len()];
            let seq = fx.boundaries.iter().find(|b| b.0 > i).map_or(0, |b| b.1);
            msg(try_sync(slave_id, &fx.repl_id, i, seq))
        }
        Start::UnknownRepl { b, id } => {
            let (i, seq) = boundary(*b);
            let mut other = format!("{id:032x}");
            if other == fx.repl_id {
                other = format!("{:032x}", !id);
            }
            msg(try_sync(slave_id, &other, i, seq))
        }
        Start::MalformedRepl => msg(try_sync(slave_id, "not-a-repl-id", 1, 1)),
        Start::NoRepl { b } => {
            let (i, seq) = boundary(*b);
            msg(try_sync(slave_id, "", i, seq))
        }
        Start::Ahead { k } => msg(try_sync(slave_id, &fx.repl_id, fx.last + k, 0)),
        Start::MaxIndex => msg(try_sync(slave_id, &fx.repl_id, u64::MAX, 0)),
        Start::NotTrySync(NotTrySync::FirstAck(i)) => msg(first_ack(1, *i)),
        Start::NotTrySync(NotTrySync::Heartbeat(i)) => msg(heartbeat(1, *i, *i / 3)),
        Start::NotTrySync(NotTrySync::Empty) => pb::SlaveMessage { msg: None },
    };
    let outcome = match SlaveMsg::try_from(m.clone()) {
        Err(e) => Err(tern_common::status::from_wire(&e).code()),
        Ok(SlaveMsg::TrySync(_)) => Ok(false),
        Ok(_) => Err(Code::InvalidArgument),
    };
    (m, outcome)
}

/// Plays one case; returns how its stream ended (for the summary).
async fn play(fx: &Fixture, case: Case, master_pid: u32) -> Result<(String, u64), TestCaseError> {
    let slave_id = SLAVE_IDS[case.slave];
    let (first, outcome) = first_message(fx, slave_id, &case.start);
    let r = Rogue::open_raw(&fx.url, first.clone()).await;
    let mut s = Session {
        fx,
        tx: Some(r.tx),
        rx: r.rx,
        phase: Phase::WaitFirstAck,
        session_id: 0,
        index: 0,
        last_read: 0,
        unacked: VecDeque::new(),
        last_sent: first,
        batches: 0,
    };
    let label = match outcome {
        Err(code) => {
            let end = s.read_to_end().await?;
            let st = end
                .err()
                .ok_or_else(|| fail(format!("expected {code:?}, got OK")))?;
            prop_assert_eq!(typed(&st)?, code, "{:?}", st);
            format!("{code:?} (start)")
        }
        Ok(false) => {
            let r = s.try_sync_response().await?;
            prop_assert_eq!(r.code, pb::TrySyncCode::NeedFullSync as i32, "{:?}", r);
            prop_assert_eq!(r.session_id, 0);
            prop_assert_eq!(&r.repl_id, &fx.repl_id);
            let end = s.read_to_end().await?;
            if let Err(st) = end {
                return Err(fail(format!("a refused position ends with OK, got {st:?}")));
            }
            "OK (need full sync)".to_string()
        }
        Ok(true) => play_session(&mut s, slave_id, &case).await?,
    };
    prop_assert!(
        support::vm_rss(master_pid).is_some(),
        "the master's process is gone after {:?}",
        case
    );
    Ok((label, s.batches))
}

/// The part of a case after an accepted TrySync.
async fn play_session(
    s: &mut Session<'_>,
    slave_id: &str,
    case: &Case,
) -> Result<String, TestCaseError> {
    let r = s.try_sync_response().await?;
    prop_assert_eq!(r.code, pb::TrySyncCode::Ok as i32, "{:?}", r);
    prop_assert!(r.session_id != 0);
    prop_assert_eq!(r.last_index, s.fx.last);
    s.session_id = r.session_id;
    s.index = match SlaveMsg::try_from(s.last_sent.clone()) {
        Ok(SlaveMsg::TrySync(t)) => t.index(),
        other => unreachable!("an accepted start is a TrySync: {other:?}"),
    };
    s.last_read = s.index;
    let mut steps = Vec::new();
    if case.lead {
        steps.push(Step::FirstAck(FirstAckKind::Right));
        steps.push(Step::Read(2));
    }
    steps.extend(case.steps.iter().cloned());
    for step in &steps {
        if let Step::Read(n) = step {
            for _ in 0..*n {
                if !s.batch_due() {
                    break;
                }
                s.read_batch().await?;
            }
            continue;
        }
        if matches!(step, Step::AckHead) && s.unacked.is_empty() && s.batch_due() {
            s.read_batch().await?;
        }
        let m = s.message(step, slave_id);
        let expect = s.expect(&m);
        s.send(m.clone()).await?;
        match expect {
            Expect::Continue => s.apply(&m),
            Expect::End(code) => {
                let end = s.read_to_end().await?;
                let st = end.err().ok_or_else(|| {
                    fail(format!("{step:?}: expected {code:?}, the stream ended OK"))
                })?;
                prop_assert_eq!(typed(&st)?, code, "{:?}: {:?}", step, st);
                return Ok(format!("{code:?}"));
            }
            Expect::Either(code) => return close(s, Some(code)).await,
        }
    }
    close(s, None).await
}

/// Closes the request stream and checks the end: OK, or `allowed`.
async fn close(s: &mut Session<'_>, allowed: Option<Code>) -> Result<String, TestCaseError> {
    s.tx = None;
    match s.read_to_end().await? {
        Ok(()) => Ok("OK (client closed)".to_string()),
        Err(st) => {
            let code = typed(&st)?;
            prop_assert_eq!(Some(code), allowed, "after closing: {:?}", st);
            Ok(format!("{code:?} (in flight)"))
        }
    }
}

/// Reads the master's binlog (no write happens while cases run).
fn fixture(master: &Node, repl_id: String, last: u64) -> Fixture {
    let (_, bytes) = support::binlog_records(&master.data_dir, 1, last);
    let mut raw = Vec::new();
    let mut boundaries = Vec::new();
    let mut non_boundaries = Vec::new();
    for r in Records::new(&bytes) {
        let (ev, rec) = r.expect("the master's binlog is valid");
        assert_eq!(ev.index as usize, raw.len() + 1, "the binlog starts at 1");
        match ev.kind {
            EventKind::Commit { seq } => boundaries.push((ev.index, seq)),
            _ => non_boundaries.push(ev.index),
        }
        raw.push(rec.to_vec());
    }
    assert_eq!(raw.len() as u64, last);
    Fixture {
        url: master.url(),
        repl_id,
        last,
        boundaries,
        non_boundaries,
        raw,
    }
}

#[test]
fn generated_sync_sequences_against_a_real_master() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = TestDir::new("sync-fuzz");
    let window = WINDOW_BATCHES.to_string();
    let master = rt.block_on(async {
        Node::start_master(
            &dir.join("master"),
            &[
                ("TERN__SYNC__WINDOW_BATCHES", window.as_str()),
                ("TERN__SYNC__BATCH_BYTES", "4096"),
                // Cases never wait this long; a slow machine must not end them.
                ("TERN__SYNC__LINK_TIMEOUT_MS", "60000"),
            ],
            &[],
        )
        .await
        .unwrap()
    });
    let pid = master.pid().expect("master pid");
    let fx = rt.block_on(async {
        // Transactions of 1 to 4 Puts: boundaries at irregular distances.
        let mut kv = master.kv();
        let mut last = 0;
        for t in 0..80 {
            let ops = (0..t % 4 + 1)
                .map(|j| kv::Op {
                    op: Some(kv::op::Op::Put(kv::PutRequest {
                        key: Bytes::from(format!("t/{t}/{j}")),
                        value: Bytes::from(
                            (0..600).map(|_| rand::random::<u8>()).collect::<Vec<u8>>(),
                        ),
                        ..Default::default()
                    })),
                })
                .collect();
            last = kv
                .txn(kv::TxnRequest {
                    ops,
                    ..Default::default()
                })
                .await
                .expect("Txn")
                .into_inner()
                .index;
        }
        let info = master.info().await.expect("Info");
        assert_eq!(info.last_index, last);
        fixture(&master, info.repl_id, last)
    });
    eprintln!(
        "master at {}: {} boundaries, {} other events",
        fx.last,
        fx.boundaries.len(),
        fx.non_boundaries.len()
    );

    let ends: Mutex<BTreeMap<String, u32>> = Mutex::default();
    let batches = Mutex::new(0u64);
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    });
    let result = runner.run(&case_strategy(), |case| {
        let label = rt.block_on(async {
            let (label, n) = play(&fx, case, pid).await?;
            *batches.lock().unwrap() += n;
            master
                .info()
                .await
                .map_err(|e| fail(format!("Info after a case: {e:#}")))?;
            Ok::<_, TestCaseError>(label)
        })?;
        *ends.lock().unwrap().entry(label).or_default() += 1;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\nmaster log:\n{}", master.log_tail(40));
    }
    let ends = ends.into_inner().unwrap();
    let played: u32 = ends.values().sum();
    let batches = batches.into_inner().unwrap();
    eprintln!("{played} cases, {batches} batches checked; stream ends: {ends:?}");
    assert!(played >= CASES);

    rt.block_on(async {
        // Every session ended: no open stream, no pin, no row of a live
        // session (a gone slave's row stays, updated by a refused TrySync).
        wait_until("fuzz sessions to end", DEADLINE, || async {
            let i = master.info().await.map_err(|e| format!("{e:#}"))?;
            let live: Vec<_> = i
                .slaves
                .iter()
                .filter(|r| !matches!(r.state.as_str(), "disconnected" | "need_full_sync"))
                .map(|r| format!("{} {}", r.id, r.state))
                .collect();
            let pins: Vec<_> = i
                .pins
                .iter()
                .filter(|p| p.owner.starts_with("slave:"))
                .collect();
            if i.sync_sessions == 0 && live.is_empty() && pins.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!(
                    "{} sessions, live rows {live:?}, pins {pins:?}",
                    i.sync_sessions
                ))
            }
        })
        .await;
        let i = master.info().await.expect("Info");
        assert!(
            i.slaves.iter().all(|r| SLAVE_IDS.contains(&r.id.as_str())),
            "rows for ids no case used: {:?}",
            i.slaves
        );
        eprintln!(
            "master after the cases: {} registry rows (none live), stale_messages {}, \
             partial_syncs {}",
            i.slaves.len(),
            i.counters.unwrap_or_default().stale_messages,
            i.counters.unwrap_or_default().partial_syncs
        );

        let slave = start_slave(&dir, "slave", &master, &[]).await;
        converge(&master, &[&slave]).await;
        let mc = master.checksum().await.expect("Checksum on the master");
        let sc = slave.checksum().await.expect("Checksum on the slave");
        assert_eq!(sc, mc, "the slave's Checksum differs from the master's");
        let si = slave.info().await.expect("Info on the slave");
        assert_eq!(
            slave_counters(&si).duplicates_skipped,
            0,
            "{}",
            describe_slave(&si)
        );
    });
}
