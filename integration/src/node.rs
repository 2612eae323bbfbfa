//! One tern process under test: spawn, readiness, signals, restart, clients.
//!
//! A node listens on `127.0.0.1:<port>` (picked once, kept across restarts),
//! keeps its data in `data_dir` and appends its stdout and stderr to
//! `<data_dir>.log`. Dropping a [`Node`] SIGKILLs the process; if the thread is
//! panicking (a failed test) it first prints the log path and its tail.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tern_common::config::Secret;
use tern_common::limits::MAX_MESSAGE_BYTES;
use tern_common::proto::admin::v1::{self as admin, admin_client::AdminClient};
use tern_common::proto::kv::v1::kv_client::KvClient;
use tern_common::server::auth::BearerInterceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How long a node may take to answer `Admin.Info` after a (re)start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to exit after SIGTERM.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of one request made through [`Node::channel`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of a node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// Finds the binary `name`: in `$TERN_BIN_DIR` if set, else next to the
/// running executable or in its parent directory (tests run from
/// `target/debug/deps/`, binaries live in `target/debug/`).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("TERN_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    } else {
        let exe = std::env::current_exe().context("locating the running executable")?;
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_path_buf());
            if let Some(up) = dir.parent() {
                dirs.push(up.to_path_buf());
            }
        }
    }
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "binary `{name}` not found in {}: run `cargo build --bins` first (same profile and \
         CARGO_TARGET_DIR as the tests), or set TERN_BIN_DIR to the directory holding it",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A gRPC channel to `url` that connects on first use and reconnects after
/// failures; every request gets `timeout`.
pub fn channel(url: &str, timeout: Duration) -> Channel {
    channel_with_tls(url, timeout, None)
}

/// As [`channel`], over TLS with `tls` when given (`url` is then `https://`).
pub fn channel_with_tls(url: &str, timeout: Duration, tls: Option<&ClientTlsConfig>) -> Channel {
    let mut endpoint = Endpoint::from_shared(url.to_string()).expect("a valid URL");
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .expect("a valid client TLS configuration");
    }
    endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy()
}

/// How this harness's clients reach a node that requires a bearer token
/// (`auth.token`) or TLS (`server.tls_cert`).
#[derive(Clone, Debug, Default)]
pub struct ClientAccess {
    /// Sent as `authorization: Bearer <token>` by [`Node::authed_kv`],
    /// [`Node::authed_admin`], [`Node::info`], [`Node::checksum`] and readiness.
    pub token: Option<Secret>,
    /// TLS for every channel to the node; its [`Node::url`] is then `https://`.
    pub tls: Option<ClientTlsConfig>,
}

/// A channel whose requests carry the node's bearer token.
pub type AuthedChannel = InterceptedService<Channel, BearerInterceptor>;

/// A Kv client that can send and receive the largest messages a node accepts.
pub fn kv_client(ch: Channel) -> KvClient<Channel> {
    KvClient::new(ch)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
}

pub struct Node {
    /// "master", "slave", ...: the binary name without `tern-`.
    pub role: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    bin: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    /// The child's RLIMIT_NOFILE (soft and hard), when set.
    nofile: Option<u64>,
    child: Option<Child>,
    starts: u32,
    access: ClientAccess,
}

impl Node {
    /// Starts `bin_name` with `--listen 127.0.0.1:<free port> --data-dir
    /// <data_dir>` followed by `args`, with `envs` added to a cleaned
    /// environment (inherited `TERN__*` and `OTEL_*` variables are removed).
    /// Does not wait for readiness: see [`Node::wait_ready`].
    pub fn start(
        bin_name: &str,
        data_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Node> {
        Node::start_with_nofile(bin_name, data_dir, args, envs, None)
    }

    /// As [`Node::start`], with the process's open-file limit (soft and hard
    /// `RLIMIT_NOFILE`, kept across restarts) set to `nofile` when given.
    pub fn start_with_nofile(
        bin_name: &str,
        data_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> anyhow::Result<Node> {
        let bin = bin_path(bin_name)?;
        let port = crate::pick_port();
        let mut all_args: Vec<OsString> = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
            "--data-dir".into(),
            data_dir.as_os_str().to_owned(),
        ];
        all_args.extend(args.iter().map(OsString::from));
        let mut log_path = data_dir.as_os_str().to_owned();
        log_path.push(".log");
        let mut node = Node {
            role: bin_name.trim_start_matches("tern-").to_string(),
            port,
            data_dir: data_dir.to_path_buf(),
            log_path: PathBuf::from(log_path),
            bin,
            args: all_args,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            nofile,
            child: None,
            starts: 0,
            access: ClientAccess::default(),
        };
        node.spawn()?;
        Ok(node)
    }

    /// Starts a `tern-master` and waits until it answers `Admin.Info`.
    pub async fn start_master(
        data_dir: &Path,
        extra_env: &[(&str, &str)],
        extra_args: &[&str],
    ) -> anyhow::Result<Node> {
        Node::start_ready("tern-master", data_dir, extra_args, extra_env).await
    }

    /// Starts a `tern-slave` of `master_url` and waits until it answers `Admin.Info`.
    pub async fn start_slave(
        data_dir: &Path,
        master_url: &str,
        extra_env: &[(&str, &str)],
        extra_args: &[&str],
    ) -> anyhow::Result<Node> {
        let mut args = vec!["--master", master_url];
        args.extend_from_slice(extra_args);
        Node::start_ready("tern-slave", data_dir, &args, extra_env).await
    }

    /// [`Node::start`] then [`Node::wait_ready`]; if the port picked was taken
    /// by someone else meanwhile, tries again on another port (twice at most).
    pub async fn start_ready(
        bin_name: &str,
        data_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Node> {
        Node::start_ready_with_nofile(bin_name, data_dir, args, envs, None).await
    }

    /// As [`Node::start_ready`], with the open-file limit of
    /// [`Node::start_with_nofile`].
    pub async fn start_ready_with_nofile(
        bin_name: &str,
        data_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> anyhow::Result<Node> {
        Node::start_ready_inner(
            bin_name,
            data_dir,
            args,
            envs,
            nofile,
            ClientAccess::default(),
        )
        .await
    }

    /// As [`Node::start_ready`], for a node whose clients need `access`
    /// (a bearer token, TLS) to call it.
    pub async fn start_ready_with_access(
        bin_name: &str,
        data_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        access: ClientAccess,
    ) -> anyhow::Result<Node> {
        Node::start_ready_inner(bin_name, data_dir, args, envs, None, access).await
    }

    async fn start_ready_inner(
        bin_name: &str,
        data_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        nofile: Option<u64>,
        access: ClientAccess,
    ) -> anyhow::Result<Node> {
        let mut attempt = 0;
        loop {
            let mut node = Node::start_with_nofile(bin_name, data_dir, args, envs, nofile)?;
            node.access = access.clone();
            match node.wait_ready().await {
                Ok(_) => return Ok(node),
                Err(e) => {
                    attempt += 1;
                    let port_taken = node.child.is_none()
                        && node
                            .log_tail(LOG_TAIL_LINES)
                            .contains("Address already in use");
                    if !port_taken || attempt > 2 {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        self.starts += 1;
        writeln!(
            log,
            "=== tern-integration: start #{} of {} {:?}",
            self.starts,
            self.bin.display(),
            self.args
        )?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, _) in std::env::vars_os() {
            let k_str = k.to_string_lossy();
            if k_str.starts_with("TERN__") || k_str.starts_with("OTEL_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env("RUST_BACKTRACE", "1");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(n) = self.nofile {
            let lim = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: runs in the forked child before exec; setrlimit(2) is
            // async-signal-safe and only reads `lim`, a plain copied value.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// `http://127.0.0.1:<port>`, or `https://` when the node speaks TLS.
    pub fn url(&self) -> String {
        let scheme = if self.access.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process id, while the node runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A lazily connecting channel to this node (survives restarts).
    pub fn channel(&self) -> Channel {
        channel_with_tls(&self.url(), REQUEST_TIMEOUT, self.access.tls.as_ref())
    }

    /// A lazily connecting channel whose requests carry the node's token.
    fn authed_channel(&self, timeout: Duration) -> AuthedChannel {
        InterceptedService::new(
            channel_with_tls(&self.url(), timeout, self.access.tls.as_ref()),
            BearerInterceptor::new(self.access.token.as_ref()),
        )
    }

    /// A Kv client sending the node's bearer token ([`ClientAccess::token`]).
    pub fn authed_kv(&self) -> KvClient<AuthedChannel> {
        KvClient::new(self.authed_channel(REQUEST_TIMEOUT))
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// An Admin client sending the node's bearer token ([`ClientAccess::token`]).
    pub fn authed_admin(&self) -> AdminClient<AuthedChannel> {
        AdminClient::new(self.authed_channel(REQUEST_TIMEOUT))
    }

    pub fn kv(&self) -> KvClient<Channel> {
        kv_client(self.channel())
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel())
    }

    pub async fn info(&self) -> anyhow::Result<admin::InfoResponse> {
        let r = self
            .authed_admin()
            .info(admin::InfoRequest {})
            .await
            .with_context(|| format!("Admin.Info on {}", self.role))?;
        Ok(r.into_inner())
    }

    pub async fn checksum(&self) -> anyhow::Result<admin::ChecksumResponse> {
        let r = self
            .authed_admin()
            .checksum(admin::ChecksumRequest {})
            .await
            .with_context(|| format!("Admin.Checksum on {}", self.role))?;
        Ok(r.into_inner())
    }

    /// Polls `Admin.Info` every 100 ms until it answers; fails at once if the
    /// process exits, or after [`READY_TIMEOUT`].
    pub async fn wait_ready(&mut self) -> anyhow::Result<admin::InfoResponse> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let ch = self.authed_channel(Duration::from_secs(2));
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited with {status} before answering Admin.Info; log {}:\n{}",
                    self.role,
                    self.log_path.display(),
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            let last_err = match AdminClient::new(ch.clone())
                .info(admin::InfoRequest {})
                .await
            {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer Admin.Info within {READY_TIMEOUT:?} (last error: {last_err}); \
                     log {}:\n{}",
                    self.role,
                    self.log_path.display(),
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status if the process has exited (and is reaped), else None.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match &mut self.child {
            None => bail!(
                "{} is not running (never started or already reaped)",
                self.role
            ),
            Some(c) => {
                let st = c.try_wait()?;
                if st.is_some() {
                    self.child = None;
                }
                Ok(st)
            }
        }
    }

    fn signal(&self, sig: libc::c_int) -> anyhow::Result<()> {
        let Some(child) = &self.child else {
            bail!("{} is not running", self.role);
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet (so it
        // cannot have been reused).
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            bail!(
                "kill({pid}, {sig}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGKILLs the process and reaps it.
    pub fn sigkill(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.role);
        };
        child.kill().ok();
        Ok(child.wait()?)
    }

    /// SIGTERMs the process and waits (at most [`EXIT_TIMEOUT`], then SIGKILL
    /// and an error) for it to exit.
    pub async fn sigterm_and_wait(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                self.sigkill().ok();
                bail!(
                    "{} did not exit within {EXIT_TIMEOUT:?} after SIGTERM; log {}:\n{}",
                    self.role,
                    self.log_path.display(),
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Freezes the process (it keeps its sockets but answers nothing).
    pub fn sigstop(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    pub fn sigcont(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Starts the process again, same binary, port, data directory, flags and
    /// environment, and waits until it answers. It must have exited first.
    pub async fn restart(&mut self) -> anyhow::Result<admin::InfoResponse> {
        if self.child.is_some() && self.try_wait()?.is_none() {
            bail!(
                "{} is still running: sigkill or sigterm it first",
                self.role
            );
        }
        self.spawn()?;
        self.wait_ready().await
    }

    /// Sets the value of `flag` (e.g. `--master`) for the next (re)start,
    /// adding the flag if the node was started without it.
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.into(),
            _ => {
                self.args.push(flag.into());
                self.args.push(value.into());
            }
        }
    }

    /// Environment variable `key` for the next (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.to_string(), value.to_string()));
    }

    /// The last `n` lines of this node's log.
    pub fn log_tail(&self, n: usize) -> String {
        match std::fs::read(&self.log_path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log_path.display()),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGCONT first in case it was stopped, so the kill is delivered at once.
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: as in `signal`: our own, unreaped child.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
            child.kill().ok();
            child.wait().ok();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} on port {}: log {} (last {LOG_TAIL_LINES} lines) ---\n{}\n--- end of {} log ---",
                self.role,
                self.port,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.role
            );
        }
    }
}
