//! Binlog retention: which sealed segments may go.
//!
//! A sealed segment (never the tail) is **due** when either rule that is on says
//! so, oldest first:
//!
//! - size (`binlog.retain_bytes > 0`): removing it still leaves at least
//!   `retain_bytes` of binlog;
//! - age (`binlog.retain_secs > 0`): its file was last written more than
//!   `retain_secs` ago.
//!
//! Due segments are only removed up to the smallest **pin** (see
//! [`crate::pins`]): a connected slave's received index, a full-sync snapshot's
//! index. And never past the state the committer just flushed, so the state
//! never depends on purged binlog.
//!
//! **Hard cap** (`binlog.max_retain_bytes > 0`): while what would remain is
//! still above the cap, more segments go, oldest first, until it is not:
//! first ignoring the pins of slaves (they will need a full sync, and
//! `Info.slaves[].needs_full_sync` says so); snapshot pins are still honoured
//! if that is enough to get under the cap, and are ignored too only when it
//! is not (the disk is protected first; the snapshot then expires and the
//! slaves downloading it start a new full sync).
//!
//! The cap is on by default (8 GiB, 8 × the default `retain_bytes`): without
//! it one connected session that never acknowledges, or a slave far behind,
//! pins the binlog until the disk is full and the master stops writing. A cap
//! set below `retain_bytes` is raised to it (the size rule keeps that much).

use std::path::Path;
use std::time::{Duration, SystemTime};

use tern_common::config::BinlogConfig;

use crate::pins::{PinsLocked, SNAPSHOT_PREFIX};

const SEGMENT_SUFFIX: &str = ".binlog";

/// The retention settings of `[binlog]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub retain_bytes: u64,
    pub retain_secs: u64,
    pub max_retain_bytes: u64,
}

impl Policy {
    pub fn from_config(c: &BinlogConfig) -> Policy {
        Policy {
            retain_bytes: c.retain_bytes,
            retain_secs: c.retain_secs,
            max_retain_bytes: match c.max_retain_bytes {
                0 => 0,
                cap => cap.max(c.retain_bytes),
            },
        }
    }
}

/// One sealed segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedSegment {
    pub first_index: u64,
    pub last_index: u64,
    pub len: u64,
    /// Time since the file was last written.
    pub age: Duration,
}

/// What to purge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Argument for `Binlog::purge_to`: the last index of the newest segment to remove.
    pub purge_to: u64,
    pub segments: usize,
    pub bytes: u64,
    /// Over `max_retain_bytes`: pins were passed.
    pub over_cap: bool,
    /// Owners whose pin this purge passes (they lose events they need).
    pub passed: Vec<String>,
}

/// Lists the sealed segments of the binlog in `dir` (every segment file but
/// the newest), oldest first.
pub fn sealed_segments(dir: &Path) -> std::io::Result<Vec<SealedSegment>> {
    let mut files: Vec<(u64, std::fs::Metadata)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(first) = name.to_str().and_then(parse_segment_name) else {
            continue;
        };
        files.push((first, entry.metadata()?));
    }
    files.sort_by_key(|(first, _)| *first);
    let now = SystemTime::now();
    Ok(files
        .windows(2)
        .map(|w| SealedSegment {
            first_index: w[0].0,
            last_index: w[1].0 - 1,
            len: w[0].1.len(),
            age: w[0]
                .1
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default(),
        })
        .collect())
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&f| f > 0)
}

/// Decides what to purge. `sealed` is oldest first; `total_bytes` counts every
/// segment (the tail too); nothing after `durable_state` (the index the state
/// is flushed at) is purged.
pub fn plan(
    policy: Policy,
    sealed: &[SealedSegment],
    total_bytes: u64,
    durable_state: u64,
    pins: &PinsLocked<'_>,
) -> Option<Plan> {
    let mut remaining = total_bytes;
    // 1. Due by size or age.
    let mut due = 0;
    for s in sealed {
        let by_size =
            policy.retain_bytes > 0 && remaining.saturating_sub(s.len) >= policy.retain_bytes;
        let by_age = policy.retain_secs > 0 && s.age > Duration::from_secs(policy.retain_secs);
        if !(by_size || by_age) {
            break;
        }
        remaining -= s.len.min(remaining);
        due += 1;
    }
    // 2. ... as far as the pins allow.
    let pinned = pins
        .min_with_prefix("")
        .unwrap_or(u64::MAX)
        .min(durable_state);
    let mut k = sealed[..due]
        .iter()
        .take_while(|s| s.last_index <= pinned)
        .count();
    let mut remaining: u64 = total_bytes
        - sealed[..k]
            .iter()
            .map(|s| s.len)
            .sum::<u64>()
            .min(total_bytes);
    // 3. The hard cap: slave pins yield, then (only if still needed) snapshot pins.
    let mut over_cap = false;
    if policy.max_retain_bytes > 0 && remaining > policy.max_retain_bytes {
        let snapshot_limit = pins
            .min_with_prefix(SNAPSHOT_PREFIX)
            .unwrap_or(u64::MAX)
            .min(durable_state);
        for limit in [snapshot_limit, durable_state] {
            while remaining > policy.max_retain_bytes
                && k < sealed.len()
                && sealed[k].last_index <= limit
            {
                remaining -= sealed[k].len.min(remaining);
                k += 1;
                over_cap = true;
            }
        }
    }
    if k == 0 {
        return None;
    }
    let purge_to = sealed[k - 1].last_index;
    Some(Plan {
        purge_to,
        segments: k,
        bytes: total_bytes - remaining,
        over_cap,
        passed: pins.owners_below(purge_to),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pins::Pins;

    /// Segments of 100 bytes holding 10 events each: [1..=10], [11..=20], ...
    fn segs(n: u64, age_secs: u64) -> Vec<SealedSegment> {
        (0..n)
            .map(|i| SealedSegment {
                first_index: i * 10 + 1,
                last_index: i * 10 + 10,
                len: 100,
                age: Duration::from_secs(age_secs),
            })
            .collect()
    }

    fn policy(retain_bytes: u64, retain_secs: u64, max: u64) -> Policy {
        Policy {
            retain_bytes,
            retain_secs,
            max_retain_bytes: max,
        }
    }

    #[test]
    fn size_rule_keeps_at_least_retain_bytes() {
        let pins = Pins::new();
        // 5 sealed + a 50-byte tail = 550 bytes; keep >= 300.
        let p = plan(policy(300, 0, 0), &segs(5, 0), 550, u64::MAX, &pins.lock()).unwrap();
        assert_eq!((p.segments, p.purge_to, p.bytes), (2, 20, 200));
        assert!(!p.over_cap);
        // Nothing due.
        assert!(plan(policy(600, 0, 0), &segs(5, 0), 550, u64::MAX, &pins.lock()).is_none());
        // Both rules off: nothing ever goes.
        assert!(plan(policy(0, 0, 0), &segs(5, 99), 550, u64::MAX, &pins.lock()).is_none());
    }

    #[test]
    fn age_rule() {
        let pins = Pins::new();
        let mut s = segs(4, 100);
        s[2].age = Duration::from_secs(1);
        let p = plan(policy(0, 10, 0), &s, 450, u64::MAX, &pins.lock()).unwrap();
        assert_eq!(p.purge_to, 20);
    }

    #[test]
    fn pins_and_durable_state_limit_the_purge() {
        let pins = Pins::new();
        let g = pins.pin("slave:a".into(), 25);
        let p = plan(policy(1, 0, 0), &segs(5, 0), 550, u64::MAX, &pins.lock()).unwrap();
        assert_eq!(p.purge_to, 20);
        assert!(p.passed.is_empty());
        g.update(9);
        assert!(plan(policy(1, 0, 0), &segs(5, 0), 550, u64::MAX, &pins.lock()).is_none());
        drop(g);
        let p = plan(policy(1, 0, 0), &segs(5, 0), 550, 30, &pins.lock()).unwrap();
        assert_eq!(p.purge_to, 30);
    }

    #[test]
    fn hard_cap_passes_slave_pins_before_snapshot_pins() {
        let pins = Pins::new();
        let _slave = pins.pin("slave:a".into(), 5);
        let snap = pins.pin("snapshot:s".into(), 30);
        // 550 bytes, cap 350: two segments must go; the snapshot pin allows three.
        let p = plan(policy(1, 0, 350), &segs(5, 0), 550, u64::MAX, &pins.lock()).unwrap();
        assert_eq!(p.purge_to, 20);
        assert!(p.over_cap);
        assert_eq!(p.passed, vec!["slave:a".to_string()]);
        // Cap 150: honouring the snapshot (<= 30) is not enough; it yields too.
        snap.update(10);
        let p = plan(policy(1, 0, 150), &segs(5, 0), 550, u64::MAX, &pins.lock()).unwrap();
        assert_eq!(p.purge_to, 40);
        assert_eq!(p.bytes, 400);
        assert_eq!(
            p.passed,
            vec!["slave:a".to_string(), "snapshot:s".to_string()]
        );
        // Under the cap: pins hold.
        assert!(plan(policy(1, 0, 1000), &segs(5, 0), 550, u64::MAX, &pins.lock()).is_none());
    }

    #[test]
    fn segment_names() {
        assert_eq!(parse_segment_name("00000000000000000001.binlog"), Some(1));
        assert_eq!(parse_segment_name("00000000000000000000.binlog"), None);
        assert_eq!(parse_segment_name("0001.binlog"), None);
        assert_eq!(parse_segment_name("00000000000000000001.binlog.tmp"), None);
    }
}
