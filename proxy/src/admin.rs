//! The admin listener: `/metrics`, `/status` (JSON), `/` (status page), `/healthz`, and the
//! bearer-token protected `POST /failover`, `/failback`, `/auto`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::control::ControlHandle;
use crate::route::Site;
use crate::routing::AdminCommand;

/// Largest admin request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open admin connections may finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

type AdminResponse = Response<Full<Bytes>>;

/// Serves the admin API on `listener` until `shutdown`; POSTs need `Authorization: Bearer
/// <token>` (401 without or with a wrong one; 403 when no token is configured).
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    control: ControlHandle,
    registry: prometheus::Registry,
    token: AdminToken,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    info!(addr = %local, auth = token.load().is_some(), "admin listener ready");
    let admin = Admin {
        control,
        registry,
        token,
    };
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "admin accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let admin = admin.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("admin_conn", peer = %peer);
        connections.spawn(
            async move {
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                let conn = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "admin connection ended") },
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
            .instrument(span),
        );
    }
    connections.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connections.wait()).await;
    info!("admin listener stopped");
    Ok(())
}

/// The bearer token, swapped by a config reload (token rotation without a restart).
pub type AdminToken = Arc<ArcSwapOption<String>>;

#[derive(Clone)]
struct Admin {
    control: ControlHandle,
    registry: prometheus::Registry,
    token: AdminToken,
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> AdminResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        content_type.parse().expect("static content type"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn json_error(status: StatusCode, message: &str) -> AdminResponse {
    respond(
        status,
        "application/json",
        serde_json::json!({ "error": message }).to_string(),
    )
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> AdminResponse {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let allowed: &str = match path.as_str() {
            "/" | "/metrics" | "/status" | "/healthz" => "GET, HEAD",
            "/failover" | "/failback" | "/auto" => "POST",
            _ => {
                return json_error(
                    StatusCode::NOT_FOUND,
                    &format!("no such endpoint {path}; see GET /status"),
                )
            }
        };
        let is_get = method == Method::GET || method == Method::HEAD;
        if (allowed == "POST" && method != Method::POST) || (allowed != "POST" && !is_get) {
            let mut r = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{path} accepts {allowed}"),
            );
            r.headers_mut()
                .insert(header::ALLOW, allowed.parse().expect("static header"));
            return r;
        }
        match path.as_str() {
            // Readiness for the balancer in front: 503 names why this proxy should be drained.
            "/healthz" => {
                let status = self.control.status();
                match &status.unready_reason {
                    Some(why) if !status.ready => respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain; charset=utf-8",
                        format!("not ready: {why}\n"),
                    ),
                    _ => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
                }
            }
            "/metrics" => self.metrics(),
            "/status" => match serde_json::to_vec_pretty(&*self.control.status()) {
                Ok(body) => respond(StatusCode::OK, "application/json", body),
                Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            },
            "/" => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                crate::status_page::render(&self.control.status()),
            ),
            _ => self.post(&path, req).await,
        }
    }

    fn metrics(&self) -> AdminResponse {
        use prometheus::Encoder;
        let encoder = prometheus::TextEncoder::new();
        let mut buf = Vec::new();
        match encoder.encode(&self.registry.gather(), &mut buf) {
            Ok(()) => respond(StatusCode::OK, encoder.format_type(), buf),
            Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    /// Whether the request carries the configured token (compared in constant time).
    fn authorize(&self, req: &Request<Incoming>) -> Result<(), Box<AdminResponse>> {
        let token = self.token.load();
        let Some(token) = token.as_deref() else {
            return Err(Box::new(json_error(
                StatusCode::FORBIDDEN,
                "no admin token configured: set admin.token_file to enable failover/failback/auto",
            )));
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(p) if bool::from(p.as_bytes().ct_eq(token.as_bytes())) => Ok(()),
            _ => {
                let mut r = json_error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token: send Authorization: Bearer <token from admin.token_file>",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                Err(Box::new(r))
            }
        }
    }

    async fn post(&self, path: &str, req: Request<Incoming>) -> AdminResponse {
        if let Err(r) = self.authorize(&req) {
            warn!(
                path,
                status = r.status().as_u16(),
                "admin command refused: not authorized"
            );
            return *r;
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read the body: {e}"),
                )
            }
        };
        let fields = match parse_object(&body) {
            Ok(f) => f,
            Err(msg) => return json_error(StatusCode::BAD_REQUEST, &msg),
        };
        let reason = match string_field(&fields, "reason") {
            Ok(r) => r,
            Err(msg) => return json_error(StatusCode::BAD_REQUEST, &msg),
        };
        let cmd = match path {
            "/failover" => {
                let to = match string_field(&fields, "to") {
                    Ok(Some(to)) => to,
                    Ok(None) => {
                        return json_error(
                            StatusCode::BAD_REQUEST,
                            "field `to` is required: \"primary\" or \"backup\"",
                        )
                    }
                    Err(msg) => return json_error(StatusCode::BAD_REQUEST, &msg),
                };
                let to = match to.as_str() {
                    "primary" => Site::Primary,
                    "backup" => Site::Backup,
                    other => {
                        return json_error(
                            StatusCode::BAD_REQUEST,
                            &format!(
                                "field `to`: expected \"primary\" or \"backup\", got {other:?}"
                            ),
                        )
                    }
                };
                AdminCommand::Failover {
                    to,
                    reason: reason.unwrap_or_else(|| "manual failover".into()),
                }
            }
            "/failback" => AdminCommand::Failback {
                reason: reason.unwrap_or_else(|| "manual failback".into()),
            },
            _ => AdminCommand::Auto,
        };
        match self.control.command(cmd).await {
            Ok(status) => match serde_json::to_vec_pretty(&*status) {
                Ok(body) => respond(StatusCode::OK, "application/json", body),
                Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            },
            Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }
}

/// The body as a JSON object; an empty body is an empty object.
fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Default::default());
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => {
            Err("body must be a JSON object like {\"to\":\"backup\",\"reason\":\"...\"}".into())
        }
        Err(e) => Err(format!("body is not valid JSON: {e}")),
    }
}

/// An optional string field; any other JSON type is an error naming the field.
fn string_field(
    fields: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<String>, String> {
    match fields.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("field `{name}` must be a string, got {other}")),
    }
}
