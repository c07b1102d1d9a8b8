//! The operator CLI run as real processes against real databases: endpoint
//! settings and test requests, enqueue, the schema check, completions and the
//! man page. Events and status are in `ops_cli/events.rs`. Invalid input
//! (exit 2, the problem named, nothing changed) is in `ops_cli/invalid.rs`.

mod events;
mod invalid;

use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use tokio_postgres::Client;

use crate::harness::{Ran, TempDir, TestDb, run};
use crate::receiver::{Receiver, Reply};

/// Runs `outboxd` against `db` with `line` split at whitespace (no quoting:
/// tests pass arguments with spaces through `run` directly).
pub async fn outboxd(db: &TestDb, line: &str) -> Ran {
    run(db.outboxd().args(line.split_whitespace())).await
}

/// Asserts the exit code and that stdout holds each of `want`.
#[track_caller]
pub fn expect(ran: &Ran, code: i32, want: &[&str]) {
    assert_eq!(ran.code, Some(code), "{ran:?}");
    for w in want {
        assert!(ran.stdout.contains(w), "{w:?} missing from stdout: {ran:?}");
    }
}

/// Asserts that none of `secrets` was printed, to stdout or stderr.
#[track_caller]
pub fn assert_no_secret(ran: &Ran, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !ran.stdout.contains(secret) && !ran.stderr.contains(secret),
            "{secret} printed: {ran:?}"
        );
    }
}

/// Writes `content` to a file in `dir`; returns its path.
pub fn file(dir: &TempDir, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.to_str().unwrap().to_string()
}

/// Every row of the endpoint and event tables, and the counts of the rest:
/// equal before and after means the command changed nothing.
pub async fn snapshot(client: &Client) -> Vec<String> {
    let row = client
        .query_one(
            "SELECT (SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY company_id, event_type), '[]')
                       FROM outbox.endpoints AS t)::text,
                    (SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY id), '[]')
                       FROM outbox.events AS t)::text,
                    (SELECT count(*) FROM outbox.attempts)::text,
                    (SELECT count(*) FROM outbox.notifications)::text,
                    (SELECT count(*) FROM outbox.emails)::text",
            &[],
        )
        .await
        .unwrap();
    (0..5).map(|i| row.get(i)).collect()
}

/// (url, auth_type, username, password, token, notify_emails, enabled).
type EndpointRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Vec<String>,
    bool,
);

async fn endpoint_row(client: &Client, company: i64, event: &str) -> Option<EndpointRow> {
    let row = client
        .query_opt(
            "SELECT url, auth_type, username, password, token, notify_emails, enabled
               FROM outbox.endpoints WHERE company_id = $1 AND event_type = $2",
            &[&company, &event],
        )
        .await
        .unwrap()?;
    Some((
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
    ))
}

#[tokio::test]
async fn endpoint_set_for_each_auth_type_then_show_and_list_never_print_secrets() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dir = TempDir::new("endpoint-set");
    let password = file(&dir, "password", "basic-SECRET-pw\n");
    let token = file(&dir, "token", "bearer-SECRET-token");
    let secrets = ["SECRET"];

    let basic = outboxd(
        &db,
        &format!(
            "endpoint set --company 6316 --url https://erp.example.com/hooks/pc --auth basic \
             --username sales --password-file {password} \
             --notify ops@example.com,finance@example.com"
        ),
    )
    .await;
    expect(
        &basic,
        0,
        &[
            "created the endpoint of company 6316 for payment.cancellation",
            "auth:    basic (user sales, password set)",
            "notify:  ops@example.com, finance@example.com",
        ],
    );
    assert_no_secret(&basic, &secrets);
    let row = endpoint_row(&client, 6316, "payment.cancellation").await;
    assert_eq!(
        row.unwrap(),
        (
            "https://erp.example.com/hooks/pc".into(),
            "basic".into(),
            Some("sales".into()),
            Some("basic-SECRET-pw".into()), // one trailing newline dropped
            None,
            vec!["ops@example.com".into(), "finance@example.com".into()],
            true
        )
    );

    // Switching to bearer replaces the whole endpoint, password included.
    let bearer = outboxd(
        &db,
        &format!(
            "endpoint set --company 6316 --url https://erp.example.com/hooks/v2 \
             --auth bearer --token-file {token}"
        ),
    )
    .await;
    expect(
        &bearer,
        0,
        &[
            "replaced the endpoint of company 6316",
            "auth:    bearer (token set)",
            "notify:  (none)",
        ],
    );
    assert_no_secret(&bearer, &secrets);
    let row = endpoint_row(&client, 6316, "payment.cancellation")
        .await
        .unwrap();
    assert_eq!(
        (row.1.as_str(), row.2, row.3, row.4.as_deref(), row.5.len()),
        ("bearer", None, None, Some("bearer-SECRET-token"), 0)
    );

    let none = outboxd(
        &db,
        "endpoint set --company 6316 --event invoice.created --url http://127.0.0.1:8808/ --disabled",
    )
    .await;
    expect(&none, 0, &["auth:    none", "enabled: no"]);
    let row = endpoint_row(&client, 6316, "invoice.created")
        .await
        .unwrap();
    assert_eq!((row.1.as_str(), row.6), ("none", false));

    let show = outboxd(&db, "endpoint show --company 6316").await;
    expect(
        &show,
        0,
        &[
            "url:     https://erp.example.com/hooks/v2",
            "auth:    bearer (token set)",
            "created: ",
        ],
    );
    assert_no_secret(&show, &secrets);

    let list = outboxd(&db, "endpoint list").await;
    expect(&list, 0, &[]);
    let lines: Vec<&str> = list.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "header and two endpoints: {list:?}");
    assert!(lines[0].starts_with("company  event type"), "{list:?}");
    assert!(lines[1].contains("invoice.created") && lines[1].contains(" no "));
    assert!(lines[2].contains("payment.cancellation") && lines[2].contains("bearer (token set)"));
    assert_no_secret(&list, &secrets);

    let other = outboxd(&db, "endpoint list --company 7").await;
    expect(&other, 0, &[]);
    assert_eq!(other.stdout, "no endpoints for company 7\n");
}

#[tokio::test]
async fn endpoint_enable_disable_and_remove() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let set = outboxd(
        &db,
        "endpoint set --company 5 --url https://erp.example.com/",
    )
    .await;
    expect(&set, 0, &[]);
    let enabled = || async {
        let row = endpoint_row(&client, 5, "payment.cancellation").await;
        row.map(|r| r.6)
    };

    let off = outboxd(&db, "endpoint disable --company 5").await;
    expect(&off, 0, &[]);
    assert_eq!(
        off.stdout,
        "disabled the endpoint of company 5 for payment.cancellation\n"
    );
    assert_eq!(enabled().await, Some(false));

    let on = outboxd(&db, "endpoint enable --company 5").await;
    expect(&on, 0, &["enabled the endpoint of company 5"]);
    assert_eq!(enabled().await, Some(true));

    let gone = outboxd(&db, "endpoint remove --company 5").await;
    expect(&gone, 0, &["removed the endpoint of company 5"]);
    assert_eq!(enabled().await, None);

    for verb in ["remove", "enable", "disable", "show", "test"] {
        let missing = outboxd(&db, &format!("endpoint {verb} --company 5")).await;
        assert_eq!(missing.code, Some(1), "{verb}: {missing:?}");
        assert!(
            missing
                .stderr
                .contains("outboxd: no endpoint for company 5 and event type payment.cancellation"),
            "{verb}: {missing:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_test_sends_one_marked_request_with_the_endpoint_auth_and_writes_nothing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dir = TempDir::new("endpoint-test");
    let password = file(&dir, "password", "basic-SECRET-pw\n");
    let token = file(&dir, "token", "bearer-SECRET-token\n");
    let ok = Receiver::ok().await;
    let refusing = Receiver::start(|_, _| {
        Reply::Json(200, json!({"status": "0", "error": "unknown company"}))
    })
    .await;
    let url = ok.url("/hooks/pc");
    let basic = outboxd(
        &db,
        &format!(
            "endpoint set --company 6316 --url {url} --auth basic --username sales \
             --password-file {password}"
        ),
    )
    .await;
    expect(&basic, 0, &[]);
    let url = refusing.url("/inv");
    let bearer = outboxd(
        &db,
        &format!(
            "endpoint set --company 6316 --event invoice.created --url {url} --auth bearer \
             --token-file {token} --disabled"
        ),
    )
    .await;
    expect(&bearer, 0, &[]);
    let before = snapshot(&client).await;

    let tested = outboxd(&db, "endpoint test --company 6316").await;
    expect(
        &tested,
        0,
        &["answer:  HTTP 200", "verdict: success", "message: received"],
    );
    let got = ok.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    let request = &got[0];
    assert_eq!(request.path, "/hooks/pc");
    assert_eq!(request.header("outboxd-test"), Some("1"));
    let credentials = base64::engine::general_purpose::STANDARD.encode("sales:basic-SECRET-pw");
    let authorization = format!("Basic {credentials}");
    assert_eq!(
        request.header("authorization"),
        Some(authorization.as_str())
    );
    assert_eq!(
        request.json(),
        json!({"companyId": 6316, "paymentId": 1, "paymentNumber": "OUTBOXD-TEST"})
    );
    let key = request.header("idempotency-key").unwrap();
    assert_eq!(request.header("webhook-id"), Some(key));
    assert!(
        tested.stdout.contains(key),
        "the test id is shown: {tested:?}"
    );
    assert_no_secret(&tested, &["SECRET", &credentials]);

    // A refusal is reported, another event type gets the generic body, and
    // a disabled endpoint is tested all the same.
    let refused = outboxd(&db, "endpoint test --company 6316 --event invoice.created").await;
    expect(
        &refused,
        1,
        &["disabled", "verdict: rejected", "message: unknown company"],
    );
    assert!(
        refused.stderr.contains("did not accept the test request"),
        "{refused:?}"
    );
    let got = refusing.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].header("outboxd-test"), Some("1"));
    assert_eq!(
        got[0].header("authorization"),
        Some("Bearer bearer-SECRET-token")
    );
    assert_eq!(got[0].json(), json!({"test": true}));
    assert_no_secret(&refused, &["SECRET"]);

    assert_eq!(
        snapshot(&client).await,
        before,
        "a test request writes nothing"
    );
}

#[tokio::test]
async fn enqueue_calls_the_sql_function_and_prints_the_event_id() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let with_orders = outboxd(
        &db,
        "enqueue payment-cancellation --company 6316 --payment 222125 --number 2271 \
         --orders 17899,17900",
    )
    .await;
    let without = outboxd(
        &db,
        "enqueue payment-cancellation --company 6316 --payment 222126 --number 2272",
    )
    .await;
    for (ran, payload) in [
        (
            &with_orders,
            json!({"companyId": 6316, "paymentId": 222125, "paymentNumber": "2271",
                   "orderIds": "17899,17900"}),
        ),
        (
            &without,
            json!({"companyId": 6316, "paymentId": 222126, "paymentNumber": "2272"}),
        ),
    ] {
        expect(ran, 0, &[]);
        let id: uuid::Uuid = ran.stdout.trim().parse().expect("only the event id");
        let row = client
            .query_one(
                "SELECT event_type, company_id, payload, state FROM outbox.events WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let got: (String, i64, serde_json::Value, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(
            got,
            (
                "payment.cancellation".into(),
                6316,
                payload,
                "pending".into()
            )
        );
    }
}

#[tokio::test]
async fn operator_commands_refuse_an_unmigrated_database() {
    let db = TestDb::empty().await;
    for line in [
        "status",
        "events list",
        "endpoint list",
        "endpoint set --company 1 --url https://erp.example.com/",
        "enqueue payment-cancellation --company 1 --payment 1 --number 1",
    ] {
        let ran = outboxd(&db, line).await;
        assert_eq!(ran.code, Some(3), "{line}: {ran:?}");
        assert!(
            ran.stderr.contains("run `outboxd migrate`"),
            "{line}: {ran:?}"
        );
    }
    let schema: bool = db
        .client()
        .await
        .query_one("SELECT to_regnamespace('outbox') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!schema, "nothing was created");
}

#[tokio::test]
async fn completions_and_man_pages_need_neither_config_nor_database() {
    let bare = |line: &str| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
        cmd.env("OUTBOXD_CONFIG", "/nonexistent/config.toml")
            .env("OUTBOXD_DATABASE__URL", "not a url")
            .args(line.split_whitespace());
        cmd
    };
    let bash = run(&mut bare("completions bash")).await;
    expect(
        &bash,
        0,
        &[
            "_outboxd()",
            "complete -F _outboxd",
            "--out-dir",
            "--password-file",
        ],
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let ran = run(&mut bare(&format!("completions {shell}"))).await;
        expect(&ran, 0, &["outboxd", "migrate"]);
    }
    let bad = run(&mut bare("completions tcsh")).await;
    assert_eq!(bad.code, Some(2), "{bad:?}");

    let man = run(&mut bare("man")).await;
    expect(&man, 0, &["completions", "migrate"]);
    // clap_mangen opens with two lines defining the apostrophe string (.ie
    // and .el); the page proper starts with .TH.
    let first = man
        .stdout
        .lines()
        .find(|l| !l.starts_with(".ie") && !l.starts_with(".el"));
    assert!(first.unwrap().starts_with(".TH outboxd 1"), "{man:?}");

    let dir = TempDir::new("man");
    let out_dir = dir.0.to_str().unwrap();
    let pages = run(&mut bare(&format!("man --out-dir {out_dir}"))).await;
    expect(&pages, 0, &[]);
    for page in [
        "outboxd.1",
        "outboxd-migrate.1",
        "outboxd-completions.1",
        "outboxd-endpoint-set.1",
    ] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
}
