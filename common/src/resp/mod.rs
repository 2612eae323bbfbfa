//! The Redis-protocol front (`server.resp_listen`): RESP2 for `redis-cli`,
//! `redis-benchmark`, Redis client libraries and proxies, over the node's
//! own write path and reads.
//!
//! - Writes go to the same [`crate::kv::Writer`] as gRPC `Kv` writes (the
//!   master's committer: group commit, binlog, semi-synchronous waits with the
//!   master's `sync.min_replicas` default); a slave answers `-READONLY`.
//! - Reads are served from the node's RocksDB like `Kv.Get`/`Scan`, behind
//!   the same read floor on a slave.
//! - **Pipelining.** A connection reads every complete command it has
//!   received; consecutive writes are all queued on the write path before
//!   their answers are awaited (so a pipeline of N writes commits in one or
//!   a few groups), and a read waits for the connection's earlier writes
//!   first, so a client always reads its own writes. Replies go out in
//!   command order, flushed when no complete command is left to run.
//! - **Limits.** Requests are decoded by [`parse::Decoder`] (bounded
//!   arguments, sizes and nesting); keys and values have gRPC's limits;
//!   at most `server.max_connections` RESP connections (more are answered
//!   `-ERR max number of clients reached` and closed); at most
//!   [`MAX_IN_FLIGHT`] writes of one connection wait at once;
//!   `server.idle_timeout_ms` closes idle connections. A malformed frame is
//!   answered with `-ERR Protocol error: ...` and the connection closed.
//! - **Shutdown.** With the node's shutdown token the listener closes and
//!   every connection answers what it has queued, then closes.
//! - `AUTH` takes the client token of `auth.token`; until then every other
//!   command (but `HELLO` with `AUTH` and `QUIT`) is `-NOAUTH`.
//!
//! Commands are in [`commands`]; INFO and ROLE in [`info`].

mod commands;
pub mod glob;
pub mod info;
pub mod parse;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::encode::extend_encode;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::kv::KvService;
use crate::server::auth::Auth;
use crate::server::{AdminControl, InfoSource};

/// The names of the commands the front serves, in lower case.
pub fn command_names() -> impl Iterator<Item = &'static str> {
    commands::COMMANDS.iter().map(|c| c.0)
}

/// Writes of one connection queued on the write path at most; a pipeline
/// deeper than this waits for the oldest answer before queuing more.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Replies buffered before they are written even though commands remain.
const FLUSH_BYTES: usize = 64 << 10;
/// SCAN cursors kept (the oldest is forgotten first: it answers
/// `-ERR invalid cursor`).
const MAX_CURSORS: usize = 4096;

/// What the RESP front serves from.
pub struct RespNode {
    /// The node's Kv service (state, writer, read floor).
    pub kv: KvService,
    pub info: Arc<dyn InfoSource>,
    pub control: Arc<dyn AdminControl>,
    pub auth: Auth,
    /// Commands are counted there (`tern_commands_total{cmd}`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// The front's bounds, from `[server]`.
struct Limits {
    /// `server.max_connections`.
    max_connections: usize,
    /// `server.idle_timeout_ms` (None: never).
    idle_timeout: Option<Duration>,
    /// `server.shutdown_timeout_ms`: how long connections may finish after
    /// the shutdown signal.
    shutdown_timeout: Duration,
}

/// Shared by the connections of one front.
struct Shared {
    node: RespNode,
    idle_timeout: Option<Duration>,
    port: u16,
    started: Instant,
    connections: Arc<Semaphore>,
    open: AtomicU64,
    total_connections: AtomicU64,
    total_commands: AtomicU64,
    next_client_id: AtomicU64,
    cursors: Mutex<Cursors>,
}

/// SCAN cursors: an integer token names the key the next call starts at.
#[derive(Default)]
struct Cursors {
    next: u64,
    keys: HashMap<u64, Bytes>,
    order: VecDeque<u64>,
}

impl Cursors {
    fn insert(&mut self, start: Bytes) -> u64 {
        self.next += 1;
        let id = self.next;
        self.keys.insert(id, start);
        self.order.push_back(id);
        if self.order.len() > MAX_CURSORS
            && let Some(old) = self.order.pop_front()
        {
            self.keys.remove(&old);
        }
        id
    }

    fn get(&self, id: u64) -> Option<Bytes> {
        self.keys.get(&id).cloned()
    }
}

/// Binds `server.resp_listen` (when set) and serves the RESP front there
/// until `shutdown`; the returned task ends once every RESP connection is
/// closed (at most `server.shutdown_timeout_ms` after `shutdown`), and so
/// has dropped its handle on the write path.
pub fn start(
    cfg: &crate::config::ServerConfig,
    node: RespNode,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some((listener, addr)) = crate::server::bind_optional(
        "server.resp_listen",
        cfg.resp_listen.as_deref(),
        "the RESP front",
    )?
    else {
        return Ok(None);
    };
    tracing::info!(resp_listen = %addr, "RESP (Redis protocol) front listening");
    let limits = Limits {
        max_connections: cfg.max_connections,
        idle_timeout: cfg.idle_timeout(),
        shutdown_timeout: cfg.shutdown_timeout(),
    };
    Ok(Some(tokio::spawn(serve(listener, node, limits, shutdown))))
}

/// Serves the RESP front on `listener` until `shutdown`, then lets open
/// connections finish what they queued for at most
/// `limits.shutdown_timeout` and closes them.
async fn serve(listener: TcpListener, node: RespNode, limits: Limits, shutdown: CancellationToken) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let shared = Arc::new(Shared {
        connections: Arc::new(Semaphore::new(limits.max_connections.max(1))),
        idle_timeout: limits.idle_timeout,
        node,
        port,
        started: Instant::now(),
        open: AtomicU64::new(0),
        total_connections: AtomicU64::new(0),
        total_commands: AtomicU64::new(0),
        next_client_id: AtomicU64::new(1),
        cursors: Mutex::new(Cursors::default()),
    });
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    tracing::warn!(error = %e, "RESP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        while tasks.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
                let mut stream = stream;
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                return;
            };
            shared.open.fetch_add(1, Ordering::Relaxed);
            shared.total_connections.fetch_add(1, Ordering::Relaxed);
            let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = Connection::new(&shared, id, peer)
                .run(stream, &shutdown)
                .await
            {
                tracing::debug!(%peer, error = %e, "RESP connection ended");
            }
            shared.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "RESP connections still open after server.shutdown_timeout_ms: closing them"
        );
        tasks.shutdown().await;
    }
}

/// A reply, or a write whose reply comes once it commits.
enum Queued {
    Ready(BytesFrame),
    Write(commands::PendingReply),
}

/// One client connection.
struct Connection<'a> {
    shared: &'a Shared,
    id: u64,
    peer: SocketAddr,
    authed: bool,
    name: Option<Bytes>,
    /// Commands queued by MULTI (None: not in a transaction).
    multi: Option<Vec<Vec<Bytes>>>,
    /// A command of the MULTI block was refused: EXEC aborts.
    multi_failed: bool,
    /// Replies in command order, writes not answered yet among them.
    queue: VecDeque<Queued>,
    /// Encoded replies not yet written.
    out: BytesMut,
    /// QUIT was received: close once replies are written.
    closing: bool,
    /// The command being run is the last one received so far (nothing
    /// follows it in the input buffer).
    last_received: bool,
    /// This connection as a source of writes.
    writer: crate::kv::WriterId,
}

impl<'a> Connection<'a> {
    fn new(shared: &'a Shared, id: u64, peer: SocketAddr) -> Connection<'a> {
        Connection {
            shared,
            id,
            peer,
            authed: !shared.node.auth.client_token_required(),
            name: None,
            multi: None,
            multi_failed: false,
            queue: VecDeque::new(),
            out: BytesMut::new(),
            closing: false,
            last_received: false,
            writer: crate::kv::new_writer_id(),
        }
    }

    async fn run(
        mut self,
        mut stream: TcpStream,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        let mut input = BytesMut::with_capacity(16 << 10);
        let mut decoder = parse::Decoder::default();
        let idle = self.shared.idle_timeout;
        loop {
            // Run every complete command received.
            loop {
                match decoder.next_command(&mut input) {
                    Ok(Some(args)) => {
                        if !args.is_empty() {
                            self.shared.total_commands.fetch_add(1, Ordering::Relaxed);
                            if let Some(m) = &self.shared.node.metrics {
                                m.resp_command(&args[0]);
                            }
                            self.last_received = input.is_empty();
                            self.command(args).await;
                        }
                        if self.out.len() >= FLUSH_BYTES {
                            stream.write_all(&self.out).await?;
                            self.out.clear();
                        }
                        if self.closing {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.settle_all().await;
                        push(&mut self.out, &BytesFrame::Error(format!("ERR {e}").into()));
                        stream.write_all(&self.out).await?;
                        return Ok(());
                    }
                }
            }
            self.settle_all().await;
            if !self.out.is_empty() {
                stream.write_all(&self.out).await?;
                self.out.clear();
            }
            if self.closing {
                return Ok(());
            }
            if input.capacity() - input.len() < 4096 {
                input.reserve(16 << 10);
            }
            let read = async {
                match idle {
                    Some(t) => tokio::time::timeout(t, stream.read_buf(&mut input)).await,
                    None => Ok(stream.read_buf(&mut input).await),
                }
            };
            let n = tokio::select! {
                r = read => match r {
                    Ok(r) => r?,
                    Err(_) => return Ok(()), // idle
                },
                _ = shutdown.cancelled() => return Ok(()),
            };
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// Answers queued writes in order until at most `keep` wait.
    async fn settle(&mut self, keep: usize) {
        while self.queue.len() > keep {
            let reply = match self.queue.pop_front() {
                Some(Queued::Ready(f)) => f,
                Some(Queued::Write(p)) => p.await,
                None => break,
            };
            push(&mut self.out, &reply);
        }
    }

    async fn settle_all(&mut self) {
        self.settle(0).await;
    }

    fn reply(&mut self, frame: BytesFrame) {
        if self.queue.is_empty() {
            push(&mut self.out, &frame);
        } else {
            self.queue.push_back(Queued::Ready(frame));
        }
    }
}

/// Encodes a reply (error texts lose any CR/LF: they end the line).
fn push(out: &mut BytesMut, frame: &BytesFrame) {
    let clean;
    let frame = match frame {
        BytesFrame::Error(e) if e.contains(['\r', '\n']) => {
            clean = BytesFrame::Error(e.replace(['\r', '\n'], " ").into());
            &clean
        }
        f => f,
    };
    if let Err(e) = extend_encode(out, frame, false) {
        tracing::error!(error = %e, "encoding a RESP reply");
        let _ = extend_encode(
            out,
            &BytesFrame::Error("ERR internal encoding error".into()),
            false,
        );
    }
}
