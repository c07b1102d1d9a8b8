//! The command line: what each subcommand is, and what it does.
//!
//! Output meant for the operator goes to stdout; logs and errors go to
//! stderr. Exit codes are part of the interface (scripts and systemd's
//! `ExecStartPre=` branch on them), see [`Exit`].
//!
//! `args.rs` is the command line as clap parses it ([`Cli`], [`Command`]),
//! doc comments included: `--help`, man pages and completions come from it.
//! `daemon.rs` runs `outboxd run`, with its signals. The other daemon
//! subcommands (`migrate`, `check`) are implemented here. The operator's
//! live one role per file in `src/cli/`, each with its flags: `endpoint.rs`
//! (`set`'s checks in `settings.rs`, `endpoint test` in `probe.rs`),
//! `events.rs` (`events retry` in `replay.rs`), `status.rs` and
//! `enqueue.rs`; what they share (the connection, `--json`) is in
//! `shared.rs`. [`rules`] checks input the way the schema would; `table.rs`
//! lays out columns; `generate.rs` prints completions and man pages,
//! needing neither config nor database. `exit.rs` holds the exit codes and
//! [`CliError`], and imports no other file of `src/cli/`.

mod args;
mod daemon;
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

use crate::config::Config;
use crate::db;
use crate::logging::LogHandle;
use crate::migrate::{self, SchemaState};

pub use args::{Cli, Command};
pub use exit::{CliError, Exit};
pub use generate::run_without_config;
// The subcommand files take these as `super::…`.
use exit::{fail, migrate_failed, report};
use shared::{connect_current, print_json};

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
        Command::Run => return daemon::run(config, config_path, log).await,
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
