//! tern-integration: end-to-end tests over real `tern-master` / `tern-slave`
//! processes, and the `tern-bench` load generator.
//!
//! - [`node`]: the process harness: find the binaries, start a node on a free
//!   port with its own data directory and log file, wait until it answers
//!   `Admin.Info`, SIGKILL / SIGTERM / SIGSTOP / SIGCONT it, restart it on the
//!   same port and data directory, hand out gRPC clients.
//! - [`workload`]: workloads with a model of what was acknowledged, and the
//!   exactly-once checkers: [`workload::Counters`] (IncrBy, also two keys in one
//!   Txn) and [`workload::AppendLog`] (Append of unique tokens), driven by
//!   [`workload::Load`] from many concurrent clients.
//! - [`proxy`]: a fault-injecting TCP proxy between a slave and its master
//!   (drop, blackhole, latency, bandwidth cap, cut after N bytes).
//! - [`chaos`]: seeded randomized fault schedules over real processes, the
//!   consistency checker that judges them, and the totals for TESTING.md
//!   (used by `tests/chaos.rs` and the `tern-chaos` soak binary).
//! - [`repl_bench`]: `tern-bench repl`, replication lag and catch-up rate.
//! - [`TestDir`]: a temporary directory for one test, kept (and its path
//!   printed) when the test fails, so node logs and data can be inspected.
//!
//! The binaries are not built by `cargo test`: run `cargo build --bins` first
//! (or point `TERN_BIN_DIR` at a directory holding them).

pub mod chaos;
pub mod failover;
pub mod node;
pub mod proxy;
pub mod repl_bench;
pub mod workload;

use std::net::TcpListener;
use std::path::{Path, PathBuf};

pub use node::{Node, bin_path};
pub use workload::{AppendLog, Counters, Load, LoadStats, Workload};

/// A free TCP port on 127.0.0.1 (bound to :0, read, released).
///
/// Another process may take it before the node binds it; that is rare enough
/// for tests and shows up as a node that fails to start with "binding ...".
pub fn pick_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().expect("local_addr of a bound socket").port()
}

/// A Python 3 interpreter that can `import <module>`: `$TERN_PYTHON` if set,
/// else the first of `python3` (on PATH) and `/usr/bin/python3` (where
/// Debian's `python3-*` packages land when `python3` is another
/// installation) that can. Panics naming the Debian package (which
/// `scripts/setup.sh` installs) when none can.
pub fn python_with(module: &str, debian_package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("TERN_PYTHON") {
        return PathBuf::from(p);
    }
    for cand in ["python3", "/usr/bin/python3"] {
        let ok = std::process::Command::new(cand)
            .args(["-c", &format!("import {module}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return PathBuf::from(cand);
        }
    }
    panic!(
        "no Python 3 with the `{module}` module (tried python3 and /usr/bin/python3): run \
         scripts/setup.sh (Debian package {debian_package})"
    )
}

/// A temporary directory for one test. Removed when dropped, except while the
/// thread is panicking (a failed test): then it is kept and its path printed.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    /// Creates `$TMPDIR/tern-<name>-XXXXXX`.
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-{name}-"))
            .tempdir()
            .expect("creating a temporary directory");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("TestDir is alive").path()
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path().join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("test directory kept for inspection: {}", kept.display());
        }
    }
}

/// How many bytes at the start of a segment file are whole records, and
/// whether everything after them is zeros (a binlog keeps zeros written ahead
/// of its tail; anything else there is damage).
pub fn segment_records_len(bytes: &[u8]) -> (usize, bool) {
    let mut it = tern_common::record::Records::new(bytes);
    while let Some(Ok(_)) = it.next() {}
    let end = it.offset();
    (end, bytes[end..].iter().all(|&b| b == 0))
}

/// The binlog (or relay log) segment files of a node's data directory
/// (`<data_dir>/binlog/{first_index:020}.binlog`), sorted by first index.
pub fn binlog_segments(data_dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    use anyhow::Context;
    let dir = data_dir.join("binlog");
    let mut segs: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let first: u64 = name.strip_suffix(".binlog")?.parse().ok()?;
            Some((first, e.path()))
        })
        .collect();
    segs.sort();
    Ok(segs)
}

/// The transaction boundaries (Commit indexes) of the binlog (or relay log) in
/// `<data_dir>/binlog`, read straight from the segment files of a stopped or
/// killed process, up to the first damaged record.
pub fn binlog_boundaries(data_dir: &Path) -> anyhow::Result<Vec<u64>> {
    use anyhow::Context;
    let mut out = Vec::new();
    for (_, path) in binlog_segments(data_dir)? {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        for r in tern_common::record::Records::new(&bytes) {
            match r {
                Ok((ev, _)) if ev.kind.tag() == tern_common::record::KindTag::Commit => {
                    out.push(ev.index)
                }
                Ok(_) => {}
                Err(_) => return Ok(out),
            }
        }
    }
    Ok(out)
}

/// Makes a stopped or killed node's binlog end at boundary `index`, as a power
/// loss does to an unsynced tail: later segments are removed and the one
/// holding `index + 1` is cut there. Returns the bytes removed.
pub fn lose_binlog_tail(data_dir: &Path, index: u64) -> anyhow::Result<u64> {
    use anyhow::Context;
    let mut removed = 0u64;
    for (first, path) in binlog_segments(data_dir)?.into_iter().rev() {
        let len = std::fs::metadata(&path)?.len();
        if first > index + 1 || (first == index + 1 && first > 1) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed += len;
            continue;
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut it = tern_common::record::Records::new(&bytes);
        let mut cut = None;
        loop {
            let at = it.offset();
            match it.next() {
                Some(Ok((ev, _))) if ev.index == index + 1 => {
                    cut = Some(at);
                    break;
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        let Some(cut) = cut else {
            // The log already ends at or before `index`.
            return Ok(removed);
        };
        let f = std::fs::OpenOptions::new().write(true).open(&path)?;
        f.set_len(cut as u64)?;
        f.sync_all()?;
        removed += len - cut as u64;
        return Ok(removed);
    }
    anyhow::bail!("no segment holds event {}", index + 1)
}
