//! The command line: what each subcommand is, and where it is done.
//!
//! Output meant for the operator goes to stdout; logs and errors go to
//! stderr. Exit codes are part of the interface (scripts and systemd's
//! `ExecStartPre=` branch on them), see [`Exit`].
//!
//! This file only hands each parsed subcommand to its file in `src/cli/`
//! ([`run`]) and re-exports what the binary and the tests name:
//!
//! - `args.rs`: the command line as clap parses it ([`Cli`], [`Command`]),
//!   doc comments included: `--help`, man pages and completions come from
//!   it. The operator subcommands' own flags live in their files.
//! - `daemon.rs`: `outboxd run`, with its signals (SIGTERM and SIGINT stop,
//!   SIGHUP re-reads the log level).
//! - `schema.rs`: `outboxd migrate` and `outboxd check`.
//! - The operator's subcommands, one role per file, each with its flags:
//!   `endpoint.rs` (`set`'s checks in `settings.rs`, `endpoint test` in
//!   `probe.rs`, signing secrets in `secret.rs`), `events.rs` (`events
//!   retry` in `replay.rs`), `status.rs` and `enqueue.rs`; what they share
//!   (the connection, `--json`) is in `shared.rs`. [`rules`] checks input
//!   the way the schema would; `table.rs` lays out columns.
//! - `generate.rs`: completions and man pages, needing neither config nor
//!   database ([`run_without_config`]).
//! - `exit.rs`: the exit codes ([`Exit`]) and [`CliError`]; it imports no
//!   other file of `src/cli/`, so every file here can use it.

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
mod schema;
mod secret;
mod settings;
mod shared;
mod status;
mod table;

use std::path::PathBuf;

use crate::config::Config;
use crate::logging::LogHandle;

pub use args::{Cli, Command};
pub use exit::{CliError, Exit};
pub use generate::run_without_config;

use exit::report;

/// Runs a parsed subcommand with a loaded configuration. `config_path` is
/// the `--config` given, for re-reading on SIGHUP.
pub async fn run(
    command: Command,
    config: Config,
    config_path: Option<PathBuf>,
    log: LogHandle,
) -> Exit {
    let result = match command {
        Command::Migrate => return schema::run_migrate(&config).await,
        Command::Check => return schema::run_check(&config).await,
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
