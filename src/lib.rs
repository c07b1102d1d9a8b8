//! outboxd delivers webhooks from a PostgreSQL transactional outbox.
//!
//! Map of the crate, in layers: each module uses only those above it in
//! this list or beside it in its own layer, never one below
//! (`tests/layering.rs` fails the build on an import cycle).
//!
//! 1. Data and pure rules, importing nothing of the daemon but each other:
//!    - [`model`]: what every part passes around: a claimed event and its
//!      endpoint, an attempt's outcome or refusal, the Payment Cancellation
//!      payload, what an email is made of, [`model::Secret`];
//!    - [`backoff`]: when to retry (pure);
//!    - [`service`]: the one shape of the background services and the
//!      heartbeats behind the watchdog; [`progress`]: whether claims and
//!      records get anything done; [`telemetry`] names every metric;
//!      [`systemd`] speaks systemd's notify protocol.
//! 2. [`config`]: figment loading and the validation of each section.
//! 3. The two edges of a delivery:
//!    - [`http`]: **where a webhook is built** ([`http::request`]), sent
//!      ([`http::client`], with [`http::guard`] deciding which destinations
//!      may be reached and [`http::sign`] signing) and **where its answer is
//!      judged** ([`http::classify`], pure);
//!    - [`store`]: every statement on `outbox.*`: pools and connections,
//!      the migrations, the claim, **where the row is marked**
//!      ([`store::record`]), the upkeep, the emails, the operator's reads
//!      and writes.
//! 4. [`policy`]: what an attempt means for its event: the next state
//!    ([`policy::decide`], [`policy::refused`]), pure.
//! 5. What runs:
//!    - [`pipeline`]: producer → executor → completer: the claim loop and
//!      its capacity ([`pipeline::producer`]), one attempt in order
//!      ([`pipeline::executor`]), the recorder writing outcomes in groups
//!      ([`pipeline::completer`]), the schema looked at again when
//!      statements are refused ([`pipeline::schema_watch`]);
//!    - [`listen`]: LISTEN/NOTIFY wake-ups (a hint; polling is the truth);
//!    - [`maintenance`]: lease expiry, the hold limit, the queue gauges and
//!      retention, each a service;
//!    - [`notify`]: the notification emails: the mailer service, what an
//!      email says, SMTP;
//!    - [`admin`]: `/metrics`, `/healthz`, `/readyz`; [`logging`]: text or
//!      JSON logs.
//! 6. [`engine`]: `outboxd run` in phases: start (waiting for the
//!    database), serve, a bounded stop; it wires the services together.
//! 7. [`cli`]: the subcommands and their exit codes.
//!
//! The SQL contract with the sales application (tables, states, enqueue
//! functions) lives in `sql/migrations/` and is documented in the README.

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod election;
pub mod engine;
pub mod http;
pub mod listen;
pub mod logging;
pub mod maintenance;
pub mod model;
pub mod notify;
pub mod pipeline;
pub mod policy;
pub mod progress;
pub mod service;
pub mod store;
pub mod systemd;
pub mod telemetry;
