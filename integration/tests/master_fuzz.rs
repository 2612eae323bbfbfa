//! What a master sends, fuzzed against a real `tern-slave`: a fake master (an
//! in-test `tern.replication.v1.Replication` server) answers the slave's first
//! TrySync with a generated session: a TrySyncResponse (valid, or with an
//! arbitrary code/reason, a repl id that is not 32 hex digits, more than 64
//! histories, a history id that is not hex, or no TrySyncResponse at all), then
//! valid BinlogBatches of well-formed transactions (framed with
//! `tern_common::record`, cut anywhere, even inside a transaction) mixed with
//! heartbeats and batches of another session, then at most one broken batch
//! (indexes with a gap, first/last not matching the records, a flipped byte,
//! a truncated frame, a frame length past the limit, a Begin inside a
//! transaction, empty records, a second TrySyncResponse, an empty message),
//! then it closes, stalls or fails the stream. Every later TrySync gets a valid
//! answer and heartbeats only, so the slave settles connected.
//!
//! After each case, on a fresh slave: the process still runs and never
//! panicked; it reports the expected kind of problem in `link.last_error` and
//! reconnected (its second TrySync names exactly the last whole transaction
//! of the valid batches); its applied index, its data (Scan) and its relay log
//! (byte for byte) hold exactly those transactions; batches and heartbeats of
//! another session were counted as stale and nothing else.

mod support;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use support::{binlog_records, describe_slave, scan_all, slave_counters, slave_link, wait_until};
use tern_common::proto::replication::v1 as pb;
use tern_common::proto::replication::v1::replication_server::{Replication, ReplicationServer};
use tern_common::record::{Event, EventKind, HEADER_LEN, encode_record};
use tern_integration::{Node, TestDir};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// The repl id of every session after the first.
const REPL: &str = "0123456789abcdef0123456789abcdef";
/// The session id of every session after the first.
const SETTLED_SESSION: u64 = 4242;
const LINK_TIMEOUT_MS: &str = "1500";

type Out<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// The first message of the generated session.
#[derive(Clone, Debug)]
enum Resp {
    /// A valid OK answer: session id, repl id, ancestor histories.
    Ok {
        session: u64,
        repl: u128,
        histories: Vec<(u128, u64)>,
    },
    /// Any code but OK, any reason (the slave asks for a snapshot, which this
    /// master refuses).
    NotOk { code: i32, reason: i32 },
    /// OK with a repl id that is not 32 hex digits.
    BadReplId(String),
    /// OK with more histories than a slave keeps.
    TooManyHistories(usize),
    /// OK with a history whose repl id is not hex.
    BadHistory(usize),
    /// A heartbeat where the TrySyncResponse belongs.
    NotAResponse,
}

/// Something sent before a valid chunk that must change nothing.
#[derive(Clone, Debug)]
enum Noise {
    Nothing,
    /// A heartbeat; stale when its session id is not the session's.
    Heartbeat {
        session: u64,
        index: u64,
    },
    /// The next chunk, under another session id.
    StaleBatch,
}

/// The broken batch that ends the session (built from the next valid chunk).
#[derive(Clone, Debug)]
enum Bad {
    Gap,
    FirstBefore,
    FirstAfter,
    LastBefore,
    LastAfter,
    LastMax,
    EmptyAtZero,
    Flip { at: usize, mask: u8 },
    Truncate { keep: usize },
    HugeLength,
    BeginInTxn,
    SecondResponse,
    EmptyMessage,
}

#[derive(Clone, Copy, Debug)]
enum End {
    Close,
    Stall,
    Abort,
}

#[derive(Clone, Debug)]
struct Case {
    resp: Resp,
    /// Puts per transaction; the last transaction is never sent whole when a
    /// broken batch follows (it is the material for it).
    txns: Vec<usize>,
    /// Records per chunk, used cyclically.
    chunk_sizes: Vec<usize>,
    /// Valid chunks sent (modulo the number of chunks).
    sent: usize,
    noise: Vec<Noise>,
    bad: Option<Bad>,
    end: End,
}

fn hex_junk() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[0-9a-f]{31}",
        "[0-9a-f]{33}",
        "[0-9a-f]{31}[g-z]",
        "[g-z ]{32}",
        Just("é".repeat(16)),
    ]
}

fn resp() -> impl Strategy<Value = Resp> {
    prop_oneof![
        6 => (
            any::<u64>(),
            any::<u128>(),
            prop::collection::vec((any::<u128>(), any::<u64>()), 0..=64)
        )
            .prop_map(|(session, repl, histories)| Resp::Ok { session, repl, histories }),
        1 => (prop_oneof![Just(0), Just(2), Just(3), Just(-1), Just(i32::MAX)], -1..8i32)
            .prop_map(|(code, reason)| Resp::NotOk { code, reason }),
        1 => hex_junk().prop_map(Resp::BadReplId),
        1 => (65..=200usize).prop_map(Resp::TooManyHistories),
        1 => (0..64usize).prop_map(Resp::BadHistory),
        1 => Just(Resp::NotAResponse),
    ]
}

fn noise() -> impl Strategy<Value = Noise> {
    prop_oneof![
        3 => Just(Noise::Nothing),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(session, index)| Noise::Heartbeat { session, index }),
        1 => Just(Noise::StaleBatch),
    ]
}

fn bad() -> impl Strategy<Value = Bad> {
    prop_oneof![
        Just(Bad::Gap),
        Just(Bad::FirstBefore),
        Just(Bad::FirstAfter),
        Just(Bad::LastBefore),
        Just(Bad::LastAfter),
        Just(Bad::LastMax),
        Just(Bad::EmptyAtZero),
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Bad::Flip { at, mask }),
        any::<usize>().prop_map(|keep| Bad::Truncate { keep }),
        Just(Bad::HugeLength),
        Just(Bad::BeginInTxn),
        Just(Bad::SecondResponse),
        Just(Bad::EmptyMessage),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        resp(),
        prop::collection::vec(1..=3usize, 2..=5),
        prop::collection::vec(1..=5usize, 1..=4),
        any::<usize>(),
        prop::collection::vec(noise(), 8),
        prop::option::weighted(0.75, bad()),
        prop_oneof![
            3 => Just(End::Close),
            1 => Just(End::Stall),
            1 => Just(End::Abort)
        ],
    )
        .prop_map(|(resp, txns, chunk_sizes, sent, noise, bad, end)| Case {
            resp,
            txns,
            chunk_sizes,
            sent,
            noise,
            bad,
            end,
        })
}

/// The valid history the case draws from: its events, their framed bytes and
/// where each record ends in them.
struct Stream {
    events: Vec<Event>,
    bytes: Vec<u8>,
    ends: Vec<usize>,
    /// (first, last) event position of each chunk.
    chunks: Vec<(usize, usize)>,
}

impl Stream {
    fn new(c: &Case) -> Stream {
        let mut events = Vec::new();
        for (t, &puts) in c.txns.iter().enumerate() {
            let seq = t as u64 + 1;
            let idx = |events: &Vec<Event>| events.len() as u64 + 1;
            events.push(Event::begin(idx(&events), seq, 1_700_000_000_000 + seq));
            for j in 0..puts {
                let value = format!("value {seq}.{j}").repeat(j + 1);
                events.push(Event::put(
                    idx(&events),
                    format!("fz/{seq}/{j}"),
                    value.into_bytes(),
                ));
            }
            let last_commit = idx(&events);
            events.push(Event::commit(last_commit, seq));
        }
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for ev in &events {
            encode_record(ev, &mut bytes);
            ends.push(bytes.len());
        }
        let mut chunks = Vec::new();
        let mut at = 0;
        for size in c.chunk_sizes.iter().cycle() {
            if at == events.len() {
                break;
            }
            let last = (at + size).min(events.len()) - 1;
            chunks.push((at, last));
            at = last + 1;
        }
        Stream {
            events,
            bytes,
            ends,
            chunks,
        }
    }

    fn start(&self, pos: usize) -> usize {
        if pos == 0 { 0 } else { self.ends[pos - 1] }
    }

    fn batch(&self, session: u64, (first, last): (usize, usize)) -> pb::BinlogBatch {
        pb::BinlogBatch {
            session_id: session,
            first_index: first as u64 + 1,
            last_index: last as u64 + 1,
            records: self.bytes[self.start(first)..self.ends[last]]
                .to_vec()
                .into(),
        }
    }

    /// The index of the last Commit among the first `n` events (0 if none).
    fn last_commit(&self, n: usize) -> u64 {
        self.events[..n]
            .iter()
            .rev()
            .find(|e| matches!(e.kind, EventKind::Commit { .. }))
            .map_or(0, |e| e.index)
    }
}

fn msg(m: pb::master_message::Msg) -> Result<pb::MasterMessage, Status> {
    Ok(pb::MasterMessage { msg: Some(m) })
}

fn ok_response(session: u64, repl: String, histories: Vec<pb::History>) -> pb::master_message::Msg {
    pb::master_message::Msg::TrySyncResponse(pb::TrySyncResponse {
        code: pb::TrySyncCode::Ok as i32,
        session_id: session,
        repl_id: repl,
        histories,
        ..Default::default()
    })
}

/// What the case sends, and what the slave must end up with.
struct Plan {
    messages: Vec<Result<pb::MasterMessage, Status>>,
    end: End,
    /// The slave's received/applied index after the session.
    received: u64,
    /// Messages of another session the slave must count as stale.
    stale: u64,
    /// How `link.last_error` starts.
    error_kind: &'static str,
}

fn plan(c: &Case, s: &Stream) -> Plan {
    let mut messages = Vec::new();
    let history = |repl: String, end_index: u64| pb::History {
        repl_id: repl,
        end_index,
    };
    let session = match &c.resp {
        Resp::Ok {
            session,
            repl,
            histories,
        } => {
            let histories = histories
                .iter()
                .map(|(r, e)| history(format!("{r:032x}"), *e))
                .collect();
            messages.push(msg(ok_response(
                *session,
                format!("{repl:032x}"),
                histories,
            )));
            *session
        }
        Resp::NotOk { code, reason } => {
            messages.push(msg(pb::master_message::Msg::TrySyncResponse(
                pb::TrySyncResponse {
                    code: *code,
                    reason: *reason,
                    repl_id: REPL.into(),
                    message: "fake master: full sync".into(),
                    ..Default::default()
                },
            )));
            0
        }
        Resp::BadReplId(r) => {
            messages.push(msg(ok_response(1, r.clone(), vec![])));
            1
        }
        Resp::TooManyHistories(n) => {
            let h = (0..*n)
                .map(|i| history(format!("{i:032x}"), i as u64))
                .collect();
            messages.push(msg(ok_response(1, REPL.into(), h)));
            1
        }
        Resp::BadHistory(at) => {
            let mut h: Vec<_> = (0..64).map(|i| history(format!("{i:032x}"), 1)).collect();
            h[*at].repl_id = "x".repeat(32);
            h.truncate(*at + 1);
            messages.push(msg(ok_response(1, REPL.into(), h)));
            1
        }
        Resp::NotAResponse => {
            messages.push(msg(pb::master_message::Msg::Heartbeat(pb::Heartbeat {
                session_id: 1,
                ..Default::default()
            })));
            1
        }
    };
    let accepted = matches!(c.resp, Resp::Ok { .. });
    // With a broken batch to come, at least one chunk is left to break.
    let sent = match c.bad {
        Some(_) => c.sent % s.chunks.len(),
        None => c.sent % (s.chunks.len() + 1),
    };
    let mut stale = 0;
    for (i, &chunk) in s.chunks[..sent].iter().enumerate() {
        match c.noise.get(i).unwrap_or(&Noise::Nothing) {
            Noise::Nothing => {}
            Noise::Heartbeat { session: h, index } => {
                stale += u64::from(*h != session);
                messages.push(msg(pb::master_message::Msg::Heartbeat(pb::Heartbeat {
                    session_id: *h,
                    now_ms: 1,
                    index: *index,
                    applied_index: 0,
                })));
            }
            Noise::StaleBatch => {
                stale += 1;
                messages.push(msg(pb::master_message::Msg::Batch(
                    s.batch(session.wrapping_add(1), chunk),
                )));
            }
        }
        messages.push(msg(pb::master_message::Msg::Batch(s.batch(session, chunk))));
    }
    let done = if sent == 0 {
        0
    } else {
        s.chunks[sent - 1].1 + 1
    };
    if let Some(bad) = &c.bad {
        messages.push(broken(bad, s, session, s.chunks[sent], done));
    }
    let error_kind = match (&c.resp, &c.bad, c.end) {
        (Resp::NotOk { .. }, _, _) => "full sync:",
        (Resp::Ok { .. }, None, End::Close) => "the master closed the stream",
        (Resp::Ok { .. }, None, End::Stall) => "no message from the master",
        (Resp::Ok { .. }, None, End::Abort) => "link lost:",
        _ => "protocol error:",
    };
    Plan {
        messages,
        end: c.end,
        received: if accepted { s.last_commit(done) } else { 0 },
        stale: if accepted { stale } else { 0 },
        error_kind,
    }
}

/// The next chunk, broken by `bad`; `done` events went before it.
fn broken(
    bad: &Bad,
    s: &Stream,
    session: u64,
    chunk: (usize, usize),
    done: usize,
) -> Result<pb::MasterMessage, Status> {
    let mut b = s.batch(session, chunk);
    let mut records = b.records.to_vec();
    let reencode = |events: &[Event]| {
        let mut out = Vec::new();
        for e in events {
            encode_record(e, &mut out);
        }
        out
    };
    match bad {
        Bad::Gap => {
            let mut evs = s.events[chunk.0..=chunk.1].to_vec();
            let from = usize::from(evs.len() > 1);
            for e in &mut evs[from..] {
                e.index += 1;
            }
            records = reencode(&evs);
        }
        Bad::FirstBefore => b.first_index -= 1,
        Bad::FirstAfter => b.first_index += 1,
        Bad::LastBefore => b.last_index -= 1,
        Bad::LastAfter => b.last_index += 1,
        Bad::LastMax => b.last_index = u64::MAX,
        Bad::EmptyAtZero => {
            records.clear();
            b.first_index = 0;
            b.last_index = 0;
        }
        Bad::Flip { at, mask } => {
            let at = at % records.len();
            records[at] ^= mask;
        }
        Bad::Truncate { keep } => records.truncate(keep % records.len()),
        Bad::HugeLength => records[..4].copy_from_slice(&u32::MAX.to_le_bytes()),
        Bad::BeginInTxn => {
            // Outside a transaction the first Begin is valid and the second is
            // not; inside one, the first is already refused.
            let seq = s.events[..done]
                .iter()
                .filter(|e| matches!(e.kind, EventKind::Commit { .. }))
                .count() as u64
                + 1;
            let at = done as u64 + 1;
            records = reencode(&[Event::begin(at, seq, 1), Event::begin(at + 1, seq, 1)]);
            b.first_index = at;
            b.last_index = at + 1;
        }
        Bad::SecondResponse => return msg(ok_response(session, REPL.into(), vec![])),
        Bad::EmptyMessage => return Ok(pb::MasterMessage { msg: None }),
    }
    debug_assert!(
        records.len() >= HEADER_LEN || records.is_empty() || matches!(bad, Bad::Truncate { .. })
    );
    b.records = records.into();
    msg(pb::master_message::Msg::Batch(b))
}

struct FakeMaster {
    first: Mutex<Option<Plan>>,
    try_syncs: Arc<Mutex<Vec<pb::TrySync>>>,
}

#[tonic::async_trait]
impl Replication for FakeMaster {
    type SyncStream = Out<pb::MasterMessage>;
    type DbSyncStream = Out<pb::DbSyncChunk>;

    async fn sync(
        &self,
        req: Request<Streaming<pb::SlaveMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut inbound = req.into_inner();
        let first = self.first.lock().unwrap().take();
        let try_syncs = self.try_syncs.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let Ok(Some(pb::SlaveMessage {
                msg: Some(pb::slave_message::Msg::TrySync(t)),
            })) = inbound.message().await
            else {
                return;
            };
            try_syncs.lock().unwrap().push(t);
            // Acks and heartbeats are read and dropped.
            tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
            match first {
                Some(plan) => {
                    for m in plan.messages {
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    match plan.end {
                        End::Close => {}
                        End::Stall => tx.closed().await,
                        End::Abort => {
                            let _ = tx.send(Err(Status::aborted("fake master: aborted"))).await;
                        }
                    }
                }
                None => {
                    let ok = ok_response(SETTLED_SESSION, REPL.into(), vec![]);
                    if tx.send(msg(ok)).await.is_err() {
                        return;
                    }
                    loop {
                        let hb = pb::Heartbeat {
                            session_id: SETTLED_SESSION,
                            ..Default::default()
                        };
                        let hb = msg(pb::master_message::Msg::Heartbeat(hb));
                        if tx.send(hb).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn db_sync(
        &self,
        _req: Request<pb::DbSyncRequest>,
    ) -> Result<Response<Self::DbSyncStream>, Status> {
        Err(Status::unavailable("fake master: no snapshot to serve"))
    }
}

/// Runs one case on a fresh slave; returns the slave's `link.last_error`.
async fn run_case(n: usize, c: &Case) -> String {
    let s = Stream::new(c);
    let plan = plan(c, &s);
    let (received, stale, kind) = (plan.received, plan.stale, plan.error_kind);
    let try_syncs = Arc::new(Mutex::new(Vec::new()));
    let master = FakeMaster {
        first: Mutex::new(Some(plan)),
        try_syncs: try_syncs.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReplicationServer::new(master))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let dir = TestDir::new(&format!("master-fuzz-{n}"));
    let env = [
        ("TERN__SYNC__LINK_TIMEOUT_MS", LINK_TIMEOUT_MS),
        ("TERN__SYNC__HEARTBEAT_MS", "300"),
        ("TERN__BINLOG__FSYNC", "always"),
        ("TERN__SLAVE__RESYNC_WHEN_AHEAD", "true"),
    ];
    let mut slave = Node::start_slave(&dir.join("slave"), &url, &env, &[])
        .await
        .unwrap();
    let info = wait_until(
        &format!("case {n}: the slave to reconnect and settle"),
        Duration::from_secs(30),
        || async {
            let log = std::fs::read_to_string(&slave.log_path).unwrap_or_default();
            assert!(
                !log.contains("panicked"),
                "case {n}: {c:?}: the slave panicked:\n{log}"
            );
            let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
            let l = slave_link(&i);
            if try_syncs.lock().unwrap().len() >= 2
                && l.state == "connected"
                && l.session_id == SETTLED_SESSION
            {
                Ok(Some(i))
            } else {
                Err(describe_slave(&i))
            }
        },
    )
    .await;
    let what = format!("case {n}: {c:?}\n{}", describe_slave(&info));
    assert!(
        slave.try_wait().unwrap().is_none(),
        "{what}: the slave exited"
    );
    let log = std::fs::read_to_string(&slave.log_path).unwrap_or_default();
    assert!(
        !log.contains("panicked"),
        "{what}: the slave panicked:\n{}",
        slave.log_tail(40)
    );
    let link = slave_link(&info);
    assert!(
        link.last_error.starts_with(kind),
        "{what}: expected an error starting {kind:?}"
    );
    let second = try_syncs.lock().unwrap()[1].clone();
    assert_eq!(second.index, received, "{what}: the second TrySync");
    assert_eq!(link.received_index, received, "{what}");
    assert_eq!(info.applied_index, received, "{what}");
    assert_eq!(slave_counters(&info).stale_messages, stale, "{what}");
    // Its data: exactly the keys of the whole transactions received.
    let mut want = BTreeMap::new();
    for e in &s.events[..received as usize] {
        if let EventKind::Put { key, value } = &e.kind {
            want.insert(key.clone(), value.clone());
        }
    }
    let (items, _) = scan_all(&mut slave.kv()).await;
    let got: BTreeMap<_, _> = items.into_iter().collect();
    assert_eq!(got, want, "{what}: the slave's data");
    // Its relay log: exactly the bytes of those records.
    let (_, relay) = binlog_records(&slave.data_dir, 1, u64::MAX);
    let upto = if received == 0 {
        0
    } else {
        s.ends[received as usize - 1]
    };
    assert!(
        relay == s.bytes[..upto],
        "{what}: the relay log holds {} bytes, {upto} expected",
        relay.len()
    );
    slave.sigterm_and_wait().await.unwrap();
    server.abort();
    link.last_error
}

/// The kind of a `last_error`: its text up to the first ':' or digit.
fn error_kind(e: &str) -> String {
    let end = e
        .find(|ch: char| ch == ':' || ch.is_ascii_digit())
        .unwrap_or(e.len());
    e[..end].trim().to_string()
}

#[test]
fn slave_survives_what_a_master_sends() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let kinds = Mutex::new(BTreeMap::<String, u32>::new());
    let n = Mutex::new(0usize);
    let config = ProptestConfig {
        cases: 32,
        // Each case starts a process: report the first failing case as is.
        max_shrink_iters: 0,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(c in case())| {
        let i = {
            let mut n = n.lock().unwrap();
            *n += 1;
            *n
        };
        let err = rt.block_on(run_case(i, &c));
        println!("case {i}: resp={:?} txns={:?} bad={:?} end={:?} -> {err}", short(&c.resp), c.txns, c.bad, c.end);
        *kinds.lock().unwrap().entry(error_kind(&err)).or_default() += 1;
    });
    println!("last_error kinds seen: {:?}", kinds.lock().unwrap());
}

/// A TrySyncResponse variant without its (possibly long) history list.
fn short(r: &Resp) -> String {
    match r {
        Resp::Ok { histories, .. } => format!("Ok({} histories)", histories.len()),
        other => format!("{other:?}"),
    }
}
