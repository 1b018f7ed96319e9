//! A controllable HTTP upstream ("a site") for proxy tests: real hyper 1.x over loopback.
//!
//! Routes (every answer carries `X-Upstream: <name>`):
//! - `GET /health/<component>`: the status set with [`Upstream::set_component`] (default 200);
//! - `/echo...` (any method): JSON `{upstream, method, path, version, headers, body_bytes, body_fnv}`
//!   (headers as name -> list of values; the body is read as a stream and hashed with [`fnv1a`]);
//! - `/mirror` (any method): the request body streamed back as the response body;
//! - `GET /bytes?n=N`: N bytes of [`pattern`] streamed in 64 KiB chunks;
//! - `GET /stream?chunks=N&delay_ms=M`: N chunks `chunk <i>\n`, one every M ms;
//! - `GET /slow?ms=N[&only=NAME]`: waits N ms (only on upstream NAME if given), then answers `slow done`;
//! - `GET /status/<code>`: answers `<code>`;
//! - `GET /ws`: a WebSocket echo (text and binary);
//! - `GET /detectbackup.php` (any prefix): the upstream's own name (the proxy must answer these
//!   itself, so seeing this body through the proxy is a bug);
//! - anything else: 200 `<name> <method> <path>`.
//!
//! [`Upstream::stop`] closes the listener and every open connection (a dead site: connections
//! are refused); [`Upstream::restart`] listens again on the same port.
//!
//! [`start_tls`] starts the same site behind TLS (ALPN h2 and http/1.1) with a certificate the
//! test made, e.g. signed by its own CA; its [`Upstream::url`] is `https://localhost:<port>`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Error type of the upstream's response bodies.
type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The upstream's response body: full, streamed or the mirrored request body.
type Body = BoxBody<Bytes, BoxError>;

/// A running (or stopped) test site. Cheap to clone; all clones control the same site.
#[derive(Clone, Debug)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    addr: SocketAddr,
    /// Health status per component name; missing components answer 200.
    components: Mutex<HashMap<String, u16>>,
    /// Requests served, not counting `/health/` probes (which the proxy sends all the time).
    requests: AtomicU64,
    /// Per path (without query), requests served, probes excluded.
    per_path: Mutex<HashMap<String, u64>>,
    /// The current run: cancelled by `stop`, replaced by `restart`.
    run: Mutex<Option<Run>>,
    /// Set for an HTTPS site: every accepted connection does the TLS handshake first.
    tls: Option<Arc<rustls::ServerConfig>>,
}

#[derive(Debug)]
struct Run {
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// Starts the two sites of most tests, named `primary` and `backup`.
pub async fn start_pair() -> (Upstream, Upstream) {
    (start("primary").await, start("backup").await)
}

/// Starts a site named `name` on a free loopback port.
pub async fn start(name: &str) -> Upstream {
    start_on(name, "127.0.0.1:0".parse().expect("literal address")).await
}

/// Starts a site named `name` on `addr` (port 0 picks a free port).
pub async fn start_on(name: &str, addr: SocketAddr) -> Upstream {
    launch_new(name, addr, None).await
}

/// Starts an HTTPS site named `name` on a free loopback port, serving the PEM chain `cert_pem`
/// with the PEM private key `key_pem` (the certificate should name `localhost`).
pub async fn start_tls(name: &str, cert_pem: &str, key_pem: &str) -> Upstream {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("upstream {name}: cert_pem: {e}"));
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("upstream {name}: key_pem holds no private key"));
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap_or_else(|e| panic!("upstream {name}: certificate and key: {e}"));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    launch_new(
        name,
        "127.0.0.1:0".parse().expect("literal address"),
        Some(Arc::new(config)),
    )
    .await
}

async fn launch_new(
    name: &str,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Upstream {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("upstream {name}: binding {addr}: {e}"));
    let addr = listener.local_addr().expect("bound address");
    let inner = Arc::new(Inner {
        name: name.to_owned(),
        addr,
        components: Mutex::new(HashMap::new()),
        requests: AtomicU64::new(0),
        per_path: Mutex::new(HashMap::new()),
        run: Mutex::new(None),
        tls,
    });
    let upstream = Upstream { inner };
    upstream.launch(listener);
    upstream
}

impl Upstream {
    /// The site's name (also its `X-Upstream` header).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:<port>`, or `https://localhost:<port>` for a TLS site (the name its
    /// certificate is checked against).
    pub fn url(&self) -> String {
        match self.inner.tls {
            Some(_) => format!("https://localhost:{}", self.inner.addr.port()),
            None => format!("http://{}", self.inner.addr),
        }
    }

    /// Makes `GET /health/<component>` answer `status` from now on.
    pub fn set_component(&self, component: &str, status: u16) {
        self.inner
            .components
            .lock()
            .expect("components lock")
            .insert(component.to_owned(), status);
    }

    /// Requests served so far, health probes excluded.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Requests served so far on `path` (exact, without query), health probes excluded.
    pub fn requests_to(&self, path: &str) -> u64 {
        self.inner
            .per_path
            .lock()
            .expect("per_path lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Closes the listener and every open connection; returns once all are closed.
    pub async fn stop(&self) {
        let run = self.inner.run.lock().expect("run lock").take();
        if let Some(run) = run {
            run.stop.cancel();
            run.tracker.close();
            run.tracker.wait().await;
        }
    }

    /// Listens again on the same port (after [`Upstream::stop`]).
    pub async fn restart(&self) {
        self.stop().await;
        // The port was ours a moment ago; another test may grab it in between, so retry briefly.
        let mut last_err = None;
        for _ in 0..50 {
            match TcpListener::bind(self.inner.addr).await {
                Ok(listener) => {
                    self.launch(listener);
                    return;
                }
                Err(e) => last_err = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "upstream {}: rebinding {}: {last_err:?}",
            self.inner.name, self.inner.addr
        );
    }

    fn launch(&self, listener: TcpListener) {
        let run = Run {
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        let (stop, tracker, inner) = (run.stop.clone(), run.tracker.clone(), self.inner.clone());
        run.tracker
            .spawn(accept_loop(listener, inner, stop, tracker));
        *self.inner.run.lock().expect("run lock") = Some(run);
    }
}

/// A client connection, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

async fn accept_loop(
    listener: TcpListener,
    inner: Arc<Inner>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let (inner, stop2, tracker2) = (inner.clone(), stop.clone(), tracker.clone());
        let stop = stop.clone();
        tracker.spawn(async move {
            let stream = match &inner.tls {
                None => Box::new(stream) as Box<dyn Stream>,
                Some(config) => tokio::select! {
                    _ = stop.cancelled() => return,
                    r = tokio_rustls::TlsAcceptor::from(config.clone()).accept(stream) => match r {
                        Ok(s) => Box::new(s) as Box<dyn Stream>,
                        // A client that does not trust the certificate aborts here.
                        Err(_) => return,
                    },
                },
            };
            let service = hyper::service::service_fn(move |req| {
                let (inner, stop, tracker) = (inner.clone(), stop2.clone(), tracker2.clone());
                async move { Ok::<_, Infallible>(handle(req, inner, stop, tracker).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            // Dropping the connection future on stop closes the socket at once: a dead site.
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    inner: Arc<Inner>,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if !path.starts_with("/health/") {
        inner.requests.fetch_add(1, Ordering::SeqCst);
        *inner
            .per_path
            .lock()
            .expect("per_path lock")
            .entry(path.clone())
            .or_insert(0) += 1;
    }
    let query = parse_query(req.uri().query());
    let mut resp = if let Some(component) = path.strip_prefix("/health/") {
        let code = inner
            .components
            .lock()
            .expect("components lock")
            .get(component)
            .copied()
            .unwrap_or(200);
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        text(status, if status.is_success() { "ok" } else { "fail" })
    } else if path.starts_with("/echo") {
        echo(req, &inner.name).await
    } else if path == "/mirror" {
        Response::new(req.into_body().map_err(BoxError::from).boxed())
    } else if path == "/bytes" {
        let n: u64 = query.get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
        let chunks = futures_util::stream::unfold(0u64, move |sent| async move {
            (sent < n).then(|| {
                let len = (n - sent).min(64 * 1024);
                let chunk = Bytes::from((sent..sent + len).map(pattern_byte).collect::<Vec<u8>>());
                (Ok::<_, BoxError>(Frame::data(chunk)), sent + len)
            })
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
        r.headers_mut().insert(header::CONTENT_LENGTH, n.into());
        r
    } else if path == "/stream" {
        let n: u64 = query
            .get("chunks")
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        let delay = Duration::from_millis(
            query
                .get("delay_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100),
        );
        let chunks = futures_util::stream::unfold(0u64, move |i| async move {
            if i >= n {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(delay).await;
            }
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from(format!("chunk {i}\n")))),
                i + 1,
            ))
        });
        Response::new(BodyExt::boxed(StreamBody::new(chunks)))
    } else if path == "/slow" && query.get("only").is_some_and(|n| *n != inner.name) {
        // `only=<name>`: slow on that upstream alone (a site that hangs while the other answers).
        text(StatusCode::OK, "slow done")
    } else if path == "/slow" {
        let ms: u64 = query.get("ms").and_then(|v| v.parse().ok()).unwrap_or(1000);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => text(StatusCode::OK, "slow done"),
            _ = stop.cancelled() => text(StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        }
    } else if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        text(status, code)
    } else if path == "/ws" {
        websocket(req, stop, tracker)
    } else if path.ends_with("/detectbackup.php") || path == "/detectbackup" {
        text(StatusCode::OK, &inner.name)
    } else {
        text(
            StatusCode::OK,
            &format!("{} {} {}", inner.name, req.method(), path),
        )
    };
    if let Ok(v) = header::HeaderValue::from_str(&inner.name) {
        resp.headers_mut().insert("x-upstream", v);
    }
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_owned()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

async fn echo(req: Request<Incoming>, name: &str) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let (mut bytes, mut hash) = (0u64, FNV_OFFSET);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    bytes += d.len() as u64;
                    hash = fnv1a_update(hash, d);
                }
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("body error: {e}")),
        }
    }
    let json = serde_json::json!({
        "upstream": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": bytes,
        "body_fnv": hash,
    });
    let mut r = text(StatusCode::OK, &json.to_string());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn websocket(
    mut req: Request<Incoming>,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> Response<Body> {
    let is_ws = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| is_ws)
    else {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade");
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tracker.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = ws.next() => m,
            };
            match msg {
                Some(Ok(m)) if m.is_text() || m.is_binary() => {
                    if ws.send(m).await.is_err() {
                        return;
                    }
                }
                Some(Ok(m)) if m.is_close() => {
                    let _ = ws.close(None).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = r.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        header::HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    r
}

fn parse_query(q: Option<&str>) -> HashMap<&str, &str> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a_update(mut hash: u64, data: &[u8]) -> u64 {
    for b in data {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// FNV-1a 64-bit hash of `data`, as reported in `/echo`'s `body_fnv`.
pub fn fnv1a(data: &[u8]) -> u64 {
    fnv1a_update(FNV_OFFSET, data)
}

fn pattern_byte(i: u64) -> u8 {
    // Not periodic at any power of two, so a dropped or repeated chunk changes the content.
    (i.wrapping_mul(31) % 251) as u8
}

/// The first `n` bytes `GET /bytes?n=N` sends (a test compares what came through the proxy).
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n as u64).map(pattern_byte).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_health_echo_and_stops() {
        let up = start("alpha").await;
        let client = reqwest::Client::new();
        let r = client
            .get(format!("{}/health/web", up.url()))
            .send()
            .await
            .expect("probe");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-upstream"], "alpha");
        up.set_component("web", 503);
        let r = client
            .get(format!("{}/health/web", up.url()))
            .send()
            .await
            .expect("probe");
        assert_eq!(r.status(), 503);
        let v: serde_json::Value = client
            .post(format!("{}/echo/x?y=1", up.url()))
            .body("hello")
            .send()
            .await
            .expect("echo")
            .json()
            .await
            .expect("json");
        assert_eq!(v["path"], "/echo/x?y=1");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["body_bytes"], 5);
        assert_eq!(v["body_fnv"], fnv1a(b"hello"));
        let body = client
            .get(format!("{}/bytes?n=200000", up.url()))
            .send()
            .await
            .expect("bytes")
            .bytes()
            .await
            .expect("body");
        assert_eq!(&body[..], &pattern(200_000)[..]);
        assert_eq!(up.requests(), 2);
        assert_eq!(up.requests_to("/echo/x"), 1);

        up.stop().await;
        let fresh = reqwest::Client::new();
        assert!(
            fresh.get(format!("{}/", up.url())).send().await.is_err(),
            "a stopped site refuses connections"
        );
        up.restart().await;
        let r = fresh
            .get(format!("{}/", up.url()))
            .send()
            .await
            .expect("after restart");
        assert_eq!(r.text().await.expect("body"), "alpha GET /");
    }

    #[tokio::test]
    async fn websocket_echo() {
        let up = start("ws").await;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", up.addr()))
            .await
            .expect("connect");
        ws.send(tokio_tungstenite::tungstenite::Message::text("ping"))
            .await
            .expect("send");
        let m = ws.next().await.expect("a message").expect("no error");
        assert_eq!(m.into_text().expect("text"), "ping");
    }
}
