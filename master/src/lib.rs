//! tern-master: accepts writes, records them in the binlog, applies them to RocksDB
//! and streams the binlog (or, for a full sync, a RocksDB checkpoint) to slaves.
//!
//! - [`acks`]: which connected slaves hold which index (semi-synchronous
//!   writes, `Admin.Wait`).
//! - [`committer`]: the single write path (group commit, after-images).
//! - [`sync`]: one sync session per slave: TrySync validation, first-send ack,
//!   windowed binlog streaming, heartbeats and link timeout; and `DbSync`, the
//!   full-sync snapshot stream.
//! - [`snapshot`]: full-sync snapshots (RocksDB checkpoints) served by `DbSync`.
//! - [`pins`]: who still needs the binlog after which index.
//! - [`semi_sync`]: how long a write waits for slaves, and `Admin.Wait`.
//! - [`retention`]: which binlog segments may be purged (size, age, pins, hard cap).
//! - [`tail`]: the binlog's recent groups in memory, which sync sessions ship
//!   without reading segment files.
//! - [`node`]: opening the data directory, recovery, and [`run`], which serves
//!   Kv, Admin, health and reflection on one port until shut down.

pub mod acks;
pub mod committer;
pub mod node;
pub mod pins;
pub mod retention;
pub mod semi_sync;
pub mod snapshot;
pub mod sync;
pub mod tail;

pub use node::run;
