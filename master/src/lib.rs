//! tern-master: accepts writes, records them in the binlog, applies them to RocksDB
//! and (later) streams the binlog to slaves.
//!
//! - [`committer`]: the single write path (group commit, after-images, WRITESET).
//! - [`sync`]: one sync session per slave: TrySync validation, first-send ack,
//!   windowed binlog streaming, heartbeats and link timeout.
//! - [`writeset`]: `last_committed` dependency tracking for parallel apply on slaves.
//! - [`node`]: opening the data directory, recovery, and [`run`], which serves
//!   Kv, Admin, health and reflection on one port until shut down.

pub mod committer;
pub mod node;
pub mod sync;
pub mod writeset;

pub use node::run;
