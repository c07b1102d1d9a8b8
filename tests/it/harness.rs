//! Test support: a fresh database per test and the `outboxd` binary as a
//! real process.

use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};

use futures_util::stream::poll_fn;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

/// The server every test database is created on.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// `url` with its database name replaced by `dbname`.
pub fn url_with_dbname(url: &str, dbname: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base
        .find("://")
        .map(|i| i + 3)
        .expect("DATABASE_URL must be a postgres:// URL");
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{dbname}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A new connection to the database at `url`, its connection driven on a
/// task of its own (for tasks that cannot borrow a [`TestDb`]).
pub async fn connect_url(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
    tokio::spawn(connection);
    client
}

/// A database that exists for one test and is dropped when it goes out of
/// scope, even when the test panics.
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// The server's maintenance database, where it was created and where
    /// it is dropped from.
    admin: String,
}

impl TestDb {
    /// A fresh database with the outbox schema migrated.
    pub async fn new() -> TestDb {
        TestDb::new_on(&admin_url()).await
    }

    /// A fresh migrated database on the server of `admin` (a URL of an
    /// existing database there), e.g. a test's private cluster.
    pub async fn new_on(admin: &str) -> TestDb {
        let db = TestDb::empty_on(admin).await;
        let mut client = db.client().await;
        outboxd::store::migrate::migrate(&mut client)
            .await
            .expect("migrating the test database");
        db
    }

    /// A fresh database with nothing in it.
    pub async fn empty() -> TestDb {
        TestDb::empty_on(&admin_url()).await
    }

    /// A fresh migrated database in `encoding` (e.g. "LATIN1"), with the C
    /// locale, which goes with any encoding.
    pub async fn new_in_encoding(encoding: &str) -> TestDb {
        let options =
            format!("ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
        let db = TestDb::create(&admin_url(), &options).await;
        let mut client = db.client().await;
        outboxd::store::migrate::migrate(&mut client)
            .await
            .expect("migrating the test database");
        db
    }

    async fn empty_on(admin_url: &str) -> TestDb {
        TestDb::create(admin_url, "").await
    }

    /// Creates the database with `options` after CREATE DATABASE's name.
    async fn create(admin_url: &str, options: &str) -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "outboxd_test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect_url(admin_url).await;
        // Two statements: CREATE DATABASE cannot run inside the implicit
        // transaction of a multi-statement string.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name} {options}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {}", outboxd::store::pool::describe(&e)));
        }
        TestDb {
            url: url_with_dbname(admin_url, &name),
            name,
            admin: admin_url.to_string(),
        }
    }

    /// The configuration the daemon would have for this database, with
    /// `edit` applied to the raw form first.
    pub fn config_with(
        &self,
        edit: impl FnOnce(&mut outboxd::config::RawConfig),
    ) -> outboxd::config::Config {
        let mut raw = outboxd::config::RawConfig {
            database: outboxd::config::RawDatabase {
                url: Some(self.url.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        edit(&mut raw);
        raw.validate().expect("a valid test configuration")
    }

    /// The daemon's connection pool for this database (its session settings
    /// included), for tests that drive the library directly.
    pub fn pool(&self) -> deadpool_postgres::Pool {
        outboxd::store::pool::pool(&self.config_with(|_| {}).database)
    }

    /// The daemon's plain claim's connection for this database.
    pub fn claim_pool(&self) -> deadpool_postgres::Pool {
        outboxd::store::pool::claim_pool(&self.config_with(|_| {}).database)
    }

    /// A new connection to this database.
    pub async fn client(&self) -> Client {
        connect_url(&self.url).await
    }

    /// A connection that LISTENs on `channel`; notifications arrive on the
    /// returned receiver in commit order.
    pub async fn listen(&self, channel: &str) -> (Client, mpsc::UnboundedReceiver<Notification>) {
        let (client, mut connection) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = poll_fn(move |cx| connection.poll_message(cx));
            use futures_util::StreamExt;
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n);
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .unwrap();
        (client, rx)
    }

    /// A session LISTENing on the daemon's channel `outbox_events` and on
    /// [`MARKER`], which the daemon does not listen on: PostgreSQL delivers
    /// both in commit order (see [`notifications_before_marker`]).
    pub async fn listen_with_marker(&self) -> (Client, mpsc::UnboundedReceiver<Notification>) {
        let (client, notifications) = self.listen("outbox_events").await;
        client
            .batch_execute(&format!("LISTEN {MARKER}"))
            .await
            .unwrap();
        (client, notifications)
    }

    /// `outboxd` as a child process pointed at this database, with the
    /// repository's reference config.
    pub fn outboxd(&self) -> tokio::process::Command {
        let mut cmd = outboxd_command();
        cmd.env("OUTBOXD_DATABASE__URL", &self.url)
            // The test receivers live on loopback, which the SSRF guard
            // refuses by default (`endpoint test`, `run`).
            .env("OUTBOXD_DELIVERY__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#);
        cmd
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async context (and maybe while panicking), so the
        // cleanup gets a small runtime of its own on a plain thread.
        let name = self.name.clone();
        let admin = self.admin.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin, NoTls).await {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// The repository root (where `config.toml` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The built `outboxd` binary with the reference config and no inherited
/// OUTBOXD_ variables, so the developer's environment cannot leak in.
/// Nor systemd's notify variables: a suite run from a unit must not ping
/// that unit's watchdog (tests that want them pass their own).
pub fn outboxd_command() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOXD_")
            || key == "RUST_LOG"
            || ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"].contains(&key.as_str())
        {
            cmd.env_remove(key);
        }
    }
    cmd.arg("--config").arg(repo_root().join("config.toml"));
    cmd.kill_on_drop(true);
    cmd
}

/// A finished process's exit code and output, for assertions.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(out: Output) -> Ran {
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs a command to completion.
pub async fn run(cmd: &mut tokio::process::Command) -> Ran {
    cmd.output().await.expect("running outboxd").into()
}

#[test]
fn url_with_dbname_replaces_only_the_database() {
    let cases = [
        (
            "postgres://u@h:5432/postgres",
            "t1",
            "postgres://u@h:5432/t1",
        ),
        ("postgres://u@h:5432", "t1", "postgres://u@h:5432/t1"),
        (
            "postgresql://u:p@h/postgres?sslmode=disable",
            "t1",
            "postgresql://u:p@h/t1?sslmode=disable",
        ),
    ];
    for (url, db, want) in cases {
        assert_eq!(url_with_dbname(url, db), want);
    }
}

/// A directory under the system temp dir, removed when dropped (also when the
/// test fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "outboxd-{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `outboxd run` as a child process, its stderr collected line by line.
pub struct Daemon {
    child: tokio::process::Child,
    /// Each line with the instant it was read, for tests that time them.
    lines: tokio::sync::watch::Receiver<Vec<(std::time::Instant, String)>>,
    /// `http://127.0.0.1:PORT` of its admin server (/metrics, /readyz).
    pub admin: String,
}

impl Daemon {
    /// Starts `outboxd run` on `db` with extra `OUTBOXD_…` settings and
    /// waits until it is delivering and listening.
    pub async fn start(db: &TestDb, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = db.outboxd();
        cmd.env("RUST_LOG", "outboxd=debug,info");
        Daemon::spawn_with(cmd, env).await
    }

    /// Runs `cmd` with `run` appended (an `outboxd` command with its config
    /// and database chosen) and waits until it is delivering and listening.
    pub async fn spawn(cmd: tokio::process::Command) -> Daemon {
        Daemon::spawn_with(cmd, &[]).await
    }

    /// Like [`Daemon::start`], but waits only for the log line containing
    /// `needle` (e.g. "admin HTTP listening"): for a daemon that is not
    /// expected to be delivering yet, such as one started with its database
    /// down.
    pub async fn start_until(db: &TestDb, env: &[(&str, &str)], needle: &str) -> Daemon {
        let mut cmd = db.outboxd();
        cmd.env("RUST_LOG", "outboxd=debug,info");
        Daemon::spawn_until(cmd, env, needle).await
    }

    /// Like [`Daemon::spawn`], with `env` set last (it wins over the test
    /// defaults).
    pub async fn spawn_with(cmd: tokio::process::Command, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_until(cmd, env, "listening for NOTIFY").await
    }

    /// [`Daemon::spawn_with`], waiting for the line containing `needle`
    /// instead of "listening for NOTIFY".
    pub async fn spawn_until(
        mut cmd: tokio::process::Command,
        env: &[(&str, &str)],
        needle: &str,
    ) -> Daemon {
        cmd.arg("run")
            // Tests run side by side: each admin server on a port of its own.
            .env("OUTBOXD_METRICS__LISTEN", "127.0.0.1:0")
            // The receivers live on loopback, which the SSRF guard refuses
            // by default. (A test's own env entry replaces this one.)
            .env("OUTBOXD_DELIVERY__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (key, value) in env {
            cmd.env(key, value);
        }
        let mut child = cmd.spawn().expect("starting outboxd run");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(Vec::new());
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if std::env::var_os("OUTBOXD_TEST_ECHO").is_some() {
                    eprintln!("[outboxd] {line}");
                }
                let at = std::time::Instant::now();
                tx.send_modify(|lines| lines.push((at, line)));
            }
        });
        let mut daemon = Daemon {
            child,
            lines: rx,
            admin: String::new(),
        };
        daemon
            .wait_for_log(needle, std::time::Duration::from_secs(20))
            .await;
        if let Some(line) = daemon
            .log()
            .iter()
            .find(|l| l.contains("admin HTTP listening"))
        {
            let start = line.find("http://").expect("a URL in the admin line");
            let url: String = line[start..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect();
            daemon.admin = url;
        }
        daemon
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("still running") as i32
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.borrow().iter().map(|(_, l)| l.clone()).collect()
    }

    /// When each line containing `needle` was read: for tests that check
    /// how far apart the daemon logs something (a retry's backoff).
    pub fn log_instants(&self, needle: &str) -> Vec<std::time::Instant> {
        self.lines
            .borrow()
            .iter()
            .filter(|(_, l)| l.contains(needle))
            .map(|(at, _)| *at)
            .collect()
    }

    /// Waits for a log line containing `needle`; panics with the log after
    /// `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: std::time::Duration) -> String {
        self.wait_for_logs(needle, 1, timeout).await
    }

    /// Waits until `n` log lines contain `needle` (a retry logged again and
    /// again) and returns the `n`th; panics with the log after `timeout`.
    pub async fn wait_for_logs(
        &self,
        needle: &str,
        n: usize,
        timeout: std::time::Duration,
    ) -> String {
        let mut lines = self.lines.clone();
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some((_, line)) = lines
                    .borrow_and_update()
                    .iter()
                    .filter(|(_, l)| l.contains(needle))
                    .nth(n - 1)
                {
                    return Some(line.clone());
                }
                if lines.changed().await.is_err() {
                    // stderr closed: the process ended without that line.
                    return None;
                }
            }
        })
        .await;
        let why = match found {
            Ok(Some(line)) => return line,
            Ok(None) => "before outboxd closed its stderr (it exited)".to_string(),
            Err(_) => format!("within {timeout:?}"),
        };
        let wanted = match n {
            1 => "no log line".to_string(),
            n => format!("fewer than {n} log lines"),
        };
        panic!(
            "{wanted} with {needle:?} {why}; log:\n{}",
            self.log().join("\n")
        )
    }

    /// Sends a signal (libc::SIGTERM, SIGKILL, …).
    pub fn signal(&self, signal: i32) {
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub async fn wait(&mut self, timeout: std::time::Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "outboxd did not exit within {timeout:?}; log:\n{}",
                self.log().join("\n")
            ),
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it still
    /// runs (it is killed when the `Daemon` is dropped).
    pub async fn wait_up_to(
        &mut self,
        timeout: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .map(|status| status.unwrap())
    }

    /// SIGTERM, then the exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(std::time::Duration::from_secs(30)).await
    }
}

/// `TimeoutStopSec=` of systemd/outboxd.service: how long systemd waits
/// after SIGTERM before it sends SIGKILL. Read from the unit, so a test of a
/// bounded stop follows the file. A bare number is seconds (systemd.time(7)).
pub fn unit_stop_timeout() -> std::time::Duration {
    let path = repo_root().join("systemd/outboxd.service");
    let unit = std::fs::read_to_string(&path).unwrap();
    let value = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TimeoutStopSec="))
        .next_back()
        .unwrap_or_else(|| panic!("no TimeoutStopSec= in {}", path.display()))
        .trim();
    match value.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(value)
            .unwrap_or_else(|e| panic!("TimeoutStopSec={value} in {}: {e}", path.display())),
    }
}

/// GET `url`; returns the status and body.
pub async fn http_get(url: &str) -> (u16, String) {
    use http_body_util::{BodyExt, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.get(url.parse().unwrap()),
    )
    .await
    .expect("GET timed out")
    .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The single integer a query returns (a count, mostly).
pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// [`eventually`] for the common case: until the count `sql` returns is
/// `expected`.
pub async fn eventually_count(
    client: &tokio_postgres::Client,
    what: &str,
    timeout: std::time::Duration,
    sql: &str,
    expected: i64,
) {
    eventually(what, timeout, || async {
        count(client, sql).await == expected
    })
    .await
}

/// Re-checks `condition` every 20 ms until it holds; panics after `timeout`
/// with `what`. For database states that nothing signals (rows marked by
/// another process).
pub async fn eventually<F, Fut>(what: &str, timeout: std::time::Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The channel of the tests' markers (a marker on `outbox_events` would
/// wake a daemon).
pub const MARKER: &str = "outboxd_test_marker";

/// The notifications on `outbox_events` that a session of
/// [`TestDb::listen_with_marker`] received before a marker sent now, after
/// everything before it committed: all there were.
pub async fn notifications_before_marker(
    db: &TestDb,
    notifications: &mut mpsc::UnboundedReceiver<Notification>,
) -> usize {
    db.client()
        .await
        .batch_execute(&format!("NOTIFY {MARKER}"))
        .await
        .unwrap();
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), notifications.recv())
            .await
            .expect("notifications stopped arriving")
            .expect("listener closed");
        if n.channel() == MARKER {
            return seen;
        }
        seen += 1;
    }
}

/// One claim as a daemon makes it (a 60 s lease, the default cap of 8 per
/// endpoint, its destinations answering quickly: not held to the cap per
/// destination, as `Room` has it), with `mode`'s statement (and what it is told: the endpoints
/// to step over, or where the fair claim's walk goes on from) and what is
/// in flight; committed.
pub async fn claim_with(
    client: &deadpool_postgres::Client,
    mode: outboxd::store::claim::Mode<'_>,
    limit: usize,
    in_flight: &outboxd::store::claim::InFlight,
) -> outboxd::store::claim::Claim {
    outboxd::store::claim::claim(
        client,
        mode,
        limit,
        "test-claimer",
        std::time::Duration::from_secs(60),
        outboxd::store::claim::Caps {
            destination: i32::MAX as u32,
            ..outboxd::store::claim::Caps::SHIPPED
        },
        in_flight,
    )
    .await
    .unwrap()
}
