//! tern-slave: follows a master, keeps a byte-identical relay log, applies it to
//! its own RocksDB exactly once and in master order, and serves reads.
//!
//! - [`link`]: connection state machine, reconnect barrier (I4), receiver (I3).
//! - [`applier`]: sequential apply in master order, exactly once (I5), from the
//!   receiver's hand-off or, to catch up, the relay log.
//! - [`fullsync`]: DbSync download (verified, resumable) and the crash-safe swap.
//! - [`floor`]: the read floor: reads never go back to a state older than one served.
//! - [`node`]: data directory, start-up recovery, services and [`run`].

pub mod applier;
pub mod floor;
pub mod fullsync;
pub mod link;
pub mod node;
pub mod verify;

pub use node::run;
