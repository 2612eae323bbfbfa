//! Node configuration: defaults, then a TOML file (`--config FILE`), then
//! environment variables `TERN__SECTION__KEY` (e.g. `TERN__SYNC__LINK_TIMEOUT_MS=3000`),
//! then command-line flags. Later sources win. Unknown keys are errors, so a typo
//! in a file or a variable name is reported instead of silently ignored.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::binlog::FsyncPolicy;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Master,
    Slave,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub binlog: BinlogConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub slave: SlaveConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the gRPC port (Kv, Admin, Replication, health, reflection).
    pub listen: String,
    /// Directory holding `db/` (RocksDB) and `binlog/`.
    pub data_dir: PathBuf,
    /// Deadline for one unary request, in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Requests served at once on the whole node; more wait their turn.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Open client connections at most; further clients wait in the listen
    /// backlog until one closes. Never more than the open-file limit leaves
    /// room for (see [`crate::server::connection_budget`]).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection without any request or stream for this long is closed,
    /// in milliseconds (0 = never).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// On SIGTERM/SIGINT, how long requests and streams may still run before
    /// every connection is closed regardless, in milliseconds.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
}

fn default_request_timeout_ms() -> u64 {
    30_000
}

fn default_max_concurrent_requests() -> usize {
    4096
}

fn default_max_connections() -> usize {
    4096
}

fn default_idle_timeout_ms() -> u64 {
    300_000
}

fn default_shutdown_timeout_ms() -> u64 {
    10_000
}

impl ServerConfig {
    /// `None` when idle connections are kept forever.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms))
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BinlogConfig {
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    /// Keep at least this many bytes of binlog (0 = no size-based purge).
    pub retain_bytes: u64,
    /// Keep binlog segments at least this long (0 = no age-based purge).
    pub retain_secs: u64,
    /// Hard cap: above it the binlog is purged even if a slave still needs it
    /// (that slave then needs a full sync). 0 = no cap. On by default, so a
    /// slave that stays connected without acknowledging (or one far behind)
    /// cannot fill the master's disk: 8 × `retain_bytes`.
    pub max_retain_bytes: u64,
}

impl Default for BinlogConfig {
    fn default() -> Self {
        BinlogConfig {
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 << 20,
            retain_bytes: 1 << 30,
            retain_secs: 0,
            max_retain_bytes: 8 << 30,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub heartbeat_ms: u64,
    pub link_timeout_ms: u64,
    /// Most unacknowledged batches in flight to one slave.
    pub window_batches: usize,
    /// Most unacknowledged bytes in flight to one slave.
    pub window_bytes: usize,
    /// Largest BinlogBatch (a single larger record is still sent alone).
    pub batch_bytes: usize,
    /// Master: a full-sync snapshot (checkpoint) no stream has used for this
    /// long is deleted and its binlog pin released.
    pub snapshot_idle_ms: u64,
    /// Master: most concurrent `Sync` streams (more get RESOURCE_EXHAUSTED).
    pub max_sessions: usize,
    /// Master: most concurrent `DbSync` streams (more get RESOURCE_EXHAUSTED).
    pub max_db_syncs: usize,
    /// Master: a new full-sync checkpoint at most this often; within it a
    /// `DbSync` shares the newest live snapshot, or gets RESOURCE_EXHAUSTED
    /// with when to retry when there is none.
    pub snapshot_min_interval_ms: u64,
    /// Master: bytes per second one `DbSync` stream sends at most (0 = no cap).
    pub fullsync_bytes_per_sec: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            heartbeat_ms: 1000,
            link_timeout_ms: 20_000,
            window_batches: 64,
            window_bytes: 64 << 20,
            batch_bytes: 1 << 20,
            snapshot_idle_ms: 60_000,
            max_sessions: 32,
            max_db_syncs: 4,
            snapshot_min_interval_ms: 30_000,
            fullsync_bytes_per_sec: 0,
        }
    }
}

impl SyncConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn link_timeout(&self) -> Duration {
        Duration::from_millis(self.link_timeout_ms)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlaveConfig {
    /// URL of the master's gRPC port.
    pub master: String,
    /// Parallel apply workers (1 = apply serially).
    pub apply_workers: usize,
    /// Wipe and full-sync when this slave is found ahead of its master.
    pub resync_when_ahead: bool,
    /// Stable id of this slave (default: derived from the listen address).
    pub id: Option<String>,
}

impl Default for SlaveConfig {
    fn default() -> Self {
        SlaveConfig {
            master: "http://127.0.0.1:7400".into(),
            apply_workers: 4,
            resync_when_ahead: false,
            id: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint for traces (unset: no export; `OTEL_EXPORTER_OTLP_ENDPOINT` also works).
    pub otlp_endpoint: Option<String>,
    /// Log filter in `RUST_LOG` syntax (`RUST_LOG` wins when set).
    pub log: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            log: "info".into(),
        }
    }
}

/// Flags both binaries take. They override the file and the environment.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CommonArgs {
    /// TOML configuration file (sections: server, binlog, sync, slave, telemetry).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on (Kv, Admin, Replication, health, reflection).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Data directory (RocksDB in db/, binlog in binlog/).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Builds the configuration for `role` from defaults, `args.config`, the
    /// environment (`TERN__SECTION__KEY`) and the flags, in that order.
    pub fn load(
        role: Role,
        args: &CommonArgs,
        extra_overrides: &[(&str, String)],
    ) -> Result<Config, ConfigError> {
        Self::load_from_env(role, args, extra_overrides, None)
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_from_env(
        role: Role,
        args: &CommonArgs,
        extra_overrides: &[(&str, String)],
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let (listen, data_dir) = match role {
            Role::Master => ("127.0.0.1:7400", "./data/master"),
            Role::Slave => ("127.0.0.1:7401", "./data/slave"),
        };
        let mut b = config::Config::builder()
            .set_default("server.listen", listen)?
            .set_default("server.data_dir", data_dir)?;
        if let Some(path) = &args.config {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            b = b.add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }
        let mut envsrc = config::Environment::with_prefix("TERN")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        if let Some(map) = env {
            envsrc = envsrc.source(Some(map));
        }
        b = b.add_source(envsrc);
        if let Some(l) = &args.listen {
            b = b.set_override("server.listen", l.as_str())?;
        }
        if let Some(d) = &args.data_dir {
            b = b.set_override("server.data_dir", d.to_string_lossy().as_ref())?;
        }
        for (k, v) in extra_overrides {
            b = b.set_override(*k, v.as_str())?;
        }
        let cfg: Config = b.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "server.listen {:?} is not HOST:PORT with a numeric host (e.g. 127.0.0.1:7400)",
                self.server.listen
            ));
        }
        if self.binlog.segment_bytes < 4096 {
            return bad("binlog.segment_bytes must be at least 4096".into());
        }
        if self.sync.heartbeat_ms == 0 || self.sync.link_timeout_ms <= self.sync.heartbeat_ms {
            return bad(
                "sync.heartbeat_ms must be > 0 and smaller than sync.link_timeout_ms".into(),
            );
        }
        if self.sync.window_batches == 0
            || self.sync.window_bytes == 0
            || self.sync.batch_bytes == 0
        {
            return bad("sync.window_batches, window_bytes and batch_bytes must be > 0".into());
        }
        if !(self.slave.master.starts_with("http://") || self.slave.master.starts_with("https://"))
            || self.slave.master.parse::<http::Uri>().is_err()
        {
            return bad(format!(
                "slave.master {:?} is not a URL like http://127.0.0.1:7400",
                self.slave.master
            ));
        }
        if self.slave.apply_workers == 0 {
            return bad("slave.apply_workers must be at least 1".into());
        }
        if self.server.max_concurrent_requests == 0 || self.server.request_timeout_ms == 0 {
            return bad(
                "server.max_concurrent_requests and server.request_timeout_ms must be > 0".into(),
            );
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections must be at least 1".into());
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .parse()
            .expect("validated in Config::load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_per_role() {
        let c = Config::load_from_env(Role::Master, &CommonArgs::default(), &[], env(&[])).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:7400");
        assert_eq!(c.binlog.fsync, FsyncPolicy::Always);
        assert_eq!(c.sync.link_timeout_ms, 20_000);
        assert_eq!(c.server.max_connections, 4096);
        assert_eq!(c.server.idle_timeout(), Some(Duration::from_secs(300)));
        assert_eq!(c.server.shutdown_timeout(), Duration::from_secs(10));
        let c = Config::load_from_env(Role::Slave, &CommonArgs::default(), &[], env(&[])).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:7401");
        assert_eq!(c.slave.master, "http://127.0.0.1:7400");
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\n[binlog]\nfsync = \"no\"\n[sync]\nlink_timeout_ms = 5000\n",
        )
        .unwrap();
        let mut args = CommonArgs {
            config: Some(path),
            ..Default::default()
        };
        let c = Config::load_from_env(
            Role::Master,
            &args,
            &[],
            env(&[
                ("TERN__SYNC__LINK_TIMEOUT_MS", "3000"),
                ("TERN__BINLOG__FSYNC", "everysec"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9000");
        assert_eq!(c.binlog.fsync, FsyncPolicy::Everysec);
        assert_eq!(c.sync.link_timeout_ms, 3000);
        args.listen = Some("127.0.0.1:9001".into());
        let c = Config::load_from_env(Role::Master, &args, &[], env(&[])).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9001");
        assert_eq!(c.server.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        let e = Config::load_from_env(
            Role::Master,
            &CommonArgs::default(),
            &[],
            env(&[("TERN__SYNC__LINK_TIMEOUT", "3000")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("link_timeout"), "{e}");
        let e = Config::load_from_env(
            Role::Master,
            &CommonArgs::default(),
            &[],
            env(&[("TERN__BINLOG__FSYNC", "sometimes")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("sometimes"), "{e}");
        let e = Config::load_from_env(
            Role::Master,
            &CommonArgs::default(),
            &[],
            env(&[("TERN__SERVER__MAX_CONNECTIONS", "0")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("server.max_connections"), "{e}");
        let args = CommonArgs {
            listen: Some("localhost".into()),
            ..Default::default()
        };
        let e = Config::load_from_env(Role::Master, &args, &[], env(&[])).unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
    }
}
