//! What both binaries (`portcullis`, `portcullis-agent`) do around their work: run it on a
//! multi-threaded runtime with errors turned into exit codes, and wait for the stop signal.

use std::future::Future;
use std::process::ExitCode;

/// Runs `body` on a new multi-threaded runtime; an error is printed as `program: error` and
/// exits 1, like a runtime that cannot start.
pub fn run<F, Fut>(program: &str, body: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(body()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// SIGTERM (systemd, container runtimes) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
