//! The `tern.kv.v1.Kv` gRPC service, shared by master and slave.
//!
//! Reads (`Get`, `Scan`) are served from the local RocksDB; with `min_index` they
//! first wait, at most `wait_ms`, until the applied index reaches it, so a client
//! can read its own master write from a slave. Writes are validated here (sizes,
//! empty keys) and handed to a [`Writer`]; a node without one (a slave) answers
//! FAILED_PRECONDITION "read-only replica".

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::limits::{self, LimitError};
use crate::proto::kv::v1 as pb;
use crate::state::State;

/// Longest `wait_ms` honoured for a `min_index` read.
pub const MAX_WAIT_MS: u32 = 60_000;
/// `Scan` limit when the request says 0, and the most it may ask for.
pub const DEFAULT_SCAN_LIMIT: u32 = 1000;
pub const MAX_SCAN_LIMIT: u32 = 100_000;

/// One operation of a write; a request is a list of them run as one transaction.
#[derive(Clone, Debug)]
pub enum WriteOp {
    Put { key: Bytes, value: Bytes },
    Delete { key: Bytes },
    IncrBy { key: Bytes, delta: i64 },
    Append { key: Bytes, value: Bytes },
}

/// What one operation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpOutcome {
    Put,
    Delete,
    IncrBy(i64),
    Append(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Index of the transaction's Commit event.
    pub index: u64,
    pub results: Vec<OpOutcome>,
}

/// Where a node's writes go (the master's committer).
#[tonic::async_trait]
pub trait Writer: Send + Sync + 'static {
    async fn write(&self, ops: Vec<WriteOp>) -> Result<WriteOutcome, Status>;
}

pub struct KvService {
    state: State,
    applied: watch::Receiver<u64>,
    writer: Option<Arc<dyn Writer>>,
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
        }
    }

    pub fn into_server(self) -> pb::kv_server::KvServer<KvService> {
        pb::kv_server::KvServer::new(self)
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(limits::MAX_MESSAGE_BYTES)
    }

    async fn write(&self, ops: Vec<WriteOp>) -> Result<WriteOutcome, Status> {
        let Some(w) = &self.writer else {
            return Err(Status::failed_precondition(
                "read-only replica: send writes to the master",
            ));
        };
        w.write(ops).await
    }

    async fn wait_applied(&self, min_index: u64, wait_ms: u32) -> Result<(), Status> {
        if min_index == 0 || *self.applied.borrow() >= min_index {
            return Ok(());
        }
        let wait = Duration::from_millis(wait_ms.min(MAX_WAIT_MS) as u64);
        let mut rx = self.applied.clone();
        match tokio::time::timeout(wait, rx.wait_for(|a| *a >= min_index)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Status::unavailable("node is shutting down")),
            Err(_) => Err(Status::out_of_range(format!(
                "applied index {} has not reached min_index {min_index} within {}ms",
                *self.applied.borrow(),
                wait.as_millis()
            ))),
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
        let ops = single(pb::op::Op::Put(req.into_inner()))?;
        let out = self.write(ops).await?;
        Ok(Response::new(pb::WriteResponse { index: out.index }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let ops = single(pb::op::Op::Delete(req.into_inner()))?;
        let out = self.write(ops).await?;
        Ok(Response::new(pb::WriteResponse { index: out.index }))
    }

    async fn incr_by(
        &self,
        req: Request<pb::IncrByRequest>,
    ) -> Result<Response<pb::IncrByResponse>, Status> {
        let ops = single(pb::op::Op::IncrBy(req.into_inner()))?;
        let out = self.write(ops).await?;
        match only_result(&out)? {
            OpOutcome::IncrBy(value) => Ok(Response::new(pb::IncrByResponse {
                value: *value,
                index: out.index,
            })),
            other => Err(Status::internal(format!("incr_by produced {other:?}"))),
        }
    }

    async fn append(
        &self,
        req: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let ops = single(pb::op::Op::Append(req.into_inner()))?;
        let out = self.write(ops).await?;
        match only_result(&out)? {
            OpOutcome::Append(length) => Ok(Response::new(pb::AppendResponse {
                length: *length,
                index: out.index,
            })),
            other => Err(Status::internal(format!("append produced {other:?}"))),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let req = req.into_inner();
        if req.ops.is_empty() {
            return Err(invalid(LimitError::EmptyTxn));
        }
        if req.ops.len() > limits::MAX_TXN_OPS {
            return Err(invalid(LimitError::TooManyOps { ops: req.ops.len() }));
        }
        let mut ops = Vec::with_capacity(req.ops.len());
        let mut total = 0usize;
        for (i, op) in req.ops.into_iter().enumerate() {
            let Some(op) = op.op else {
                return Err(Status::invalid_argument(format!("op {i} is empty")));
            };
            let (op, n) =
                op_from_wire(op).map_err(|e| Status::invalid_argument(format!("op {i}: {e}")))?;
            total += n;
            if total > limits::MAX_TXN_BYTES {
                return Err(invalid(LimitError::TxnTooLarge { bytes: total }));
            }
            ops.push(op);
        }
        let out = self.write(ops).await?;
        let results = out
            .results
            .iter()
            .map(|r| pb::OpResult {
                result: Some(match r {
                    OpOutcome::Put => pb::op_result::Result::Put(pb::PutResult {}),
                    OpOutcome::Delete => pb::op_result::Result::Delete(pb::DeleteResult {}),
                    OpOutcome::IncrBy(v) => pb::op_result::Result::IncrBy(pb::IncrByResponse {
                        value: *v,
                        index: out.index,
                    }),
                    OpOutcome::Append(l) => pb::op_result::Result::Append(pb::AppendResponse {
                        length: *l,
                        index: out.index,
                    }),
                }),
            })
            .collect();
        Ok(Response::new(pb::TxnResponse {
            index: out.index,
            results,
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let req = req.into_inner();
        limits::check_key(&req.key).map_err(invalid)?;
        self.wait_applied(req.min_index, req.wait_ms).await?;
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
        self.wait_applied(req.min_index, req.wait_ms).await?;
        let limit = if req.limit == 0 {
            DEFAULT_SCAN_LIMIT
        } else {
            req.limit
        } as usize;
        let state = self.state.clone();
        let (items, index, more) =
            tokio::task::spawn_blocking(move || state.scan(&req.start, &req.end, limit))
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
