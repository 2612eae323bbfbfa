//! Semi-synchronous replication on the master: how long a write waits for
//! slaves ([`SemiSync`]) and `Admin.Wait` ([`WaitControl`]).
//!
//! A write that asks for `min_replicas` slaves (or gets `sync.min_replicas`)
//! is committed as any other; its answer then waits until that many
//! connected slaves hold it durably in their relay logs ([`crate::acks`]), at
//! most `replica_timeout_ms` from when the master took it, and never past the
//! request's own deadline, nor past the master's shutdown (a stopping master
//! answers at once with the count it has). The committer never waits for
//! slaves. Options are checked before anything is written: `min_replicas` at
//! most `sync.max_sessions` (no more slaves can ever be connected), and
//! `replica_timeout_ms` below `server.request_timeout_ms` (the answer must
//! come before the server ends the request).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tern_common::config::Config;
use tern_common::kv::{ReplicaAcks, WriteOptions, answer_within};
use tern_common::position::Index;
use tern_common::proto::admin::v1 as pb;
use tern_common::server::AdminControl;
use tern_common::server::budgets::ADMIN_CONCURRENT_REQUESTS;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::acks::Acks;
use crate::committer::Progress;

/// `Admin.Wait` calls waiting at once at most: half the Admin budget, so
/// that waits can never take every slot `Info` needs.
pub const MAX_WAITS: usize = ADMIN_CONCURRENT_REQUESTS / 2;

/// The master's semi-sync settings: defaults and bounds.
#[derive(Clone, Copy, Debug)]
pub struct SemiSync {
    /// `sync.min_replicas`: for a request that says 0.
    default_replicas: u32,
    /// `sync.replica_timeout_ms`: for a request that says 0.
    default_timeout: Duration,
    /// `sync.max_sessions`: no more slaves can be connected at once.
    max_replicas: u32,
    /// `server.request_timeout_ms`: a wait must end before it.
    request_timeout: Duration,
}

/// What one write waits for, once its options are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaWait {
    pub replicas: u32,
    /// From when the master took the write.
    pub timeout: Duration,
}

impl SemiSync {
    pub fn from_config(cfg: &Config) -> SemiSync {
        SemiSync::new(
            cfg.sync.min_replicas,
            cfg.sync.replica_timeout(),
            u32::try_from(cfg.sync.max_sessions).unwrap_or(u32::MAX),
            Duration::from_millis(cfg.server.request_timeout_ms),
        )
    }

    /// The default timeout is cut to what the request timeout leaves for the
    /// answer (`sync.replica_timeout_ms` is only checked against
    /// `server.request_timeout_ms` when `sync.min_replicas` > 0).
    pub fn new(
        default_replicas: u32,
        default_timeout: Duration,
        max_replicas: u32,
        request_timeout: Duration,
    ) -> SemiSync {
        SemiSync {
            default_replicas,
            default_timeout: default_timeout.min(answer_within(request_timeout)),
            max_replicas,
            request_timeout,
        }
    }

    /// A timeout a request asked for (0 = the default), checked.
    fn timeout(&self, what: &str, ms: u32) -> Result<Duration, Status> {
        if ms == 0 {
            return Ok(self.default_timeout);
        }
        let t = Duration::from_millis(ms.into());
        if t >= self.request_timeout {
            return Err(Status::invalid_argument(format!(
                "{what} {ms} must be below the master's server.request_timeout_ms ({})",
                self.request_timeout.as_millis()
            )));
        }
        Ok(t)
    }

    /// A replica count a request asked for, checked.
    fn replicas(&self, what: &str, n: u32) -> Result<u32, Status> {
        if n > self.max_replicas {
            return Err(Status::invalid_argument(format!(
                "{what} {n} is above the master's sync.max_sessions ({}): never that many \
                 slaves are connected",
                self.max_replicas
            )));
        }
        Ok(n)
    }

    /// What a write with `opts` waits for (`None`: it does not wait), or
    /// INVALID_ARGUMENT for options that cannot be honoured.
    pub fn resolve(&self, opts: &WriteOptions) -> Result<Option<ReplicaWait>, Status> {
        let replicas = match opts.min_replicas {
            0 => self.default_replicas,
            n => self.replicas("min_replicas", n)?,
        };
        let timeout = self.timeout("replica_timeout_ms", opts.replica_timeout_ms)?;
        Ok((replicas > 0).then_some(ReplicaWait { replicas, timeout }))
    }
}

impl ReplicaWait {
    /// Waits (after the commit) until `self.replicas` slaves hold `index`,
    /// or `taken + timeout`, or `deadline`, or `stop`, whichever comes first.
    pub async fn wait(
        self,
        acks: &Acks,
        index: u64,
        taken: Instant,
        deadline: Option<Instant>,
        stop: &CancellationToken,
    ) -> ReplicaAcks {
        let mut until = after(taken, self.timeout);
        if let Some(d) = deadline {
            until = until.min(d);
        }
        let index = Index::from(index);
        let got = tokio::select! {
            got = acks.wait(index, self.replicas, until) => got,
            _ = stop.cancelled() => {
                until = Instant::now().min(until);
                acks.acked(index)
            }
        };
        ReplicaAcks {
            required: self.replicas,
            acked: got.acked,
            connected: got.connected,
            timeout_ms: until.saturating_duration_since(taken).as_millis() as u64,
        }
    }
}

/// `t + d`, or a year after `t` if that overflows (a configured timeout of
/// centuries).
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(365 * 24 * 3600))
}

/// `Admin.Wait` on a master (like Redis `WAIT`).
pub struct WaitControl {
    semi: SemiSync,
    acks: Arc<Acks>,
    progress: Arc<Progress>,
    /// [`MAX_WAITS`].
    waits: Arc<Semaphore>,
    /// The master's shutdown: waits answer at once with the count they have.
    stop: CancellationToken,
}

impl WaitControl {
    pub fn new(
        semi: SemiSync,
        acks: Arc<Acks>,
        progress: Arc<Progress>,
        stop: CancellationToken,
    ) -> WaitControl {
        WaitControl {
            semi,
            acks,
            progress,
            waits: Arc::new(Semaphore::new(MAX_WAITS)),
            stop,
        }
    }
}

#[tonic::async_trait]
impl AdminControl for WaitControl {
    /// Waits until `replicas` connected slaves hold every event up to
    /// `index` (0 = the last index now) durably, or the timeout (0 = the
    /// default); answers how many do. Never an error at the timeout: the
    /// count says it. OUT_OF_RANGE for an index past the end of the binlog.
    async fn wait(&self, req: pb::WaitRequest) -> Result<pb::WaitResponse, Status> {
        let last = self.progress.last_index.load(Ordering::Acquire);
        let index = match req.index {
            0 => last,
            i if i > last => {
                return Err(Status::out_of_range(format!(
                    "index {i} is past the master's last index {last}"
                )));
            }
            i => i,
        };
        let replicas = self.semi.replicas("replicas", req.replicas)?;
        let timeout = self.semi.timeout("timeout_ms", req.timeout_ms)?;
        if replicas == 0 {
            let acked = self.acks.acked(Index::from(index)).acked;
            return Ok(pb::WaitResponse { acked, index });
        }
        let Ok(_permit) = self.waits.try_acquire() else {
            return Err(tern_common::status::exhausted(
                format!("{MAX_WAITS} Admin.Wait calls are already waiting, the limit"),
                Duration::from_millis(100),
            ));
        };
        let at = Index::from(index);
        let got = tokio::select! {
            got = self.acks.wait(at, replicas, after(Instant::now(), timeout)) => got,
            _ = self.stop.cancelled() => self.acks.acked(at),
        };
        Ok(pb::WaitResponse {
            acked: got.acked,
            index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn semi() -> SemiSync {
        SemiSync::new(0, Duration::from_secs(10), 32, Duration::from_secs(30))
    }

    fn opts(min_replicas: u32, replica_timeout_ms: u32) -> WriteOptions {
        WriteOptions {
            min_replicas,
            replica_timeout_ms,
            deadline: None,
        }
    }

    #[test]
    fn defaults_and_bounds() {
        let s = semi();
        assert_eq!(s.resolve(&opts(0, 0)).unwrap(), None);
        assert_eq!(s.resolve(&opts(0, 500)).unwrap(), None);
        assert_eq!(
            s.resolve(&opts(2, 0)).unwrap(),
            Some(ReplicaWait {
                replicas: 2,
                timeout: Duration::from_secs(10)
            })
        );
        assert_eq!(
            s.resolve(&opts(32, 29_999)).unwrap().unwrap().timeout,
            Duration::from_millis(29_999)
        );
        let e = s.resolve(&opts(33, 0)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("min_replicas 33"), "{e:?}");
        let e = s.resolve(&opts(1, 30_000)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("replica_timeout_ms 30000"), "{e:?}");
        let with_default = SemiSync::new(1, Duration::from_secs(10), 32, Duration::from_secs(30));
        assert_eq!(
            with_default.resolve(&opts(0, 250)).unwrap(),
            Some(ReplicaWait {
                replicas: 1,
                timeout: Duration::from_millis(250)
            })
        );
    }

    #[test]
    fn the_default_timeout_fits_in_the_request_timeout() {
        // A huge or too long default is cut to what the request leaves.
        let s = SemiSync::new(
            1,
            Duration::from_secs(u64::MAX / 4),
            32,
            Duration::from_secs(5),
        );
        assert_eq!(
            s.resolve(&opts(0, 0)).unwrap().unwrap().timeout,
            Duration::from_millis(4900)
        );
        let s = SemiSync::new(1, Duration::from_millis(300), 32, Duration::from_secs(5));
        assert_eq!(
            s.resolve(&opts(0, 0)).unwrap().unwrap().timeout,
            Duration::from_millis(300)
        );
    }

    #[tokio::test]
    async fn a_wait_ends_at_the_request_deadline_and_says_so() {
        let acks = Acks::new();
        acks.report("a", 1, Index::from(3));
        let w = ReplicaWait {
            replicas: 2,
            timeout: Duration::from_secs(60),
        };
        let taken = Instant::now();
        let stop = CancellationToken::new();
        let got = w
            .wait(
                &acks,
                3,
                taken,
                Some(taken + Duration::from_millis(30)),
                &stop,
            )
            .await;
        assert_eq!(
            got,
            ReplicaAcks {
                required: 2,
                acked: 1,
                connected: 1,
                timeout_ms: 30
            }
        );
        assert!(got.short());
        let got = ReplicaWait { replicas: 1, ..w }
            .wait(&acks, 3, taken, None, &stop)
            .await;
        assert_eq!((got.acked, got.short()), (1, false));
        // A stopping master answers at once, with what it has.
        stop.cancel();
        let got = w.wait(&acks, 3, Instant::now(), None, &stop).await;
        assert_eq!((got.required, got.acked, got.short()), (2, 1, true));
        assert!(got.timeout_ms < 60_000, "{got:?}");
    }
}
