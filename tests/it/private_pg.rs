//! A private PostgreSQL cluster for one test: initdb into a temp dir, a free
//! port on 127.0.0.1, fsync off. The test may stop and start it at will
//! (which the server the other tests share must never be); it is stopped and
//! its files removed when dropped.
//!
//! initdb and pg_ctl refuse to run as root, so as root they run as the
//! `postgres` OS user (Debian's server package creates it).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::TempDir;

pub struct PrivatePg {
    bin: PathBuf,
    /// The data directory; its socket and log live inside it too.
    data: PathBuf,
    pub port: u16,
    /// Server options of this cluster's own, added to every start.
    options: String,
    // Last: removed after the server is stopped in Drop.
    _dir: TempDir,
}

impl PrivatePg {
    /// initdb and start a new cluster; panics with the reason if it cannot.
    pub async fn start() -> PrivatePg {
        PrivatePg::start_with(None).await
    }

    /// A new cluster with `ssl = on`, serving `cert` and `key` (PEM files)
    /// and trusting client certificates signed by `ca`, whose pg_hba.conf
    /// lets only the `postgres` role (the tests' own sessions) in without
    /// TLS: any other role must come over TLS (`hostssl`), and is rejected
    /// without it; the role `outboxd_cert` must also present a client
    /// certificate for its name (`cert`).
    pub async fn start_tls(cert: &Path, key: &Path, ca: &Path) -> PrivatePg {
        PrivatePg::start_with(Some((cert, key, ca))).await
    }

    /// A new cluster that a streaming standby ([`PrivatePg::standby_of`])
    /// can follow, and whose commits wait for that standby
    /// (`synchronous_standby_names = '*'`, given on the command line so that
    /// the standby's copy of the configuration does not carry it: promoted,
    /// it has no standby to wait for). initdb's pg_hba.conf already lets
    /// local replication connections in, and wal_level is `replica` by
    /// default.
    pub async fn start_primary() -> PrivatePg {
        PrivatePg::start_as(None, "-c synchronous_standby_names='*'").await
    }

    /// A streaming standby of `primary` (`pg_basebackup -R -X stream`), on a
    /// port of its own; waits until the primary reports it streaming as its
    /// synchronous standby.
    pub async fn standby_of(primary: &PrivatePg) -> PrivatePg {
        let (bin, dir, data) = new_dirs();
        // pg_basebackup creates the data directory itself (mode 0700).
        std::fs::remove_dir(&data).unwrap();
        let ran = tokio::task::spawn_blocking({
            let basebackup = bin.join("pg_basebackup");
            let data = data.clone();
            let port = primary.port.to_string();
            move || {
                as_postgres(&basebackup)
                    .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                    .args(["-R", "-X", "stream", "--no-sync", "-D"])
                    .arg(&data)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            ran.status.success(),
            "pg_basebackup failed: {}{}",
            String::from_utf8_lossy(&ran.stdout),
            String::from_utf8_lossy(&ran.stderr)
        );
        let standby = PrivatePg::started(bin, data, dir, String::new()).await;
        let client = crate::harness::connect_url(&primary.admin_url()).await;
        crate::harness::eventually(
            "the standby to stream as the synchronous standby",
            std::time::Duration::from_secs(30),
            || async {
                client
                    .query_opt(
                        "SELECT 1 FROM pg_stat_replication
                          WHERE state = 'streaming' AND sync_state = 'sync'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .is_some()
            },
        )
        .await;
        standby
    }

    /// Stops the server with `-m immediate`: every process ends at once,
    /// without a checkpoint, as in a crash.
    pub async fn crash(&self) {
        let out = self
            .pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"])
            .await;
        assert!(out.status.success(), "pg_ctl stop: {out:?}\n{}", self.log());
    }

    /// Promotes a standby; waits until it accepts writes.
    pub async fn promote(&self) {
        let out = self.pg_ctl(&["promote", "-w", "-t", "30"]).await;
        assert!(
            out.status.success(),
            "pg_ctl promote: {out:?}\n{}",
            self.log()
        );
    }

    async fn start_with(tls: Option<(&Path, &Path, &Path)>) -> PrivatePg {
        PrivatePg::start_as(tls, "").await
    }

    async fn start_as(tls: Option<(&Path, &Path, &Path)>, options: &str) -> PrivatePg {
        let (bin, dir, data) = new_dirs();
        let ran = tokio::task::spawn_blocking({
            let initdb = bin.join("initdb");
            let data = data.clone();
            move || {
                as_postgres(&initdb)
                    .args(["--auth=trust", "-U", "postgres", "-E", "UTF8"])
                    .args(["--locale=C.UTF-8", "--no-sync", "-D"])
                    .arg(&data)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            ran.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&ran.stdout),
            String::from_utf8_lossy(&ran.stderr)
        );
        if let Some((cert, key, ca)) = tls {
            std::fs::copy(cert, data.join("server.crt")).unwrap();
            std::fs::copy(key, data.join("server.key")).unwrap();
            std::fs::copy(ca, data.join("ca.crt")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            if is_root() {
                for file in ["server.crt", "server.key", "ca.crt"] {
                    let out = Command::new("chown")
                        .arg("postgres:")
                        .arg(data.join(file))
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "chown postgres: {out:?}");
                }
            }
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .unwrap();
            use std::io::Write;
            writeln!(
                conf,
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                 ssl_ca_file = 'ca.crt'"
            )
            .unwrap();
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all outboxd_cert 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostnossl all postgres 127.0.0.1/32 trust\n\
                 hostnossl all all 127.0.0.1/32 reject\n",
            )
            .unwrap();
        }
        PrivatePg::started(bin, data, dir, options.to_string()).await
    }

    /// Starts the cluster in `data` on a free port.
    async fn started(bin: PathBuf, data: PathBuf, dir: TempDir, options: String) -> PrivatePg {
        let mut pg = PrivatePg {
            bin,
            data,
            port: 0,
            options,
            _dir: dir,
        };
        // The free port is found by binding and closing it; another process
        // may take it in between, so try a few.
        for _ in 0..5 {
            pg.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if pg.try_start().await {
                return pg;
            }
        }
        panic!("the private PostgreSQL did not start; log:\n{}", pg.log());
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (`-m fast`: sessions are terminated, as on a
    /// restart); waits until it is down.
    pub async fn stop(&self) {
        let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "30"]).await;
        assert!(out.status.success(), "pg_ctl stop: {out:?}\n{}", self.log());
    }

    /// Starts the stopped server again on the same port; waits until it
    /// accepts connections.
    pub async fn restart(&self) {
        assert!(
            self.try_start().await,
            "pg_ctl start failed; log:\n{}",
            self.log()
        );
    }

    async fn try_start(&self) -> bool {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c full_page_writes=off {}",
            self.port,
            self.data.display(),
            self.options
        );
        let log = self.data.join("postgres.log");
        let log = log.to_str().unwrap().to_string();
        self.pg_ctl(&["start", "-w", "-t", "30", "-l", &log, "-o", &options])
            .await
            .status
            .success()
    }

    async fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = as_postgres(&self.bin.join("pg_ctl"));
        cmd.args(args)
            .arg("-D")
            .arg(&self.data)
            // The server must not hold our pipes open.
            .stdin(std::process::Stdio::null());
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = as_postgres(&self.bin.join("pg_ctl"))
                .args(["stop", "-m", "immediate", "-w", "-t", "30", "-D"])
                .arg(&self.data)
                .stdin(std::process::Stdio::null())
                .output();
        }
    }
}

/// The server's bin directory, a new temp dir and its `data` directory,
/// both owned by the postgres OS user when we are root.
fn new_dirs() -> (PathBuf, TempDir, PathBuf) {
    let bin = server_bin_dir();
    let dir = TempDir::new("pg");
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    if is_root() {
        for path in [&dir.0, &data] {
            let out = Command::new("chown")
                .arg("postgres:")
                .arg(path)
                .output()
                .unwrap();
            assert!(out.status.success(), "chown postgres: {out:?}");
        }
    }
    (bin, dir, data)
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// `program` as the postgres OS user when we are root, from `/` (our working
/// directory may not be readable for that user).
fn as_postgres(program: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    };
    cmd.current_dir("/");
    cmd
}

/// The newest installed server's bin directory (/usr/lib/postgresql/N/bin).
fn server_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).expect(
        "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (scripts/test installs them)",
    )
}
