//! A real SMTP server process for the tests: `tests/smtp/server.py`, built on
//! Python's aiosmtpd (Debian package python3-aiosmtpd, installed by
//! scripts/test). It prints each accepted message, MIME-parsed, as a JSON line.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::harness::repo_root;

/// One message as the server accepted it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub subject: String,
    pub to: String,
    pub content_type: String,
    /// MIME type -> decoded content, for each leaf part.
    pub parts: serde_json::Map<String, Value>,
    pub defects: Vec<String>,
    pub raw: String,
}

impl Mail {
    /// A decoded part, line endings normalised to `\n`.
    pub fn part(&self, content_type: &str) -> String {
        self.parts
            .get(content_type)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no {content_type} part in {:?}", self.parts.keys()))
            .replace("\r\n", "\n")
    }
}

pub struct SmtpServer {
    child: tokio::process::Child,
    mails: watch::Receiver<Vec<Mail>>,
    /// Steps refused by --refuse-sender or --refuse-data ("MAIL FROM", "DATA").
    refusals: watch::Receiver<Vec<String>>,
}

/// The Python that has aiosmtpd: Debian's, which the package installs into.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl SmtpServer {
    /// Starts the server on `port` with extra arguments (`--refuse ADDR`,
    /// `--defer ADDR`, `--user U --password P`, `--delay-rcpt SECS`,
    /// `--delay-data SECS`); returns once it listens.
    pub async fn start(port: u16, args: &[&str]) -> SmtpServer {
        let mut child = tokio::process::Command::new(python())
            .arg(repo_root().join("tests/smtp/server.py"))
            .arg("--port")
            .arg(port.to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting tests/smtp/server.py (needs python3-aiosmtpd)");
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (tx, rx) = watch::channel(Vec::new());
        let (refused_tx, refusals) = watch::channel(Vec::new());
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&line).expect("a JSON line");
                if v.get("ready").is_some() {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    continue;
                }
                // A stall the server began (--hang-rcpt): counted with
                // the refusals, as "hanging ADDRESS".
                if let Some(address) = v.get("hanging") {
                    let step = format!("hanging {}", address.as_str().unwrap());
                    refused_tx.send_modify(|r| r.push(step));
                    continue;
                }
                if let Some(step) = v.get("refused") {
                    let step = step.as_str().unwrap().to_string();
                    refused_tx.send_modify(|r| r.push(step));
                    continue;
                }
                let strings = |k: &str| -> Vec<String> {
                    v[k].as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s.as_str().unwrap().to_string())
                        .collect()
                };
                let mail = Mail {
                    mail_from: v["mail_from"].as_str().unwrap().to_string(),
                    rcpt_tos: strings("rcpt_tos"),
                    subject: v["subject"].as_str().unwrap().to_string(),
                    to: v["to"].as_str().unwrap().to_string(),
                    content_type: v["content_type"].as_str().unwrap().to_string(),
                    parts: v["parts"].as_object().unwrap().clone(),
                    defects: strings("defects"),
                    raw: v["raw"].as_str().unwrap().to_string(),
                };
                tx.send_modify(|m| m.push(mail));
            }
        });
        tokio::time::timeout(Duration::from_secs(20), ready_rx)
            .await
            .expect("the SMTP server did not start within 20 s")
            .expect("the SMTP server exited before it was ready");
        SmtpServer {
            child,
            mails: rx,
            refusals,
        }
    }

    /// Tells a server started with --refuse-sender to accept the sender
    /// from now on (SIGUSR1).
    pub fn accept_sender(&self) {
        let pid = self.child.id().expect("the SMTP server is running") as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    }

    /// Waits until at least `n` steps were refused; panics after `timeout`.
    pub async fn wait_for_refusals(&self, n: usize, timeout: Duration) -> Vec<String> {
        let mut rx = self.refusals.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|r| r.len() >= n)).await {
            Ok(Ok(refusals)) => refusals.clone(),
            _ => panic!(
                "expected {n} refusals within {timeout:?}, got {:?}",
                self.refusals.borrow()
            ),
        }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.borrow().clone()
    }

    /// Waits until at least `n` messages arrived; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        let mut rx = self.mails.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|m| m.len() >= n)).await {
            Ok(Ok(mails)) => mails.clone(),
            _ => panic!(
                "expected {n} messages within {timeout:?}, got {}",
                self.mails().len()
            ),
        }
    }
}

/// A TCP listener on 127.0.0.1 that accepts connections and never says a
/// word: no 220 greeting, no reply to anything, the connection held open
/// until the blackhole is dropped. An SMTP server that hung after `accept`.
pub struct Blackhole {
    pub port: u16,
    accepted: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, accepted) = watch::channel(0);
        let task = tokio::spawn(async move {
            // Kept, not read: the peer's bytes sit unanswered in the socket.
            let mut held: Vec<TcpStream> = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
                tx.send_modify(|n| *n += 1);
            }
        });
        Blackhole {
            port,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }

    /// Waits until at least `n` connections were accepted; panics after
    /// `timeout`.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) {
        let mut rx = self.accepted.clone();
        if tokio::time::timeout(timeout, rx.wait_for(|&got| got >= n))
            .await
            .is_err()
        {
            panic!(
                "expected {n} connections to the blackhole within {timeout:?}, got {}",
                self.accepted()
            );
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        // Drops the listener and every held connection with the task.
        self.task.abort();
    }
}
