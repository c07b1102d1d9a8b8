//! Which instance does the maintenance: one at a time, elected through a
//! session advisory lock that each instance tries on a dedicated connection
//! of its own ([`Election`]); the periodic jobs of [`crate::maintenance`]
//! (lease expiry, the hold limit, retention, the signing watch, the queue
//! gauges) run only while [`Role::leading`]. What concerns an instance's own
//! work (its claims, its leases handed back at a stop, its mailer, its
//! LISTEN connection, its pool and in-flight metrics) runs on every
//! instance as before.
//!
//! # Why a session advisory lock, and why candidates listen instead of asking
//!
//! A lease row would be written at every renewal (WAL, a dead tuple, a
//! transaction each time) and handed over only when its lease runs out. A
//! session advisory lock costs nothing while it is held, lives exactly as
//! long as the leader's session, and is released by the server the moment
//! that backend ends: at once when the leader's process dies (SIGKILL, a
//! crash: the kernel closes its socket and the idle backend reads the end
//! of it), and within [`SERVER_KEEPALIVE`]'s ~11 s when its host vanishes
//! (the session sets the server's TCP keepalives for itself).
//!
//! The other instances must then notice. Waiting in `pg_advisory_lock()`
//! would be instant and free of round trips, but a waiting statement holds
//! a snapshot, and with it the xmin horizon: vacuum could not clean the
//! queue for as long as a standby instance waits, days. Asking with
//! `pg_try_advisory_lock()` every few seconds would cost each standby a
//! transaction every few seconds, more than the maintenance itself (about
//! one transaction every 4 s), so that 3 instances would again cost the
//! database several times what one does. So the leader sends a heartbeat,
//! `NOTIFY outboxd_maintenance` every [`HEARTBEAT`] on its lock's
//! connection (which also proves to the leader that its session, and its
//! lock, are still there), and the standbys LISTEN on their own connection,
//! which costs the database nothing while idle. A standby asks for the lock
//! only when the heartbeats stop for [`SILENCE`], when the leader says it
//! is stopping (`released`), and when its own connection is new. The
//! heartbeats cost one transaction per [`HEARTBEAT`] whatever the number of
//! instances, a lone instance included.
//!
//! Around a partition two instances may briefly both believe they lead (an
//! old leader that cannot reach the database yet has not noticed); every
//! job is written to run side by side (SKIP LOCKED, row locks), as all of
//! them did on every instance before.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use metrics::gauge;
use postgres_native_tls::MakeTlsConnector;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use crate::service::{Next, Service};
use crate::store::pool as db;
use crate::telemetry::MAINTENANCE_LEADER;

/// The channel of the leader's heartbeats and of its goodbye.
pub const CHANNEL: &str = "outboxd_maintenance";

/// Key of the maintenance lock: the bytes of "ob-maint" read as a
/// big-endian integer (the migration's and the mailer's keys are others).
pub const LOCK_KEY: i64 = 0x6f62_2d6d_6169_6e74;

/// The leader's heartbeat period.
pub const HEARTBEAT: Duration = Duration::from_secs(3);

/// A standby asks for the lock after hearing no heartbeat for this long:
/// two heartbeats missed, and a margin for a loaded machine. A leader whose
/// process died is so replaced within this long of its last heartbeat.
pub const SILENCE: Duration = Duration::from_secs(8);

/// The server's TCP keepalives on the election's session (idle, interval,
/// count): a leader whose host vanished without closing its connection is
/// dropped by the server, and its lock released, after about 5 + 3 x 2 =
/// 11 s. Ignored on a Unix socket, where the question does not arise.
const SERVER_KEEPALIVE: &str = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
                                SET tcp_keepalives_count = 3";

/// The same on our side, so that a leader cut off from the database notices
/// that its session, and so its role, is gone.
const CLIENT_KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const CLIENT_KEEPALIVE_RETRIES: u32 = 3;

/// Bound on every statement of the election's session.
const STATEMENT_LIMIT: Duration = Duration::from_secs(5);

/// Reconnect delays start here and double up to [`MAX_RECONNECT_DELAY`].
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(500);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

/// Bound on the start-up exchange when no connect timeout is configured.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Whether this instance does the maintenance now. Shared by the election,
/// the jobs that ask it, and the admin server (the queue gauges are
/// exported by the leader only).
#[derive(Clone)]
pub struct Role(Arc<RoleState>);

struct RoleState {
    leading: AtomicBool,
    /// How many times this instance took the role (0: never).
    term: AtomicU64,
    /// The term in which the queue gauges were last refreshed.
    refreshed: AtomicU64,
}

impl Role {
    /// An instance that does not lead until the election says so.
    pub fn standby() -> Role {
        Role(Arc::new(RoleState {
            leading: AtomicBool::new(false),
            term: AtomicU64::new(0),
            refreshed: AtomicU64::new(0),
        }))
    }

    /// Always leading: for a job run on its own (tests, one-off commands).
    pub fn always() -> Role {
        let role = Role::standby();
        role.take();
        role
    }

    pub fn leading(&self) -> bool {
        self.0.leading.load(Ordering::Acquire)
    }

    fn take(&self) {
        self.0.term.fetch_add(1, Ordering::AcqRel);
        self.0.leading.store(true, Ordering::Release);
    }

    fn give_up(&self) {
        self.0.leading.store(false, Ordering::Release);
    }

    /// The queue gauges were just refreshed (by the leader).
    pub fn gauges_refreshed(&self) {
        let term = self.0.term.load(Ordering::Acquire);
        self.0.refreshed.store(term, Ordering::Release);
    }

    /// Whether `/metrics` shows the queue gauges: only while leading, and
    /// once they were refreshed in this term (not values left from an
    /// earlier one).
    pub fn exports_queue_gauges(&self) -> bool {
        self.leading()
            && self.0.refreshed.load(Ordering::Acquire) == self.0.term.load(Ordering::Acquire)
    }
}

type Messages = Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

/// The election's connection: LISTENing on [`CHANNEL`] while standing by.
struct Session {
    client: tokio_postgres::Client,
    messages: Messages,
}

/// What a wait on the session ended with.
enum Heard {
    /// A heartbeat (or our own notification).
    Alive,
    /// The leader said it is stopping.
    Released,
    /// Nothing within the wait.
    Nothing,
    /// This instance is stopping.
    Stop,
}

/// The election as a service: each tick connects, or (leading) waits a
/// heartbeat's period and sends one, or (standing by) waits for the
/// leader's heartbeats and asks for the lock when they stop.
pub struct Election {
    pg: tokio_postgres::Config,
    tls: Option<MakeTlsConnector>,
    role: Role,
    /// Cancelled when the instance starts stopping: a leader hands the role
    /// over then, with a goodbye, rather than when its process ends.
    release: CancellationToken,
    session: Option<Session>,
    delay: Duration,
    /// Standing by: when the last heartbeat (or the connection) came.
    heard_at: Instant,
}

impl Election {
    pub fn new(
        database: &crate::config::DatabaseConfig,
        role: Role,
        release: CancellationToken,
    ) -> Election {
        let mut pg = database.pg.clone();
        pg.keepalives(true)
            .keepalives_idle(CLIENT_KEEPALIVE_IDLE)
            .keepalives_interval(CLIENT_KEEPALIVE_INTERVAL)
            .keepalives_retries(CLIENT_KEEPALIVE_RETRIES);
        gauge!(MAINTENANCE_LEADER).set(0.0);
        Election {
            pg,
            tls: db::tls_connector(&database.tls),
            role,
            release,
            session: None,
            delay: FIRST_RECONNECT_DELAY,
            heard_at: Instant::now(),
        }
    }

    fn connect_limit(&self) -> Duration {
        self.pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_LIMIT)
            * 2
    }

    fn lead(&mut self) {
        self.role.take();
        gauge!(MAINTENANCE_LEADER).set(1.0);
        tracing::info!(
            "this instance does the maintenance now (lease expiry, hold limit, retention, signing watch, queue gauges)"
        );
    }

    /// The session is gone (or never came): whatever this instance held
    /// went with it.
    fn lost(&mut self, reason: &str) -> Next {
        let was_leading = self.role.leading();
        self.session = None;
        self.role.give_up();
        gauge!(MAINTENANCE_LEADER).set(0.0);
        crate::telemetry::database_error("maintenance");
        let wait = self.delay;
        self.delay = (self.delay * 2).min(MAX_RECONNECT_DELAY);
        if was_leading {
            tracing::warn!(error = %reason, retry_in = ?wait, "lost the maintenance connection: this instance no longer does the maintenance");
        } else {
            tracing::warn!(error = %reason, retry_in = ?wait, "maintenance election: no connection");
        }
        Next::After(wait)
    }

    /// Hands the role over on a stop: unlock and say so, within 1 s; the
    /// session's end would release the lock anyway, the goodbye saves the
    /// others their wait for [`SILENCE`].
    async fn step_down(&mut self) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        if self.role.leading() {
            self.role.give_up();
            gauge!(MAINTENANCE_LEADER).set(0.0);
            let goodbye = format!(
                "SELECT pg_advisory_unlock({LOCK_KEY}); SELECT pg_notify('{CHANNEL}', 'released')"
            );
            let sent = tokio::time::timeout(
                Duration::from_secs(1),
                on(
                    &mut session,
                    |c| async move { c.simple_query(&goodbye).await },
                ),
            )
            .await;
            match sent {
                Ok(Ok(_)) => {
                    tracing::info!("stopping: handed the maintenance over to the other instances")
                }
                _ => tracing::info!(
                    "stopping: the maintenance goes to another instance when this connection closes"
                ),
            }
        }
    }

    /// Asks for the lock; true if this instance has it now.
    async fn try_lock(session: &mut Session) -> Result<bool, String> {
        let sql = format!("SELECT pg_try_advisory_lock({LOCK_KEY})");
        let rows = bounded(on(session, |c| async move { c.simple_query(&sql).await })).await?;
        Ok(got_lock(&rows))
    }
}

impl Election {
    /// Ends the sessions holding the lock (an instance's own role may end
    /// its own role's sessions); their pids.
    async fn end_silent_leader(session: &mut Session) -> Result<Vec<String>, String> {
        // Materialized: every filter applies before the first termination.
        let sql = format!(
            "WITH holder AS MATERIALIZED (
                 SELECT l.pid FROM pg_locks AS l
                  WHERE l.locktype = 'advisory' AND l.granted
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND l.classid = {} AND l.objid = {} AND l.objsubid = 1
                    AND l.pid <> pg_backend_pid()
                    -- Silent for as long as we heard nothing: not a leader
                    -- elected a moment ago, whose first heartbeat is to come.
                    AND EXISTS (SELECT 1 FROM pg_stat_activity AS a
                                 WHERE a.pid = l.pid AND a.state = 'idle'
                                   AND a.state_change < now() - interval '{} milliseconds'))
             SELECT pid FROM holder WHERE pg_terminate_backend(pid)",
            LOCK_KEY >> 32,
            LOCK_KEY & 0xffff_ffff,
            SILENCE.as_millis()
        );
        let rows = bounded(on(session, |c| async move { c.simple_query(&sql).await })).await?;
        Ok(rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .collect())
    }
}

/// The `t` of the last row of a simple query whose last statement asked
/// for the lock.
fn got_lock(messages: &[SimpleQueryMessage]) -> bool {
    messages
        .iter()
        .rev()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0) == Some("t")),
            _ => None,
        })
        .unwrap_or(false)
}

impl Service for Election {
    const NAME: &'static str = "maintenance election";

    fn tick_limit(&self) -> Duration {
        self.connect_limit().max(SILENCE) + STATEMENT_LIMIT + Duration::from_secs(5)
    }

    async fn tick(&mut self) -> Next {
        if self.release.is_cancelled() {
            self.step_down().await;
            return Next::After(Duration::from_secs(3600));
        }
        let Some(session) = &mut self.session else {
            let limit = self.connect_limit();
            return match tokio::time::timeout(limit, open(&self.pg, &self.tls)).await {
                Ok(Ok((session, locked))) => {
                    self.session = Some(session);
                    self.delay = FIRST_RECONNECT_DELAY;
                    self.heard_at = Instant::now();
                    if locked {
                        self.lead();
                    } else {
                        tracing::info!("another instance does the maintenance; this one stands by");
                    }
                    Next::Now
                }
                Ok(Err(reason)) => self.lost(&reason),
                Err(_) => self.lost(&format!("no answer within {limit:?}")),
            };
        };
        if self.role.leading() {
            match listen_until(session, Instant::now() + HEARTBEAT, &self.release).await {
                Err(reason) => return self.lost(&reason),
                Ok(Heard::Stop) => {
                    // Within this tick: the stop gives it a grace to end.
                    self.step_down().await;
                    return Next::After(Duration::from_secs(3600));
                }
                Ok(_) => {}
            }
            // A listener is woken, in a transaction of its own, by every
            // notification in the database: the leader, which needs none,
            // stops listening (in the heartbeat's transaction; a no-op after
            // the first).
            let beat = format!("UNLISTEN {CHANNEL}; NOTIFY {CHANNEL}, 'alive'");
            return match bounded(on(session, |c| async move { c.batch_execute(&beat).await })).await
            {
                Ok(()) => Next::Now,
                Err(reason) => self.lost(&reason),
            };
        }
        let until = self.heard_at + SILENCE;
        let heard = match listen_until(session, until, &self.release).await {
            Ok(heard) => heard,
            Err(reason) => return self.lost(&reason),
        };
        match heard {
            Heard::Alive => {
                self.heard_at = Instant::now();
                return Next::Now;
            }
            Heard::Stop => {
                self.session = None;
                return Next::After(Duration::from_secs(3600));
            }
            Heard::Released => {
                tracing::info!("the instance doing the maintenance is stopping; asking for it")
            }
            Heard::Nothing => tracing::info!(
                silence = ?SILENCE,
                "no heartbeat from the instance doing the maintenance; asking for it"
            ),
        }
        match Election::try_lock(session).await {
            Ok(true) => self.lead(),
            Ok(false) if matches!(heard, Heard::Nothing) => {
                // Held, and silent: a leader that is stopped (SIGSTOP, a
                // frozen VM) or stalled keeps its session, and its lock,
                // while it does nothing; its expired leases would wait for
                // ever. Its session is ended, and the lock asked for again.
                match Election::end_silent_leader(session).await {
                    Ok(ended) => {
                        if !ended.is_empty() {
                            tracing::warn!(
                                silence = ?SILENCE,
                                sessions = ?ended,
                                "the instance doing the maintenance holds it without a heartbeat (stopped? frozen?); ended its session to take over"
                            );
                        }
                        // Ask again in a moment: the session ends at once.
                        self.heard_at = Instant::now() - SILENCE + Duration::from_millis(500);
                    }
                    Err(reason) => {
                        tracing::warn!(error = %reason, "could not end the silent maintenance session; waiting for it");
                        self.heard_at = Instant::now();
                    }
                }
            }
            Ok(false) => self.heard_at = Instant::now(),
            Err(reason) => return self.lost(&reason),
        }
        Next::Now
    }
}

/// Connects, bounds the session's statements, sets the server's
/// keepalives, LISTENs and asks for the lock, in one transaction.
async fn open(
    pg: &tokio_postgres::Config,
    tls: &Option<MakeTlsConnector>,
) -> Result<(Session, bool), String> {
    let describe = |e: tokio_postgres::Error| db::describe(&e);
    let mut session = match tls {
        None => session(pg.connect(NoTls).await.map_err(describe)?),
        Some(tls) => session(pg.connect(tls.clone()).await.map_err(describe)?),
    };
    let setup = format!(
        "SET statement_timeout = '{}ms'; {SERVER_KEEPALIVE}; LISTEN {CHANNEL}; \
         SELECT pg_try_advisory_lock({LOCK_KEY})",
        STATEMENT_LIMIT.as_millis()
    );
    let rows = bounded(on(
        &mut session,
        |c| async move { c.simple_query(&setup).await },
    ))
    .await?;
    let locked = got_lock(&rows);
    Ok((session, locked))
}

fn session<S, T>(
    (client, mut connection): (tokio_postgres::Client, tokio_postgres::Connection<S, T>),
) -> Session
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let messages: Messages = Box::pin(futures_util::stream::poll_fn(move |cx| {
        connection.poll_message(cx)
    }));
    Session { client, messages }
}

/// Bounds a statement of the session (the server's statement_timeout does
/// too, but a server that stopped answering says nothing).
async fn bounded<T>(
    statement: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(STATEMENT_LIMIT + Duration::from_secs(1), statement)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {STATEMENT_LIMIT:?}")))
}

/// Runs `statement` on the session's client while driving its connection
/// (the answer arrives through the same message stream); notifications that
/// arrive meanwhile are dropped (the caller is about to decide anyway).
async fn on<'a, T, F, Fut>(session: &'a mut Session, statement: F) -> Result<T, String>
where
    F: FnOnce(&'a tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>> + 'a,
{
    let answer = statement(&session.client);
    tokio::pin!(answer);
    loop {
        tokio::select! {
            result = &mut answer => return result.map_err(|e| db::describe(&e)),
            message = session.messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(db::describe(&e)),
                None => return Err("connection closed".to_string()),
            },
        }
    }
}

/// Waits until `until` for a notification on [`CHANNEL`] (or the stop);
/// an error when the connection ends. (The leader, which no longer
/// listens, waits here for its session's end or the stop.)
async fn listen_until(
    session: &mut Session,
    until: Instant,
    stop: &CancellationToken,
) -> Result<Heard, String> {
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(Heard::Stop),
            _ = tokio::time::sleep_until(until) => return Ok(Heard::Nothing),
            message = session.messages.next() => message,
        };
        match message {
            Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CHANNEL => {
                return Ok(if n.payload() == "released" {
                    Heard::Released
                } else {
                    Heard::Alive
                });
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(db::describe(&e)),
            None => return Err("connection closed".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_gauges_are_exported_by_the_leader_once_refreshed_in_its_term() {
        type Step = (&'static str, fn(&Role), bool, bool);
        let role = Role::standby();
        // (step, leading, exported)
        let steps: [Step; 6] = [
            ("standing by", |_| {}, false, false),
            ("took the role", |r| r.take(), true, false),
            ("refreshed", |r| r.gauges_refreshed(), true, true),
            ("lost it", |r| r.give_up(), false, false),
            ("took it again, old values", |r| r.take(), true, false),
            ("refreshed again", |r| r.gauges_refreshed(), true, true),
        ];
        for (step, act, leading, exported) in steps {
            act(&role);
            assert_eq!(role.leading(), leading, "{step}");
            assert_eq!(role.exports_queue_gauges(), exported, "{step}");
        }
        assert!(Role::always().leading());
    }
}
