//! `tern-chaos`: long soaks of seeded randomized fault schedules over real
//! `tern-master` / `tern-slave` processes (see `tern_integration::chaos`).
//!
//! ```text
//! tern-chaos --duration 600 --seed 42 --slaves 2 [--schedule-secs 40] [--dir /tmp/soak]
//! tern-chaos --seed 1234 --runs 1          # replay exactly the schedule of seed 1234
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
    let mut totals = Totals::default();
    let mut seed = first;
    loop {
        if started.elapsed() >= Duration::from_secs(cli.duration)
            || cli.runs.is_some_and(|n| totals.schedules >= n)
        {
            break;
        }
        if let Some(d) = &cli.dir {
            std::fs::create_dir_all(d)
                .map_err(|e| anyhow::anyhow!("creating --dir {}: {e}", d.display()))?;
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!("tern-chaos-{seed}-"))
            .tempdir_in(cli.dir.clone().unwrap_or_else(std::env::temp_dir))?;
        let cfg = ChaosConfig {
            seed,
            slaves: cli.slaves,
            duration: Duration::from_secs(cli.schedule_secs),
            dir: tmp.path().to_path_buf(),
            clients: cli.clients,
        };
        let report = chaos::run(&cfg).await?;
        println!("{report}");
        if !report.divergences.is_empty() || cli.keep {
            let kept = tmp.keep();
            let what = if report.divergences.is_empty() {
                "ok"
            } else {
                "DIVERGED"
            };
            println!(
                "seed {seed} {what}; data and logs kept in {}",
                kept.display()
            );
        }
        totals.add(&report);
        seed = seed.wrapping_add(1);
    }
    println!(
        "=== totals (first seed {first}, {:.0?}) ===\n{totals}",
        started.elapsed()
    );
    if totals.divergences > 0 {
        std::process::exit(1);
    }
    Ok(())
}
