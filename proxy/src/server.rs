//! The public listeners: one accept loop per worker (each on its own `SO_REUSEPORT` socket and
//! current-thread runtime), a task per connection speaking HTTP/1.1 (hyper's http1 server:
//! request head limits answered 431) or HTTP/2 (prior knowledge on the plain port, ALPN `h2` on
//! TLS), timeouts against slow or idle clients, graceful shutdown.
//!
//! An idle plain HTTP/1.1 keep-alive connection is *parked*: once its last response is sent and
//! the client has sent nothing more, the hyper connection is ended without closing the socket
//! (its read and write buffers are freed) and the socket waits for readability alone; the next
//! request starts a new hyper connection on the same socket. An idle client then costs its
//! socket and this task's small state, not hyper's 16 KiB of buffers.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::future::Either;
use http::{Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::body::ProxyBody;
use crate::config::ListenerConfig;
use crate::error::{BoxError, ProxyError};
use crate::forward::{ConnInfo, Forwarder};
use crate::h1;

/// The client connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Pending connections the kernel queues per listening socket.
const BACKLOG: u32 = 1024;

/// What every connection task of the public listeners shares.
#[derive(Clone, Debug)]
pub struct ServerCtx {
    /// The request path.
    pub forwarder: Arc<Forwarder>,
    /// Time a client has to send a complete request head (and to finish a TLS handshake).
    pub header_read_timeout: Duration,
    /// A connection with no bytes either way and no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// `gsb_client_connections`.
    pub connections: IntGauge,
    /// Stop accepting and close connections gracefully (in-flight requests finish). Each
    /// worker holds a child of the process's token (see [`ServerCtx::for_worker`]).
    pub shutdown: CancellationToken,
    /// The shutdown grace period is over: close whatever is left. Always cancelled after
    /// `shutdown`, so a connection only waits for it once it is closing.
    pub hard_stop: CancellationToken,
    /// `proxy.max_headers`: hyper enforces it on HTTP/1 heads; HTTP/2 requests are counted here.
    pub(crate) max_headers: usize,
    /// `proxy.max_header_bytes` (hyper enforces it on HTTP/1 heads; the fast path hands a
    /// larger head to hyper).
    pub(crate) max_header_bytes: usize,
    /// Plain HTTP/1.1 requests take the fast path (`h1.rs`) when they can (`GSB_H1_FAST`).
    fast: bool,
    /// Requests this worker has taken (each worker's copy has its own counter, see
    /// [`ServerCtx::for_worker`]): the tick tells an idle worker from a busy one by it.
    pub(crate) served: Arc<AtomicU64>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl ServerCtx {
    /// Connection settings shared by the plain and the TLS listeners of every worker.
    pub fn new(
        forwarder: Arc<Forwarder>,
        proxy: &ListenerConfig,
        connections: IntGauge,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) -> ServerCtx {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(proxy.header_read_timeout)
            .keep_alive(true)
            .max_header_size(proxy.max_header_bytes);
        // hyper parses up to 100 headers on the stack; another limit costs a heap allocation
        // per request, so it is only set when configured.
        if proxy.max_headers != 100 {
            http1.max_headers(proxy.max_headers);
        }
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        // HTTP/2 counts 32 bytes of overhead per header field (RFC 9113 §6.5.2); h2 answers 431.
        let list = proxy.max_header_bytes + 32 * proxy.max_headers;
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(proxy.idle_timeout.max(Duration::from_secs(1))))
            .keep_alive_timeout(Duration::from_secs(20))
            .max_header_list_size(u32::try_from(list).unwrap_or(u32::MAX));
        ServerCtx {
            forwarder,
            header_read_timeout: proxy.header_read_timeout,
            idle_timeout: proxy.idle_timeout,
            connections,
            shutdown,
            hard_stop,
            max_headers: proxy.max_headers,
            max_header_bytes: proxy.max_header_bytes,
            fast: h1::enabled(),
            served: Arc::new(AtomicU64::new(0)),
            http1,
            http2,
        }
    }

    /// The copy one worker's connections use: its tokens are children of the process's, so
    /// the waiter lists every connection registers in (and their locks) belong to one thread
    /// instead of being shared by all workers' cores.
    fn for_worker(&self) -> ServerCtx {
        ServerCtx {
            shutdown: self.shutdown.child_token(),
            hard_stop: self.hard_stop.child_token(),
            served: Arc::new(AtomicU64::new(0)),
            ..self.clone()
        }
    }
}

/// Binds `n` listening sockets on `addr` (one per worker, `SO_REUSEPORT` when `n > 1` so the
/// kernel spreads new connections over them), naming the config key `what` in the error.
/// With port 0 every socket gets the port the first one was given.
pub async fn bind_workers(
    addr: SocketAddr,
    what: &'static str,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, crate::error::Error> {
    let err = |source| crate::error::Error::Bind { addr, what, source };
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    for _ in 0..n {
        let at = match out.first() {
            Some(first) => first.local_addr().map_err(err)?,
            None => addr,
        };
        let socket = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(err)?;
        socket.set_reuseaddr(true).map_err(err)?;
        if n > 1 {
            socket.set_reuseport(true).map_err(err)?;
        }
        socket.bind(at).map_err(err)?;
        let listener = socket.listen(BACKLOG).map_err(err)?;
        out.push(listener.into_std().map_err(err)?);
    }
    Ok(out)
}

/// Starts worker `index` on a thread of its own with a current-thread runtime: it accepts on
/// `plain` (and `tls`, with `acceptor`) until shutdown, serves its connections there, and keeps
/// its runtime up until every task on `tracker` is done (tunnels and connections of this worker
/// run on it).
pub fn spawn_worker(
    index: usize,
    plain: std::net::TcpListener,
    tls: Option<(std::net::TcpListener, TlsAcceptor)>,
    ctx: Arc<ServerCtx>,
    tracker: TaskTracker,
) -> Result<std::thread::JoinHandle<()>, crate::error::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(crate::error::Error::Worker)?;
    std::thread::Builder::new()
        .name(format!("gsb-worker-{index}"))
        .spawn(move || {
            let ctx = Arc::new(ctx.for_worker());
            runtime.block_on(async move {
                let plain = match TcpListener::from_std(plain) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(worker = index, error = %e, "cannot use the listener");
                        return;
                    }
                };
                let accept_plain = serve(plain, "http", None, ctx.clone(), tracker.clone(), index);
                let accept_tls = async {
                    if let Some((listener, acceptor)) = tls {
                        match TcpListener::from_std(listener) {
                            Ok(l) => {
                                serve(l, "https", Some(acceptor), ctx.clone(), tracker.clone(), index)
                                    .await
                            }
                            Err(e) => {
                                tracing::error!(worker = index, error = %e, "cannot use the TLS listener")
                            }
                        }
                    }
                };
                tokio::join!(accept_plain, accept_tls, tick(&ctx, index));
                // Connections and tunnels of this worker live on this runtime: keep it until the
                // whole proxy is done (the tracker is closed at shutdown).
                tracker.wait().await;
            })
        })
        .map_err(crate::error::Error::Worker)
}

/// Ticks every [`TIMER_TICK`] until shutdown, closing the worker's site connections idle past
/// the idle timeout (and every idle one at shutdown), and handing the worker's freed memory
/// back to the system once it went a whole tick without a request (see [`set_idle_release`]).
/// The tick also keeps the time driver awake: on a current-thread runtime, a timer registered
/// earlier than the driver's next planned wake-up makes tokio wake its own driver through its
/// eventfd (a `write(2)`); hyper's header read timeout is such a timer on every request when
/// nothing earlier is pending. With this tick pending, none is earlier (measured: one
/// `write(2)` per request without it, see BENCHMARKS.md).
async fn tick(ctx: &ServerCtx, worker: usize) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Requests counted at the last tick, and whether memory was released since the last one.
    let mut seen = 0;
    let mut released = true;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = tick.tick() => {
                ctx.forwarder.sweep_idle(worker, false);
                let served = ctx.served.load(Ordering::Relaxed);
                if served != seen {
                    (seen, released) = (served, false);
                } else if !released {
                    released = true;
                    if let Some(release) = IDLE_RELEASE.get() {
                        release();
                    }
                }
            }
        }
    }
    ctx.forwarder.sweep_idle(worker, true);
}

/// See [`tick`]. Short enough that a worker whose burst ended releases its memory within a
/// fraction of a second; a busy worker is woken by it ten times a second, for nothing.
const TIMER_TICK: Duration = Duration::from_millis(100);

/// What an idle worker calls on its own thread (see [`set_idle_release`]).
static IDLE_RELEASE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what a worker thread calls once it went a tick ([`TIMER_TICK`]) without a request
/// after having served some: the binary's allocator returns the pages the worker freed (the
/// buffers of a burst of requests), which it would otherwise keep. The allocator is the
/// binary's choice, so the proxy only offers the moment; the first call wins.
pub fn set_idle_release(release: fn()) {
    let _ = IDLE_RELEASE.set(release);
}

/// Accepts on `listener` until shutdown; each connection is served on its own task on `tracker`.
/// `name` (`http` or `https`) goes into the connection span and `X-Forwarded-Proto`.
pub async fn serve(
    listener: TcpListener,
    name: &'static str,
    tls: Option<TlsAcceptor>,
    ctx: Arc<ServerCtx>,
    tracker: TaskTracker,
    worker: usize,
) {
    let local = listener.local_addr().ok();
    tracing::info!(listener = name, addr = ?local, worker, "listening");
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
        let peer = Peer {
            addr: peer,
            listener: name,
            worker,
        };
        tracker.spawn(connection(tcp, peer, tls.clone(), ctx.clone()));
    }
    tracing::info!(listener = name, worker, "stopped accepting");
}

/// The task of one accepted connection. Its allocation is the size of this future, held for
/// as long as the client stays connected, parked or not: everything that only an active
/// request needs (hyper's connection, the TLS state, the answer to a refused head) is boxed,
/// and no value is kept twice (an async fn keeps its arguments for its whole run, so the plain
/// connection's future is returned as it is rather than awaited inside another one), so that
/// a parked connection keeps only its socket and small state (see the test).
fn connection(
    tcp: TcpStream,
    peer: Peer,
    tls: Option<TlsAcceptor>,
    ctx: Arc<ServerCtx>,
) -> impl Future<Output = ()> + Send + 'static {
    let accepted = Instant::now();
    let span = tracing::info_span!("conn", peer = %peer.addr, listener = peer.listener);
    match tls {
        None => Either::Left(serve_plain(tcp, peer, ctx, accepted)),
        Some(acceptor) => Either::Right(Box::pin(serve_tls(tcp, acceptor, peer, ctx, accepted))),
    }
    .instrument(span)
}

/// Who a connection is with, and where it was accepted (what its `ConnInfo` is made of once
/// it sends a request).
#[derive(Clone, Copy, Debug)]
struct Peer {
    addr: SocketAddr,
    /// `http` or `https`.
    listener: &'static str,
    worker: usize,
}

impl Peer {
    fn info(self) -> ConnInfo {
        ConnInfo::new(self.addr, self.listener, self.worker)
    }
}

/// Counts a connection in `gsb_client_connections` while it lives.
struct GaugeGuard<'a>(&'a IntGauge);

impl GaugeGuard<'_> {
    fn new(gauge: &IntGauge) -> GaugeGuard<'_> {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Per connection: when bytes last moved, requests seen and in flight (for the watchdog), and
/// the parking handshake between the stream wrapper and the driver.
#[derive(Debug)]
pub(crate) struct ConnState {
    start: Instant,
    /// Milliseconds after `start` of the last read or write.
    last_ms: AtomicU64,
    /// Requests whose handler has not returned yet (the connection is not idle while > 0).
    in_flight: AtomicU32,
    /// Responses whose body has not been sent (or dropped) yet: no parking while > 0.
    responding: AtomicU32,
    /// Request heads received; 0 means the client has not completed one yet (slowloris guard
    /// for the first request, HTTP/2 included; hyper guards later HTTP/1 requests itself).
    pub(crate) requests: AtomicU64,
    /// `requests` when the current hyper connection on this socket started.
    round_start: AtomicU64,
    /// Bytes were read since the last response finished (a next request may be half read).
    read_since_idle: AtomicBool,
    /// The stream saw a read that would block with nothing in flight: the connection is idle.
    park_wanted: AtomicBool,
    /// The driver is ending the hyper connection to park the socket: shutdown keeps it open.
    parking: AtomicBool,
}

impl ConnState {
    fn new(start: Instant) -> ConnState {
        ConnState {
            start,
            last_ms: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            responding: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            round_start: AtomicU64::new(0),
            read_since_idle: AtomicBool::new(false),
            park_wanted: AtomicBool::new(false),
            parking: AtomicBool::new(false),
        }
    }

    /// Bytes moved now.
    pub(crate) fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A request whose handler runs.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: Arc<ConnState>) -> InFlight {
        state.requests.fetch_add(1, Ordering::Relaxed);
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.responding.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A response whose body is being sent; counted in `responding` until hyper drops it.
struct Responding(Arc<ConnState>);

impl Drop for Responding {
    fn drop(&mut self) {
        self.0.read_since_idle.store(false, Ordering::Relaxed);
        self.0.responding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The body hyper sends to the client: the forwarder's, plus the guard that tells the
/// connection when the response is done.
struct ServedBody {
    inner: ProxyBody,
    _done: Responding,
}

impl Body for ServedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The future of one request: boxed, see [`service`].
type RequestFuture = Pin<Box<dyn Future<Output = Result<Response<ServedBody>, Infallible>> + Send>>;

/// The service of one connection: the forwarder, with the in-flight accounting around it.
fn service(
    ctx: &Arc<ServerCtx>,
    info: ConnInfo,
    state: Arc<ConnState>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ServedBody>,
    Error = Infallible,
    Future = RequestFuture,
> + Send
       + Unpin
       + 'static {
    // The worker's own context (not the forwarder every worker shares): the reference count
    // bumped per request stays on this worker's core.
    let ctx = ctx.clone();
    let max_headers = ctx.max_headers;
    hyper::service::service_fn(move |req: Request<Incoming>| {
        ctx.served.fetch_add(1, Ordering::Relaxed);
        let ctx = ctx.clone();
        let info = info.clone();
        let guard = InFlight::new(state.clone());
        let done = Responding(state.clone());
        // Boxed: hyper keeps a slot sized for the service's future in every connection, idle
        // or not; the request future is ~3.5 KiB, a box pointer is 8 bytes. The allocation
        // lives only while a request runs (measured: idle keep-alive memory per connection).
        Box::pin(async move {
            // hyper limits HTTP/1 heads itself; HTTP/2 bounds the bytes but not the count.
            let resp = if req.version() == Version::HTTP_2 && req.headers().len() > max_headers {
                ProxyError::HeadersTooLarge.into_response()
            } else {
                ctx.forwarder.handle(req, info).await
            };
            drop(guard);
            Ok::<_, Infallible>(resp.map(|inner| ServedBody { inner, _done: done }))
        }) as RequestFuture
    })
}

/// A plain TCP connection: HTTP/2 if it opens with the prior-knowledge preface, else HTTP/1.1
/// with parking between requests. Nothing is allocated for HTTP until the first bytes arrive.
async fn serve_plain(tcp: TcpStream, peer: Peer, owned: Arc<ServerCtx>, accepted: Instant) {
    let ctx = &*owned;
    let _gauge = GaugeGuard::new(&ctx.connections);
    // The connection's one watchdog timer, armed for the first request head and re-armed only
    // when it fires (see `drive`): no timer is registered or cleared per request.
    let timer = tokio::time::sleep_until(accepted + ctx.header_read_timeout);
    tokio::pin!(timer);
    let sniffed = tokio::select! {
        biased;
        // Boxed: awaited once, and its state (a peek and a timer) would otherwise be part of
        // the task for the connection's whole life.
        r = Box::pin(sniff_h2(&tcp)) => r,
        () = timer.as_mut() => {
            tracing::info!(timeout = ?ctx.header_read_timeout, "closing: no complete request head in time");
            return;
        }
        // `hard_stop` comes after `shutdown`: waiting for the first is enough.
        _ = ctx.shutdown.cancelled() => return,
    };
    let h2 = match sniffed {
        Ok(Some(h2)) => h2,
        // Closed before sending anything, or a socket error.
        Ok(None) | Err(_) => return,
    };
    if h2 {
        return Box::pin(serve_conn(tcp, true, peer, &owned, accepted, timer)).await;
    }
    let state = Arc::new(ConnState::new(accepted));
    let mut svc = service(&owned, peer.info(), state.clone());
    let mut stream = Tracked::new(tcp, state.clone(), true);
    loop {
        // The fast path first; it hands back an idle connection (parked here, as below), or
        // one with what it does not take, for a hyper connection.
        if ctx.fast {
            let conn = h1::Conn {
                tcp: &mut stream.inner,
                peer: peer.addr,
                worker: peer.worker,
                state: &state,
                accepted,
            };
            // Boxed: its buffers and state live only while a request is served.
            match Box::pin(h1::serve(conn, std::mem::take(&mut stream.prefix), ctx)).await {
                h1::Next::Idle => {
                    if !wait_parked(&stream.inner, &state, ctx, timer.as_mut()).await {
                        return;
                    }
                    continue;
                }
                h1::Next::Close => return,
                h1::Next::Fallback(bytes) => stream.prefix = bytes,
            }
        }
        state
            .round_start
            .store(state.requests.load(Ordering::Relaxed), Ordering::Relaxed);
        // Boxed, like the driver: while parked, the task keeps neither.
        let mut conn = Box::new(
            ctx.http1
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades(),
        );
        let outcome = Box::pin(drive(Pin::new(&mut *conn), &state, ctx, timer.as_mut())).await;
        // Taken apart in a block with no await in it, so that hyper's parts are never kept
        // in the task (while parked, it holds only the stream and the service).
        (stream, svc) = {
            // Upgraded (the tunnel owns the socket now): nothing more to do here.
            let Some(parts) = conn.into_parts() else {
                return;
            };
            let mut back = parts.io.into_inner();
            // hyper's buffers go; bytes it had read but not parsed are handed to the next
            // hyper connection (copied: even an empty `Bytes` split from hyper's read buffer
            // keeps all of it allocated).
            back.prefix = match parts.read_buf.is_empty() {
                true => Bytes::new(),
                false => Bytes::copy_from_slice(&parts.read_buf),
            };
            (back, parts.service)
        };
        match outcome {
            Outcome::Parked => {}
            Outcome::Closed => return,
            // A head hyper refused (431 for one too large): the client may still be sending
            // it. Closing with unread bytes would reset the connection and could destroy the
            // answer before the client reads it, so read and drop the rest for a moment.
            // Boxed: its read buffer would otherwise be part of every connection's task.
            Outcome::Rejected => return Box::pin(linger(stream.inner)).await,
        }
        state.parking.store(false, Ordering::Relaxed);
        if stream.prefix.is_empty()
            && !wait_parked(&stream.inner, &state, ctx, timer.as_mut()).await
        {
            return;
        }
    }
}

/// How long, and how many bytes, a connection whose request was refused is read and dropped
/// before it is closed.
const LINGER: (Duration, usize) = (Duration::from_secs(2), 1 << 20);

/// Reads and drops what the client still sends, up to [`LINGER`], then closes.
async fn linger(mut tcp: TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let mut left = LINGER.1;
    let drain = async {
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER.0, drain).await;
}

/// Whether the connection starts with the HTTP/2 preface; `None` if it closed first.
async fn sniff_h2(tcp: &TcpStream) -> io::Result<Option<bool>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if !H2_PREFACE.starts_with(&buf[..n]) {
            return Ok(Some(false));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(true));
        }
        // Part of the preface so far: peek again once more has arrived. (Boxed: rare, and
        // its timer would otherwise be part of every connection's task.)
        Box::pin(tokio::time::sleep(Duration::from_millis(5))).await;
    }
}

/// A parked connection waits for the client's next bytes; `false` when it should close (idle
/// timeout, shutdown, error). `timer` is the connection's watchdog: it may fire before the
/// idle deadline (it was armed for an earlier one) and is then re-armed. Readiness is polled
/// on the socket itself (its one reader slot, no waiter node kept in this task's state).
async fn wait_parked(
    tcp: &TcpStream,
    state: &ConnState,
    ctx: &ServerCtx,
    mut timer: Pin<&mut Sleep>,
) -> bool {
    let shutdown = ctx.shutdown.cancelled();
    tokio::pin!(shutdown);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = tcp.poll_read_ready(cx) {
            return Poll::Ready(r.is_ok());
        }
        while timer.as_mut().poll(cx).is_ready() {
            let idle_at = state.last_activity() + ctx.idle_timeout;
            if Instant::now() >= idle_at {
                tracing::debug!("closing idle connection");
                return Poll::Ready(false);
            }
            timer.as_mut().reset(idle_at);
        }
        match shutdown.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A TLS connection: handshake (bounded by the header read timeout), then HTTP/2 if ALPN chose
/// `h2`, else HTTP/1.1.
async fn serve_tls(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    peer: Peer,
    owned: Arc<ServerCtx>,
    accepted: Instant,
) {
    let ctx = &*owned;
    let _gauge = GaugeGuard::new(&ctx.connections);
    let timer = tokio::time::sleep_until(accepted + ctx.header_read_timeout);
    tokio::pin!(timer);
    let handshake = tokio::select! {
        biased;
        r = acceptor.accept(tcp) => r,
        () = timer.as_mut() => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
        _ = ctx.shutdown.cancelled() => return,
    };
    match handshake {
        Ok(stream) => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_conn(stream, h2, peer, &owned, accepted, timer).await
        }
        Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
    }
}

/// A TLS connection or an HTTP/2 one: served by one hyper connection to the end. `timer` is the
/// connection's watchdog, still armed for the first request head.
async fn serve_conn<S>(
    stream: S,
    h2: bool,
    peer: Peer,
    ctx: &Arc<ServerCtx>,
    accepted: Instant,
    timer: Pin<&mut Sleep>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState::new(accepted));
    let svc = service(ctx, peer.info(), state.clone());
    let io = TokioIo::new(Tracked::new(stream, state.clone(), false));
    if h2 {
        let conn = ctx.http2.serve_connection(io, svc);
        tokio::pin!(conn);
        drive(conn, &state, ctx, timer).await;
    } else {
        let mut conn = ctx.http1.serve_connection(io, svc).with_upgrades();
        drive(Pin::new(&mut conn), &state, ctx, timer).await;
    }
}

/// A hyper server connection the driver can ask to finish.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> Graceful for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// What the connection future did when polled.
enum Step {
    /// The connection ended.
    Done(hyper::Result<()>),
    /// It is idle and may be parked.
    Park,
}

/// How a hyper connection ended.
enum Outcome {
    /// It was parked: the socket is open and idle.
    Parked,
    /// The connection is over.
    Closed,
    /// hyper refused a request head (too large, malformed) and answered it.
    Rejected,
}

/// Runs one hyper connection with the watchdog (first head, idle, shutdown).
///
/// `timer` is the connection's watchdog, kept across the hyper connections of a parked socket:
/// it is re-armed only when it fires, so it may fire early (armed for a deadline that moved
/// later since, e.g. while a request was in flight); the check then acts on the state as it
/// is and arms it for the next moment that could matter. A busy connection thus costs one
/// timer wake-up per idle timeout, not a registration per request.
async fn drive<C: Graceful>(
    mut conn: Pin<&mut C>,
    state: &ConnState,
    ctx: &ServerCtx,
    mut timer: Pin<&mut Sleep>,
) -> Outcome {
    // Set when the connection was asked to close (shutdown or idle); it may finish its work.
    let mut closing: Option<Instant> = None;
    loop {
        let may_park = closing.is_none();
        let polled = std::future::poll_fn(|cx| match conn.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Step::Done(r)),
            Poll::Pending if may_park && state.park_wanted.swap(false, Ordering::Relaxed) => {
                Poll::Ready(Step::Park)
            }
            Poll::Pending => Poll::Pending,
        });
        tokio::select! {
            // The connection first: one being parked ends on its first poll, and the other
            // branches are then never polled (no waiter registered, none to remove).
            biased;
            step = polled => match step {
                Step::Done(r) => {
                    return match r {
                        Err(e) if e.is_parse() || e.is_parse_too_large() => {
                            tracing::debug!(error = %e, "request head refused");
                            Outcome::Rejected
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "connection ended with an error");
                            Outcome::Closed
                        }
                        Ok(()) if state.parking.load(Ordering::Relaxed) => Outcome::Parked,
                        Ok(()) => Outcome::Closed,
                    };
                }
                // Parked at once, not after a while: buffers freed right after each answer are
                // taken again by the next request, so the allocator never holds a peak's worth
                // (measured: RSS of 9,500 idle connections; the CPU cost per request of a new
                // hyper connection was within the noise, BENCHMARKS.md).
                Step::Park => {
                    state.parking.store(true, Ordering::Relaxed);
                    conn.as_mut().graceful();
                    closing = Some(Instant::now());
                }
            },
            _ = ctx.shutdown.cancelled(), if closing.is_none() => {
                conn.as_mut().graceful();
                closing = Some(Instant::now());
            }
            // Cancelled only after `shutdown`, whose branch set `closing` first.
            _ = ctx.hard_stop.cancelled(), if closing.is_some() => {
                tracing::debug!("closing: shutdown grace period over");
                return Outcome::Closed;
            }
            () = timer.as_mut() => {
                let now = Instant::now();
                if state.requests.load(Ordering::Relaxed) == 0 {
                    tracing::info!(timeout = ?ctx.header_read_timeout, "closing: no complete request head in time");
                    return Outcome::Closed;
                }
                let in_flight = state.in_flight.load(Ordering::Relaxed) > 0;
                let idle = !in_flight && now.duration_since(state.last_activity()) >= ctx.idle_timeout;
                match closing {
                    _ if !idle => {}
                    None => {
                        tracing::debug!("closing idle connection");
                        state.parking.store(false, Ordering::Relaxed);
                        conn.as_mut().graceful();
                        closing = Some(now);
                    }
                    // Asked to close politely an idle timeout ago and still here: drop it.
                    Some(since) if now.duration_since(since) >= ctx.idle_timeout => {
                        return Outcome::Closed
                    }
                    Some(_) => {}
                }
                // Always a deadline in the future: a check that changes nothing must not spin.
                let next = if in_flight {
                    now + ctx.idle_timeout
                } else {
                    let idle_at = state.last_activity() + ctx.idle_timeout;
                    match closing {
                        Some(since) => idle_at.max(since + ctx.idle_timeout),
                        None => idle_at,
                    }
                };
                timer.as_mut().reset(next);
            }
        }
    }
}

/// A stream that records when bytes last moved (for the watchdog), serves bytes read by an
/// earlier hyper connection first (`prefix`), and tells the driver when the connection is
/// idle so it can be parked (`park`).
struct Tracked<S> {
    inner: S,
    state: Arc<ConnState>,
    /// Read but not parsed by the previous hyper connection on this socket.
    prefix: Bytes,
    /// Parking is possible (plain HTTP/1.1 only).
    park: bool,
}

impl<S> Tracked<S> {
    fn new(inner: S, state: Arc<ConnState>, park: bool) -> Tracked<S> {
        Tracked {
            inner,
            state,
            prefix: Bytes::new(),
            park,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.state.read_since_idle.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        match r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.state.touch();
                this.state.read_since_idle.store(true, Ordering::Relaxed);
            }
            Poll::Pending if this.park => {
                let s = &this.state;
                let idle = s.responding.load(Ordering::Relaxed) == 0
                    && s.requests.load(Ordering::Relaxed) > s.round_start.load(Ordering::Relaxed)
                    && !s.read_since_idle.load(Ordering::Relaxed);
                if idle {
                    s.park_wanted.store(true, Ordering::Relaxed);
                }
            }
            _ => {}
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
        let this = self.get_mut();
        // Parking ends the hyper connection, not the TCP connection.
        if this.state.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::drain::Drain;
    use crate::metrics::ProxyMetrics;
    use crate::passive::PassiveHealth;
    use crate::route::{RouteSnapshot, Router, Site};

    fn ctx() -> Arc<ServerCtx> {
        let config = Config::from_toml_str(
            "[sites.primary]\nurl = \"http://127.0.0.1:1\"\n\
             [sites.backup]\nurl = \"http://127.0.0.1:2\"\n",
        )
        .expect("config");
        let metrics = ProxyMetrics::register(&prometheus::Registry::new(), false).expect("metrics");
        let hard_stop = CancellationToken::new();
        let forwarder = Forwarder::new(
            &config,
            Router::new(RouteSnapshot::initial(Site::Primary)),
            Arc::new(PassiveHealth::default()),
            metrics.clone(),
            Arc::new(Drain::default()),
            TaskTracker::new(),
            hard_stop.clone(),
        )
        .expect("forwarder");
        Arc::new(ServerCtx::new(
            Arc::new(forwarder),
            &config.proxy,
            metrics.client_connections.clone(),
            CancellationToken::new(),
            hard_stop,
        ))
    }

    /// Every open client connection, parked or not, holds its task's allocation: the size of
    /// the connection future. Its large parts (hyper's connection, TLS, a refused head's
    /// linger buffer) are boxed, so it stays a small fraction of the idle-memory goal
    /// (4 KiB per connection, BENCHMARKS.md).
    #[tokio::test]
    async fn a_connection_task_is_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, peer) = listener.accept().await.expect("accept");
        let peer = Peer {
            addr: peer,
            listener: "http",
            worker: 0,
        };
        let task = connection(tcp, peer, None, ctx());
        let size = std::mem::size_of_val(&task);
        eprintln!("connection task future: {size} bytes");
        assert!(size <= 1024, "a connection's task future is {size} bytes");
        drop((task, client));
    }
}
