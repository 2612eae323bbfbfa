//! The read floor: a slave never serves a state older than one it served before.
//!
//! A slave's RocksDB runs without a WAL: after a crash it comes back at its last
//! flush, and the relay log brings it up to date again. Whatever it served was
//! at most its applied index, which is at most what the relay log had received.
//! So as long as the relay log is whole, start-up replay restores at least every
//! state served. When the relay log loses events instead (a corrupt record
//! discarded, a damaged tail truncated, a relay that does not continue the state,
//! a full sync replacing it), the state it comes back at can be older than one
//! it served: reads would go back in time.
//!
//! `data_dir/READ_FLOOR` holds `repl_id:index` (`none:index` before the slave
//! has a history), written like the clean-shutdown marker (temp file, fsync,
//! rename, directory fsync). Before anything cuts the relay log below what it
//! received, the floor is raised to that received index ([`raise`]); at start it
//! is also raised to what the relay log held before its tail was recovered
//! ([`relay_extent`]). Reads are served only once the applied index reaches the
//! floor (`tern_common::kv::ReadFloor`); until then they wait and then fail
//! with UNAVAILABLE.
//!
//! Histories: indexes only compare within one history. A full sync from another
//! history (the slave diverged from, or was ahead of, a master that started a
//! new history) resets the floor to that history at 0 ([`reset`]): the states
//! served before belong to a history the master no longer has, and no state of
//! the new one is "newer" than them. A full sync in the same history (binlog
//! purged) keeps the floor. At start, a floor recorded in another history than
//! the state's (a slave that followed its master into a descendant history) is
//! kept: the descendant shares the prefix up to its fork, so the floor is still
//! a lower bound there (if the fork is below the floor the slave waits until the
//! new history passes it).
//!
//! Under `binlog.fsync = everysec` or `no`, what a slave received may be lost
//! by an OS crash or power loss (not by a process crash: the page cache keeps
//! it), and the floor cannot know about reads served from it.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tern_common::position::ReplId;
use tern_common::record::{EventKind, decode_record, header_frame_len};

const FLOOR_FILE: &str = "READ_FLOOR";
/// What the file says for a slave that has no history yet.
const NO_HISTORY: &str = "none";
/// Longest floor file read (a history id, a colon, an index, a newline).
const MAX_FLOOR_BYTES: usize = 128;
const SEGMENT_SUFFIX: &str = ".binlog";

#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("read floor {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "read floor {} holds {content:?}, not `repl_id:index`; remove it to let this slave \
         serve whatever state it comes back at",
        path.display()
    )]
    Malformed { path: PathBuf, content: String },
}

/// The oldest state a slave may serve: `index` in history `repl_id`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Floor {
    pub repl_id: Option<ReplId>,
    pub index: u64,
}

impl std::fmt::Display for Floor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.repl_id {
            Some(id) => write!(f, "{id}:{}", self.index),
            None => write!(f, "{NO_HISTORY}:{}", self.index),
        }
    }
}

impl Floor {
    fn parse(text: &str) -> Option<Floor> {
        let (id, index) = text.trim().split_once(':')?;
        if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let repl_id = match id {
            NO_HISTORY => None,
            id => Some(id.parse().ok()?),
        };
        Some(Floor {
            repl_id,
            index: index.parse().ok()?,
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FloorError + '_ {
    move |source| FloorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The floor recorded in `data_dir`, if any.
pub fn load(data_dir: &Path) -> Result<Option<Floor>, FloorError> {
    let path = data_dir.join(FLOOR_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    decode(&bytes)
        .map(Some)
        .map_err(|content| FloorError::Malformed { path, content })
}

/// Parses the content of a floor file; `Err` carries the (lossy, cut) text
/// for the error message.
#[doc(hidden)]
pub fn decode(bytes: &[u8]) -> Result<Floor, String> {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_FLOOR_BYTES)]).into_owned();
    (bytes.len() <= MAX_FLOOR_BYTES)
        .then(|| Floor::parse(&text))
        .flatten()
        .ok_or(text)
}

/// Records `floor` durably.
pub fn store(data_dir: &Path, floor: Floor) -> Result<(), FloorError> {
    replace_file(data_dir, FLOOR_FILE, &format!("{floor}\n"))
        .map_err(io_err(&data_dir.join(FLOOR_FILE)))
}

/// Replaces `data_dir/name` with `contents` durably: a temp file, fsync,
/// rename, directory fsync (a crash leaves the old file or the new one).
pub fn replace_file(data_dir: &Path, name: &str, contents: &str) -> io::Result<()> {
    let tmp = data_dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, contents)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(name))?;
    File::open(data_dir)?.sync_all()
}

/// Raises the recorded floor to at least `index`, recording it in history
/// `repl_id` (kept from the file when `None`); writes only when it changes.
/// Returns the floor now in force.
pub fn raise(data_dir: &Path, repl_id: Option<ReplId>, index: u64) -> Result<Floor, FloorError> {
    let old = load(data_dir)?;
    let current = old.unwrap_or_default();
    let new = Floor {
        repl_id: repl_id.or(current.repl_id),
        index: current.index.max(index),
    };
    if old != Some(new) {
        store(data_dir, new)?;
        if new.index > current.index {
            tracing::info!(floor = %new, previous = %current, "read floor raised");
        }
    }
    Ok(new)
}

/// Starts the floor over in history `repl_id` at 0: see the module docs.
pub fn reset(data_dir: &Path, repl_id: Option<ReplId>) -> Result<Floor, FloorError> {
    let new = Floor { repl_id, index: 0 };
    let old = load(data_dir)?;
    if old != Some(new) {
        store(data_dir, new)?;
        tracing::warn!(
            previous = %old.unwrap_or_default(),
            floor = %new,
            "read floor reset: the state comes from another history"
        );
    }
    Ok(new)
}

/// The highest index the relay log in `relay_dir` may have received, read from
/// its files as they are, **before** opening it (which truncates a damaged
/// tail). It is the last Commit of the last non-empty segment, or, when that
/// segment ends in a record that is torn or fails its checksum, that record's
/// index: it may have been the Commit of a received transaction (a crash alone
/// never tears a received record: the Commit was fsynced before it counted, so
/// such damage is on the disk; counting it costs at most waiting for the
/// slave to fetch that transaction again). A damaged record before the last
/// one is stepped over when its length can be read. 0 when there is no relay
/// log.
pub fn relay_extent(relay_dir: &Path) -> Result<u64, FloorError> {
    let mut segments: Vec<(u64, PathBuf)> = match std::fs::read_dir(relay_dir) {
        Ok(entries) => entries
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
                let first = (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| digits.parse::<u64>().ok())
                    .flatten()?;
                Some((first, e.path()))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(relay_dir)(e)),
    };
    segments.sort_unstable();
    for (first, path) in segments.iter().rev() {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        if bytes.is_empty() {
            continue;
        }
        return Ok(segment_extent(*first, &bytes));
    }
    Ok(segments
        .first()
        .map_or(0, |(first, _)| first.saturating_sub(1)))
}

/// See [`relay_extent`], for one segment whose first event is `first`. A
/// damaged record whose length field is intact is stepped over, so that the
/// events after it still count; a damaged length ends the scan.
#[doc(hidden)]
pub fn segment_extent(first: u64, bytes: &[u8]) -> u64 {
    let mut last = first.saturating_sub(1);
    let mut last_commit = last;
    let mut damaged_at_end = false;
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        match decode_record(rest) {
            Ok((ev, n)) => {
                last = last.max(ev.index);
                if matches!(ev.kind, EventKind::Commit { .. }) {
                    last_commit = last_commit.max(ev.index);
                }
                damaged_at_end = false;
                offset += n;
            }
            // Zeros to the end: written ahead of the tail, not a record.
            Err(_) if rest.iter().all(|&b| b == 0) => break,
            Err(_) => {
                damaged_at_end = true;
                match header_frame_len(rest) {
                    Ok(n) if n < rest.len() => offset += n,
                    _ => break,
                }
            }
        }
    }
    if damaged_at_end {
        // Damaged bytes after the last valid record: the next event's.
        last_commit.max(last.saturating_add(1))
    } else {
        last_commit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_common::binlog::{Binlog, BinlogOptions};
    use tern_common::record::{Event, encode_record};

    fn txn(out: &mut Vec<u8>, begin: u64, seq: u64, puts: u64) -> u64 {
        encode_record(&Event::begin(begin, seq, 0), out);
        for i in 0..puts {
            encode_record(&Event::put(begin + 1 + i, "k", "v"), out);
        }
        let commit = begin + 1 + puts;
        encode_record(&Event::commit(commit, seq), out);
        commit
    }

    #[test]
    fn stored_raised_and_reset() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let a = ReplId(0xa);
        assert_eq!(
            raise(dir.path(), None, 7).unwrap(),
            Floor {
                repl_id: None,
                index: 7
            }
        );
        assert_eq!(
            raise(dir.path(), Some(a), 5).unwrap(),
            Floor {
                repl_id: Some(a),
                index: 7
            }
        );
        assert_eq!(
            raise(dir.path(), None, 9).unwrap(),
            Floor {
                repl_id: Some(a),
                index: 9
            }
        );
        assert_eq!(
            load(dir.path()).unwrap(),
            Some(Floor {
                repl_id: Some(a),
                index: 9
            })
        );
        let b = ReplId(0xb);
        assert_eq!(
            reset(dir.path(), Some(b)).unwrap(),
            Floor {
                repl_id: Some(b),
                index: 0
            }
        );
        assert_eq!(load(dir.path()).unwrap().unwrap().index, 0);
    }

    #[test]
    fn malformed_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            &b"42"[..],
            b"none:",
            b"none:-1",
            b"xyz:4",
            b"none:99999999999999999999999",
            b"\xff\xfe:1",
            &[b'7'; 300][..],
        ] {
            std::fs::write(dir.path().join(FLOOR_FILE), bad).unwrap();
            match load(dir.path()) {
                Err(FloorError::Malformed { .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        std::fs::write(
            dir.path().join(FLOOR_FILE),
            "0000000000000000000000000000000a:12\n",
        )
        .unwrap();
        assert_eq!(
            load(dir.path()).unwrap(),
            Some(Floor {
                repl_id: Some(ReplId(0xa)),
                index: 12
            })
        );
    }

    #[test]
    fn full_sync_keeps_the_floor_in_its_history_and_resets_it_in_another() {
        use tern_common::proto::replication::v1::DbSyncHeader;
        let dir = tempfile::tempdir().unwrap();
        let (db, relay) = (dir.path().join("db"), dir.path().join("binlog"));
        let a = ReplId(0xa);
        tern_common::state::State::open(&db)
            .unwrap()
            .set_repl_id(a)
            .unwrap();
        let mut bytes = Vec::new();
        let c1 = txn(&mut bytes, 1, 1, 1);
        let c2 = txn(&mut bytes, c1 + 1, 2, 1);
        let (mut b, _) = Binlog::open(&relay, BinlogOptions::default()).unwrap();
        b.append(&bytes, 1, c2, true).unwrap();
        b.sync().unwrap();
        drop(b);
        let header = |repl: ReplId| DbSyncHeader {
            repl_id: repl.to_string(),
            index: c1,
            ..Default::default()
        };
        // Same history: the snapshot (at c1) is older than what the relay log
        // received (c2): the floor covers c2.
        crate::fullsync::floor_before_swap(dir.path(), &db, &relay, &header(a)).unwrap();
        assert_eq!(
            load(dir.path()).unwrap(),
            Some(Floor {
                repl_id: Some(a),
                index: c2
            })
        );
        // A higher floor from before stays.
        store(
            dir.path(),
            Floor {
                repl_id: Some(a),
                index: 100,
            },
        )
        .unwrap();
        crate::fullsync::floor_before_swap(dir.path(), &db, &relay, &header(a)).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap().index, 100);
        // Another history: the floor starts over there.
        let b = ReplId(0xb);
        crate::fullsync::floor_before_swap(dir.path(), &db, &relay, &header(b)).unwrap();
        assert_eq!(
            load(dir.path()).unwrap(),
            Some(Floor {
                repl_id: Some(b),
                index: 0
            })
        );
    }

    #[test]
    fn extent_counts_a_damaged_tail_record() {
        let dir = tempfile::tempdir().unwrap();
        let relay = dir.path().join("binlog");
        assert_eq!(relay_extent(&relay).unwrap(), 0);
        let opts = BinlogOptions {
            segment_bytes: 1 << 20,
            ..Default::default()
        };
        let mut bytes = Vec::new();
        let c1 = txn(&mut bytes, 1, 1, 2);
        let c2 = txn(&mut bytes, c1 + 1, 2, 3);
        {
            let (mut b, _) = Binlog::open(&relay, opts).unwrap();
            b.append(&bytes, 1, c2, true).unwrap();
            b.sync().unwrap();
        }
        assert_eq!(relay_extent(&relay).unwrap(), c2);
        let seg = relay.join(format!("{:020}.binlog", 1));
        // The file goes on with zeros written ahead: they are not damage.
        assert!(std::fs::metadata(&seg).unwrap().len() > bytes.len() as u64);
        // A damaged record before the last one is stepped over.
        let mut mid = bytes.clone();
        let second = header_frame_len(&bytes).unwrap();
        mid[second + tern_common::record::HEADER_LEN] ^= 0x20;
        std::fs::write(&seg, &mid).unwrap();
        assert_eq!(relay_extent(&relay).unwrap(), c2);
        // A partial transaction after the last Commit does not count.
        let mut partial = bytes.clone();
        encode_record(&Event::begin(c2 + 1, 3, 0), &mut partial);
        std::fs::write(&seg, &partial).unwrap();
        assert_eq!(relay_extent(&relay).unwrap(), c2);
        // The last Commit fails its checksum: its index still counts...
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        std::fs::write(&seg, &bad).unwrap();
        assert_eq!(relay_extent(&relay).unwrap(), c2);
        // ... and so does a torn one.
        std::fs::write(&seg, &bytes[..n - 3]).unwrap();
        assert_eq!(relay_extent(&relay).unwrap(), c2);
        // Opening the log then cuts it back to the previous transaction.
        let (b, _) = Binlog::open(&relay, opts).unwrap();
        assert_eq!(b.last_index(), c1);
        drop(b);
        assert_eq!(relay_extent(&relay).unwrap(), c1);
        // An empty tail segment defers to the segment before it; garbage in a
        // file that is not a segment is ignored.
        std::fs::write(relay.join(format!("{:020}.binlog", c1 + 1)), b"").unwrap();
        std::fs::write(relay.join("notes.txt"), b"\x01\x02").unwrap();
        assert_eq!(relay_extent(&relay).unwrap(), c1);
        // A tail segment whose first record is damaged: the segment's first index.
        std::fs::write(relay.join(format!("{:020}.binlog", c1 + 1)), b"\x09\x00").unwrap();
        assert_eq!(relay_extent(&relay).unwrap(), c1 + 1);
    }
}
