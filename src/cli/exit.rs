//! How a subcommand ends: the process exit codes ([`Exit`]), the operator
//! subcommands' errors ([`CliError`]) and the one place each is printed.
//! Imports nothing else of `src/cli/`, so every subcommand can use it.

use std::process::ExitCode;

use crate::store::migrate::MigrateError;
use crate::store::pool as db;

/// Process exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// Something failed at run time: database unreachable, a statement failed.
    Failure = 1,
    /// The command line or the configuration is invalid (clap uses 2 too).
    Usage = 2,
    /// The database schema does not match this binary.
    Schema = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// Why an operator subcommand stopped early. Each variant maps to one exit
/// code; its text (one problem per line) goes to stderr.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The input is invalid (flags, or values the database refused): exit 2,
    /// nothing changed.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    /// Something failed at run time: exit 1.
    #[error("{0}")]
    Failed(String),
    /// The schema is missing, older or newer than this binary: exit 3.
    #[error("{0}")]
    Schema(String),
}

impl CliError {
    pub fn invalid(problem: impl Into<String>) -> CliError {
        CliError::Invalid(vec![problem.into()])
    }

    /// A failed statement, `step` naming what was being done. A value the
    /// database refused through a check (a constraint, a trigger, an enqueue
    /// function's argument check) is the operator's input, hence `Invalid`:
    /// its message names the problem.
    pub fn database(step: &str, e: &tokio_postgres::Error) -> CliError {
        use tokio_postgres::error::SqlState;
        let refused = e.code().is_some_and(|code| {
            [
                SqlState::CHECK_VIOLATION,
                SqlState::NOT_NULL_VIOLATION,
                SqlState::INVALID_PARAMETER_VALUE,
            ]
            .contains(code)
        });
        if refused {
            CliError::invalid(format!("the database refused it: {}", db::describe(e)))
        } else {
            CliError::Failed(format!("{step}: {}", db::describe(e)))
        }
    }
}

/// Prints an operator subcommand's error, every line prefixed with
/// `outboxd: `, and picks the exit code.
pub(super) fn report(result: Result<(), CliError>) -> Exit {
    let Err(e) = result else {
        return Exit::Ok;
    };
    for line in e.to_string().lines() {
        eprintln!("outboxd: {line}");
    }
    match e {
        CliError::Invalid(_) => Exit::Usage,
        CliError::Failed(_) => Exit::Failure,
        CliError::Schema(_) => Exit::Schema,
    }
}

pub(super) fn migrate_failed(e: &MigrateError) -> Exit {
    eprintln!("outboxd: {e}");
    match e {
        MigrateError::Database { .. } => Exit::Failure,
        MigrateError::NewerThanBinary { .. } | MigrateError::Modified { .. } => Exit::Schema,
    }
}

pub(super) fn fail(e: &dyn std::fmt::Display) -> Exit {
    eprintln!("outboxd: {e}");
    Exit::Failure
}
