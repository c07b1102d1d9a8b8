//! What SREs and systemd see: /metrics, /readyz, the notify protocol, and
//! the checks on the shipped unit files and alert rules.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Daemon, TempDir, TestDb, eventually, http_get, repo_root};
use crate::proxy::Proxy;
use crate::receiver::{Receiver, Reply};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Points company 1 at `receiver` and enqueues one payment cancellation.
async fn send_one_event_to(db: &TestDb, receiver: &Receiver) {
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES (1, $1)",
            &[&receiver.url("/")],
        )
        .await
        .unwrap();
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(1, 1, '1')")
        .await
        .unwrap();
}

/// Parses a text exposition into `name{sorted labels}` -> value.
pub(crate) fn samples(exposition: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in exposition.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_string(),
        };
        out.insert(key, value.parse().unwrap());
    }
    out
}

fn sample(all: &BTreeMap<String, f64>, key: &str) -> f64 {
    *all.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have:\n{:#?}", all.keys()))
}

/// Runs `promtool` with `args`, feeding `stdin`; returns (success, output).
pub(crate) fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_was_delivered_failed_and_retried() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|req, nth| match req.path.as_str() {
        "/reject" => Reply::Json(200, json!({"status": "0", "error": "no such payment"})),
        "/flaky" if nth == 1 => Reply::Json(503, json!({"status": "0", "error": "busy"})),
        _ => Reply::Json(200, json!({"status": "1", "message": "ok"})),
    })
    .await;
    for (company, path) in [(1_i64, "/ok"), (2, "/reject"), (3, "/flaky")] {
        client
            .execute(
                "INSERT INTO outbox.endpoints (company_id, url) VALUES ($1, $2)",
                &[&company, &receiver.url(path)],
            )
            .await
            .unwrap();
    }
    let daemon = Daemon::start(
        &db,
        &[
            ("OUTBOXD_RETRY__BASE_DELAY", "100ms"),
            ("OUTBOXD_RETRY__JITTER", "0"),
            ("OUTBOXD_METRICS__REFRESH_INTERVAL", "100ms"),
        ],
    )
    .await;
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, 1, '1');
             SELECT outbox.enqueue_payment_cancellation(2, 2, '2');
             SELECT outbox.enqueue_payment_cancellation(3, 3, '3');",
        )
        .await
        .unwrap();
    let metrics_url = format!("{}/metrics", daemon.admin);
    eventually("the metrics to show all three events final", SECS(15), || async {
        let all = samples(&http_get(&metrics_url).await.1);
        all.get("outboxd_events_completed_total{event_type=\"payment.cancellation\",state=\"delivered\"}")
            == Some(&2.0)
            && all.get("outboxd_events_completed_total{event_type=\"payment.cancellation\",state=\"failed\"}")
                == Some(&1.0)
            && all.get("outboxd_events_pending") == Some(&0.0)
    })
    .await;
    let (status, exposition) = http_get(&metrics_url).await;
    assert_eq!(status, 200);
    let all = samples(&exposition);
    let pc = "event_type=\"payment.cancellation\"";
    assert_eq!(
        sample(&all, &format!("outboxd_events_retried_total{{{pc}}}")),
        1.0
    );
    for (outcome, n) in [("success", 2.0), ("rejected", 1.0), ("retryable", 1.0)] {
        assert_eq!(
            sample(
                &all,
                &format!("outboxd_delivery_attempts_total{{{pc},outcome=\"{outcome}\"}}")
            ),
            n,
            "{outcome}"
        );
    }
    assert_eq!(
        sample(&all, &format!("outboxd_delivery_lag_seconds_count{{{pc}}}")),
        2.0
    );
    assert_eq!(sample(&all, "outboxd_oldest_due_event_age_seconds"), 0.0);
    assert!(sample(&all, "outboxd_wakeups_total{source=\"notify\"}") >= 1.0);
    assert_eq!(
        sample(
            &all,
            &format!(
                "outboxd_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    // Issue 15.6: the process, the pool, and when the queue gauges were
    // last refreshed (a Unix time of this minute, not 0).
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_threads",
        "process_start_time_seconds",
        "outboxd_db_pool_max_connections",
        "outboxd_db_pool_waiting",
        "outboxd_db_pool_connections{state=\"in_use\"}",
        "outboxd_db_pool_connections{state=\"idle\"}",
    ] {
        assert!(all.contains_key(name), "{name} missing:\n{exposition}");
    }
    assert!(sample(&all, "process_resident_memory_bytes") > 1e6);
    assert_eq!(sample(&all, "outboxd_db_pool_max_connections"), 4.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let refreshed = sample(&all, "outboxd_queue_gauges_refreshed_timestamp_seconds");
    assert!(
        (now - refreshed).abs() < 60.0,
        "refreshed at {refreshed}, now {now}"
    );
    // Bounded labels: nothing per company or URL.
    assert!(!exposition.contains("company"), "{exposition}");
    assert!(!exposition.contains("127.0.0.1"), "{exposition}");

    let (ok, out) = promtool(&["check", "metrics"], &exposition);
    assert!(ok, "promtool check metrics:\n{out}");

    let (status, body) = http_get(&format!("{}/healthz", daemon.admin)).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_fails_while_the_database_is_unreachable_and_recovers() {
    let db = TestDb::new().await;
    let (proxy, via_proxy) = Proxy::in_front_of(&db).await;
    let daemon = Daemon::start(
        &db,
        &[
            ("OUTBOXD_DATABASE__URL", via_proxy.as_str()),
            ("OUTBOXD_DATABASE__CONNECT_TIMEOUT", "1s"),
        ],
    )
    .await;
    let readyz = format!("{}/readyz", daemon.admin);
    assert_eq!(http_get(&readyz).await.0, 200);

    proxy.cut();
    eventually("/readyz to report the outage", SECS(15), || async {
        let (status, body) = http_get(&readyz).await;
        status == 503 && body.contains("not ready")
    })
    .await;
    let (_, body) = http_get(&readyz).await;
    assert!(
        body.contains("database") || body.contains("LISTEN"),
        "{body}"
    );
    // Alive all the same.
    assert_eq!(http_get(&format!("{}/healthz", daemon.admin)).await.0, 200);

    proxy.restore().await;
    eventually("/readyz to recover", SECS(30), || async {
        http_get(&readyz).await.0 == 200
    })
    .await;
    // And it delivers again.
    let receiver = Receiver::ok().await;
    send_one_event_to(&db, &receiver).await;
    receiver.wait_for(1, SECS(15)).await;
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_gets_ready_watchdog_pings_and_stopping() {
    let db = TestDb::new().await;
    let dir = TempDir::new("notify-socket");
    let path = dir.join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
    let socket_path = path.to_str().unwrap().to_string();
    let mut daemon = Daemon::start(
        &db,
        &[
            ("NOTIFY_SOCKET", socket_path.as_str()),
            // 2 s: pings every 250 ms.
            ("WATCHDOG_USEC", "2000000"),
        ],
    )
    .await;
    let mut buf = vec![0u8; 4096];
    let mut recv = async || -> String {
        let n = tokio::time::timeout(SECS(10), socket.recv(&mut buf))
            .await
            .expect("no message from outboxd within 10 s")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut messages = Vec::new();
    while messages
        .iter()
        .filter(|m: &&String| m.contains("WATCHDOG=1"))
        .count()
        < 3
    {
        messages.push(recv().await);
    }
    assert!(
        messages.iter().position(|m| m.contains("READY=1"))
            < messages.iter().position(|m| m.contains("WATCHDOG=1")),
        "READY=1 first: {messages:?}"
    );
    daemon.signal(libc::SIGTERM);
    loop {
        let m = recv().await;
        if m.contains("STOPPING=1") {
            break;
        }
    }
    assert!(daemon.wait(SECS(20)).await.success());
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    // systemd-analyze checks that ExecStart= exists, so the units are
    // checked with the path of the binary this test built.
    // Documentation= names man:outboxd(1): the man pages are written by
    // the binary (as the package does) where MANPATH points.
    let dir = TempDir::new("units");
    let man = dir.join("man");
    std::fs::create_dir_all(man.join("man1")).unwrap();
    let wrote = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .arg("man")
        .arg("--out-dir")
        .arg(man.join("man1"))
        .output()
        .unwrap();
    assert!(wrote.status.success(), "{wrote:?}");
    let units = [
        "outboxd.service",
        "outboxd-migrate.service",
        "outboxd@.service",
    ];
    for unit in units {
        let text = std::fs::read_to_string(repo_root().join("systemd").join(unit)).unwrap();
        std::fs::write(
            dir.join(unit),
            text.replace("/usr/bin/outboxd", env!("CARGO_BIN_EXE_outboxd")),
        )
        .unwrap();
    }
    let out = std::process::Command::new("systemd-analyze")
        .args([
            "verify",
            "outboxd.service",
            "outboxd-migrate.service",
            "outboxd@2.service",
        ])
        .env("MANPATH", &man)
        .current_dir(&dir.0)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    let unit = std::fs::read_to_string(repo_root().join("systemd/outboxd.service")).unwrap();
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=2 3",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(want), "{want}");
    }
}

/// The unit's stop timeout covers the daemon's worst-case stop with the
/// shipped configuration, and its comment quotes that budget.
#[test]
fn the_unit_stop_timeout_covers_the_stop_budget() {
    let unit = std::fs::read_to_string(repo_root().join("systemd/outboxd.service")).unwrap();
    let timeout = crate::harness::unit_stop_timeout();
    let config = outboxd::config::load(Some(&repo_root().join("config.toml"))).unwrap();
    let budget = outboxd::engine::stop_budget(&config);
    assert!(
        budget + SECS(10) <= timeout,
        "stop budget {budget:?} + 10 s margin exceeds TimeoutStopSec={timeout:?}"
    );
    let quoted = format!("at most {}s with the defaults", budget.as_secs());
    assert!(
        unit.contains(&quoted),
        "the unit's comment should say {quoted:?}"
    );
}

#[test]
fn the_alert_rules_pass_promtool() {
    let (ok, out) = promtool(&["check", "rules", "dashboards/alerts.yml"], "");
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "dashboards/alerts_test.yml"], "");
    assert!(ok, "{out}");
}

/// Every query of the Grafana dashboard is valid PromQL (promtool checks
/// each as a recording rule, Grafana's variables replaced by values) and
/// names only metrics that outboxd exports (`src/telemetry.rs`), so a
/// renamed metric or a typo shows as a failed test, not an empty panel.
#[test]
fn the_dashboards_queries_parse_and_name_only_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("dashboards/outboxd.json")).unwrap(),
    )
    .unwrap();
    let telemetry = std::fs::read_to_string(repo_root().join("src/telemetry.rs")).unwrap();
    let mut exprs = Vec::new();
    let mut panels: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() > 40, "{} queries", exprs.len());
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$__interval", "1m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "  - record: dashboard:query{i}\n    expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("outboxd_"))
        {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                telemetry.contains(&format!("\"{base}\"")),
                "the dashboard reads {name}, which outboxd does not export: {expr}"
            );
        }
    }
    let dir = TempDir::new("dashboard");
    let file = dir.join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let (ok, out) = promtool(&["check", "rules", file.to_str().unwrap()], "");
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_log_level_and_keeps_it_on_a_bad_file() {
    let db = TestDb::new().await;
    let dir = TempDir::new("sighup");
    let file = dir.join("config.toml");
    let config = |level: &str| {
        format!(
            "[database]\nurl = \"{}\"\n[log]\nlevel = \"{level}\"\n",
            db.url
        )
    };
    std::fs::write(&file, config("info")).unwrap();
    // No RUST_LOG here: it would take precedence over log.level.
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOXD_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.arg("--config").arg(&file).kill_on_drop(true);
    let daemon = Daemon::spawn(cmd).await;
    let receiver = Receiver::ok().await;
    send_one_event_to(&db, &receiver).await;
    receiver.wait_for(1, SECS(10)).await;
    assert!(
        !daemon.log().iter().any(|l| l.contains("DEBUG")),
        "debug lines at level info"
    );

    std::fs::write(&file, config("debug")).unwrap();
    daemon.signal(libc::SIGHUP);
    daemon
        .wait_for_log("SIGHUP: reloaded log.level", SECS(10))
        .await;
    db.client()
        .await
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(1, 2, '2')")
        .await
        .unwrap();
    daemon.wait_for_log("claimed due events", SECS(10)).await;

    std::fs::write(&file, "[log]\nlevel = \"outboxd=loud\"\n").unwrap();
    daemon.signal(libc::SIGHUP);
    daemon
        .wait_for_log("keeping the current settings", SECS(10))
        .await;
    assert!(
        daemon.stop().await.success(),
        "SIGHUP must not stop the daemon"
    );
}

/// The server this suite runs on decides which side is checked: the
/// development VM's PostgreSQL runs without autovacuum, a private cluster
/// with it.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_warns_at_start_when_autovacuum_is_off() {
    let db = TestDb::new().await;
    let off = !outboxd::store::server::autovacuum_runs(&db.client().await)
        .await
        .unwrap();
    let daemon = Daemon::start(&db, &[]).await;
    let warned = daemon
        .log()
        .iter()
        .any(|l| l.contains("WARN") && l.contains("autovacuum is off"));
    assert_eq!(
        warned,
        off,
        "autovacuum off: {off}; log:\n{}",
        daemon.log().join("\n")
    );
    daemon.stop().await;
}

/// Nothing in flight, nothing to wait for: SIGTERM ends the process at once
/// (the listener's wait for a notification is dropped, not waited out), and
/// no service is reported as abandoned.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_daemon_stops_at_once() {
    let db = TestDb::new().await;
    let mut daemon = Daemon::start(&db, &[]).await;
    let asked = std::time::Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait(SECS(10)).await;
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_millis(900),
        "an idle stop took {took:?}"
    );
    let log = daemon.log();
    assert!(
        !log.iter().any(|l| l.contains("abandoned a tick")),
        "{}",
        log.join("\n")
    );
}

/// Issue 15.4: with `log.format = "journald"` every line starts with its
/// syslog priority, which the journal reads (`journalctl -p warning`):
/// errors `<3>`, warnings `<4>`, info `<6>`, debug `<7>`. The error is
/// staged: a trigger makes the database refuse an outcome's text, which the
/// recorder logs as an error before writing it again without it.
#[tokio::test(flavor = "multi_thread")]
async fn journald_lines_carry_their_priorities() {
    let db = TestDb::new().await;
    let client = db.client().await;
    crate::faults::refuse_poison(&client, false).await;
    let receiver = Receiver::start(|_, _| {
        Reply::Json(200, json!({"status": "1", "message": "POISON accepted"}))
    })
    .await;
    let daemon = Daemon::start(&db, &[("OUTBOXD_LOG__FORMAT", "journald")]).await;
    send_one_event_to(&db, &receiver).await;
    daemon
        .wait_for_log("an outcome's texts were refused", SECS(15))
        .await;
    let log = daemon.log();
    let with = |needle: &str| -> String {
        log.iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in {log:#?}"))
            .clone()
    };
    assert!(with("a group of outcomes was refused").starts_with("<3>"));
    assert!(with("an outcome's texts were refused").starts_with("<4>"));
    assert!(with("smtp.host is not set").starts_with("<4>"));
    assert!(with("outboxd is delivering").starts_with("<6>"));
    assert!(with("claimed due events").starts_with("<7>"));
    let unprefixed: Vec<&String> = log
        .iter()
        .filter(|l| {
            !["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    assert!(
        unprefixed.is_empty(),
        "lines without a priority: {unprefixed:#?}"
    );
    assert!(daemon.stop().await.success());
}

/// Issue 15.4: under systemd, stderr is the journal (JOURNAL_STREAM names
/// its device and inode) and text lines get their priority by themselves.
/// Here stderr is a file and JOURNAL_STREAM names that file.
#[tokio::test]
async fn text_logs_carry_priorities_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let db = TestDb::new().await;
    let dir = TempDir::new("journal-stream");
    let path = dir.join("stderr");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    // `outboxd check` with a non-setting variable, so that it warns; its
    // stderr goes to `file`; returns what it wrote there.
    let check = |file: std::fs::File, path: std::path::PathBuf| {
        let mut cmd = db.outboxd();
        cmd.env("JOURNAL_STREAM", &stream)
            .env("OUTBOXD_PORT", "tcp://10.0.0.1:80")
            .arg("check")
            .stdout(std::process::Stdio::null())
            .stderr(file);
        async move {
            assert!(cmd.status().await.unwrap().success());
            std::fs::read_to_string(path).unwrap()
        }
    };
    let written = check(file, path).await;
    let warning = written
        .lines()
        .find(|l| l.contains("ignoring OUTBOXD_ variables"))
        .unwrap_or_else(|| panic!("no warning in {written:?}"));
    assert!(warning.starts_with("<4>"), "{written:?}");

    // Another stream (stderr is not the journal): plain text.
    let other = dir.join("other");
    let written = check(std::fs::File::create(&other).unwrap(), other).await;
    assert!(
        written.contains("ignoring OUTBOXD_ variables"),
        "{written:?}"
    );
    assert!(written.lines().all(|l| !l.starts_with('<')), "{written:?}");
}
