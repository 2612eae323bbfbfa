//! `tern-chaos`: long soaks of seeded randomized fault schedules over real
//! `tern-master` / `tern-slave` processes (see `tern_integration::chaos`).
//!
//! ```text
//! tern-chaos --duration 600 --seed 42 --slaves 2 [--schedule-secs 40] [--dir /tmp/soak]
//! tern-chaos --seed 1234 --runs 1          # replay exactly the schedule of seed 1234
//! tern-chaos --failover --seed 1 --runs 20 # failover schedules (tern_integration::failover)
//! ```
//!
//! Schedules use seeds `seed, seed + 1, ...` until `--duration` seconds are
//! spent (or `--runs` schedules ran). Each run prints its seed and schedule,
//! then its report; the totals at the end are the figures of TESTING.md. The
//! exit status is 1 if any run diverged. The binaries must be built with
//! `--features tern-slave/fault-injection` (they are looked up next to this
//! one, or in `TERN_BIN_DIR`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use tern_integration::chaos::{self, ChaosConfig, Totals};
use tern_integration::failover::{self, FailoverConfig, FailoverTotals};

#[derive(Parser, Debug)]
#[command(
    name = "tern-chaos",
    version,
    about = "Randomized fault schedules over real tern processes"
)]
struct Cli {
    /// Total soak time in seconds (schedules start while time remains).
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Seed of the first schedule (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Slaves per schedule.
    #[arg(long, default_value_t = 2)]
    slaves: usize,
    /// Fault-injection time of one schedule, in seconds.
    #[arg(long, default_value_t = 40)]
    schedule_secs: u64,
    /// Stop after this many schedules.
    #[arg(long)]
    runs: Option<u64>,
    /// Concurrent load clients on the master.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Directory for the runs' data and logs (default: a temporary one,
    /// kept when a run diverges).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep every run's data and logs, not only those that diverged.
    #[arg(long)]
    keep: bool,
    /// Run failover schedules instead: master killed under semi-synchronous
    /// and asynchronous load, the most advanced slave promoted, the others
    /// re-pointed, the old master rejoined; with a cascading chain
    /// (`--slaves` and `--schedule-secs` do not apply).
    #[arg(long)]
    failover: bool,
    /// Failovers per failover schedule.
    #[arg(long, default_value_t = 3)]
    failovers: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let first = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let started = Instant::now();
    let diverged = if cli.failover {
        let mut totals = FailoverTotals::default();
        soak(&cli, first, async |seed, dir| {
            let cfg = FailoverConfig {
                seed,
                failovers: cli.failovers,
                dir,
            };
            let report = failover::run(&cfg).await?;
            totals.add(&report);
            Ok((report.to_string(), report.divergences.is_empty()))
        })
        .await?;
        println!(
            "=== failover totals (first seed {first}, {:.0?}) ===\n{totals}",
            started.elapsed()
        );
        totals.diverged_runs > 0
    } else {
        let mut totals = Totals::default();
        soak(&cli, first, async |seed, dir| {
            let cfg = ChaosConfig {
                seed,
                slaves: cli.slaves,
                duration: Duration::from_secs(cli.schedule_secs),
                dir,
                clients: cli.clients,
            };
            let report = chaos::run(&cfg).await?;
            totals.add(&report);
            Ok((report.to_string(), report.divergences.is_empty()))
        })
        .await?;
        println!(
            "=== totals (first seed {first}, {:.0?}) ===\n{totals}",
            started.elapsed()
        );
        totals.divergences > 0
    };
    if diverged {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs the schedules of seeds `first`, `first + 1`, ... (each in a
/// directory of its own, printing its report) while `--duration` and
/// `--runs` allow. `run` returns the report and whether the run passed.
async fn soak(
    cli: &Cli,
    first: u64,
    mut run: impl AsyncFnMut(u64, PathBuf) -> anyhow::Result<(String, bool)>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut seed = first;
    let mut runs = 0;
    while started.elapsed() < Duration::from_secs(cli.duration) && cli.runs.is_none_or(|n| runs < n)
    {
        let tmp = run_dir(cli, seed)?;
        let (report, ok) = run(seed, tmp.path().to_path_buf()).await?;
        println!("{report}");
        keep_if(cli, tmp, seed, ok);
        runs += 1;
        seed = seed.wrapping_add(1);
    }
    Ok(())
}

/// A temporary directory for one run (under `--dir` when given).
fn run_dir(cli: &Cli, seed: u64) -> anyhow::Result<tempfile::TempDir> {
    if let Some(d) = &cli.dir {
        std::fs::create_dir_all(d)
            .map_err(|e| anyhow::anyhow!("creating --dir {}: {e}", d.display()))?;
    }
    Ok(tempfile::Builder::new()
        .prefix(&format!("tern-chaos-{seed}-"))
        .tempdir_in(cli.dir.clone().unwrap_or_else(std::env::temp_dir))?)
}

/// Keeps a run's data and logs when it diverged (or with `--keep`).
fn keep_if(cli: &Cli, tmp: tempfile::TempDir, seed: u64, ok: bool) {
    if !ok || cli.keep {
        let kept = tmp.keep();
        let what = if ok { "ok" } else { "DIVERGED" };
        println!(
            "seed {seed} {what}; data and logs kept in {}",
            kept.display()
        );
    }
}
