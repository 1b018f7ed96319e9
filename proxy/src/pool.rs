//! A worker's HTTP/1.1 connections to one plain `http://` site: hyper's `SendRequest` handles
//! kept in a per-worker list, each connection driven by a task on the worker's own thread.
//!
//! hyper-util's pooled client does the same job for every site kind, but per request it keys
//! a shared pool by URI under a lock, goes through the connector service, and often spawns a
//! task to wait for the connection to become idle again. Here a request takes the last
//! connection that is ready (no task, no key), and puts it back as soon as the answer's head
//! has arrived; a connection still busy with its body is skipped until hyper says it is ready.
//! `https://` sites keep hyper-util's client (ALPN may pick h2 there).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::ReqBody;
use crate::error::BoxError;

/// Upper bound of a connection's read buffer: hyper's default (~400 KiB) would let every
/// connection that streamed a large answer hold that much (measured: peak RSS after the 1 MiB
/// load halves at 64 KiB, with the same CPU per request; BENCHMARKS.md).
pub(crate) const MAX_READ_BUF: usize = 64 * 1024;

/// Why a request on the pool failed.
#[derive(Debug)]
pub(crate) enum PoolError {
    /// No connection could be opened: nothing reached the site.
    Connect(BoxError),
    /// The exchange failed on an open connection.
    Request(BoxError),
}

/// One worker's connections to one site.
#[derive(Debug)]
pub(crate) struct H1Pool {
    /// `host:port` of the site, as connected to.
    authority: String,
    /// `Host` for requests that came without one (HTTP/1.0 clients).
    host: HeaderValue,
    connect_timeout: Duration,
    /// A connection unused for this long is closed.
    idle_timeout: Duration,
    /// Connections kept; more are closed after their answer.
    max_idle: usize,
    /// Kept connections, the most recently used last (it is the warmest). Only the worker's own
    /// thread takes this lock, never across an await.
    idle: Mutex<Vec<Idle>>,
    builder: http1::Builder,
}

/// A kept connection.
#[derive(Debug)]
struct Idle {
    send: SendRequest<ReqBody>,
    /// When it was put back or last seen busy (for the idle timeout).
    since: Instant,
}

impl H1Pool {
    /// The pool for the site at `authority` (`host[:port]`, port 80 when absent).
    pub(crate) fn new(
        authority: &http::uri::Authority,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> H1Pool {
        let mut builder = http1::Builder::new();
        builder.max_buf_size(MAX_READ_BUF);
        H1Pool {
            authority: host_port(authority),
            host: HeaderValue::from_str(authority.as_str())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            builder,
        }
    }

    /// Sends `req` (origin-form URI) on a kept connection, or on a new one. A kept connection
    /// the site closed meanwhile hands the request back unsent; it then goes on the next one.
    pub(crate) async fn send(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, PoolError> {
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }
        while let Some(mut send) = self.checkout() {
            match send.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin(send, &resp);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(PoolError::Request(Box::new(e.into_error()))),
                },
            }
        }
        // Boxed: the connect path (resolve, connect, handshake) is several hundred bytes of
        // state that every request's future would carry, and copy when it is boxed, while
        // most requests take a kept connection.
        let mut send = Box::pin(self.connect()).await.map_err(PoolError::Connect)?;
        match send.try_send_request(req).await {
            Ok(resp) => {
                self.checkin(send, &resp);
                Ok(resp)
            }
            Err(e) => Err(PoolError::Request(Box::new(e.into_error()))),
        }
    }

    /// The most recently used connection that is ready; closed and expired ones are dropped,
    /// busy ones stay.
    fn checkout(&self) -> Option<SendRequest<ReqBody>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let entry = &mut idle[i];
            if entry.send.is_closed() {
                idle.swap_remove(i);
            } else if entry.send.is_ready() {
                let entry = idle.swap_remove(i);
                if now.duration_since(entry.since) < self.idle_timeout {
                    return Some(entry.send);
                }
            } else {
                entry.since = now;
            }
        }
        None
    }

    /// Keeps `send` for later requests unless its connection ends with this answer.
    fn checkin(&self, send: SendRequest<ReqBody>, resp: &Response<Incoming>) {
        // An upgraded connection belongs to its tunnel now.
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS || send.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                send,
                since: Instant::now(),
            });
        }
    }

    /// Closes connections idle for longer than the idle timeout (`all`: every idle one, at
    /// shutdown); connections busy with an answer stay.
    pub(crate) fn sweep(&self, all: bool) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|e| {
            !e.send.is_closed()
                && !(e.send.is_ready() && (all || now.duration_since(e.since) >= self.idle_timeout))
        });
    }

    /// Opens a connection and starts its task on this thread.
    async fn connect(&self) -> Result<SendRequest<ReqBody>, BoxError> {
        let tcp = connect_site(&self.authority, self.connect_timeout).await?;
        let (send, conn) = self.builder.handshake(TokioIo::new(tcp)).await?;
        // Not on the task tracker: the task ends when its `SendRequest` is dropped (the pool
        // is emptied at shutdown) or the site closes; it is the connection's I/O, owning no
        // work of its own beyond the answer a request future is reading.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "site connection ended with an error");
            }
        });
        Ok(send)
    }
}

/// `host:port` of a plain site's `authority` (port 80 when absent), as connected to.
pub(crate) fn host_port(authority: &http::uri::Authority) -> String {
    format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    )
}

/// A connection to a plain site, within `connect_timeout`: `TCP_NODELAY`, TCP keepalive
/// after 30 s idle (a site gone without a FIN is noticed).
pub(crate) async fn connect_site(
    authority: &str,
    connect_timeout: Duration,
) -> Result<TcpStream, BoxError> {
    let tcp = tokio::time::timeout(connect_timeout, connect_any(authority))
        .await
        .map_err(|_| format!("connect timeout ({connect_timeout:?})"))??;
    tcp.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30));
    socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
    Ok(tcp)
}

/// Connects to the first address of `authority` that accepts.
async fn connect_any(authority: &str) -> Result<TcpStream, BoxError> {
    let mut last: Option<std::io::Error> = None;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(authority).await?.collect();
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => e.into(),
        None => format!("{authority}: no address").into(),
    })
}
