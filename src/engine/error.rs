//! Why `outboxd run` ended other than by a stop signal.

use crate::store::migrate;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("starting the delivery engine: {0}")]
    Startup(String),
    #[error("{0}")]
    Schema(String),
    #[error("{0}")]
    SchemaCheck(#[from] migrate::MigrateError),
    #[error("the task that records delivery outcomes stopped unexpectedly")]
    Recorder,
    /// The admin server could not bind: names the setting both ways it is
    /// given, and the way to do without.
    #[error(
        "metrics.listen: cannot serve on {addr}: {reason}{busy}; set metrics.listen (or \
         OUTBOXD_METRICS__LISTEN) to a free address (127.0.0.1:7465; port 0 takes any free \
         one), or \"off\" for no admin server",
        busy = if *.in_use { " (another process, perhaps another outboxd, listens there)" } else { "" }
    )]
    Admin {
        addr: std::net::SocketAddr,
        reason: String,
        /// The address was taken (EADDRINUSE), rather than not ours to take.
        in_use: bool,
    },
}
