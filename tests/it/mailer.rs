//! The mailer under stress: a stop while an SMTP server hangs, and two
//! instances sharing a slow one. Real processes throughout: `outboxd run`,
//! PostgreSQL, the aiosmtpd server (`tests/smtp/server.py`) or a silent TCP
//! listener.
//!
//! Both tests start from emails queued the real way: an endpoint's receiver
//! rejects an event, the event fails, its notification is gathered into an
//! email by a daemon without SMTP ([`queue_emails`]). They are all in
//! outbox.emails before the daemon under test starts, so what it does with a
//! queue of several emails does not depend on gather ticks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::harness::{Daemon, TestDb, count, eventually, eventually_count, unit_stop_timeout};
use crate::notify::{endpoint, rejecting_receiver, smtp_env, start};
use crate::smtp::{Blackhole, Mail, SmtpServer, free_port};

/// Makes one event fail for each `(company, notify_emails)` and waits until
/// each has become a pending, never-tried email; the daemon that did it (no
/// smtp.host, so it sends nothing) is stopped again. The events are numbered
/// `P-<100 + company>`; each email's subject names its company.
async fn queue_emails(db: &TestDb, client: &Client, endpoints: &[(i64, Vec<String>)]) {
    let receiver = rejecting_receiver().await;
    for (company, emails) in endpoints {
        let emails: Vec<&str> = emails.iter().map(String::as_str).collect();
        endpoint(client, *company, &receiver.url("/"), &emails).await;
    }
    let daemon = Daemon::start(
        db,
        &[
            ("OUTBOXD_NOTIFY__GATHER", "100ms"),
            ("OUTBOXD_NOTIFY__POLL_INTERVAL", "100ms"),
        ],
    )
    .await;
    let companies: Vec<i64> = endpoints.iter().map(|(c, _)| *c).collect();
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(c, c, 'P-' || (100 + c))
               FROM unnest($1::bigint[]) AS c",
            &[&companies],
        )
        .await
        .unwrap();
    eventually_count(
        client,
        "one queued email per endpoint",
        Duration::from_secs(20),
        "SELECT count(*) FROM outbox.emails WHERE state = 'pending' AND attempts = 0",
        endpoints.len() as i64,
    )
    .await;
    assert!(daemon.stop().await.success());
}

/// The smtp.timeout `outboxd run` gets from the reference config.toml (which
/// the harness passes) when no variable overrides it.
fn reference_smtp_timeout() -> Duration {
    use figment::providers::{Format, Toml};
    let file = crate::harness::repo_root().join("config.toml");
    let mut raw: outboxd::config::RawConfig = figment::Figment::from(Toml::file_exact(&file))
        .extract()
        .expect("config.toml parses");
    raw.smtp.host = Some("127.0.0.1".into());
    raw.smtp.from = Some("outboxd@sales.example.com".into());
    let config = raw.validate().expect("config.toml is valid");
    config.notify.smtp.expect("smtp configured").timeout
}

/// Regression: the daemon awaited its mailer without a limit on SIGTERM, so
/// an SMTP server that accepts and then says nothing held `outboxd run` for
/// the SMTP timeouts of every queued email, past TimeoutStopSec (then systemd
/// SIGKILLs it, and the stop counts as a failure). With tls = "none",
/// mail-send 0.7 reads the 220 greeting without its own timeout, so only
/// outboxd's bound per email applies (`smtp::send_limit`: then
/// smtp.timeout * (recipients + 2), here 30 s * 4 = 2 min for the first
/// email alone, and the old mailer had claimed all three together). Now a send still running at the stop gets
/// the mailer's 5 s grace and is abandoned; the stop must stay within the
/// daemon's own budget, not just within TimeoutStopSec.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_smtp_blackholed_and_emails_queued_exits_0_within_the_stop_timeout() {
    let stop_timeout = unit_stop_timeout();
    let smtp_timeout = reference_smtp_timeout();
    // Not lowered: a stop bounded only because the SMTP timeout is short
    // would prove nothing about the default setup.
    assert_eq!(smtp_timeout, Duration::from_secs(30));

    let db = TestDb::new().await;
    let client = db.client().await;
    // Three companies, so three emails queue: one being sent, two waiting.
    let endpoints: Vec<(i64, Vec<String>)> = (1..=3)
        .map(|c| {
            (
                c,
                vec![
                    format!("ops@c{c}.example.com"),
                    format!("finance@c{c}.example.com"),
                ],
            )
        })
        .collect();
    queue_emails(&db, &client, &endpoints).await;

    let blackhole = Blackhole::start().await;
    let mut env = smtp_env(blackhole.port, &[]);
    // smtp_env shortens smtp.timeout for the notify tests; here the default
    // (30 s, checked above) applies.
    env.retain(|(key, _)| key != "OUTBOXD_SMTP__TIMEOUT");
    let mut daemon = start(&db, &env).await;

    // The mailer has connected: it has claimed an email and waits for a
    // greeting that never comes.
    blackhole
        .wait_for_connections(1, Duration::from_secs(20))
        .await;
    // Steady state, not a stop during start-up (the mailer may connect
    // before the delivery loop runs).
    daemon
        .wait_for_log("outboxd is delivering", Duration::from_secs(10))
        .await;
    let sending = count(
        &client,
        "SELECT count(*) FROM outbox.emails WHERE state = 'sending'",
    )
    .await;
    assert!(
        sending >= 1,
        "the mailer connected without claiming an email"
    );

    daemon.signal(libc::SIGTERM);
    let sigterm = Instant::now();
    let status = daemon.wait_up_to(stop_timeout).await;
    let took = sigterm.elapsed();
    let Some(status) = status else {
        let log = daemon.log();
        let tail = &log[log.len().saturating_sub(15)..];
        panic!(
            "outboxd still running {took:?} after SIGTERM, past TimeoutStopSec={stop_timeout:?} \
             (systemd would SIGKILL it now); the blackhole accepted {} connection(s); last log lines:\n{}",
            blackhole.accepted(),
            tail.join("\n")
        );
    };
    eprintln!("outboxd stopped {took:?} after SIGTERM (TimeoutStopSec={stop_timeout:?}), {status}");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; log:\n{}",
        daemon.log().join("\n")
    );
    assert!(took < stop_timeout);
    let budget = outboxd::engine::stop_budget(
        &outboxd::config::load(Some(&crate::harness::repo_root().join("config.toml"))).unwrap(),
    );
    assert!(
        took <= budget + Duration::from_secs(3),
        "the stop took {took:?}, over the daemon's own budget of {budget:?}"
    );

    // Nothing was sent and nothing was lost: all three wait for the next start.
    let rows = client
        .query(
            "SELECT id, state, sent_at IS NULL AS unsent, cardinality(sent_to) AS reached
               FROM outbox.emails ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        let (id, state): (i64, String) = (row.get("id"), row.get("state"));
        assert!(
            state != "sent" && row.get::<_, bool>("unsent") && row.get::<_, i32>("reached") == 0,
            "email {id} is {state}, yet nobody could have received it"
        );
    }
}

/// Counts per recipient of what the SMTP server accepted. Every recipient
/// address belongs to one endpoint only, so a recipient names an (email,
/// recipient) pair; the subject is checked to name that email's company.
fn received_per_recipient(
    mails: &[Mail],
    company_of: &BTreeMap<String, i64>,
) -> BTreeMap<String, usize> {
    let mut got = BTreeMap::new();
    for mail in mails {
        assert_eq!(mail.rcpt_tos.len(), 1, "one transaction per recipient");
        let rcpt = &mail.rcpt_tos[0];
        let company = company_of
            .get(rcpt)
            .unwrap_or_else(|| panic!("a message for a stranger: {rcpt}"));
        assert!(
            mail.subject.contains(&format!("(company {company})")),
            "{rcpt} got another company's email: {}",
            mail.subject
        );
        *got.entry(rcpt.clone()).or_insert(0) += 1;
    }
    got
}

/// Regression: one claim leased 10 emails for smtp.timeout * 12 and sent them
/// one after another, so with a slow SMTP server the later ones outlived
/// their lease while still queued behind the others, and a second instance
/// claimed and sent them too: the same recipients got the same email twice.
///
/// The numbers. T = smtp.timeout = 2 s, so the old lease L = 12 T = 24 s.
/// The server answers each RCPT and each DATA 0.5 s late (well inside T, so
/// no reply times out, even on a loaded machine), so one SMTP transaction
/// takes about 1 s and an email to 5 recipients about S = 5 s. There are 11
/// emails, queued before both instances start; a claim takes at most 10, so
/// however the first claims split them, one instance holds k >= 6 emails
/// and needs k * S >= 30 s > L for them. Its emails are claimable again from
/// L = 24 s on, and by then the other instance (at most 11 - k <= 5 emails,
/// <= 25 s) is idle or soon is, polling every 100 ms: it claims the unsent
/// ones and sends them while the first instance sends them as well. The
/// first duplicate arrives about 25-26 s after the start. With each email
/// leased on its own for long enough to reach its recipients at T, the 55
/// transactions take about 55 s / 2 instances, ~30 s.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_with_a_slow_smtp_server_send_each_email_once() {
    const EMAILS: i64 = 11;
    const RECIPIENTS: usize = 5; // the most an endpoint may have
    let db = TestDb::new().await;
    let client = db.client().await;
    let endpoints: Vec<(i64, Vec<String>)> = (1..=EMAILS)
        .map(|c| {
            let emails = (1..=RECIPIENTS)
                .map(|r| format!("r{r}@c{c}.example.com"))
                .collect();
            (c, emails)
        })
        .collect();
    let company_of: BTreeMap<String, i64> = endpoints
        .iter()
        .flat_map(|(c, emails)| emails.iter().map(move |e| (e.clone(), *c)))
        .collect();
    queue_emails(&db, &client, &endpoints).await;

    let port = free_port();
    let smtp = SmtpServer::start(port, &["--delay-rcpt", "0.5", "--delay-data", "0.5"]).await;
    let env = smtp_env(port, &[("OUTBOXD_SMTP__TIMEOUT", "2s")]);
    let started = Instant::now();
    let (a, b) = tokio::join!(start(&db, &env), start(&db, &env));

    let duplicate = |mails: &[Mail]| {
        received_per_recipient(mails, &company_of)
            .into_iter()
            .any(|(_, n)| n > 1)
    };
    // Until every email is marked sent, or a recipient got one twice (that
    // cannot be undone: no need to wait for the rest).
    eventually(
        "every email marked sent (or a duplicate)",
        Duration::from_secs(70),
        || async {
            duplicate(&smtp.mails())
                || count(
                    &client,
                    "SELECT count(*) FROM outbox.emails WHERE state = 'sent'",
                )
                .await
                    == EMAILS
        },
    )
    .await;
    let twice: Vec<String> = received_per_recipient(&smtp.mails(), &company_of)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(rcpt, n)| format!("{rcpt} x{n}"))
        .collect();
    assert!(
        twice.is_empty(),
        "{:?} after the start, recipients that got their email more than once: {}",
        started.elapsed(),
        twice.join(", ")
    );
    eprintln!("all {EMAILS} emails sent in {:?}", started.elapsed());

    let (a, b) = tokio::join!(a.stop(), b.stop());
    assert!(a.success() && b.success());
    // Nothing more arrived while they stopped: every pair exactly once.
    let got = received_per_recipient(&smtp.mails(), &company_of);
    for rcpt in company_of.keys() {
        assert_eq!(got.get(rcpt), Some(&1), "messages received for {rcpt}");
    }
    assert_eq!(
        count(
            &client,
            &format!(
                "SELECT count(*) FROM outbox.emails
                  WHERE state = 'sent' AND cardinality(sent_to) = {RECIPIENTS}
                    AND cardinality(refused) = 0"
            ),
        )
        .await,
        EMAILS,
        "every email marked sent to all its recipients"
    );
}

/// The claim behind "each email sent once": one email per lease, the oldest
/// due first, and a leased one is not claimed again until its lease runs out.
#[tokio::test]
async fn claim_emails_leases_one_email_at_a_time() {
    const CLAIM: &str = include_str!("../../sql/queries/claim_emails.sql");
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox.emails (company_id, event_type, recipients, next_attempt_at)
             SELECT c, 'payment.cancellation', ARRAY['ops@example.com'], now() - c * interval '1 minute'
               FROM generate_series(1, 3) AS c",
        )
        .await
        .unwrap();
    let lease_ms: i64 = 60_000;
    let mut claimed = Vec::new();
    for owner in ["a", "b", "c", "d"] {
        let rows = client.query(CLAIM, &[&owner, &lease_ms]).await.unwrap();
        assert!(
            rows.len() <= 1,
            "{owner} leased {} emails at once",
            rows.len()
        );
        claimed.extend(rows.iter().map(|r| r.get::<_, i64>("company_id")));
    }
    // Oldest due first; the fourth claim finds nothing left.
    assert_eq!(claimed, vec![3, 2, 1]);
}

/// Issue 14.6: two instances gathering at once make one email, holding
/// every notification. The race, staged: the first gather call of the test
/// database waits at a gate (a test-held advisory lock) just before taking
/// the gather lock, so that instance B is inside its gathering, past
/// whatever snapshot it has, while instance A gathers and commits; then the
/// gate opens. The gate is a function named like PostgreSQL's lock
/// function, found first through the database's search_path; it then calls
/// the real one. Before, B's statement had taken its snapshot before the
/// lock, saw the notifications A had just emailed as still waiting, and made
/// a second email with none in it (later "sent" with every recipient
/// refused).
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_gathering_at_once_make_one_email_with_every_notification() {
    let db = TestDb::new().await;
    let client = db.client().await;
    crate::notify::endpoint(
        &client,
        6316,
        "https://erp.example.com/hooks",
        &["ops@example.com"],
    )
    .await;
    crate::notify::stage_failures(&client, 3).await;
    client
        .batch_execute(&format!(
            "CREATE SEQUENCE public.gather_calls;
             -- A row that commits with the gated instance's gathering.
             CREATE TABLE public.gate_passed (at timestamptz);
             CREATE FUNCTION public.pg_try_advisory_xact_lock(key bigint) RETURNS boolean
             LANGUAGE plpgsql AS $$
             BEGIN
                 IF nextval('public.gather_calls') = 1 THEN
                     PERFORM pg_catalog.pg_advisory_lock_shared(4242);
                     PERFORM pg_catalog.pg_advisory_unlock_shared(4242);
                     INSERT INTO public.gate_passed VALUES (now());
                 END IF;
                 RETURN pg_catalog.pg_try_advisory_xact_lock(key);
             END $$;
             ALTER DATABASE {} SET search_path = public, pg_catalog;",
            db.name
        ))
        .await
        .unwrap();
    let gate = db.client().await;
    gate.execute("SELECT pg_advisory_lock(4242)", &[])
        .await
        .unwrap();
    let env = [
        ("OUTBOXD_NOTIFY__GATHER", "100ms"),
        ("OUTBOXD_NOTIFY__POLL_INTERVAL", "100ms"),
    ];
    let b = Daemon::start(&db, &env).await;
    let waiting_at_gate = "SELECT count(*) FROM pg_stat_activity
                            WHERE datname = current_database()
                              AND wait_event_type = 'Lock' AND wait_event = 'advisory'";
    eventually_count(
        &client,
        "B waiting at the gate",
        Duration::from_secs(10),
        waiting_at_gate,
        1,
    )
    .await;
    let a = Daemon::start(&db, &env).await;
    eventually_count(
        &client,
        "A's email with all three",
        Duration::from_secs(10),
        "SELECT count(*) FROM outbox.notifications WHERE email_id IS NOT NULL",
        3,
    )
    .await;
    gate.execute("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap();
    // B's gathering is over once its transaction, with the gate's row in
    // it, has committed.
    eventually_count(
        &client,
        "B's gathering committed",
        Duration::from_secs(10),
        "SELECT count(*) FROM public.gate_passed",
        1,
    )
    .await;
    assert!(a.stop().await.success());
    assert!(b.stop().await.success());
    let emails = client
        .query(
            "SELECT e.id, count(n.id) FROM outbox.emails e
               LEFT JOIN outbox.notifications n ON n.email_id = e.id
              GROUP BY e.id ORDER BY e.id",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<i64> = emails.iter().map(|r| r.get(1)).collect();
    assert_eq!(counts, [3], "one email, with every notification");
}

/// Issue 24, point 4: the claim and the recorder never wait for a pooled
/// connection while the mailer is stuck in an exchange with a silent SMTP
/// server and retention deletes a large backlog. The mailer holds a
/// connection only for its statements, never during SMTP; the upkeep
/// (retention, gauges, lease expiry, hold limit) has a pool of its own.
/// With `database.pool_size = 2`, a mailer holding one through its SMTP
/// timeout and retention taking the other left the recorder waiting.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_smtp_server_and_retention_at_work_never_make_the_claim_or_the_recorder_wait() {
    use crate::harness::http_get;
    use crate::receiver::Receiver;
    let db = TestDb::new().await;
    let client = db.client().await;
    queue_emails(&db, &client, &[(1, vec!["ops@c1.example.com".into()])]).await;
    // Retention's backlog: delivered events 8 days old (kept for 7).
    client
        .batch_execute(
            "INSERT INTO outbox.events (company_id, payload, state, attempts, delivered_at, created_at)
             SELECT 9, '{}', 'delivered', 1, now() - interval '8 days', now() - interval '8 days'
               FROM generate_series(1, 200000)",
        )
        .await
        .unwrap();
    let receiver = Receiver::ok().await;
    crate::notify::endpoint(&client, 2, &receiver.url("/"), &[]).await;

    let blackhole = Blackhole::start().await;
    let mut env = smtp_env(blackhole.port, &[]);
    // The default 30 s: the mailer stays in its exchange through the drain.
    env.retain(|(key, _)| key != "OUTBOXD_SMTP__TIMEOUT");
    for (key, value) in [
        ("OUTBOXD_DATABASE__POOL_SIZE", "2"),
        ("OUTBOXD_RETENTION__INTERVAL", "1s"),
        ("OUTBOXD_RETENTION__BATCH_SIZE", "2000"),
    ] {
        env.push((key.into(), value.into()));
    }
    let daemon = start(&db, &env).await;
    blackhole
        .wait_for_connections(1, Duration::from_secs(20))
        .await;
    eventually(
        "retention deleting the backlog",
        Duration::from_secs(20),
        || async {
            count(
                &client,
                "SELECT count(*) FROM outbox.events WHERE company_id = 9",
            )
            .await
                < 200_000
        },
    )
    .await;
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(2, g, 'P' || g) FROM generate_series(1, 2000) g",
        )
        .await
        .unwrap();
    eventually_count(
        &client,
        "the 2,000 events delivered",
        Duration::from_secs(60),
        "SELECT count(*) FROM outbox.events WHERE company_id = 2 AND state = 'delivered'",
        2000,
    )
    .await;
    let sending = count(
        &client,
        "SELECT count(*) FROM outbox.emails WHERE state = 'sending'",
    )
    .await;
    assert_eq!(sending, 1, "the mailer was in its SMTP exchange throughout");
    let (_, metrics) = http_get(&format!("{}/metrics", daemon.admin)).await;
    for user in ["claim", "record"] {
        let line = format!("outboxd_db_pool_waits_total{{user=\"{user}\"}} 0");
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} not in:\n{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("outboxd_db_pool"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    daemon.stop().await;
}

/// Issue 24, point 5: a slow relay answers every command within
/// `smtp.timeout` (2 s) but takes 1.5 s at RCPT and 1.5 s after the
/// message, so one recipient's transaction takes longer than one timeout
/// and five of them (15 s) longer than the old bound on the whole exchange
/// (the timeout × (recipients + 2): 14 s). Each recipient still receives
/// the email exactly once: the bound follows the commands, and what was
/// accepted before any cut-off is kept. (With 0.9 s answers and a 1 s
/// timeout, a loaded machine once pushed an answer after the message past
/// the timeout: the relay had the message, the mailer did not know, and
/// the recipient got it twice, which is what SMTP allows there. The margin
/// is now half a second.)
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_relay_within_each_commands_timeout_mails_each_recipient_once() {
    const RECIPIENTS: usize = 5;
    let db = TestDb::new().await;
    let client = db.client().await;
    let emails: Vec<String> = (1..=RECIPIENTS)
        .map(|r| format!("r{r}@c1.example.com"))
        .collect();
    let company_of: BTreeMap<String, i64> = emails.iter().map(|e| (e.clone(), 1)).collect();
    queue_emails(&db, &client, &[(1, emails)]).await;

    let port = free_port();
    let smtp = SmtpServer::start(port, &["--delay-rcpt", "1.5", "--delay-data", "1.5"]).await;
    let env = smtp_env(port, &[("OUTBOXD_SMTP__TIMEOUT", "2s")]);
    let daemon = start(&db, &env).await;
    eventually_count(
        &client,
        "the email marked sent",
        Duration::from_secs(60),
        "SELECT count(*) FROM outbox.emails WHERE state = 'sent'",
        1,
    )
    .await;
    assert!(daemon.stop().await.success());
    let got = received_per_recipient(&smtp.mails(), &company_of);
    for rcpt in company_of.keys() {
        assert_eq!(
            got.get(rcpt),
            Some(&1),
            "messages received for {rcpt}: {got:?}"
        );
    }
}

/// Each accepted recipient is written down before the next one's turn, so
/// an exchange the stop abandons (the mailer's grace is 5 s) keeps what it
/// achieved: the first recipient accepted, the relay stalls on the second,
/// SIGTERM. The email's row says who has it; once its lease is over, the
/// next send mails only the one who does not. (Before, the abandoned
/// exchange's acceptances lived only in memory and everyone got it again.)
#[tokio::test(flavor = "multi_thread")]
async fn an_exchange_abandoned_at_the_stop_keeps_its_accepted_recipients() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let (first, stalled) = ("first@c1.example.com", "stalled@c1.example.com");
    queue_emails(&db, &client, &[(1, vec![first.into(), stalled.into()])]).await;

    let port = free_port();
    let smtp = SmtpServer::start(port, &["--hang-rcpt", stalled]).await;
    let env = smtp_env(port, &[("OUTBOXD_SMTP__TIMEOUT", "30s")]);
    let daemon = start(&db, &env).await;
    smtp.wait_for_refusals(1, Duration::from_secs(20)).await;
    assert_eq!(
        received_per_recipient(&smtp.mails(), &[(first.to_string(), 1)].into()).len(),
        1
    );
    let sent_to: Vec<String> = client
        .query_one("SELECT sent_to FROM outbox.emails", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        sent_to,
        [first],
        "written down while the exchange still runs"
    );
    assert!(daemon.stop().await.success());
    drop(smtp);

    // The lease of the abandoned send is over: another send takes it.
    client
        .batch_execute("UPDATE outbox.emails SET next_attempt_at = now()")
        .await
        .unwrap();
    let port = free_port();
    let smtp = SmtpServer::start(port, &[]).await;
    let daemon = start(&db, &smtp_env(port, &[])).await;
    eventually_count(
        &client,
        "the email marked sent",
        Duration::from_secs(20),
        "SELECT count(*) FROM outbox.emails WHERE state = 'sent'",
        1,
    )
    .await;
    assert!(daemon.stop().await.success());
    let company_of: BTreeMap<String, i64> =
        [(first.to_string(), 1), (stalled.to_string(), 1)].into();
    let got = received_per_recipient(&smtp.mails(), &company_of);
    assert_eq!(
        got,
        [(stalled.to_string(), 1)].into(),
        "only the one who had not got it"
    );
}
