//! Signed webhooks (issue 16) checked by an independent implementation: the
//! `standardwebhooks` package from PyPI, run as a real HTTP receiver
//! (`tests/webhooks/verifier.py`, Python from `STANDARDWEBHOOKS_PYTHON`,
//! which scripts/test sets up). Secrets are written in SQL, as the sales
//! application's settings screen would.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use crate::harness::{Daemon, TempDir, TestDb, eventually_count, repo_root};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The verifier, holding the secret in `secret_file`.
struct Verifier {
    _child: tokio::process::Child,
    port: u16,
    /// Each request: (verified, error, headers, body).
    seen: watch::Receiver<Vec<Value>>,
}

impl Verifier {
    async fn start(secret_file: &std::path::Path) -> Verifier {
        let python = std::env::var("STANDARDWEBHOOKS_PYTHON").unwrap_or_else(|_| {
            panic!("STANDARDWEBHOOKS_PYTHON is not set: run the tests with scripts/test")
        });
        let mut child = tokio::process::Command::new(python)
            .arg(repo_root().join("tests/webhooks/verifier.py"))
            .arg("--secret-file")
            .arg(secret_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting tests/webhooks/verifier.py");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first: Value =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        let port = first["ready"].as_u64().expect("a ready line") as u16;
        let (tx, seen) = watch::channel(Vec::new());
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&line).unwrap();
                tx.send_modify(|s| s.push(v));
            }
        });
        Verifier {
            _child: child,
            port,
            seen,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    async fn wait_for(&self, n: usize) -> Vec<Value> {
        let mut rx = self.seen.clone();
        tokio::time::timeout(SECS(20), rx.wait_for(|s| s.len() >= n))
            .await
            .unwrap_or_else(|_| panic!("expected {n} requests at the verifier"))
            .unwrap()
            .clone()
    }
}

/// POSTs `body` with `headers` to the verifier; its answer's status field.
async fn post(url: &str, headers: &[(&str, String)], body: &str) -> String {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut request = hyper::Request::post(url);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["status"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_requests_verify_with_the_standard_webhooks_library_through_a_rotation() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dir = TempDir::new("signing");
    let (_, old) = outboxd::http::sign::SigningKey::generate().unwrap();
    let (_, new) = outboxd::http::sign::SigningKey::generate().unwrap();
    // Company 1's receiver holds the old secret, company 2's the new one.
    let (old_file, new_file) = (dir.join("old"), dir.join("new"));
    std::fs::write(&old_file, &old).unwrap();
    std::fs::write(&new_file, &new).unwrap();
    let with_old = Verifier::start(&old_file).await;
    let with_new = Verifier::start(&new_file).await;
    for (company, verifier) in [(1_i64, &with_old), (2, &with_new)] {
        client
            .execute(
                "INSERT INTO outbox.endpoints (company_id, url, auth_type, token)
                 VALUES ($1, $2, 'bearer', 'bearer-token')",
                &[&company, &verifier.url()],
            )
            .await
            .unwrap();
    }
    let add = |company: i64, secret: &str, expires: &str| {
        format!(
            "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret, expires_at)
             VALUES ({company}, 'payment.cancellation', '{secret}', {expires})"
        )
    };
    client.batch_execute(&add(1, &old, "NULL")).await.unwrap();
    let daemon = Daemon::start(&db, &[]).await;
    let enqueue = |company: i64, number: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT outbox.enqueue_payment_cancellation($1, 7, $2, ARRAY[17899, 17900])",
                    &[&company, &number],
                )
                .await
                .unwrap();
        }
    };
    let delivered = |n: i64| {
        let client = &client;
        async move {
            eventually_count(
                client,
                "events delivered",
                SECS(20),
                "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
                n,
            )
            .await
        }
    };

    // One secret: verified, over the exact documented body.
    enqueue(1, "ONE").await;
    let seen = with_old.wait_for(1).await;
    assert_eq!(seen[0]["verified"], true, "{:?}", seen[0]);
    assert_eq!(
        seen[0]["body"],
        r#"{"companyId": 1, "paymentId": 7, "paymentNumber": "ONE", "orderIds": "17899,17900"}"#
    );
    let signature = seen[0]["headers"]["webhook-signature"].as_str().unwrap();
    assert_eq!(signature.split(' ').count(), 1);
    assert_eq!(
        seen[0]["headers"]["authorization"], "Bearer bearer-token",
        "the auth type is independent of signing"
    );
    delivered(1).await;

    // A rotation: both secrets on both endpoints, the old one expiring in
    // an hour. Each request carries two signatures; each receiver, holding
    // one secret, verifies.
    client
        .batch_execute(&format!(
            "DELETE FROM outbox.endpoint_signing_secrets;
             {}; {}; {}; {};",
            add(1, &old, "now() + interval '1 hour'"),
            add(1, &new, "NULL"),
            add(2, &old, "now() + interval '1 hour'"),
            add(2, &new, "NULL"),
        ))
        .await
        .unwrap();
    enqueue(1, "ROT1").await;
    enqueue(2, "ROT2").await;
    let at_old = with_old.wait_for(2).await;
    let at_new = with_new.wait_for(1).await;
    for seen in [&at_old[1], &at_new[0]] {
        assert_eq!(seen["verified"], true, "{seen:?}");
        let signature = seen["headers"]["webhook-signature"].as_str().unwrap();
        assert_eq!(signature.split(' ').count(), 2, "{signature}");
    }
    delivered(3).await;

    // The old secret expired: the receiver that still holds it refuses
    // (status 0, the event fails with its reason); the new one verifies.
    client
        .batch_execute(
            "UPDATE outbox.endpoint_signing_secrets SET expires_at = now() - interval '1 second'
              WHERE expires_at IS NOT NULL",
        )
        .await
        .unwrap();
    enqueue(1, "EXP1").await;
    enqueue(2, "EXP2").await;
    let at_old = with_old.wait_for(3).await;
    let at_new = with_new.wait_for(2).await;
    assert_eq!(at_old[2]["verified"], false, "{:?}", at_old[2]);
    assert_eq!(at_new[1]["verified"], true, "{:?}", at_new[1]);
    eventually_count(
        &client,
        "the event signed only with the new secret fails at the old receiver",
        SECS(20),
        "SELECT count(*) FROM outbox.events WHERE state = 'failed'
            AND response_message LIKE 'signature not verified%'",
        1,
    )
    .await;
    let log = daemon.log();
    assert!(daemon.stop().await.success());
    for secret in [&old, &new] {
        let key = &secret["whsec_".len()..];
        assert!(!log.iter().any(|l| l.contains(key)), "a secret in the log");
    }

    // The verifier itself refuses a tampered body and a stale timestamp.
    let real = &at_new[1];
    let headers: Vec<(&str, String)> = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .map(|h| (*h, real["headers"][*h].as_str().unwrap().to_string()))
        .collect();
    let body = real["body"].as_str().unwrap();
    assert_eq!(
        post(&with_new.url(), &headers, body).await,
        "1",
        "as sent: verified"
    );
    let tampered = body.replace("\"paymentId\": 7", "\"paymentId\": 8");
    assert_eq!(
        post(&with_new.url(), &headers, &tampered).await,
        "0",
        "a tampered body"
    );
    let key = outboxd::http::sign::SigningKey::parse(&new).unwrap();
    let stale = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 600;
    let id = headers[0].1.clone();
    let stale_headers = vec![
        ("webhook-id", id.clone()),
        ("webhook-timestamp", stale.to_string()),
        ("webhook-signature", key.sign(&id, stale, body.as_bytes())),
    ];
    assert_eq!(
        post(&with_new.url(), &stale_headers, body).await,
        "0",
        "10 minutes old"
    );
}

/// The CLI side (issue 16, point 3): `endpoint secret rotate` prints a new
/// secret once and keeps the old one for `--keep-old`; `endpoint secret
/// list` shows fingerprints, never a secret; `endpoint test` signs like a
/// delivery (checked by the same independent verifier); `endpoint set
/// --signing-secret-file` replaces the secrets and refuses a bad one.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_rotated_listed_by_fingerprint_and_signed_by_endpoint_test() {
    use crate::harness::run;
    let db = TestDb::new().await;
    let dir = TempDir::new("signing-cli");
    let held = dir.join("held");
    std::fs::write(&held, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let verifier = Verifier::start(&held).await;
    let outboxd = |args: &[&str]| {
        let mut cmd = db.outboxd();
        cmd.args(args);
        cmd
    };
    let set = run(&mut outboxd(&[
        "endpoint",
        "set",
        "--company",
        "6316",
        "--url",
        &verifier.url(),
    ]))
    .await;
    assert_eq!(set.code, Some(0), "{set:?}");
    let key = ["--company", "6316"];
    let rotate = |keep: &'static str| {
        let mut cmd = db.outboxd();
        cmd.args([
            "endpoint",
            "secret",
            "rotate",
            "--company",
            "6316",
            "--keep-old",
            keep,
        ]);
        async move { run(&mut cmd).await }
    };

    // The first secret: printed alone on stdout; the receiver takes it.
    let first = rotate("24h").await;
    assert_eq!(first.code, Some(0), "{first:?}");
    let first_secret = first.stdout.trim().to_string();
    assert!(
        outboxd::http::sign::SigningKey::parse(&first_secret).is_ok(),
        "{first:?}"
    );
    assert!(
        first.stderr.contains("signs its requests from now on"),
        "{first:?}"
    );
    std::fs::write(&held, &first_secret).unwrap();
    let test = run(&mut outboxd(&[&["endpoint", "test"][..], &key].concat())).await;
    assert_eq!(test.code, Some(0), "endpoint test signs: {test:?}");
    assert_eq!(verifier.wait_for(1).await[0]["verified"], true);

    // A rotation keeping the old one for an hour: the receiver still on the
    // old secret verifies (two signatures).
    let second = rotate("1h").await;
    assert_eq!(second.code, Some(0), "{second:?}");
    let second_secret = second.stdout.trim().to_string();
    assert_ne!(second_secret, first_secret);
    assert!(second.stderr.contains("stay valid until"), "{second:?}");
    let test = run(&mut outboxd(&[&["endpoint", "test"][..], &key].concat())).await;
    assert_eq!(test.code, Some(0), "{test:?}");
    let seen = verifier.wait_for(2).await;
    assert_eq!(seen[1]["verified"], true);
    let signatures = seen[1]["headers"]["webhook-signature"].as_str().unwrap();
    assert_eq!(signatures.split(' ').count(), 2, "{signatures}");

    // Ending the old ones now: the receiver on the first secret refuses.
    let third = rotate("0s").await;
    assert_eq!(third.code, Some(0), "{third:?}");
    assert!(third.stderr.contains("ended now"), "{third:?}");
    let test = run(&mut outboxd(&[&["endpoint", "test"][..], &key].concat())).await;
    assert_eq!(test.code, Some(1), "{test:?}");
    assert_eq!(verifier.wait_for(3).await[2]["verified"], false);

    // The list: fingerprints and states, never a secret.
    let list = run(&mut outboxd(
        &[&["endpoint", "secret", "list"][..], &key].concat(),
    ))
    .await;
    assert_eq!(list.code, Some(0), "{list:?}");
    let fingerprint = |s: &str| {
        outboxd::http::sign::SigningKey::parse(s)
            .unwrap()
            .fingerprint()
    };
    let third_secret = third.stdout.trim().to_string();
    for secret in [&first_secret, &second_secret, &third_secret] {
        assert!(list.stdout.contains(&fingerprint(secret)), "{list:?}");
        let encoded = &secret["whsec_".len()..];
        for ran in [&list, &test] {
            assert!(
                !ran.stdout.contains(encoded) && !ran.stderr.contains(encoded),
                "{ran:?}"
            );
        }
    }
    assert_eq!(list.stdout.matches(" active").count(), 1, "{list:?}");
    assert_eq!(list.stdout.matches(" expired").count(), 2, "{list:?}");

    // set --signing-secret-file: a bad file is refused naming the flag, a
    // good one replaces every secret.
    let bad = dir.join("bad");
    std::fs::write(&bad, "not-a-secret-at-all").unwrap();
    let url = verifier.url();
    let set_with = |file: &std::path::Path| {
        let mut cmd = db.outboxd();
        cmd.args(["endpoint", "set", "--company", "6316", "--url", &url])
            .arg("--signing-secret-file")
            .arg(file);
        async move { run(&mut cmd).await }
    };
    let refused = set_with(&bad).await;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("--signing-secret-file: a signing secret starts with whsec_")
    );
    assert!(
        !refused.stderr.contains("not-a-secret-at-all"),
        "{refused:?}"
    );
    let set = set_with(&held).await;
    assert_eq!(set.code, Some(0), "{set:?}");
    let list = run(&mut outboxd(
        &[&["endpoint", "secret", "list"][..], &key].concat(),
    ))
    .await;
    assert_eq!(list.stdout.matches(" active").count(), 1, "{list:?}");
    assert_eq!(list.stdout.matches(" expired").count(), 0, "{list:?}");
    assert!(
        list.stdout.contains(&fingerprint(&first_secret)),
        "{list:?}"
    );
    let test = run(&mut outboxd(&[&["endpoint", "test"][..], &key].concat())).await;
    assert_eq!(test.code, Some(0), "{test:?}");

    // `endpoint remove` takes the secrets with it (a bare DELETE of the
    // endpoint row no longer does, since 0010), and the record that the
    // endpoint signed.
    let removed = run(&mut outboxd(&[&["endpoint", "remove"][..], &key].concat())).await;
    assert_eq!(removed.code, Some(0), "{removed:?}");
    let client = db.client().await;
    for table in ["endpoint_signing_secrets", "signed_endpoints"] {
        let left =
            crate::harness::count(&client, &format!("SELECT count(*) FROM outbox.{table}")).await;
        assert_eq!(left, 0, "{table}");
    }
}

/// `endpoint set --signing-secret-file` writes the endpoint and its secret
/// in one transaction: when the database refuses the secret (here a
/// trigger, as an audit rule might), the endpoint is not created either,
/// rather than left there delivering unsigned.
#[tokio::test(flavor = "multi_thread")]
async fn endpoint_set_with_a_secret_the_database_refuses_writes_nothing() {
    use crate::harness::{count, run};
    let db = TestDb::new().await;
    let dir = TempDir::new("signing-set-atomic");
    let secret = dir.join("secret");
    std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE FUNCTION public.no_secrets() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'secrets are written by the audit process only'; END $$;
             CREATE TRIGGER no_secrets BEFORE INSERT ON outbox.endpoint_signing_secrets
               FOR EACH ROW EXECUTE FUNCTION public.no_secrets();",
        )
        .await
        .unwrap();
    let mut cmd = db.outboxd();
    cmd.args([
        "endpoint",
        "set",
        "--company",
        "6316",
        "--url",
        "https://erp.example.com/hooks/payment-cancelled",
    ])
    .arg("--signing-secret-file")
    .arg(&secret);
    let set = run(&mut cmd).await;
    assert_eq!(set.code, Some(1), "{set:?}");
    assert!(
        set.stderr
            .contains("secrets are written by the audit process only"),
        "{set:?}"
    );
    assert!(
        !set.stderr.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "{set:?}"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.endpoints").await,
        0
    );
}

/// The reference receiver (issue 16, point 4) with `--signing-secret-file`:
/// outboxd's signed deliveries are accepted; a request with no signature, a
/// changed body or a stale timestamp is answered status 0 with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn the_reference_receiver_verifies_signatures() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dir = TempDir::new("signing-receiver");
    let (key, secret) = outboxd::http::sign::SigningKey::generate().unwrap();
    let file = dir.join("whsec");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let mut receiver = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd-receiver"))
        .args(["--listen", "127.0.0.1:0", "--signing-secret-file"])
        .arg(&file)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let base = first.trim_start_matches("listening on ").to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    for company in [1_i64, 2] {
        client
            .execute(
                "INSERT INTO outbox.endpoints (company_id, url) VALUES ($1, $2)",
                &[&company, &format!("{base}/hooks")],
            )
            .await
            .unwrap();
    }
    // Company 1 signs; company 2 does not.
    client
        .execute(
            "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret)
             VALUES (1, 'payment.cancellation', $1)",
            &[&secret],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(&db, &[]).await;
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, 11, 'SIGNED');
             SELECT outbox.enqueue_payment_cancellation(2, 12, 'UNSIGNED');",
        )
        .await
        .unwrap();
    eventually_count(
        &client,
        "both final",
        SECS(20),
        "SELECT count(*) FROM outbox.events WHERE state IN ('delivered', 'failed')",
        2,
    )
    .await;
    let state = |number: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT state, response_message FROM outbox.events
                      WHERE payload->>'paymentNumber' = $1",
                    &[&number],
                )
                .await
                .unwrap();
            (row.get::<_, String>(0), row.get::<_, Option<String>>(1))
        }
    };
    assert_eq!(state("SIGNED").await.0, "delivered");
    let (unsigned, message) = state("UNSIGNED").await;
    assert_eq!(unsigned, "failed");
    assert_eq!(
        message.as_deref(),
        Some("signature not verified: missing webhook-timestamp")
    );
    assert!(daemon.stop().await.success());

    // Requests made here: a changed body, a stale timestamp, and, as a
    // control, a correct one.
    let url = format!("{base}/hooks");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = r#"{"companyId": 1, "paymentId": 13, "paymentNumber": "X"}"#;
    let signed = |ts: i64, signed_body: &str| {
        vec![
            (
                "webhook-id",
                "01938a4c-5f0e-7c3a-9b1d-2f6e8a4b7c90".to_string(),
            ),
            ("webhook-timestamp", ts.to_string()),
            (
                "webhook-signature",
                key.sign(
                    "01938a4c-5f0e-7c3a-9b1d-2f6e8a4b7c90",
                    ts,
                    signed_body.as_bytes(),
                ),
            ),
        ]
    };
    assert_eq!(post(&url, &signed(now, body), body).await, "1");
    let changed = body.replace("13", "14");
    assert_eq!(post(&url, &signed(now, body), &changed).await, "0");
    assert_eq!(post(&url, &signed(now - 600, body), body).await, "0");
    assert_eq!(post(&url, &signed(now + 600, body), body).await, "0");
}

/// Issue 25, point 7: the schema's check and the daemon's decoder agree on
/// every secret. 0008 stored base64 whose last character carries non-zero
/// unused bits (PostgreSQL's decode() ignores them, the daemon refuses
/// them), and every event of that endpoint then failed. Each candidate is
/// judged by `outbox.is_valid_signing_secret` (what the constraint and the
/// trigger call) and by `SigningKey::parse` (what the claim's secrets go
/// through); the texts are never printed, only their index.
#[tokio::test]
async fn the_schema_accepts_exactly_the_secrets_the_daemon_accepts() {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    use outboxd::http::sign::SigningKey;
    use tokio_postgres::error::SqlState;

    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO outbox.endpoints (company_id, url) VALUES (1, 'https://erp.example.com/h')")
        .await
        .unwrap();
    let insert = |secret: String| {
        let client = &client;
        async move {
            client
                .execute(
                    "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret)
                     VALUES (1, 'payment.cancellation', $1)",
                    &[&secret],
                )
                .await
        }
    };

    // The issue's example: 32 bytes whose last character says B where
    // only A (unused bits zero) is canonical.
    let non_canonical = format!("whsec_{}B=", "A".repeat(42));
    let canonical = format!("whsec_{}A=", "A".repeat(42));
    assert!(SigningKey::parse(&non_canonical).is_err());
    assert!(SigningKey::parse(&canonical).is_ok());
    let refused = insert(non_canonical.clone()).await.unwrap_err();
    let refused = refused.as_db_error().expect("a database error");
    assert_eq!(refused.code(), &SqlState::CHECK_VIOLATION);
    assert_eq!(
        refused.constraint(),
        Some("endpoint_signing_secrets_format")
    );
    let said = format!("{} {:?}", refused.message(), refused.detail());
    assert!(said.contains("unused bits zero"), "{said}");
    assert!(
        !said.contains(&"A".repeat(42)),
        "the error echoes the secret"
    );
    insert(canonical.clone()).await.unwrap();

    // Every length around the allowed 24..=64 bytes, each key spelt
    // canonically, with every other last character, without its padding,
    // with a padding character too many or too few, and with a stray
    // character; and a few that are wrong from the start.
    let mut candidates: Vec<String> = vec![
        "whsec_".into(),
        "whsec_====".into(),
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        "WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS-".into(),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS_".into(),
        "whsec_MfKQ9r8GKYqrTwjU=D8ILPZIo2LaLaSw".into(),
    ];
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for len in 20..=68 {
        let key: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
        let text = STANDARD.encode(&key);
        let body = text.trim_end_matches('=');
        let pad = &text[body.len()..];
        let (head, _) = body.split_at(body.len() - 1);
        for last in ALPHABET.chars() {
            candidates.push(format!("whsec_{head}{last}{pad}"));
        }
        candidates.push(format!("whsec_{}", STANDARD_NO_PAD.encode(&key)));
        candidates.push(format!("whsec_{text}="));
        if !pad.is_empty() {
            candidates.push(format!("whsec_{}", &text[..text.len() - 1]));
        }
        candidates.push(format!("whsec_{text}A"));
        candidates.push(format!("whsec_{head}!{pad}"));
    }
    let rows = client
        .query(
            "SELECT outbox.is_valid_signing_secret(s) FROM unnest($1::text[]) WITH ORDINALITY AS c(s, i) ORDER BY i",
            &[&candidates],
        )
        .await
        .unwrap();
    let (mut accepted, mut disagreements) = (0, Vec::new());
    for (i, (text, row)) in candidates.iter().zip(&rows).enumerate() {
        let schema: bool = row.get(0);
        let daemon = SigningKey::parse(text).is_ok();
        if schema != daemon {
            disagreements.push((i, text.len(), schema, daemon));
        }
        accepted += usize::from(daemon);
    }
    assert!(
        disagreements.is_empty(),
        "(candidate, length, schema, daemon): {disagreements:?}"
    );
    // Both verdicts were exercised: for each of the 41 allowed lengths
    // the last characters whose unused bits are zero (all 64 without
    // padding, and the same text once more as "without padding"; 16
    // before "=", 4 before "=="), and the published vector.
    let per_length = |len: usize| [64 + 1, 4, 16][len % 3];
    let expected: usize = (24..=64).map(per_length).sum::<usize>() + 1;
    assert_eq!(accepted, expected, "of {} candidates", candidates.len());
    assert!(candidates.len() - accepted > 2000);

    // The one deliberate difference: the daemon trims a secret file's
    // newline; the schema stores no whitespace at all.
    let with_newline = format!("{canonical}\n");
    assert!(SigningKey::parse(&with_newline).is_ok());
    assert!(insert(with_newline).await.is_err());
}

/// Issue 25, point 7: a settings screen that saves an endpoint by deleting
/// its row and inserting it again (in one transaction or two) keeps its
/// signing secrets, so its requests stay signed; up to 0009 the secrets
/// went with the row (ON DELETE CASCADE) and the requests went out
/// unsigned. Checked by the `standardwebhooks` verifier.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_outlive_a_delete_and_reinsert_of_their_endpoint() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dir = TempDir::new("signing-reinsert");
    let (_, secret) = outboxd::http::sign::SigningKey::generate().unwrap();
    let file = dir.join("whsec");
    std::fs::write(&file, &secret).unwrap();
    let verifier = Verifier::start(&file).await;
    let save = format!(
        "INSERT INTO outbox.endpoints (company_id, url, notify_emails)
         VALUES (6316, '{}', '{{ops@example.com}}')",
        verifier.url()
    );
    client.batch_execute(&save).await.unwrap();
    client
        .execute(
            "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret)
             VALUES (6316, 'payment.cancellation', $1)",
            &[&secret],
        )
        .await
        .unwrap();
    // The settings screen saves: in one transaction, then in two.
    client
        .batch_execute(&format!(
            "BEGIN; DELETE FROM outbox.endpoints WHERE company_id = 6316; {save}; COMMIT;"
        ))
        .await
        .unwrap();
    client
        .batch_execute("DELETE FROM outbox.endpoints WHERE company_id = 6316")
        .await
        .unwrap();
    client.batch_execute(&save).await.unwrap();
    let daemon = Daemon::start(&db, &[]).await;
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(6316, 1, 'AFTER-SAVE')")
        .await
        .unwrap();
    let seen = verifier.wait_for(1).await;
    assert_eq!(seen[0]["verified"], true, "{:?}", seen[0]["error"]);
    eventually_count(
        &client,
        "delivered, signed",
        SECS(20),
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
        1,
    )
    .await;
    assert!(daemon.stop().await.success());
}

/// Issue 25, point 7: a database migrated to 0009 may hold secrets that
/// 0008's check let through and the daemon refuses. Migration 0010 spells
/// them canonically (the same key: the bytes PostgreSQL and the Standard
/// Webhooks libraries decode from the text the receiver holds), validates
/// the new check, and records their endpoints as signed.
#[tokio::test]
async fn migration_10_respells_stored_non_canonical_secrets_as_the_same_keys() {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use outboxd::http::sign::SigningKey;
    use outboxd::store::migrations::MIGRATIONS;

    let db = TestDb::empty().await;
    let mut client = db.client().await;
    // The schema at 0009, applied as `outboxd migrate` of that release did.
    client
        .batch_execute(
            "CREATE SCHEMA outbox;
             CREATE TABLE outbox.schema_migrations (
                 version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());",
        )
        .await
        .unwrap();
    for m in MIGRATIONS.iter().filter(|m| m.version <= 9) {
        client.batch_execute(m.sql).await.unwrap();
        client
            .execute(
                "INSERT INTO outbox.schema_migrations (version, name, checksum) VALUES ($1, $2, md5($3))",
                &[&m.version, &m.name, &format!("{}{}", m.sql, m.online)],
            )
            .await
            .unwrap();
    }
    // The issue's example (32 bytes, "=") and a 64-byte key ("==", and
    // long enough for encode() to break its line), each with its last
    // character's unused bits set; and a canonical one, left alone.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let long = STANDARD.encode((0..64).map(|_| fastrand::u8(..)).collect::<Vec<u8>>());
    let last = long.len() - 3;
    let index = ALPHABET
        .iter()
        .position(|c| *c == long.as_bytes()[last])
        .unwrap();
    let mut bent = long.clone().into_bytes();
    bent[last] = ALPHABET[index | 1];
    let bent = String::from_utf8(bent).unwrap();
    let (_, fine) = SigningKey::generate().unwrap();
    let stored = [
        (1_i64, format!("whsec_{}B=", "A".repeat(42))),
        (2, format!("whsec_{bent}")),
        (3, fine.clone()),
    ];
    for (company, secret) in &stored {
        client
            .execute(
                "INSERT INTO outbox.endpoints (company_id, url) VALUES ($1, 'https://erp.example.com/h')",
                &[company],
            )
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret)
                 VALUES ($1, 'payment.cancellation', $2)",
                &[company, secret],
            )
            .await
            .unwrap();
        assert!(SigningKey::parse(secret).is_err() == (*company != 3));
    }

    let report = outboxd::store::migrate::migrate(&mut client).await.unwrap();
    assert!(report.applied.contains(&10), "{report:?}");
    let now: Vec<String> = client
        .query(
            "SELECT secret FROM outbox.endpoint_signing_secrets ORDER BY company_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want = [
        format!("whsec_{}A=", "A".repeat(42)),
        format!("whsec_{long}"),
        fine,
    ];
    assert!(now == want, "the secrets were not respelt as expected");
    for secret in &now {
        assert!(SigningKey::parse(secret).is_ok());
    }
    let validated: bool = client
        .query_one(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'endpoint_signing_secrets_format'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(validated, "every stored secret meets the new check");
    assert_eq!(
        crate::harness::count(&client, "SELECT count(*) FROM outbox.signed_endpoints").await,
        3
    );
}

/// Issue 25, point 7: an endpoint that has had a signing secret and has
/// none active any more (all expired, or deleted) is found once, by one of
/// two instances looking side by side, and its notify_emails get one
/// email (not another while the notification window lasts, nor when its
/// expired secrets are deleted later); one that signs again is noted, one
/// that never signed or whose row is gone is left alone, and a delete and
/// re-insert of the endpoint changes nothing. Clearing the record (what
/// `outboxd endpoint secret clear` does) stops counting it.
#[tokio::test]
async fn an_endpoint_left_without_an_active_secret_is_found_once_and_emailed_once() {
    use outboxd::maintenance::{SigningStopped, SigningWatch};

    let db = TestDb::new().await;
    let client = db.client().await;
    let watch = || SigningWatch::new(db.pool(), SECS(60), Duration::from_secs(15 * 60), SECS(10));
    let (_, secret) = outboxd::http::sign::SigningKey::generate().unwrap();
    client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url, notify_emails)
             SELECT c, 'https://erp.example.com/h?token=t0ken',
                    CASE WHEN c = 4 THEN '{}'::text[] ELSE '{ops@example.com}' END
               FROM generate_series(1, 5) AS c",
        )
        .await
        .unwrap();
    // 1 signs; 2's secret expired a minute ago; 3 never signed; 4's
    // secret was deleted (and nobody is to be emailed); 5's endpoint row
    // and secret were deleted.
    for (company, expires) in [
        (1_i64, "NULL"),
        (2, "now() - interval '1 minute'"),
        (4, "NULL"),
        (5, "NULL"),
    ] {
        client
            .execute(
                &format!(
                    "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret, expires_at)
                     VALUES ($1, 'payment.cancellation', $2, {expires})"
                ),
                &[&company, &secret],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "DELETE FROM outbox.endpoint_signing_secrets WHERE company_id IN (4, 5);
             DELETE FROM outbox.endpoints WHERE company_id = 5;",
        )
        .await
        .unwrap();

    let (a, b) = (watch(), watch());
    let (found_a, found_b) = tokio::join!(a.run_once(), b.run_once());
    let (found_a, found_b) = (found_a.unwrap(), found_b.unwrap());
    let mut stopped: Vec<SigningStopped> = [found_a.stopped, found_b.stopped].concat();
    stopped.sort_by_key(|s| s.company_id);
    let stopped_as = |company_id: i64, why: &str, emailed: bool| SigningStopped {
        company_id,
        event_type: "payment.cancellation".into(),
        why: why.into(),
        emailed,
    };
    assert_eq!(
        stopped,
        [
            stopped_as(2, "expired", true),
            stopped_as(4, "removed", false)
        ],
        "each found once, by one of the two"
    );
    let emails = || {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT company_id, recipients, about->>'why', about->>'url', about::text
                       FROM outbox.emails WHERE kind = 'signing_stopped' ORDER BY id",
                    &[],
                )
                .await
                .unwrap()
        }
    };
    let queued = emails().await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].get::<_, i64>(0), 2);
    assert_eq!(queued[0].get::<_, Vec<String>>(1), ["ops@example.com"]);
    assert_eq!(queued[0].get::<_, String>(2), "expired");
    let about: String = queued[0].get(4);
    assert!(
        !about.contains(&secret["whsec_".len()..]),
        "a secret in the email"
    );

    // Again, and after its expired secret is deleted: nothing new.
    let again = a.run_once().await.unwrap();
    assert_eq!((again.stopped.len(), again.unsigned), (0, 2));
    client
        .batch_execute("DELETE FROM outbox.endpoint_signing_secrets WHERE company_id = 2")
        .await
        .unwrap();
    let again = b.run_once().await.unwrap();
    assert_eq!((again.stopped.len(), again.unsigned), (0, 2));
    assert_eq!(emails().await.len(), 1);

    // 2 signs again, then its secret expires once more: found again, but
    // emailed only once per notification window.
    client
        .execute(
            "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret)
             VALUES (2, 'payment.cancellation', $1)",
            &[&secret],
        )
        .await
        .unwrap();
    let back = a.run_once().await.unwrap();
    assert_eq!(back.resumed, [(2, "payment.cancellation".to_string())]);
    assert_eq!(back.unsigned, 1);
    client
        .batch_execute(
            "UPDATE outbox.endpoint_signing_secrets SET expires_at = now() WHERE company_id = 2",
        )
        .await
        .unwrap();
    let gone = a.run_once().await.unwrap();
    assert_eq!(gone.stopped, [stopped_as(2, "expired", false)]);
    assert_eq!(emails().await.len(), 1);

    // Company 1 saved by delete and re-insert: still signing.
    client
        .batch_execute(
            "BEGIN;
             DELETE FROM outbox.endpoints WHERE company_id = 1;
             INSERT INTO outbox.endpoints (company_id, url) VALUES (1, 'https://erp.example.com/h');
             COMMIT;",
        )
        .await
        .unwrap();
    let after = a.run_once().await.unwrap();
    assert!(after.stopped.is_empty() && after.resumed.is_empty());
    assert_eq!(after.unsigned, 2);

    // Stopping on purpose: the record goes, it is no longer counted.
    let mut clear = db.outboxd();
    clear.args(["endpoint", "secret", "clear", "--company", "4"]);
    let cleared = crate::harness::run(&mut clear).await;
    assert_eq!(cleared.code, Some(0), "{cleared:?}");
    assert!(cleared.stdout.contains("no longer signs"), "{cleared:?}");
    assert_eq!(a.run_once().await.unwrap().unsigned, 1);
}

/// Issue 25, point 7, end to end: a daemon, a real receiver and a real SMTP
/// server. The settings screen deletes an endpoint's only secret; the
/// daemon logs it with the company, counts it in
/// `outboxd_endpoints_unsigned` and `outboxd_signing_stopped_total`, emails
/// the company once, and keeps delivering, unsigned.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_reports_an_endpoint_whose_secrets_vanished_once() {
    use crate::harness::http_get;
    use crate::smtp::{SmtpServer, free_port};

    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = crate::receiver::Receiver::ok().await;
    crate::notify::endpoint(&client, 6316, &receiver.url("/hooks"), &["ops@example.com"]).await;
    let (_, secret) = outboxd::http::sign::SigningKey::generate().unwrap();
    client
        .execute(
            "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret)
             VALUES (6316, 'payment.cancellation', $1)",
            &[&secret],
        )
        .await
        .unwrap();
    let port = free_port();
    let smtp = SmtpServer::start(port, &[]).await;
    let env = crate::notify::smtp_env(port, &[("OUTBOXD_METRICS__REFRESH_INTERVAL", "200ms")]);
    let daemon = crate::notify::start(&db, &env).await;
    client
        .batch_execute("DELETE FROM outbox.endpoint_signing_secrets WHERE company_id = 6316")
        .await
        .unwrap();
    let line = daemon
        .wait_for_log("has no active signing secret", SECS(20))
        .await;
    assert!(line.contains("6316"), "{line}");
    let mails = smtp.wait_for(1, SECS(20)).await;
    assert!(
        mails[0]
            .subject
            .contains("requests are no longer signed (company 6316)"),
        "{}",
        mails[0].subject
    );
    assert!(
        mails[0]
            .part("text/plain")
            .contains("its secrets were deleted")
    );
    let (_, metrics) = http_get(&format!("{}/metrics", daemon.admin)).await;
    for want in [
        "outboxd_endpoints_unsigned 1",
        "outboxd_signing_stopped_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == want), "{want} in\n{metrics}");
    }
    // Still delivered, unsigned; no second email after a few more looks.
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(6316, 1, 'UNSIGNED')")
        .await
        .unwrap();
    eventually_count(
        &client,
        "delivered",
        SECS(20),
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
        1,
    )
    .await;
    tokio::time::sleep(SECS(1)).await;
    let log = daemon.log();
    assert!(daemon.stop().await.success());
    assert_eq!(smtp.mails().len(), 1);
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("has no active signing secret"))
            .count(),
        1
    );
    let key = &secret["whsec_".len()..];
    assert!(!log.iter().any(|l| l.contains(key)), "a secret in the log");
    assert!(!smtp.mails()[0].raw.contains(key), "a secret in the email");
}
