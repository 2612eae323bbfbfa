//! A fault-injecting TCP proxy between a slave and its master, controlled from
//! the test: point the slave's `--master` at [`Proxy::url`].
//!
//! Faults: [`Proxy::drop_all`] (close every live connection), [`Proxy::blackhole`]
//! (for a while nothing passes in either direction, but no connection is
//! closed: the link has to time out), [`Proxy::set_latency`],
//! [`Proxy::set_bandwidth`] (bytes per second, per direction and connection),
//! and [`Proxy::cut_after`] (forward N more bytes from the master to the slave,
//! then close that connection: mid-batch, mid-transaction or mid-DbSync).
//!
//! Bytes held back by a blackhole are delivered when it ends, unless a peer
//! gave up on the connection meanwhile (as TCP would after a partition heals).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Debug, Default)]
struct Ctl {
    blackhole_until: Option<Instant>,
    latency: Duration,
    /// Bytes per second, per direction and connection.
    bandwidth: Option<u64>,
    /// Bytes master -> slave still forwarded before the connection is cut.
    cut_after: Option<u64>,
}

/// Counters of a proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub bytes_to_slave: AtomicU64,
    pub bytes_to_master: AtomicU64,
    pub drops: AtomicU64,
    pub cuts: AtomicU64,
}

struct Shared {
    target: String,
    ctl: Mutex<Ctl>,
    /// Bumped by `drop_all`: every connection open at that moment closes.
    generation: watch::Sender<u64>,
    stats: ProxyStats,
}

pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to
    /// `target` (`host:port`). Must be called inside a tokio runtime.
    pub async fn start(target: &str) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let port = listener.local_addr()?.port();
        let (generation, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            target: target.to_string(),
            ctl: Mutex::new(Ctl::default()),
            generation,
            stats: ProxyStats::default(),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(&s.target).await else {
                        return; // dropping `client` closes it, as a refused connect would
                    };
                    s.stats.connections.fetch_add(1, Ordering::Relaxed);
                    serve(s, client, upstream).await;
                });
            }
        });
        Ok(Proxy {
            port,
            shared,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`, for a slave's `--master`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    fn ctl(&self) -> std::sync::MutexGuard<'_, Ctl> {
        self.shared.ctl.lock().unwrap()
    }

    /// Closes every connection open now (new ones are accepted as usual).
    pub fn drop_all(&self) {
        self.shared.stats.drops.fetch_add(1, Ordering::Relaxed);
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Nothing passes for `d` (in either direction, on every connection, new
    /// ones included); nothing is closed either.
    pub fn blackhole(&self, d: Duration) {
        self.ctl().blackhole_until = Some(Instant::now() + d);
    }

    /// Delay added before every chunk forwarded (zero: none).
    pub fn set_latency(&self, d: Duration) {
        self.ctl().latency = d;
    }

    /// Caps each direction of each connection at `bytes_per_sec` (None: no cap).
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.ctl().bandwidth = bytes_per_sec;
    }

    /// Forwards `n` more bytes from the master to the slave, then closes the
    /// connection that carried the last of them.
    pub fn cut_after(&self, n: u64) {
        self.ctl().cut_after = Some(n);
    }

    /// True while a `cut_after` has not happened yet.
    pub fn cut_pending(&self) -> bool {
        self.ctl().cut_after.is_some()
    }

    /// Ends every fault (a pending cut included); live connections stay.
    pub fn heal(&self) {
        *self.ctl() = Ctl::default();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

async fn serve(s: Arc<Shared>, client: TcpStream, upstream: TcpStream) {
    client.set_nodelay(true).ok();
    upstream.set_nodelay(true).ok();
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let (close_tx, close_rx) = watch::channel(false);
    let close_tx = Arc::new(close_tx);
    let up = tokio::spawn(pump(
        s.clone(),
        cr,
        uw,
        false,
        close_tx.clone(),
        close_rx.clone(),
    ));
    let down = tokio::spawn(pump(s, ur, cw, true, close_tx, close_rx));
    up.await.ok();
    down.await.ok();
}

/// Copies `from` to `to` under the faults of `s`; ends (closing both
/// directions of the connection) on EOF, error, `drop_all` or a cut.
async fn pump(
    s: Arc<Shared>,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    to_slave: bool,
    close_tx: Arc<watch::Sender<bool>>,
    mut close_rx: watch::Receiver<bool>,
) {
    let mut gen_rx = s.generation.subscribe();
    gen_rx.mark_unchanged();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = gen_rx.changed() => break,
            _ = close_rx.changed() => break,
        };
        // Blackhole: hold the bytes until it ends (or the connection dies).
        loop {
            let until = s.ctl.lock().unwrap().blackhole_until;
            let Some(until) = until.filter(|u| *u > Instant::now()) else {
                break;
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = gen_rx.changed() => { close_tx.send_replace(true); return; }
                _ = close_rx.changed() => return,
            }
        }
        let (latency, bandwidth, cut) = {
            let mut c = s.ctl.lock().unwrap();
            let mut cut = None;
            if to_slave && let Some(rem) = c.cut_after {
                if (n as u64) >= rem {
                    c.cut_after = None;
                    cut = Some(rem as usize);
                } else {
                    c.cut_after = Some(rem - n as u64);
                }
            }
            (c.latency, c.bandwidth, cut)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let len = cut.unwrap_or(n);
        if to.write_all(&buf[..len]).await.is_err() {
            break;
        }
        let counter = if to_slave {
            &s.stats.bytes_to_slave
        } else {
            &s.stats.bytes_to_master
        };
        counter.fetch_add(len as u64, Ordering::Relaxed);
        if cut.is_some() {
            s.stats.cuts.fetch_add(1, Ordering::Relaxed);
            to.flush().await.ok();
            break;
        }
        if let Some(bw) = bandwidth.filter(|b| *b > 0) {
            tokio::time::sleep(Duration::from_secs_f64(len as f64 / bw as f64)).await;
        }
    }
    close_tx.send_replace(true);
}
