//! The admin HTTP server on `metrics.listen`:
//!
//! - `GET /metrics`: Prometheus text exposition;
//! - `GET /healthz`: 200 while the process serves requests at all;
//! - `GET /readyz`: 200 when the database answers a query within 2 s, the
//!   LISTEN connection is up, and claims and records get done
//!   ([`Progress::problem`]: no outcome set aside, none waiting and no
//!   claim failing for longer than [`crate::progress::STALL_LIMIT`]), else
//!   503 with the reason.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;

/// A readiness check may not take longer than this: probes time out at a
/// few seconds, and a hung check should read as "not ready", not as a hung
/// process.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoints report on.
#[derive(Clone)]
pub struct State {
    pub metrics: PrometheusHandle,
    pub pool: deadpool_postgres::Pool,
    pub listening: Arc<AtomicBool>,
    /// Whether claims and records get anything done.
    pub progress: Arc<Progress>,
    /// Whether this instance does the maintenance: the queue gauges are
    /// shown only then.
    pub role: crate::election::Role,
}

/// Binds `addr` (so a bad address fails start-up) and serves until
/// `shutdown`. Returns the bound address: port 0 picks a free one.
pub async fn start(
    addr: SocketAddr,
    state: State,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin server accept");
                        continue;
                    }
                },
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(req, &state).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((bound, task))
}

async fn route(req: Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            crate::telemetry::scrape(&state.pool, &state.progress);
            let mut rendered = state.metrics.render();
            if !state.role.exports_queue_gauges() {
                rendered = crate::telemetry::without_leader_only(&rendered);
            }
            let mut response = Response::new(Full::new(Bytes::from(rendered)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match ready(state).await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

async fn ready(state: &State) -> Result<(), String> {
    let check = async {
        let client = state
            .pool
            .get()
            .await
            .map_err(|e| crate::store::pool::describe_pool(&e))?;
        crate::store::server::ping(&client)
            .await
            .map_err(|e| crate::store::pool::describe(&e))?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(READY_CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("database: {e}")),
        Err(_) => return Err("database: no answer within 2s".to_string()),
    }
    if !state.listening.load(Ordering::Relaxed) {
        return Err("the LISTEN connection is down (polling continues)".to_string());
    }
    if let Some(problem) = state.progress.problem(tokio::time::Instant::now()) {
        return Err(problem);
    }
    Ok(())
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
