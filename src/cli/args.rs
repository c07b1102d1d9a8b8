//! The command line as clap parses it: every subcommand, flag and doc
//! comment. `--help`, the man pages and the completions are generated from
//! these, so their text is the interface. The operator subcommands' own
//! flags live beside their code (`endpoint.rs`, `events.rs`, …).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::{endpoint, enqueue, events, status};

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
    /// Creates the schema in the database of database.url, owned by its
    /// role (not a superuser: the enqueue functions run as their owner);
    /// warns when that is the `postgres` maintenance database.
    ///
    /// Example:
    ///
    ///   $ OUTBOXD_DATABASE__URL=postgres://outboxd@127.0.0.1/sales outboxd migrate
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
    /// 0 within a bounded time (29 s with the defaults); anything unfinished
    /// goes back to the queue, delivered again at the next claim. A database that is down,
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
