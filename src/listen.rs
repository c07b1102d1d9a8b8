//! The wake-up hint: a dedicated connection (outside the pool) that LISTENs
//! on `outbox_events`, which the enqueue trigger NOTIFYs once per inserting
//! transaction.
//!
//! NOTIFY is only a hint. Polling is what guarantees progress: notifications
//! sent while this connection is down are lost, so every (re)connect wakes the
//! engine for a poll right away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::db;

/// The channel the `events_notify` trigger notifies.
pub const CHANNEL: &str = "outbox_events";

/// Reconnect delays start here and double up to [`MAX_RECONNECT_DELAY`].
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(500);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);

/// TCP keepalive on the LISTEN connection: an idle listener on a dead network
/// path would otherwise wait hours (the kernel default) to notice.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Keeps a LISTEN connection up until `shutdown`; calls `wake.notify_one()`
/// for each notification and after each (re)connect. `connected` tells
/// whether the listener is up right now.
pub async fn run(
    mut pg: tokio_postgres::Config,
    wake: Arc<Notify>,
    connected: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    pg.keepalives(true).keepalives_idle(KEEPALIVE_IDLE);
    let mut delay = FIRST_RECONNECT_DELAY;
    while !shutdown.is_cancelled() {
        match listen_once(&pg, &wake, &connected, &shutdown).await {
            Ok(()) => return, // shut down
            Err(reason) => {
                connected.store(false, Ordering::Relaxed);
                tracing::warn!(error = %reason, retry_in = ?delay, "LISTEN connection lost; polling continues meanwhile");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

/// One connection's life. Ok on shutdown, Err with the reason it ended.
async fn listen_once(
    pg: &tokio_postgres::Config,
    wake: &Notify,
    connected: &AtomicBool,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let (client, mut connection) = pg.connect(NoTls).await.map_err(|e| db::describe(&e))?;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    // The LISTEN's reply arrives through the same connection future, so it
    // must be driven while we wait for it.
    let statement = format!("LISTEN {CHANNEL}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    loop {
        tokio::select! {
            result = &mut listen => {
                result.map_err(|e| db::describe(&e))?;
                break;
            }
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(db::describe(&e)),
                None => return Err("connection closed".into()),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    connected.store(true, Ordering::Relaxed);
    tracing::info!(channel = CHANNEL, "listening for NOTIFY");
    // Whatever was notified while we were not listening: poll now.
    wake.notify_one();
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(db::describe(&e)),
                None => return Err("connection closed".into()),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
