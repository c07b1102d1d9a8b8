//! The wake-up hint: a dedicated connection (outside the pool) that LISTENs
//! on `outbox_events`, which the enqueue functions NOTIFY at most once per
//! quarter second, whoever enqueues (migration 0009); the claim loop then
//! looks again every few milliseconds for a while (`pipeline::producer::FollowUp`).
//!
//! NOTIFY is only a hint. Polling is what guarantees progress: notifications
//! sent while this connection is down are lost, so every (re)connect wakes the
//! engine for a poll right away.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use postgres_native_tls::MakeTlsConnector;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::service::{Next, Service};
use crate::store::pool as db;

/// The channel the enqueue functions notify (at most once per quarter
/// second: migration 0009).
pub const CHANNEL: &str = "outbox_events";

/// Reconnect delays start here and double up to [`MAX_RECONNECT_DELAY`].
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// At most one connection attempt every 10 s during a long outage: cheap
/// for the server, and /readyz (which needs the listener) is back at most
/// this long after the database.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

/// A connected tick ends after this long without a notification, so the
/// service's heartbeat beats while nothing is enqueued.
const QUIET_TICK: Duration = Duration::from_secs(30);

/// TCP keepalive on the LISTEN connection: an idle listener on a dead network
/// path would otherwise wait hours (the kernel default) to notice.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Bound on the start-up exchange when no connect timeout is configured.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// The LISTEN connection as a service. Each tick either (re)connects, or
/// waits for the next notification (at most `QUIET_TICK`) and wakes the
/// engine with `wake.notify_one()`; every (re)connect wakes it too.
/// `connected` tells whether the listener is up right now.
pub struct Listener {
    pg: tokio_postgres::Config,
    /// None: no TLS (`database.tls = "disable"`).
    tls: Option<MakeTlsConnector>,
    wake: Arc<Notify>,
    connected: Arc<AtomicBool>,
    up: Option<Listening>,
    /// Wait before the next connection attempt after a failure.
    delay: Duration,
    /// A connection was tried before: the next one is a reconnect.
    tried: bool,
}

type Messages = Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

/// A connection that is LISTENing.
struct Listening {
    // Kept so the connection stays open; every message comes via `messages`.
    _client: tokio_postgres::Client,
    messages: Messages,
}

impl Listener {
    pub fn new(
        database: &crate::config::DatabaseConfig,
        wake: Arc<Notify>,
        connected: Arc<AtomicBool>,
    ) -> Listener {
        let mut pg = database.pg.clone();
        pg.keepalives(true).keepalives_idle(KEEPALIVE_IDLE);
        Listener {
            pg,
            tls: db::tls_connector(&database.tls),
            wake,
            connected,
            up: None,
            delay: FIRST_RECONNECT_DELAY,
            tried: false,
        }
    }

    /// connect_timeout bounds the TCP connect only; a server that accepts
    /// and then says nothing would hold the start-up exchange forever
    /// without this.
    fn connect_limit(&self) -> Duration {
        self.pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_LIMIT)
            * 2
    }

    /// The connection is gone (or never came): polling goes on, and the next
    /// attempt comes after the current delay, which doubles.
    fn lost(&mut self, reason: &str, was_listening: bool) -> Next {
        self.up = None;
        self.connected.store(false, Ordering::Relaxed);
        ::metrics::gauge!(crate::telemetry::LISTEN_CONNECTED).set(0.0);
        crate::telemetry::database_error("listen");
        if was_listening {
            // It worked for a while: a blip, not an outage.
            self.delay = FIRST_RECONNECT_DELAY;
        }
        let wait = self.delay;
        tracing::warn!(error = %reason, retry_in = ?wait, "LISTEN connection lost; polling continues meanwhile");
        self.delay = (self.delay * 2).min(MAX_RECONNECT_DELAY);
        Next::After(wait)
    }
}

impl Service for Listener {
    const NAME: &'static str = "listener";

    fn tick_limit(&self) -> Duration {
        self.connect_limit().max(QUIET_TICK) + Duration::from_secs(5)
    }

    /// A tick mostly waits for a notification; dropping it (and the
    /// connection with it) at once loses nothing.
    fn stop_grace(&self) -> Duration {
        Duration::ZERO
    }

    async fn tick(&mut self) -> Next {
        let Some(up) = &mut self.up else {
            let limit = self.connect_limit();
            let reconnect = std::mem::replace(&mut self.tried, true);
            return match tokio::time::timeout(limit, listen(&self.pg, &self.tls)).await {
                Ok(Ok(up)) => {
                    if reconnect {
                        ::metrics::counter!(crate::telemetry::LISTEN_RECONNECTS).increment(1);
                    }
                    self.up = Some(up);
                    self.delay = FIRST_RECONNECT_DELAY;
                    self.connected.store(true, Ordering::Relaxed);
                    ::metrics::gauge!(crate::telemetry::LISTEN_CONNECTED).set(1.0);
                    tracing::info!(channel = CHANNEL, "listening for NOTIFY");
                    // Whatever was notified while we were not listening: poll now.
                    self.wake.notify_one();
                    Next::Now
                }
                Ok(Err(reason)) => self.lost(&reason, false),
                Err(_) => self.lost(&format!("no answer within {limit:?}"), false),
            };
        };
        match tokio::time::timeout(QUIET_TICK, up.messages.next()).await {
            Err(_) => Next::Now,
            Ok(Some(Ok(AsyncMessage::Notification(_)))) => {
                self.wake.notify_one();
                Next::Now
            }
            Ok(Some(Ok(_))) => Next::Now,
            Ok(Some(Err(e))) => self.lost(&db::describe(&e), true),
            Ok(None) => self.lost("connection closed", true),
        }
    }
}

/// Connects and LISTENs; the caller bounds it in time.
async fn listen(
    pg: &tokio_postgres::Config,
    tls: &Option<MakeTlsConnector>,
) -> Result<Listening, String> {
    let describe = |e: tokio_postgres::Error| db::describe(&e);
    match tls {
        None => subscribe(pg.connect(NoTls).await.map_err(describe)?).await,
        Some(tls) => subscribe(pg.connect(tls.clone()).await.map_err(describe)?).await,
    }
}

/// LISTENs on a new connection.
async fn subscribe<S, T>(
    (client, mut connection): (tokio_postgres::Client, tokio_postgres::Connection<S, T>),
) -> Result<Listening, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut messages: Messages = Box::pin(futures_util::stream::poll_fn(move |cx| {
        connection.poll_message(cx)
    }));
    // The LISTEN's reply arrives through the same connection future, so it
    // must be driven while we wait for it.
    let statement = format!("LISTEN {CHANNEL}");
    {
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
                    None => return Err("connection closed".to_string()),
                },
            }
        }
    }
    Ok(Listening {
        _client: client,
        messages,
    })
}
