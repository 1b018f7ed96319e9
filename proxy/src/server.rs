//! The public listeners: accept loop, per-connection task (HTTP/1.1 and HTTP/2 via hyper-util's
//! auto builder, optional TLS), timeouts against slow or idle clients, graceful shutdown.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::forward::{ConnInfo, Forwarder};

/// What every connection task of the public listeners shares.
#[derive(Debug)]
pub struct ServerCtx {
    /// The request path.
    pub forwarder: Arc<Forwarder>,
    /// Time a client has to send a complete request head (and to finish a TLS handshake).
    pub header_read_timeout: Duration,
    /// A connection with no bytes either way and no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// `gsb_client_connections`.
    pub connections: IntGauge,
    /// Stop accepting and close connections gracefully (in-flight requests finish).
    pub shutdown: CancellationToken,
    /// The shutdown grace period is over: close whatever is left.
    pub hard_stop: CancellationToken,
    builder: auto::Builder<TokioExecutor>,
}

impl ServerCtx {
    /// Connection settings shared by the plain and the TLS listener.
    pub fn new(
        forwarder: Arc<Forwarder>,
        header_read_timeout: Duration,
        idle_timeout: Duration,
        connections: IntGauge,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) -> ServerCtx {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(idle_timeout.max(Duration::from_secs(1))))
            .keep_alive_timeout(Duration::from_secs(20));
        ServerCtx {
            forwarder,
            header_read_timeout,
            idle_timeout,
            connections,
            shutdown,
            hard_stop,
            builder,
        }
    }
}

/// Accepts on `listener` until shutdown; each connection is served on its own task on `tracker`.
/// `name` (`http` or `https`) goes into the connection span and `X-Forwarded-Proto`.
pub async fn serve(
    listener: TcpListener,
    name: &'static str,
    tls: Option<TlsAcceptor>,
    ctx: Arc<ServerCtx>,
    tracker: TaskTracker,
) {
    let local = listener.local_addr().ok();
    tracing::info!(listener = name, addr = ?local, "listening");
    loop {
        let (tcp, peer) = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        let span = tracing::info_span!("conn", peer = %peer, listener = name);
        tracker.spawn(
            async move {
                ctx.connections.inc();
                let _gauge = GaugeGuard(&ctx.connections);
                let info = ConnInfo::new(peer, name);
                match tls {
                    None => serve_conn(tcp, info, &ctx).await,
                    Some(acceptor) => {
                        let handshake = tokio::select! {
                            r = tokio::time::timeout(ctx.header_read_timeout, acceptor.accept(tcp)) => r,
                            _ = ctx.shutdown.cancelled() => return,
                        };
                        match handshake {
                            Ok(Ok(stream)) => serve_conn(stream, info, &ctx).await,
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
    tracing::info!(listener = name, "stopped accepting");
}

struct GaugeGuard<'a>(&'a IntGauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Per connection: when bytes last moved, requests seen and in flight (for the watchdog).
#[derive(Debug)]
struct ConnState {
    start: Instant,
    /// Milliseconds after `start` of the last read or write.
    last_ms: AtomicU64,
    /// Requests whose handler has not returned yet (the connection is not idle while > 0).
    in_flight: AtomicU32,
    /// Request heads received; 0 means the client has not completed one yet (slowloris guard
    /// for the first request, HTTP/2 included; hyper guards later HTTP/1 requests itself).
    requests: AtomicU64,
}

impl ConnState {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: Arc<ConnState>) -> InFlight {
        state.requests.fetch_add(1, Ordering::Relaxed);
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

async fn serve_conn<S>(stream: S, info: ConnInfo, ctx: &ServerCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        in_flight: AtomicU32::new(0),
        requests: AtomicU64::new(0),
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        state: state.clone(),
    });
    let forwarder = ctx.forwarder.clone();
    let st = state.clone();
    let service = hyper::service::service_fn(move |req| {
        let forwarder = forwarder.clone();
        let info = info.clone();
        let guard = InFlight::new(st.clone());
        // Boxed: hyper keeps a slot sized for the service's future in every connection, idle
        // or not; the request future is ~3.5 KiB, a box pointer is 8 bytes. The allocation now
        // lives only while a request runs (measured: idle keep-alive memory per connection).
        Box::pin(async move {
            let resp = forwarder.handle(req, info).await;
            drop(guard);
            Ok::<_, Infallible>(resp)
        })
    });
    let conn = ctx.builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    // Set when the connection was asked to close (shutdown or idle); it may finish its work.
    let mut closing: Option<Instant> = None;
    loop {
        // Always a deadline in the future: a check that changes nothing must not spin.
        let check_at = if state.requests.load(Ordering::Relaxed) == 0 {
            state.start + ctx.header_read_timeout
        } else if state.in_flight.load(Ordering::Relaxed) > 0 {
            Instant::now() + ctx.idle_timeout
        } else {
            let idle_at = state.last_activity() + ctx.idle_timeout;
            match closing {
                Some(since) => idle_at.max(since + ctx.idle_timeout),
                None => idle_at,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = ctx.shutdown.cancelled(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = ctx.hard_stop.cancelled() => {
                tracing::debug!("closing: shutdown grace period over");
                return;
            }
            _ = tokio::time::sleep_until(check_at) => {
                let now = Instant::now();
                if state.requests.load(Ordering::Relaxed) == 0 {
                    tracing::info!(timeout = ?ctx.header_read_timeout, "closing: no complete request head in time");
                    return;
                }
                let idle = state.in_flight.load(Ordering::Relaxed) == 0
                    && now.duration_since(state.last_activity()) >= ctx.idle_timeout;
                match closing {
                    _ if !idle => {}
                    None => {
                        tracing::debug!("closing idle connection");
                        conn.as_mut().graceful_shutdown();
                        closing = Some(now);
                    }
                    // Asked to close politely an idle timeout ago and still here: drop it.
                    Some(since) if now.duration_since(since) >= ctx.idle_timeout => return,
                    Some(_) => {}
                }
            }
        }
    }
}

/// A stream that records when bytes last moved, for the idle watchdog.
struct Tracked<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.state.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.state.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Binds a TCP listener, naming the config key in the error.
pub async fn bind(
    addr: SocketAddr,
    what: &'static str,
) -> Result<TcpListener, crate::error::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::error::Error::Bind { addr, what, source })
}
