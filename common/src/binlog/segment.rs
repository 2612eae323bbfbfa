//! Segment files: naming, the metadata the writer shares with readers, and
//! the scanning helpers (chunked frame scan, sparse-index build, bounded skip).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::BinlogError;
use crate::record::{self, HEADER_LEN, RecordError};

/// File name suffix of segment files.
pub(crate) const SUFFIX: &str = ".binlog";

/// One sparse-index entry is kept every this many bytes of a segment.
pub(crate) const SPARSE_INTERVAL: u64 = 64 << 10;

/// Read size for sequential scans (recovery, sparse-index builds).
pub(crate) const SCAN_CHUNK: usize = 1 << 20;

/// Read size for the bounded scan that follows a sparse-index lookup.
const SKIP_CHUNK: usize = 2 * SPARSE_INTERVAL as usize;

/// `{first_index:020}.binlog`
pub(crate) fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}{SUFFIX}")
}

/// The first index encoded in a segment file name, if it is one.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A sparse-index entry: event `index` starts at byte `offset` of its segment.
pub(crate) type SparseEntry = (u64, u64);

/// What the writer and the readers know about one segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Unique within the process; lets a reader notice that "its" segment
    /// was replaced by another one with the same name.
    pub id: u64,
    pub first_index: u64,
    /// `first_index - 1` when empty.
    pub last_index: u64,
    /// Bytes of complete records.
    pub len: u64,
    /// Opened lazily for segments found at open (read-only), eagerly
    /// (read-write) for segments the writer created or writes.
    pub file: Option<Arc<File>>,
    /// Ascending by index and offset; starts with `(first_index, 0)` when the
    /// segment is not empty. `None` until built (sealed segments found at open).
    pub sparse: Option<Vec<SparseEntry>>,
}

/// Segment list and write position, shared by the writer and its readers.
#[derive(Debug)]
pub(crate) struct Meta {
    /// Ascending by `first_index`; never empty; the last one is the tail.
    pub segs: Vec<Segment>,
    pub next_index: u64,
    /// Bumped by every truncation or reset, which invalidates reader cursors.
    pub epoch: u64,
    next_id: u64,
}

impl Meta {
    pub fn new(next_index: u64) -> Meta {
        Meta {
            segs: Vec::new(),
            next_index,
            epoch: 0,
            next_id: 1,
        }
    }

    pub fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn first_index(&self) -> u64 {
        self.segs.first().map_or(self.next_index, |s| s.first_index)
    }

    pub fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    pub fn is_tail(&self, id: u64) -> bool {
        self.segs.last().is_some_and(|s| s.id == id)
    }

    /// Position in `segs` of the segment that holds event `index`, or the
    /// tail when `index == next_index`. The caller checks the range.
    pub fn seg_for(&self, index: u64) -> Option<usize> {
        self.segs
            .partition_point(|s| s.first_index <= index)
            .checked_sub(1)
    }

    /// The segment `id`, known to start at `first` (binary search).
    pub fn find(&self, first: u64, id: u64) -> Option<&Segment> {
        let i = self
            .segs
            .binary_search_by_key(&first, |s| s.first_index)
            .ok()?;
        Some(&self.segs[i]).filter(|s| s.id == id)
    }

    pub fn by_id_mut(&mut self, id: u64) -> Option<&mut Segment> {
        self.segs.iter_mut().rev().find(|s| s.id == id)
    }

    /// `Ok` if event `index` can be read now, or is the next one to be written.
    pub fn check_readable(&self, index: u64) -> Result<(), BinlogError> {
        let first = self.first_index();
        if index < first {
            return Err(BinlogError::Purged { index, first });
        }
        if index > self.next_index {
            return Err(BinlogError::OutOfRange {
                index,
                last: self.last_index(),
            });
        }
        Ok(())
    }
}

/// State shared by a [`super::Binlog`] and its [`super::BinlogReader`]s.
#[derive(Debug)]
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub meta: RwLock<Meta>,
}

/// Where event `index` starts.
pub(crate) struct Location {
    pub seg_id: u64,
    pub seg_first: u64,
    pub offset: u64,
    pub file: Arc<File>,
    /// `Meta::epoch` when the location was found.
    pub epoch: u64,
}

impl Shared {
    pub fn path(&self, first_index: u64) -> PathBuf {
        self.dir.join(segment_name(first_index))
    }

    // A panic while holding the lock cannot leave the metadata half-updated
    // in a way readers could trip on, so poisoning is ignored.
    pub fn read(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds where event `index` starts (`first_index <= index <= next_index`):
    /// binary search over the segments, then the sparse index (built and
    /// cached on first use for sealed segments), then a bounded scan of
    /// record headers.
    pub fn locate(&self, index: u64) -> Result<Location, BinlogError> {
        // Each retry fills in one missing piece (file handle, sparse index),
        // so this loops at most three times unless the writer purges or
        // truncates concurrently, in which case check_readable ends it.
        loop {
            enum Need {
                File {
                    id: u64,
                    first: u64,
                },
                Sparse {
                    id: u64,
                    first: u64,
                    last: u64,
                    len: u64,
                    file: Arc<File>,
                },
            }
            let need = {
                let meta = self.read();
                meta.check_readable(index)?;
                let Some(i) = meta.seg_for(index) else {
                    return Err(BinlogError::Purged {
                        index,
                        first: meta.first_index(),
                    });
                };
                let seg = &meta.segs[i];
                match (&seg.file, &seg.sparse) {
                    (None, _) => Need::File {
                        id: seg.id,
                        first: seg.first_index,
                    },
                    (Some(file), _) if index == seg.first_index || index == seg.last_index + 1 => {
                        let offset = if index == seg.first_index { 0 } else { seg.len };
                        return Ok(Location {
                            seg_id: seg.id,
                            seg_first: seg.first_index,
                            offset,
                            file: file.clone(),
                            epoch: meta.epoch,
                        });
                    }
                    (Some(file), Some(sparse)) => {
                        let at = sparse.partition_point(|e| e.0 <= index);
                        let (from_index, from_off) = at
                            .checked_sub(1)
                            .map_or((seg.first_index, 0), |k| sparse[k]);
                        let (id, first, len, file, epoch) =
                            (seg.id, seg.first_index, seg.len, file.clone(), meta.epoch);
                        drop(meta);
                        let offset = skip_records(
                            &file,
                            &self.path(first),
                            len,
                            from_off,
                            from_index,
                            index,
                        )?;
                        return Ok(Location {
                            seg_id: id,
                            seg_first: first,
                            offset,
                            file,
                            epoch,
                        });
                    }
                    (Some(file), None) => Need::Sparse {
                        id: seg.id,
                        first: seg.first_index,
                        last: seg.last_index,
                        len: seg.len,
                        file: file.clone(),
                    },
                }
            };
            match need {
                Need::File { id, first } => {
                    let file = match File::open(self.path(first)) {
                        Ok(f) => Arc::new(f),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            // Purged since we looked, unless someone else removed it.
                            let first = self.read().first_index();
                            if index < first {
                                return Err(BinlogError::Purged { index, first });
                            }
                            return Err(e.into());
                        }
                        Err(e) => return Err(e.into()),
                    };
                    if let Some(seg) = self.write().by_id_mut(id) {
                        seg.file.get_or_insert(file);
                    }
                }
                Need::Sparse {
                    id,
                    first,
                    last,
                    len,
                    file,
                } => {
                    let sparse = build_sparse(&file, &self.path(first), first, last, len)?;
                    if let Some(seg) = self.write().by_id_mut(id) {
                        seg.sparse.get_or_insert(sparse);
                    }
                }
            }
        }
    }
}

/// Lists the segment files of `dir`: their first indexes, ascending.
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut firsts = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        match name.to_str().and_then(parse_segment_name) {
            Some(first) if first > 0 => firsts.push(first),
            _ => tracing::debug!(file = ?name, "ignoring a file that is not a binlog segment"),
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// fsyncs a directory, so that files created or removed in it stay so.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads exactly `buf.len()` bytes at `offset`; an early end of file is a
/// [`RecordError::Truncated`] at `offset` of `path`.
pub(crate) fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), BinlogError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(BinlogError::Corrupt {
                    segment: path.to_path_buf(),
                    offset,
                    source: RecordError::Truncated {
                        needed: buf.len(),
                        have: done,
                    },
                });
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads and checks (header, checksum) the whole record at `offset`.
pub(crate) fn read_frame_at(file: &File, path: &Path, offset: u64) -> Result<Vec<u8>, BinlogError> {
    let corrupt = |source| BinlogError::Corrupt {
        segment: path.to_path_buf(),
        offset,
        source,
    };
    let mut buf = vec![0u8; HEADER_LEN];
    read_exact_at(file, path, &mut buf, offset)?;
    let n = record::header_frame_len(&buf).map_err(corrupt)?;
    buf.resize(n, 0);
    read_exact_at(
        file,
        path,
        &mut buf[HEADER_LEN..],
        offset + HEADER_LEN as u64,
    )?;
    record::frame_len(&buf).map_err(corrupt)?;
    Ok(buf)
}

/// Walks record headers from `(from_index, from_off)` to the start of
/// `target`, reading at most a couple of chunks when the sparse index is
/// dense enough. Checksums are not checked here (readers check them).
fn skip_records(
    file: &File,
    path: &Path,
    seg_len: u64,
    mut off: u64,
    mut index: u64,
    target: u64,
) -> Result<u64, BinlogError> {
    let mut buf = Vec::new();
    let mut buf_off = 0u64;
    while index < target {
        let in_buf = off >= buf_off && off + HEADER_LEN as u64 <= buf_off + buf.len() as u64;
        if !in_buf {
            let want = (seg_len.saturating_sub(off)).min(SKIP_CHUNK as u64) as usize;
            if want < HEADER_LEN {
                return Err(BinlogError::Corrupt {
                    segment: path.to_path_buf(),
                    offset: off,
                    source: RecordError::Truncated {
                        needed: HEADER_LEN,
                        have: want,
                    },
                });
            }
            buf.resize(want, 0);
            read_exact_at(file, path, &mut buf, off)?;
            buf_off = off;
        }
        let at = (off - buf_off) as usize;
        let n = record::header_frame_len(&buf[at..]).map_err(|source| BinlogError::Corrupt {
            segment: path.to_path_buf(),
            offset: off,
            source,
        })? as u64;
        if off + n > seg_len {
            return Err(BinlogError::Corrupt {
                segment: path.to_path_buf(),
                offset: off,
                source: RecordError::Truncated {
                    needed: n as usize,
                    have: (seg_len - off) as usize,
                },
            });
        }
        off += n;
        index += 1;
    }
    Ok(off)
}

/// Scans a whole sealed segment (checking every checksum and index) and
/// builds its sparse index.
fn build_sparse(
    file: &File,
    path: &Path,
    first: u64,
    last: u64,
    len: u64,
) -> Result<Vec<SparseEntry>, BinlogError> {
    let mut scanner = Scanner::new(file, len);
    let mut sparse: Vec<SparseEntry> = Vec::new();
    let mut index = first;
    loop {
        match scanner.next_frame()? {
            Scan::End => break,
            Scan::Bad { offset, error } => {
                return Err(BinlogError::Corrupt {
                    segment: path.to_path_buf(),
                    offset,
                    source: error,
                });
            }
            Scan::Frame { offset, frame } => {
                if index > last || record::peek(frame).map(|p| p.0) != Some(index) {
                    return Err(BinlogError::Corrupt {
                        segment: path.to_path_buf(),
                        offset,
                        source: RecordError::Invalid(format!(
                            "record {} of a segment holding {first}..={last} does not carry index {index}",
                            index - first + 1
                        )),
                    });
                }
                if sparse
                    .last()
                    .is_none_or(|e| offset >= e.1 + SPARSE_INTERVAL)
                {
                    sparse.push((index, offset));
                }
                index += 1;
            }
        }
    }
    if index != last + 1 {
        return Err(BinlogError::Corrupt {
            segment: path.to_path_buf(),
            offset: len,
            source: RecordError::Invalid(format!(
                "segment ends after index {} but should hold {first}..={last}",
                index - 1
            )),
        });
    }
    Ok(sparse)
}

/// One step of a [`Scanner`].
pub(crate) enum Scan<'a> {
    /// A complete record with a valid checksum, starting at `offset`.
    Frame { offset: u64, frame: &'a [u8] },
    /// Clean end: the last record ended exactly at the end of the region.
    End,
    /// The record at `offset` is torn, oversized or fails its checksum.
    Bad { offset: u64, error: RecordError },
}

/// Sequential reader of the records of `file[0..end]`, in large chunks.
pub(crate) struct Scanner<'f> {
    file: &'f File,
    end: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_off: u64,
    /// Next unread byte of `buf`.
    pos: usize,
}

impl<'f> Scanner<'f> {
    pub fn new(file: &'f File, end: u64) -> Scanner<'f> {
        Scanner {
            file,
            end,
            buf: Vec::new(),
            buf_off: 0,
            pos: 0,
        }
    }

    pub fn next_frame(&mut self) -> io::Result<Scan<'_>> {
        loop {
            let avail = &self.buf[self.pos..];
            match record::frame_len(avail) {
                Ok(n) => {
                    let start = self.pos;
                    self.pos += n;
                    return Ok(Scan::Frame {
                        offset: self.buf_off + start as u64,
                        frame: &self.buf[start..start + n],
                    });
                }
                Err(RecordError::Truncated { needed, have }) => {
                    let read_to = self.buf_off + self.buf.len() as u64;
                    if read_to >= self.end {
                        if have == 0 {
                            return Ok(Scan::End);
                        }
                        return Ok(Scan::Bad {
                            offset: self.buf_off + self.pos as u64,
                            error: RecordError::Truncated { needed, have },
                        });
                    }
                    self.refill(needed)?;
                }
                Err(error) => {
                    return Ok(Scan::Bad {
                        offset: self.buf_off + self.pos as u64,
                        error,
                    });
                }
            }
        }
    }

    /// Drops consumed bytes and reads until `needed` unread bytes (at least a
    /// chunk) are buffered, or the region ends.
    fn refill(&mut self, needed: usize) -> io::Result<()> {
        self.buf.drain(..self.pos);
        self.buf_off += self.pos as u64;
        self.pos = 0;
        let read_to = self.buf_off + self.buf.len() as u64;
        let want = needed.max(SCAN_CHUNK).saturating_sub(self.buf.len()) as u64;
        let want = want.min(self.end - read_to) as usize;
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        let mut done = 0;
        while done < want {
            match self
                .file
                .read_at(&mut self.buf[old + done..], read_to + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if done < want {
            // The file is shorter than we were told: the region ends here.
            self.buf.truncate(old + done);
            self.end = read_to + done as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(1), "00000000000000000001.binlog");
        assert_eq!(segment_name(u64::MAX), "18446744073709551615.binlog");
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("0000000000000000001.binlog"), None);
        assert_eq!(parse_segment_name("00000000000000000001.binlog.tmp"), None);
        assert_eq!(parse_segment_name("0000000000000000000a.binlog"), None);
        assert_eq!(parse_segment_name("99999999999999999999.binlog"), None);
    }
}
