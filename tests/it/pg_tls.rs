//! TLS to PostgreSQL (issue 15): a private cluster with `ssl = on`, a
//! certificate for `localhost` signed by a CA this test makes, and a
//! pg_hba.conf that admits the daemon's role only over TLS (`hostssl`).
//! The daemon (pool, plain claim, LISTEN) and the CLI connect with each
//! `database.tls` mode; what must be refused is refused, with the reason.

use std::time::Duration;

use crate::faults::openssl;
use crate::harness::{Daemon, Ran, TempDir, TestDb, count, eventually, run, url_with_dbname};
use crate::private_pg::PrivatePg;
use crate::receiver::Receiver;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// In `dir`: `ca.pem` (the test's CA), `server.pem` and `server.key` (for
/// DNS name localhost only, signed by it), and `other-ca.pem`, a CA that
/// signed nothing here.
fn make_certificates(dir: &TempDir) {
    const EC: &[&str] = &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    for (name, cn) in [
        ("ca", "/CN=outboxd test CA"),
        ("other-ca", "/CN=another CA"),
    ] {
        let key = format!("{name}.key");
        let pem = format!("{name}.pem");
        let args = [
            &["req", "-x509", "-nodes", "-days", "30"][..],
            EC,
            &["-keyout", &key, "-out", &pem, "-subj", cn],
        ]
        .concat();
        openssl(dir, &args);
    }
    let request = [
        &["req", "-new", "-nodes"][..],
        EC,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat();
    openssl(dir, &request);
    std::fs::write(dir.join("san.cnf"), "subjectAltName = DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "san.cnf",
            "-out",
            "server.pem",
        ],
    );
    // A client certificate for the role outboxd_cert (pg_hba `cert`: the
    // CN is the role), its key in PKCS#8 as outboxd reads it.
    let request = [
        &["req", "-new", "-nodes"][..],
        EC,
        &[
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=outboxd_cert",
        ],
    ]
    .concat();
    openssl(dir, &request);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-out",
            "client.pem",
        ],
    );
}

/// `outboxd` pointed at `url` with these `database.*` settings (by
/// environment), nothing else of the test database's.
fn outboxd(db: &TestDb, url: &str, settings: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = db.outboxd();
    cmd.env("OUTBOXD_DATABASE__URL", url);
    for (key, value) in settings {
        cmd.env(format!("OUTBOXD_DATABASE__{}", key.to_uppercase()), value);
    }
    cmd
}

fn assert_refused(ran: &Ran, what: &str, reason: &str) {
    assert_ne!(ran.code, Some(0), "{what}: {ran:?}");
    assert!(
        ran.stderr.contains(reason),
        "{what}: {reason:?} not in {ran:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_postgresql_verifies_the_server_and_delivers_end_to_end() {
    let certs = TempDir::new("pg-tls");
    make_certificates(&certs);
    let pg = PrivatePg::start_tls(
        &certs.join("server.pem"),
        &certs.join("server.key"),
        &certs.join("ca.pem"),
    )
    .await;
    // The tests' own sessions are the postgres role, let in without TLS.
    let db = TestDb::new_on(&pg.admin_url()).await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE ROLE outboxd_tls LOGIN SUPERUSER; CREATE ROLE outboxd_cert LOGIN SUPERUSER",
        )
        .await
        .unwrap();
    let receiver = Receiver::ok().await;
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES (1, $1)",
            &[&receiver.url("/")],
        )
        .await
        .unwrap();
    let ca = certs.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let at = |host: &str| {
        url_with_dbname(
            &format!("postgres://outboxd_tls@{host}:{}/postgres", pg.port),
            &db.name,
        )
    };
    let by_name = at("localhost");
    let by_address = at("127.0.0.1");
    let verify_full = [("tls", "verify-full"), ("tls_ca_file", ca)];

    // The CLI, verify-full with the CA: the mode and the certificate named.
    let check = run(outboxd(&db, &by_name, &verify_full).arg("check")).await;
    assert_eq!(check.code, Some(0), "{check:?}");
    assert!(
        check
            .stdout
            .contains("TLS verify-full, server certificate CN=localhost"),
        "{check:?}"
    );
    // The same in libpq's words, in the URL.
    let in_url = format!("{by_name}?sslmode=verify-full&sslrootcert={ca}");
    let check = run(outboxd(&db, &in_url, &[]).arg("check")).await;
    assert_eq!(check.code, Some(0), "{check:?}");

    // The daemon: every connection over TLS, a NOTIFY wakes it (polling
    // every minute would not deliver in time), the event delivered.
    let mut cmd = outboxd(&db, &by_name, &verify_full);
    cmd.env("RUST_LOG", "outboxd=debug,info")
        .env("OUTBOXD_DELIVERY__POLL_INTERVAL", "60s");
    let daemon = Daemon::spawn(cmd).await;
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(1, 7, 'TLS')",
            &[],
        )
        .await
        .unwrap();
    receiver.wait_for(1, SECS(10)).await;
    eventually("the event marked delivered", SECS(10), || async {
        count(
            &client,
            "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
        )
        .await
            == 1
    })
    .await;
    let plaintext = count(
        &client,
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.usename = 'outboxd_tls' AND NOT s.ssl",
    )
    .await;
    let encrypted = count(
        &client,
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.usename = 'outboxd_tls' AND s.ssl",
    )
    .await;
    assert_eq!(plaintext, 0);
    assert!(encrypted >= 3, "pool, plain claim and LISTEN: {encrypted}");
    assert!(daemon.stop().await.success());

    // verify-full refuses a certificate for another name (it is for
    // localhost, not 127.0.0.1) and one no trusted CA signed.
    let wrong_name = run(outboxd(&db, &by_address, &verify_full).arg("check")).await;
    assert_refused(
        &wrong_name,
        "the wrong host name",
        "certificate verify failed",
    );
    let no_ca = run(outboxd(&db, &by_name, &[("tls", "verify-full")]).arg("check")).await;
    assert_refused(&no_ca, "without the CA", "certificate verify failed");
    let other_ca = certs.join("other-ca.pem");
    let other = [
        ("tls", "verify-full"),
        ("tls_ca_file", other_ca.to_str().unwrap()),
    ];
    let wrong_ca = run(outboxd(&db, &by_name, &other).arg("check")).await;
    assert_refused(&wrong_ca, "another CA", "certificate verify failed");
    // verify-ca checks the signer only; require encrypts without checking.
    let verify_ca = [("tls", "verify-ca"), ("tls_ca_file", ca)];
    let ran = run(outboxd(&db, &by_address, &verify_ca).arg("check")).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let ran = run(outboxd(&db, &by_address, &[("tls", "require")]).arg("status")).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    // disable: the server itself refuses (hostnossl … reject).
    let ran = run(outboxd(&db, &by_name, &[("tls", "disable")]).arg("check")).await;
    assert_refused(&ran, "without TLS", "no encryption");
    // A role the server lets in only with a client certificate for it.
    let as_cert_role = url_with_dbname(
        &format!("postgres://outboxd_cert@localhost:{}/postgres", pg.port),
        &db.name,
    );
    let client_cert = certs.join("client.pem");
    let client_key = certs.join("client.key");
    let with_cert = [
        ("tls", "verify-full"),
        ("tls_ca_file", ca),
        ("tls_cert_file", client_cert.to_str().unwrap()),
        ("tls_key_file", client_key.to_str().unwrap()),
    ];
    let ran = run(outboxd(&db, &as_cert_role, &with_cert).arg("check")).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let ran = run(outboxd(&db, &as_cert_role, &verify_full).arg("check")).await;
    assert_refused(&ran, "without the client certificate", "certificate");
    // prefer would fall back to plaintext: refused before connecting.
    let ran = run(outboxd(&db, &by_name, &[("tls", "prefer")]).arg("check")).await;
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(ran.stderr.contains("database.tls"), "{ran:?}");
}
