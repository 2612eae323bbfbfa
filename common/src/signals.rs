//! SIGTERM / SIGINT handling for the binaries: the first signal starts a clean
//! shutdown; a second one exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT; exits the process on the second.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if n == 0 {
                tracing::info!("signal received: shutting down cleanly (again to exit at once)");
                token.cancel();
            } else {
                tracing::warn!("second signal: exiting without a clean shutdown");
                std::process::exit(130);
            }
        }
    });
}
