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
    #[error("metrics.listen: cannot serve on {addr}: {reason}")]
    Admin {
        addr: std::net::SocketAddr,
        reason: String,
    },
}
