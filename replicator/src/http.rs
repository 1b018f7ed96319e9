//! `GET /metrics` and `GET /status` on `metrics_listen` (hyper 1.x).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::SharedStatus;

/// Serves until `shutdown`; each connection is a tracked task.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Registry,
    status: SharedStatus,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let registry = registry.clone();
        let status = status.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = respond(&req, &registry, &status);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = conn => if let Err(e) = r { tracing::debug!(error = %e, "metrics connection error") },
            }
        });
    }
}

fn respond<B>(
    req: &Request<B>,
    registry: &Registry,
    status: &SharedStatus,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ctype: &str, body: Vec<u8>| {
        Response::builder()
            .status(code)
            .header("content-type", ctype)
            .header("cache-control", "no-store")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    if req.method() != hyper::Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"GET only\n".to_vec(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut buf = Vec::new();
            let enc = TextEncoder::new();
            if let Err(e) = enc.encode(&registry.gather(), &mut buf) {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string().into_bytes(),
                );
            }
            reply(StatusCode::OK, enc.format_type(), buf)
        }
        "/status" => {
            let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let body = serde_json::to_vec(&s).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found: try /metrics or /status\n".to_vec(),
        ),
    }
}
