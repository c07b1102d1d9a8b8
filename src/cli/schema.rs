//! The schema subcommands: `outboxd migrate` creates or upgrades the outbox
//! schema ([`crate::store::migrate`] does the work), `outboxd check` reports on the
//! configuration, the database, the schema and SMTP. Both print for the
//! operator and end with an exit code.

use super::exit::{Exit, fail, migrate_failed};
use crate::config::Config;
use crate::store::migrate::{self, SchemaState};
use crate::store::pool as db;
use crate::store::server;

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

/// The database every PostgreSQL server has for tools to connect to, and
/// where a schema is forgotten: the outbox belongs in the sales
/// application's database.
const MAINTENANCE_DATABASE: &str = "postgres";

/// Said after a `migrate` that created the schema in the maintenance
/// database. A warning, not a refusal: some hosted PostgreSQL services
/// (Supabase among them) name the application's database `postgres`.
fn maintenance_warning() -> String {
    format!(
        "outboxd: warning: the outbox schema was created in the `{MAINTENANCE_DATABASE}` \
         maintenance database (database.url). It belongs in the sales application's \
         database, which the enqueue runs in; if that is not this one, set database.url \
         (or OUTBOXD_DATABASE__URL) and remove it here: DROP SCHEMA outbox CASCADE"
    )
}

/// `outboxd migrate`: applies the migrations the database lacks.
pub(super) async fn run_migrate(config: &Config) -> Exit {
    let mut client = match db::connect(&config.database).await {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    let database = match server::database_name(&client).await {
        Ok(name) => name,
        Err(e) => return fail(&db::describe(&e)),
    };
    let migrated = migrate::migrate(&mut client).await;
    if matches!(&migrated, Ok(report) if report.from == 0 && !report.applied.is_empty())
        && database == MAINTENANCE_DATABASE
    {
        eprintln!("{}", maintenance_warning());
    }
    match migrated {
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

/// `outboxd check`: the configuration, the database, the schema and SMTP,
/// changing nothing.
pub(super) async fn run_check(config: &Config) -> Exit {
    match &config.source {
        Some(path) => println!("config: ok ({})", path.display()),
        None => println!("config: ok (no file; built-in defaults and environment)"),
    }
    let client = match db::connect(&config.database).await {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    let version = match server::server_version(&client).await {
        Ok(version) => version,
        Err(e) => return fail(&db::describe(&e)),
    };
    let encoding = match server::server_encoding(&client).await {
        Ok((name, server::Charset::Unicode)) => name,
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
    match crate::notify::smtp::probe(smtp).await {
        Ok(()) => {
            println!("smtp: ok ({target})");
            Exit::Ok
        }
        Err(e) => fail(&format!("smtp at {target}: {e}")),
    }
}
