//! Misbehaving webhook receivers on raw TCP (optionally wrapped in TLS): each
//! reads the request as a well-behaved server would, then answers with
//! exactly the bytes, pauses, resets or silences that the test asks for.
//! hyper would refuse to produce most of these answers, hence the raw sockets.
//!
//! Every server lives on 127.0.0.1 with an OS-chosen port and stops when its
//! `BadReceiver` is dropped (connections still open are dropped with it).
//! Every loop is bounded: a fault writes at most a fixed number of bytes and
//! stops at the first failed write (the client has gone).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Longest request head accepted; outboxd's is a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Time allowed to read one request.
const READ_LIMIT: Duration = Duration::from_secs(10);

/// What to do once the request has been read.
#[derive(Debug, Clone)]
pub enum Fault {
    /// A valid head promising 100 bytes of body, 10 of them, then a TCP
    /// reset (SO_LINGER 0 and close) instead of the rest.
    ResetMidResponse,
    /// A valid 200 answer, written one byte every `gap`.
    SlowHeaders(Duration),
    /// A valid head with `Content-Length: 1000` at once, then the body one
    /// byte every `gap`.
    DripBody(Duration),
    /// Read the request and never answer; the connection stays open.
    Silent,
    /// 200 with a `Content-Length` of `bytes` and a JSON-looking body that
    /// never closes its string, streamed in 64 KiB writes (one shared buffer,
    /// never the whole body in memory) until the client stops reading.
    Huge { bytes: usize },
    /// Write exactly these bytes, then close the connection.
    Bytes(Vec<u8>),
}

/// `HTTP/1.1 200` with `body` and an exact Content-Length, connection closed
/// after it.
pub fn http_200(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A running misbehaving server.
pub struct BadReceiver {
    addr: SocketAddr,
    scheme: &'static str,
    /// Idempotency keys of the requests read in full, in arrival order.
    keys: watch::Sender<Vec<String>>,
    server: JoinHandle<()>,
}

impl BadReceiver {
    /// Plain HTTP.
    pub async fn start(fault: Fault) -> BadReceiver {
        BadReceiver::spawn(fault, None).await
    }

    /// HTTPS with `acceptor`'s certificate. A client that refuses the
    /// certificate ends the connection during the handshake; nothing is
    /// recorded for it.
    pub async fn start_tls(fault: Fault, acceptor: tokio_native_tls::TlsAcceptor) -> BadReceiver {
        BadReceiver::spawn(fault, Some(acceptor)).await
    }

    async fn spawn(fault: Fault, tls: Option<tokio_native_tls::TlsAcceptor>) -> BadReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (keys, _) = watch::channel(Vec::new());
        let recorder = keys.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        connections.spawn(serve(stream, fault.clone(), tls.clone(), recorder.clone()));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        BadReceiver {
            addr,
            scheme,
            keys,
            server,
        }
    }

    /// `http(s)://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// Idempotency keys of the requests read so far.
    pub fn keys(&self) -> Vec<String> {
        self.keys.borrow().clone()
    }
}

impl Drop for BadReceiver {
    fn drop(&mut self) {
        // Drops the listener and the JoinSet, which aborts every connection.
        self.server.abort();
    }
}

/// A port on 127.0.0.1 with nothing listening on it (bound, then closed).
pub fn refused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn serve(
    stream: TcpStream,
    fault: Fault,
    tls: Option<tokio_native_tls::TlsAcceptor>,
    keys: watch::Sender<Vec<String>>,
) {
    match tls {
        None => {
            let mut stream = stream;
            if let Some(key) = read_request(&mut stream).await {
                keys.send_modify(|k| k.push(key));
                if answer(&mut stream, &fault).await == End::Reset {
                    // SO_LINGER 0: close() sends RST instead of FIN.
                    let _ = stream.set_zero_linger();
                }
            }
        }
        Some(acceptor) => {
            let Ok(Ok(mut stream)) =
                tokio::time::timeout(READ_LIMIT, acceptor.accept(stream)).await
            else {
                return; // the client refused the certificate
            };
            if let Some(key) = read_request(&mut stream).await {
                keys.send_modify(|k| k.push(key));
                // A reset cannot be asked of a TLS stream; close it plainly.
                let _ = answer(&mut stream, &fault).await;
                let _ = stream.shutdown().await;
            }
        }
    }
}

/// Reads one request (head, then Content-Length bytes of body); returns its
/// Idempotency-Key ("" without one), or None if the client went away.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    tokio::time::timeout(READ_LIMIT, async {
        let mut buf = Vec::with_capacity(2048);
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > MAX_HEAD {
                return None;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let header = |name: &str| {
            head.lines().find_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut have = buf.len() - head_end;
        while have < length {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            have += n;
        }
        Some(header("idempotency-key").unwrap_or_default())
    })
    .await
    .ok()
    .flatten()
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Close,
    Reset,
}

/// Writes the fault's answer. Stops at the first failed write.
async fn answer<S: AsyncWrite + Unpin>(stream: &mut S, fault: &Fault) -> End {
    match fault {
        Fault::ResetMidResponse => {
            let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"status\":";
            let _ = stream.write_all(head).await;
            let _ = stream.flush().await;
            // Let the client read what was sent before the reset arrives, so
            // the failure happens mid-body rather than before the head.
            tokio::time::sleep(Duration::from_millis(100)).await;
            End::Reset
        }
        Fault::SlowHeaders(gap) => {
            let whole = http_200(br#"{"status":"1","message":"too late"}"#);
            for byte in whole {
                if stream.write_all(&[byte]).await.is_err() || stream.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(*gap).await;
            }
            End::Close
        }
        Fault::DripBody(gap) => {
            let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
            if stream.write_all(head).await.is_ok() {
                for _ in 0..1000 {
                    if stream.write_all(b" ").await.is_err() || stream.flush().await.is_err() {
                        break;
                    }
                    tokio::time::sleep(*gap).await;
                }
            }
            End::Close
        }
        Fault::Silent => std::future::pending().await,
        Fault::Huge { bytes } => {
            const CHUNK: usize = 64 * 1024;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {bytes}\r\n\r\n"
            );
            let prefix = br#"{"status":"1","message":""#;
            let filler = vec![b'x'; CHUNK];
            if stream.write_all(head.as_bytes()).await.is_err()
                || stream.write_all(prefix).await.is_err()
            {
                return End::Close;
            }
            let mut left = bytes.saturating_sub(prefix.len());
            while left > 0 {
                let n = left.min(CHUNK);
                if stream.write_all(&filler[..n]).await.is_err() {
                    break;
                }
                left -= n;
            }
            End::Close
        }
        Fault::Bytes(bytes) => {
            let _ = stream.write_all(bytes).await;
            let _ = stream.flush().await;
            End::Close
        }
    }
}
