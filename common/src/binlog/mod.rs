//! The segmented binlog: an append-only, CRC-checked log of framed records,
//! with tail recovery, group fsync, retention and concurrent readers.
//!
//! # On disk
//!
//! A binlog is a directory of **segment files** named after the index of
//! their first event, zero-padded so names sort like indexes:
//! `00000000000000000001.binlog`, `00000000000000052917.binlog`, ... Other
//! files in the directory are ignored. A segment is nothing but
//! concatenated records (see [`crate::record`]):
//!
//! ```text
//! [len u32 LE][crc32c u32 LE][payload: protobuf binlog.v1.Event] [len][crc][payload] ...
//! ```
//!
//! There is no segment header or footer, so the bytes of a range of events
//! are exactly what the master ships and the slave appends: a relay log is
//! byte-identical to its master's binlog. Indexes are contiguous across
//! segments: a segment holds events `first ..= next_segment.first - 1`.
//!
//! Invariants the writer keeps:
//!
//! - the log only grows at its **tail** (the last segment), except for
//!   [`Binlog::truncate_after`] and [`Binlog::reset`];
//! - a new segment is started only *before* an append when the tail has
//!   reached `segment_bytes` **and** the previous append ended at a
//!   transaction boundary, so a transaction never spans two segments and
//!   every segment starts with a `Begin`;
//! - before the first byte goes into a new segment, the previous one is
//!   fdatasync'ed (whatever the fsync policy), so a crash can only ever lose
//!   a suffix of the log, never leave a hole in a sealed segment;
//! - only the tail may be empty;
//! - the tail file may go on past its last record with **zeros** written
//!   ahead ([`PREALLOC_AHEAD`]): a group's fdatasync then overwrites
//!   allocated blocks and need not write the inode (the file size), which
//!   halves its cost on ext4; a sealed segment ends at its last record (the
//!   zeros are cut, durably, before the next segment is created).
//!
//! # Recovery (open)
//!
//! Only the tail segment is read. It is scanned from its start; every record
//! is checked (length bounds, checksum, protobuf decode, index) and fed to
//! the [`BoundaryParser`]. The scan stops at the first torn, CRC-failing or
//! undecodable record. If nothing but zeros follows the last complete
//! transaction, they are the zeros written ahead and the file is kept as is;
//! otherwise the file is truncated to the end of the last complete
//! transaction (the last `Commit`): a torn tail **and** a trailing
//! partial transaction are both dropped (F5), and the truncation is made
//! durable before anything else is written. If that leaves the tail empty
//! and an earlier segment exists, the empty file is removed and the earlier
//! segment becomes the tail (and is recovered the same way). Well-framed
//! records that break the transaction structure (a `Begin` inside a
//! transaction, a wrong index, ...) are not a crash artefact: open fails with
//! [`BinlogError::Structure`] rather than dropping committed data.
//!
//! Sealed segments are not read at open: their extent comes from the file
//! names, and their sparse index is built (and every checksum verified) the
//! first time a reader seeks into them.
//!
//! # Durability
//!
//! [`Binlog::append`] is one `pwrite` of the caller's bytes (two when a full
//! tail is closed at a Commit); it does not fsync. It is all or nothing: if
//! any write (or the creation of a new segment) fails, everything the call
//! wrote is undone and the log is exactly where it was, still appendable, and
//! the error is an [`BinlogError::Io`] the caller may retry after (a full disk,
//! too many open files). Only if the undo itself fails is the writer failed.
//!
//! [`Binlog::sync`] fdatasyncs the tail (and the directory after a new segment
//! was created) and advances [`Binlog::durable_index`] and
//! [`Binlog::durable_boundary`]. *When* to sync is not the caller's decision:
//! the log's [`Durability`] applies the [`FsyncPolicy`] through
//! [`Binlog::sync_if_due`] (after each group append), [`Binlog::tick`] (from a
//! timer) and [`Binlog::sync_before_state_flush`], and says what counts as
//! durable ([`Binlog::shippable_index`], [`Binlog::received_index`]); see
//! [`crate::durability`]. An fsync failure ([`BinlogError::Fsync`]) fails the
//! writer for good (the kernel may have dropped the dirty pages, so a later
//! fsync succeeding proves nothing): reopen the binlog to recover from what is
//! really on disk.
//!
//! # Seeking
//!
//! Every segment keeps a **sparse index**, one `(index, offset)` entry every
//! ~64 KiB, in memory: the writer maintains it for the segments it writes,
//! readers build it lazily for sealed segments found at open. Finding event
//! `i` is a binary search over segments, a binary search in the sparse index
//! and a scan of at most ~64 KiB of record headers.

mod reader;
mod segment;

pub use self::reader::BinlogReader;
use self::segment::{Meta, SPARSE_INTERVAL, Scan, Scanner, Segment, Shared, SparseEntry};
use crate::boundary::{BoundaryError, BoundaryParser, Step};
use crate::durability::Durability;
use crate::record::{self, EventKind, HEADER_LEN, KindTag, RecordError};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

/// When the binlog fsyncs; see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every group of transactions is durable before it counts (group commit).
    #[default]
    Always,
    /// At most once a second: up to a second of writes can be lost on power loss.
    Everysec,
    /// Never explicitly; the kernel writes back when it wants.
    No,
}

impl FsyncPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Everysec => "everysec",
            FsyncPolicy::No => "no",
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error parsing an [`FsyncPolicy`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("invalid fsync policy {0:?}: expected \"always\", \"everysec\" or \"no\"")]
pub struct ParseFsyncPolicyError(pub String);

impl FromStr for FsyncPolicy {
    type Err = ParseFsyncPolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "everysec" => Ok(FsyncPolicy::Everysec),
            "no" => Ok(FsyncPolicy::No),
            _ => Err(ParseFsyncPolicyError(s.to_string())),
        }
    }
}

/// Binlog settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BinlogOptions {
    /// A new segment is started (at a transaction boundary) once the tail
    /// reaches this size. Default 64 MiB.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
}

impl Default for BinlogOptions {
    fn default() -> Self {
        BinlogOptions {
            segment_bytes: 64 << 20,
            fsync: FsyncPolicy::Always,
        }
    }
}

/// Zeros kept written ahead of the tail's last record (see `write_ahead`).
/// Recovery knows them from damage: after the last complete transaction
/// there is nothing but zeros.
pub const PREALLOC_AHEAD: u64 = 1 << 20;

/// Everything that can go wrong with the binlog.
#[derive(Debug, thiserror::Error)]
pub enum BinlogError {
    /// A write, read or file creation failed. From `append`, nothing of the
    /// call was kept: the log is unchanged and may be appended to again.
    #[error("binlog I/O error: {0}")]
    Io(#[from] io::Error),
    /// An fsync (of a segment or of the directory) failed: the writer is
    /// failed for good, see the module docs.
    #[error("binlog fsync failed: {0}")]
    Fsync(io::Error),
    /// A record on disk is damaged where it must be intact (not at the tail
    /// during recovery, where damage is truncated instead).
    #[error("corrupt binlog record in {} at offset {offset}: {source}", segment.display())]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        source: RecordError,
    },
    /// Intact records in the tail segment that do not form valid transactions.
    #[error("binlog segment {} breaks the transaction structure at offset {offset}: {source}", segment.display())]
    Structure {
        segment: PathBuf,
        offset: u64,
        source: BoundaryError,
    },
    #[error("binlog transaction structure: {0}")]
    Boundary(#[from] BoundaryError),
    /// An append does not start at the next index.
    #[error("binlog append must start at index {expected}, got {got}")]
    NotContiguous { expected: u64, got: u64 },
    /// The records passed to `append` do not match what the call says they are.
    #[error("bad binlog append at index {index}: {reason}")]
    BadBatch { index: u64, reason: String },
    /// A record passed to `append` fails its header or checksum check.
    #[error("bad record in binlog append at index {index}: {source}")]
    BadRecord { index: u64, source: RecordError },
    #[error("binlog index {index} is purged (the first stored event is {first})")]
    Purged { index: u64, first: u64 },
    #[error("binlog index {index} is beyond the last event {last}")]
    OutOfRange { index: u64, last: u64 },
    /// `truncate_after` was asked to cut inside a transaction.
    #[error("binlog index {index} is not a transaction boundary")]
    NotBoundary { index: u64 },
    #[error("invalid binlog argument: {0}")]
    InvalidArgument(String),
    /// An earlier write or fsync failed in a way that leaves the in-memory
    /// state unreliable; reopen the binlog.
    #[error("binlog writer failed earlier ({0}); reopen the binlog")]
    Failed(String),
}

impl BinlogError {
    /// The OS error number behind an I/O error (`ENOSPC`, `EMFILE`, ...), if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            BinlogError::Io(e) | BinlogError::Fsync(e) => e.raw_os_error(),
            _ => None,
        }
    }

    /// True for an I/O error that says a resource ran out (`ENOSPC`,
    /// `EDQUOT`, `EMFILE`, `ENFILE`): retrying once it is freed can succeed.
    pub fn is_out_of_resources(&self) -> bool {
        matches!(
            self.raw_os_error(),
            Some(libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE)
        )
    }

    /// True when the writer can no longer be used (an fsync failed, or a failed
    /// write could not be undone): the binlog must be reopened.
    pub fn is_fatal(&self) -> bool {
        matches!(self, BinlogError::Fsync(_) | BinlogError::Failed(_))
    }
}

/// What [`Binlog::open`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Bytes cut from the tail: a torn record and/or a partial transaction.
    pub truncated_bytes: u64,
    /// Complete, valid events cut because their transaction had no `Commit`.
    pub truncated_events: u64,
    /// Last event after recovery; always a transaction boundary.
    pub last_index: u64,
    /// Seq of the transaction ending at `last_index`, if the tail scan saw it.
    pub last_seq: Option<u64>,
    /// Segment files after recovery.
    pub segments: usize,
}

/// The binlog writer. There is one per directory; it is `Send`, and
/// [`BinlogReader`]s obtained from it read concurrently.
pub struct Binlog {
    shared: Arc<Shared>,
    opts: BinlogOptions,
    /// Read-write handle of the tail segment.
    tail: Arc<File>,
    tail_id: u64,
    tail_len: u64,
    /// Length of the tail file: bytes in `[tail_len, zeroed_to)` are zeros
    /// written ahead of the log (see [`PREALLOC_AHEAD`]).
    zeroed_to: u64,
    /// Offset of the tail's last sparse entry (`None` while the tail is empty).
    last_sparse_off: Option<u64>,
    first_index: u64,
    next_index: u64,
    total_bytes: u64,
    last_seq: Option<u64>,
    /// The last event written is a boundary (or the log is empty).
    at_boundary: bool,
    durable_index: u64,
    /// Last transaction boundary (Commit index, or where the log starts) written.
    last_boundary: u64,
    /// `last_boundary` as of the last successful sync.
    durable_boundary: u64,
    /// A segment file was created since the directory was last fsynced.
    dir_dirty: bool,
    durability: Durability,
    failed: Option<String>,
    /// Reused by `append` for the sparse entries of one call.
    sparse_scratch: Vec<SparseEntry>,
    /// Times every fdatasync of the tail (`tern_fsync_duration_seconds`).
    fsync_observer: Option<prometheus_client::metrics::histogram::Histogram>,
}

impl fmt::Debug for Binlog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binlog")
            .field("dir", &self.shared.dir)
            .field("first_index", &self.first_index)
            .field("next_index", &self.next_index)
            .field("durable_index", &self.durable_index)
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

/// The writer's position before an `append`, to undo it.
struct Mark {
    tail: Arc<File>,
    tail_id: u64,
    tail_len: u64,
    last_sparse_off: Option<u64>,
    next_index: u64,
    total_bytes: u64,
    last_seq: Option<u64>,
    at_boundary: bool,
    last_boundary: u64,
}

/// Result of scanning a tail segment.
struct TailScan {
    file_len: u64,
    /// `file_len` when everything after `good_len` is zeros (written ahead).
    zeroed_to: u64,
    /// End of the last complete transaction.
    good_len: u64,
    last_index: u64,
    last_seq: Option<u64>,
    /// Valid events after the last boundary.
    partial_events: u64,
    sparse: Vec<SparseEntry>,
}

impl Binlog {
    /// Opens (creating it if needed) the binlog in `dir` and recovers its
    /// tail; see the module docs. An empty directory gives an empty log whose
    /// next index is 1.
    pub fn open(dir: &Path, opts: BinlogOptions) -> Result<(Binlog, RecoveryReport), BinlogError> {
        std::fs::create_dir_all(dir)?;
        let mut firsts = segment::list_segments(dir)?;
        if firsts.is_empty() {
            create_segment(dir, 1)?;
            segment::sync_dir(dir)?;
            firsts.push(1);
        }
        let mut report = RecoveryReport::default();
        let (tail, scan) = loop {
            let first = *firsts.last().expect("at least one segment");
            let path = dir.join(segment::segment_name(first));
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let mut scan = scan_tail(&file, &path, first)?;
            // Zeros after the data are the ones written ahead, not damage.
            let data_end = data_end(&file, scan.good_len, scan.file_len)?;
            if scan.good_len < scan.file_len && data_end == scan.good_len {
                scan.zeroed_to = scan.file_len;
            } else if scan.good_len < scan.file_len {
                tracing::warn!(
                    segment = %path.display(),
                    truncated_bytes = data_end - scan.good_len,
                    partial_events = scan.partial_events,
                    last_index = scan.last_index,
                    "binlog recovery: truncating the tail to the last complete transaction"
                );
                file.set_len(scan.good_len)?;
                file.sync_all()?;
                report.truncated_bytes += data_end - scan.good_len;
                report.truncated_events += scan.partial_events;
            }
            if scan.good_len == 0 && firsts.len() > 1 {
                tracing::info!(segment = %path.display(), "binlog recovery: removing an empty tail segment");
                drop(file);
                std::fs::remove_file(&path)?;
                segment::sync_dir(dir)?;
                firsts.pop();
                continue;
            }
            // Whatever recovery found is what we build on: make sure it is on disk.
            file.sync_data()?;
            break (file, scan);
        };

        let mut meta = Meta::new(scan.last_index + 1);
        let mut total_bytes = scan.good_len;
        for (i, &first) in firsts[..firsts.len() - 1].iter().enumerate() {
            let len = std::fs::metadata(dir.join(segment::segment_name(first)))?.len();
            if len == 0 {
                tracing::warn!(first, "binlog: empty sealed segment; reading it will fail");
            }
            total_bytes += len;
            let id = meta.alloc_id();
            meta.segs.push(Segment {
                id,
                first_index: first,
                last_index: firsts[i + 1] - 1,
                len,
                file: None,
                sparse: None,
            });
        }
        let tail = Arc::new(tail);
        let tail_id = meta.alloc_id();
        let tail_first = *firsts.last().expect("at least one segment");
        let last_sparse_off = scan.sparse.last().map(|e| e.1);
        meta.segs.push(Segment {
            id: tail_id,
            first_index: tail_first,
            last_index: scan.last_index,
            len: scan.good_len,
            file: Some(tail.clone()),
            sparse: Some(scan.sparse),
        });
        let first_index = meta.first_index();
        report.last_index = scan.last_index;
        report.last_seq = scan.last_seq;
        report.segments = meta.segs.len();
        tracing::info!(
            dir = %dir.display(),
            first_index,
            last_index = scan.last_index,
            segments = report.segments,
            "binlog opened"
        );
        let binlog = Binlog {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                meta: RwLock::new(meta),
            }),
            opts,
            tail,
            tail_id,
            tail_len: scan.good_len,
            zeroed_to: scan.zeroed_to.max(scan.good_len),
            last_sparse_off,
            first_index,
            next_index: scan.last_index + 1,
            total_bytes,
            last_seq: scan.last_seq,
            at_boundary: true,
            durable_index: scan.last_index,
            last_boundary: scan.last_index,
            durable_boundary: scan.last_index,
            dir_dirty: false,
            durability: Durability::new(opts.fsync),
            failed: None,
            sparse_scratch: Vec::new(),
            fsync_observer: None,
        };
        Ok((binlog, report))
    }

    /// First event still stored; equals [`next_index`](Self::next_index) when
    /// the log is empty.
    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    /// Last event appended (0 if none ever). Right after `open`, `reset` or
    /// `truncate_after` it is a transaction boundary.
    pub fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    /// Index the next append must start with.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Seq of the last complete transaction, if known: found by the tail scan
    /// at open, kept up to date by appends that end at a boundary, derived
    /// by `truncate_after`, or given to `reset`. `None` when unknown (an empty
    /// log after a reset and a restart, for instance); `Some(0)` means "no
    /// transaction yet, the next one is 1".
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// True when the last event written ends a transaction (or the log is empty).
    pub fn at_boundary(&self) -> bool {
        self.at_boundary
    }

    /// Last index known to be on stable storage.
    pub fn durable_index(&self) -> u64 {
        self.durable_index
    }

    /// Last transaction boundary written (a Commit's index, or the index the
    /// log starts after); it may not be durable yet.
    pub fn last_boundary(&self) -> u64 {
        self.last_boundary
    }

    /// Last transaction boundary known to be on stable storage.
    pub fn durable_boundary(&self) -> u64 {
        self.durable_boundary
    }

    /// Last index a master may ship to slaves under the fsync policy.
    pub fn shippable_index(&self) -> u64 {
        self.durability
            .shippable(self.last_index(), self.durable_index)
    }

    /// Last boundary a slave may acknowledge as received under the fsync policy
    /// (I3: durable in the relay log, except under `no`).
    pub fn received_index(&self) -> u64 {
        self.durability
            .received(self.last_boundary, self.durable_boundary)
    }

    /// The fsync policy this log follows.
    pub fn durability(&self) -> &Durability {
        &self.durability
    }

    /// Bytes of all segment files.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn options(&self) -> &BinlogOptions {
        &self.opts
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.shared.read().segs.len()
    }

    /// A new reader, positioned at [`first_index`](Self::first_index); see
    /// [`BinlogReader::seek`].
    pub fn reader(&self) -> BinlogReader {
        BinlogReader::new(self.shared.clone(), self.first_index)
    }

    /// Appends already-framed records for events `first_index ..= last_index`
    /// (`first_index` must be [`next_index`](Self::next_index)) with a single
    /// positioned write, without fsync.
    ///
    /// The records are walked once, header and checksum only (no decode):
    /// there must be exactly `last_index - first_index + 1` of them, each
    /// carrying its own index, and `records` must end with the last one. The
    /// batch must fit the transaction structure at its edges: it starts with
    /// a `Begin` if the log is at a boundary (and not with one otherwise),
    /// and `ends_at_boundary` must be true exactly when its last record is a
    /// `Commit` (whose seq becomes [`last_seq`](Self::last_seq)).
    ///
    /// Before writing, a new segment is started if the tail has reached
    /// `segment_bytes` and the log is at a boundary. A full tail that is inside
    /// a transaction is closed at the first `Commit` of `records`, so segments
    /// stay near `segment_bytes` even when every batch ends mid-transaction (a
    /// catching-up slave's relay log); the append is then two writes.
    ///
    /// All or nothing: on an error nothing of `records` is kept (see the
    /// module docs), unless the error [`is_fatal`](BinlogError::is_fatal).
    pub fn append(
        &mut self,
        records: &[u8],
        first_index: u64,
        last_index: u64,
        ends_at_boundary: bool,
    ) -> Result<(), BinlogError> {
        self.check_failed()?;
        let mark = self.mark();
        let res = if self.tail_len >= self.opts.segment_bytes
            && !self.at_boundary
            && first_index == self.next_index
            && let Some((split, commit_index)) = end_of_first_commit(records, first_index)
            && commit_index < last_index
        {
            self.append_unsplit(&records[..split], first_index, commit_index, true)
                .and_then(|()| {
                    self.append_unsplit(
                        &records[split..],
                        commit_index + 1,
                        last_index,
                        ends_at_boundary,
                    )
                })
        } else {
            self.append_unsplit(records, first_index, last_index, ends_at_boundary)
        };
        if let Err(e) = res {
            if !e.is_fatal()
                && let Err(undo) = self.rewind(&mark)
            {
                self.failed = Some(format!(
                    "append failed ({e}) and could not be undone ({undo})"
                ));
                return Err(BinlogError::Failed(format!(
                    "append failed ({e}) and could not be undone ({undo})"
                )));
            }
            return Err(e);
        }
        Ok(())
    }

    /// Where the writer is, for [`rewind`](Self::rewind).
    fn mark(&self) -> Mark {
        Mark {
            tail: self.tail.clone(),
            tail_id: self.tail_id,
            tail_len: self.tail_len,
            last_sparse_off: self.last_sparse_off,
            next_index: self.next_index,
            total_bytes: self.total_bytes,
            last_seq: self.last_seq,
            at_boundary: self.at_boundary,
            last_boundary: self.last_boundary,
        }
    }

    /// Undoes a failed `append` back to `mark`: removes a segment it created,
    /// cuts the tail back, and restores the in-memory state. Bytes it had
    /// written that an fsync (at a roll) made durable are cut durably.
    fn rewind(&mut self, mark: &Mark) -> Result<(), BinlogError> {
        let created: Vec<u64> = {
            let mut meta = self.shared.write();
            let pos = meta
                .segs
                .iter()
                .position(|s| s.id == mark.tail_id)
                .ok_or_else(|| {
                    BinlogError::InvalidArgument("the marked tail segment is gone".into())
                })?;
            let created: Vec<u64> = meta
                .segs
                .split_off(pos + 1)
                .iter()
                .map(|s| s.first_index)
                .collect();
            let moved = meta.segs[pos].len != mark.tail_len
                || meta.next_index != mark.next_index
                || !created.is_empty();
            let seg = &mut meta.segs[pos];
            seg.len = mark.tail_len;
            seg.last_index = mark.next_index - 1;
            if let Some(sparse) = seg.sparse.as_mut() {
                sparse.retain(|e| e.1 < mark.tail_len);
            }
            meta.next_index = mark.next_index;
            if moved {
                meta.epoch += 1;
            }
            created
        };
        let was_durable = self.durable_index >= mark.next_index;
        self.tail = mark.tail.clone();
        self.tail_id = mark.tail_id;
        self.tail_len = mark.tail_len;
        self.last_sparse_off = mark.last_sparse_off;
        self.next_index = mark.next_index;
        self.total_bytes = mark.total_bytes;
        self.last_seq = mark.last_seq;
        self.at_boundary = mark.at_boundary;
        self.last_boundary = mark.last_boundary;
        self.durable_index = self.durable_index.min(mark.next_index - 1);
        self.durable_boundary = self.durable_boundary.min(mark.last_boundary);
        for &first in created.iter().rev() {
            remove_if_exists(&self.shared.path(first))?;
        }
        // Cutting the tail also drops the zeros written ahead of it.
        self.zeroed_to = mark.tail_len;
        if self.tail.metadata()?.len() != mark.tail_len {
            self.tail.set_len(mark.tail_len)?;
            if was_durable {
                self.tail.sync_data()?;
            }
        }
        if !created.is_empty() {
            tracing::debug!(segments = ?created, "binlog: removed segments of a failed append");
        }
        Ok(())
    }

    fn append_unsplit(
        &mut self,
        records: &[u8],
        first_index: u64,
        last_index: u64,
        ends_at_boundary: bool,
    ) -> Result<(), BinlogError> {
        self.check_failed()?;
        if first_index != self.next_index {
            return Err(BinlogError::NotContiguous {
                expected: self.next_index,
                got: first_index,
            });
        }
        if last_index < first_index || records.is_empty() {
            if records.is_empty() && last_index.checked_add(1) == Some(first_index) {
                return Ok(());
            }
            return Err(BinlogError::BadBatch {
                index: first_index,
                reason: format!(
                    "{} bytes of records for events {first_index}..={last_index}",
                    records.len()
                ),
            });
        }
        // The roll decision does not depend on the records, so sparse entries
        // can be computed (at the file offsets they will have) while checking.
        let roll =
            self.tail_len >= self.opts.segment_bytes && self.at_boundary && self.tail_len > 0;
        let mut sparse = std::mem::take(&mut self.sparse_scratch);
        sparse.clear();
        let (base, last_entry) = if roll {
            (0, None)
        } else {
            (self.tail_len, self.last_sparse_off)
        };
        let checked = self.check_batch(
            records,
            first_index,
            last_index,
            ends_at_boundary,
            base,
            last_entry,
            &mut sparse,
        );
        self.sparse_scratch = sparse;
        let (new_seq, last_commit) = checked?;
        if roll {
            self.roll()?;
        }
        self.write_ahead(records.len() as u64);

        // A partial write is cut off by `append`'s rewind.
        self.tail.write_all_at(records, self.tail_len)?;
        let len = records.len() as u64;
        self.tail_len += len;
        self.total_bytes += len;
        self.next_index = last_index + 1;
        self.at_boundary = ends_at_boundary;
        if let Some(seq) = new_seq {
            self.last_seq = Some(seq);
        }
        if let Some(commit) = last_commit {
            self.last_boundary = commit;
        }
        if let Some(&(_, o)) = self.sparse_scratch.last() {
            self.last_sparse_off = Some(o);
        }
        let mut meta = self.shared.write();
        meta.next_index = self.next_index;
        let tail = meta.segs.last_mut().expect("tail segment");
        debug_assert_eq!(tail.id, self.tail_id);
        tail.len = self.tail_len;
        tail.last_index = last_index;
        tail.sparse
            .get_or_insert_with(Vec::new)
            .extend_from_slice(&self.sparse_scratch);
        Ok(())
    }

    /// Validates an append's records and collects the sparse-index entries
    /// they add when written at file offset `base` of a segment whose last
    /// entry is at `last_entry`. Returns the seq of the final `Commit` (when
    /// the batch ends with one) and the index of the last `Commit` in it.
    #[allow(clippy::too_many_arguments)]
    fn check_batch(
        &self,
        records: &[u8],
        first_index: u64,
        last_index: u64,
        ends_at_boundary: bool,
        base: u64,
        last_entry: Option<u64>,
        sparse: &mut Vec<SparseEntry>,
    ) -> Result<(Option<u64>, Option<u64>), BinlogError> {
        let bad = |index, reason: String| BinlogError::BadBatch { index, reason };
        let mut last_commit = None;
        let mut off = 0usize;
        let mut index = first_index;
        let mut last_frame: &[u8] = &[];
        let mut last_kind = KindTag::Begin;
        let mut next_entry = last_entry.map_or(0, |o| o + SPARSE_INTERVAL);
        while off < records.len() {
            if index > last_index {
                return Err(bad(
                    index,
                    format!(
                        "more records than the {} announced",
                        last_index - first_index + 1
                    ),
                ));
            }
            let n = record::frame_len(&records[off..])
                .map_err(|source| BinlogError::BadRecord { index, source })?;
            let frame = &records[off..off + n];
            let (got, kind) = record::peek(frame)
                .ok_or_else(|| bad(index, "record does not start with its index".into()))?;
            if got != index {
                return Err(bad(index, format!("record carries index {got}")));
            }
            if index == first_index {
                match (self.at_boundary, kind) {
                    (true, KindTag::Put | KindTag::Delete) => {
                        Err(BoundaryError::DataOutsideTxn { index })
                    }
                    (true, KindTag::Commit) => Err(BoundaryError::CommitOutsideTxn { index }),
                    (false, KindTag::Begin) => Err(BoundaryError::BeginInTxn { index }),
                    _ => Ok(()),
                }?;
            }
            let file_off = base + off as u64;
            if file_off >= next_entry {
                sparse.push((index, file_off));
                next_entry = file_off + SPARSE_INTERVAL;
            }
            if kind == KindTag::Commit {
                last_commit = Some(index);
            }
            last_frame = frame;
            last_kind = kind;
            off += n;
            index += 1;
        }
        if index != last_index + 1 {
            return Err(bad(
                index,
                format!(
                    "{} records where {} were announced",
                    index - first_index,
                    last_index - first_index + 1
                ),
            ));
        }
        if ends_at_boundary != (last_kind == KindTag::Commit) {
            return Err(bad(
                last_index,
                format!(
                    "ends_at_boundary is {ends_at_boundary} but the last record is a {last_kind:?}"
                ),
            ));
        }
        if !ends_at_boundary {
            return Ok((None, last_commit));
        }
        match record::decode_payload(&last_frame[HEADER_LEN..]) {
            Ok(record::Event {
                kind: EventKind::Commit { seq },
                ..
            }) => Ok((Some(seq), last_commit)),
            Ok(ev) => Err(bad(last_index, format!("expected a Commit, found {ev:?}"))),
            Err(source) => Err(BinlogError::BadRecord {
                index: last_index,
                source,
            }),
        }
    }

    /// Seals the tail (durably) and starts a new, empty segment at `next_index`.
    fn roll(&mut self) -> Result<(), BinlogError> {
        if self.zeroed_to > self.tail_len {
            // A sealed segment ends with its last record (open takes its
            // length from the file): drop the zeros written ahead, durably,
            // before the next segment exists.
            if let Err(e) = self.tail.set_len(self.tail_len) {
                return Err(e.into());
            }
            self.zeroed_to = self.tail_len;
            if let Err(e) = self.tail.sync_all() {
                self.failed = Some(format!("fsync failed: {e}"));
                return Err(BinlogError::Fsync(e));
            }
            self.durable_index = self.last_index();
            self.durable_boundary = self.last_boundary;
        }
        if self.durable_index < self.last_index() {
            self.fsync_tail()?;
            self.durable_index = self.last_index();
            // The tail is sealed at a boundary.
            self.durable_boundary = self.last_boundary;
        }
        let first = self.next_index;
        let file = Arc::new(create_segment(&self.shared.dir, first)?);
        self.dir_dirty = true;
        let mut meta = self.shared.write();
        let id = meta.alloc_id();
        meta.segs.push(Segment {
            id,
            first_index: first,
            last_index: first - 1,
            len: 0,
            file: Some(file.clone()),
            sparse: Some(Vec::new()),
        });
        drop(meta);
        tracing::debug!(first, "binlog: new segment");
        self.tail = file;
        self.tail_id = id;
        self.tail_len = 0;
        self.zeroed_to = 0;
        self.last_sparse_off = None;
        Ok(())
    }

    /// Before writing `len` bytes at the tail: when they would pass the
    /// zeros written ahead, writes [`PREALLOC_AHEAD`] more zeros past them.
    /// An fdatasync that only overwrites zeros writes the data alone; one
    /// that grows the file must write the inode too, and costs about twice
    /// as much on ext4 (PostgreSQL zero-fills its WAL segments for this).
    /// Best effort: if the zeros cannot be written (a full disk), the file
    /// keeps growing with the log, as without.
    fn write_ahead(&mut self, len: u64) {
        let end = self.tail_len + len;
        if end <= self.zeroed_to {
            return;
        }
        let from = self.zeroed_to.max(self.tail_len);
        let to = (end + PREALLOC_AHEAD).next_multiple_of(4096);
        let zeros = [0u8; 64 << 10];
        let mut at = from;
        let written = loop {
            if at >= to {
                break Ok(());
            }
            let n = (to - at).min(zeros.len() as u64) as usize;
            if let Err(e) = self.tail.write_all_at(&zeros[..n], at) {
                break Err(e);
            }
            at += n as u64;
        };
        match written {
            Ok(()) => self.zeroed_to = to,
            Err(e) => {
                tracing::debug!(error = %e, "binlog: could not write zeros ahead of the tail");
                // Whatever got written is zeros; keep the file as long as we know.
                let _ = self.tail.set_len(self.tail_len.max(self.zeroed_to));
            }
        }
    }

    /// From now on every fdatasync of the tail is timed into `h` (seconds).
    pub fn observe_fsyncs(&mut self, h: prometheus_client::metrics::histogram::Histogram) {
        self.fsync_observer = Some(h);
    }

    fn fsync_tail(&mut self) -> Result<(), BinlogError> {
        let started = std::time::Instant::now();
        let synced = self.tail.sync_data();
        if let Some(h) = &self.fsync_observer {
            h.observe(started.elapsed().as_secs_f64());
        }
        if let Err(e) = synced {
            self.failed = Some(format!("fsync failed: {e}"));
            return Err(BinlogError::Fsync(e));
        }
        Ok(())
    }

    /// fdatasyncs the tail (and the directory if a segment was created since
    /// the last sync), then advances [`durable_index`](Self::durable_index)
    /// to [`last_index`](Self::last_index). Cheap when nothing is pending.
    pub fn sync(&mut self) -> Result<(), BinlogError> {
        self.check_failed()?;
        let target = self.last_index();
        if self.durable_index >= target && !self.dir_dirty {
            return Ok(());
        }
        self.fsync_tail()?;
        if self.dir_dirty {
            if let Err(e) = segment::sync_dir(&self.shared.dir) {
                self.failed = Some(format!("directory fsync failed: {e}"));
                return Err(BinlogError::Fsync(e));
            }
            self.dir_dirty = false;
        }
        self.durable_index = target;
        self.durable_boundary = self.last_boundary;
        self.durability.synced();
        Ok(())
    }

    /// Something written is not durable yet.
    fn sync_pending(&self) -> bool {
        self.durable_index < self.last_index() || self.dir_dirty
    }

    /// Syncs if the fsync policy says so right after an append: `always` →
    /// yes (call it once per group of transactions: group commit), `everysec`
    /// → if the last sync is a second old, `no` → never. Returns whether it
    /// synced.
    pub fn sync_if_due(&mut self) -> Result<bool, BinlogError> {
        if self.durability.due_after_append(self.sync_pending()) {
            self.sync()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Periodic work of the policy: under `everysec`, syncs what is pending once
    /// the last sync is a second old. Call it every
    /// [`Durability::tick_interval`] while the log may be idle. Returns whether
    /// it synced.
    pub fn tick(&mut self) -> Result<bool, BinlogError> {
        if self.durability.due_on_tick(self.sync_pending()) {
            self.sync()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Makes everything written durable, whatever the policy: call it before
    /// flushing RocksDB, so the state on disk is never ahead of the log.
    pub fn sync_before_state_flush(&mut self) -> Result<(), BinlogError> {
        self.sync()
    }

    /// Drops every event after `index`, which must be a transaction boundary
    /// still stored (`first_index - 1 <= index <= last_index`); used by a slave
    /// to roll back a partial transaction. Later segments are removed, the
    /// segment holding `index + 1` is cut there and becomes the tail. Durable
    /// when it returns. Readers re-find their position afterwards.
    pub fn truncate_after(&mut self, index: u64) -> Result<(), BinlogError> {
        self.check_failed()?;
        let last = self.last_index();
        if index >= last {
            if index == last {
                return Ok(());
            }
            return Err(BinlogError::OutOfRange { index, last });
        }
        if index < self.first_index.saturating_sub(1) {
            return Err(BinlogError::Purged {
                index,
                first: self.first_index,
            });
        }
        let cut = index + 1;
        let loc = self.shared.locate(cut)?;
        let path = self.shared.path(loc.seg_first);
        let begin_seq = match event_at(&loc.file, &path, loc.offset, cut)? {
            (KindTag::Begin, Some(seq)) => seq,
            _ => return Err(BinlogError::NotBoundary { index }),
        };
        // The cut segment becomes the tail: it needs a writable handle.
        let file = if loc.seg_id == self.tail_id {
            self.tail.clone()
        } else {
            Arc::new(OpenOptions::new().read(true).write(true).open(&path)?)
        };

        let later: Vec<u64> =
            {
                let mut meta = self.shared.write();
                let pos = meta.segs.iter().position(|s| s.id == loc.seg_id).ok_or(
                    BinlogError::Purged {
                        index,
                        first: meta.first_index(),
                    },
                )?;
                let later = meta
                    .segs
                    .split_off(pos + 1)
                    .iter()
                    .map(|s| s.first_index)
                    .collect();
                meta.epoch += 1;
                meta.next_index = cut;
                let seg = &mut meta.segs[pos];
                seg.len = loc.offset;
                seg.last_index = index;
                seg.file = Some(file.clone());
                if let Some(sparse) = seg.sparse.as_mut() {
                    sparse.retain(|e| e.1 < loc.offset);
                }
                later
            };
        // From here on memory says "cut"; if the disk cannot follow, fail.
        let on_disk = (|| -> io::Result<()> {
            for &first in later.iter().rev() {
                remove_if_exists(&self.shared.path(first))?;
            }
            if !later.is_empty() {
                segment::sync_dir(&self.shared.dir)?;
            }
            file.set_len(loc.offset)?;
            file.sync_all()
        })();
        if let Err(e) = on_disk {
            self.failed = Some(format!("truncate_after({index}) failed: {e}"));
            return Err(e.into());
        }
        let meta = self.shared.read();
        let seg = meta.segs.last().expect("tail segment");
        self.tail = file;
        self.tail_id = seg.id;
        self.tail_len = loc.offset;
        self.zeroed_to = loc.offset;
        self.last_sparse_off = seg.sparse.as_ref().and_then(|s| s.last()).map(|e| e.1);
        self.first_index = meta.first_index();
        self.total_bytes = meta.segs.iter().map(|s| s.len).sum();
        drop(meta);
        self.next_index = cut;
        self.durable_index = self.durable_index.min(index);
        self.last_boundary = index;
        self.durable_boundary = self.durable_boundary.min(index);
        self.at_boundary = true;
        self.last_seq = Some(begin_seq - 1);
        tracing::info!(index, removed_segments = later.len(), "binlog truncated");
        Ok(())
    }

    /// Removes the sealed segments whose every event is `<= index`, oldest
    /// first, never the tail. Returns how many were removed. Readers inside a
    /// removed segment keep reading it; others get [`BinlogError::Purged`].
    pub fn purge_to(&mut self, index: u64) -> Result<u64, BinlogError> {
        self.check_failed()?;
        let removed: Vec<(u64, u64)> = {
            let mut meta = self.shared.write();
            let sealed = meta.segs.len().saturating_sub(1);
            let k = meta.segs[..sealed]
                .iter()
                .take_while(|s| s.last_index <= index)
                .count();
            meta.segs
                .drain(..k)
                .map(|s| (s.first_index, s.len))
                .collect()
        };
        if removed.is_empty() {
            return Ok(0);
        }
        self.first_index = self.shared.read().first_index();
        for &(first, len) in &removed {
            self.total_bytes -= len;
            remove_if_exists(&self.shared.path(first))?;
        }
        // Make the removal stick in order, so a crash cannot resurrect an
        // older segment after a newer one is gone.
        segment::sync_dir(&self.shared.dir)?;
        tracing::info!(
            index,
            removed = removed.len(),
            first_index = self.first_index,
            "binlog purged"
        );
        Ok(removed.len() as u64)
    }

    /// Drops everything and continues at `next_index` (>= 1) with an empty
    /// segment named after it; `last_seq` is the seq of the transaction ending
    /// at `next_index - 1`, if known. Used by a slave after a full sync.
    /// Not atomic across a crash: record completion elsewhere.
    pub fn reset(&mut self, next_index: u64, last_seq: Option<u64>) -> Result<(), BinlogError> {
        self.check_failed()?;
        if next_index == 0 {
            return Err(BinlogError::InvalidArgument(
                "reset to index 0: indexes start at 1".into(),
            ));
        }
        let old: Vec<u64> = {
            let mut meta = self.shared.write();
            meta.epoch += 1;
            meta.next_index = next_index;
            meta.segs.drain(..).map(|s| s.first_index).collect()
        };
        let fresh = (|| -> io::Result<File> {
            for &first in old.iter().rev() {
                remove_if_exists(&self.shared.path(first))?;
            }
            segment::sync_dir(&self.shared.dir)?;
            let file = create_segment(&self.shared.dir, next_index)?;
            segment::sync_dir(&self.shared.dir)?;
            Ok(file)
        })();
        let file = match fresh {
            Ok(f) => Arc::new(f),
            Err(e) => {
                self.failed = Some(format!("reset({next_index}) failed: {e}"));
                return Err(e.into());
            }
        };
        let id = {
            let mut meta = self.shared.write();
            let id = meta.alloc_id();
            meta.segs.push(Segment {
                id,
                first_index: next_index,
                last_index: next_index - 1,
                len: 0,
                file: Some(file.clone()),
                sparse: Some(Vec::new()),
            });
            id
        };
        self.tail = file;
        self.tail_id = id;
        self.tail_len = 0;
        self.zeroed_to = 0;
        self.last_sparse_off = None;
        self.first_index = next_index;
        self.next_index = next_index;
        self.total_bytes = 0;
        self.last_seq = last_seq;
        self.at_boundary = true;
        self.durable_index = next_index - 1;
        self.last_boundary = next_index - 1;
        self.durable_boundary = next_index - 1;
        self.dir_dirty = false;
        tracing::info!(next_index, "binlog reset");
        Ok(())
    }

    /// Whether `index` is a transaction boundary: `index == last_index`, or
    /// event `index + 1` is a `Begin` (so `first_index - 1` always is, and 0
    /// is when `first_index == 1`). Reads at most one record.
    /// `Err(Purged)` if `index + 1 < first_index`, `Err(OutOfRange)` if
    /// `index > last_index`.
    pub fn is_boundary(&self, index: u64) -> Result<bool, BinlogError> {
        let last = self.last_index();
        if index > last {
            return Err(BinlogError::OutOfRange { index, last });
        }
        if index == last {
            return Ok(true);
        }
        if index < self.first_index.saturating_sub(1) {
            return Err(BinlogError::Purged {
                index,
                first: self.first_index,
            });
        }
        let loc = self.shared.locate(index + 1)?;
        let (kind, _) = event_at(
            &loc.file,
            &self.shared.path(loc.seg_first),
            loc.offset,
            index + 1,
        )?;
        Ok(kind == KindTag::Begin)
    }

    fn check_failed(&self) -> Result<(), BinlogError> {
        match &self.failed {
            Some(why) => Err(BinlogError::Failed(why.clone())),
            None => Ok(()),
        }
    }
}

/// Creates an empty segment file (it must not exist yet).
fn create_segment(dir: &Path, first_index: u64) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(segment::segment_name(first_index)))
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Kind (and, for a Begin, seq) of event `index`, read at `offset`.
fn event_at(
    file: &File,
    path: &Path,
    offset: u64,
    index: u64,
) -> Result<(KindTag, Option<u64>), BinlogError> {
    let frame = segment::read_frame_at(file, path, offset)?;
    let corrupt = |source| BinlogError::Corrupt {
        segment: path.to_path_buf(),
        offset,
        source,
    };
    let ev = record::decode_payload(&frame[HEADER_LEN..]).map_err(corrupt)?;
    if ev.index != index {
        return Err(corrupt(RecordError::Invalid(format!(
            "record carries index {} where event {index} belongs",
            ev.index
        ))));
    }
    Ok(match ev.kind {
        EventKind::Begin { seq, .. } => (KindTag::Begin, Some(seq)),
        other => (other.tag(), None),
    })
}

/// Whether `file` holds only zero bytes in `[from, to)`.
fn all_zero(file: &File, from: u64, to: u64) -> io::Result<bool> {
    Ok(data_end(file, from, to)? == from)
}

/// End of the last non-zero byte of `file` in `[from, to)` (`from` if none):
/// where the data ends and the zeros written ahead begin.
fn data_end(file: &File, from: u64, to: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; (to.saturating_sub(from)).min(1 << 20) as usize];
    let mut end = to;
    while end > from {
        let n = ((end - from) as usize).min(buf.len());
        let at = end - n as u64;
        file.read_exact_at(&mut buf[..n], at)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b != 0) {
            return Ok(at + i as u64 + 1);
        }
        end = at;
    }
    Ok(from)
}

/// Scans a tail segment: see "Recovery" in the module docs.
fn scan_tail(file: &File, path: &Path, first: u64) -> Result<TailScan, BinlogError> {
    let file_len = file.metadata()?.len();
    let mut scanner = Scanner::new(file, file_len);
    let mut parser = BoundaryParser::new(first - 1, None);
    let mut scan = TailScan {
        file_len,
        zeroed_to: 0,
        good_len: 0,
        last_index: first - 1,
        last_seq: None,
        partial_events: 0,
        sparse: Vec::new(),
    };
    loop {
        let (offset, frame) = match scanner.next_frame()? {
            Scan::End => break,
            Scan::Bad { offset, error } => {
                // Zeros to the end are the ones written ahead: the log's end.
                if !all_zero(file, offset, file_len)? {
                    tracing::warn!(segment = %path.display(), offset, %error, "binlog recovery: damaged record");
                }
                break;
            }
            Scan::Frame { offset, frame } => (offset, frame),
        };
        let ev = match record::decode_payload(&frame[HEADER_LEN..]) {
            Ok(ev) => ev,
            Err(error) => {
                tracing::warn!(segment = %path.display(), offset, %error, "binlog recovery: undecodable record");
                break;
            }
        };
        let step = parser.feed(&ev).map_err(|source| BinlogError::Structure {
            segment: path.to_path_buf(),
            offset,
            source,
        })?;
        if scan
            .sparse
            .last()
            .is_none_or(|e| offset >= e.1 + SPARSE_INTERVAL)
        {
            scan.sparse.push((ev.index, offset));
        }
        match step {
            Step::InTxn => scan.partial_events += 1,
            Step::Boundary { index, seq } => {
                scan.good_len = offset + frame.len() as u64;
                scan.last_index = index;
                scan.last_seq = Some(seq);
                scan.partial_events = 0;
            }
        }
    }
    let good_len = scan.good_len;
    scan.sparse.retain(|e| e.1 < good_len);
    Ok(scan)
}

/// Byte offset just past the first `Commit` record in `records` (whose first
/// record has index `first_index`), and that Commit's index. Reads headers and
/// tags only; `None` if there is none or the framing is bad (the append's own
/// checks then report it).
fn end_of_first_commit(records: &[u8], first_index: u64) -> Option<(usize, u64)> {
    let mut off = 0usize;
    let mut index = first_index;
    while off < records.len() {
        let len = record::frame_len(&records[off..]).ok()?;
        let (_, tag) = record::peek(&records[off..off + len])?;
        off += len;
        if tag == KindTag::Commit {
            return Some((off, index));
        }
        index += 1;
    }
    None
}

#[cfg(test)]
mod tests;
