//! Helpers of the RESP tests (`resp_clients.rs`, `resp_twemproxy.rs`): tern
//! nodes with `server.resp_listen` on, and the real Redis tools run against
//! them (`redis-cli`, `redis-benchmark`, `nutcracker`, Python's `redis`
//! module). `scripts/setup.sh` installs every tool found here.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tern_integration::node::ClientAccess;
use tern_integration::{Node, TestDir};

/// How long a node's RESP port may take to answer after its gRPC port does.
pub const RESP_READY: Duration = Duration::from_secs(30);

/// A tern node with its RESP front.
pub struct RespNode {
    pub node: Node,
    /// The RESP port, on 127.0.0.1.
    pub resp: u16,
}

impl RespNode {
    pub fn resp_addr(&self) -> String {
        format!("127.0.0.1:{}", self.resp)
    }
}

/// `TERN__SERVER__RESP_LISTEN=127.0.0.1:<port>` plus `extra`.
fn env_with_resp(port: u16, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![(
        "TERN__SERVER__RESP_LISTEN".to_string(),
        format!("127.0.0.1:{port}"),
    )];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// Starts a `tern-master` in `<dir>/<name>` with RESP on a free port, waits
/// for gRPC (with `access`) and then for RESP to answer.
pub async fn start_master(
    dir: &TestDir,
    name: &str,
    extra_env: &[(&str, &str)],
    access: ClientAccess,
) -> RespNode {
    start_node(dir, name, "tern-master", &[], extra_env, access).await
}

/// Starts a `tern-slave` of `master` in `<dir>/<name>` with RESP on.
pub async fn start_slave(
    dir: &TestDir,
    name: &str,
    master: &Node,
    extra_env: &[(&str, &str)],
    access: ClientAccess,
) -> RespNode {
    let url = master.url();
    start_node(
        dir,
        name,
        "tern-slave",
        &["--master", &url],
        extra_env,
        access,
    )
    .await
}

async fn start_node(
    dir: &TestDir,
    name: &str,
    bin: &str,
    args: &[&str],
    extra_env: &[(&str, &str)],
    access: ClientAccess,
) -> RespNode {
    let resp = tern_integration::pick_port();
    let env = env_with_resp(resp, extra_env);
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let node = Node::start_ready_with_access(bin, &dir.join(name), args, &env_ref, access)
        .await
        .unwrap_or_else(|e| panic!("starting {name} ({bin}): {e:#}"));
    let n = RespNode { node, resp };
    wait_resp(&n).await;
    n
}

/// Waits (bounded) until `n`'s RESP port answers PING with PONG or, when a
/// token is configured, with NOAUTH.
pub async fn wait_resp(n: &RespNode) {
    let deadline = Instant::now() + RESP_READY;
    loop {
        let out = cli_output(n.resp, &["PING"], None);
        let text = out_text(&out);
        if text.trim() == "PONG" || text.contains("NOAUTH") {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "the {} RESP port {} did not answer PING within {RESP_READY:?} (last: {text:?}); \
                 log {}:\n{}",
                n.node.role,
                n.resp,
                n.node.log_path.display(),
                n.node.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The path of tool `name`: on `PATH`, else in `/usr/sbin`, `/usr/local/bin`,
/// `/usr/local/sbin` (Debian installs `nutcracker` in `/usr/sbin`, which a
/// non-root `PATH` lacks). Panics saying how to install it.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/usr/bin"]
            .iter()
            .map(PathBuf::from),
    );
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` not found on PATH or in /usr/sbin: run scripts/setup.sh (Debian packages redis-tools, nutcracker)"
    )
}

/// A Python 3 interpreter that can `import redis`: `$TERN_PYTHON` if set, else
/// the first of `python3` (on PATH) and `/usr/bin/python3` (where Debian's
/// `python3-redis` lands when `python3` is another installation) that can.
/// `scripts/setup.sh` applies the same rule.
pub fn python() -> PathBuf {
    tern_integration::python_with("redis", "python3-redis")
}

/// The Python scripts of these tests (`integration/tests/resp/`).
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/resp")
        .join(name)
}

/// Runs `script` with `args` under [`python`]; panics with its output unless
/// it exits 0. Returns its stdout.
pub fn run_python(what: &str, script_name: &str, args: &[String]) -> String {
    let out = Command::new(python())
        .arg(script(script_name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: running python: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: {script_name} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{what}: {}", stdout.trim_end());
    stdout
}

/// `redis-cli --no-raw -h 127.0.0.1 -p <port> <args>` with `stdin` piped when
/// given (then the commands are read from it, one per line, on one
/// connection).
pub fn cli_output(port: u16, args: &[&str], stdin: Option<&[u8]>) -> Output {
    cli_output_with(port, &[], args, stdin)
}

/// As [`cli_output`], with redis-cli options `opts` before the command.
pub fn cli_output_with(port: u16, opts: &[&str], args: &[&str], stdin: Option<&[u8]>) -> Output {
    let port_s = port.to_string();
    let mut cmd = Command::new(tool("redis-cli"));
    cmd.args(["--no-raw", "-h", "127.0.0.1", "-p", &port_s])
        .args(opts)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("running redis-cli: {e}"));
    if let Some(input) = stdin {
        let mut s = child.stdin.take().expect("piped stdin");
        s.write_all(input).expect("writing redis-cli's stdin");
    }
    child.wait_with_output().expect("waiting for redis-cli")
}

/// stdout then stderr of `out`, as text.
pub fn out_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One command through redis-cli; its reply as redis-cli prints it with
/// `--no-raw` (`OK`, `"value"`, `(integer) 3`, `(nil)`, `(error) ...`,
/// `1) ...`), trailing whitespace trimmed.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = cli_output(port, args, None);
    assert!(
        out.status.success(),
        "redis-cli {args:?} on port {port} failed: {}",
        out_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// Asserts that `args` answers exactly `want` (as [`cli`] prints it).
pub fn expect(port: u16, args: &[&str], want: &str) {
    let got = cli(port, args);
    assert_eq!(got, want, "redis-cli {args:?} on port {port}");
}

/// `(integer) N` parsed.
pub fn int_reply(s: &str) -> i64 {
    s.strip_prefix("(integer) ")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected an integer reply, got {s:?}"))
}

/// Every key on `port`, through SCAN with `COUNT count` (and `MATCH pattern`
/// when given), following cursors to 0; panics if a key comes twice.
pub fn scan_keys(port: u16, pattern: Option<&str>, count: u32) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = "0".to_string();
    let count_s = count.to_string();
    loop {
        let mut args = vec!["SCAN", cursor.as_str()];
        if let Some(p) = pattern {
            args.extend(["MATCH", p]);
        }
        args.extend(["COUNT", count_s.as_str()]);
        let out = cli_output_with(port, &["--raw"], &args, None);
        assert!(out.status.success(), "SCAN on {port}: {}", out_text(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let next = lines
            .next()
            .unwrap_or_else(|| panic!("SCAN on {port}: empty answer"))
            .to_string();
        assert!(
            next.parse::<u64>().is_ok(),
            "SCAN on {port}: the cursor {next:?} is not an integer"
        );
        keys.extend(lines.filter(|l| !l.is_empty()).map(str::to_string));
        if next == "0" {
            break;
        }
        cursor = next;
    }
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        keys.len(),
        "SCAN on {port} returned a key twice"
    );
    sorted
}

/// The `field:value` lines of `INFO [section]` on `port`.
pub fn info(port: u16, section: Option<&str>) -> Vec<(String, String)> {
    let mut args = vec!["INFO"];
    args.extend(section);
    let out = cli_output_with(port, &["--raw"], &args, None);
    assert!(out.status.success(), "INFO on {port}: {}", out_text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The value of `field` in `info`; panics if it is absent.
pub fn info_field<'a>(info: &'a [(String, String)], field: &str) -> &'a str {
    info.iter()
        .find(|(k, _)| k == field)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("INFO has no field {field}: {info:?}"))
}

/// `redis-benchmark -h 127.0.0.1 -p <port> <args>`; panics unless it exits 0
/// without an error reply. Returns its stdout.
pub fn benchmark(port: u16, args: &[&str]) -> String {
    let port_s = port.to_string();
    let out = Command::new(tool("redis-benchmark"))
        .args(["-h", "127.0.0.1", "-p", &port_s])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running redis-benchmark: {e}"));
    let text = out_text(&out);
    assert!(
        out.status.success(),
        "redis-benchmark {args:?} on port {port} failed ({}): {text}",
        out.status
    );
    // It exits 1 at the first error reply ("Error from server: ...").
    assert!(
        !text.contains("Error from server"),
        "redis-benchmark {args:?} on port {port} got error replies: {text}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A value with the bytes that break naive RESP code (NUL, CR, LF, `$`,
/// `*`, 0xff), distinct for each `i`; the Python script builds the same.
pub fn binary_value(i: u32) -> Vec<u8> {
    let mut v = vec![(i % 256) as u8, 0, b'\r', b'\n', b'$', b'*', 0xff];
    v.extend_from_slice(format!("{i}\r\n").as_bytes());
    v.extend_from_slice(&[0, b'e', b'n', b'd']);
    v
}

/// A `nutcracker` (twemproxy) process in front of tern masters, killed when
/// dropped.
pub struct Twemproxy {
    child: std::process::Child,
    /// Where it listens for clients, on 127.0.0.1.
    pub port: u16,
    pub config: String,
    pub log_path: PathBuf,
}

impl Twemproxy {
    /// The configuration of README's "Sharding" section for `servers`
    /// (`name`, RESP address), with `redis_auth` when `auth` is given.
    pub fn config(port: u16, servers: &[(&str, String)], auth: Option<&str>) -> String {
        let mut c = format!(
            "tern:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  distribution: ketama\n  \
             redis: true\n  auto_eject_hosts: false\n  timeout: 10000\n"
        );
        if let Some(token) = auth {
            c.push_str(&format!("  redis_auth: {token}\n"));
        }
        c.push_str("  servers:\n");
        for (name, addr) in servers {
            c.push_str(&format!("   - {addr}:1 {name}\n"));
        }
        c
    }

    /// Writes the configuration for `servers` into `dir` and starts
    /// nutcracker on it (its stats port on a free port too); waits until a
    /// PING through it answers PONG.
    pub async fn start(dir: &TestDir, servers: &[(&str, String)]) -> Twemproxy {
        Twemproxy::start_with_auth(dir, servers, None).await
    }

    /// As [`Twemproxy::start`], with `redis_auth: <auth>` when given (then
    /// the PING it waits for may answer NOAUTH).
    pub async fn start_with_auth(
        dir: &TestDir,
        servers: &[(&str, String)],
        auth: Option<&str>,
    ) -> Twemproxy {
        let port = tern_integration::pick_port();
        let stats = tern_integration::pick_port();
        let config = Twemproxy::config(port, servers, auth);
        let conf_path = dir.join(format!("nutcracker-{port}.yml"));
        std::fs::write(&conf_path, &config).expect("writing nutcracker.yml");
        let log_path = dir.join(format!("nutcracker-{port}.log"));
        let bin = tool("nutcracker");
        let check = Command::new(&bin)
            .arg("-t")
            .arg("-c")
            .arg(&conf_path)
            .output()
            .expect("running nutcracker -t");
        assert!(
            check.status.success(),
            "nutcracker -t rejects the configuration:\n{config}\n{}",
            out_text(&check)
        );
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf_path)
            .args(["-s", &stats.to_string(), "-a", "127.0.0.1", "-o"])
            .arg(&log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut p = Twemproxy {
            child,
            port,
            config,
            log_path,
        };
        let deadline = Instant::now() + RESP_READY;
        loop {
            if let Some(status) = p.child.try_wait().expect("nutcracker's status") {
                panic!("nutcracker exited with {status}: {}", p.log_tail());
            }
            let out = cli_output(port, &["PING"], None);
            let text = out_text(&out);
            if text.trim() == "PONG" || (auth.is_some() && text.contains("NOAUTH")) {
                return p;
            }
            if Instant::now() > deadline {
                panic!("nutcracker on {port} did not answer PING: {}", p.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Twemproxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "nutcracker log {}:\n{}",
                self.log_path.display(),
                self.log_tail()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
