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

/// Bound on the start-up exchange when no connect timeout is configured.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

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
    let mut reconnect = false;
    while !shutdown.is_cancelled() {
        let result = listen_once(&pg, &wake, &connected, &shutdown, reconnect).await;
        reconnect = true;
        match result {
            Ok(()) => return, // shut down
            Err(lost) => {
                connected.store(false, Ordering::Relaxed);
                ::metrics::gauge!(crate::telemetry::LISTEN_CONNECTED).set(0.0);
                crate::telemetry::database_error("listen");
                if lost.was_listening {
                    // It worked for a while: a blip, not an outage.
                    delay = FIRST_RECONNECT_DELAY;
                }
                tracing::warn!(error = %lost.reason, retry_in = ?delay, "LISTEN connection lost; polling continues meanwhile");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

/// Why a connection ended, and whether it had got as far as listening.
struct Lost {
    reason: String,
    was_listening: bool,
}

impl From<String> for Lost {
    fn from(reason: String) -> Lost {
        Lost {
            reason,
            was_listening: false,
        }
    }
}

/// One connection's life. Ok on shutdown, Err with the reason it ended.
async fn listen_once(
    pg: &tokio_postgres::Config,
    wake: &Notify,
    connected: &AtomicBool,
    shutdown: &CancellationToken,
    reconnect: bool,
) -> Result<(), Lost> {
    // connect_timeout bounds the TCP connect only; a server that accepts
    // and then says nothing would hold the start-up exchange (and shutdown)
    // forever without this.
    let limit = pg.get_connect_timeout().copied().unwrap_or(CONNECT_LIMIT) * 2;
    let (client, mut connection) = tokio::select! {
        connected = tokio::time::timeout(limit, pg.connect(NoTls)) => match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(db::describe(&e).into()),
            Err(_) => return Err(format!("no answer within {limit:?}").into()),
        },
        _ = shutdown.cancelled() => return Ok(()),
    };
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
                Some(Err(e)) => return Err(db::describe(&e).into()),
                None => return Err("connection closed".to_string().into()),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    if reconnect {
        ::metrics::counter!(crate::telemetry::LISTEN_RECONNECTS).increment(1);
    }
    connected.store(true, Ordering::Relaxed);
    ::metrics::gauge!(crate::telemetry::LISTEN_CONNECTED).set(1.0);
    tracing::info!(channel = CHANNEL, "listening for NOTIFY");
    // Whatever was notified while we were not listening: poll now.
    wake.notify_one();
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Lost { reason: db::describe(&e), was_listening: true }),
                None => return Err(Lost { reason: "connection closed".into(), was_listening: true }),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
