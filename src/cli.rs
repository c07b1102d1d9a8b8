//! The command line: what each subcommand is, and what it does.
//!
//! Output meant for the operator goes to stdout; logs and errors go to
//! stderr. Exit codes are part of the interface (scripts and systemd's
//! `ExecStartPre=` branch on them), see [`Exit`].
//!
//! The daemon's subcommands (`migrate`, `check`, `run`) are implemented
//! here. The operator's live one role per file in `src/cli/`, each with its
//! flags: `endpoint.rs` (`set`'s checks in `settings.rs`, `endpoint test` in
//! `probe.rs`), `events.rs` (`events retry` in `replay.rs`), `status.rs` and
//! `enqueue.rs`; what they share (the connection, `--json`) is in
//! `shared.rs`. [`rules`] checks input the way the schema would; `table.rs`
//! lays out columns; `generate.rs` prints completions and man pages,
//! needing neither config nor database. `exit.rs` holds the exit codes and
//! [`CliError`], and imports no other file of `src/cli/`.

mod endpoint;
mod enqueue;
mod events;
mod exit;
mod generate;
mod probe;
mod replay;
pub mod rules;
mod secret;
mod settings;
mod shared;
mod status;
mod table;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;
use crate::engine::{self, EngineError};
use crate::logging::LogHandle;
use crate::migrate::{self, SchemaState};

pub use exit::{CliError, Exit};
pub use generate::run_without_config;
// The subcommand files take these as `super::…`.
use exit::{fail, migrate_failed, report};
use shared::{connect_current, print_json};

/// Delivers webhooks from a PostgreSQL transactional outbox.
///
/// The sales application writes one row per event into the `outbox` schema in
/// the same transaction as the change it reports; outboxd delivers it to the
/// endpoint the company configured and records the answer.
///
/// Configuration comes from built-in defaults, then the config file, then
/// OUTBOXD_<SECTION>__<KEY> environment variables
/// (e.g. OUTBOXD_DATABASE__URL=postgres://outboxd@db.internal/sales).
#[derive(Debug, Parser)]
#[command(name = "outboxd", version, max_term_width = 100)]
pub struct Cli {
    /// Config file to read [default: ./config.toml, else /etc/outboxd/config.toml]
    ///
    /// When given, the file must exist. When not given and neither default
    /// exists, outboxd runs on built-in defaults and environment variables.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "OUTBOXD_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the outbox schema in the database
    ///
    /// Applies the migrations built into this binary that the database does
    /// not have yet, in one transaction under an advisory lock, so several
    /// instances may run it at once. Running it again changes nothing.
    /// Refuses a database whose schema is newer than this binary (exit 3).
    ///
    /// Example:
    ///
    ///   $ OUTBOXD_DATABASE__URL=postgres://postgres@127.0.0.1/sales outboxd migrate
    Migrate,

    /// Check the configuration, the database connection and the schema
    ///
    /// Exits 0 when the config is valid, the database answers and its schema
    /// is exactly what this binary expects; 1 when the database cannot be
    /// reached; 2 when the config is invalid; 3 when the schema is missing,
    /// older (run `outboxd migrate`) or newer than this binary. Changes
    /// nothing. Useful as systemd's ExecStartPre= or in a deploy script.
    ///
    /// Example:
    ///
    ///   $ outboxd --config /etc/outboxd/config.toml check
    Check,

    /// Run the delivery daemon until SIGTERM or SIGINT
    ///
    /// Wakes on LISTEN/NOTIFY and polls every `delivery.poll_interval` as a
    /// safety net; claims due events with a lease, POSTs each webhook, judges
    /// the answer and records it exactly once. Several instances may run
    /// against one database. On SIGTERM or SIGINT it stops claiming, lets
    /// in-flight deliveries finish within `delivery.drain_timeout`, and exits
    /// 0 within a bounded time (27 s with the defaults); anything unfinished
    /// is delivered again after its lease expires. A database that is down,
    /// at start or later, is waited for, never fatal; a schema that is not
    /// current ends it with exit 3.
    ///
    /// Example:
    ///
    ///   $ OUTBOXD_DATABASE__URL=postgres://outboxd@db.internal/sales outboxd run
    Run,

    /// Configure the webhook endpoint of a company: URL, auth, notify emails
    ///
    /// One endpoint per company and event type, stored in outbox.endpoints
    /// (what the sales application's settings screen writes too). `set`
    /// checks everything before it writes; passwords and tokens are read
    /// from files and never printed back. `test` sends one marked test
    /// request and shows how its answer would be judged.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint set --company 6316 --url https://erp.example.com/hooks --auth bearer --token-file /run/secrets/erp-token --notify ops@example.com
    Endpoint {
        #[command(subcommand)]
        command: endpoint::EndpointCommand,
    },

    /// Look at events and their attempts, and send failed events again
    ///
    /// `list` and `show` read outbox.events and outbox.attempts (`--json`
    /// for scripts); `retry` puts failed events back to pending with the
    /// same event id, so the receiver sees the same Idempotency-Key, and
    /// keeps their earlier attempts.
    ///
    /// Example:
    ///
    ///   $ outboxd events list --company 6316 --state failed --since 2h
    Events {
        #[command(subcommand)]
        command: events::EventsCommand,
    },

    /// Summarise the outbox: states, backlog age, failures, failing endpoints
    ///
    /// Counts events by state, the age of the oldest event due now, the
    /// share of events that failed for good among those finished in the last
    /// hour, and the five endpoints with the most failed events in the last
    /// 24 hours. Reads only.
    ///
    /// Example:
    ///
    ///   $ outboxd status --json
    Status(status::StatusArgs),

    /// Write an event into the outbox the way the sales application does
    ///
    /// Calls the same SQL function as the application, in a transaction of
    /// its own, and prints the new event id. A running daemon delivers it.
    ///
    /// Example:
    ///
    ///   $ outboxd enqueue payment-cancellation --company 6316 --payment 222125 --number 2271 --orders 17899,17900
    Enqueue {
        #[command(subcommand)]
        command: enqueue::EnqueueCommand,
    },

    /// Print a shell completion script
    ///
    /// Needs no configuration and no database. See the README for where each
    /// shell looks for completion scripts.
    ///
    /// Example:
    ///
    ///   $ outboxd completions bash > /usr/share/bash-completion/completions/outboxd
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff), or write one page per subcommand
    ///
    /// Without --out-dir, prints outboxd(1) to stdout. With it, writes
    /// outboxd.1 and a page per subcommand (outboxd-migrate.1, …) into
    /// that directory. Needs no configuration and no database.
    ///
    /// Example:
    ///
    ///   $ outboxd man --out-dir /usr/local/share/man/man1
    Man {
        /// Write every page into this directory instead of printing one
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// Runs a parsed subcommand with a loaded configuration. `config_path` is
/// the `--config` given, for re-reading on SIGHUP.
pub async fn run(
    command: Command,
    config: Config,
    config_path: Option<PathBuf>,
    log: LogHandle,
) -> Exit {
    let result = match command {
        Command::Migrate => return run_migrate(&config).await,
        Command::Check => return run_check(&config).await,
        Command::Run => return run_daemon(config, config_path, log).await,
        Command::Endpoint { command } => endpoint::run(command, &config).await,
        Command::Events { command } => events::run(command, &config).await,
        Command::Status(args) => status::run(args, &config).await,
        Command::Enqueue { command } => enqueue::run(command, &config).await,
        Command::Completions { .. } | Command::Man { .. } => {
            return run_without_config(&command).unwrap_or(Exit::Ok);
        }
    };
    report(result)
}

async fn run_daemon(config: Config, config_path: Option<PathBuf>, log: LogHandle) -> Exit {
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

/// The indexes a `migrate` run built and dropped outside its transaction.
fn print_online(report: &migrate::Report) {
    if !report.built.is_empty() {
        println!("built indexes online: {}", report.built.join(", "));
    }
    if !report.dropped.is_empty() {
        println!(
            "dropped replaced indexes online: {}",
            report.dropped.join(", ")
        );
    }
}

async fn run_migrate(config: &Config) -> Exit {
    let mut client = match db::connect(&config.database).await {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    match migrate::migrate(&mut client).await {
        Ok(report) if report.applied.is_empty() => {
            print_online(&report);
            println!(
                "schema is up to date at version {}; nothing to do",
                report.to
            );
            Exit::Ok
        }
        Ok(report) => {
            print_online(&report);
            println!(
                "migrated the outbox schema from version {} to {} (applied {})",
                report.from,
                report.to,
                report
                    .applied
                    .iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Exit::Ok
        }
        Err(e) => migrate_failed(&e),
    }
}

async fn run_check(config: &Config) -> Exit {
    match &config.source {
        Some(path) => println!("config: ok ({})", path.display()),
        None => println!("config: ok (no file; built-in defaults and environment)"),
    }
    let client = match db::connect(&config.database).await {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    let version = match client.query_one("SHOW server_version", &[]).await {
        Ok(row) => row.get::<_, String>(0),
        Err(e) => return fail(&db::describe(&e)),
    };
    let encoding = match db::server_encoding(&client).await {
        Ok((name, db::Charset::Unicode)) => name,
        Ok((name, _)) => {
            format!("{name}: receivers' messages are stored with the characters it lacks escaped")
        }
        Err(e) => return fail(&db::describe(&e)),
    };
    let tls = match db::describe_tls(&config.database).await {
        Ok(tls) => tls,
        Err(e) => return fail(&format!("database TLS: {e}")),
    };
    println!(
        "database: ok ({}, PostgreSQL {version}, encoding {encoding}, {tls})",
        db::target(&config.database.pg)
    );
    if let Some(warning) = db::plaintext_warning(&config.database) {
        println!("database: warning: {warning}");
    }
    match migrate::status(&client).await {
        Ok(SchemaState::Current { version }) => {
            println!("schema: ok (version {version})");
            match migrate::leftover_indexes(&client).await {
                Ok(left) if !left.is_empty() => println!(
                    "schema: replaced indexes still there: {} (they slow writes to outbox.events; \
                     `outboxd migrate` drops them without blocking)",
                    left.join(", ")
                ),
                Ok(_) => {}
                Err(e) => return migrate_failed(&e),
            }
            check_smtp(config).await
        }
        Ok(state) => {
            eprintln!("outboxd: {}", state.problem().unwrap_or_default());
            Exit::Schema
        }
        Err(e) => migrate_failed(&e),
    }
}

async fn check_smtp(config: &Config) -> Exit {
    let Some(smtp) = &config.notify.smtp else {
        println!("smtp: not configured (smtp.host unset); error notifications stay queued");
        return Exit::Ok;
    };
    let target = format!("{}:{} ({:?})", smtp.host, smtp.port, smtp.tls);
    match crate::smtp::probe(smtp).await {
        Ok(()) => {
            println!("smtp: ok ({target})");
            Exit::Ok
        }
        Err(e) => fail(&format!("smtp at {target}: {e}")),
    }
}
