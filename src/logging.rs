//! Log output: human-readable text by default, JSON lines on request, to
//! stderr. `RUST_LOG`, when set, overrides `log.level`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Safe to call more than once (tests run the
/// library in-process): later calls leave the first subscriber in place.
pub fn init(config: &LogConfig) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            EnvFilter::builder().parse(&directives).unwrap_or_else(|e| {
                eprintln!("outboxd: ignoring RUST_LOG ({e}); using log.level");
                EnvFilter::new(&config.level)
            })
        }
        _ => EnvFilter::new(&config.level),
    };
    // Colours only for a person at a terminal, not in journald or a file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
