//! `tern-slave`: a read-only replica that follows a tern master.

use clap::Parser;
use tern_common::config::{CommonArgs, Config, Role};
use tokio_util::sync::CancellationToken;

/// tern slave: follows a master over gRPC (tern.replication.v1.Replication/Sync),
/// keeps a byte-identical relay log, applies it exactly once in master order and
/// serves reads (tern.kv.v1.Kv Get/Scan with min_index); writes are refused.
///
/// Configuration: defaults, then --config FILE (TOML), then TERN__SECTION__KEY
/// environment variables (e.g. TERN__SYNC__LINK_TIMEOUT_MS=3000), then these flags.
#[derive(Parser, Debug)]
#[command(name = "tern-slave", version, about, long_about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// URL of the master's gRPC port, e.g. http://127.0.0.1:7400.
    #[arg(long, value_name = "URL")]
    master: Option<String>,
}

fn main() -> std::process::ExitCode {
    tern_common::server::arenas::limit_malloc_arenas();
    let args = Args::parse();
    let mut overrides = Vec::new();
    if let Some(m) = &args.master {
        overrides.push(("slave.master", m.clone()));
    }
    let cfg = match Config::load(Role::Slave, &args.common, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern-slave: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match cfg.server.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern-slave: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Telemetry is set up inside the runtime (the OTLP exporter needs it) and
    // dropped after the node stopped, while the runtime still runs, so the last
    // spans are flushed.
    let telemetry =
        match rt.block_on(async { tern_common::telemetry::init("tern-slave", &cfg.telemetry) }) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tern-slave: {e:#}");
                return std::process::ExitCode::from(2);
            }
        };
    // Before anything opens files or accepts: see tern_common::server::fd_limit.
    tern_common::server::fd_limit::raise_fd_limit_logged();
    let result = rt.block_on(slave_main(cfg));
    drop(telemetry);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-slave: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn slave_main(cfg: Config) -> anyhow::Result<()> {
    let listener = tern_common::server::bind(cfg.listen_addr())
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", cfg.server.listen))?;
    let shutdown = CancellationToken::new();
    tern_common::signals::cancel_on_signal(shutdown.clone());
    tern_slave::run(listener, cfg, shutdown).await
}
