//! Ctrl-C and SIGTERM both mean "drain and stop".

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGINT or SIGTERM; returns which arrived through the task.
pub fn cancel_on_signal(token: CancellationToken) -> tokio::task::JoinHandle<Option<&'static str>> {
    tokio::spawn(async move {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return None;
        };
        let which = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = token.cancelled() => return None,
        };
        tracing::warn!(signal = which, "draining");
        token.cancel();
        Some(which)
    })
}
