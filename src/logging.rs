//! Log output: human-readable text by default, JSON lines on request, to
//! stderr. `RUST_LOG`, when set, overrides `log.level`. The level can be
//! changed while running (SIGHUP re-reads `log.level`): the filter sits
//! behind a reload handle.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// Changes the active filter of the installed subscriber.
#[derive(Clone)]
pub struct LogHandle {
    reload: Option<reload::Handle<EnvFilter, Registry>>,
    /// The filter came from RUST_LOG, which a reload does not re-read.
    from_env: bool,
}

impl LogHandle {
    /// Applies a new `log.level`. Refused while RUST_LOG rules, since the
    /// operator chose that explicitly for this process.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if self.from_env {
            return Err("RUST_LOG is set and takes precedence over log.level".into());
        }
        let Some(reload) = &self.reload else {
            return Err("logging was set up elsewhere".into());
        };
        let filter = EnvFilter::builder()
            .parse(level)
            .map_err(|e| format!("log.level: {e}"))?;
        reload.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber. Safe to call more than once (later calls
/// leave the first subscriber in place and get a handle that cannot reload).
pub fn init(config: &LogConfig) -> LogHandle {
    let (filter, from_env) = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            match EnvFilter::builder().parse(&directives) {
                Ok(filter) => (filter, true),
                Err(e) => {
                    eprintln!("outboxd: ignoring RUST_LOG ({e}); using log.level");
                    (EnvFilter::new(&config.level), false)
                }
            }
        }
        _ => (EnvFilter::new(&config.level), false),
    };
    let (filter, reload) = reload::Layer::new(filter);
    let output = match config.format {
        // Colours only for a person at a terminal, not in journald or a file.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok();
    LogHandle {
        reload: installed.then_some(reload),
        from_env,
    }
}
