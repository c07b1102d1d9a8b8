//! A TCP proxy on 127.0.0.1 in front of PostgreSQL, to take the database
//! away from a running daemon and give it back: real connections, really
//! cut, with no change to the server other tests share. It can also lose
//! the server's replies while the server goes on ([`Proxy::lose_replies`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    accept: Option<JoinHandle<()>>,
    connections: Vec<JoinHandle<()>>,
    /// Cancelled by [`Proxy::lose_replies`] for the connections open then.
    lose: CancellationToken,
}

impl Proxy {
    /// A proxy in front of `db`'s server (its DATABASE_URL must be TCP),
    /// and `db`'s URL through it.
    pub async fn in_front_of(db: &crate::harness::TestDb) -> (Proxy, String) {
        let pg: tokio_postgres::Config = db.url.parse().unwrap();
        let host = match &pg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("this test needs a TCP DATABASE_URL, not {other:?}"),
        };
        let upstream = tokio::net::lookup_host((host.as_str(), pg.get_ports()[0]))
            .await
            .unwrap()
            .next()
            .unwrap();
        let proxy = Proxy::start(upstream).await;
        let url = crate::harness::url_with_dbname(
            &format!("postgres://{}@{}", pg.get_user().unwrap(), proxy.addr),
            &db.name,
        );
        (proxy, url)
    }

    /// Starts forwarding a free local port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy {
            addr,
            upstream,
            state: Arc::new(Mutex::new(State::default())),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let state = self.state.clone();
        let upstream = self.upstream;
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let lose = state.lock().unwrap().lose.clone();
                let task = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let lost = {
                        let both = tokio::io::copy_bidirectional(&mut client, &mut server);
                        tokio::select! {
                            _ = both => false,
                            _ = lose.cancelled() => true,
                        }
                    };
                    if lost {
                        // The client's end is closed; the server's stays
                        // open and is read to the end, so the server goes
                        // on with what it received and its replies are lost.
                        drop(client);
                        let _ = tokio::io::copy(&mut server, &mut tokio::io::sink()).await;
                    }
                });
                state.lock().unwrap().connections.push(task);
            }
        });
        self.state.lock().unwrap().accept = Some(accept);
    }

    /// The database is gone: open connections are cut and new ones refused.
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        if let Some(accept) = state.accept.take() {
            accept.abort(); // drops the listener: connects are refused
        }
        for task in state.connections.drain(..) {
            task.abort(); // drops both sockets
        }
    }

    /// The connections open now lose their replies: each client sees its
    /// connection closed at once, while the server, its end kept open, goes
    /// on with what it has received (a claim and its COMMIT commit) and
    /// what it sends is thrown away. New connections are served as before.
    pub fn lose_replies(&self) {
        let mut state = self.state.lock().unwrap();
        std::mem::take(&mut state.lose).cancel();
    }

    /// The database is back on the same address.
    pub async fn restore(&self) {
        // The aborted accept task may take a moment to drop its listener.
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
