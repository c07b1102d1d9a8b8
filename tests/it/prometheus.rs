//! The shipped alert rules in a real Prometheus (Debian's `prometheus`
//! package; `scripts/test` installs it) that scrapes a real daemon: what
//! pages and what does not, as the on-call would live it. The rules are
//! read by Prometheus from `dashboards/alerts.yml` itself, and their
//! expressions are taken from what it loaded (`/api/v1/rules`), so the
//! test follows the file. Waiting out a rule's `for:` would take minutes:
//! the test asks instead whether the expression holds (an instant query)
//! and whether the rule has become pending (`/api/v1/alerts`), which is
//! what turns into a page once `for:` has passed.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Daemon, TempDir, TestDb, count, eventually, http_get, repo_root};
use crate::receiver::{Receiver, Reply};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The page for a backlog outboxd does not get through.
const PAGE: &str = "OutboxdOldestDueEventTooOld";
/// The ticket for events held long by their endpoint.
const HELD_TICKET: &str = "OutboxdEventsHeldLong";

/// A `prometheus` server scraping one target as job `outboxd` every second
/// and evaluating the shipped rules every second; killed when dropped.
struct Prometheus {
    _child: tokio::process::Child,
    _dir: TempDir,
    /// `http://127.0.0.1:PORT`
    url: String,
}

impl Prometheus {
    async fn start(target: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let rules = repo_root().join("dashboards/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: outboxd\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        // A port of its own: tests run side by side.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/test installs it)");
        let prometheus = Prometheus {
            _child: child,
            _dir: dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        let ready = format!("{}/-/ready", prometheus.url);
        eventually("prometheus to be ready", SECS(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
                && http_get(&ready).await.0 == 200
        })
        .await;
        prometheus
    }

    /// `data` of a GET on the HTTP API.
    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(&format!("{}{path}", self.url)).await;
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, &answer["status"]),
            (200, &json!("success")),
            "{body}"
        );
        answer["data"].clone()
    }

    /// An instant query: each series' labels and value.
    async fn query(&self, expr: &str) -> Vec<(Value, f64)> {
        let data = self
            .api(&format!("/api/v1/query?query={}", percent_encoded(expr)))
            .await;
        assert_eq!(data["resultType"], "vector", "{data}");
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["metric"].clone(),
                    s["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }

    /// The expression of the alerting rule `name`, as Prometheus loaded it
    /// from the shipped file.
    async fn rule_expr(&self, name: &str) -> String {
        let data = self.api("/api/v1/rules?type=alert").await;
        data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no rule {name} loaded: {data}"))["query"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The state of `name` in `/api/v1/alerts` (pending or firing), None if
    /// its expression does not hold.
    async fn alert_state(&self, name: &str) -> Option<String> {
        let data = self.api("/api/v1/alerts").await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap().to_string())
    }
}

/// `s` for a URL's query string.
fn percent_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Company 1's endpoint refuses connections (nothing listens on its port),
/// its circuit opens and holds its 30 events, enqueued 13 hours earlier;
/// company 2 delivers normally. Prometheus, with the shipped rules, sees the
/// ticket for held events and no page. Then claims stop (a trigger refuses
/// every lease, as a broken deploy of the application's schema might) while
/// company 2's events, enqueued 20 minutes earlier, are due: that backlog is
/// outboxd's to clear, and the page's expression holds.
#[tokio::test(flavor = "multi_thread")]
async fn one_dead_tenant_does_not_page_and_a_backlog_no_instance_claims_does() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let healthy =
        Receiver::start(|_, _| Reply::Json(200, json!({"status": "1", "message": "ok"}))).await;
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES (1, $1), (2, $2)",
            &[
                &format!("http://127.0.0.1:{dead_port}/erp"),
                &healthy.url("/erp"),
            ],
        )
        .await
        .unwrap();
    // The dead tenant's events, from before its outage was noticed. The
    // enqueue functions stamp now(): the age is set by hand, as setup.
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, g, 'P' || g) FROM generate_series(1, 30) g;
             UPDATE outbox.events SET created_at = now() - interval '13 hours' WHERE company_id = 1;",
        )
        .await
        .unwrap();
    let daemon = Daemon::start(
        &db,
        &[
            ("OUTBOXD_METRICS__REFRESH_INTERVAL", "200ms"),
            ("OUTBOXD_DELIVERY__POLL_INTERVAL", "100ms"),
            ("OUTBOXD_RETRY__BASE_DELAY", "100ms"),
            ("OUTBOXD_RETRY__JITTER", "0"),
            ("OUTBOXD_CIRCUIT__OPEN_AFTER", "3"),
            // No probe while the test runs: the circuit stays open.
            ("OUTBOXD_CIRCUIT__COOLDOWN", "1h"),
            ("OUTBOXD_CIRCUIT__MAX_COOLDOWN", "1h"),
        ],
    )
    .await;
    let target = daemon.admin.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&target).await;
    let page = prometheus.rule_expr(PAGE).await;
    let ticket = prometheus.rule_expr(HELD_TICKET).await;

    // (a) One dead tenant, one that delivers.
    eventually("company 1's circuit to open", SECS(15), || async {
        count(
            &client,
            "SELECT count(*) FROM outbox.endpoint_circuits WHERE company_id = 1 AND state = 'open'",
        )
        .await
            == 1
    })
    .await;
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(2, 1, 'A1')")
        .await
        .unwrap();
    healthy.wait_for(1, SECS(10)).await;
    // Prometheus has scraped the held endpoint, and evaluated the rules on
    // it: the ticket's expression holds (1 endpoint) and its rule is pending.
    eventually("the held-events ticket to be pending", SECS(20), || async {
        prometheus.alert_state(HELD_TICKET).await.as_deref() == Some("pending")
    })
    .await;
    let held = prometheus.query(&ticket).await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].1, 1.0, "one endpoint holds events: {held:?}");
    let gauges = |name: &str| format!("max by (job) ({name}{{job=\"outboxd\"}})");
    let scraped = prometheus.query(&gauges("outboxd_events_held")).await;
    assert_eq!(scraped[0].1, 30.0, "{scraped:?}");
    let age = prometheus
        .query(&gauges("outboxd_oldest_held_event_age_seconds"))
        .await;
    assert!(age[0].1 > 13.0 * 3600.0, "{age:?}");
    let paging = prometheus.query(&page).await;
    assert!(
        paging.is_empty(),
        "one tenant's outage would page: {paging:?}"
    );
    assert_eq!(prometheus.alert_state(PAGE).await, None);
    // The paging age is scraped, and small: the dead tenant's events are not
    // in it.
    let due = prometheus
        .query(&gauges("outboxd_oldest_due_event_age_seconds"))
        .await;
    assert_eq!(due.len(), 1, "{due:?}");
    assert!(due[0].1 < 600.0, "{due:?}");

    // (b) No instance claims: a real backlog, beside the held one.
    client
        .batch_execute(
            "CREATE FUNCTION public.refuse_leases() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'leases refused by the test'; END $$;
             CREATE TRIGGER refuse_leases BEFORE UPDATE ON outbox.events
                 FOR EACH ROW WHEN (NEW.state = 'leased') EXECUTE FUNCTION public.refuse_leases();
             BEGIN;
             SELECT outbox.enqueue_payment_cancellation(2, g, 'B' || g) FROM generate_series(2, 6) g;
             UPDATE outbox.events SET created_at = now() - interval '20 minutes'
              WHERE company_id = 2 AND state = 'pending';
             COMMIT;",
        )
        .await
        .unwrap();
    eventually("the page to be pending", SECS(20), || async {
        prometheus.alert_state(PAGE).await.as_deref() == Some("pending")
    })
    .await;
    let paging = prometheus.query(&page).await;
    assert_eq!(paging.len(), 1, "{paging:?}");
    assert!(
        (1200.0..1300.0).contains(&paging[0].1),
        "the backlog's age, not the held events': {paging:?}"
    );
    assert_eq!(healthy.received().len(), 1, "nothing was claimed");
    drop(prometheus);
    drop(daemon);
}
