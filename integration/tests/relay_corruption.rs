//! A corrupt record in the middle of a slave's relay log, after its applied
//! index (the slave was killed while its apply lagged, then a byte was flipped
//! on disk): the slave never applies the bad bytes, discards its relay log from
//! the applied index, fetches it again from the master and converges.

mod support;

use std::time::Duration;

use support::{DEADLINE, describe_slave, slave_counters, slave_link, wait_until};
use tern_integration::{Node, TestDir, Workload};

/// (segment path, byte offset, index) of every record in the relay log.
fn relay_records(data_dir: &std::path::Path) -> Vec<(std::path::PathBuf, usize, u64)> {
    let mut out = Vec::new();
    for (_, seg) in tern_integration::binlog_segments(data_dir).unwrap() {
        let bytes = std::fs::read(&seg).unwrap();
        let (len, zeros) = tern_integration::segment_records_len(&bytes);
        assert!(zeros, "{}: damaged after {len} bytes", seg.display());
        let mut off = 0;
        for r in tern_common::record::Records::new(&bytes[..len]) {
            let (ev, raw) = r.unwrap();
            out.push((seg.clone(), off, ev.index));
            off += raw.len();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_relay_record_after_applied_is_discarded_and_refetched() {
    let dir = TestDir::new("relay-corruption");
    let master = Node::start_master(&dir.join("master"), &[], &[])
        .await
        .unwrap();
    let work = Workload::new(8, 32);
    let mut slave = Node::start_slave(
        &dir.join("slave"),
        &master.url(),
        &[
            ("TERN_FAULT_APPLY_DELAY_MS", "400"),
            ("TERN__BINLOG__SEGMENT_BYTES", "65536"),
        ],
        &[],
    )
    .await
    .unwrap();
    let load = support::PacedLoad::start(&work, &master.url(), 8, Duration::from_millis(2));
    // Wait until the relay log is well ahead of what the slow applier applied.
    let lagging = wait_until(
        "the slave's apply to lag its relay log",
        DEADLINE,
        || async {
            let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
            if i.last_index > i.applied_index + 3000 {
                Ok(Some(i))
            } else {
                Err(describe_slave(&i))
            }
        },
    )
    .await;
    slave.sigkill().unwrap();
    let stats = load.stop().await;
    assert!(stats.unexpected.is_empty(), "{stats:?}");
    // Flip a payload byte of a record between the applied index and the tail.
    // In a sealed segment (not the tail, which recovery scans and would cut).
    let records = relay_records(&slave.data_dir);
    let tail = records.last().unwrap().0.clone();
    let first = lagging.applied_index + 1;
    let candidates: Vec<_> = records
        .iter()
        .filter(|r| r.2 > first && r.0 != tail)
        .cloned()
        .collect();
    assert!(
        !candidates.is_empty(),
        "no sealed relay segment after the applied index {first}"
    );
    let (seg, off, index) = candidates[candidates.len() / 2].clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[off + 8 + 2] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    eprintln!("flipped a byte of record {index} in {}", seg.display());
    // Restart without the slow-apply knob.
    let slave = Node::start_slave(
        &slave.data_dir,
        &master.url(),
        &[("TERN__BINLOG__SEGMENT_BYTES", "65536")],
        &[],
    )
    .await
    .unwrap();
    support::converge(&master, &[&slave]).await;
    let mc = master.checksum().await.unwrap();
    assert_eq!(slave.checksum().await.unwrap(), mc);
    work.check(&mut slave.kv()).await.unwrap();
    let i = slave.info().await.unwrap();
    assert_eq!(
        slave_counters(&i).duplicates_skipped,
        0,
        "{}",
        describe_slave(&i)
    );
    assert_eq!(slave_link(&i).state, "connected");
    let log = std::fs::read_to_string(format!("{}.log", slave.data_dir.display())).unwrap();
    assert!(
        log.contains("relay log is corrupt after the applied index")
            || log.contains("relay log cannot be recovered"),
        "the slave said what it found"
    );
}
