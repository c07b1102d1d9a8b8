//! `outboxd migrate`, `outboxd check` and configuration errors, run as real
//! processes against real databases.

use crate::harness::{TempDir, TestDb, outboxd_command, run, url_with_dbname};

async fn table_exists(db: &TestDb, name: &str) -> bool {
    db.client()
        .await
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn migrate_creates_the_schema_and_a_second_run_changes_nothing() {
    let db = TestDb::empty().await;
    let first = run(db.outboxd().arg("migrate")).await;
    assert_eq!(first.code, Some(0), "{first:?}");
    let want = format!(
        "from version 0 to {}",
        outboxd::store::migrate::latest_version()
    );
    assert!(first.stdout.contains(&want), "{first:?}");
    // Issue 27.7: the indexes the first migrations create and later ones
    // replace were never the operator's; nothing was replaced.
    assert!(!first.stdout.contains("dropped"), "{first:?}");
    assert!(
        !crate::harness::count(
            &db.client().await,
            "SELECT count(*) FROM pg_class WHERE relname IN ('events_due', 'events_company_created')"
        )
        .await
        .is_positive(),
        "the replaced indexes are gone all the same"
    );
    for table in [
        "outbox.events",
        "outbox.endpoints",
        "outbox.attempts",
        "outbox.schema_migrations",
    ] {
        assert!(table_exists(&db, table).await, "{table} missing");
    }
    let client = db.client().await;
    let before: (i64, String) = {
        let row = client
            .query_one(
                "SELECT count(*), max(applied_at)::text FROM outbox.schema_migrations",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };

    let second = run(db.outboxd().arg("migrate")).await;
    assert_eq!(second.code, Some(0), "{second:?}");
    assert!(second.stdout.contains("nothing to do"), "{second:?}");
    let row = client
        .query_one(
            "SELECT count(*), max(applied_at)::text FROM outbox.schema_migrations",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, String>(1)), before);
}

/// Issue 27.8: creating the schema in the `postgres` maintenance database
/// is allowed (some hosted services name the application's database so)
/// but said loudly, with the way back; once, not at every later migrate.
#[tokio::test]
async fn migrate_warns_when_it_creates_the_schema_in_the_maintenance_database() {
    let pg = crate::private_pg::PrivatePg::start().await;
    let migrate = || {
        let mut cmd = outboxd_command();
        cmd.env("OUTBOXD_DATABASE__URL", pg.admin_url())
            .arg("migrate");
        cmd
    };
    let first = run(&mut migrate()).await;
    assert_eq!(first.code, Some(0), "{first:?}");
    for part in [
        "outboxd: warning: the outbox schema was created in the `postgres` maintenance database",
        "OUTBOXD_DATABASE__URL",
        "DROP SCHEMA outbox CASCADE",
    ] {
        assert!(first.stderr.contains(part), "{part:?} not in {first:?}");
    }
    let second = run(&mut migrate()).await;
    assert_eq!(second.code, Some(0), "{second:?}");
    assert!(!second.stderr.contains("warning"), "{second:?}");

    // Any other database: no warning.
    let db = TestDb::empty().await;
    let elsewhere = run(db.outboxd().arg("migrate")).await;
    assert_eq!(elsewhere.code, Some(0), "{elsewhere:?}");
    assert!(!elsewhere.stderr.contains("warning"), "{elsewhere:?}");
}

#[tokio::test]
async fn concurrent_migrations_apply_each_version_once() {
    let db = TestDb::empty().await;
    let mut children = Vec::new();
    for _ in 0..4 {
        let mut cmd = db.outboxd();
        cmd.arg("migrate");
        children.push(tokio::spawn(async move { run(&mut cmd).await }));
    }
    let mut migrated = 0;
    for child in children {
        let ran = child.await.unwrap();
        assert_eq!(ran.code, Some(0), "{ran:?}");
        if ran.stdout.contains("migrated") {
            migrated += 1;
        }
    }
    assert_eq!(migrated, 1, "exactly one instance applies the migrations");
    let rows: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM outbox.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, outboxd::store::migrate::latest_version() as i64);
}

#[tokio::test]
async fn migrate_refuses_a_schema_newer_than_the_binary() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO outbox.schema_migrations (version, name, checksum) VALUES (999, 'from_the_future', 'x')",
        )
        .await
        .unwrap();
    for sub in ["migrate", "check"] {
        let ran = run(db.outboxd().arg(sub)).await;
        assert_eq!(ran.code, Some(3), "{sub}: {ran:?}");
        assert!(
            ran.stderr.contains("version 999, newer than"),
            "{sub}: {ran:?}"
        );
    }
}

#[tokio::test]
async fn an_edited_migration_is_caught() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute("UPDATE outbox.schema_migrations SET checksum = 'edited' WHERE version = 1")
        .await
        .unwrap();
    let ran = run(db.outboxd().arg("migrate")).await;
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(
        ran.stderr
            .contains("migration 1 (outbox_schema) was changed"),
        "{ran:?}"
    );
}

#[tokio::test]
async fn check_passes_on_a_migrated_database() {
    let db = TestDb::new().await;
    let ran = run(db.outboxd().arg("check")).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("config: ok"), "{ran:?}");
    assert!(ran.stdout.contains("database: ok"), "{ran:?}");
    let want = format!(
        "schema: ok (version {})",
        outboxd::store::migrate::latest_version()
    );
    assert!(ran.stdout.contains(&want), "{ran:?}");
}

#[tokio::test]
async fn check_fails_with_exit_3_before_migrate_and_changes_nothing() {
    let db = TestDb::empty().await;
    let ran = run(db.outboxd().arg("check")).await;
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("run `outboxd migrate`"), "{ran:?}");
    assert!(!table_exists(&db, "outbox.schema_migrations").await);
}

#[tokio::test]
async fn an_unreachable_database_exits_1_without_showing_the_password() {
    // Port 1 on loopback: nothing listens there, so the connect is refused.
    let url = url_with_dbname("postgres://outboxd:hunter2@127.0.0.1:1", "sales");
    for sub in ["check", "migrate"] {
        let ran = run(outboxd_command()
            .env("OUTBOXD_DATABASE__URL", &url)
            .arg(sub))
        .await;
        assert_eq!(ran.code, Some(1), "{sub}: {ran:?}");
        assert!(ran.stderr.contains("127.0.0.1:1/sales"), "{sub}: {ran:?}");
        assert!(ran.stderr.contains("refused"), "{sub}: {ran:?}");
        assert!(!ran.stderr.contains("hunter2"), "{sub}: password leaked");
        assert!(!ran.stdout.contains("hunter2"), "{sub}: password leaked");
    }
}

#[tokio::test]
async fn invalid_configuration_exits_2_naming_the_key() {
    let dir = TempDir::new("cli-config");
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[database]\npasword = \"hunter2\"\n").unwrap();
    let numeric_password = dir.join("numeric-password.toml");
    std::fs::write(&numeric_password, "[database]\npassword = 87654321\n").unwrap();
    let bad_value = dir.join("bad.toml");
    std::fs::write(&bad_value, "[log]\nformat = \"xml\"\n").unwrap();

    let cases: Vec<(tokio::process::Command, &str)> = vec![
        (
            {
                let mut c = outboxd_command();
                c.env("OUTBOXD_DATABASE__CONNECT_TIMEOUT", "soon");
                c
            },
            "database.connect_timeout",
        ),
        (
            {
                let mut c = outboxd_command();
                c.env("OUTBOXD_DATABASE__URL", "postgres://h:notaport/db");
                c
            },
            "database.url",
        ),
        (
            {
                let mut c = outboxd_command();
                c.env("OUTBOXD_LOG__LEVL", "debug");
                c
            },
            "levl",
        ),
        (
            {
                let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
                c.arg("--config").arg(&typo);
                c
            },
            "pasword",
        ),
        (
            {
                let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
                c.arg("--config").arg(&bad_value);
                c
            },
            "log.format",
        ),
        (
            {
                let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
                c.arg("--config").arg(&numeric_password);
                c
            },
            "database.password: invalid value (not shown",
        ),
        (
            {
                let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
                c.arg("--config").arg(dir.join("missing.toml"));
                c
            },
            "missing.toml does not exist",
        ),
    ];
    for (mut cmd, want) in cases {
        let ran = run(cmd.arg("check")).await;
        assert_eq!(ran.code, Some(2), "{want}: {ran:?}");
        assert!(ran.stderr.contains(want), "want {want:?} in: {ran:?}");
        assert!(!ran.stderr.contains("hunter2"), "secret leaked: {ran:?}");
        assert!(!ran.stderr.contains("87654321"), "secret leaked: {ran:?}");
    }
}

#[tokio::test]
async fn a_password_file_is_read_and_never_printed() {
    // The test server trusts loopback, so it never asks for the password;
    // that the file's content reaches the connection settings is checked by
    // the config unit tests. Here: the file is accepted, a missing one is a
    // config error naming the key.
    let db = TestDb::new().await;
    let dir = TempDir::new("cli-pw");
    let file = dir.join("db-password");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let ran = run(db
        .outboxd()
        .env("OUTBOXD_DATABASE__PASSWORD_FILE", &file)
        .arg("check"))
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(!ran.stdout.contains("from-a-file") && !ran.stderr.contains("from-a-file"));

    let ran = run(db
        .outboxd()
        .env("OUTBOXD_DATABASE__PASSWORD_FILE", dir.join("absent"))
        .arg("check"))
    .await;
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(
        ran.stderr.contains("database.password_file: cannot read"),
        "{ran:?}"
    );
}

#[tokio::test]
async fn a_numeric_password_in_the_environment_is_taken_as_text() {
    // Through figment's Env parsing, 12345678 would become a number, be
    // refused as one, and be printed in the error.
    let db = TestDb::new().await;
    let ran = run(db
        .outboxd()
        .env("OUTBOXD_DATABASE__PASSWORD", "12345678")
        .arg("check"))
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(!ran.stdout.contains("12345678") && !ran.stderr.contains("12345678"));
}

#[tokio::test]
async fn help_explains_each_subcommand_with_an_example() {
    for sub in ["migrate", "check"] {
        let ran = run(outboxd_command().arg(sub).arg("--help")).await;
        assert_eq!(ran.code, Some(0), "{ran:?}");
        assert!(ran.stdout.contains("Example:"), "{sub}: {ran:?}");
    }
}

/// Fills `outbox.events` with `rows` events and gives it the indexes of
/// before migrations 0006 and 0009 instead of its own, as an outbox looks
/// before `migrate` builds them online and drops the old ones.
async fn without_online_indexes(db: &TestDb, rows: i64) {
    db.client()
        .await
        .execute(
            "INSERT INTO outbox.events (company_id, payload)
             SELECT 1 + g % 500, jsonb_build_object('companyId', 1 + g % 500, 'paymentId', g, 'paymentNumber', g::text)
               FROM generate_series(1, $1::bigint) g",
            &[&rows],
        )
        .await
        .unwrap();
    db.client()
        .await
        .batch_execute(
            "DROP INDEX outbox.events_pending_due, outbox.events_endpoint_pending,
                        outbox.events_lease_expiry, outbox.events_company_settled,
                        outbox.events_scheduled;
             CREATE INDEX events_company_created ON outbox.events (company_id, created_at);
             CREATE INDEX events_due ON outbox.events (next_attempt_at)
                 WHERE state IN ('pending', 'leased');
             CREATE INDEX events_endpoint_due
                 ON outbox.events (company_id, event_type, next_attempt_at, id)
                 WHERE state IN ('pending', 'leased');",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn migrate_builds_indexes_online_while_the_application_goes_on_enqueueing() {
    let db = TestDb::new().await;
    without_online_indexes(&db, 400_000).await;
    // Until the indexes are built the schema counts as incomplete: the
    // daemon and the operator commands wait or refuse, naming the index.
    let check = run(db.outboxd().arg("check")).await;
    assert_eq!(check.code, Some(3), "{check:?}");
    assert!(
        check.stderr.contains("outbox.events_pending_due"),
        "{check:?}"
    );

    let url = db.url.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let writer = tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut worst = std::time::Duration::ZERO;
        let mut n = 0;
        while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
            let started = std::time::Instant::now();
            client
                .execute(
                    "SELECT outbox.enqueue_payment_cancellation(7, $1, 'M')",
                    &[&(n as i64 + 1)],
                )
                .await
                .unwrap();
            worst = worst.max(started.elapsed());
            n += 1;
        }
        (n, worst)
    });
    let started = std::time::Instant::now();
    let migrated = run(db.outboxd().arg("migrate")).await;
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (enqueued, worst) = writer.await.unwrap();
    assert_eq!(migrated.code, Some(0), "{migrated:?}");
    assert!(
        migrated.stdout.contains(
            "built indexes online: events_pending_due, events_endpoint_pending, events_lease_expiry, \
             events_company_settled, events_scheduled"
        ),
        "{migrated:?}"
    );
    assert!(
        migrated
            .stdout
            .contains("dropped replaced indexes online: events_endpoint_due, events_due, events_company_created"),
        "{migrated:?}"
    );
    let left = "SELECT count(*) FROM pg_class
                 WHERE relname IN ('events_due', 'events_endpoint_due')";
    assert_eq!(crate::harness::count(&db.client().await, left).await, 0);
    assert!(
        worst < std::time::Duration::from_secs(1),
        "an enqueue waited {worst:?} during a {took:?} migration"
    );
    assert!(enqueued > 10, "only {enqueued} enqueues in {took:?}");
    let check = run(db.outboxd().arg("check")).await;
    assert!(check.stdout.contains("schema: ok"), "{check:?}");
}

#[tokio::test]
async fn an_interrupted_online_build_is_dropped_and_built_again() {
    let db = TestDb::new().await;
    without_online_indexes(&db, 10).await;
    // A build that failed half-way leaves an invalid index of that name.
    let client = db.client().await;
    let failed = client
        .batch_execute(
            "CREATE INDEX CONCURRENTLY events_endpoint_pending ON outbox.events ((1 / (company_id - company_id)))",
        )
        .await;
    assert!(failed.is_err());
    let valid = "SELECT count(*) FROM pg_index WHERE indexrelid = 'outbox.events_endpoint_pending'::regclass AND indisvalid";
    assert_eq!(crate::harness::count(&client, valid).await, 0);
    let check = run(db.outboxd().arg("check")).await;
    assert_eq!(check.code, Some(3), "{check:?}");

    let migrated = run(db.outboxd().arg("migrate")).await;
    assert_eq!(migrated.code, Some(0), "{migrated:?}");
    assert_eq!(crate::harness::count(&client, valid).await, 1);
    let check = run(db.outboxd().arg("check")).await;
    assert_eq!(check.code, Some(0), "{check:?}");
}

#[tokio::test]
async fn check_names_a_replaced_index_left_behind_and_migrate_drops_it() {
    let db = TestDb::new().await;
    // As after a `migrate` interrupted between 0006's builds and its drops.
    db.client()
        .await
        .batch_execute(
            "CREATE INDEX events_due ON outbox.events (next_attempt_at)
                 WHERE state IN ('pending', 'leased')",
        )
        .await
        .unwrap();
    let check = run(db.outboxd().arg("check")).await;
    assert_eq!(check.code, Some(0), "{check:?}");
    assert!(
        check
            .stdout
            .contains("replaced indexes still there: events_due"),
        "{check:?}"
    );

    let migrated = run(db.outboxd().arg("migrate")).await;
    assert_eq!(migrated.code, Some(0), "{migrated:?}");
    assert!(
        migrated
            .stdout
            .contains("dropped replaced indexes online: events_due"),
        "{migrated:?}"
    );
    let check = run(db.outboxd().arg("check")).await;
    assert_eq!(check.code, Some(0), "{check:?}");
    assert!(!check.stdout.contains("replaced indexes"), "{check:?}");
}

/// Issue 15.5: Kubernetes gives every pod of a namespace with a Service
/// named `outboxd` variables like OUTBOXD_PORT; they are not settings (no
/// `__`), so they are ignored with one warning naming them, while a
/// setting-shaped typo still stops the daemon naming the key.
#[tokio::test]
async fn kubernetes_service_variables_are_ignored_with_a_warning_and_typos_still_exit_2() {
    let db = TestDb::new().await;
    let ran = run(db
        .outboxd()
        .env("OUTBOXD_PORT", "tcp://10.0.0.1:80")
        .env("OUTBOXD_SERVICE_HOST", "10.0.0.1")
        .arg("check"))
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let warnings: Vec<&str> = ran
        .stderr
        .lines()
        .filter(|l| l.contains("ignoring OUTBOXD_ variables"))
        .collect();
    assert_eq!(warnings.len(), 1, "{ran:?}");
    assert!(
        warnings[0].contains("OUTBOXD_PORT, OUTBOXD_SERVICE_HOST"),
        "{ran:?}"
    );
    assert!(
        !ran.stderr.contains("10.0.0.1"),
        "values are not shown: {ran:?}"
    );

    let typo = run(db
        .outboxd()
        .env("OUTBOXD_PORT", "tcp://10.0.0.1:80")
        .env("OUTBOXD_LOG__LEVL", "debug")
        .arg("check"))
    .await;
    assert_eq!(typo.code, Some(2), "{typo:?}");
    assert!(typo.stderr.contains("levl"), "{typo:?}");
}

/// Issue 15.2: a port already taken fails the start, naming the setting.
/// Issue 27.2: at once (before waiting for anything), and saying how to
/// change it: the key, its environment variable, and "off".
#[tokio::test]
async fn an_admin_port_in_use_fails_the_start_naming_metrics_listen() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let started = std::time::Instant::now();
    let ran = run(db
        .outboxd()
        .env("OUTBOXD_METRICS__LISTEN", &addr)
        // Nothing answers here: the port is refused before the database
        // is awaited.
        .env(
            "OUTBOXD_DATABASE__URL",
            "postgres://postgres@127.0.0.1:1/none",
        )
        .arg("run"))
    .await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    for part in [
        &format!("metrics.listen: cannot serve on {addr}: "),
        "another process, perhaps another outboxd, listens there",
        "set metrics.listen (or OUTBOXD_METRICS__LISTEN) to a free address",
        "or \"off\" for no admin server",
    ] {
        assert!(ran.stderr.contains(part), "{part:?} not in {ran:?}");
    }
}

/// Issue 15.2: the default admin port is outside the range Prometheus'
/// list of default port allocations has given out (9100-9999).
#[tokio::test]
async fn the_default_admin_port_is_outside_the_exporters_range() {
    let listen = outboxd::config::RawConfig::default()
        .validate()
        .unwrap()
        .metrics
        .listen
        .expect("on by default");
    assert_eq!(listen.to_string(), "127.0.0.1:7464");
    assert!(!(9100..=9999).contains(&listen.port()));
}
