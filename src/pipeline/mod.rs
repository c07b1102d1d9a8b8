//! The delivery pipeline, one direction: the [`producer`] claims due events
//! while it has free slots and room under each endpoint's cap, and starts
//! one [`executor`] task per event; the executor makes the attempt and
//! hands its outcome to the [`completer`], which writes outcomes in groups
//! and tells the producer, through [`completer::Freed`], that the
//! endpoints' places are free again. Both report what they get done to
//! [`crate::progress`], and ask the [`schema_watch`] to look at the schema
//! when the database refuses their statements for what it has become.

pub mod completer;
pub mod executor;
pub mod producer;
pub mod schema_watch;
