//! A master node: data directory, start-up recovery, services, clean shutdown.
//!
//! Layout of `data_dir`: `db/` (RocksDB: data + applied index + repl id),
//! `binlog/` (segments), `snapshots/` (full-sync checkpoints; removed at start
//! and on a clean stop), `CLEAN_SHUTDOWN` (written last on a clean stop, with
//! the position; removed at start). Start-up replays the binlog after the applied
//! index and reports the count as `Info.replayed_on_start`: 0 after a clean stop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tern_common::binlog::{Binlog, BinlogOptions, FsyncPolicy};
use tern_common::config::Config;
use tern_common::history::Histories;
use tern_common::kv::{KvService, PendingWrite, WriteOp, WriteOptions, Writer, WriterId};
use tern_common::position::{Position, ReplId};
use tern_common::proto::admin::v1 as admin;
use tern_common::server::{AdminService, InfoSource, ServeOptions};
use tern_common::state::State;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::acks::Acks;
use crate::committer::{self, CommitterHandle, Progress, WriteError, WritePath};
use crate::pins::Pins;
use crate::retention;
use crate::semi_sync::{SemiSync, WaitControl};
use crate::snapshot::{self, SnapshotManager};
use crate::sync::{ReplicationService, SyncShared};

/// The master's [`Writer`]: the committer, then (for a semi-synchronous
/// write) the wait for slaves, after the commit answer (see
/// [`crate::semi_sync`]).
struct CommitWriter {
    committer: CommitterHandle,
    semi: SemiSync,
    acks: Arc<Acks>,
    /// The master's shutdown: a write waiting for slaves is answered at once.
    stop: CancellationToken,
}

#[tonic::async_trait]
impl Writer for CommitWriter {
    async fn submit(
        &self,
        ops: Vec<WriteOp>,
        opts: WriteOptions,
        alone: Option<WriterId>,
    ) -> Result<PendingWrite, Status> {
        let wait = self.semi.resolve(&opts)?;
        let taken = std::time::Instant::now();
        let answer = self
            .committer
            .submit(ops, alone)
            .await
            .map_err(write_status)?;
        let Some(wait) = wait else {
            return Ok(Box::pin(async move { answer.await.map_err(write_status) }));
        };
        let (acks, stop) = (self.acks.clone(), self.stop.clone());
        Ok(Box::pin(async move {
            let mut out = answer.await.map_err(write_status)?;
            out.replicas = wait
                .wait(&acks, out.index, taken, opts.deadline, &stop)
                .await;
            Ok(out)
        }))
    }

    fn note_read(&self, from: WriterId) {
        self.committer.note_source(from);
    }
}

/// The gRPC status a client gets for a write the committer refused or failed.
fn write_status(e: WriteError) -> Status {
    match e {
        WriteError::NotAnInteger { .. }
        | WriteError::Overflow { .. }
        | WriteError::ValueTooLarge { .. } => Status::failed_precondition(e.to_string()),
        WriteError::TxnTooLarge { .. } => Status::invalid_argument(e.to_string()),
        WriteError::NotCommitted {
            exhausted: true, ..
        } => Status::resource_exhausted(e.to_string()),
        WriteError::ShuttingDown
        | WriteError::NotCommitted { .. }
        | WriteError::SyncFailed(_)
        | WriteError::Failed(_)
        | WriteError::Unknown(_)
        | WriteError::StateBehind(_) => Status::unavailable(e.to_string()),
        WriteError::Internal(_) => Status::internal(e.to_string()),
    }
}

/// Health follows the write path ("serving" while it can write); a write path
/// failed for good stops the node, which then exits non-zero (see
/// [`crate::committer`]).
fn watch_write_path(
    progress: &Progress,
    shutdown: CancellationToken,
) -> tokio::sync::watch::Receiver<bool> {
    let mut path = progress.write_path.subscribe();
    let (serving_tx, serving) = tokio::sync::watch::channel(path.borrow().is_writable());
    tokio::spawn(async move {
        loop {
            let now = path.borrow_and_update().clone();
            serving_tx.send_replace(now.is_writable());
            if let WritePath::Failed { error, .. } = &now {
                tracing::error!(%error, "the write path failed for good: stopping the master");
                shutdown.cancel();
                return;
            }
            tokio::select! {
                changed = path.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
        }
    });
    serving
}

struct MasterInfo {
    histories: Histories,
    progress: Arc<Progress>,
    sync: Arc<SyncShared>,
    pins: Arc<Pins>,
    replayed_on_start: u64,
    fsync: String,
}

impl InfoSource for MasterInfo {
    fn info(&self) -> admin::InfoResponse {
        let p = &self.progress;
        // Each watch is read once, into a local: a `borrow()` guard lives to
        // the end of the expression it is in, and a second `borrow()` of the
        // same watch in that expression waits behind a writer (the committer)
        // that waits for the first: a deadlock that stops the write path.
        let applied_index = *p.applied.borrow();
        let (write_error, writable) = {
            let path = p.write_path.borrow();
            (path.describe(), path.is_writable())
        };
        admin::InfoResponse {
            role: "master".into(),
            repl_id: self.histories.current.to_string(),
            histories: self.histories.admin_list(),
            first_index: p.first_index.load(Ordering::Acquire),
            last_index: p.last_index.load(Ordering::Acquire),
            applied_index,
            durable_index: p.durable.load(Ordering::Acquire),
            replayed_on_start: self.replayed_on_start,
            last_seq: p.last_seq.load(Ordering::Acquire),
            fsync: self.fsync.clone(),
            binlog_bytes: p.binlog_bytes.load(Ordering::Acquire),
            version: env!("CARGO_PKG_VERSION").into(),
            slaves: self.sync.slave_infos(),
            sync_sessions: self.sync.sync_sessions(),
            db_sync_streams: self.sync.db_sync_streams(),
            pins: self
                .pins
                .list()
                .into_iter()
                .map(|(owner, index)| admin::Pin { owner, index })
                .collect(),
            counters: Some(admin::Counters {
                full_syncs: self.sync.full_syncs.load(Ordering::Relaxed),
                partial_syncs: self.sync.partial_syncs.load(Ordering::Relaxed),
                stale_messages: self.sync.stale_messages.load(Ordering::Relaxed),
                sessions_refused: self.sync.sessions_refused.load(Ordering::Relaxed),
                sessions_dropped: self.sync.sessions_dropped.load(Ordering::Relaxed),
                transactions_committed: p.transactions.load(Ordering::Relaxed),
                commit_groups: p.groups.load(Ordering::Relaxed),
                inline_commit_groups: p.inline_groups.load(Ordering::Relaxed),
                write_errors: p.write_errors.load(Ordering::Relaxed),
                batches_from_memory: self.sync.batches_from_memory.load(Ordering::Relaxed),
                batches_from_files: self.sync.batches_from_files.load(Ordering::Relaxed),
                verify_checks: p.verify_checks.load(Ordering::Relaxed),
                ..Default::default()
            }),
            write_error,
            writable,
            last_verify_index: p.last_verify.load(Ordering::Acquire),
            ..Default::default()
        }
    }
}

/// What opening the data directory found.
pub struct Opened {
    pub state: State,
    pub binlog: Binlog,
    pub histories: Histories,
    pub replayed_on_start: u64,
    pub clean_shutdown: bool,
}

/// Opens (or creates) a master's data directory and brings the state up to the
/// end of the binlog.
pub fn open_data_dir(cfg: &Config) -> anyhow::Result<Opened> {
    let dir = &cfg.server.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    snapshot::remove_all(dir)
        .with_context(|| format!("removing old snapshots in {}", dir.display()))?;
    let marker = tern_common::marker::take_clean_shutdown(dir)
        .context("reading the clean-shutdown marker")?;
    if let Err(e) = tern_common::marker::reserve_clean_shutdown(dir) {
        // Not fatal: the node can run; only a clean stop on a full disk may then fail.
        tracing::warn!(error = %e, "could not set aside space for the clean-shutdown marker");
    }
    let state = State::open(&dir.join("db"))
        .with_context(|| format!("opening RocksDB in {}", dir.join("db").display()))?;
    let (mut binlog, report) = Binlog::open(
        &dir.join("binlog"),
        BinlogOptions {
            segment_bytes: cfg.binlog.segment_bytes,
            fsync: cfg.binlog.fsync,
        },
    )
    .with_context(|| format!("opening binlog in {}", dir.join("binlog").display()))?;
    if report.truncated_bytes > 0 {
        tracing::warn!(
            bytes = report.truncated_bytes,
            events = report.truncated_events,
            last_index = report.last_index,
            "binlog tail was torn or held a partial transaction; truncated it"
        );
    }
    let promoted = was_slave(&state, dir)?;
    let (histories, clean_shutdown) = match state.histories()? {
        Some(h) if promoted => {
            // A slave's data: its relay log is byte-identical to its master's
            // binlog up to where it ends, so slaves of the old master at or
            // before that index continue from here (I8).
            if state.applied_index() > binlog.last_index() {
                continue_binlog_after_state(&mut binlog, &state)?;
            }
            let end = binlog.last_index();
            let h = start_history(&state, h, end)?;
            tracing::warn!(
                repl_id = %h.current,
                old_repl_id = %h.ancestors.last().map(|a| a.repl_id.to_string()).unwrap_or_default(),
                ended_at = end,
                "promoted: this data was a slave's; it is now a master with a new replication \
                 history (slaves of the old master at or before the old history's end continue \
                 with a partial resync)"
            );
            (h, false)
        }
        Some(h) => {
            let clean_shutdown = marker.matches(Some(h.current), binlog.last_index());
            // The fsync policy of the run that just ended decides what it shipped.
            let previous = state.running_fsync()?;
            let shipped_undurable = previous
                .as_deref()
                .map_or(cfg.binlog.fsync != FsyncPolicy::Always, |p| p != "always");
            if !clean_shutdown && shipped_undurable {
                if state.applied_index() > binlog.last_index() {
                    continue_binlog_after_state(&mut binlog, &state)?;
                }
                let end = binlog.last_index();
                let h = start_history(&state, h, end)?;
                tracing::warn!(
                    old_repl_id = %h.ancestors.last().map(|a| a.repl_id.to_string()).unwrap_or_default(),
                    ended_at = end,
                    repl_id = %h.current,
                    "the last run stopped without a clean shutdown and shipped events before \
                     they were durable: starting a new replication history (slaves beyond the \
                     old one's end will be told they diverged)"
                );
                (h, false)
            } else {
                (h, clean_shutdown)
            }
        }
        None => {
            anyhow::ensure!(
                state.applied_index() == 0 && binlog.last_index() == 0,
                "data directory {} has data but no replication id",
                dir.display()
            );
            let h = Histories::new(ReplId::random());
            state.set_histories(&h)?;
            tracing::info!(repl_id = %h.current, "new replication history");
            (h, false)
        }
    };
    state.set_running_fsync(cfg.binlog.fsync.as_str())?;
    state.set_role("master")?;
    anyhow::ensure!(
        state.applied_index() <= binlog.last_index(),
        "RocksDB has applied index {} but the binlog ends at {}, after a clean stop or with \
         binlog.fsync = always: the binlog lost events that were durable. Refusing to start; \
         restore the binlog or start a new master from this data",
        state.applied_index(),
        binlog.last_index()
    );
    let replayed_on_start = tern_common::replay::replay(&binlog, &state)?;
    if replayed_on_start > 0 {
        tracing::info!(
            events = replayed_on_start,
            applied = state.applied_index(),
            "replayed binlog after the applied index"
        );
    }
    Ok(Opened {
        state,
        binlog,
        histories,
        replayed_on_start,
        clean_shutdown,
    })
}

/// Under `fsync = everysec | no` a power loss can take binlog events that
/// RocksDB had already made durable (a memtable flush RocksDB started by itself,
/// or the one it does when it is closed after a failed fsync): the state is then
/// ahead of the binlog. Those events did exist (the committer wrote them before
/// applying them, and what it shipped is what it wrote), so the history really
/// reaches the state's applied index; only the binlog lost them. The binlog
/// continues right after the state: slaves at the applied index continue,
/// slaves behind it need a full sync (their events are gone), and the caller
/// starts a new history whose parent ends at the applied index.
fn continue_binlog_after_state(binlog: &mut Binlog, state: &State) -> anyhow::Result<()> {
    let (applied, last) = (state.applied_index(), binlog.last_index());
    tracing::warn!(
        applied,
        binlog_last = last,
        "RocksDB holds events the binlog lost (a power loss with binlog.fsync = everysec or \
         no): continuing the binlog after the state's applied index; slaves behind it will \
         need a full sync"
    );
    binlog
        .reset(applied + 1, Some(state.last_seq()))
        .with_context(|| format!("restarting the binlog at {}", applied + 1))
}

/// Ends the current history at `end` (the last index the binlog still holds)
/// and starts a new one (I8), stored before anything of it is written. Called
/// when this master cannot prove that what it (or, for a promoted slave, its
/// old master) may have shipped is still its own: after a run that stopped
/// without a clean shutdown while shipping events before they were durable
/// (`fsync = everysec` or `no`), and at promotion. Slaves at or before `end`
/// continue (the prefix is shared); slaves beyond it are told `diverged`.
fn start_history(state: &State, mut h: Histories, end: u64) -> anyhow::Result<Histories> {
    h.fork(end.into(), ReplId::random());
    state
        .set_histories(&h)
        .context("storing the new replication history")?;
    Ok(h)
}

/// Whether a slave ran last on this data (a promotion): its recorded role,
/// or, on data from before roles were recorded, the slave's id file.
fn was_slave(state: &State, dir: &std::path::Path) -> anyhow::Result<bool> {
    Ok(match state.role()? {
        Some(role) => role == "slave",
        None => dir.join("SLAVE_ID").exists(),
    })
}

/// Runs a master on `listener` until `shutdown` is cancelled, then stops
/// accepting, drains the write path, flushes RocksDB, fsyncs the binlog and
/// writes the clean-shutdown marker.
pub async fn run(
    listener: TcpListener,
    cfg: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg_for_open = cfg.clone();
    let opened = tokio::task::spawn_blocking(move || open_data_dir(&cfg_for_open)).await??;
    let Opened {
        state,
        binlog,
        histories,
        replayed_on_start,
        clean_shutdown,
    } = opened;
    let repl_id = histories.current;
    let reader = binlog.reader();
    let pins = Pins::new();
    let metrics = tern_common::metrics::Metrics::new();
    let mut binlog = binlog;
    binlog.observe_fsyncs(metrics.fsync.clone());
    let (handle, progress, committer) = committer::spawn(
        binlog,
        state.clone(),
        retention::Policy::from_config(&cfg.binlog),
        pins.clone(),
        (cfg.sync.verify_interval_secs > 0)
            .then(|| Duration::from_secs(cfg.sync.verify_interval_secs)),
        Some(metrics.group_transactions.clone()),
        tokio::runtime::Handle::current(),
    );
    let snapshots = SnapshotManager::new(
        &cfg.server.data_dir,
        state.clone(),
        Some(repl_id),
        pins.clone(),
        progress.clone(),
        Duration::from_millis(cfg.sync.snapshot_idle_ms),
        Duration::from_millis(cfg.sync.snapshot_min_interval_ms),
    );
    let snapshot_gc = snapshots.spawn_gc(shutdown.clone());
    tracing::info!(
        listen = %listener.local_addr()?,
        %repl_id,
        applied = state.applied_index(),
        replayed_on_start,
        clean_shutdown,
        fsync = %cfg.binlog.fsync,
        "tern-master serving"
    );
    let sync = SyncShared::new(
        histories.clone(),
        progress.clone(),
        pins.clone(),
        snapshots.clone(),
        reader,
        cfg.sync.clone(),
        shutdown.clone(),
    );
    let _ = sync.metrics.set(metrics.clone());
    let semi = SemiSync::from_config(&cfg);
    let writer = CommitWriter {
        committer: handle,
        semi,
        acks: sync.acks.clone(),
        stop: shutdown.clone(),
    };
    let kv = KvService::new(
        state.clone(),
        progress.applied.subscribe(),
        Some(Arc::new(writer)),
    )
    .with_shutdown(shutdown.clone())
    .with_request_timeout(Duration::from_millis(cfg.server.request_timeout_ms));
    let wait = Arc::new(WaitControl::new(
        semi,
        sync.acks.clone(),
        progress.clone(),
        shutdown.clone(),
    ));
    let info = Arc::new(MasterInfo {
        histories,
        progress: progress.clone(),
        sync: sync.clone(),
        pins,
        replayed_on_start,
        fsync: cfg.binlog.fsync.to_string(),
    });
    let mut serve_opts = ServeOptions::from_config(&cfg.server);
    serve_opts.serving = Some(watch_write_path(&progress, shutdown.clone()));
    serve_opts.secure(&cfg)?;
    serve_opts.metrics = Some(metrics.clone());
    metrics.set_source(tern_common::metrics::NodeSource {
        info: info.clone(),
        connections: Some(serve_opts.connections.clone()),
    });
    let metrics_server =
        tern_common::metrics::start(&cfg.server, metrics.clone(), shutdown.clone())?;
    let resp = tern_common::resp::start(
        &cfg.server,
        tern_common::resp::RespNode {
            kv: kv.clone(),
            info: info.clone(),
            control: wait.clone(),
            auth: serve_opts.auth.clone(),
            metrics: Some(metrics.clone()),
        },
        shutdown.clone(),
    )?;
    let admin = AdminService::new(state.clone(), info)
        .with_control(wait)
        .with_connections(serve_opts.connections.clone())
        .with_auth(serve_opts.auth.clone());
    let mut routes = tonic::service::Routes::builder();
    routes.add_service(kv.into_server());
    routes.add_service(admin.into_server());
    routes.add_service(ReplicationService::new(sync).into_server());
    let served =
        tern_common::server::serve(listener, routes.routes(), serve_opts, shutdown.clone()).await;
    // The RESP front's connections hold the write path too.
    if let Some(resp) = resp {
        let _ = resp.await;
    }
    metrics.clear_source();
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    // Snapshots are not kept across a stop (a restart removes them anyway).
    let _ = snapshot_gc.await;
    snapshots.remove_everything().await;
    // serve returns at most server.shutdown_timeout_ms after the signal, with
    // every connection closed (cut if need be) and so every request handler and
    // CommitterHandle gone: the committer drains, fsyncs, flushes and hands the
    // binlog back.
    let binlog = tokio::task::spawn_blocking(move || committer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("committer thread panicked"))??;
    served?;
    let position = Position {
        repl_id,
        index: binlog.last_index().into(),
    };
    tern_common::marker::write_clean_shutdown(&cfg.server.data_dir, Some(position))?;
    tracing::info!(%position, "clean shutdown");
    Ok(())
}
