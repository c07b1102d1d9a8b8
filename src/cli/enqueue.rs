//! `outboxd enqueue …`: writes an event the way the sales application does,
//! through the same SQL function (`outbox.enqueue_payment_cancellation`), so
//! support can re-create a webhook by hand and an integrator can try their
//! receiver against a real daemon. The function's own checks stay the last
//! word; a value it refuses exits 2 with its message.

use clap::{Args, Subcommand};

use super::exit::CliError;
use super::rules;
use super::shared::connect_current;
use crate::config::Config;
use crate::store::events;

#[derive(Debug, Subcommand)]
pub enum EnqueueCommand {
    /// Enqueue a Payment Cancellation webhook
    ///
    /// Calls outbox.enqueue_payment_cancellation(company, payment, number,
    /// orders) in a transaction of its own and prints the new event id.
    /// Without --orders the body has no orderIds.
    ///
    /// Example:
    ///
    ///   $ outboxd enqueue payment-cancellation --company 6316 --payment 222125 --number 2271 --orders 17899,17900
    PaymentCancellation(PaymentCancellationArgs),
}

#[derive(Debug, Args)]
pub struct PaymentCancellationArgs {
    /// The company's id (companyId)
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
    company: i64,

    /// The cancelled payment's id (paymentId)
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
    payment: i64,

    /// The payment number as users know it (paymentNumber)
    #[arg(long, value_name = "TEXT")]
    number: String,

    /// Order ids the payment was applied to, comma-separated (orderIds)
    #[arg(long, value_name = "IDS", value_parser = rules::order_ids)]
    // Spelled out: clap reads a bare `Vec` as "the flag may repeat".
    orders: Option<::std::vec::Vec<i64>>,
}

pub async fn run(command: EnqueueCommand, config: &Config) -> Result<(), CliError> {
    let EnqueueCommand::PaymentCancellation(args) = command;
    let client = connect_current(config).await?;
    let id = events::enqueue_payment_cancellation(
        &client,
        args.company,
        args.payment,
        &args.number,
        args.orders.as_deref(),
    )
    .await
    .map_err(|e| CliError::database("enqueueing the event", &e))?;
    println!("{id}");
    Ok(())
}
