//! The `tern.kv.v1.Kv` gRPC service, shared by master and slave.
//!
//! Reads (`Get`, `Scan`) are served from the local RocksDB; with `min_index` they
//! first wait, at most `wait_ms`, until the applied index reaches it, so a client
//! can read its own master write from a slave. A slave also has a [`ReadFloor`]:
//! the oldest state it may serve, because it served one that new before a crash
//! or a relay log repair; reads wait for it like they wait for `min_index` and
//! are refused with UNAVAILABLE if it is not reached in time, so reads on one
//! slave never go back in time. A read waiting this way gives its slot of the
//! Kv concurrency budget back while it waits ([`Slot::park`]): parked reads
//! never hold up writes or other reads, and their number is bounded on its
//! own. A `Scan` answer holds at most [`limits::MAX_SCAN_BYTES`] of keys and
//! values and says `more` when it stopped early. Writes are validated here (sizes, empty keys)
//! and handed to a [`Writer`]; a node without one (a slave) answers
//! FAILED_PRECONDITION "read-only replica".
//!
//! Semi-synchronous writes: a write's `min_replicas` and `replica_timeout_ms`
//! travel to the writer as [`WriteOptions`], with the request's deadline
//! (`grpc-timeout`, and the server's request timeout) so that the wait for
//! slaves always ends in time for the answer to arrive. A write committed on
//! the master that fewer slaves than asked acknowledged in time is answered
//! by [`replicas_short`]: DEADLINE_EXCEEDED naming the commit index, so the
//! client knows the write happened and must not be retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::limits::{self, LimitError};
use crate::proto::kv::v1 as pb;
use crate::server::budgets::Slot;
use crate::state::State;

/// Longest `wait_ms` honoured for a `min_index` read. A waiting read holds no
/// slot of the Kv budget (see [`Slot::park`]), so the length of the wait does
/// not decide how many requests the node can run; the server's request
/// timeout (`server.request_timeout_ms`) may still end a wait before this.
pub const MAX_WAIT_MS: u32 = 60_000;
/// How long a read below the [`ReadFloor`] waits when its request says `wait_ms = 0`.
pub const FLOOR_WAIT_MS: u32 = 1000;
/// `Scan` limit when the request says 0, and the most it may ask for.
pub const DEFAULT_SCAN_LIMIT: u32 = 1000;
pub const MAX_SCAN_LIMIT: u32 = 100_000;

/// One operation of a write; a request is a list of them run as one transaction.
#[derive(Clone, Debug)]
pub enum WriteOp {
    Put {
        key: Bytes,
        value: Bytes,
    },
    Delete {
        key: Bytes,
    },
    IncrBy {
        key: Bytes,
        delta: i64,
    },
    Append {
        key: Bytes,
        value: Bytes,
    },
    /// Put only if the key exists (`exists`) or does not (Redis SET XX / NX);
    /// otherwise nothing is written.
    PutIf {
        key: Bytes,
        value: Bytes,
        exists: bool,
    },
    /// Reads the key's value inside the transaction (what the ops before it
    /// left, or the committed value); writes nothing. Redis reads inside
    /// MULTI/EXEC.
    Get {
        key: Bytes,
    },
    /// The master's own online consistency check (never from a client): a
    /// check point (`None`), or the digest of an earlier one
    /// (`Some((point, sha256, keys))`). Logged as its own transaction.
    Verify(Option<(u64, Bytes, u64)>),
}

impl WriteOp {
    /// Whether the op reads the key's current value (everything but Put and
    /// Delete).
    pub fn reads(&self) -> bool {
        !matches!(self, WriteOp::Put { .. } | WriteOp::Delete { .. })
    }
}

/// What one operation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpOutcome {
    Put,
    Delete,
    IncrBy(i64),
    Append(u64),
    /// Whether a [`WriteOp::PutIf`] wrote.
    PutIf(bool),
    /// The value a [`WriteOp::Get`] read.
    Value(Option<Bytes>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Index of the transaction's Commit event.
    pub index: u64,
    pub results: Vec<OpOutcome>,
    /// How many slaves held the write when it was answered (the writer fills
    /// it in when the write waited for slaves).
    pub replicas: ReplicaAcks,
}

/// How a write waits for slaves (semi-synchronous replication): what its
/// request asked (0 = the node's default) and when its answer is due.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Slaves that must hold the write durably in their relay logs.
    pub min_replicas: u32,
    /// How long to wait for them, from when the node takes the write.
    pub replica_timeout_ms: u32,
    /// The answer is due by then (the request's deadline less a margin): the
    /// wait for slaves ends there at the latest. `None` for pipelined writes.
    pub deadline: Option<Instant>,
}

/// How many slaves held a write when it was answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaAcks {
    /// Slaves the write waited for (0: it did not wait).
    pub required: u32,
    /// Connected slaves holding it durably in their relay logs.
    pub acked: u32,
    /// Slaves connected when it was answered.
    pub connected: u32,
    /// The longest it could wait, from when the node took it.
    pub timeout_ms: u64,
}

impl ReplicaAcks {
    /// Fewer slaves than required acknowledged in time.
    pub fn short(&self) -> bool {
        self.acked < self.required
    }
}

/// Metadata of a [`replicas_short`] status: the write's commit index.
pub const COMMIT_INDEX_HEADER: &str = "tern-commit-index";
/// Metadata of a [`replicas_short`] status: slaves that acknowledged it.
pub const REPLICAS_ACKED_HEADER: &str = "tern-replicas-acked";

/// The answer to a write that is committed on the master but that fewer
/// slaves than it asked for acknowledged in time: DEADLINE_EXCEEDED (gRPC's
/// "the operation may have completed"; here it did), with a message and
/// metadata naming the commit index and the count. Retrying it would apply
/// it twice.
pub fn replicas_short(out: &WriteOutcome) -> Status {
    let r = &out.replicas;
    let mut status = Status::deadline_exceeded(format!(
        "committed on the master at index {}; {} of {} slaves acknowledged within {} ms \
         ({} connected); do not retry: retrying would apply the write twice",
        out.index, r.acked, r.required, r.timeout_ms, r.connected
    ));
    let meta = status.metadata_mut();
    meta.insert(COMMIT_INDEX_HEADER, out.index.into());
    meta.insert(REPLICAS_ACKED_HEADER, r.acked.into());
    status
}

/// Most of a request's time kept back for its answer to travel (at most a
/// tenth of it).
const ANSWER_MARGIN: Duration = Duration::from_millis(100);

/// How long a wait may last within a request of `budget`: the answer must
/// still reach the client before the request's deadline.
pub fn answer_within(budget: Duration) -> Duration {
    budget - ANSWER_MARGIN.min(budget / 10)
}

/// The `grpc-timeout` a client sent (its deadline), when it is well formed:
/// at most 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// One source of writes (a connection or a stream), for
/// [`Writer::submit`]'s `alone`.
pub type WriterId = u64;

/// A source that may be several clients (a unary call): never committed
/// at once, and another client to any lone writer.
pub const UNKNOWN_WRITER: WriterId = 0;

static NEXT_WRITER: AtomicU64 = AtomicU64::new(UNKNOWN_WRITER + 1);

/// A new [`WriterId`], for a connection or stream that starts.
pub fn new_writer_id() -> WriterId {
    NEXT_WRITER.fetch_add(1, Ordering::Relaxed)
}

/// The answer to a queued write: resolves once it committed (or failed).
pub type PendingWrite = crate::server::BoxFuture<Result<WriteOutcome, Status>>;

/// Where a node's writes go (the master's committer).
#[tonic::async_trait]
pub trait Writer: Send + Sync + 'static {
    /// Queues one write (a transaction) and returns its answer to await.
    /// Waits while the write path's queue is full. Writes one caller queued
    /// one after the other commit in that order. The answer comes after the
    /// commit and, when `opts` (or the node's default) asks for slaves, once
    /// they hold it or the wait ended: then [`WriteOutcome::replicas`] says
    /// how many did (the write is committed either way). Options the node
    /// cannot honour are refused before anything is written.
    ///
    /// `alone`: the caller, `from`, has nothing else to submit before it
    /// awaits this answer. While `from` is the only source of writes and the
    /// write path is idle, the node may commit it at once on the caller's
    /// thread.
    async fn submit(
        &self,
        ops: Vec<WriteOp>,
        opts: WriteOptions,
        alone: Option<WriterId>,
    ) -> Result<PendingWrite, Status>;

    /// `from` reads: another client than the lone writer is active, so
    /// writes submitted alone should queue for a while.
    fn note_read(&self, from: WriterId) {
        let _ = from;
    }
}

/// Writes of one `Pipeline` stream in flight at most (queued or committing,
/// answer not yet taken): past it the server stops reading the stream.
pub const MAX_PIPELINE_IN_FLIGHT: usize = 1024;
/// Keys and values of pipelined writes in flight on the whole node, over
/// every stream: a stream whose next write does not fit waits (it is not
/// read further), so hostile or merely busy pipelines cannot hold more.
pub const PIPELINE_BYTES_IN_FLIGHT: usize = 256 << 20;
/// Unit of [`PIPELINE_BYTES_IN_FLIGHT`]'s semaphore.
const PIPELINE_PERMIT_BYTES: usize = 1024;

/// The oldest state a replica may serve: reads wait until the applied index
/// reaches `index` and are refused (UNAVAILABLE, counted in `refused`) when it
/// does not in time. A replica sets it to the highest state it may have served
/// before its log lost events (see tern-slave's `floor` module).
#[derive(Clone, Debug, Default)]
pub struct ReadFloor {
    pub index: u64,
    pub refused: Arc<AtomicU64>,
    /// Set when a consistency check found this replica's data different from
    /// its master's (`slave.stop_reads_on_mismatch`): no read is served
    /// until it is resynced.
    pub stopped: Arc<std::sync::Mutex<Option<String>>>,
}

impl ReadFloor {
    /// Why reads are refused at `applied`; `None` when they are served.
    pub fn blocked(&self, applied: u64) -> Option<String> {
        if let Some(why) = self.stopped_reason() {
            return Some(why);
        }
        (applied < self.index).then(|| {
            format!(
                "replica is catching up to the state it already served: applied {applied} < {}",
                self.index
            )
        })
    }

    /// Why reads are stopped after a failed consistency check.
    pub fn stopped_reason(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[derive(Clone)]
pub struct KvService {
    state: State,
    applied: watch::Receiver<u64>,
    writer: Option<Arc<dyn Writer>>,
    floor: Option<ReadFloor>,
    /// Ends `Pipeline` streams (after answering what they queued).
    shutdown: CancellationToken,
    /// [`PIPELINE_BYTES_IN_FLIGHT`], in [`PIPELINE_PERMIT_BYTES`] units.
    pipeline_bytes: Arc<Semaphore>,
    /// The server's deadline for a unary request (`server.request_timeout_ms`).
    request_timeout: Option<Duration>,
}

impl KvService {
    /// `applied` must follow the state's applied index.
    pub fn new(
        state: State,
        applied: watch::Receiver<u64>,
        writer: Option<Arc<dyn Writer>>,
    ) -> KvService {
        KvService {
            state,
            applied,
            writer,
            floor: None,
            shutdown: CancellationToken::new(),
            pipeline_bytes: Arc::new(Semaphore::new(
                PIPELINE_BYTES_IN_FLIGHT / PIPELINE_PERMIT_BYTES,
            )),
            request_timeout: None,
        }
    }

    /// Unary writes that wait for slaves are answered before `timeout`
    /// (`server.request_timeout_ms`) ends the request.
    pub fn with_request_timeout(mut self, timeout: Duration) -> KvService {
        self.request_timeout = Some(timeout);
        self
    }

    /// `Pipeline` streams stop reading when `shutdown` is cancelled, answer
    /// the writes they queued, and end with UNAVAILABLE.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> KvService {
        self.shutdown = shutdown;
        self
    }

    /// Serves reads only at or above `floor` (a replica).
    pub fn with_read_floor(mut self, floor: ReadFloor) -> KvService {
        self.floor = Some(floor);
        self
    }

    pub fn into_server(self) -> pb::kv_server::KvServer<KvService> {
        pb::kv_server::KvServer::new(self)
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(limits::MAX_MESSAGE_BYTES)
    }

    /// The node's state (reads of the RESP front).
    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    /// Waits until reads may be served (a replica below its read floor
    /// waits [`FLOOR_WAIT_MS`], then UNAVAILABLE).
    pub(crate) async fn reads_ready(&self) -> Result<(), Status> {
        self.wait_applied(0, 0, None).await
    }

    /// A read by `from` (see [`Writer::note_read`]).
    pub(crate) fn note_read(&self, from: WriterId) {
        if let Some(w) = &self.writer {
            w.note_read(from);
        }
    }

    pub(crate) fn writer(&self) -> Result<&Arc<dyn Writer>, Status> {
        self.writer.as_ref().ok_or_else(|| {
            Status::failed_precondition("read-only replica: send writes to the master")
        })
    }

    /// Runs a unary write; a write that fewer slaves than it asked for
    /// acknowledged in time is answered with [`replicas_short`].
    ///
    /// A unary call is the only request of its call, but not of its
    /// connection: one HTTP/2 connection (a shared client channel, a proxy)
    /// carries many clients' calls at once, and the ones still unread look
    /// like none. So its writer is unknown: it never commits inline, and it
    /// tells a lone writer that another client is active.
    async fn write(&self, ops: Vec<WriteOp>, opts: WriteOptions) -> Result<WriteOutcome, Status> {
        let out = self
            .writer()?
            .submit(ops, opts, Some(UNKNOWN_WRITER))
            .await?
            .await?;
        if out.replicas.short() {
            return Err(replicas_short(&out));
        }
        Ok(out)
    }

    /// The options of a unary write, due before the request's deadline: the
    /// client's (`grpc-timeout`) or the server's, whichever comes first.
    fn options(
        &self,
        meta: &tonic::metadata::MetadataMap,
        min_replicas: u32,
        replica_timeout_ms: u32,
    ) -> WriteOptions {
        let budget = match (grpc_timeout(meta), self.request_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        WriteOptions {
            min_replicas,
            replica_timeout_ms,
            deadline: budget.and_then(|b| Instant::now().checked_add(answer_within(b))),
        }
    }

    /// Waits, at most `wait_ms`, until the applied index reaches both
    /// `min_index` and the read floor. A read still below the floor is refused
    /// with UNAVAILABLE (it waits [`FLOOR_WAIT_MS`] when `wait_ms` is 0); one
    /// below `min_index` only is OUT_OF_RANGE. Under a budget (`slot`) the
    /// wait is parked: RESOURCE_EXHAUSTED when too many reads are parked.
    async fn wait_applied(
        &self,
        min_index: u64,
        wait_ms: u32,
        slot: Option<Arc<Slot>>,
    ) -> Result<(), Status> {
        if let Some(f) = &self.floor
            && let Some(why) = f.stopped_reason()
        {
            f.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unavailable(why));
        }
        let floor = self.floor.as_ref().map_or(0, |f| f.index);
        let target = min_index.max(floor);
        let applied = *self.applied.borrow();
        if applied >= target {
            return Ok(());
        }
        let wait_ms = if applied < floor && wait_ms == 0 {
            FLOOR_WAIT_MS
        } else {
            wait_ms
        };
        let wait = Duration::from_millis(wait_ms.min(MAX_WAIT_MS) as u64);
        let mut rx = self.applied.clone();
        let waited = async {
            tokio::time::timeout(wait, rx.wait_for(|a| *a >= target))
                .await
                .map(|r| r.map(drop))
        };
        let waited = match slot {
            Some(slot) if !wait.is_zero() => slot.park(waited).await?,
            _ => waited.await,
        };
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Status::unavailable("node is shutting down")),
            Err(_) => {
                let applied = *self.applied.borrow();
                if let Some(f) = &self.floor
                    && let Some(why) = f.blocked(applied)
                {
                    f.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(Status::unavailable(why));
                }
                Err(Status::out_of_range(format!(
                    "applied index {applied} has not reached min_index {min_index} within {}ms",
                    wait.as_millis()
                )))
            }
        }
    }
}

fn invalid(e: LimitError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn internal<E: std::fmt::Display>(e: E) -> Status {
    Status::internal(e.to_string())
}

/// Validates one wire op into a [`WriteOp`]; returns its key and value bytes.
fn op_from_wire(op: pb::op::Op) -> Result<(WriteOp, usize), LimitError> {
    let (op, bytes) = match op {
        pb::op::Op::Put(p) => {
            limits::check_key(&p.key)?;
            limits::check_value(&p.value)?;
            let n = p.key.len() + p.value.len();
            (
                WriteOp::Put {
                    key: p.key,
                    value: p.value,
                },
                n,
            )
        }
        pb::op::Op::Delete(d) => {
            limits::check_key(&d.key)?;
            let n = d.key.len();
            (WriteOp::Delete { key: d.key }, n)
        }
        pb::op::Op::IncrBy(i) => {
            limits::check_key(&i.key)?;
            let n = i.key.len() + 8;
            (
                WriteOp::IncrBy {
                    key: i.key,
                    delta: i.delta,
                },
                n,
            )
        }
        pb::op::Op::Append(a) => {
            limits::check_key(&a.key)?;
            limits::check_value(&a.value)?;
            let n = a.key.len() + a.value.len();
            (
                WriteOp::Append {
                    key: a.key,
                    value: a.value,
                },
                n,
            )
        }
    };
    Ok((op, bytes))
}

/// Whether an op of a transaction carries the request-level semi-sync fields.
fn op_waits(op: &pb::op::Op) -> bool {
    let (n, t) = match op {
        pb::op::Op::Put(p) => (p.min_replicas, p.replica_timeout_ms),
        pb::op::Op::Delete(d) => (d.min_replicas, d.replica_timeout_ms),
        pb::op::Op::IncrBy(i) => (i.min_replicas, i.replica_timeout_ms),
        pb::op::Op::Append(a) => (a.min_replicas, a.replica_timeout_ms),
    };
    n != 0 || t != 0
}

/// Validates the ops of one transaction (a `Txn`, or a `Pipeline` write);
/// returns them and their key and value bytes.
fn txn_from_wire(wire: Vec<pb::Op>) -> Result<(Vec<WriteOp>, usize), Status> {
    if wire.is_empty() {
        return Err(invalid(LimitError::EmptyTxn));
    }
    if wire.len() > limits::MAX_TXN_OPS {
        return Err(invalid(LimitError::TooManyOps { ops: wire.len() }));
    }
    let mut ops = Vec::with_capacity(wire.len());
    let mut total = 0usize;
    for (i, op) in wire.into_iter().enumerate() {
        let Some(op) = op.op else {
            return Err(Status::invalid_argument(format!("op {i} is empty")));
        };
        if op_waits(&op) {
            return Err(Status::invalid_argument(format!(
                "op {i}: min_replicas and replica_timeout_ms are set on the op; set them on the \
                 request (they apply to the whole transaction)"
            )));
        }
        let (op, n) =
            op_from_wire(op).map_err(|e| Status::invalid_argument(format!("op {i}: {e}")))?;
        total += n;
        if total > limits::MAX_TXN_BYTES {
            return Err(invalid(LimitError::TxnTooLarge { bytes: total }));
        }
        ops.push(op);
    }
    Ok((ops, total))
}

/// The result of each op of a committed transaction, as sent.
fn results_to_wire(out: &WriteOutcome) -> Vec<pb::OpResult> {
    out.results
        .iter()
        .map(|r| pb::OpResult {
            result: Some(match r {
                OpOutcome::Put => pb::op_result::Result::Put(pb::PutResult {}),
                OpOutcome::Delete => pb::op_result::Result::Delete(pb::DeleteResult {}),
                OpOutcome::IncrBy(v) => pb::op_result::Result::IncrBy(pb::IncrByResponse {
                    value: *v,
                    index: out.index,
                    replicas_acked: 0,
                }),
                OpOutcome::Append(l) => pb::op_result::Result::Append(pb::AppendResponse {
                    length: *l,
                    index: out.index,
                    replicas_acked: 0,
                }),
                // Not in the gRPC Txn (only the RESP front sends these ops).
                OpOutcome::PutIf(_) | OpOutcome::Value(_) => {
                    pb::op_result::Result::Put(pb::PutResult {})
                }
            }),
        })
        .collect()
}

/// One entry of a pipeline's answer queue, in request order.
enum Queued {
    /// Queued on the write path; the permit holds its bytes' share of
    /// [`PIPELINE_BYTES_IN_FLIGHT`] until its answer is taken.
    Write(u64, PendingWrite, OwnedSemaphorePermit),
    /// A write refused before it was queued (invalid ops).
    Refused(u64, Status),
    /// The stream ends here with this status.
    End(Status),
}

/// Serves one `Pipeline` stream: a task reads requests and queues each write
/// on the write path as soon as it arrives (so many are in flight), and the
/// answer stream awaits them in request order. Bounded: at most
/// [`MAX_PIPELINE_IN_FLIGHT`] answers wait, and the node's pipelined writes
/// in flight hold at most [`PIPELINE_BYTES_IN_FLIGHT`]; past either the
/// reader waits, and HTTP/2 flow control stops the client.
fn pipeline(
    writer: Arc<dyn Writer>,
    mut inbound: Streaming<pb::PipelineRequest>,
    bytes: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> crate::server::BoxStream<pb::PipelineResponse> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Queued>(MAX_PIPELINE_IN_FLIGHT);
    let from = new_writer_id();
    tokio::spawn(async move {
        // The request after the current one, when it had already arrived.
        let mut ahead = None;
        loop {
            let next = match ahead.take() {
                Some(next) => next,
                None => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Queued::End(Status::unavailable(
                            "the node is shutting down: writes sent after the last answer were \
                             not run",
                        ))).await;
                        return;
                    }
                    next = inbound.message() => next,
                },
            };
            let queued = match next {
                Ok(Some(req)) => match txn_from_wire(req.ops) {
                    Ok((ops, size)) => {
                        // A txn is at most MAX_TXN_BYTES: far below the total.
                        let units = size.div_ceil(PIPELINE_PERMIT_BYTES).max(1) as u32;
                        let Ok(permit) = bytes.clone().acquire_many_owned(units).await else {
                            return;
                        };
                        let opts = WriteOptions {
                            min_replicas: req.min_replicas,
                            replica_timeout_ms: req.replica_timeout_ms,
                            deadline: None,
                        };
                        // Nothing more arrived yet (the client waits for
                        // this answer, or has sent all it had): the write
                        // is submitted alone. (`message` is cancel-safe:
                        // polling it once loses nothing.)
                        ahead = inbound.message().now_or_never();
                        let alone = ahead.is_none().then_some(from);
                        match writer.submit(ops, opts, alone).await {
                            Ok(pending) => Queued::Write(req.id, pending, permit),
                            Err(status) => Queued::Refused(req.id, status),
                        }
                    }
                    Err(status) => Queued::Refused(req.id, status),
                },
                // The client closed its side: answer what is queued, then end.
                Ok(None) => return,
                Err(status) => Queued::End(status),
            };
            let end = matches!(queued, Queued::End(_));
            if tx.send(queued).await.is_err() || end {
                return;
            }
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        let item = match rx.recv().await? {
            Queued::Write(id, pending, _permit) => Ok(match pending.await {
                Ok(out) => {
                    // Committed, but not on enough slaves in time: code 4
                    // with the index and results (it must not be sent again).
                    let (code, message) = if out.replicas.short() {
                        let s = replicas_short(&out);
                        (s.code() as i32, s.message().to_string())
                    } else {
                        (0, String::new())
                    };
                    pb::PipelineResponse {
                        id,
                        index: out.index,
                        results: results_to_wire(&out),
                        code,
                        message,
                        replicas_acked: out.replicas.acked,
                    }
                }
                Err(status) => refused(id, status),
            }),
            Queued::Refused(id, status) => Ok(refused(id, status)),
            Queued::End(status) => {
                rx.close();
                Err(status)
            }
        };
        Some((item, rx))
    }))
}

fn refused(id: u64, status: Status) -> pb::PipelineResponse {
    pb::PipelineResponse {
        id,
        index: 0,
        results: Vec::new(),
        code: status.code() as i32,
        message: status.message().to_string(),
        replicas_acked: 0,
    }
}

fn single(op: pb::op::Op) -> Result<Vec<WriteOp>, Status> {
    op_from_wire(op).map(|(op, _)| vec![op]).map_err(invalid)
}

fn only_result(outcome: &WriteOutcome) -> Result<&OpOutcome, Status> {
    outcome
        .results
        .first()
        .ok_or_else(|| Status::internal("write produced no result"))
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn put(
        &self,
        req: Request<pb::PutRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = req.get_ref();
        let opts = self.options(req.metadata(), r.min_replicas, r.replica_timeout_ms);
        let ops = single(pb::op::Op::Put(req.into_inner()))?;
        let out = self.write(ops, opts).await?;
        Ok(Response::new(pb::WriteResponse {
            index: out.index,
            replicas_acked: out.replicas.acked,
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = req.get_ref();
        let opts = self.options(req.metadata(), r.min_replicas, r.replica_timeout_ms);
        let ops = single(pb::op::Op::Delete(req.into_inner()))?;
        let out = self.write(ops, opts).await?;
        Ok(Response::new(pb::WriteResponse {
            index: out.index,
            replicas_acked: out.replicas.acked,
        }))
    }

    async fn incr_by(
        &self,
        req: Request<pb::IncrByRequest>,
    ) -> Result<Response<pb::IncrByResponse>, Status> {
        let r = req.get_ref();
        let opts = self.options(req.metadata(), r.min_replicas, r.replica_timeout_ms);
        let ops = single(pb::op::Op::IncrBy(req.into_inner()))?;
        let out = self.write(ops, opts).await?;
        match only_result(&out)? {
            OpOutcome::IncrBy(value) => Ok(Response::new(pb::IncrByResponse {
                value: *value,
                index: out.index,
                replicas_acked: out.replicas.acked,
            })),
            other => Err(Status::internal(format!("incr_by produced {other:?}"))),
        }
    }

    async fn append(
        &self,
        req: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let r = req.get_ref();
        let opts = self.options(req.metadata(), r.min_replicas, r.replica_timeout_ms);
        let ops = single(pb::op::Op::Append(req.into_inner()))?;
        let out = self.write(ops, opts).await?;
        match only_result(&out)? {
            OpOutcome::Append(length) => Ok(Response::new(pb::AppendResponse {
                length: *length,
                index: out.index,
                replicas_acked: out.replicas.acked,
            })),
            other => Err(Status::internal(format!("append produced {other:?}"))),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let r = req.get_ref();
        let opts = self.options(req.metadata(), r.min_replicas, r.replica_timeout_ms);
        let (ops, _) = txn_from_wire(req.into_inner().ops)?;
        let out = self.write(ops, opts).await?;
        Ok(Response::new(pb::TxnResponse {
            index: out.index,
            results: results_to_wire(&out),
            replicas_acked: out.replicas.acked,
        }))
    }

    type PipelineStream = crate::server::BoxStream<pb::PipelineResponse>;

    async fn pipeline(
        &self,
        req: Request<Streaming<pb::PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        let writer = self.writer()?.clone();
        let inbound = req.into_inner();
        Ok(Response::new(pipeline(
            writer,
            inbound,
            self.pipeline_bytes.clone(),
            self.shutdown.clone(),
        )))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let slot = req.extensions().get::<Arc<Slot>>().cloned();
        self.note_read(UNKNOWN_WRITER);
        let req = req.into_inner();
        limits::check_key(&req.key).map_err(invalid)?;
        self.wait_applied(req.min_index, req.wait_ms, slot).await?;
        let (value, index) = self.state.get_at(&req.key).map_err(internal)?;
        Ok(Response::new(pb::GetResponse {
            found: value.is_some(),
            value: value.map(Bytes::from).unwrap_or_default(),
            index,
        }))
    }

    async fn scan(
        &self,
        req: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let slot = req.extensions().get::<Arc<Slot>>().cloned();
        self.note_read(UNKNOWN_WRITER);
        let req = req.into_inner();
        if req.start.len() > limits::MAX_KEY_BYTES || req.end.len() > limits::MAX_KEY_BYTES {
            return Err(Status::invalid_argument(format!(
                "scan bounds are limited to {} bytes",
                limits::MAX_KEY_BYTES
            )));
        }
        if req.limit > MAX_SCAN_LIMIT {
            return Err(Status::invalid_argument(format!(
                "scan limit {} is over {MAX_SCAN_LIMIT}",
                req.limit
            )));
        }
        self.wait_applied(req.min_index, req.wait_ms, slot).await?;
        let limit = if req.limit == 0 {
            DEFAULT_SCAN_LIMIT
        } else {
            req.limit
        } as usize;
        let state = self.state.clone();
        let (items, index, more) = tokio::task::spawn_blocking(move || {
            state.scan(&req.start, &req.end, limit, limits::MAX_SCAN_BYTES)
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        Ok(Response::new(pb::ScanResponse {
            items: items
                .into_iter()
                .map(|(key, value)| pb::KeyValue {
                    key: key.into(),
                    value: value.into(),
                })
                .collect(),
            index,
            more,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::kv::v1::kv_server::Kv;
    use crate::state::GroupBatch;

    fn get(key: &str, min_index: u64, wait_ms: u32) -> Request<pb::GetRequest> {
        Request::new(pb::GetRequest {
            key: Bytes::from(key.to_string()),
            min_index,
            wait_ms,
        })
    }

    #[tokio::test]
    async fn reads_below_the_floor_wait_then_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let mut g = GroupBatch::default();
        g.put("k", "1");
        state.apply(g, 4, 1).unwrap();
        let (applied_tx, applied) = watch::channel(4u64);
        let floor = ReadFloor {
            index: 9,
            ..Default::default()
        };
        let kv = KvService::new(state.clone(), applied, None).with_read_floor(floor.clone());
        let refused = |s: Status| {
            assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
            assert_eq!(
                s.message(),
                "replica is catching up to the state it already served: applied 4 < 9"
            );
        };
        refused(kv.get(get("k", 0, 1)).await.unwrap_err());
        refused(
            kv.scan(Request::new(pb::ScanRequest {
                wait_ms: 1,
                ..Default::default()
            }))
            .await
            .unwrap_err(),
        );
        // min_index below the floor does not let a read through either.
        refused(kv.get(get("k", 2, 1)).await.unwrap_err());
        assert_eq!(floor.refused.load(Ordering::Relaxed), 3);
        assert!(floor.blocked(4).is_some());
        // A read waiting when the floor is reached is served at it.
        let waiting = tokio::spawn(async move { kv.get(get("k", 0, MAX_WAIT_MS)).await });
        let mut g = GroupBatch::default();
        g.put("k", "2");
        state.apply(g, 9, 2).unwrap();
        applied_tx.send_replace(9);
        let r = waiting.await.unwrap().unwrap().into_inner();
        assert_eq!((r.found, r.value.as_ref(), r.index), (true, &b"2"[..], 9));
        assert_eq!(floor.refused.load(Ordering::Relaxed), 3);
        assert_eq!(floor.blocked(9), None);
    }

    #[test]
    fn grpc_timeouts_are_parsed_or_ignored() {
        let parse = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(parse("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "10x", "-1m", "1.5S", "1s"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn a_short_write_names_its_index_and_count() {
        let out = WriteOutcome {
            index: 42,
            results: vec![OpOutcome::Put],
            replicas: ReplicaAcks {
                required: 2,
                acked: 1,
                connected: 2,
                timeout_ms: 300,
            },
        };
        assert!(out.replicas.short());
        let s = replicas_short(&out);
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            s.message(),
            "committed on the master at index 42; 1 of 2 slaves acknowledged within 300 ms \
             (2 connected); do not retry: retrying would apply the write twice"
        );
        assert_eq!(s.metadata().get(COMMIT_INDEX_HEADER).unwrap(), "42");
        assert_eq!(s.metadata().get(REPLICAS_ACKED_HEADER).unwrap(), "1");
        assert!(!ReplicaAcks::default().short());
    }

    #[tokio::test]
    async fn above_the_floor_min_index_keeps_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (_applied_tx, applied) = watch::channel(0u64);
        let floor = ReadFloor::default();
        let kv = KvService::new(state, applied, None).with_read_floor(floor.clone());
        let r = kv.get(get("k", 0, 0)).await.unwrap().into_inner();
        assert_eq!((r.found, r.index), (false, 0));
        let s = kv.get(get("k", 5, 1)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");
        assert_eq!(floor.refused.load(Ordering::Relaxed), 0);
    }
}
