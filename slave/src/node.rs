//! A slave node: data directory, recovery, the link, the applier, services and
//! clean shutdown.
//!
//! Layout of `data_dir`: `db/` (RocksDB: data + applied index + the master's repl
//! id), `binlog/` (the relay log), `SLAVE_ID` (this slave's stable id),
//! `CLEAN_SHUTDOWN` (written last on a clean stop), `READ_FLOOR` (the oldest
//! state it may serve, see [`crate::floor`]). Start-up truncates a partial
//! transaction at the relay tail and replays the relay log after the applied
//! index; after a clean stop that replays nothing (I6).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tern_common::binlog::{Binlog, BinlogError, BinlogOptions};
use tern_common::config::Config;
use tern_common::kv::{KvService, ReadFloor};
use tern_common::position::{Position, ReplId};
use tern_common::proto::admin::v1 as admin;
use tern_common::replay::ReplayError;
use tern_common::server::{AdminService, InfoSource, ServeOptions};
use tern_common::state::State;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::applier::Applier;
use crate::floor;
use crate::fullsync;
use crate::link::{Link, LinkExit, LinkStatus};

/// The sequential apply rate measured by `scripts/bench-repl.sh` (catch-up).
const APPLY_RATE: &str = "about 2.5M events/s, 0.85M one-Put transactions/s, on one thread";

/// `Admin.SetMaster`: re-points the link (see [`crate::link`]).
struct SlaveControl {
    master: watch::Sender<String>,
    slave: tern_common::config::SlaveConfig,
}

#[tonic::async_trait]
impl tern_common::server::AdminControl for SlaveControl {
    async fn set_master(
        &self,
        req: admin::SetMasterRequest,
    ) -> Result<admin::SetMasterResponse, tonic::Status> {
        let url = req.master.trim().to_string();
        if url.is_empty() || url.len() > 2048 {
            return Err(tonic::Status::invalid_argument(
                "SetMaster: master must be a URL of 1 to 2048 bytes, e.g. http://10.0.0.2:7400",
            ));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(tonic::Status::invalid_argument(format!(
                "SetMaster: master {url:?} must start with http:// or https://"
            )));
        }
        // The same check (and TLS files) the link will use.
        let mut slave = self.slave.clone();
        slave.master = url.clone();
        tern_common::server::tls::master_endpoint(&slave)
            .map_err(|e| tonic::Status::invalid_argument(format!("SetMaster: {e}")))?;
        let previous = self.master.send_replace(url.clone());
        tracing::warn!(%previous, master = %url, "Admin.SetMaster: following a new master (not persisted: a restart follows slave.master again)");
        Ok(admin::SetMasterResponse { previous })
    }
}

struct SlaveInfo {
    verify: Arc<crate::verify::VerifyStats>,
    /// This slave's own slaves (cascading).
    downstream: Arc<tern_master::sync::SyncShared>,
    status: Arc<LinkStatus>,
    master: watch::Receiver<String>,
    received: watch::Receiver<u64>,
    applied: watch::Receiver<u64>,
    replayed_on_start: u64,
    state: State,
    fsync: String,
    read_floor: ReadFloor,
}

impl InfoSource for SlaveInfo {
    fn info(&self) -> admin::InfoResponse {
        let s = &self.status;
        let link = s.snapshot();
        // Each watch read once, into a local: two `borrow()`s of one watch in
        // one expression deadlock with a writer (the applier) waiting between
        // them.
        let applied = *self.applied.borrow();
        let received = *self.received.borrow();
        let master = self.master.borrow().clone();
        admin::InfoResponse {
            role: "slave".into(),
            repl_id: link.repl_id.map(|r| r.to_string()).unwrap_or_default(),
            first_index: s.relay_first.load(Ordering::Acquire),
            last_index: s.relay_last.load(Ordering::Acquire),
            applied_index: applied,
            durable_index: s.relay_durable.load(Ordering::Acquire),
            replayed_on_start: self.replayed_on_start,
            last_seq: self.state.last_seq(),
            fsync: self.fsync.clone(),
            binlog_bytes: s.relay_bytes.load(Ordering::Acquire),
            version: env!("CARGO_PKG_VERSION").into(),
            read_floor: self.read_floor.index,
            last_verify_index: self.verify.last_index.load(Ordering::Acquire),
            verify_mismatch: self.read_floor.stopped_reason().unwrap_or_default(),
            reads_blocked: self.read_floor.blocked(applied).unwrap_or_default(),
            histories: match self.state.histories() {
                Ok(h) => h.map(|h| h.admin_list()).unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the histories for Info");
                    Vec::new()
                }
            },
            slaves: self.downstream.slave_infos(),
            sync_sessions: self.downstream.sync_sessions(),
            db_sync_streams: self.downstream.db_sync_streams(),
            link: Some(admin::LinkInfo {
                state: link.state.as_str().into(),
                master,
                session_id: link.session_id,
                received_index: received,
                last_error: link.last_error,
            }),
            full_sync: (link.state == crate::link::LinkState::WaitDbSync).then(|| {
                admin::FullSyncProgress {
                    bytes_total: s.full_sync.bytes_total.load(Ordering::Relaxed),
                    bytes_done: s.full_sync.bytes_done.load(Ordering::Relaxed),
                }
            }),
            counters: Some(admin::Counters {
                full_syncs: s.full_syncs.load(Ordering::Relaxed),
                partial_syncs: s.partial_syncs.load(Ordering::Relaxed),
                duplicates_skipped: s.duplicates_skipped.load(Ordering::Relaxed),
                stale_messages: s.stale_messages.load(Ordering::Relaxed),
                reconnects: s.reconnects.load(Ordering::Relaxed),
                reads_refused: self.read_floor.refused.load(Ordering::Relaxed),
                verify_checks: self.verify.checks.load(Ordering::Relaxed),
                verify_mismatches: self.verify.mismatches.load(Ordering::Relaxed),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

fn slave_id(cfg: &Config, dir: &Path) -> anyhow::Result<String> {
    if let Some(id) = &cfg.slave.id {
        anyhow::ensure!(
            !id.is_empty() && id.len() <= 256,
            "slave.id must be 1 to 256 bytes"
        );
        return Ok(id.clone());
    }
    let path = dir.join("SLAVE_ID");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!("slave-{:016x}", rand::random::<u64>());
    let tmp = dir.join("SLAVE_ID.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// Runs a slave on `listener` until `shutdown` is cancelled. A full sync
/// closes everything, installs the snapshot and starts again on the same port.
pub async fn run(
    listener: TcpListener,
    cfg: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Some(n) = cfg.slave.apply_workers {
        tracing::warn!(
            apply_workers = n,
            "slave.apply_workers is ignored: apply is sequential (one applier thread, master order; measured {APPLY_RATE})"
        );
    }
    let listener = listener.into_std()?;
    let status = LinkStatus::new(None);
    // Stops with `shutdown`; the node's restarts (a full sync) keep it.
    let _metrics_server =
        tern_common::metrics::start(&cfg.server, status.metrics.clone(), shutdown.clone())?;
    let reads_refused = Arc::new(AtomicU64::new(0));
    // Consistency checks: counters and the read stop outlive restarts of the node.
    let verify = Arc::new(crate::verify::VerifyStats::default());
    // Admin.SetMaster changes it; it outlives restarts of the node (a full sync).
    let master = watch::channel(cfg.slave.master.clone()).0;
    loop {
        let l = TcpListener::from_std(listener.try_clone()?)?;
        match run_once(
            l,
            &cfg,
            &status,
            &reads_refused,
            &verify,
            &master,
            &shutdown,
        )
        .await?
        {
            LinkExit::Shutdown => return Ok(()),
            LinkExit::FullSyncStaged(staged) => {
                tracing::info!(
                    snapshot_id = %staged.snapshot_id,
                    index = staged.index,
                    "restarting the node on the new snapshot"
                );
            }
            LinkExit::Restart(why) => {
                tracing::warn!(%why, "restarting the node");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

fn binlog_options(cfg: &Config) -> BinlogOptions {
    BinlogOptions {
        segment_bytes: cfg.binlog.segment_bytes,
        fsync: cfg.binlog.fsync,
    }
}

struct Opened {
    state: State,
    relay: Binlog,
    replayed_on_start: u64,
    slave_id: String,
    clean: bool,
    /// Reads are served at or above this applied index ([`crate::floor`]).
    read_floor: u64,
}

/// Starts the relay log over after the state's applied index (it is damaged, or
/// does not continue the state). Every cut of the relay log keeps two promises:
/// RocksDB durably holds what the relay log no longer has (flush first: its WAL
/// is off, and replay may have applied events only to memory), and the read
/// floor covers what the relay log had received.
fn restart_relay_after_state(
    relay: &mut Binlog,
    state: &State,
    dir: &Path,
    repl_id: Option<tern_common::position::ReplId>,
) -> anyhow::Result<u64> {
    state
        .flush()
        .context("flushing RocksDB before cutting the relay log")?;
    let floor = floor::raise(dir, repl_id, relay.last_index())?;
    relay.reset(state.applied_index() + 1, Some(state.last_seq()))?;
    Ok(floor.index)
}

/// Installs a staged full sync if one is ready, opens RocksDB and the relay log
/// (truncating a partial transaction at its tail) and replays the relay log
/// after the applied index. Raises the read floor over everything the relay
/// log held before anything of it is cut.
fn open_data_dir(cfg: &Config) -> anyhow::Result<Opened> {
    let dir = &cfg.server.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let marker = tern_common::marker::take_clean_shutdown(dir)
        .context("reading the clean-shutdown marker")?;
    if let Err(e) = tern_common::marker::reserve_clean_shutdown(dir) {
        // Not fatal: the node can run; only a clean stop on a full disk may then fail.
        tracing::warn!(error = %e, "could not set aside space for the clean-shutdown marker");
    }
    let slave_id = slave_id(cfg, dir)?;
    // Checkpoints served to this slave's own slaves do not outlive a run.
    tern_master::snapshot::remove_all(dir)
        .with_context(|| format!("removing old snapshots in {}", dir.display()))?;
    if let Some(staged) = fullsync::apply_staged(dir, binlog_options(cfg))? {
        // New data from the master: a failed consistency check no longer holds.
        crate::verify::clear_stop(dir).context("clearing the consistency-check read stop")?;
        tracing::info!(snapshot_id = %staged.snapshot_id, index = staged.index, repl_id = %staged.repl_id, "full sync installed");
    }
    let state = State::open(&dir.join("db"))
        .with_context(|| format!("opening RocksDB in {}", dir.join("db").display()))?;
    // A master started on this data later is a promotion (it starts a new history).
    state.set_role("slave")?;
    let clean = marker.matches(state.repl_id()?, state.applied_index());
    let relay_dir = dir.join("binlog");
    // Opening the relay log truncates a damaged tail, possibly below what was
    // received and served: the floor covers it first.
    let repl_id = state.repl_id()?;
    let mut read_floor = floor::raise(
        dir,
        repl_id,
        floor::relay_extent(&relay_dir)?.max(state.applied_index()),
    )?
    .index;
    let (mut relay, report) = match Binlog::open(&relay_dir, binlog_options(cfg)) {
        Err(e @ (BinlogError::Corrupt { .. } | BinlogError::Structure { .. })) => {
            // Only the master's copy matters: start the relay log over after the state.
            tracing::error!(error = %e, "relay log cannot be recovered; discarding it");
            std::fs::remove_dir_all(&relay_dir)?;
            let (mut relay, report) = Binlog::open(&relay_dir, binlog_options(cfg))?;
            read_floor = restart_relay_after_state(&mut relay, &state, dir, repl_id)?;
            (relay, report)
        }
        r => r.with_context(|| format!("opening relay log in {}", relay_dir.display()))?,
    };
    if report.truncated_bytes > 0 {
        tracing::warn!(
            bytes = report.truncated_bytes,
            events = report.truncated_events,
            last_index = report.last_index,
            "relay log tail was torn or held a partial transaction; truncated it (it will be fetched again)"
        );
    }
    let applied = state.applied_index();
    if applied > relay.last_index() || applied + 1 < relay.first_index() {
        // The relay log does not continue the state (e.g. its unsynced tail was
        // lost): what it holds is not needed; continue after the state.
        tracing::warn!(
            applied,
            relay_first = relay.first_index(),
            relay_last = relay.last_index(),
            "relay log does not continue the state; starting it after the applied index"
        );
        read_floor = restart_relay_after_state(&mut relay, &state, dir, repl_id)?;
    }
    let replayed_on_start = match tern_common::replay::replay(&relay, &state) {
        Ok(n) => n,
        Err(ReplayError::Binlog(
            e @ (BinlogError::Corrupt { .. }
            | BinlogError::BadRecord { .. }
            | BinlogError::Structure { .. }),
        )) => {
            // The master is the source of truth: a damaged relay log after the
            // applied index is dropped and fetched again; bad bytes are never applied.
            let applied = state.applied_index();
            tracing::error!(error = %e, applied, "relay log is corrupt after the applied index; discarding it from there");
            read_floor = restart_relay_after_state(&mut relay, &state, dir, repl_id)?;
            tern_common::replay::replay(&relay, &state)?
        }
        Err(e) => return Err(e.into()),
    };
    if replayed_on_start > 0 {
        tracing::info!(
            events = replayed_on_start,
            applied = state.applied_index(),
            "replayed relay log after the applied index"
        );
    }
    if state.applied_index() < read_floor {
        tracing::warn!(
            read_floor,
            applied = state.applied_index(),
            "this slave served a newer state before: reads are refused until it is back there"
        );
    }
    Ok(Opened {
        state,
        relay,
        replayed_on_start,
        slave_id,
        clean,
        read_floor,
    })
}

async fn run_once(
    listener: TcpListener,
    cfg: &Config,
    status: &Arc<LinkStatus>,
    reads_refused: &Arc<AtomicU64>,
    verify: &Arc<crate::verify::VerifyStats>,
    master: &watch::Sender<String>,
    outer: &CancellationToken,
) -> anyhow::Result<LinkExit> {
    let dir = cfg.server.data_dir.clone();
    let cfg2 = cfg.clone();
    let Opened {
        state,
        relay,
        replayed_on_start,
        slave_id,
        clean,
        read_floor,
    } = tokio::task::spawn_blocking(move || open_data_dir(&cfg2)).await??;
    // This incarnation stops on shutdown, or when the link staged a full sync.
    let shutdown = outer.child_token();
    let repl_id = state.repl_id()?;
    status.set(|s| {
        s.repl_id = repl_id;
        s.session_id = 0;
    });
    // Cascading: this slave serves Replication (Sync, DbSync) to its own
    // slaves from its relay log (byte-identical to the master's binlog, shipped
    // up to what it received) and RocksDB checkpoints, in its master's
    // histories.
    let pins = tern_master::pins::Pins::new();
    let progress = tern_master::committer::Progress::new(&relay, &state);
    progress.publish_relay(&relay);
    let snapshots = tern_master::snapshot::SnapshotManager::new(
        &dir,
        state.clone(),
        None,
        pins.clone(),
        progress.clone(),
        Duration::from_millis(cfg.sync.snapshot_idle_ms),
        Duration::from_millis(cfg.sync.snapshot_min_interval_ms),
    );
    let snapshot_gc = snapshots.spawn_gc(shutdown.clone());
    let downstream = tern_master::sync::SyncShared::new(
        // A slave that never synced has no history: its slaves are told to
        // full-sync, which it cannot serve until it has data.
        state
            .histories()?
            .unwrap_or_else(|| tern_common::history::Histories::new(ReplId(0))),
        progress.clone(),
        pins,
        snapshots.clone(),
        relay.reader(),
        cfg.sync.clone(),
        shutdown.clone(),
    );
    let _ = downstream.metrics.set(status.metrics.clone());
    let (received_tx, received_rx) = watch::channel(relay.last_index());
    let drain = CancellationToken::new();
    let (handoff, handoff_rx) = crate::applier::hand_off();
    *verify.stopped.lock().unwrap_or_else(|p| p.into_inner()) =
        crate::verify::load_stop(&dir).context("reading the consistency-check read stop")?;
    let applier = Applier::spawn(
        state.clone(),
        relay.reader(),
        received_rx.clone(),
        handoff_rx,
        status.duplicates_skipped.clone(),
        drain.clone(),
        Some(crate::verify::Verifier::new(
            state.clone(),
            &dir,
            cfg.slave.stop_reads_on_mismatch,
            verify.clone(),
        )),
    );
    let link = Link {
        cfg: cfg.clone(),
        slave_id: slave_id.clone(),
        state: state.clone(),
        relay,
        received_tx,
        handoff,
        pending: Vec::new(),
        applied: applier.applied.clone(),
        status: status.clone(),
        shutdown: shutdown.clone(),
        master: master.subscribe(),
        downstream: downstream.clone(),
    };
    // The applied index, for the checkpoints' pins.
    let mut applied_rx = applier.applied.clone();
    tokio::spawn(async move {
        while applied_rx.changed().await.is_ok() {
            let a = *applied_rx.borrow_and_update();
            progress.applied.send_replace(a);
        }
    });
    let link_shutdown = shutdown.clone();
    let link_task = tokio::spawn(async move {
        let out = link.run().await;
        // A staged full sync stops this incarnation like a shutdown does.
        link_shutdown.cancel();
        out
    });
    tracing::info!(
        listen = %listener.local_addr()?,
        %slave_id,
        master = %*master.borrow(),
        applied = state.applied_index(),
        replayed_on_start,
        clean_shutdown = clean,
        "tern-slave serving"
    );
    let read_floor = ReadFloor {
        index: read_floor,
        refused: reads_refused.clone(),
        stopped: verify.stopped.clone(),
    };
    let kv = KvService::new(state.clone(), applier.applied.clone(), None)
        .with_read_floor(read_floor.clone());
    let kv_resp = kv.clone();
    let info = Arc::new(SlaveInfo {
        verify: verify.clone(),
        downstream: downstream.clone(),
        read_floor,
        status: status.clone(),
        master: master.subscribe(),
        received: received_rx,
        applied: applier.applied.clone(),
        replayed_on_start,
        state: state.clone(),
        fsync: cfg.binlog.fsync.to_string(),
    });
    let mut serve_opts = ServeOptions::from_config(&cfg.server);
    serve_opts.secure(cfg)?;
    // The metrics endpoint outlives this incarnation (see `run`).
    let metrics = status.metrics.clone();
    serve_opts.metrics = Some(metrics.clone());
    metrics.set_source(tern_common::metrics::NodeSource {
        info: info.clone(),
        connections: Some(serve_opts.connections.clone()),
    });
    let control = Arc::new(SlaveControl {
        master: master.clone(),
        slave: cfg.slave.clone(),
    });
    let resp = tern_common::resp::start(
        &cfg.server,
        tern_common::resp::RespNode {
            kv: kv_resp,
            info: info.clone(),
            control: control.clone(),
            auth: serve_opts.auth.clone(),
            metrics: Some(metrics.clone()),
        },
        shutdown.clone(),
    )?;
    let admin = AdminService::new(state.clone(), info)
        .with_control(control)
        .with_connections(serve_opts.connections.clone())
        .with_auth(serve_opts.auth.clone());
    let mut routes = tonic::service::Routes::builder();
    routes.add_service(kv.into_server());
    routes.add_service(admin.into_server());
    routes.add_service(tern_master::sync::ReplicationService::new(downstream).into_server());
    let served =
        tern_common::server::serve(listener, routes.routes(), serve_opts, shutdown.clone()).await;
    if let Some(resp) = resp {
        let _ = resp.await;
    }
    // What Info holds (RocksDB) must be gone before the next incarnation opens it.
    metrics.clear_source();
    let _ = snapshot_gc.await;
    snapshots.remove_everything().await;
    // serve returned at most server.shutdown_timeout_ms after `shutdown`,
    // with every connection closed (cut if a client held it, e.g. a long
    // min_index read).
    shutdown.cancel();
    // The link stops first (nothing more is appended), then the applier drains
    // everything received, then relay and state are made durable (I6).
    let (mut relay, exit) = link_task.await?;
    drain.cancel();
    let applier_result = tokio::task::spawn_blocking(move || applier.join.join())
        .await?
        .map_err(|_| anyhow::anyhow!("applier thread panicked"))?;
    applier_result?;
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        relay.sync()?;
        state.flush()?;
        Ok(())
    })?;
    served?;
    if matches!(exit, LinkExit::Shutdown) {
        let position = status.snapshot().repl_id.map(|repl_id| Position {
            repl_id,
            index: state.applied_index().into(),
        });
        tern_common::marker::write_clean_shutdown(&dir, position)?;
        tracing::info!(position = ?position.map(|p| p.to_string()), "clean shutdown");
    }
    Ok(exit)
}
