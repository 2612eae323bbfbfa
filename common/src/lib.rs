//! tern-common: the parts of tern that the master and the slave share.
//!
//! - [`proto`]: generated gRPC and binlog types (`proto/` at the workspace root).
//! - [`position`]: `Index`, `ReplId` and `Position`, the types every replication decision uses.
//! - [`history`]: the current replication history and its ancestors (I8): which positions are a prefix.
//! - [`record`]: the binlog record codec `[len][crc32c][payload]` and the `Event` domain type.
//! - [`boundary`]: the transaction boundary parser (Outside / InTxn / Error).
//! - [`binlog`]: segmented, CRC-checked, group-fsynced binlog with tail recovery.
//! - [`durability`]: the one fsync policy (always / everysec / no) and what counts as durable.
//! - [`state`]: the RocksDB state machine: data and applied index written together.
//! - [`limits`]: sizes every request is checked against.
//! - [`marker`]: the clean-shutdown marker.
//! - [`config`]: TOML + `TERN__SECTION__KEY` environment + flags.
//! - [`telemetry`]: tracing subscriber and OTLP export.
//! - [`window`]: the per-slave sync window (in-flight batches, in-order acks).
//! - [`kv`], [`server`]: the Kv service, the Admin service and the one-port gRPC server.
//! - [`replay`]: applying binlog events to the state in whole transactions.
//! - [`wire`]: Replication messages from the network as checked domain types.
//! - [`status`]: the gRPC status for bad input and exhausted limits, in one place.
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint (`server.metrics_listen`).

pub mod binlog;
pub mod boundary;
pub mod config;
pub mod durability;
pub mod history;
pub mod kv;
pub mod limits;
pub mod marker;
pub mod metrics;
pub mod position;
pub mod proto;
pub mod record;
pub mod replay;
pub mod resp;
pub mod server;
pub mod signals;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod window;
pub mod wire;
