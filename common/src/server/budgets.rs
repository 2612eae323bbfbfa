//! Concurrency budgets of the gRPC port: one per service, so that one
//! service's traffic can never starve another's.
//!
//! - `tern.kv.v1.Kv`: `server.max_concurrent_requests` requests run at once;
//!   as many more wait for a slot (bounded by the request timeout); beyond
//!   that a request is shed at once with RESOURCE_EXHAUSTED.
//! - `tern.admin.v1.Admin` and `tern.replication.v1.Replication`: their own
//!   small budgets ([`ADMIN_CONCURRENT_REQUESTS`],
//!   [`REPLICATION_CONCURRENT_REQUESTS`]), same rules; Kv traffic cannot take
//!   them.
//! - Health and reflection: no budget (cheap, and must answer under load).
//!
//! A Kv read that waits for `min_index` ([`Slot::park`]) gives its slot back
//! while it waits: parked reads never hold a slot that a write, or a read
//! that can be served now, needs. Their own number is bounded (as many as the
//! Kv budget); a read that would park beyond it is refused with
//! RESOURCE_EXHAUSTED. Once woken it takes a slot again for the read itself.
//!
//! A slot is held until the handler returns its response (for a stream: until
//! the stream starts). Every request's extensions carry the server's
//! [`RequestStats`] (`Info.requests_in_flight`, `Info.counters.requests_shed`)
//! and, under a budget, its [`Slot`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;

/// Admin requests (Info, Checksum) running at once.
pub const ADMIN_CONCURRENT_REQUESTS: usize = 32;
/// Replication requests (Sync, DbSync) whose handlers run at once.
pub const REPLICATION_CONCURRENT_REQUESTS: usize = 64;
/// HTTP/2 streams one client connection may have open at once (the SETTINGS
/// the server advertises; a client queues the rest on its side).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

const KV_PREFIX: &str = "/tern.kv.v1.Kv/";
const ADMIN_PREFIX: &str = "/tern.admin.v1.Admin/";
const REPLICATION_PREFIX: &str = "/tern.replication.v1.Replication/";

/// Counters of one server's budgets.
#[derive(Debug, Default)]
pub struct RequestStats {
    in_flight: AtomicU64,
    shed: AtomicU64,
    parked: AtomicU64,
}

impl RequestStats {
    /// Requests holding a slot of a budget now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests refused with RESOURCE_EXHAUSTED because their budget (or the
    /// bound on parked reads) was full.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// Kv reads waiting for `min_index` now (they hold no slot).
    pub fn parked(&self) -> u64 {
        self.parked.load(Ordering::Relaxed)
    }
}

/// One service's budget.
#[derive(Debug)]
pub struct Budget {
    service: &'static str,
    slots: Arc<Semaphore>,
    size: usize,
    /// Requests waiting for a slot now, at most `size`.
    waiting: AtomicUsize,
    /// Reads parked for `min_index`, out of `slots`.
    parked: Arc<Semaphore>,
    stats: Arc<RequestStats>,
}

/// A slot a request holds; counted in [`RequestStats::in_flight`].
#[derive(Debug)]
struct Held {
    _permit: OwnedSemaphorePermit,
    stats: Arc<RequestStats>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Budget {
    fn new(service: &'static str, size: usize, stats: Arc<RequestStats>) -> Arc<Budget> {
        let size = size.max(1);
        Arc::new(Budget {
            service,
            slots: Arc::new(Semaphore::new(size)),
            size,
            waiting: AtomicUsize::new(0),
            parked: Arc::new(Semaphore::new(size)),
            stats,
        })
    }

    fn held(&self, permit: OwnedSemaphorePermit) -> Held {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Held {
            _permit: permit,
            stats: self.stats.clone(),
        }
    }

    fn shed(&self, why: String) -> Status {
        self.stats.shed.fetch_add(1, Ordering::Relaxed);
        Status::resource_exhausted(why)
    }

    /// A slot now, or after waiting behind at most `size` others; else
    /// RESOURCE_EXHAUSTED.
    async fn admit(&self) -> Result<Held, Status> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(self.held(p));
        }
        let waiting = Waiting::enter(&self.waiting);
        if waiting.ahead >= self.size {
            return Err(self.shed(format!(
                "{} has {} requests running and {} waiting, its limit; retry later",
                self.service, self.size, waiting.ahead
            )));
        }
        self.slot().await
    }

    /// A slot, however long it takes (a request already admitted).
    async fn slot(&self) -> Result<Held, Status> {
        let p = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the server is stopping"))?;
        Ok(self.held(p))
    }
}

/// Counts one waiter while it lives.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    /// Waiters before this one.
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Waiting<'a> {
        let ahead = count.fetch_add(1, Ordering::Relaxed);
        Waiting { count, ahead }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A parked read, counted in [`RequestStats::parked`] while it lives (also
/// when its request is cancelled while it waits).
struct Parked<'a> {
    _permit: OwnedSemaphorePermit,
    stats: &'a RequestStats,
}

impl<'a> Parked<'a> {
    fn new(permit: OwnedSemaphorePermit, stats: &'a RequestStats) -> Parked<'a> {
        stats.parked.fetch_add(1, Ordering::Relaxed);
        Parked {
            _permit: permit,
            stats,
        }
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.stats.parked.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The slot of one request, in its extensions (as `Arc<Slot>`).
#[derive(Debug)]
pub struct Slot {
    budget: Arc<Budget>,
    held: Mutex<Option<Held>>,
}

impl Slot {
    /// Runs `wait` (a read waiting for `min_index`) without holding the slot,
    /// then takes a slot again. RESOURCE_EXHAUSTED (and `wait` is not run)
    /// when as many reads as the budget's size are parked already.
    pub async fn park<F: Future>(&self, wait: F) -> Result<F::Output, Status> {
        let Ok(parked) = self.budget.parked.clone().try_acquire_owned() else {
            return Err(self.budget.shed(format!(
                "{} reads are already waiting for min_index on this node, its limit; retry later",
                self.budget.size
            )));
        };
        let parked = Parked::new(parked, &self.budget.stats);
        drop(self.held.lock().expect("slot").take());
        let out = wait.await;
        drop(parked);
        let held = self.budget.slot().await?;
        *self.held.lock().expect("slot") = Some(held);
        Ok(out)
    }

    fn release(&self) {
        drop(self.held.lock().expect("slot").take());
    }
}

/// The budgets of one server; see the module docs.
#[derive(Clone, Debug)]
pub struct BudgetsLayer {
    kv: Arc<Budget>,
    admin: Arc<Budget>,
    replication: Arc<Budget>,
    stats: Arc<RequestStats>,
}

impl BudgetsLayer {
    /// `kv_requests`: `server.max_concurrent_requests`.
    pub fn new(kv_requests: usize) -> BudgetsLayer {
        let stats = Arc::new(RequestStats::default());
        BudgetsLayer {
            kv: Budget::new("tern.kv.v1.Kv", kv_requests, stats.clone()),
            admin: Budget::new(
                "tern.admin.v1.Admin",
                ADMIN_CONCURRENT_REQUESTS,
                stats.clone(),
            ),
            replication: Budget::new(
                "tern.replication.v1.Replication",
                REPLICATION_CONCURRENT_REQUESTS,
                stats.clone(),
            ),
            stats,
        }
    }

    pub fn stats(&self) -> Arc<RequestStats> {
        self.stats.clone()
    }

    fn budget(&self, path: &str) -> Option<&Arc<Budget>> {
        if path.starts_with(KV_PREFIX) {
            Some(&self.kv)
        } else if path.starts_with(ADMIN_PREFIX) {
            Some(&self.admin)
        } else if path.starts_with(REPLICATION_PREFIX) {
            Some(&self.replication)
        } else {
            None
        }
    }
}

impl<S> tower::Layer<S> for BudgetsLayer {
    type Service = Budgets<S>;

    fn layer(&self, inner: S) -> Budgets<S> {
        Budgets {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Budgets<S> {
    inner: S,
    layer: BudgetsLayer,
}

use super::BoxFuture;

impl<S> tower::Service<http::Request<Body>> for Budgets<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
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
        req.extensions_mut().insert(self.layer.stats.clone());
        let Some(budget) = self.layer.budget(req.uri().path()).cloned() else {
            return Box::pin(self.inner.call(req));
        };
        // The service made ready by `poll_ready` goes with this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let held = match budget.admit().await {
                Ok(h) => h,
                Err(status) => return Ok(status.into_http()),
            };
            let slot = Arc::new(Slot {
                budget,
                held: Mutex::new(Some(held)),
            });
            req.extensions_mut().insert(slot.clone());
            let resp = inner.call(req).await;
            slot.release();
            resp
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_budgets_shed_and_parked_reads_give_their_slot_back() {
        let stats = Arc::new(RequestStats::default());
        let budget = Budget::new("svc", 2, stats.clone());
        let a = budget.admit().await.unwrap();
        let b = budget.admit().await.unwrap();
        assert_eq!(stats.in_flight(), 2);
        // Two may wait; the third is shed.
        let w1 = tokio::spawn({
            let budget = budget.clone();
            async move { budget.admit().await.map(drop) }
        });
        let w2 = tokio::spawn({
            let budget = budget.clone();
            async move { budget.admit().await.map(drop) }
        });
        while budget.waiting.load(Ordering::Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
        let shed = budget.admit().await.unwrap_err();
        assert_eq!(shed.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            shed.message(),
            "svc has 2 requests running and 2 waiting, its limit; retry later"
        );
        assert_eq!(stats.shed(), 1);
        drop((a, b));
        w1.await.unwrap().unwrap();
        w2.await.unwrap().unwrap();
        assert_eq!(stats.in_flight(), 0);

        // A parked read holds no slot; the bound on parked reads sheds.
        let slots: Vec<Arc<Slot>> = admitted(&budget, 2).await;
        assert_eq!(stats.in_flight(), 2);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let parked: Vec<_> = slots
            .iter()
            .map(|s| {
                let s = s.clone();
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    s.park(async move { rx.wait_for(|v| *v).await.is_ok() })
                        .await
                })
            })
            .collect();
        while stats.parked() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(stats.in_flight(), 0);
        let other = budget.admit().await.unwrap();
        assert_eq!(stats.in_flight(), 1);
        let third = Slot {
            budget: budget.clone(),
            held: Mutex::new(None),
        };
        let refused = third.park(async {}).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(stats.shed(), 2);
        drop(other);
        tx.send_replace(true);
        for p in parked {
            assert!(p.await.unwrap().unwrap());
        }
        assert_eq!((stats.in_flight(), stats.parked()), (2, 0));
        for s in &slots {
            s.release();
        }
        assert_eq!(stats.in_flight(), 0);
    }

    async fn admitted(budget: &Arc<Budget>, n: usize) -> Vec<Arc<Slot>> {
        let mut slots = Vec::new();
        for _ in 0..n {
            let held = budget.admit().await.unwrap();
            slots.push(Arc::new(Slot {
                budget: budget.clone(),
                held: Mutex::new(Some(held)),
            }));
        }
        slots
    }
}
