//! The applier's choice between the receiver's hand-off and the relay log:
//! chunks that repeat, overlap, skip ahead or are not durable yet must never
//! make it skip a transaction, apply one twice, or run ahead of `received`.
//!
//! Handed-off chunks carry values marked with where they came from, and the
//! relay log holds different values for the same events, so the final state
//! tells which source every transaction was applied from.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tern_common::binlog::{Binlog, BinlogOptions};
use tern_common::record::{Event, encode_record};
use tern_common::state::State;
use tern_slave::applier::{Applier, ApplierHandle, Chunk, HandOff, hand_off};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Transaction `t` (from 1) is 4 events: Begin, Put k{t}a, Put k{t}b, Commit.
const EVENTS_PER_TXN: u64 = 4;

fn txn_events(t: u64, mark: &str) -> Vec<Event> {
    let first = (t - 1) * EVENTS_PER_TXN + 1;
    vec![
        Event::begin(first, t, 0),
        Event::put(first + 1, format!("k{t}a"), format!("{mark}{t}")),
        Event::put(first + 2, format!("k{t}b"), format!("{mark}{t}")),
        Event::commit(first + 3, t),
    ]
}

fn commit_index(t: u64) -> u64 {
    t * EVENTS_PER_TXN
}

/// A chunk of transactions `from..=to`, values marked `mark`.
fn chunk(from: u64, to: u64, mark: &str) -> Chunk {
    let events: Vec<Event> = (from..=to).flat_map(|t| txn_events(t, mark)).collect();
    Chunk {
        first: events[0].index,
        last: events.last().unwrap().index,
        events,
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    state: State,
    received: watch::Sender<u64>,
    handoff: HandOff,
    applier: Option<ApplierHandle>,
    stop: CancellationToken,
    dups: Arc<AtomicU64>,
}

/// A relay log holding transactions 1..=txns (values marked "disk"), an empty
/// state and a running applier with `received` at 0.
fn rig(txns: u64) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, _) =
        Binlog::open(&dir.path().join("binlog"), BinlogOptions::default()).unwrap();
    let mut buf = Vec::new();
    for ev in (1..=txns).flat_map(|t| txn_events(t, "disk")) {
        encode_record(&ev, &mut buf);
    }
    relay.append(&buf, 1, commit_index(txns), true).unwrap();
    relay.sync().unwrap();
    let state = State::open(&dir.path().join("db")).unwrap();
    let (received, received_rx) = watch::channel(0);
    let (handoff, rx) = hand_off();
    let stop = CancellationToken::new();
    let dups = Arc::new(AtomicU64::new(0));
    let applier = Applier::spawn(
        state.clone(),
        relay.reader(),
        received_rx,
        rx,
        dups.clone(),
        stop.clone(),
        None,
    );
    Rig {
        _dir: dir,
        state,
        received,
        handoff,
        applier: Some(applier),
        stop,
        dups,
    }
}

impl Rig {
    async fn wait_applied(&self, index: u64) {
        let mut applied = self.applier.as_ref().unwrap().applied.clone();
        tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|a| *a >= index))
            .await
            .expect("applier reaches the index")
            .unwrap();
        assert_eq!(*applied.borrow(), index, "applied beyond what was expected");
    }

    async fn finish(&mut self) {
        self.stop.cancel();
        let h = self.applier.take().unwrap();
        tokio::task::spawn_blocking(move || h.join.join())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// The source each transaction 1..=txns was applied from.
    fn sources(&self, txns: u64) -> Vec<String> {
        (1..=txns)
            .map(|t| {
                let a = self.state.get(format!("k{t}a").as_bytes()).unwrap();
                let b = self.state.get(format!("k{t}b").as_bytes()).unwrap();
                assert_eq!(a, b, "transaction {t} applied in part");
                let v = String::from_utf8(a.expect("transaction applied")).unwrap();
                v.trim_end_matches(|c: char| c.is_ascii_digit()).to_string()
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_overlapping_and_gapped_chunks_are_never_applied_twice_or_skipped() {
    let mut r = rig(12);
    // Queued before `received` moves (as the receiver does): nothing applies yet.
    r.handoff.offer(chunk(1, 3, "mem"));
    r.handoff.offer(chunk(1, 3, "dup")); // repeated
    r.handoff.offer(chunk(2, 3, "dup")); // already applied
    r.handoff.offer(chunk(6, 8, "mem")); // after a gap: 4..=5 from the relay log
    r.handoff.offer(chunk(7, 10, "dup")); // overlaps 7..=8: dropped, 9..=10 from the relay log
    r.handoff.offer(chunk(11, 12, "mem"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        r.state.applied_index(),
        0,
        "applied before anything was received"
    );
    r.received.send_replace(commit_index(12));
    r.wait_applied(commit_index(12)).await;
    r.finish().await;
    assert_eq!(
        r.sources(12),
        [
            "mem", "mem", "mem", "disk", "disk", "mem", "mem", "mem", "disk", "disk", "mem", "mem"
        ]
    );
    assert_eq!(r.dups.load(Ordering::Relaxed), 0);
    assert_eq!(r.state.last_seq(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_applies_past_received() {
    let mut r = rig(6);
    // Offered chunks that are not durable yet: only what `received` covers applies.
    r.handoff.offer(chunk(1, 2, "mem"));
    r.handoff.offer(chunk(3, 6, "mem"));
    r.received.send_replace(commit_index(2));
    r.wait_applied(commit_index(2)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(r.state.applied_index(), commit_index(2));
    r.received.send_replace(commit_index(4));
    r.wait_applied(commit_index(4)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        r.state.applied_index(),
        commit_index(4),
        "ran ahead of received"
    );
    r.received.send_replace(commit_index(6));
    r.wait_applied(commit_index(6)).await;
    r.finish().await;
    // 3..=4 came from the relay log (the chunk was not durable as a whole);
    // the chunk then overlapped what was applied and was dropped.
    assert_eq!(r.sources(6), ["mem", "mem", "disk", "disk", "disk", "disk"]);
    assert_eq!(r.dups.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_hand_off_losses_keep_exactly_once() {
    // The receiver's pattern (offer, then move `received`) with chunks lost
    // (queue full), repeated and overlapping at random.
    const TXNS: u64 = 400;
    for seed in 0..5u64 {
        let mut r = rig(TXNS);
        let mut rng = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut t = 1;
        while t <= TXNS {
            let to = (t + next(5)).min(TXNS);
            match next(6) {
                0 => {} // lost
                1 => {
                    r.handoff.offer(chunk(t, to, "mem"));
                    r.handoff.offer(chunk(t, to, "dup"));
                }
                // Starts inside the previous chunk: applied only if the
                // state happens to end right before it (then it continues it).
                2 if t > 2 => r.handoff.offer(chunk(t - 2, to, "ovl")),
                _ => r.handoff.offer(chunk(t, to, "mem")),
            }
            r.received.send_replace(commit_index(to));
            if next(4) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            t = to + 1;
        }
        r.wait_applied(commit_index(TXNS)).await;
        r.finish().await;
        let sources = r.sources(TXNS);
        assert!(
            sources.iter().all(|s| s != "dup"),
            "seed {seed}: a repeated chunk was applied: {sources:?}"
        );
        assert!(
            sources.iter().any(|s| s == "mem"),
            "seed {seed}: hand-off never used"
        );
        assert_eq!(r.dups.load(Ordering::Relaxed), 0, "seed {seed}");
        assert_eq!(r.state.last_seq(), TXNS, "seed {seed}");
    }
}

/// The sequential apply rate, from the relay log and from the hand-off:
/// `cargo nextest run -p tern-slave --run-ignored only apply_rate --no-capture`.
/// Transactions like tern-bench's (one 100-byte Put: Begin, Put, Commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn apply_rate() {
    const TXNS: u64 = 200_000;
    let txn = |t: u64, first: u64| {
        vec![
            Event::begin(first, t, 0),
            Event::put(first + 1, format!("key{:08}", t % 100_000), vec![b'v'; 100]),
            Event::commit(first + 2, t),
        ]
    };
    let all: Vec<Event> = (1..=TXNS).flat_map(|t| txn(t, (t - 1) * 3 + 1)).collect();
    let last = TXNS * 3;
    for from_memory in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (mut relay, _) =
            Binlog::open(&dir.path().join("binlog"), BinlogOptions::default()).unwrap();
        let mut buf = Vec::new();
        for ev in &all {
            encode_record(ev, &mut buf);
        }
        relay.append(&buf, 1, last, true).unwrap();
        relay.sync().unwrap();
        let state = State::open(&dir.path().join("db")).unwrap();
        let (received, received_rx) = watch::channel(0);
        let (handoff, rx) = hand_off();
        let stop = CancellationToken::new();
        let h = Applier::spawn(
            state.clone(),
            relay.reader(),
            received_rx,
            rx,
            Arc::new(AtomicU64::new(0)),
            stop.clone(),
            None,
        );
        let start = std::time::Instant::now();
        if from_memory {
            // Chunks of 64 transactions, offered as the receiver does.
            for c in all.chunks(3 * 64) {
                let chunk = Chunk {
                    first: c[0].index,
                    last: c[c.len() - 1].index,
                    events: c.to_vec(),
                };
                let l = chunk.last;
                // Never let the queue overflow (that falls back to the relay log).
                let mut applied = h.applied.clone();
                let _ = applied.wait_for(|a| *a + 3 * 64 * 32 >= l).await;
                handoff.offer(chunk);
                received.send_replace(l);
            }
        } else {
            received.send_replace(last);
        }
        let mut applied = h.applied.clone();
        applied.wait_for(|a| *a >= last).await.unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "apply from {}: {TXNS} txns, {last} events in {secs:.2}s: {:.0} events/s, {:.0} txns/s",
            if from_memory { "hand-off" } else { "relay log" },
            last as f64 / secs,
            TXNS as f64 / secs,
        );
        stop.cancel();
        tokio::task::spawn_blocking(move || h.join.join())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
