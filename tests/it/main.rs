//! Integration tests: one binary, a module per area. Every test gets a fresh
//! PostgreSQL database (see `harness`), so they run in parallel.
//!
//! Needs a PostgreSQL server at DATABASE_URL (default
//! postgres://postgres@127.0.0.1:5432/postgres) with rights to create
//! databases; `scripts/test` provides one when none answers.

mod bad_receiver;
mod claim_plan;
mod cli;
mod delivery;
mod destinations;
mod election;
mod failover;
mod faults;
mod harness;
mod liveness;
mod mailer;
mod maintenance;
mod notify;
mod ops;
mod ops_cli;
mod pg_tls;
mod private_pg;
mod prometheus;
mod proxy;
mod receiver;
mod record;
mod sd_notify;
mod signing;
mod smtp;
mod sql_contract;
mod stuck;
mod tenants;
mod upgrade;
mod wakeup;
