//! systemd's notify protocol seen from the service manager's side: a real
//! unix datagram socket at a temp path, handed to `outboxd run` as
//! `NOTIFY_SOCKET`, that records every datagram with the instant it arrived.
//!
//! A datagram holds one or more `KEY=VALUE` lines (`READY=1`, `STATUS=…`,
//! `STOPPING=1`, `WATCHDOG=1`). The socket is read on a plain OS thread, not
//! on the test's runtime: that runtime also serves the test receivers, and a
//! busy worker would stamp a ping late and make a gap look longer than it was.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::harness::TempDir;

/// One datagram as it arrived.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub at: Instant,
    /// Its lines, without the newlines, empty ones dropped.
    pub lines: Vec<String>,
}

impl Datagram {
    /// True if one of its lines is exactly `line` (e.g. "READY=1").
    pub fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }
}

/// A bound notify socket; it stops reading when dropped.
pub struct NotifySocket {
    path: String,
    datagrams: Arc<Mutex<Vec<Datagram>>>,
    /// How many datagrams arrived; waiters subscribe instead of polling.
    arrived: watch::Receiver<usize>,
    stop: Arc<AtomicBool>,
    // Last: the socket file goes after the reader was told to stop.
    _dir: TempDir,
}

/// The longest stretch of a time window without a `WATCHDOG=1`.
#[derive(Debug, Clone, Copy)]
pub struct Silence {
    pub longest: Duration,
    /// Where that stretch began, counted from the window's start.
    pub began_after: Duration,
    /// Pings inside the window.
    pub pings: usize,
    pub window: Duration,
}

impl std::fmt::Display for Silence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "longest stretch without WATCHDOG=1: {:?}, beginning {:?} into a {:?} window holding {} pings",
            self.longest, self.began_after, self.window, self.pings
        )
    }
}

impl NotifySocket {
    /// Binds a fresh socket in a temp dir and starts recording.
    pub fn bind() -> NotifySocket {
        let dir = TempDir::new("notify");
        let path: PathBuf = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path)
            .unwrap_or_else(|e| panic!("binding the notify socket {}: {e}", path.display()));
        // Wakes the reader now and then to look at `stop`.
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let datagrams = Arc::new(Mutex::new(Vec::new()));
        let (tx, arrived) = watch::channel(0);
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::spawn({
            let datagrams = Arc::clone(&datagrams);
            let stop = Arc::clone(&stop);
            move || read_loop(socket, datagrams, tx, stop)
        });
        NotifySocket {
            path: path.to_str().expect("a UTF-8 temp path").to_string(),
            datagrams,
            arrived,
            stop,
            _dir: dir,
        }
    }

    /// The environment systemd gives a `Type=notify` unit with
    /// `WatchdogSec=`: `NOTIFY_SOCKET` and `WATCHDOG_USEC` (no
    /// `WATCHDOG_PID`, which would have to name the child before it exists).
    pub fn env<'a>(&'a self, watchdog_usec: &'a str) -> [(&'a str, &'a str); 2] {
        [
            ("NOTIFY_SOCKET", self.path.as_str()),
            ("WATCHDOG_USEC", watchdog_usec),
        ]
    }

    /// Every datagram so far, in arrival order (a copy).
    pub fn datagrams(&self) -> Vec<Datagram> {
        self.datagrams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// When each `WATCHDOG=1` arrived.
    pub fn watchdog_pings(&self) -> Vec<Instant> {
        self.datagrams()
            .iter()
            .filter(|d| d.has("WATCHDOG=1"))
            .map(|d| d.at)
            .collect()
    }

    /// Every `STATUS=` value, in arrival order.
    pub fn statuses(&self) -> Vec<String> {
        self.datagrams()
            .iter()
            .flat_map(|d| d.lines.iter())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .map(str::to_string)
            .collect()
    }

    /// Waits for a datagram with the line `line` (e.g. "READY=1") and
    /// returns the first such; panics after `timeout` with what did arrive.
    pub async fn wait_for_line(&self, line: &str, timeout: Duration) -> Datagram {
        let mut arrived = self.arrived.clone();
        let find = || self.datagrams().into_iter().find(|d| d.has(line));
        let found = tokio::time::timeout(timeout, async {
            loop {
                arrived.borrow_and_update();
                if let Some(datagram) = find() {
                    return Some(datagram);
                }
                if arrived.changed().await.is_err() {
                    return find();
                }
            }
        })
        .await;
        match found {
            Ok(Some(datagram)) => datagram,
            _ => panic!(
                "no datagram with {line:?} on the notify socket within {timeout:?}; got {:?}",
                self.datagrams()
                    .iter()
                    .map(|d| d.lines.join("\\n"))
                    .collect::<Vec<_>>()
            ),
        }
    }

    /// The longest stretch of `[from, to]` with no `WATCHDOG=1`: between two
    /// pings, or between an edge of the window and the ping nearest it (the
    /// whole window if none came).
    pub fn longest_silence(&self, from: Instant, to: Instant) -> Silence {
        let pings: Vec<Instant> = self
            .watchdog_pings()
            .into_iter()
            .filter(|&at| at >= from && at <= to)
            .collect();
        let mut marks = vec![from];
        marks.extend(&pings);
        marks.push(to);
        let (began, longest) = marks
            .windows(2)
            .map(|w| (w[0], w[1] - w[0]))
            .max_by_key(|&(_, gap)| gap)
            .expect("at least the window's two edges");
        Silence {
            longest,
            began_after: began - from,
            pings: pings.len(),
            window: to - from,
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_loop(
    socket: UnixDatagram,
    datagrams: Arc<Mutex<Vec<Datagram>>>,
    arrived: watch::Sender<usize>,
    stop: Arc<AtomicBool>,
) {
    // systemd accepts datagrams up to a few KiB; outboxd sends a few lines.
    let mut buf = vec![0_u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => panic!("reading the notify socket: {e}"),
        };
        let at = Instant::now();
        let lines = String::from_utf8_lossy(&buf[..n])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        let mut log = datagrams.lock().unwrap_or_else(PoisonError::into_inner);
        log.push(Datagram { at, lines });
        // Under the lock, so counts are published in order.
        arrived.send_replace(log.len());
    }
}

// A self-test against the socket itself, so a liveness failure is known to
// be the daemon's and not the recorder's.
#[tokio::test(flavor = "multi_thread")]
async fn the_notify_socket_records_datagrams_with_their_lines_and_measures_silences() {
    let socket = NotifySocket::bind();
    let [(name, path), (usec_name, usec)] = socket.env("2000000");
    assert_eq!(
        (name, usec_name, usec),
        ("NOTIFY_SOCKET", "WATCHDOG_USEC", "2000000")
    );
    let sender = UnixDatagram::unbound().unwrap();
    let start = Instant::now();
    sender
        .send_to(b"READY=1\nSTATUS=waiting for the database\n", path)
        .unwrap();
    let ready = socket
        .wait_for_line("READY=1", Duration::from_secs(5))
        .await;
    assert!(ready.at >= start);
    assert_eq!(ready.lines, ["READY=1", "STATUS=waiting for the database"]);
    for _ in 0..3 {
        sender.send_to(b"WATCHDOG=1\n", path).unwrap();
    }
    sender.send_to(b"STATUS=delivering", path).unwrap();
    socket
        .wait_for_line("STATUS=delivering", Duration::from_secs(5))
        .await;
    let end = Instant::now();
    assert_eq!(socket.watchdog_pings().len(), 3);
    assert_eq!(
        socket.statuses(),
        ["waiting for the database", "delivering"]
    );
    let silence = socket.longest_silence(start, end);
    assert_eq!(silence.pings, 3);
    assert!(silence.longest <= end - start);
    // No ping at all in a window: the whole window is silent.
    let later = end + Duration::from_secs(1);
    let none = socket.longest_silence(end, later);
    assert_eq!((none.pings, none.longest), (0, Duration::from_secs(1)));
}
