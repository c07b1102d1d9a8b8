//! The one place that speaks SQL to `outbox.*`: connections and pools
//! ([`pool`]) and what a failed statement means ([`error`]), what the
//! server is ([`server`]), the schema's migrations
//! ([`migrations`]) and their runner ([`migrate`]), and one file per
//! group of statements, each loading its text from `sql/queries/`: the
//! claim ([`claim`]), marking outcomes and moving circuits ([`record`]),
//! the periodic upkeep ([`upkeep`]), the explicit transaction the claim
//! and the marks commit in ([`txn`]), the notification emails ([`mail`]),
//! and what the operator's commands read and change ([`endpoints`],
//! [`events`]). The daemon and the CLI both go through it.

pub mod claim;
pub mod endpoints;
pub mod error;
pub mod events;
pub mod mail;
pub mod migrate;
pub mod migrations;
pub mod pool;
pub mod record;
pub mod server;
pub mod txn;
pub mod upkeep;
