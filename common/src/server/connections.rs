//! Client connections of the gRPC port: how many, for how long, and how they
//! are cut at the end of a shutdown.
//!
//! - **Limit.** The accept loop takes a slot before it accepts: with every
//!   slot taken it stops accepting, and new clients wait in the listen backlog
//!   until a connection closes, instead of being accepted and starving the node
//!   of file descriptors.
//! - **Accept errors** (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, ...) are
//!   retried after a delay that grows to [`MAX_ACCEPT_BACKOFF`]; they are
//!   logged at most once a second. The loop never spins.
//! - **Idle connections.** [`TrackStreamsLayer`] counts the requests and
//!   streams open on each connection (a stream counts until its response body
//!   is finished or dropped); a connection with none for `server.idle_timeout_ms`
//!   reads end-of-file, so hyper closes it. Nothing is in flight on it, so no
//!   request is cut.
//! - **Shutdown.** Once the shutdown token is cancelled, a connection with
//!   nothing in flight for [`SHUTDOWN_IDLE`] is closed the same way.
//! - **Hard stop.** Each connection's I/O fails once the server's stop token is
//!   cancelled: hyper then ends the connection and every stream on it, even a
//!   stream whose client stopped reading (which a graceful HTTP/2 shutdown
//!   would wait for forever, its data stuck behind flow control).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::StreamExt;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming, TlsConnectInfo};

/// First delay after a failed accept; it doubles up to [`MAX_ACCEPT_BACKOFF`].
pub const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// Longest delay between two accepts after failures.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// TCP keepalive probes after the first one (`TCP_KEEPINTVL`, `TCP_KEEPCNT`):
/// a vanished peer is noticed within `tcp_keepalive` + 30 s.
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Once the server shuts down, a connection with nothing in flight for this
/// long is closed (its last answers had that long to be flushed): idle clients
/// and clients that never finished the HTTP/2 handshake do not hold a stop up.
pub const SHUTDOWN_IDLE: Duration = Duration::from_millis(500);
/// Warnings about the connection limit or failing accepts: at most one per this.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Counters of one server's connections (the current count is `Info.connections`).
#[derive(Debug, Default)]
pub struct ConnectionStats {
    open: AtomicU64,
    accepted: AtomicU64,
    /// Times the accept loop found every slot taken and waited for one.
    limited: AtomicU64,
    idle_closed: AtomicU64,
    /// Connections cut by the hard stop at the end of a shutdown.
    aborted: AtomicU64,
    accept_errors: AtomicU64,
}

impl ConnectionStats {
    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }

    pub fn idle_closed(&self) -> u64 {
        self.idle_closed.load(Ordering::Relaxed)
    }

    pub fn aborted(&self) -> u64 {
        self.aborted.load(Ordering::Relaxed)
    }

    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(Ordering::Relaxed)
    }
}

/// Requests and streams in flight on one connection, and since when it has
/// had none.
#[derive(Debug)]
struct Activity {
    /// (streams in flight, when that count last changed)
    inner: Mutex<(usize, Instant)>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            inner: Mutex::new((0, Instant::now())),
        }
    }

    fn started(self: &Arc<Self>) -> StreamGuard {
        let mut a = self.inner.lock().expect("activity");
        *a = (a.0 + 1, Instant::now());
        StreamGuard(self.clone())
    }

    /// When the connection becomes idle for `timeout`, or `None` while a
    /// stream is in flight.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        let a = self.inner.lock().expect("activity");
        (a.0 == 0).then(|| a.1 + timeout)
    }
}

/// One request or stream in flight; dropped when its response is finished.
struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut a = self.0.inner.lock().expect("activity");
        *a = (a.0.saturating_sub(1), Instant::now());
    }
}

/// What a request learns about its connection (a request extension).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    tcp: TcpConnectInfo,
    activity: Arc<Activity>,
}

enum Closing {
    Open,
    Idle,
    Aborted,
}

struct IdleTimer {
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
}

/// An accepted connection: holds its slot, closes itself when idle, fails
/// once the server's stop token is cancelled.
pub struct Conn {
    stream: TcpStream,
    info: ConnInfo,
    idle: Option<IdleTimer>,
    /// `None` once the server shuts down (then `idle` is [`SHUTDOWN_IDLE`]).
    shutdown: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    closing: Closing,
    stats: Arc<ConnectionStats>,
    _slot: OwnedSemaphorePermit,
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the server stopped serving this connection",
    )
}

impl Conn {
    fn new(
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        idle_timeout: Option<Duration>,
        shutdown: &CancellationToken,
        stop: &CancellationToken,
        stats: Arc<ConnectionStats>,
    ) -> Conn {
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let tcp = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: stream.peer_addr().ok(),
        };
        Conn {
            stream,
            info: ConnInfo {
                tcp,
                activity: Arc::new(Activity::new()),
            },
            idle: idle_timeout.map(|timeout| IdleTimer {
                timeout,
                timer: Box::pin(tokio::time::sleep(timeout)),
            }),
            shutdown: Some(Box::pin(shutdown.clone().cancelled_owned())),
            stop: Box::pin(stop.clone().cancelled_owned()),
            closing: Closing::Open,
            stats,
            _slot: slot,
        }
    }

    /// `Some` when the connection must not be read any more: end-of-file
    /// (idle) or an error (hard stop). Registers the waker for all three
    /// (idle timer, shutdown, hard stop).
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Option<io::Result<()>> {
        match self.closing {
            Closing::Idle => return Some(Ok(())),
            Closing::Aborted => return Some(Err(aborted())),
            Closing::Open => {}
        }
        if self.stop.as_mut().poll(cx).is_ready() {
            self.closing = Closing::Aborted;
            self.stats.aborted.fetch_add(1, Ordering::Relaxed);
            return Some(Err(aborted()));
        }
        if let Some(shutdown) = &mut self.shutdown
            && shutdown.as_mut().poll(cx).is_ready()
        {
            self.shutdown = None;
            let timeout = self
                .idle
                .as_ref()
                .map_or(SHUTDOWN_IDLE, |i| i.timeout.min(SHUTDOWN_IDLE));
            self.idle = Some(IdleTimer {
                timeout,
                timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            });
        }
        let idle = self.idle.as_mut()?;
        while idle.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.info.activity.idle_deadline(idle.timeout) {
                Some(deadline) if deadline <= now => {
                    tracing::debug!(remote = ?self.info.tcp.remote_addr, "closing an idle connection");
                    self.closing = Closing::Idle;
                    self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                    return Some(Ok(()));
                }
                Some(deadline) => idle.timer.as_mut().reset(deadline),
                // Busy: look again a whole timeout later (it ends no earlier).
                None => idle.timer.as_mut().reset(now + idle.timeout),
            }
        }
        None
    }

    fn check_write(&self) -> io::Result<()> {
        match self.closing {
            Closing::Aborted => Err(aborted()),
            _ => Ok(()),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(r) = this.poll_closed(cx) {
            return Poll::Ready(r);
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_write()?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_write()?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_write()?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Counts each request's stream on its connection (for the idle timeout),
/// gives handlers the usual [`TcpConnectInfo`] (so `Request::remote_addr`
/// works), and ends every response stream that is waiting for its next
/// message once `shutdown` is cancelled (see [`GuardedBody`]).
#[derive(Clone, Debug)]
pub struct TrackStreamsLayer {
    pub shutdown: CancellationToken,
}

impl<S> tower::Layer<S> for TrackStreamsLayer {
    type Service = TrackStreams<S>;

    fn layer(&self, inner: S) -> TrackStreams<S> {
        TrackStreams {
            inner,
            shutdown: self.shutdown.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrackStreams<S> {
    inner: S,
    shutdown: CancellationToken,
}

use super::BoxFuture;

impl<S> tower::Service<http::Request<Body>> for TrackStreams<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // Over TLS (`server.tls_cert`), tonic wraps the connection's info.
        let conn = req.extensions().get::<ConnInfo>().cloned().or_else(|| {
            req.extensions()
                .get::<TlsConnectInfo<ConnInfo>>()
                .map(|t| t.get_ref().clone())
        });
        let guard = conn.map(|c| {
            req.extensions_mut().insert(c.tcp);
            c.activity.started()
        });
        let fut = self.inner.call(req);
        let shutdown = self.shutdown.clone();
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| {
                Body::new(GuardedBody {
                    inner,
                    _guard: guard,
                    shutdown: Shutdown::Token(shutdown),
                })
            }))
        })
    }
}

/// Where a response body stands with the server's shutdown.
enum Shutdown {
    /// Not waited on yet (a unary answer never is: its body is ready at once).
    Token(CancellationToken),
    Waiting(Pin<Box<WaitForCancellationFutureOwned>>),
    /// The body was ended by the shutdown.
    Ended,
}

/// A response body that keeps its stream counted until it is finished or
/// dropped. A body waiting for its next message when the server shuts down
/// (an idle `Sync` stream, a health `Watch`, a reflection stream) ends at
/// once, between two messages, with UNAVAILABLE; what is ready is still sent.
struct GuardedBody {
    inner: Body,
    _guard: Option<StreamGuard>,
    shutdown: Shutdown,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if let Shutdown::Ended = this.shutdown {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if let Shutdown::Token(t) = &this.shutdown {
            this.shutdown = Shutdown::Waiting(Box::pin(t.clone().cancelled_owned()));
        }
        if let Shutdown::Waiting(w) = &mut this.shutdown
            && w.as_mut().poll(cx).is_ready()
        {
            this.shutdown = Shutdown::Ended;
            let mut trailers = http::HeaderMap::new();
            let added = tonic::Status::unavailable("the node is shutting down")
                .add_header(&mut trailers)
                .map(|()| http_body::Frame::trailers(trailers));
            return Poll::Ready(Some(added));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.shutdown, Shutdown::Ended) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Once per [`LOG_INTERVAL`] at most; counts what it held back.
pub(crate) struct RateLimited {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub(crate) fn new() -> RateLimited {
        RateLimited {
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last time)` when a message may be logged now.
    pub(crate) fn check(&mut self) -> Option<u64> {
        if self.last.is_some_and(|l| l.elapsed() < LOG_INTERVAL) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The delay before the next accept after `failures` failed ones in a row.
pub fn accept_backoff(failures: u32) -> Duration {
    MIN_ACCEPT_BACKOFF
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_ACCEPT_BACKOFF)
}

/// An accept error that concerns one connection only (it is gone): accept the next at once.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// How the accept loop runs.
pub struct AcceptOptions {
    pub max_connections: usize,
    pub idle_timeout: Option<Duration>,
    pub tcp_keepalive: Duration,
    pub stats: Arc<ConnectionStats>,
    /// Stop accepting (the shutdown token).
    pub shutdown: CancellationToken,
    /// Cut every accepted connection (the hard stop).
    pub stop: CancellationToken,
}

/// Starts the accept loop on `incoming`; returns the stream of accepted
/// connections for tonic and the loop's task. The loop ends (and drops the
/// listener) on shutdown or when the stream is dropped.
pub fn spawn_acceptor(
    incoming: TcpIncoming,
    opts: AcceptOptions,
) -> (
    impl tokio_stream::Stream<Item = Result<Conn, Infallible>>,
    tokio::task::JoinHandle<()>,
) {
    let incoming = incoming
        .with_nodelay(Some(true))
        .with_keepalive(Some(opts.tcp_keepalive))
        .with_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
        .with_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));
    let (tx, rx) = mpsc::channel(1);
    let task = tokio::spawn(accept_loop(incoming, opts, tx));
    (
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok),
        task,
    )
}

async fn accept_loop(mut incoming: TcpIncoming, opts: AcceptOptions, tx: mpsc::Sender<Conn>) {
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let mut limit_log = RateLimited::new();
    let mut error_log = RateLimited::new();
    let mut failures = 0u32;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                opts.stats.limited.fetch_add(1, Ordering::Relaxed);
                if let Some(held_back) = limit_log.check() {
                    tracing::warn!(
                        max_connections = opts.max_connections,
                        held_back,
                        "connection limit reached (server.max_connections, open-file limit): \
                         new clients wait in the listen backlog until a connection closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    _ = opts.shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                }
            }
        };
        let accepted = tokio::select! {
            a = incoming.next() => a,
            _ = opts.shutdown.cancelled() => return,
            _ = tx.closed() => return,
        };
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                opts.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if per_connection(&e) {
                    tracing::debug!(error = %e, "accept: the connection went away");
                    continue;
                }
                failures += 1;
                let delay = accept_backoff(failures);
                if let Some(held_back) = error_log.check() {
                    tracing::warn!(
                        error = %e,
                        failures,
                        held_back,
                        retry_in_ms = delay.as_millis() as u64,
                        open = opts.stats.open(),
                        "accepting a connection failed; backing off"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = opts.shutdown.cancelled() => return,
                }
                continue;
            }
        };
        failures = 0;
        let conn = Conn::new(
            stream,
            slot,
            opts.idle_timeout,
            &opts.shutdown,
            &opts.stop,
            opts.stats.clone(),
        );
        if tx.send(conn).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let delays: Vec<u64> = (1..=10)
            .map(|n| accept_backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(accept_backoff(u32::MAX), MAX_ACCEPT_BACKOFF);
        assert_eq!(accept_backoff(0), MIN_ACCEPT_BACKOFF);
    }

    #[test]
    fn rate_limited_logs_once_per_interval() {
        let mut r = RateLimited::new();
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        r.last = Some(std::time::Instant::now() - LOG_INTERVAL);
        assert_eq!(r.check(), Some(2));
    }

    #[test]
    fn resource_errors_back_off_and_lost_connections_do_not() {
        assert!(per_connection(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        assert!(!per_connection(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!per_connection(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!per_connection(&io::Error::from_raw_os_error(
            libc::ENOBUFS
        )));
        assert!(!per_connection(&io::Error::from_raw_os_error(libc::ENOMEM)));
    }
}
