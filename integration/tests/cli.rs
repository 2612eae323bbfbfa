//! The `tern-master` command line: help, and bad configuration reported by
//! name with a non-zero exit, never a panic.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tern_integration::{TestDir, bin_path, pick_port};

/// Runs `tern-master` with `args` and `envs` (on a clean `TERN__*`
/// environment), killing it if it is still running after 20 s.
fn master(dir: &TestDir, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let bin = bin_path("tern-master").unwrap_or_else(|e| panic!("{e:#}"));
    let mut cmd = Command::new(bin);
    cmd.current_dir(dir.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TERN__") {
            cmd.env_remove(&k);
        }
    }
    // Whatever happens, never touch the default ./data or port 7400.
    cmd.env("TERN__SERVER__DATA_DIR", dir.join("data"))
        .env("TERN__SERVER__LISTEN", format!("127.0.0.1:{}", pick_port()));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawning tern-master");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            let out = child.wait_with_output().expect("collecting output");
            panic!(
                "tern-master {args:?} {envs:?} was still running after 20 s: it accepted the \
                 configuration. stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting output")
}

/// Asserts a failed start whose stderr names every one of `words`, without a panic.
fn expect_rejected(dir: &TestDir, args: &[&str], envs: &[(&str, &str)], words: &[&str]) {
    let out = master(dir, args, envs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "tern-master {args:?} {envs:?} exited successfully; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "tern-master {args:?} {envs:?} panicked:\n{stderr}"
    );
    for w in words {
        assert!(
            stderr.contains(w),
            "tern-master {args:?} {envs:?}: stderr should name {w:?}:\n{stderr}"
        );
    }
}

#[test]
fn help_lists_the_flags() {
    let dir = TestDir::new("cli-help");
    let out = master(&dir, &["--help"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "--help: {}", out.status);
    for flag in ["--config", "--listen", "--data-dir"] {
        assert!(stdout.contains(flag), "--help lacks {flag}:\n{stdout}");
    }
    let out = master(&dir, &["--version"], &[]);
    assert!(out.status.success(), "--version: {}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("tern-master"));
}

#[test]
fn bad_environment_values_are_named() {
    let dir = TestDir::new("cli-env");
    expect_rejected(
        &dir,
        &[],
        &[("TERN__BINLOG__FSYNC", "sometimes")],
        &["fsync", "sometimes"],
    );
    // A misspelt variable is an unknown key, not silently ignored.
    expect_rejected(&dir, &[], &[("TERN__BINLOG__FSYNK", "always")], &["fsynk"]);
    expect_rejected(
        &dir,
        &[],
        &[("TERN__SYNC__HEARTBEAT_MS", "0")],
        &["heartbeat_ms"],
    );
    expect_rejected(
        &dir,
        &[],
        &[("TERN__BINLOG__SEGMENT_BYTES", "lots")],
        &["segment_bytes"],
    );
    expect_rejected(
        &dir,
        &[],
        &[("TERN__SERVER__METRICS_LISTEN", "localhost:9400")],
        &["server.metrics_listen", "localhost:9400"],
    );
    // A metrics port taken by someone else stops the start, and says so.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = taken.local_addr().expect("local_addr").to_string();
    expect_rejected(
        &dir,
        &[],
        &[("TERN__SERVER__METRICS_LISTEN", addr.as_str())],
        &["metrics endpoint", addr.as_str()],
    );
}

#[test]
fn bad_flags_and_files_are_named() {
    let dir = TestDir::new("cli-flags");
    expect_rejected(
        &dir,
        &["--listen", "nonsense"],
        &[],
        &["server.listen", "nonsense"],
    );
    expect_rejected(&dir, &["--bogus"], &[], &["--bogus"]);
    let missing = dir.join("missing.toml");
    expect_rejected(
        &dir,
        &["--config", missing.to_str().unwrap()],
        &[],
        &["missing.toml"],
    );
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[binlog]\nsegmnet_bytes = 1048576\n").unwrap();
    expect_rejected(
        &dir,
        &["--config", typo.to_str().unwrap()],
        &[],
        &["segmnet_bytes"],
    );
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[binlog\nfsync = \"always\"\n").unwrap();
    expect_rejected(
        &dir,
        &["--config", broken.to_str().unwrap()],
        &[],
        &["broken.toml"],
    );
}
