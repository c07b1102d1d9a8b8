//! Invalid operator input: exit 2, a message naming the flag and the
//! problem, no secret echoed, and the database exactly as before. Also the
//! CLI's own email and URL rules checked against the schema's functions.

use super::{assert_no_secret, expect, file, outboxd, snapshot};
use crate::harness::{TempDir, TestDb, run};

#[tokio::test]
async fn invalid_input_exits_2_names_the_problem_and_changes_nothing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dir = TempDir::new("invalid-input");
    let password = file(&dir, "password", "pw-SECRET");
    let token = file(&dir, "token", "tok-SECRET");
    let broken = file(&dir, "broken", "tok\nline-SECRET\n");
    let empty = file(&dir, "empty", "\n");
    let set = outboxd(
        &db,
        &format!(
            "endpoint set --company 6316 --url https://erp.example.com/ --auth basic \
             --username sales --password-file {password} --notify ops@example.com"
        ),
    )
    .await;
    expect(&set, 0, &[]);
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(6316, 1, '1')",
            &[],
        )
        .await
        .unwrap();
    let before = snapshot(&client).await;

    let set = "endpoint set --company 6316";
    let url = "--url https://erp.example.com/v2";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{set} {url} --notify a@x.com,b@x.com,c@x.com,d@x.com,e@x.com,f@x.com"),
            "outboxd: --notify: at most 5 addresses are allowed, got 6",
        ),
        (
            format!("{set} {url} --notify ops@example"),
            "outboxd: --notify: \"ops@example\" is not a valid email address",
        ),
        (
            format!("{set} --url ftp://erp.example.com/"),
            "outboxd: --url: the scheme must be http or https, not \"ftp\"",
        ),
        (
            format!("{set} --url https://sales:pw-SECRET@erp.example.com/"),
            "outboxd: --url: must not carry credentials",
        ),
        (
            format!("{set} {url} --auth basic --username sales"),
            "outboxd: --password-file: --auth basic needs a file holding the password",
        ),
        (
            format!("{set} {url} --auth basic --username sales --password-file {empty}"),
            "is empty",
        ),
        (
            format!("{set} {url} --auth bearer --token-file {token} --username sales"),
            "outboxd: --username: not used with --auth bearer (it takes --token-file)",
        ),
        (
            format!("{set} {url} --auth bearer --token-file {broken}"),
            "outboxd: --token-file: the token contains a line break",
        ),
        (
            format!("{set} {url} --token-file {token}"),
            "outboxd: --token-file: not used with --auth none",
        ),
        (
            format!("{set} {url} --event Payment.Cancellation"),
            "outboxd: --event: \"Payment.Cancellation\" is not an event type",
        ),
        (
            format!("{set} {url} --auth digest"),
            "'digest' for '--auth <AUTH>'",
        ),
        (
            format!("endpoint set --company 0 {url}"),
            "'0' for '--company <ID>'",
        ),
        (
            "endpoint show --company 6316 --event payment".into(),
            "\"payment\" is not an event type",
        ),
        (
            "events list --state done".into(),
            "'done' for '--state <STATE>'",
        ),
        (
            "events list --since yesterday".into(),
            "\"yesterday\" is neither a duration",
        ),
        (
            "events list --limit 10001".into(),
            "'10001' for '--limit <LIMIT>'",
        ),
        (
            "events show not-a-uuid".into(),
            "\"not-a-uuid\" is not an event id",
        ),
        ("events retry 1234".into(), "\"1234\" is not an event id"),
        ("events retry --company 6316".into(), "--state <STATE>"),
        (
            "events retry --company 6316 --state pending".into(),
            "'pending' for '--state <STATE>'",
        ),
        (
            "enqueue payment-cancellation --company 6316 --payment 2 --number 2 --orders 17899,x"
                .into(),
            "'17899,x' for '--orders <IDS>': \"x\" is not an order id",
        ),
        (
            "enqueue payment-cancellation --company 6316 --payment 2 --number 2 --orders 5,5"
                .into(),
            "order id 5 is given twice",
        ),
    ];
    for (line, want) in &cases {
        let ran = outboxd(&db, line).await;
        assert_eq!(ran.code, Some(2), "{line}: {ran:?}");
        assert!(
            ran.stderr.contains(want),
            "{line}: want {want:?} in {ran:?}"
        );
        assert_no_secret(&ran, &["SECRET"]);
        assert_eq!(
            snapshot(&client).await,
            before,
            "{line} changed the database"
        );
    }

    // A value the database function refuses: its message, exit 2.
    let blank = run(db.outboxd().args([
        "enqueue",
        "payment-cancellation",
        "--company=6316",
        "--payment=2",
        "--number= ",
    ]))
    .await;
    assert_eq!(blank.code, Some(2), "{blank:?}");
    assert!(
        blank.stderr.contains(
            "outboxd: the database refused it: outbox.enqueue_payment_cancellation: \
             payment_number must not be blank"
        ),
        "{blank:?}"
    );
    assert_eq!(snapshot(&client).await, before);

    // Every problem at once, each on its own line naming its flag.
    let all = outboxd(
        &db,
        &format!("{set} --url ftp://x/ --event bad --auth bearer --notify nope"),
    )
    .await;
    assert_eq!(all.code, Some(2), "{all:?}");
    let flags: Vec<&str> = all
        .stderr
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim())
        .collect();
    assert_eq!(
        flags,
        ["--event", "--url", "--notify", "--token-file"],
        "{all:?}"
    );
    assert_eq!(snapshot(&client).await, before);
}

#[tokio::test]
async fn email_and_url_rules_agree_with_the_schema() {
    let db = TestDb::new().await;
    let client = db.client().await;
    for address in [
        "ops@example.com",
        "first.last+tag@sub.example.co.uk",
        "o'brien@example.com",
        "a@b.c",
        "ops@localhost",
        "ops@@example.com",
        "ops@example..com",
        ".ops@example.com",
        "ops.@example.com",
        "o..ps@example.com",
        "ops@-example.com",
        "ops@example-.com",
        "ops example@example.com",
        "ops@exa_mple.com",
        "@example.com",
        "jörg@example.com",
        "",
    ] {
        let sql: bool = client
            .query_one("SELECT outbox.is_valid_email($1)", &[&address])
            .await
            .unwrap()
            .get(0);
        let rust = outboxd::cli::rules::is_valid_email(address);
        assert_eq!(rust, sql, "{address:?}");
    }
    for url in [
        "https://erp.example.com/hooks?x=1#y",
        "http://127.0.0.1:8808/",
        "HTTP://[::1]:80",
        "ftp://erp.example.com/",
        "https://user:pw@erp.example.com/",
        "https:///x",
        "https://erp_example.com/",
        "https://erp.example.com/a b",
        "https://erp.example.com:123456/",
    ] {
        let sql: bool = client
            .query_one("SELECT outbox.is_valid_webhook_url($1)", &[&url])
            .await
            .unwrap()
            .get(0);
        let rust = outboxd::cli::rules::webhook_url(url).is_ok();
        assert_eq!(rust, sql, "{url:?}");
    }
    // Stricter than the schema where delivery would fail anyway.
    for url in [
        "https://erp.example.com:99999/",
        "https://erp.example.com/a<b",
    ] {
        assert!(outboxd::cli::rules::webhook_url(url).is_err(), "{url}");
    }
}
