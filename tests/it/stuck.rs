//! Stuck while looking healthy (issue 24, point 3), staged for real: a
//! privilege revoked from the daemon's role, a trigger on `outbox.events`
//! that raises, a newer binary's migration applied under a running daemon.
//! Each time the instance says so (`/readyz`, the metrics, the alert's
//! expression evaluated by promtool on what it exports) and recovers once
//! the cause is gone, without a restart; the newer schema stops it with
//! exit code 3 instead.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::{Daemon, TempDir, TestDb, count, eventually, http_get, repo_root};
use crate::ops::{promtool, samples};
use crate::receiver::Receiver;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A role of its own for the daemon, with every right on the outbox schema
/// (roles are cluster-wide: named after the test's database). Dropped by
/// [`drop_role`].
async fn daemon_role(db: &TestDb) -> (String, String) {
    let role = format!("r_{}", db.name);
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT CONNECT ON DATABASE {db} TO {role};
             GRANT USAGE ON SCHEMA outbox TO {role};
             GRANT ALL ON ALL TABLES IN SCHEMA outbox TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA outbox TO {role};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA outbox TO {role};",
            db = db.name
        ))
        .await
        .unwrap();
    let url = with_user(&db.url, &role);
    (role, url)
}

async fn drop_role(db: &TestDb, role: &str) {
    let _ = db
        .client()
        .await
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await;
}

/// `url` connecting as `user` instead.
fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{rest}")
}

async fn enqueue(db: &TestDb, payment: i64) {
    db.client()
        .await
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(1, $1, $2)",
            &[&payment, &format!("P-{payment}")],
        )
        .await
        .unwrap();
}

async fn endpoint(db: &TestDb, receiver: &Receiver) {
    db.client()
        .await
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES (1, $1)",
            &[&receiver.url("/")],
        )
        .await
        .unwrap();
}

async fn scrape(daemon: &Daemon) -> BTreeMap<String, f64> {
    let (status, body) = http_get(&format!("{}/metrics", daemon.admin)).await;
    assert_eq!(status, 200);
    samples(&body)
}

fn value(all: &BTreeMap<String, f64>, name: &str) -> f64 {
    *all.get(name)
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

/// The expression of `alert` in dashboards/alerts.yml.
fn alert_expression(alert: &str) -> String {
    let rules = std::fs::read_to_string(repo_root().join("dashboards/alerts.yml")).unwrap();
    let start = rules
        .find(&format!("- alert: {alert}"))
        .unwrap_or_else(|| panic!("no alert {alert}"));
    let rest = &rules[start..];
    let expr = rest.find("expr: |").expect("a block expression") + "expr: |".len();
    rest[expr..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("          "))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `alert`'s expression holds ten minutes on, for an instance whose
/// metrics went from `before` to `after` in `elapsed`, each series going on
/// as it went (a stuck instance's ages keep growing, a working one's stay
/// small). Evaluated by promtool on series made from these samples.
fn alert_holds(
    alert: &str,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    elapsed: Duration,
) -> bool {
    let expr = alert_expression(alert);
    let names: Vec<&str> = expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("outboxd_"))
        .collect();
    let mut series = String::new();
    for name in names {
        let b = value(after, name);
        let a = before.get(name).copied().unwrap_or(b);
        let per_minute = (b - a) / elapsed.as_secs_f64() * 60.0;
        let step = if per_minute < 0.0 {
            format!("-{:.3}", -per_minute)
        } else {
            format!("+{per_minute:.3}")
        };
        series.push_str(&format!(
            "      - series: '{name}{{job=\"outboxd\", instance=\"a:7464\"}}'\n        values: '{b:.3}{step}x20'\n"
        ));
    }
    let dir = TempDir::new("alert");
    let run = |samples: &str| {
        let test = format!(
            "rule_files: []\ntests:\n  - interval: 1m\n    input_series:\n{series}    promql_expr_test:\n      - expr: count({expr})\n        eval_time: 10m\n        exp_samples:{samples}\n"
        );
        let path = dir.join("test.yml");
        std::fs::write(&path, &test).unwrap();
        let (ok, out) = promtool(&["test", "rules", path.to_str().unwrap()], "");
        (ok, format!("{test}\n{out}"))
    };
    let (holds, out_holds) = run("\n          - labels: '{}'\n            value: 1");
    let (empty, out_empty) = run(" []");
    assert!(
        holds != empty,
        "promtool could not evaluate the expression:\n{out_holds}\n{out_empty}"
    );
    holds
}

/// /readyz's status and body.
async fn readyz(daemon: &Daemon) -> (u16, String) {
    http_get(&format!("{}/readyz", daemon.admin)).await
}

const FAST_GAUGES: (&str, &str) = ("OUTBOXD_METRICS__REFRESH_INTERVAL", "1s");

#[tokio::test(flavor = "multi_thread")]
async fn a_privilege_revoked_mid_run_makes_the_instance_not_ready_and_granting_it_back_recovers_it()
{
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    endpoint(&db, &receiver).await;
    let (role, url) = daemon_role(&db).await;
    let daemon = Daemon::start(&db, &[("OUTBOXD_DATABASE__URL", &url), FAST_GAUGES]).await;
    assert_eq!(readyz(&daemon).await.0, 200);
    let admin = db.client().await;

    admin
        .batch_execute(&format!("REVOKE UPDATE ON outbox.events FROM {role}"))
        .await
        .unwrap();
    enqueue(&db, 1).await;
    daemon
        .wait_for_log("permission denied for table events", SECS(10))
        .await;
    eventually("/readyz to say that claims fail", SECS(60), || async {
        let (status, body) = readyz(&daemon).await;
        status == 503
            && body.contains("no claim has succeeded")
            && body.contains("permission denied")
    })
    .await;
    let before = scrape(&daemon).await;
    let started = std::time::Instant::now();
    eventually("the claim age to grow", SECS(10), || async {
        value(&scrape(&daemon).await, "outboxd_last_claim_age_seconds")
            > value(&before, "outboxd_last_claim_age_seconds") + 2.0
    })
    .await;
    let after = scrape(&daemon).await;
    assert!(value(&after, "outboxd_last_claim_age_seconds") > 30.0);
    assert!(value(&after, "outboxd_oldest_due_event_age_seconds") > 0.0);
    assert!(
        alert_holds("OutboxdInstanceStuck", &before, &after, started.elapsed()),
        "the alert's expression should hold on {after:?}"
    );
    assert_eq!(receiver.received().len(), 0);

    // Granted back: it claims again by itself.
    admin
        .batch_execute(&format!("GRANT UPDATE ON outbox.events TO {role}"))
        .await
        .unwrap();
    receiver.wait_for(1, SECS(15)).await;
    eventually("/readyz to recover", SECS(10), || async {
        readyz(&daemon).await.0 == 200
    })
    .await;
    let before = scrape(&daemon).await;
    let started = std::time::Instant::now();
    tokio::time::sleep(SECS(2)).await; // two scrapes apart, nothing awaited
    let after = scrape(&daemon).await;
    assert!(value(&after, "outboxd_last_claim_age_seconds") < 5.0);
    assert!(!alert_holds(
        "OutboxdInstanceStuck",
        &before,
        &after,
        started.elapsed()
    ));
    assert!(daemon.stop().await.success());
    drop_role(&db, &role).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_a_trigger_refuses_is_set_aside_claims_pause_and_it_is_written_once_the_trigger_is_gone()
 {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    endpoint(&db, &receiver).await;
    let daemon = Daemon::start(&db, &[FAST_GAUGES]).await;
    let admin = db.client().await;
    // An audit trigger that refuses one change only: marking delivered.
    // Claims go through; the outcome of the delivery does not.
    admin
        .batch_execute(
            "CREATE FUNCTION public.no_delivered() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'audit: deliveries are frozen'; END $$;
             CREATE TRIGGER freeze_deliveries BEFORE UPDATE ON outbox.events FOR EACH ROW
               WHEN (NEW.state = 'delivered') EXECUTE FUNCTION public.no_delivered();",
        )
        .await
        .unwrap();
    enqueue(&db, 1).await;
    receiver.wait_for(1, SECS(15)).await;
    daemon
        .wait_for_log("set aside and tried again", SECS(10))
        .await;
    let (status, body) = readyz(&daemon).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("1 delivery outcome(s) could not be recorded")
            && body.contains("audit: deliveries are frozen"),
        "{body}"
    );
    let before = scrape(&daemon).await;
    assert_eq!(value(&before, "outboxd_outcomes_set_aside"), 1.0);
    assert_eq!(value(&before, "outboxd_outcomes_set_aside_total"), 1.0);
    assert!(value(&before, "outboxd_oldest_unrecorded_outcome_age_seconds") > 0.0);

    // Nothing can be recorded, so nothing more is claimed: an event
    // enqueued now waits, through a whole retry round of the one set aside.
    daemon.wait_for_log("claiming is paused", SECS(10)).await;
    enqueue(&db, 2).await;
    let errors = |all: &BTreeMap<String, f64>| {
        value(all, "outboxd_database_errors_total{operation=\"record\"}")
    };
    let errors_then = errors(&scrape(&daemon).await);
    eventually(
        "a retry round of the outcome set aside",
        SECS(15),
        || async { errors(&scrape(&daemon).await) > errors_then },
    )
    .await;
    let started = std::time::Instant::now();
    let unclaimed = count(
        &admin,
        "SELECT count(*) FROM outbox.events WHERE payload->>'paymentId' = '2' AND attempts = 0",
    )
    .await;
    assert_eq!(
        unclaimed, 1,
        "the second event was claimed while nothing could be recorded"
    );
    let after = scrape(&daemon).await;
    assert!(
        alert_holds(
            "OutboxdInstanceStuck",
            &before,
            &after,
            started.elapsed().max(SECS(1))
        ),
        "the alert's expression should hold on {after:?}"
    );

    // The trigger dropped: the outcome set aside is written at its next
    // try, claims resume, and each event reached the receiver once.
    admin
        .batch_execute("DROP TRIGGER freeze_deliveries ON outbox.events")
        .await
        .unwrap();
    daemon.wait_for_log("recorded after all", SECS(15)).await;
    receiver.wait_for(2, SECS(15)).await;
    eventually("both events delivered", SECS(15), || async {
        count(
            &admin,
            "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
        )
        .await
            == 2
    })
    .await;
    eventually("/readyz to recover", SECS(10), || async {
        readyz(&daemon).await.0 == 200
    })
    .await;
    let keys: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap_or_default().to_string())
        .collect();
    assert_eq!(keys.len(), 2, "each event once: {keys:?}");
    assert_ne!(keys[0], keys[1]);
    assert_eq!(
        value(&scrape(&daemon).await, "outboxd_outcomes_set_aside"),
        0.0
    );
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_binarys_migration_under_a_running_daemon_stops_it_with_exit_code_3() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    endpoint(&db, &receiver).await;
    let mut daemon = Daemon::start(&db, &[]).await;
    let latest = outboxd::store::migrate::latest_version();
    // What a newer outboxd's `migrate` could do: rename a column this
    // binary's claim reads, and record its version.
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER TABLE outbox.events RENAME COLUMN last_error TO last_failure;
             INSERT INTO outbox.schema_migrations (version, name, checksum)
             VALUES ({}, 'from_the_future', 'x');",
            latest + 1
        ))
        .await
        .unwrap();
    enqueue(&db, 1).await;
    let status = daemon.wait(SECS(30)).await;
    assert_eq!(status.code(), Some(3), "{:#?}", daemon.log());
    let log = daemon.log().join("\n");
    assert!(
        log.contains("newer than this outboxd knows") && log.contains("systemd does not restart"),
        "{log}"
    );
    assert_eq!(receiver.received().len(), 0);
}
