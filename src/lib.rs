//! outboxd delivers webhooks from a PostgreSQL transactional outbox.
//!
//! Map of the crate:
//!
//! - [`cli`]: the subcommands and their exit codes.
//! - [`config`]: figment loading and validation of `config.toml` and
//!   `OUTBOXD_…` variables; secrets as [`config::Secret`].
//! - [`db`]: connections, and PostgreSQL errors as readable text.
//! - [`migrate`]: the SQL migrations in `sql/migrations/` and the runner that
//!   applies them under an advisory lock.
//! - [`logging`]: tracing subscriber set-up (text or JSON).
//!
//! The SQL contract with the sales application (tables, states, enqueue
//! functions) lives in `sql/migrations/` and is documented in the README.

pub mod cli;
pub mod config;
pub mod db;
pub mod logging;
pub mod migrate;
