//! `tern-master`: the writable node of a tern replication group.

use clap::Parser;
use tern_common::config::{CommonArgs, Config, Role};
use tokio_util::sync::CancellationToken;

/// tern master: accepts writes (tern.kv.v1.Kv), keeps the binlog and serves it to
/// slaves (tern.replication.v1.Replication), all on one gRPC port with reflection.
///
/// Configuration: defaults, then --config FILE (TOML), then TERN__SECTION__KEY
/// environment variables (e.g. TERN__BINLOG__FSYNC=everysec), then these flags.
#[derive(Parser, Debug)]
#[command(name = "tern-master", version, about, long_about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    tern_common::server::arenas::limit_malloc_arenas();
    let args = Args::parse();
    let cfg = match Config::load(Role::Master, &args.common, &[]) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern-master: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match cfg.server.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern-master: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Telemetry is set up inside the runtime (the OTLP exporter needs it) and
    // dropped after the node stopped, while the runtime still runs, so the last
    // spans are flushed.
    let telemetry =
        match rt.block_on(async { tern_common::telemetry::init("tern-master", &cfg.telemetry) }) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tern-master: {e:#}");
                return std::process::ExitCode::from(2);
            }
        };
    // Before anything opens files or accepts: see tern_common::server::fd_limit.
    tern_common::server::fd_limit::raise_fd_limit_logged();
    let result = rt.block_on(tern_master_main(cfg));
    drop(telemetry);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-master: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn tern_master_main(cfg: Config) -> anyhow::Result<()> {
    let listener = tern_common::server::bind(cfg.listen_addr())
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", cfg.server.listen))?;
    let shutdown = CancellationToken::new();
    tern_common::signals::cancel_on_signal(shutdown.clone());
    tern_master::run(listener, cfg, shutdown).await
}
