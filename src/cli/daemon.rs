//! `outboxd run`: the delivery engine until SIGTERM or SIGINT, the log
//! level re-read on SIGHUP, and the engine's end as an exit code.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use super::exit::{Exit, fail, migrate_failed};
use crate::config::Config;
use crate::engine::{self, EngineError};
use crate::logging::LogHandle;

/// Runs the engine until a signal stops it. `config_path` is the
/// `--config` given, for re-reading on SIGHUP.
pub(super) async fn run(config: Config, config_path: Option<PathBuf>, log: LogHandle) -> Exit {
    let shutdown = CancellationToken::new();
    let signals = match shutdown_on_signals(shutdown.clone()) {
        Ok(task) => task,
        Err(e) => return fail(&format!("installing signal handlers: {e}")),
    };
    let reloads = match reload_on_sighup(config_path, log) {
        Ok(task) => task,
        Err(e) => return fail(&format!("installing signal handlers: {e}")),
    };
    let result = engine::run(config, shutdown).await;
    signals.abort();
    reloads.abort();
    match result {
        Ok(_) => Exit::Ok,
        Err(e @ EngineError::Schema { .. }) => {
            eprintln!("outboxd: {e}");
            Exit::Schema
        }
        Err(EngineError::SchemaCheck(e)) => migrate_failed(&e),
        Err(e) => fail(&e),
    }
}

/// SIGHUP re-reads the configuration and applies what can change safely
/// while running: `log.level`. Everything else needs a restart (the README
/// says so); an invalid file changes nothing.
fn reload_on_sighup(
    config_path: Option<PathBuf>,
    log: LogHandle,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match crate::config::load(config_path.as_deref()) {
                Ok(config) => match log.set_level(&config.log.level) {
                    Ok(()) => {
                        tracing::info!(level = %config.log.level, "SIGHUP: reloaded log.level")
                    }
                    Err(e) => tracing::warn!(reason = %e, "SIGHUP: log level not changed"),
                },
                Err(e) => tracing::warn!(
                    error = %e.to_string().replace('\n', "; "),
                    "SIGHUP: the configuration is invalid; keeping the current settings"
                ),
            }
        }
    }))
}

/// SIGTERM (systemd's stop) and SIGINT (Ctrl-C) start the graceful shutdown.
fn shutdown_on_signals(
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
        shutdown.cancel();
    }))
}
