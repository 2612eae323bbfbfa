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
    #[serde(default)]
    pub auth: AuthConfig,
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
    /// PEM certificate chain of the gRPC port: set with `tls_key`, the port
    /// speaks TLS only (see [`crate::server::tls`]).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate signed by
    /// one of them (mutual TLS). Needs `tls_cert`.
    #[serde(default)]
    pub tls_client_ca: Option<PathBuf>,
    /// Address of the Redis-protocol (RESP2) front, `HOST:PORT`; unset = off.
    #[serde(default)]
    pub resp_listen: Option<String>,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`),
    /// `HOST:PORT`; unset = off.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Threads of the async runtime (network, gRPC, RESP, sync sessions);
    /// 0 = the machine's cores less one, at least one. The master's
    /// committer and the slave's applier run on threads of their own.
    #[serde(default)]
    pub worker_threads: usize,
}

/// `server.worker_threads` at most.
pub const MAX_WORKER_THREADS: usize = 1024;

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

    /// The runtime's worker threads: `worker_threads`, or for 0 the cores
    /// less the one the committer (master) or applier (slave) keeps busy.
    pub fn runtime_threads(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }

    /// The node's async runtime, with [`runtime_threads`](Self::runtime_threads)
    /// workers.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.runtime_threads())
            .enable_all()
            .build()
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
    /// Master: slaves that must hold a write durably in their relay logs
    /// before it is answered, for writes whose request says 0 (0 =
    /// asynchronous: answered at commit). At most `max_sessions`.
    pub min_replicas: u32,
    /// Master: how long a write waits for `min_replicas` slaves (and
    /// `Admin.Wait` for its replicas) when its request says 0, in
    /// milliseconds. Below `server.request_timeout_ms`.
    pub replica_timeout_ms: u64,
    /// Master: online consistency checks every this many seconds (0 = off):
    /// a check point in the binlog, then the master's keyspace digest at it,
    /// which each slave compares with its own.
    pub verify_interval_secs: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            heartbeat_ms: 1000,
            link_timeout_ms: 20_000,
            window_batches: 64,
            window_bytes: 8 << 20,
            batch_bytes: 1 << 20,
            snapshot_idle_ms: 60_000,
            max_sessions: 32,
            max_db_syncs: 4,
            snapshot_min_interval_ms: 30_000,
            fullsync_bytes_per_sec: 0,
            min_replicas: 0,
            replica_timeout_ms: 10_000,
            verify_interval_secs: 0,
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

    pub fn replica_timeout(&self) -> Duration {
        Duration::from_millis(self.replica_timeout_ms)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlaveConfig {
    /// URL of the master's gRPC port.
    pub master: String,
    /// Deprecated and ignored (a start-up warning): apply is sequential.
    /// Still accepted so existing configuration files keep loading.
    pub apply_workers: Option<usize>,
    /// Wipe and full-sync when this slave is found ahead of its master.
    pub resync_when_ahead: bool,
    /// Stop serving reads when a consistency check finds this slave's data
    /// different from the master's, until it is resynced.
    pub stop_reads_on_mismatch: bool,
    /// Stable id of this slave (default: derived from the listen address).
    pub id: Option<String>,
    /// Sent to the master as `authorization: Bearer <token>` on Sync and
    /// DbSync (the master's `auth.replication_token`).
    pub master_token: Option<Secret>,
    /// File holding `master_token` (read at start, trailing newline trimmed).
    pub master_token_file: Option<PathBuf>,
    /// PEM CA certificate(s) the master's certificate must be signed by, with
    /// an `https://` master (unset: the system's trust store).
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate presented to the master (mutual TLS), with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for SlaveConfig {
    fn default() -> Self {
        SlaveConfig {
            master: "http://127.0.0.1:7400".into(),
            apply_workers: None,
            resync_when_ahead: false,
            stop_reads_on_mismatch: true,
            id: None,
            master_token: None,
            master_token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
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

/// Bearer tokens the gRPC port requires (see [`crate::server::auth`]). A token
/// given as a file is read by [`Config::load`] into its token field.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Required on `tern.kv.v1.Kv` and `tern.admin.v1.Admin` (unset: open).
    pub token: Option<Secret>,
    /// File holding `token`.
    pub token_file: Option<PathBuf>,
    /// Required on `tern.replication.v1.Replication` (Sync, DbSync) (unset: open).
    pub replication_token: Option<Secret>,
    /// File holding `replication_token`.
    pub replication_token_file: Option<PathBuf>,
}

/// A credential from the configuration. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// Keys whose `TERN__…` environment values are used as given, never parsed
/// as numbers or bools.
const VERBATIM_ENV_KEYS: [&str; 6] = [
    "auth.token",
    "auth.token_file",
    "auth.replication_token",
    "auth.replication_token_file",
    "slave.master_token",
    "slave.master_token_file",
];

/// Longest token accepted (it travels in an HTTP/2 header).
pub const MAX_TOKEN_BYTES: usize = 4096;

impl Secret {
    /// `value` as a token: 1 to [`MAX_TOKEN_BYTES`] visible ASCII characters
    /// (no spaces), as an `authorization` header value needs. The error says
    /// what is wrong, never the value.
    pub fn new(value: String) -> Result<Secret, String> {
        if value.is_empty() {
            return Err("is empty".into());
        }
        if value.len() > MAX_TOKEN_BYTES {
            return Err(format!("is longer than {MAX_TOKEN_BYTES} bytes"));
        }
        if let Some(pos) = value.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(format!(
                "has a character that is not visible ASCII at byte {pos} (spaces and control characters cannot be sent in a header)"
            ));
        }
        Ok(Secret(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The token of `key` (given inline) or of `file_key` (a file, read now,
/// trailing newline trimmed); an error when both are set or it is malformed.
fn resolve_token(
    key: &str,
    inline: &mut Option<Secret>,
    file_key: &str,
    file: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    let bad = |m: String| Err(ConfigError::Invalid(m));
    match (inline.take(), file) {
        (Some(_), Some(_)) => bad(format!("{key} and {file_key} are both set; set one")),
        (Some(t), None) => {
            *inline =
                Some(Secret::new(t.0).map_err(|e| ConfigError::Invalid(format!("{key} {e}")))?);
            Ok(())
        }
        (None, Some(path)) => {
            let text = std::fs::read(path)
                .map_err(|e| ConfigError::Invalid(format!("{file_key} {}: {e}", path.display())))?;
            let text = String::from_utf8(text).map_err(|_| {
                ConfigError::Invalid(format!("{file_key} {}: not UTF-8 text", path.display()))
            })?;
            let token = text.trim_end_matches(['\n', '\r']).to_string();
            *inline = Some(Secret::new(token).map_err(|e| {
                ConfigError::Invalid(format!("the token in {file_key} {} {e}", path.display()))
            })?);
            Ok(())
        }
        (None, None) => Ok(()),
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
        // The environment source turns number- and bool-like values into
        // numbers and bools ("0123" would become "123"): secrets and their
        // files are taken verbatim instead.
        for key in VERBATIM_ENV_KEYS {
            let var = format!("TERN__{}", key.replace('.', "__").to_uppercase());
            let raw = match &env {
                Some(map) => map.get(&var).cloned(),
                None => std::env::var(&var).ok(),
            };
            if let Some(v) = raw {
                b = b.set_override(key, v)?;
            }
        }
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
        let mut cfg: Config = b.build()?.try_deserialize()?;
        cfg.validate()?;
        cfg.load_security(role)?;
        Ok(cfg)
    }

    /// Reads the token files into their token fields and checks the TLS
    /// files this role uses (present, PEM, key matching its certificate).
    fn load_security(&mut self, role: Role) -> Result<(), ConfigError> {
        let a = &mut self.auth;
        resolve_token("auth.token", &mut a.token, "auth.token_file", &a.token_file)?;
        resolve_token(
            "auth.replication_token",
            &mut a.replication_token,
            "auth.replication_token_file",
            &a.replication_token_file,
        )?;
        crate::server::tls::server_tls(&self.server)?;
        if role == Role::Slave {
            let s = &mut self.slave;
            resolve_token(
                "slave.master_token",
                &mut s.master_token,
                "slave.master_token_file",
                &s.master_token_file,
            )?;
            crate::server::tls::master_endpoint(&self.slave)?;
        }
        Ok(())
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
        if self.sync.replica_timeout_ms == 0 {
            return bad("sync.replica_timeout_ms must be > 0".into());
        }
        // Semi-sync on by default: its timeout must leave the answer time to
        // arrive within the request timeout. (Without it, a request's own
        // wait is cut to the request timeout; see tern_common::kv.)
        if self.sync.min_replicas > 0
            && self.sync.replica_timeout_ms >= self.server.request_timeout_ms
        {
            return bad(format!(
                "sync.replica_timeout_ms {} must be below server.request_timeout_ms ({}) with \
                 sync.min_replicas > 0, so that a write that waited for slaves is still answered",
                self.sync.replica_timeout_ms, self.server.request_timeout_ms
            ));
        }
        if self.sync.min_replicas as usize > self.sync.max_sessions {
            return bad(format!(
                "sync.min_replicas {} is above sync.max_sessions {}: no write could ever be \
                 acknowledged by that many slaves",
                self.sync.min_replicas, self.sync.max_sessions
            ));
        }
        if !(self.slave.master.starts_with("http://") || self.slave.master.starts_with("https://"))
            || self.slave.master.parse::<http::Uri>().is_err()
        {
            return bad(format!(
                "slave.master {:?} is not a URL like http://127.0.0.1:7400",
                self.slave.master
            ));
        }
        if self.server.max_concurrent_requests == 0 || self.server.request_timeout_ms == 0 {
            return bad(
                "server.max_concurrent_requests and server.request_timeout_ms must be > 0".into(),
            );
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections must be at least 1".into());
        }
        if self.server.worker_threads > MAX_WORKER_THREADS {
            return bad(format!(
                "server.worker_threads {} is more than {MAX_WORKER_THREADS} (0 = the cores less one)",
                self.server.worker_threads
            ));
        }
        let s = &self.server;
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return bad("server.tls_cert and server.tls_key must be set together".into());
        }
        if let Some(r) = &s.resp_listen
            && r.parse::<SocketAddr>().is_err()
        {
            return bad(format!(
                "server.resp_listen {r:?} is not HOST:PORT with a numeric host (e.g. 127.0.0.1:6379)"
            ));
        }
        if let Some(m) = &s.metrics_listen
            && m.parse::<SocketAddr>().is_err()
        {
            return bad(format!(
                "server.metrics_listen {m:?} is not HOST:PORT with a numeric host (e.g. 127.0.0.1:9400)"
            ));
        }
        if s.tls_client_ca.is_some() && s.tls_cert.is_none() {
            return bad(
                "server.tls_client_ca (mutual TLS) needs server.tls_cert and server.tls_key".into(),
            );
        }
        let s = &self.slave;
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return bad("slave.tls_cert and slave.tls_key must be set together".into());
        }
        if (s.tls_ca.is_some() || s.tls_cert.is_some()) && !s.master.starts_with("https://") {
            return bad(format!(
                "slave.tls_ca / slave.tls_cert are set but slave.master {:?} is not an https:// URL",
                s.master
            ));
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
        assert_eq!(c.sync.min_replicas, 0);
        assert_eq!(c.sync.replica_timeout(), Duration::from_secs(10));
        let c = Config::load_from_env(
            Role::Master,
            &CommonArgs::default(),
            &[],
            env(&[
                ("TERN__SYNC__MIN_REPLICAS", "2"),
                ("TERN__SYNC__REPLICA_TIMEOUT_MS", "750"),
            ]),
        )
        .unwrap();
        assert_eq!((c.sync.min_replicas, c.sync.replica_timeout_ms), (2, 750));
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
    fn deprecated_apply_workers_is_still_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "[slave]\napply_workers = 4\n").unwrap();
        let args = CommonArgs {
            config: Some(path),
            ..Default::default()
        };
        let c = Config::load_from_env(Role::Slave, &args, &[], env(&[])).unwrap();
        assert_eq!(c.slave.apply_workers, Some(4));
        let c = Config::load_from_env(Role::Slave, &CommonArgs::default(), &[], env(&[])).unwrap();
        assert_eq!(c.slave.apply_workers, None);
    }

    #[test]
    fn worker_threads_default_to_the_cores_less_one() {
        let c = Config::load_from_env(Role::Master, &CommonArgs::default(), &[], env(&[])).unwrap();
        assert_eq!(c.server.worker_threads, 0);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.server.runtime_threads(), cores.saturating_sub(1).max(1));
        let c = Config::load_from_env(
            Role::Slave,
            &CommonArgs::default(),
            &[],
            env(&[("TERN__SERVER__WORKER_THREADS", "3")]),
        )
        .unwrap();
        assert_eq!(c.server.runtime_threads(), 3);
        let rt = c.server.runtime().unwrap();
        assert_eq!(rt.metrics().num_workers(), 3);
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
        let e = Config::load_from_env(
            Role::Master,
            &CommonArgs::default(),
            &[],
            env(&[("TERN__SERVER__WORKER_THREADS", "1025")]),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("server.worker_threads 1025 is more than 1024"),
            "{e}"
        );
        let e = Config::load_from_env(
            Role::Master,
            &CommonArgs::default(),
            &[],
            env(&[("TERN__SYNC__MIN_REPLICAS", "33")]),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("sync.min_replicas 33 is above sync.max_sessions 32"),
            "{e}"
        );
        for pairs in [
            &[("TERN__SYNC__REPLICA_TIMEOUT_MS", "0")][..],
            &[
                ("TERN__SYNC__MIN_REPLICAS", "1"),
                ("TERN__SYNC__REPLICA_TIMEOUT_MS", "30000"),
            ][..],
        ] {
            let e = Config::load_from_env(Role::Master, &CommonArgs::default(), &[], env(pairs))
                .unwrap_err();
            assert!(
                e.to_string().contains("sync.replica_timeout_ms"),
                "{pairs:?}: {e}"
            );
        }
        let args = CommonArgs {
            listen: Some("localhost".into()),
            ..Default::default()
        };
        let e = Config::load_from_env(Role::Master, &args, &[], env(&[])).unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
    }

    #[test]
    fn tokens_inline_or_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file-token\r\n").unwrap();
        let file_s = file.to_str().unwrap();
        let load = |role, pairs: &[(&str, &str)]| {
            Config::load_from_env(role, &CommonArgs::default(), &[], env(pairs))
        };
        let c = load(
            Role::Slave,
            &[
                ("TERN__AUTH__TOKEN", "inline-token"),
                ("TERN__AUTH__REPLICATION_TOKEN_FILE", file_s),
                ("TERN__SLAVE__MASTER_TOKEN_FILE", file_s),
            ],
        )
        .unwrap();
        assert_eq!(c.auth.token.as_ref().unwrap().expose(), "inline-token");
        assert_eq!(
            c.auth.replication_token.as_ref().unwrap().expose(),
            "from-file-token"
        );
        assert_eq!(
            c.slave.master_token.as_ref().unwrap().expose(),
            "from-file-token"
        );
        // Number- and bool-like tokens from the environment are kept as given.
        for raw in ["0123", "1e5", "true", "12345678901234567890123"] {
            let c = load(Role::Slave, &[("TERN__SLAVE__MASTER_TOKEN", raw)]).unwrap();
            assert_eq!(c.slave.master_token.unwrap().expose(), raw);
        }
        let shown = format!("{c:?}");
        assert!(!shown.contains("inline-token") && !shown.contains("from-file-token"));
        let c = load(Role::Master, &[]).unwrap();
        assert!(c.auth.token.is_none() && c.auth.replication_token.is_none());

        let e = load(
            Role::Master,
            &[
                ("TERN__AUTH__TOKEN", "a"),
                ("TERN__AUTH__TOKEN_FILE", file_s),
            ],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("auth.token and auth.token_file are both set"),
            "{e}"
        );
        let missing = dir.path().join("missing");
        let e = load(
            Role::Slave,
            &[("TERN__SLAVE__MASTER_TOKEN_FILE", missing.to_str().unwrap())],
        )
        .unwrap_err();
        assert!(e.to_string().contains("slave.master_token_file"), "{e}");
        std::fs::write(&file, "two words\n").unwrap();
        let e = load(Role::Master, &[("TERN__AUTH__TOKEN_FILE", file_s)]).unwrap_err();
        assert!(e.to_string().contains("not visible ASCII at byte 3"), "{e}");
        assert!(!e.to_string().contains("words"), "{e}");
        std::fs::write(&file, "\n").unwrap();
        let e = load(Role::Master, &[("TERN__AUTH__TOKEN_FILE", file_s)]).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
    }

    #[test]
    fn tls_keys_must_be_consistent() {
        let load = |role, pairs: &[(&str, &str)]| {
            Config::load_from_env(role, &CommonArgs::default(), &[], env(pairs))
                .unwrap_err()
                .to_string()
        };
        let e = load(
            Role::Master,
            &[("TERN__SERVER__TLS_CERT", "/nonexistent/c.pem")],
        );
        assert!(
            e.contains("server.tls_cert and server.tls_key must be set together"),
            "{e}"
        );
        let e = load(
            Role::Master,
            &[("TERN__SERVER__TLS_CLIENT_CA", "/nonexistent/ca.pem")],
        );
        assert!(e.contains("server.tls_client_ca"), "{e}");
        let e = load(
            Role::Master,
            &[
                ("TERN__SERVER__TLS_CERT", "/nonexistent/c.pem"),
                ("TERN__SERVER__TLS_KEY", "/nonexistent/k.pem"),
            ],
        );
        assert!(
            e.contains("server.tls_cert /nonexistent/c.pem: No such file"),
            "{e}"
        );
        let e = load(
            Role::Slave,
            &[("TERN__SLAVE__TLS_CA", "/nonexistent/ca.pem")],
        );
        assert!(e.contains("not an https:// URL"), "{e}");
        let e = load(
            Role::Slave,
            &[
                ("TERN__SLAVE__MASTER", "https://127.0.0.1:7400"),
                ("TERN__SLAVE__TLS_CA", "/nonexistent/ca.pem"),
            ],
        );
        assert!(
            e.contains("slave.tls_ca /nonexistent/ca.pem: No such file"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let e = load(
            Role::Slave,
            &[
                ("TERN__SLAVE__MASTER", "https://127.0.0.1:7400"),
                ("TERN__SLAVE__TLS_CA", not_pem.to_str().unwrap()),
            ],
        );
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
