//! `portcullis serve`: load the config, start logging, bind the listeners and run the gateway
//! until the stop signal; SIGHUP reloads, SIGUSR1 reopens the access log file.

use super::args::LogFormatArg;
use super::{EXIT_CONFIG, config_failure, config_name, load, start_failure};
use crate::access_log::AccessFile;
use crate::config::LogFormat;
use crate::gateway::Snapshot;
use crate::server::Server;
use std::path::PathBuf;
use std::process::ExitCode;

/// Runs the gateway on `config_path` (the built-in configuration without one).
pub fn serve(config_path: Option<PathBuf>, log_format: Option<LogFormatArg>) -> ExitCode {
    let config = match load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let format = match log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Text) => LogFormat::Text,
        None => config.log.format,
    };
    let access_file = match config.log.access_file.as_deref().map(AccessFile::open) {
        None => None,
        Some(Ok(file)) => Some(file),
        Some(Err(e)) => {
            let path = config.log.access_file.clone().unwrap_or_default();
            eprintln!(
                "portcullis: log.access_file {}: cannot open: {e}",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    crate::access_log::init_with(format, access_file.as_ref());
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let source = config_name(config_path.as_deref());
    crate::process::run("portcullis", || async move {
        let snapshot = match Snapshot::new(config) {
            Ok(snapshot) => snapshot,
            Err(e) => return Ok(start_failure(&source, &e)),
        };
        crate::process::memory::release_freed();
        // Fleet mode: no listener opens under a name a live replica holds.
        if let Some(fleet) = &snapshot.fleet
            && let Err(e) = fleet.join(&snapshot.learned).await
        {
            eprintln!("portcullis: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        let server = Server::bind(snapshot, config_path).await?;
        tokio::spawn(reload_on_sighup(server.control()));
        tokio::spawn(reopen_on_sigusr1(access_file));
        tokio::spawn(upgrade_on_sigusr2(server.control()));
        server.run(crate::process::shutdown_signal()).await;
        tracing::info!("exiting");
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `action` at every delivery of the Unix signal `kind` (SIGHUP reloads, SIGUSR1 reopens
/// the access log, SIGUSR2 upgrades); off Unix there are no such signals (the admin listener
/// does the same).
#[cfg(unix)]
async fn on_signal<F: std::future::Future<Output = ()>>(
    kind: tokio::signal::unix::SignalKind,
    mut action: impl FnMut() -> F,
) {
    let Ok(mut signals) = tokio::signal::unix::signal(kind) else {
        return;
    };
    while signals.recv().await.is_some() {
        action().await;
    }
}

#[cfg(not(unix))]
async fn reload_on_sighup(_control: crate::control::Control) {}

/// SIGHUP (`systemctl reload`): re-read the config file and the files it names; a bad file is
/// refused with its problems logged and the running configuration stays.
#[cfg(unix)]
async fn reload_on_sighup(control: crate::control::Control) {
    on_signal(tokio::signal::unix::SignalKind::hangup(), || async {
        let _ = control.reload_async().await;
    })
    .await
}

#[cfg(not(unix))]
async fn upgrade_on_sigusr2(_control: crate::control::Control) {}

/// SIGUSR2: binary upgrade ([`crate::upgrade`]); the result is logged by the server.
#[cfg(unix)]
async fn upgrade_on_sigusr2(control: crate::control::Control) {
    on_signal(tokio::signal::unix::SignalKind::user_defined2(), || async {
        let _ = control.upgrade_async().await;
    })
    .await
}

#[cfg(not(unix))]
async fn reopen_on_sigusr1(_access_file: Option<AccessFile>) {}

/// SIGUSR1 (logrotate's `postrotate`): start a new access log file at the configured path.
/// Never stops the gateway, with or without a file.
#[cfg(unix)]
async fn reopen_on_sigusr1(access_file: Option<AccessFile>) {
    on_signal(tokio::signal::unix::SignalKind::user_defined1(), || async {
        match &access_file {
            None => tracing::info!("SIGUSR1: no log.access_file to reopen"),
            Some(file) => match file.reopen() {
                Ok(()) => tracing::info!(file = %file.path().display(), "access log reopened"),
                Err(e) => {
                    tracing::warn!(file = %file.path().display(), error = %e, "cannot reopen the access log; writing on to the old file")
                }
            },
        }
    })
    .await
}
