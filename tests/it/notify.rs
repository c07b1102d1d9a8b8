//! Error-notification emails, end to end: a real receiver that fails, the
//! daemon, and a real SMTP server process.

use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use crate::harness::count;
use crate::harness::{Daemon, TestDb, eventually_count};
use crate::receiver::{Receiver, Reply};
use crate::smtp::{Mail, SmtpServer, free_port};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Daemon settings for SMTP on `port`, with short timings.
pub(crate) fn smtp_env(port: u16, extra: &[(&'static str, &'static str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("OUTBOXD_SMTP__HOST", "127.0.0.1".to_string()),
        ("OUTBOXD_SMTP__PORT", port.to_string()),
        ("OUTBOXD_SMTP__TLS", "none".to_string()),
        (
            "OUTBOXD_SMTP__FROM",
            "outboxd@sales.example.com".to_string(),
        ),
        ("OUTBOXD_SMTP__TIMEOUT", "5s".to_string()),
        ("OUTBOXD_NOTIFY__GATHER", "300ms".to_string()),
        ("OUTBOXD_NOTIFY__POLL_INTERVAL", "100ms".to_string()),
        ("OUTBOXD_NOTIFY__RETRY_DELAY", "200ms".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

pub(crate) async fn start(db: &TestDb, env: &[(String, String)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Daemon::start(db, &env).await
}

/// A receiver that rejects everything with status 0.
pub(crate) async fn rejecting_receiver() -> Receiver {
    Receiver::start(|req, _| {
        let number = req.json()["paymentNumber"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        Reply::Json(
            200,
            json!({"status": "0", "error": format!("Payment {number} is already settled")}),
        )
    })
    .await
}

pub(crate) async fn endpoint(client: &Client, company: i64, url: &str, emails: &[&str]) {
    let emails: Vec<String> = emails.iter().map(|e| e.to_string()).collect();
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url, auth_type, token, notify_emails)
             VALUES ($1, $2, 'bearer', 'bearer-SECRET-token', $3)",
            &[&company, &url, &emails],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_event_sends_one_email_to_exactly_the_configured_recipients() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = rejecting_receiver().await;
    endpoint(
        &client,
        6316,
        &receiver.url("/hooks"),
        &["ops@example.com", "finance@example.com"],
    )
    .await;
    let port = free_port();
    let smtp = SmtpServer::start(port, &["--user", "mailer", "--password", "smtp-SECRET-pw"]).await;
    let env = smtp_env(
        port,
        &[
            ("OUTBOXD_SMTP__USERNAME", "mailer"),
            ("OUTBOXD_SMTP__PASSWORD", "smtp-SECRET-pw"),
        ],
    );
    let daemon = start(&db, &env).await;
    client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271', ARRAY[17899,17900])",
            &[],
        )
        .await
        .unwrap();

    // One SMTP transaction per recipient, the same message in each.
    let mails = smtp.wait_for(2, SECS(20)).await;
    let mut rcpts: Vec<String> = mails.iter().flat_map(|m| m.rcpt_tos.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["finance@example.com", "ops@example.com"]);
    assert_eq!(mails[0].raw, mails[1].raw);
    let mail = &mails[0];
    assert_eq!(mail.mail_from, "outboxd@sales.example.com");
    assert!(mail.to.contains("ops@example.com") && mail.to.contains("finance@example.com"));
    assert_eq!(mail.content_type, "multipart/alternative");
    assert!(mail.defects.is_empty(), "MIME defects: {:?}", mail.defects);
    assert!(
        mail.subject
            .contains("Payment Cancellation webhook failed: payment 2271"),
        "{}",
        mail.subject
    );
    for part in ["text/plain", "text/html"] {
        let body = mail.part(part);
        for want in [
            "2271",
            "222125",
            "17899, 17900",
            "Payment 2271 is already settled",
            "What to do next",
        ] {
            assert!(body.contains(want), "{part} lacks {want:?}:\n{body}");
        }
        assert!(
            body.contains(&receiver.url("/hooks")),
            "{part} lacks the endpoint URL"
        );
    }

    // Exactly once: the email is marked sent and no more arrive.
    eventually_count(
        &client,
        "the email marked sent",
        SECS(10),
        "SELECT count(*) FROM outbox.emails WHERE state = 'sent'",
        1,
    )
    .await;
    let log = daemon.log();
    assert!(daemon.stop().await.success());
    assert_eq!(smtp.mails().len(), 2);
    for m in smtp.mails() {
        assert!(
            !m.raw.contains("SECRET"),
            "a secret in the email:\n{}",
            m.raw
        );
    }
    for line in log {
        assert!(!line.contains("SECRET"), "a secret in the log: {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_failures_in_one_window_make_one_digest_listing_all() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = rejecting_receiver().await;
    endpoint(&client, 6316, &receiver.url("/"), &["ops@example.com"]).await;
    let port = free_port();
    let smtp = SmtpServer::start(port, &[]).await;
    // Failures gather for 2 s; the window keeps a second email away for an hour.
    let env = smtp_env(
        port,
        &[
            ("OUTBOXD_NOTIFY__GATHER", "2s"),
            ("OUTBOXD_NOTIFY__WINDOW", "1h"),
        ],
    );
    let daemon = start(&db, &env).await;
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(6316, 1000 + g, 'P-' || g) FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    let mails = smtp.wait_for(1, SECS(30)).await;
    let digest = &mails[0];
    assert!(
        digest.subject.contains("failed for 50 events"),
        "{}",
        digest.subject
    );
    let text = digest.part("text/plain");
    for i in 1..=50 {
        assert!(text.contains(&format!("Payment P-{i}\n")), "P-{i} missing");
    }
    // A failure after the email waits for the window: gathered into nothing yet.
    client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation(6316, 9999, 'LATE')",
            &[],
        )
        .await
        .unwrap();
    eventually_count(
        &client,
        "the late failure queued",
        SECS(10),
        "SELECT count(*) FROM outbox.notifications",
        51,
    )
    .await;
    daemon.stop().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.emails").await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.notifications WHERE email_id IS NULL"
        )
        .await,
        1,
        "the late one waits for the next window"
    );
    assert_eq!(smtp.mails().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn notifications_made_while_smtp_is_down_are_all_sent_once_it_is_up() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = rejecting_receiver().await;
    for company in 1..=3 {
        endpoint(
            &client,
            company,
            &receiver.url("/"),
            &["ops@example.com", "cfo@example.com"],
        )
        .await;
    }
    // Nothing listens on this port yet.
    let port = free_port();
    let daemon = start(&db, &smtp_env(port, &[])).await;
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(c, c, 'P-' || c) FROM generate_series(1, 3) c",
        )
        .await
        .unwrap();
    // Every email has been tried and deferred at least once.
    eventually_count(&client, "three emails tried against the dead server", SECS(20), "SELECT count(*) FROM outbox.emails WHERE attempts >= 1 AND state = 'pending' AND last_error IS NOT NULL", 3).await;
    assert!(daemon.log().iter().any(|l| l.contains("will retry")));

    let smtp = SmtpServer::start(port, &[]).await;
    smtp.wait_for(6, SECS(30)).await;
    eventually_count(
        &client,
        "all three emails sent",
        SECS(10),
        "SELECT count(*) FROM outbox.emails WHERE state = 'sent'",
        3,
    )
    .await;
    daemon.stop().await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 6, "one per recipient per email, none twice");
    let mut seen: Vec<(String, String)> = mails
        .iter()
        .map(|m| (m.subject.clone(), m.rcpt_tos.join(",")))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_recipient_does_not_block_the_others() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = rejecting_receiver().await;
    endpoint(
        &client,
        6316,
        &receiver.url("/"),
        &["gone@example.com", "ops@example.com", "busy@example.com"],
    )
    .await;
    let port = free_port();
    let smtp = SmtpServer::start(
        port,
        &[
            "--refuse",
            "gone@example.com",
            "--defer",
            "busy@example.com",
        ],
    )
    .await;
    let daemon = start(&db, &smtp_env(port, &[])).await;
    client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation(6316, 1, '1')",
            &[],
        )
        .await
        .unwrap();
    let mails = smtp.wait_for(1, SECS(20)).await;
    assert_eq!(mails[0].rcpt_tos, ["ops@example.com"]);
    // The refused address is given up on; the deferred one is retried.
    eventually_count(
        &client,
        "a retry for the busy mailbox",
        SECS(10),
        "SELECT count(*) FROM outbox.emails
              WHERE sent_to = ARRAY['ops@example.com'] AND refused = ARRAY['gone@example.com']
                AND state = 'pending' AND attempts >= 2",
        1,
    )
    .await;
    daemon.stop().await;
    assert_eq!(
        smtp.mails().len(),
        1,
        "ops@ got it once, however often busy@ was retried"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_smtp_notifications_stay_queued() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = rejecting_receiver().await;
    endpoint(&client, 6316, &receiver.url("/"), &["ops@example.com"]).await;
    let daemon = Daemon::start(
        &db,
        &[
            ("OUTBOXD_NOTIFY__GATHER", "100ms"),
            ("OUTBOXD_NOTIFY__POLL_INTERVAL", "100ms"),
        ],
    )
    .await;
    daemon.wait_for_log("smtp.host is not set", SECS(5)).await;
    client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation(6316, 1, '1')",
            &[],
        )
        .await
        .unwrap();
    eventually_count(
        &client,
        "the email queued",
        SECS(10),
        "SELECT count(*) FROM outbox.emails WHERE state = 'pending' AND attempts = 0",
        1,
    )
    .await;
    daemon.stop().await;

    let ran = crate::harness::run(db.outboxd().arg("check")).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("smtp: not configured"), "{ran:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_email_for_a_missing_endpoint_or_a_delivered_event() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ok = Receiver::ok().await;
    endpoint(&client, 1, &ok.url("/"), &["ops@example.com"]).await;
    let port = free_port();
    let _smtp = SmtpServer::start(port, &[]).await;
    let daemon = start(&db, &smtp_env(port, &[])).await;
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, 1, '1');
             SELECT outbox.enqueue_payment_cancellation(2, 2, '2');",
        )
        .await
        .unwrap();
    eventually_count(
        &client,
        "both events final",
        SECS(10),
        "SELECT count(*) FROM outbox.events WHERE state IN ('delivered', 'failed')",
        2,
    )
    .await;
    daemon.stop().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.notifications").await,
        0
    );
}

/// Issue 14.1: a refusal of our sender is about us, not the recipients. An
/// hour of refusals at the default timings (`notify.retry_delay` 30 s,
/// doubling: tries at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 min) is 7 refused
/// tries; here the delay is 10 ms so they come in a second. Meanwhile more
/// failures make a second email. Once the server accepts the sender, every
/// recipient gets each email exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn after_an_hour_of_a_refused_sender_every_notification_arrives_exactly_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = rejecting_receiver().await;
    let recipients = ["ops@example.com", "cfo@example.com"];
    endpoint(&client, 6316, &receiver.url("/"), &recipients).await;
    let port = free_port();
    let smtp = SmtpServer::start(port, &["--refuse-sender"]).await;
    let env = smtp_env(
        port,
        &[
            ("OUTBOXD_NOTIFY__RETRY_DELAY", "10ms"),
            ("OUTBOXD_NOTIFY__POLL_INTERVAL", "20ms"),
            ("OUTBOXD_NOTIFY__GATHER", "50ms"),
            ("OUTBOXD_NOTIFY__WINDOW", "1s"),
        ],
    );
    let daemon = start(&db, &env).await;
    let enqueue = |number: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT outbox.enqueue_payment_cancellation(6316, 1, $1)",
                    &[&number],
                )
                .await
                .unwrap();
        }
    };
    enqueue("FIRST").await;
    smtp.wait_for_refusals(3, SECS(20)).await;
    enqueue("SECOND").await;
    // The second failure waits out the window, then gets its own email, which
    // is refused too; the first email has been refused an hour's worth.
    eventually_count(
        &client,
        "two emails, each refused, the first 7 times",
        SECS(20),
        "SELECT count(*) FROM outbox.emails
          WHERE state = 'pending' AND sent_to = '{}' AND refused = '{}'
            AND last_error LIKE '%refused the sender outboxd@sales.example.com (smtp.from): 553%'
            AND attempts >= CASE WHEN id = (SELECT min(id) FROM outbox.emails) THEN 7 ELSE 1 END",
        2,
    )
    .await;
    assert!(smtp.mails().is_empty());
    let refusals = smtp.wait_for_refusals(8, SECS(5)).await;
    assert!(refusals.iter().all(|r| r == "MAIL FROM"), "{refusals:?}");
    assert!(
        daemon
            .log()
            .iter()
            .any(|l| l.contains("will retry") && l.contains("refused the sender")),
        "each refused try is logged with its reason"
    );

    smtp.accept_sender();
    eventually_count(
        &client,
        "both emails sent",
        SECS(20),
        "SELECT count(*) FROM outbox.emails
          WHERE state = 'sent' AND refused = '{}' AND cardinality(sent_to) = 2",
        2,
    )
    .await;
    daemon.stop().await;
    // Nothing is left that could send again, and each (recipient, failure)
    // arrived once.
    let mails = smtp.mails();
    assert_eq!(mails.len(), 4, "two emails, two recipients each");
    for number in ["FIRST", "SECOND"] {
        for rcpt in recipients {
            let got = mails
                .iter()
                .filter(|m| m.rcpt_tos == [rcpt] && m.part("text/plain").contains(number))
                .count();
            assert_eq!(got, 1, "{rcpt} told of {number}");
        }
    }
}

/// A rejected event's email, to two recipients, through an SMTP server
/// started with `server_args`, until it has been tried twice and still waits
/// for both recipients with a last_error containing `reply`; returns the
/// server and the number of tries (the daemon is stopped).
async fn a_refused_message_waits(server_args: &[&str], reply: &str) -> (SmtpServer, i64) {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = rejecting_receiver().await;
    endpoint(
        &client,
        6316,
        &receiver.url("/"),
        &["ops@example.com", "cfo@example.com"],
    )
    .await;
    let port = free_port();
    let smtp = SmtpServer::start(port, server_args).await;
    let daemon = start(&db, &smtp_env(port, &[])).await;
    client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation(6316, 1, '1')",
            &[],
        )
        .await
        .unwrap();
    eventually_count(
        &client,
        "the email tried twice and still waiting for both recipients",
        SECS(20),
        &format!(
            "SELECT count(*) FROM outbox.emails
              WHERE state = 'pending' AND attempts >= 2 AND sent_to = '{{}}' AND refused = '{{}}'
                AND last_error LIKE '%{reply}%'"
        ),
        1,
    )
    .await;
    daemon.stop().await;
    assert!(smtp.mails().is_empty());
    let tries = count(&client, "SELECT attempts::bigint FROM outbox.emails").await;
    (smtp, tries)
}

/// Issue 14.1: a message the server refuses (554 after DATA) stays queued
/// for every recipient, with the reason; none is marked refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_message_is_retried_for_every_recipient_not_dropped() {
    let (smtp, tries) =
        a_refused_message_waits(&["--refuse-data"], "refused the message: 554").await;
    // One DATA per try: the first refusal ends the session, so the second
    // recipient is not sent the same refused message again.
    let refusals = smtp.wait_for_refusals(2, SECS(5)).await;
    assert!(
        refusals.len() as i64 <= tries,
        "{refusals:?} in {tries} tries"
    );
}

/// `n` events of company 6316 that failed as record.sql leaves them: state
/// failed after one rejected attempt ("Payment P-<n> is already settled"),
/// each with its notification, created a minute ago (so ready to gather),
/// a millisecond apart.
pub(crate) async fn stage_failures(client: &Client, n: i64) {
    client
        .execute(
            "WITH failed AS (
                 INSERT INTO outbox.events (company_id, payload, state, attempts,
                                            response_message, last_error, created_at)
                 SELECT 6316,
                        jsonb_build_object('companyId', 6316, 'paymentId', 100000 + g,
                                           'paymentNumber', 'P-' || g, 'orderIds', '17899,17900'),
                        'failed', 1, 'Payment P-' || g || ' is already settled',
                        'rejected by the external system (status 0)',
                        now() - interval '1 minute' + g * interval '1 millisecond'
                   FROM generate_series(1, $1::bigint) AS g
                 RETURNING id, created_at
             ), tried AS (
                 INSERT INTO outbox.attempts (event_id, attempt, started_at, duration_ms,
                                              http_status, outcome, message)
                 SELECT id, 1, created_at, 12, 200, 'rejected', 'already settled' FROM failed
             )
             INSERT INTO outbox.notifications (event_id, company_id, event_type, endpoint_url,
                                               created_at)
             SELECT id, 6316, 'payment.cancellation', 'https://erp.example.com/hooks', created_at
               FROM failed",
            &[&n],
        )
        .await
        .unwrap();
}

/// One digest of `failures` failed events, staged in SQL as record.sql
/// leaves them (failed, an attempt, a notification each), sent by a daemon
/// to an SMTP server that takes at most 1 MiB per message. Returns the
/// message and the daemon's peak resident memory (VmHWM) in KiB.
async fn one_digest_of(failures: i64) -> (Mail, u64) {
    let db = TestDb::new().await;
    let client = db.client().await;
    endpoint(
        &client,
        6316,
        "https://erp.example.com/hooks",
        &["ops@example.com"],
    )
    .await;
    stage_failures(&client, failures).await;
    let port = free_port();
    let smtp = SmtpServer::start(port, &["--size-limit", "1048576"]).await;
    let env = smtp_env(
        port,
        &[
            ("OUTBOXD_NOTIFY__GATHER", "100ms"),
            ("OUTBOXD_NOTIFY__WINDOW", "1h"),
        ],
    );
    let daemon = start(&db, &env).await;
    let mail = smtp.wait_for(1, SECS(60)).await.remove(0);
    eventually_count(
        &client,
        "the one email marked sent",
        SECS(10),
        "SELECT count(*) FROM outbox.emails WHERE state = 'sent' AND sent_to = '{ops@example.com}'",
        1,
    )
    .await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    daemon.stop().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.emails").await,
        1
    );
    assert_eq!(smtp.mails().len(), 1);
    (mail, peak_kib)
}

/// Issue 14.2: 20,000 failures in one window make one email that lists the
/// first 50 in full, gives the count and says how to see the rest, under
/// 256 KiB (a payment cancellation's failure takes about 1 KB in each part);
/// the daemon's peak memory does not grow with the number of failures.
#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_failures_make_one_small_digest_and_memory_stays_flat() {
    let (small, small_peak) = one_digest_of(1_000).await;
    let (mail, peak) = one_digest_of(20_000).await;
    assert!(
        mail.raw.len() < 256 * 1024,
        "the digest is {} bytes",
        mail.raw.len()
    );
    assert!(mail.defects.is_empty(), "MIME defects: {:?}", mail.defects);
    assert!(
        mail.subject.contains("failed for 20000 events"),
        "{}",
        mail.subject
    );
    for part in ["text/plain", "text/html"] {
        let body = mail.part(part);
        for want in [
            "for 20000 events; the first 50 are listed here",
            "19950 more events failed in the same window",
            "outboxd events list --company 6316 --state failed --since ",
            "outboxd events retry --company 6316 --state failed --since ",
            "Payment P-1 is already settled",
            "Payment P-50 is already settled",
        ] {
            assert!(body.contains(want), "{part} lacks {want:?}");
        }
        assert!(!body.contains("Payment P-51 "), "{part} lists a 51st event");
    }
    assert!(small.subject.contains("failed for 1000 events"));
    // Flat: the same peak within 8 MiB, where listing every event made the
    // 20,000 digest alone tens of MB.
    assert!(
        peak <= small_peak + 8 * 1024,
        "peak memory {small_peak} KiB with 1,000 failures, {peak} KiB with 20,000"
    );
    eprintln!(
        "digest of 20,000: {} bytes; peak memory {small_peak} KiB (1,000) and {peak} KiB (20,000)",
        mail.raw.len()
    );
}

/// Issue 14.8: a token in the endpoint URL's query is sent with every
/// request, and never shown: not in the email, `status`, the endpoint
/// commands, `endpoint test`, nor the daemon's log. outboxd shows every
/// query value as `***` (it cannot tell a token from a harmless value).
#[tokio::test(flavor = "multi_thread")]
async fn a_token_in_the_url_query_is_sent_but_never_shown() {
    use crate::harness::run;
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = rejecting_receiver().await;
    let secret = "QUERY-SECRET-tok";
    let url = receiver.url(&format!("/hooks?token={secret}&company=6316"));
    endpoint(&client, 6316, &url, &["ops@example.com"]).await;
    let port = free_port();
    let smtp = SmtpServer::start(port, &[]).await;
    let daemon = start(&db, &smtp_env(port, &[])).await;
    client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation(6316, 1, '1')",
            &[],
        )
        .await
        .unwrap();
    let mail = smtp.wait_for(1, SECS(20)).await.remove(0);
    assert_eq!(
        receiver.received()[0].path,
        format!("/hooks?token={secret}&company=6316"),
        "the receiver gets its token"
    );
    let shown = receiver.url("/hooks?token=***&company=***");
    assert!(mail.part("text/plain").contains(&shown), "{}", mail.raw);
    assert!(!mail.raw.contains(secret), "the email shows the token");
    let log = daemon.log();
    daemon.stop().await;
    assert!(
        !log.iter().any(|l| l.contains(secret)),
        "the log shows the token"
    );
    for args in [
        vec!["status"],
        vec!["endpoint", "show", "--company", "6316"],
        vec!["endpoint", "list"],
        vec!["endpoint", "test", "--company", "6316"],
    ] {
        let ran = run(db.outboxd().args(&args)).await;
        assert!(
            !ran.stdout.contains(secret) && !ran.stderr.contains(secret),
            "{args:?} shows the token: {ran:?}"
        );
        assert!(ran.stdout.contains("token=***"), "{args:?}: {ran:?}");
    }
    assert_eq!(
        receiver.received().last().unwrap().path,
        format!("/hooks?token={secret}&company=6316"),
        "endpoint test sends the token too"
    );
}

/// Issue 14.1: a message over the relay's size limit (aiosmtpd's, 552 after
/// DATA) is about the message, not the recipients: the email waits for
/// every recipient, with the server's reply, and none is marked refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_relays_size_limit_is_kept_for_every_recipient() {
    // Any notification email is larger than 1,000 bytes.
    a_refused_message_waits(&["--size-limit", "1000"], "refused the message: 552").await;
}

/// A hand-written email whose attempts are at the integer limit (one more
/// try would overflow) is left alone instead of failing every email claim:
/// the other emails go out. Before, the claim failed for as long as that
/// row was due, and no notification was sent at all.
#[tokio::test(flavor = "multi_thread")]
async fn an_email_at_the_attempts_limit_does_not_stop_the_others() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = rejecting_receiver().await;
    endpoint(&client, 6316, &receiver.url("/"), &["ops@example.com"]).await;
    client
        .batch_execute(
            "INSERT INTO outbox.emails (company_id, event_type, recipients, attempts, next_attempt_at)
             VALUES (1, 'payment.cancellation', '{stuck@example.com}', 2147483647,
                     now() - interval '1 day')",
        )
        .await
        .unwrap();
    let port = free_port();
    let smtp = SmtpServer::start(port, &[]).await;
    let daemon = start(&db, &smtp_env(port, &[])).await;
    client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation(6316, 1, 'OTHER')",
            &[],
        )
        .await
        .unwrap();
    let mails = smtp.wait_for(1, SECS(20)).await;
    assert_eq!(mails[0].rcpt_tos, ["ops@example.com"]);
    daemon.stop().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.emails
              WHERE attempts = 2147483647 AND state = 'pending' AND lease_owner IS NULL",
        )
        .await,
        1,
        "the stuck email is still there, untouched"
    );
}
