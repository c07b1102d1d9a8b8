//! outboxd delivers webhooks from a PostgreSQL transactional outbox.
//!
//! Map of the crate:
//!
//! - [`cli`]: the subcommands and their exit codes: the daemon's (`migrate`,
//!   `check`, `run`) and the operator's (`endpoint`, `events`, `status`,
//!   `enqueue`, `completions`, `man`), one file each under `src/cli/`.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`; [`telemetry`] names every
//!   metric; [`systemd`] speaks systemd's notify protocol (READY, STATUS,
//!   STOPPING) and runs the watchdog ticker.
//! - [`engine`]: `outboxd run` in phases: start (waiting for the database),
//!   serve, a bounded stop. What it starts:
//!   - [`service`]: the one shape of the background services, and the
//!     heartbeats that feed the watchdog;
//!   - [`listen`]: LISTEN/NOTIFY wake-ups, a service (a hint; polling is the
//!     truth);
//!   - [`claim`]: the claim loop, leasing due events with
//!     `sql/queries/claim.sql`;
//!   - [`attempt`]: one delivery attempt, in order:
//!     - [`webhook`]: every refusal before sending, and the request with
//!       the exact documented body;
//!     - [`deliver`]: the HTTP(S) client, deadlines and body cap, with
//!       [`guard`] deciding which destinations may be reached (the SSRF
//!       guard);
//!     - [`classify`]: judging the receiver's answer (pure);
//!     - [`record`]: the next state ([`record::decide`], with [`backoff`]
//!       saying when to retry), then the recorder writes it in fenced
//!       batches with `sql/queries/record.sql`, queueing a notification for
//!       each final failure in the same statement;
//!   - [`maintenance`]: the queue gauges and retention, both services.
//! - [`mailer`]: a service: gathers notifications into throttled emails and
//!   sends them, with [`email`] (what an email says, pure) and [`smtp`]
//!   (mail-send, one SMTP transaction per recipient).
//! - [`config`]: figment loading and validation of `config.toml` and
//!   `OUTBOXD_…` variables; secrets as [`config::Secret`].
//! - [`db`]: connections, and PostgreSQL errors as readable text.
//! - [`migrate`]: the SQL migrations in `sql/migrations/` and the runner that
//!   applies them under an advisory lock.
//! - [`logging`]: tracing subscriber set-up (text or JSON).
//!
//! The SQL contract with the sales application (tables, states, enqueue
//! functions) lives in `sql/migrations/` and is documented in the README.

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod engine;
pub mod http;
pub mod listen;
pub mod logging;
pub mod maintenance;
pub mod model;
pub mod notify;
pub mod pipeline;
pub mod policy;
pub mod service;
pub mod store;
pub mod systemd;
pub mod telemetry;
