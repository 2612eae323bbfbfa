//! The RocksDB state machine shared by master and slave.
//!
//! Data lives in the `default` column family; the `meta` column family holds the
//! replication id, the **applied index** and the last transaction sequence. Data
//! reaches RocksDB only in **WriteBatches holding the data and the applied
//! index** it brings the state to (invariant I2; see the write-back buffer
//! below), so a checkpoint, or the state after any crash, can never disagree
//! with itself about how far it has applied.
//!
//! RocksDB's own WAL is off: the binlog is the log. After a crash, RocksDB comes
//! back at its last flush, with an applied index that matches it, and start-up
//! recovery replays the binlog after that index. `atomic_flush` is on so the two
//! column families are always flushed together (otherwise `meta` could be durable
//! ahead of `default`). A clean shutdown flushes, so a restart replays nothing.
//! The binlog must therefore never be purged past [`State::flush`]ed state.
//!
//! **Write-back buffer.** [`State::apply`] does not write each group to
//! RocksDB. It puts each key's last mutation in an in-memory buffer (a hash
//! map) and moves the applied index with it; reads look in the buffer first.
//! When the buffer holds [`DRAIN_BYTES`], the writer **drains** it: one
//! WriteBatch of every buffered key in key order, with the applied index of
//! the buffer's last group (I2 holds for what RocksDB holds). A memtable
//! insert of random keys is a skip-list search with a cache miss on each of
//! its lower levels; keys in one large sorted batch land next to each other,
//! so each insert starts where the last ended. Everything that reads RocksDB
//! as a whole (scans, checksums, checkpoints, flushes, key counts) drains
//! first. What the buffer holds is no less durable than a memtable was: both
//! are lost in a crash, and the binlog after RocksDB's applied index replays
//! them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::{Bytes, BytesMut};
use rocksdb::checkpoint::Checkpoint;
use rocksdb::{
    ColumnFamilyDescriptor, DB, FlushOptions, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteOptions,
};
use sha2::{Digest, Sha256};

use crate::history::{Histories, HistoryEntry};
use crate::position::ReplId;

const META_CF: &str = "meta";

/// The write-back buffer is drained into RocksDB once its keys, values and
/// per-entry overhead reach this many bytes.
pub const DRAIN_BYTES: usize = 4 << 20;
/// Bytes counted for each buffered entry besides its key and value (the hash
/// map's slot and the two shared-buffer handles).
const ENTRY_OVERHEAD: usize = 80;
/// Buffered keys and values are copied into chunks of this size (a larger
/// value gets a chunk of its own).
const CHUNK_BYTES: usize = 256 << 10;

/// How often writers start a background flush (bounds crash-recovery replay).
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEY_APPLIED: &[u8] = b"applied_index";
const KEY_LAST_SEQ: &[u8] = b"last_seq";
const KEY_REPL_ID: &[u8] = b"repl_id";
/// Ancestor histories (see [`crate::history`]), encoded by `Histories::encode_ancestors`.
const KEY_ANCESTORS: &[u8] = b"ancestor_histories";
/// The binlog fsync policy the node last ran with (tells start-up whether the
/// previous run may have shipped events that were not durable).
const KEY_RUNNING_FSYNC: &[u8] = b"running_fsync";
/// The role ("master" or "slave") of the node that last ran on this data: a
/// master that finds "slave" here is a promoted slave and starts a new history.
const KEY_ROLE: &[u8] = b"role";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt meta value {key}: {detail}")]
    CorruptMeta { key: &'static str, detail: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Handle to the node's RocksDB. Cheap to clone.
#[derive(Clone)]
pub struct State {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    applied: AtomicU64,
    last_seq: AtomicU64,
    buffer: RwLock<Buffer>,
    /// One drain at a time (the writer's, or a reader's before a scan).
    draining: Mutex<()>,
    /// A RocksDB write or flush failed and none succeeded since: each group
    /// is then written through (as if there were no buffer), so while
    /// RocksDB keeps an error every group is refused.
    rocks_failing: AtomicBool,
}

/// Mutations applied but not yet in RocksDB: each key's last one (`None` is
/// a delete). `active` takes new groups; `frozen`, when set, is being (or
/// failed to be) written to RocksDB and is older than everything in
/// `active`.
#[derive(Default)]
struct Buffer {
    active: HashMap<Bytes, Option<Bytes>>,
    active_bytes: usize,
    /// Where `active`'s keys and values are copied to. Not kept as the
    /// slices of the requests or batches they came in: one 100-byte value
    /// would keep its whole receive buffer alive until the next drain.
    chunk: BytesMut,
    /// The position after `active`'s last group (the state's position).
    applied: u64,
    last_seq: u64,
    frozen: Option<Arc<Frozen>>,
}

struct Frozen {
    writes: HashMap<Bytes, Option<Bytes>>,
    applied: u64,
    last_seq: u64,
}

impl Buffer {
    fn copy_in(&mut self, data: &[u8]) -> Bytes {
        if self.chunk.capacity() - self.chunk.len() < data.len() {
            self.chunk = BytesMut::with_capacity(CHUNK_BYTES.max(data.len()));
        }
        self.chunk.extend_from_slice(data);
        self.chunk.split().freeze()
    }

    /// The buffered value of `key`: `Some(None)` for a buffered delete,
    /// `None` when RocksDB has the key's latest value.
    fn lookup(&self, key: &[u8]) -> Option<Option<&Bytes>> {
        if let Some(v) = self.active.get(key) {
            return Some(v.as_ref());
        }
        let frozen = self.frozen.as_ref()?;
        frozen.writes.get(key).map(Option::as_ref)
    }
}

/// What [`State::checksum`] returns: a digest of the whole keyspace at `index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyspaceChecksum {
    pub index: u64,
    pub digest: String,
    pub keys: u64,
}

/// A group of mutations applied atomically together with the applied index.
///
/// [`State::apply`] buffers each key's last mutation (what the state holds
/// once the whole group is applied; reads only see whole groups). A group
/// written straight to RocksDB (while RocksDB is failing) is written in key
/// order, each key once.
///
/// Keys and values are shared with the buffers they came in (the client's
/// request, the batch a slave received): adding one copies nothing.
#[derive(Default)]
pub struct GroupBatch {
    /// In order; `None` is a delete.
    writes: Vec<(Bytes, Option<Bytes>)>,
}

impl GroupBatch {
    pub fn put(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) {
        self.writes.push((key.into(), Some(value.into())));
    }

    pub fn delete(&mut self, key: impl Into<Bytes>) {
        self.writes.push((key.into(), None));
    }

    /// The mutations in the order added (a key's last one is its value).
    pub fn mutations(&self) -> impl Iterator<Item = (Bytes, Option<Bytes>)> + '_ {
        self.writes.iter().cloned()
    }

    /// Mutations added (a key written twice counts twice).
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The RocksDB batch: each key's last mutation, in key order.
    fn into_write_batch(self) -> WriteBatch {
        let mut writes = self.writes;
        // Stable: a key's mutations keep their order, the last one wins.
        writes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut batch = WriteBatch::default();
        let mut it = writes.into_iter().peekable();
        while let Some((key, value)) = it.next() {
            if it.peek().is_some_and(|(next, _)| *next == key) {
                continue;
            }
            match value {
                Some(v) => batch.put(&key, &v),
                None => batch.delete(&key),
            }
        }
        batch
    }
}

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_atomic_flush(true);
    opts.increase_parallelism(2);
    opts.set_max_background_jobs(2);
    // Every write path inserts into the memtable on its one thread (the
    // master's committer, the slave's applier): a 64 MiB skip list of random
    // keys made that insert (cache misses per level) 64% of the committer's
    // time at 16 writes per request; 16 MiB: +23-30% Puts/s there.
    opts.set_write_buffer_size(16 << 20);
    // Random keys: every L0 -> L1 compaction rewrites the whole of L1, so
    // it runs after 8 flushes instead of RocksDB's 4 (half the rewriting;
    // 10M keys, 16 writes per request: +19 % Puts/s with a slave). The
    // write stalls move up with it.
    opts.set_level_zero_file_num_compaction_trigger(8);
    opts.set_level_zero_slowdown_writes_trigger(40);
    opts.set_level_zero_stop_writes_trigger(48);
    // A point read of a key a file does not hold skips it on a bloom
    // filter (10 bits per key, about 1 % false positives) instead of
    // searching its index: with more L0 files, and with data sets larger
    // than the memtables, the reads depend on it.
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts
}

/// A RocksDB batch entry's bytes beside its key and value, at most (tag,
/// two varint lengths; the batch header is smaller).
const BATCH_ENTRY_BYTES: usize = 11;

/// Room in a drain's batch for the applied index and last seq (column
/// family, keys and values: well under this).
const META_BATCH_BYTES: usize = 256;

/// A key's first 16 bytes as a big-endian integer, zero-padded. If one key's
/// prefix is below another's, so is the key; equal prefixes need the whole
/// keys compared (`b"a"` and `b"a\0"` have the same prefix).
fn key_prefix(key: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    let n = key.len().min(16);
    b[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(b)
}

fn decode_u64(key: &'static str, v: &[u8]) -> Result<u64, StateError> {
    let arr: [u8; 8] = v.try_into().map_err(|_| StateError::CorruptMeta {
        key,
        detail: format!("expected 8 bytes, found {}", v.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

impl Inner {
    /// The buffer, read. A writer that panicked holding it may have left a
    /// group half buffered; its write path then fails for good (the master's
    /// committer and the slave's applier stop the node), and reads go on
    /// meanwhile.
    fn buffer(&self) -> RwLockReadGuard<'_, Buffer> {
        self.buffer.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn buffer_mut(&self) -> RwLockWriteGuard<'_, Buffer> {
        self.buffer.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn draining(&self) -> MutexGuard<'_, ()> {
        self.draining.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state's position is now after the group at `applied` (under the
    /// buffer's lock, so reads see the group and its index together).
    fn set_position(&self, b: &mut Buffer, applied: u64, last_seq: u64) {
        b.applied = applied;
        b.last_seq = last_seq;
        self.last_seq.store(last_seq, Ordering::Release);
        self.applied.store(applied, Ordering::Release);
    }

    fn meta(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(META_CF)
            .expect("meta column family is created at open")
    }

    /// Writes `batch` with the position it brings the state to, as one
    /// RocksDB batch (I2). RocksDB's WAL is off: the binlog is the log.
    fn write_with_position(
        &self,
        batch: &mut WriteBatch,
        applied: u64,
        last_seq: u64,
    ) -> Result<(), StateError> {
        let meta = self.meta();
        batch.put_cf(meta, KEY_APPLIED, applied.to_be_bytes());
        batch.put_cf(meta, KEY_LAST_SEQ, last_seq.to_be_bytes());
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        let written = self.db.write_opt(std::mem::take(batch), &wo);
        if written.is_err() {
            self.rocks_failing.store(true, Ordering::Release);
        }
        Ok(written?)
    }

    /// Writes everything buffered into RocksDB: after it returns `Ok`,
    /// RocksDB holds every group applied before the call.
    fn drain(&self) -> Result<(), StateError> {
        let _one = self.draining();
        // A drain that failed left its part frozen: that goes first, then
        // what was buffered after it.
        for _ in 0..2 {
            let frozen = {
                let mut b = self.buffer_mut();
                match &b.frozen {
                    Some(f) => f.clone(),
                    None if b.active.is_empty() => return Ok(()),
                    None => {
                        // Sized for as many keys again (within what
                        // DRAIN_BYTES can hold): no rehashing while the
                        // writer fills it.
                        let keys = b.active.len().min(DRAIN_BYTES / ENTRY_OVERHEAD);
                        let next = HashMap::with_capacity(keys);
                        let f = Arc::new(Frozen {
                            writes: std::mem::replace(&mut b.active, next),
                            applied: b.applied,
                            last_seq: b.last_seq,
                        });
                        b.active_bytes = 0;
                        b.frozen = Some(f.clone());
                        f
                    }
                }
            };
            // Sorted on each key's first 16 bytes held in the entry, so most
            // comparisons neither follow a pointer nor call memcmp (the sort
            // was 8 % of a slave's CPU at 16 writes per request).
            let mut bytes = 0;
            let mut keys: Vec<(u128, &Bytes, &Option<Bytes>)> = frozen
                .writes
                .iter()
                .map(|(k, v)| {
                    bytes += k.len() + v.as_ref().map_or(0, Bytes::len) + BATCH_ENTRY_BYTES;
                    (key_prefix(k), k, v)
                })
                .collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
            // Allocated once at its size, not grown by doubling (each growth
            // copied everything the batch held so far).
            let mut batch = WriteBatch::with_capacity_bytes(bytes + META_BATCH_BYTES);
            for (_, key, value) in keys {
                match value {
                    Some(v) => batch.put(key, v),
                    None => batch.delete(key),
                }
            }
            self.write_with_position(&mut batch, frozen.applied, frozen.last_seq)?;
            // Readers that miss `active` now find these keys in RocksDB.
            self.buffer_mut().frozen = None;
        }
        Ok(())
    }
}

impl Drop for Inner {
    /// What is buffered goes to RocksDB before it closes (RocksDB flushes
    /// its memtables at close), as it did when every group was written
    /// straight to RocksDB; a failure leaves it to the binlog's replay.
    fn drop(&mut self) {
        if let Err(e) = self.drain() {
            tracing::warn!(error = %e, "rocksdb write of the write-back buffer at close failed");
        }
    }
}

impl State {
    /// Opens (creating if missing) the RocksDB at `path`.
    pub fn open(path: &Path) -> Result<State, StateError> {
        let opts = db_options();
        let cfs = vec![
            ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, db_options()),
            ColumnFamilyDescriptor::new(META_CF, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let inner = Inner {
            db,
            applied: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            buffer: RwLock::new(Buffer::default()),
            draining: Mutex::new(()),
            rocks_failing: AtomicBool::new(false),
        };
        let state = State {
            inner: Arc::new(inner),
        };
        let applied = state.read_meta_u64(KEY_APPLIED, "applied_index")?;
        let last_seq = state.read_meta_u64(KEY_LAST_SEQ, "last_seq")?;
        state
            .inner
            .set_position(&mut state.inner.buffer_mut(), applied, last_seq);
        Ok(state)
    }

    fn meta(&self) -> &rocksdb::ColumnFamily {
        self.inner.meta()
    }

    fn read_meta_u64(&self, key: &[u8], name: &'static str) -> Result<u64, StateError> {
        match self.inner.db.get_pinned_cf(self.meta(), key)? {
            Some(v) => decode_u64(name, &v),
            None => Ok(0),
        }
    }

    /// Last index applied (a transaction boundary; 0 for an empty state).
    pub fn applied_index(&self) -> u64 {
        self.inner.applied.load(Ordering::Acquire)
    }

    /// Sequence number of the last applied transaction.
    pub fn last_seq(&self) -> u64 {
        self.inner.last_seq.load(Ordering::Acquire)
    }

    /// The replication id stored with the data, if one was set.
    pub fn repl_id(&self) -> Result<Option<ReplId>, StateError> {
        match self.inner.db.get_pinned_cf(self.meta(), KEY_REPL_ID)? {
            None => Ok(None),
            Some(v) => {
                let arr: [u8; 16] = v.as_ref().try_into().map_err(|_| StateError::CorruptMeta {
                    key: "repl_id",
                    detail: format!("expected 16 bytes, found {}", v.len()),
                })?;
                Ok(Some(ReplId::from_bytes(arr)))
            }
        }
    }

    /// Stores the replication id and flushes, so it survives any crash.
    pub fn set_repl_id(&self, id: ReplId) -> Result<(), StateError> {
        self.inner
            .db
            .put_cf(self.meta(), KEY_REPL_ID, id.to_bytes())?;
        self.flush()
    }

    /// The current history and its ancestors, if a repl id was set.
    pub fn histories(&self) -> Result<Option<Histories>, StateError> {
        let Some(current) = self.repl_id()? else {
            return Ok(None);
        };
        let ancestors = self.ancestors()?;
        Ok(Some(Histories { current, ancestors }))
    }

    fn ancestors(&self) -> Result<Vec<HistoryEntry>, StateError> {
        match self.inner.db.get_pinned_cf(self.meta(), KEY_ANCESTORS)? {
            None => Ok(Vec::new()),
            Some(v) => Histories::decode_ancestors(&v).map_err(|e| StateError::CorruptMeta {
                key: "ancestor_histories",
                detail: e.to_string(),
            }),
        }
    }

    /// Stores the current repl id and its ancestors in one write, then flushes,
    /// so a crash leaves either the old histories or the new ones.
    pub fn set_histories(&self, h: &Histories) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.meta(), KEY_REPL_ID, h.current.to_bytes());
        batch.put_cf(self.meta(), KEY_ANCESTORS, h.encode_ancestors());
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.inner.db.write_opt(batch, &wo)?;
        self.flush()
    }

    /// The fsync policy recorded by [`set_running_fsync`](Self::set_running_fsync).
    pub fn running_fsync(&self) -> Result<Option<String>, StateError> {
        self.meta_text(KEY_RUNNING_FSYNC)
    }

    /// Records the fsync policy this run uses (durably, if it changed).
    pub fn set_running_fsync(&self, policy: &str) -> Result<(), StateError> {
        self.set_meta_text(KEY_RUNNING_FSYNC, policy)
    }

    /// The role recorded by [`set_role`](Self::set_role) (`None` on data
    /// written before roles were recorded).
    pub fn role(&self) -> Result<Option<String>, StateError> {
        self.meta_text(KEY_ROLE)
    }

    /// Records the role of the node running on this data (durably, if it changed).
    pub fn set_role(&self, role: &str) -> Result<(), StateError> {
        self.set_meta_text(KEY_ROLE, role)
    }

    fn meta_text(&self, key: &[u8]) -> Result<Option<String>, StateError> {
        Ok(self
            .inner
            .db
            .get_pinned_cf(self.meta(), key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn set_meta_text(&self, key: &[u8], value: &str) -> Result<(), StateError> {
        if self.meta_text(key)?.as_deref() == Some(value) {
            return Ok(());
        }
        self.inner.db.put_cf(self.meta(), key, value.as_bytes())?;
        self.flush()
    }

    /// Reads the current value of `key` (from the write-back buffer, or
    /// else from RocksDB).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(v) = self.inner.buffer().lookup(key) {
            return Ok(v.map(|v| v.to_vec()));
        }
        // Not buffered: RocksDB has its latest value, and only a drain of a
        // later write of it can change that.
        Ok(self.inner.db.get_pinned(key)?.map(|v| v.to_vec()))
    }

    /// The applied index as of a snapshot (0 for an empty state).
    fn index_at(&self, snap: &rocksdb::Snapshot<'_>) -> Result<u64, StateError> {
        match snap.get_pinned_cf(self.meta(), KEY_APPLIED)? {
            Some(v) => decode_u64("applied_index", &v),
            None => Ok(0),
        }
    }

    /// Reads `key` and the applied index the read was served at: the value
    /// is exactly the one at that index. Under the buffer's lock, either the
    /// buffer has the key's last mutation, or RocksDB does (a drain writes
    /// only buffered keys), and the snapshot taken there keeps it.
    pub fn get_at(&self, key: &[u8]) -> Result<(Option<Vec<u8>>, u64), StateError> {
        let (snap, index) = {
            let b = self.inner.buffer();
            if let Some(v) = b.lookup(key) {
                return Ok((v.map(|v| v.to_vec()), b.applied));
            }
            (self.inner.db.snapshot(), b.applied)
        };
        Ok((snap.get_pinned(key)?.map(|v| v.to_vec()), index))
    }

    /// Keys in `[start, end)` (empty `end` = unbounded), at most `limit` and at
    /// most `max_bytes` of keys plus values (but always at least one item, so
    /// a value larger than `max_bytes` is still served, alone), from one
    /// snapshot; returns the items, the applied index they are exactly at and
    /// whether more keys remain. Entries are copied only once they fit: the
    /// memory a scan holds is bounded by `max_bytes` plus one entry, whatever
    /// the sizes of the values after it.
    #[allow(clippy::type_complexity)]
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, u64, bool), StateError> {
        self.inner.drain()?;
        let snap = self.inner.db.snapshot();
        let index = self.index_at(&snap)?;
        let mut ro = ReadOptions::default();
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        // A scan passing over large values must not evict what point reads use.
        ro.fill_cache(false);
        let mut it = snap.raw_iterator_opt(ro);
        it.seek(start);
        let mut items = Vec::new();
        let mut bytes = 0usize;
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            let size = k.len() + v.len();
            if items.len() == limit || (!items.is_empty() && bytes + size > max_bytes) {
                return Ok((items, index, true));
            }
            bytes += size;
            items.push((k.to_vec(), v.to_vec()));
            it.next();
        }
        it.status()?;
        Ok((items, index, false))
    }

    /// Applies one group atomically with the new applied index and last seq:
    /// into the write-back buffer, which is drained into RocksDB once it
    /// holds [`DRAIN_BYTES`]. It fails only while RocksDB is failing (then
    /// what is buffered, and the group, are written straight to RocksDB),
    /// and an error means the group is not applied: the state is still at
    /// the index before it.
    pub fn apply(&self, group: GroupBatch, applied: u64, last_seq: u64) -> Result<(), StateError> {
        if self.inner.rocks_failing.load(Ordering::Acquire) {
            return self.write_through(group, applied, last_seq);
        }
        let full = {
            let mut b = self.inner.buffer_mut();
            for (key, value) in group.writes {
                b.active_bytes += key.len() + value.as_ref().map_or(0, Bytes::len) + ENTRY_OVERHEAD;
                let key = b.copy_in(&key);
                let value = value.map(|v| b.copy_in(&v));
                b.active.insert(key, value);
            }
            self.inner.set_position(&mut b, applied, last_seq);
            b.active_bytes >= DRAIN_BYTES
        };
        if full {
            // The group is applied (in the buffer) whatever the drain does;
            // a failed drain is kept and tried again before the next group.
            if let Err(e) = self.inner.drain() {
                tracing::warn!(error = %e, "rocksdb write of the write-back buffer failed");
            }
        }
        Ok(())
    }

    /// `apply` while RocksDB is failing: what is buffered first, then the
    /// group itself, straight into RocksDB.
    fn write_through(
        &self,
        group: GroupBatch,
        applied: u64,
        last_seq: u64,
    ) -> Result<(), StateError> {
        self.inner.drain()?;
        let _one = self.inner.draining();
        let mut batch = group.into_write_batch();
        // Held across the write: a read sees the group and its index, or
        // neither.
        let mut b = self.inner.buffer_mut();
        self.inner
            .write_with_position(&mut batch, applied, last_seq)?;
        self.inner.rocks_failing.store(false, Ordering::Release);
        self.inner.set_position(&mut b, applied, last_seq);
        Ok(())
    }

    /// Flushes every column family together and waits, making the state durable.
    pub fn flush(&self) -> Result<(), StateError> {
        self.flush_all(true)
    }

    /// Starts a flush of every column family without waiting for it. Called
    /// periodically so that crash recovery replays a bounded part of the binlog.
    pub fn request_flush(&self) -> Result<(), StateError> {
        self.flush_all(false)
    }

    fn flush_all(&self, wait: bool) -> Result<(), StateError> {
        self.inner.drain()?;
        let mut fo = FlushOptions::default();
        fo.set_wait(wait);
        let default = self
            .inner
            .db
            .cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .expect("default column family exists");
        if let Err(e) = self.inner.db.flush_cfs_opt(&[default, self.meta()], &fo) {
            self.inner.rocks_failing.store(true, Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }

    /// Creates a RocksDB checkpoint at `dir` (which must not exist) and returns the
    /// applied index read from **inside** the checkpoint.
    pub fn checkpoint(&self, dir: &Path) -> Result<u64, StateError> {
        self.inner.drain()?;
        Checkpoint::new(&self.inner.db)?.create_checkpoint(dir)?;
        Ok(read_checkpoint_meta(dir)?.applied_index)
    }

    /// A deterministic digest of every key and value, with the applied index it
    /// covers, read from one RocksDB snapshot.
    /// Keys in the keyspace now (a pass over every key; values are not
    /// read into the block cache). The RESP front's DBSIZE.
    pub fn count_keys(&self) -> Result<u64, StateError> {
        self.inner.drain()?;
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut it = self.inner.db.raw_iterator_opt(ro);
        it.seek_to_first();
        let mut keys = 0u64;
        while it.valid() {
            keys += 1;
            it.next();
        }
        it.status()?;
        Ok(keys)
    }

    pub fn checksum(&self) -> Result<KeyspaceChecksum, StateError> {
        self.checksum_with(|| {})
    }

    /// Digests the state as it is now on a thread of its own, and passes
    /// the result to `done` there. Returns once the thread's snapshot is
    /// taken, so nothing written after this call is in the digest (the
    /// online consistency checks digest a check point this way while writes
    /// go on).
    pub fn digest_in_background(
        &self,
        done: impl FnOnce(Result<KeyspaceChecksum, StateError>) + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.clone();
        let (taken_tx, taken_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("digest".into())
            .spawn(move || {
                done(state.checksum_with(|| {
                    let _ = taken_tx.send(());
                }))
            })?;
        let _ = taken_rx.recv();
        Ok(())
    }

    /// [`checksum`](Self::checksum), calling `taken` as soon as the
    /// snapshot it reads is taken: a caller that holds writes back until
    /// then gets the digest of the state exactly as it was (the online
    /// consistency checks digest the state at a check point).
    pub fn checksum_with(&self, taken: impl FnOnce()) -> Result<KeyspaceChecksum, StateError> {
        self.inner.drain()?;
        let snap = self.inner.db.snapshot();
        taken();
        let index = self.index_at(&snap)?;
        let mut hasher = Sha256::new();
        let mut keys = 0u64;
        // A pass over every value must not fill the block cache (+32 MiB of
        // master RSS per Checksum of a 1 GiB data set) or evict point reads.
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        for item in snap.iterator_opt(IteratorMode::Start, ro) {
            let (k, v) = item?;
            hasher.update((k.len() as u64).to_be_bytes());
            hasher.update(&k);
            hasher.update((v.len() as u64).to_be_bytes());
            hasher.update(&v);
            keys += 1;
        }
        Ok(KeyspaceChecksum {
            index,
            digest: hex::encode(hasher.finalize()),
            keys,
        })
    }
}

/// What a checkpoint directory says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointMeta {
    pub applied_index: u64,
    pub last_seq: u64,
    pub repl_id: Option<ReplId>,
}

/// Opens a checkpoint (or any closed state directory) read-only and reads its meta.
pub fn read_checkpoint_meta(dir: &Path) -> Result<CheckpointMeta, StateError> {
    let opts = Options::default();
    let db = DB::open_cf_for_read_only(
        &opts,
        dir,
        [rocksdb::DEFAULT_COLUMN_FAMILY_NAME, META_CF],
        false,
    )?;
    let meta = db
        .cf_handle(META_CF)
        .ok_or_else(|| StateError::CorruptMeta {
            key: "meta",
            detail: "checkpoint has no meta column family".into(),
        })?;
    let applied_index = match db.get_pinned_cf(meta, KEY_APPLIED)? {
        Some(v) => decode_u64("applied_index", &v)?,
        None => 0,
    };
    let last_seq = match db.get_pinned_cf(meta, KEY_LAST_SEQ)? {
        Some(v) => decode_u64("last_seq", &v)?,
        None => 0,
    };
    let repl_id = match db.get_pinned_cf(meta, KEY_REPL_ID)? {
        Some(v) => Some(ReplId::from_bytes(v.as_ref().try_into().map_err(|_| {
            StateError::CorruptMeta {
                key: "repl_id",
                detail: format!("expected 16 bytes, found {}", v.len()),
            }
        })?)),
        None => None,
    };
    Ok(CheckpointMeta {
        applied_index,
        last_seq,
        repl_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(puts: &[(&[u8], &[u8])], deletes: &[&[u8]]) -> GroupBatch {
        let mut g = GroupBatch::default();
        for (k, v) in puts {
            g.put(Bytes::copy_from_slice(k), Bytes::copy_from_slice(v));
        }
        for k in deletes {
            g.delete(Bytes::copy_from_slice(k));
        }
        g
    }

    proptest::proptest! {
        /// The drain's order (prefix, then whole key) is the keys' order,
        /// with zero bytes, shared prefixes and lengths around 16.
        #[test]
        fn prefix_then_key_is_key_order(
            keys in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(vec![0u8, 1, b'k', 0xff]), 0..20),
                0..64,
            )
        ) {
            let mut by_prefix = keys.clone();
            by_prefix.sort_unstable_by(|a, b| {
                key_prefix(a).cmp(&key_prefix(b)).then_with(|| a.cmp(b))
            });
            let mut by_key = keys;
            by_key.sort();
            proptest::prop_assert_eq!(by_prefix, by_key);
        }
    }

    #[test]
    fn a_group_applies_each_keys_last_mutation_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.apply(group(&[(b"d", b"old"), (b"e", b"old")], &[]), 2, 1)
            .unwrap();
        let mut g = GroupBatch::default();
        g.put("z", "1");
        g.put("a", "1");
        g.delete("d");
        g.put("a", "2");
        g.put("d", "back");
        g.delete("z");
        g.put("m", "x");
        g.delete("e");
        g.put("a", "3");
        assert_eq!(g.len(), 9);
        s.apply(g, 11, 2).unwrap();
        let (items, index, _) = s.scan(b"", b"", 10, usize::MAX).unwrap();
        let items: Vec<(&[u8], &[u8])> = items.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        assert_eq!(index, 11);
        assert_eq!(
            items,
            vec![(&b"a"[..], &b"3"[..]), (b"d", b"back"), (b"m", b"x")]
        );
    }

    #[test]
    fn apply_persists_data_and_index_together_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = State::open(dir.path()).unwrap();
            assert_eq!(s.applied_index(), 0);
            s.apply(group(&[(b"a", b"1"), (b"b", b"2")], &[]), 4, 1)
                .unwrap();
            s.apply(group(&[(b"c", b"3")], &[b"a"]), 9, 2).unwrap();
            s.flush().unwrap();
        }
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.applied_index(), 9);
        assert_eq!(s.last_seq(), 2);
        assert_eq!(s.get(b"a").unwrap(), None);
        assert_eq!(s.get(b"b").unwrap(), Some(b"2".to_vec()));
        let (items, index, more) = s.scan(b"", b"", 10, usize::MAX).unwrap();
        assert_eq!(index, 9);
        assert!(!more);
        assert_eq!(
            items,
            vec![
                (b"b".to_vec(), b"2".to_vec()),
                (b"c".to_vec(), b"3".to_vec())
            ]
        );
        let (items, _, more) = s.scan(b"b", b"c", 10, usize::MAX).unwrap();
        assert_eq!(items.len(), 1);
        assert!(!more);
        let (items, _, more) = s.scan(b"", b"", 1, usize::MAX).unwrap();
        assert_eq!(items.len(), 1);
        assert!(more);
        // The byte budget: "b"+"2" fits in 2 bytes, "c"+"3" does not; one item
        // is served even when it alone is over the budget.
        let (items, _, more) = s.scan(b"", b"", 10, 2).unwrap();
        assert_eq!((items.len(), more), (1, true));
        let (items, _, more) = s.scan(b"", b"", 10, 1).unwrap();
        assert_eq!((items.len(), more), (1, true));
        let (items, _, more) = s.scan(b"", b"", 10, 4).unwrap();
        assert_eq!((items.len(), more), (2, false));
    }

    #[test]
    fn reads_see_buffered_writes_and_deletes_before_and_after_a_drain() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.apply(group(&[(b"a", b"1"), (b"b", b"1")], &[]), 2, 1)
            .unwrap();
        s.flush().unwrap();
        // Buffered: a delete of a key RocksDB has, and a new key.
        s.apply(group(&[(b"c", b"3")], &[b"a"]), 5, 2).unwrap();
        assert_eq!(s.get(b"a").unwrap(), None);
        assert_eq!(s.get_at(b"a").unwrap(), (None, 5));
        assert_eq!(s.get_at(b"b").unwrap(), (Some(b"1".to_vec()), 5));
        assert_eq!(s.get_at(b"c").unwrap(), (Some(b"3".to_vec()), 5));
        assert_eq!(s.get(b"zz").unwrap(), None);
        // Enough to drain: every value read back is the last one written.
        let value = vec![b'v'; 1000];
        let mut index = 5;
        for round in 0..(2 * DRAIN_BYTES / 100_000) as u64 {
            let mut g = GroupBatch::default();
            for k in 0..90u64 {
                let mut v = value.clone();
                v.extend_from_slice(&round.to_be_bytes());
                g.put(format!("k{k}"), v);
            }
            g.put("c", round.to_string());
            index += 91;
            s.apply(g, index, round + 3).unwrap();
            assert_eq!(
                s.get_at(b"c").unwrap(),
                (Some(round.to_string().into_bytes()), index)
            );
        }
        assert_eq!(s.get(b"a").unwrap(), None);
        let c = s.checksum().unwrap();
        assert_eq!((c.index, c.keys), (index, 92));
        let (items, at, more) = s.scan(b"k1", b"k2", 1000, usize::MAX).unwrap();
        assert_eq!((items.len(), at, more), (11, index, false));
        assert_eq!(s.count_keys().unwrap(), 92);
    }

    #[test]
    fn a_value_read_with_its_index_is_the_one_at_that_index_across_drains() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (s, stop) = (s.clone(), stop.clone());
                std::thread::spawn(move || {
                    let (mut reads, mut last) = (0u64, 0u64);
                    while !stop.load(Ordering::Acquire) {
                        let (v, index) = s.get_at(b"clock").unwrap();
                        let v: u64 =
                            v.map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap());
                        assert_eq!(v, index, "the clock key holds the index of its group");
                        assert!(index >= last, "reads go back: {last} then {index}");
                        last = index;
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        // Every group writes the clock; the filler makes the buffer drain
        // about every 40 groups.
        let filler = vec![b'f'; 1000];
        for i in 1..=400u64 {
            let mut g = GroupBatch::default();
            g.put("clock", i.to_string());
            for k in 0..100u64 {
                g.put(format!("f{}", (i * 100 + k) % 5000), filler.clone());
            }
            s.apply(g, i, i).unwrap();
        }
        stop.store(true, Ordering::Release);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
        assert_eq!(s.checksum().unwrap().index, 400);
    }

    #[test]
    fn checksum_is_deterministic_and_sensitive() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let s1 = State::open(d1.path()).unwrap();
        let s2 = State::open(d2.path()).unwrap();
        s1.apply(group(&[(b"k1", b"v1"), (b"k2", b"v2")], &[]), 4, 1)
            .unwrap();
        // Same data reached by another route.
        s2.apply(group(&[(b"k2", b"v2"), (b"k1", b"xx")], &[]), 2, 1)
            .unwrap();
        s2.apply(group(&[(b"k1", b"v1")], &[]), 4, 2).unwrap();
        let c1 = s1.checksum().unwrap();
        let c2 = s2.checksum().unwrap();
        assert_eq!(c1.digest, c2.digest);
        assert_eq!((c1.index, c1.keys), (4, 2));
        // Moving a byte between key and value changes the digest.
        s2.apply(group(&[(b"k1v", b"1")], &[b"k1"]), 6, 3).unwrap();
        assert_ne!(s2.checksum().unwrap().digest, c1.digest);
    }

    #[test]
    fn checkpoint_carries_its_own_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("db")).unwrap();
        let id = ReplId::random();
        s.set_repl_id(id).unwrap();
        s.apply(group(&[(b"x", b"1")], &[]), 3, 1).unwrap();
        let cp = dir.path().join("cp");
        assert_eq!(s.checkpoint(&cp).unwrap(), 3);
        s.apply(group(&[(b"x", b"2")], &[]), 6, 2).unwrap();
        let meta = read_checkpoint_meta(&cp).unwrap();
        assert_eq!(
            meta,
            CheckpointMeta {
                applied_index: 3,
                last_seq: 1,
                repl_id: Some(id)
            }
        );
        let copy = State::open(&cp).unwrap();
        assert_eq!(copy.get(b"x").unwrap(), Some(b"1".to_vec()));
    }
}
