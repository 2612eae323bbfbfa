//! `DbSync`: a full-sync snapshot (RocksDB checkpoint) streamed in chunks.
//!
//! ```text
//! slave: DbSyncRequest{slave_id, snapshot_id?, have[]}
//! master: DbSyncHeader{snapshot_id, repl_id, index, files[name,size,crc32c], total_bytes, ...}
//! master: FileChunk{name, offset, data, crc32c} ... file by file, each from its `have` offset
//! master: DbSyncDone{bytes_sent}
//! ```
//!
//! The snapshot is a RocksDB checkpoint whose index is read from inside it
//! ([`crate::snapshot`]); an empty `snapshot_id` gets a fresh (or recent,
//! shared) one, a given one resumes it or is NOT_FOUND when it has gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tern_common::proto::replication::v1 as pb;
use tern_common::wire::DbSyncReq;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{SyncShared, Unsent, send_bounded};
use crate::snapshot::{SnapshotError, SnapshotLease};

/// Bytes of snapshot data in one `FileChunk`.
pub const DB_SYNC_CHUNK_BYTES: usize = 1 << 20;
/// Smallest chunk under a bandwidth cap.
const MIN_PACED_CHUNK_BYTES: usize = 16 << 10;
/// How often a `DbSync` stream logs its progress.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(2);

pub type DbSyncStream = ReceiverStream<Result<pb::DbSyncChunk, Status>>;

/// Serves one `DbSync` call: validates the request, then streams the snapshot
/// from a task of its own.
pub(super) async fn serve(
    shared: Arc<SyncShared>,
    req: Request<pb::DbSyncRequest>,
) -> Result<Response<DbSyncStream>, Status> {
    let remote = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    let span = tracing::info_span!(
        parent: None,
        "db_sync",
        side = "master",
        slave_id = tracing::field::Empty,
        snapshot_id = tracing::field::Empty,
        index = tracing::field::Empty,
        bytes = tracing::field::Empty,
        bytes_to_send = tracing::field::Empty,
        outcome = tracing::field::Empty,
        %remote,
    );
    tern_common::telemetry::extract_context(&span, req.metadata());
    let prepared = span.in_scope(|| {
        let req = DbSyncReq::try_from(req.into_inner())?;
        let slot = shared.take_slot(&shared.db_syncs, "DbSync streams", "sync.max_db_syncs")?;
        let (resumed, starts) = prepare_db_sync(&shared, &req)?;
        Ok::<_, Status>((req.slave_id, slot, resumed, starts))
    });
    let (slave_id, slot, resumed, starts) = match prepared {
        Ok(x) => x,
        Err(status) => {
            span.record("outcome", status.message());
            span.in_scope(|| {
                tracing::warn!(code = ?status.code(), message = status.message(), "DbSync refused")
            });
            return Err(status);
        }
    };
    let (tx, rx) = mpsc::channel(4);
    let span2 = span.clone();
    tokio::spawn(
        async move {
            let _slot = slot;
            // A new snapshot is made here, not before answering: a large
            // checkpoint's checksums may take longer than a request deadline.
            let result = match resumed {
                Some(lease) => stream_snapshot(&shared, lease, &starts, &tx).await,
                None => match shared.snapshots.get_or_create(&slave_id).await {
                    Ok(lease) => stream_snapshot(&shared, lease, &starts, &tx).await,
                    Err(e) => Err(Status::from(e)),
                },
            };
            match result {
                Ok(outcome) => {
                    span2.record("outcome", tracing::field::debug(&outcome));
                    tracing::info!(?outcome, "DbSync stream ended");
                }
                Err(status) => {
                    span2.record("outcome", status.message());
                    tracing::warn!(code = ?status.code(), message = status.message(), "DbSync stream failed");
                    let _ = send_bounded(&shared, &tx, Err(status)).await;
                }
            }
        }
        .instrument(span),
    );
    Ok(Response::new(ReceiverStream::new(rx)))
}

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Status {
        match e {
            SnapshotError::Purged { .. } => Status::unavailable(e.to_string()),
            SnapshotError::TooSoon { retry_after, .. } => {
                tern_common::status::exhausted(&e, retry_after)
            }
            SnapshotError::WrongReplId { .. } => Status::failed_precondition(e.to_string()),
            SnapshotError::Io(_)
            | SnapshotError::State(_)
            | SnapshotError::Task(_)
            | SnapshotError::FileChanged { .. } => Status::internal(e.to_string()),
        }
    }
}

fn snapshot_gone(id: &str) -> Status {
    Status::not_found(format!("snapshot {id} is gone; start a new full sync"))
}

/// Validates a `DbSyncRequest`. A resume (`snapshot_id` set) gets its lease
/// and, per file, the offset the slave has it up to (`None`: not listed in
/// `have`); a new full sync gets `None` and no offsets (`have` is only
/// meaningful with the snapshot it refers to).
fn prepare_db_sync(
    shared: &SyncShared,
    req: &DbSyncReq,
) -> Result<(Option<SnapshotLease>, Vec<Option<u64>>), Status> {
    tracing::Span::current().record("slave_id", req.slave_id.as_str());
    if shared.shutdown.is_cancelled() {
        return Err(Status::unavailable("the master is shutting down"));
    }
    let Some(snapshot_id) = &req.snapshot_id else {
        return Ok((None, Vec::new()));
    };
    let lease = shared
        .snapshots
        .lease(snapshot_id, &req.slave_id)
        .ok_or_else(|| snapshot_gone(snapshot_id))?;
    let by_name: HashMap<&str, usize> = lease
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name.as_str(), i))
        .collect();
    let mut starts: Vec<Option<u64>> = vec![None; lease.files.len()];
    for (name, offset) in &req.have {
        let Some(&i) = by_name.get(name.as_str()) else {
            return Err(Status::invalid_argument(format!(
                "have: {name:?} is not a file of snapshot {}",
                lease.id
            )));
        };
        if starts[i].is_some() {
            return Err(Status::invalid_argument(format!(
                "have: {name:?} is listed twice"
            )));
        }
        if *offset > lease.files[i].size {
            return Err(Status::invalid_argument(format!(
                "have: offset {offset} of {name:?} is beyond its size {}",
                lease.files[i].size
            )));
        }
        starts[i] = Some(*offset);
    }
    Ok((Some(lease), starts))
}

/// How a `DbSync` stream ended without an error.
#[derive(Debug)]
#[allow(dead_code)] // fields are read through Debug
enum DbSyncOutcome {
    Done { bytes_sent: u64 },
    SlaveGone,
    Timeout,
    Shutdown,
}

/// Why a `DbSync` stream stopped early.
enum Stop {
    Ended(DbSyncOutcome),
    Failed(Status),
}

impl From<DbSyncOutcome> for Stop {
    fn from(o: DbSyncOutcome) -> Stop {
        Stop::Ended(o)
    }
}

impl From<Status> for Stop {
    fn from(s: Status) -> Stop {
        Stop::Failed(s)
    }
}

impl From<SnapshotError> for Stop {
    fn from(e: SnapshotError) -> Stop {
        Stop::Failed(e.into())
    }
}

type DbSyncOutbound = mpsc::Sender<Result<pb::DbSyncChunk, Status>>;
/// Waits until sending more keeps the stream at or under `rate` bytes per
/// second since `started` (`sync.fullsync_bytes_per_sec`; 0 = no cap).
async fn pace(shared: &SyncShared, started: Instant, sent: u64, rate: u64) -> Result<(), Stop> {
    if rate == 0 {
        return Ok(());
    }
    let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
    tokio::select! {
        _ = tokio::time::sleep_until(due.into()) => Ok(()),
        _ = shared.shutdown.cancelled() => Err(DbSyncOutcome::Shutdown.into()),
    }
}

/// Sends one message of a `DbSync` stream (see [`send_bounded`]).
async fn send_chunk(
    shared: &SyncShared,
    tx: &DbSyncOutbound,
    kind: pb::db_sync_chunk::Kind,
) -> Result<(), Stop> {
    let msg = Ok(pb::DbSyncChunk { kind: Some(kind) });
    send_bounded(shared, tx, msg).await.map_err(|e| {
        match e {
            Unsent::Closed => DbSyncOutcome::SlaveGone,
            Unsent::Timeout => DbSyncOutcome::Timeout,
            Unsent::Shutdown => DbSyncOutcome::Shutdown,
        }
        .into()
    })
}

/// Runs blocking snapshot I/O off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, Stop> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(Status::internal(format!("snapshot read task: {e}")).into()),
    }
}

fn mb_per_s(bytes: u64, since: Instant) -> String {
    let secs = since.elapsed().as_secs_f64().max(1e-3);
    format!("{:.1}", bytes as f64 / secs / (1u64 << 20) as f64)
}

/// Streams the header, each file from what the slave `have`s, and `DbSyncDone`.
async fn stream_snapshot(
    shared: &SyncShared,
    mut snap: SnapshotLease,
    have: &[Option<u64>],
    tx: &DbSyncOutbound,
) -> Result<DbSyncOutcome, Status> {
    let span = tracing::Span::current();
    span.record("snapshot_id", snap.id.as_str());
    span.record("index", snap.index);
    let have: Vec<Option<u64>> = if have.is_empty() {
        vec![None; snap.files.len()]
    } else {
        have.to_vec()
    };
    let bytes_to_send: u64 = snap
        .files
        .iter()
        .zip(&have)
        .map(|(f, h)| f.size - h.unwrap_or(0))
        .sum();
    span.record("bytes_to_send", bytes_to_send);
    tracing::info!(
        index = snap.index,
        files = snap.files.len(),
        total_bytes = snap.total_bytes,
        bytes_to_send,
        fullsync_bytes_per_sec = shared.cfg.fullsync_bytes_per_sec,
        "full sync: sending snapshot"
    );
    let started = Instant::now();
    let mut sent = 0u64;
    let result = send_files(shared, &snap, &have, tx, bytes_to_send, started, &mut sent).await;
    span.record("bytes", sent);
    match result {
        Ok(()) => {
            snap.mark_completed();
            shared.full_syncs.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                bytes_sent = sent,
                secs = format!("{:.2}", started.elapsed().as_secs_f64()),
                mb_per_s = mb_per_s(sent, started),
                fullsync_bytes_per_sec = shared.cfg.fullsync_bytes_per_sec,
                "full sync: snapshot sent"
            );
            Ok(DbSyncOutcome::Done { bytes_sent: sent })
        }
        Err(Stop::Ended(o)) => Ok(o),
        Err(Stop::Failed(s)) => Err(s),
    }
}

async fn send_files(
    shared: &SyncShared,
    snap: &SnapshotLease,
    have: &[Option<u64>],
    tx: &DbSyncOutbound,
    bytes_to_send: u64,
    started: Instant,
    sent: &mut u64,
) -> Result<(), Stop> {
    let header = pb::DbSyncHeader {
        snapshot_id: snap.id.clone(),
        repl_id: snap.repl_id.to_string(),
        index: snap.index,
        files: snap
            .files
            .iter()
            .map(|f| pb::SnapshotFile {
                name: f.name.clone(),
                size: f.size,
                crc32c: f.crc32c,
            })
            .collect(),
        total_bytes: snap.total_bytes,
        last_seq: snap.last_seq,
        bytes_to_send,
    };
    send_chunk(shared, tx, pb::db_sync_chunk::Kind::Header(header)).await?;
    let mut last_log = Instant::now();
    let rate = shared.cfg.fullsync_bytes_per_sec;
    // Under a low cap, smaller chunks keep the stream moving every fraction of
    // a second instead of bursting a whole chunk after a long pause.
    let chunk_bytes = match rate {
        0 => DB_SYNC_CHUNK_BYTES,
        r => (r / 8).clamp(MIN_PACED_CHUNK_BYTES as u64, DB_SYNC_CHUNK_BYTES as u64) as usize,
    };
    for (f, &has) in snap.files.iter().zip(have) {
        // A file the slave has whole is skipped; an empty one it does not have
        // still gets one empty chunk, so the slave creates it.
        if has == Some(f.size) {
            continue;
        }
        let start = has.unwrap_or(0);
        let file = {
            let (s, f) = (snap.snapshot(), f.clone());
            Arc::new(blocking(move || s.open(&f)).await?)
        };
        let mut offset = start;
        loop {
            if !snap.alive() {
                return Err(snapshot_gone(&snap.id).into());
            }
            let len = (f.size - offset).min(chunk_bytes as u64) as usize;
            pace(shared, started, *sent, rate).await?;
            let data = {
                let (s, f, file) = (snap.snapshot(), f.clone(), file.clone());
                blocking(move || s.read_at(&file, &f, offset, len)).await?
            };
            let chunk = pb::FileChunk {
                name: f.name.clone(),
                offset,
                crc32c: crc32c::crc32c(&data),
                data: bytes::Bytes::from(data),
            };
            send_chunk(shared, tx, pb::db_sync_chunk::Kind::Data(chunk)).await?;
            offset += len as u64;
            *sent += len as u64;
            if last_log.elapsed() >= PROGRESS_LOG_INTERVAL {
                last_log = Instant::now();
                tracing::info!(
                    percent = format!("{:.1}", *sent as f64 * 100.0 / bytes_to_send.max(1) as f64),
                    mb_per_s = mb_per_s(*sent, started),
                    sent = *sent,
                    bytes_to_send,
                    "full sync: sending"
                );
            }
            if offset >= f.size {
                break;
            }
        }
    }
    let done = pb::DbSyncDone { bytes_sent: *sent };
    send_chunk(shared, tx, pb::db_sync_chunk::Kind::Done(done)).await
}
