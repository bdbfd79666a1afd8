//! Ctrl-C and SIGTERM both mean "drain and stop"; a second one means "stop now".

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The exit status of a process stopped by a second signal: 128 + SIGINT's number, as shells
/// report an interrupted command.
const FORCED_EXIT: i32 = 130;

/// Cancels `token` on the first SIGINT or SIGTERM (a drain); on a second one the process
/// exits at once with `FORCED_EXIT`, leaving what it held to expire as after a crash (shards
/// resume from their last checkpoint). The task ends with the process, or when aborted.
pub fn cancel_on_signal(token: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        for signals in 1.. {
            let which = tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
            if signals == 1 {
                tracing::warn!(signal = which, "draining; a second signal stops at once");
                eprintln!("nightshift: {which}: draining (again to stop at once)");
                token.cancel();
            } else {
                eprintln!("nightshift: {which} again: stopping without draining");
                std::process::exit(FORCED_EXIT);
            }
        }
    })
}
