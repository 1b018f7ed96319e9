//! The HTTP/1.1 fast path: plain clients to plain sites, one parse and one encode per direction.
//!
//! A request head is parsed in place (`httparse`) from a per-connection buffer, rewritten for the
//! site in one pass (the same headers the hyper path sends: hop-by-hop headers removed,
//! `X-Forwarded-For` appended, `-Proto` and `-Host` set) and written on a kept TCP connection of
//! the worker's [`RawPool`]; the answer's head is parsed and rewritten the same way, and its
//! body relayed as it comes (`Content-Length`, chunked bytes verbatim, or read to the end and
//! sent chunked). Everything runs in the client connection's task: no second task, no channel,
//! no `HeaderMap`.
//!
//! It is strict and handles the common cases only. Whatever it does not take whole goes to the
//! hyper path on the same connection, with the bytes read so far ([`Next::Fallback`]), before
//! anything reached a site: `Transfer-Encoding`, `Upgrade`, `Expect`, `CONNECT`, HTTP/1.0, a
//! missing or repeated `Host`, a repeated `Content-Length` or `X-Forwarded-For`, `Connection`
//! tokens other than `close`/`keep-alive`, a path outside plain URI characters, detectbackup,
//! a body over [`MAX_BODY`], any parse error, and heads over the limits (hyper answers those
//! 400 and 431 as it always did). Settings that change answers (redirect mode, the request log,
//! an `https://` site) send every request there.

use std::io;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::error::{BoxError, ProxyError, RetryType};
use crate::forward::{Forwarder, Settings};
use crate::pool::PoolError;
use crate::route::{RouteSnapshot, Site};
use crate::server::{ConnState, ServerCtx};

/// Request bodies the fast path takes (buffered whole, so a retry can resend them); a longer
/// one goes to hyper, which streams it.
pub(crate) const MAX_BODY: usize = 64 * 1024;
/// First capacity of a read buffer: a whole small request or answer.
const FIRST_READ: usize = 4096;
/// Largest answer head from a site (hyper's client is held to the same, `pool::MAX_READ_BUF`).
const MAX_RESP_HEAD: usize = crate::pool::MAX_READ_BUF;
/// Read size while relaying a long body.
const RELAY_BUF: usize = 64 * 1024;
/// Headers a site's answer may have (hyper's client default).
const MAX_RESP_HEADERS: usize = 100;

/// Whether the fast path is on: `GSB_H1_FAST=0` turns it off, `1` on; unset: [`DEFAULT_ON`].
/// An internal switch for A/B runs, not a config key.
pub(crate) fn enabled() -> bool {
    match std::env::var("GSB_H1_FAST") {
        Ok(v) => v.trim() != "0",
        Err(_) => DEFAULT_ON,
    }
}

/// The fast path's default (see BENCHMARKS.md, 2026-12-02).
const DEFAULT_ON: bool = true;

/// What the connection does after [`serve`].
#[derive(Debug)]
pub(crate) enum Next {
    /// The answer is sent and nothing more was read: wait for the client's next bytes.
    Idle,
    /// Close the connection.
    Close,
    /// The hyper path takes the connection from here, these bytes first.
    Fallback(Bytes),
}

/// What [`serve`] needs of its connection.
pub(crate) struct Conn<'a> {
    pub tcp: &'a mut TcpStream,
    pub peer: std::net::SocketAddr,
    pub worker: usize,
    pub state: &'a ConnState,
    /// When the connection was accepted (the first head's deadline counts from it).
    pub accepted: Instant,
}

/// Serves requests from `prefix` and the socket until the client is idle, asks to close, or
/// sends what the fast path does not take.
pub(crate) async fn serve(conn: Conn<'_>, prefix: Bytes, ctx: &ServerCtx) -> Next {
    let fwd = &*ctx.forwarder;
    let settings = fwd.worker_settings(conn.worker);
    if !settings.fast_path() {
        return Next::Fallback(prefix);
    }
    let mut buf = Vec::with_capacity(prefix.len().max(FIRST_READ));
    buf.extend_from_slice(&prefix);
    drop(prefix);
    let limits = Limits {
        max_header_bytes: ctx.max_header_bytes,
        max_headers: ctx.max_headers,
    };
    let mut ip = [0u8; 48];
    let ip = format_ip(conn.peer, &mut ip);
    let first = conn
        .state
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0;
    let mut deadline = match first {
        true => conn.accepted + ctx.header_read_timeout,
        false => Instant::now() + ctx.header_read_timeout,
    };
    loop {
        let route = fwd.route();
        let base = settings.base_path(route.active);
        // The head, then the body.
        let req = loop {
            if !buf.is_empty() {
                match parse_request(&buf, limits, ip, base) {
                    ReqParse::Done(req) => break req,
                    ReqParse::Partial => {}
                    ReqParse::Fallback => return Next::Fallback(Bytes::from(buf)),
                }
            }
            reserve(&mut buf);
            let read = tokio::time::timeout_at(deadline, conn.tcp.read_buf(&mut buf));
            let r = tokio::select! {
                biased;
                r = read => r,
                _ = ctx.shutdown.cancelled() => return Next::Close,
            };
            match r {
                Ok(Ok(n)) if n > 0 => conn.state.touch(),
                Ok(_) => return Next::Close,
                Err(_) => {
                    tracing::info!(timeout = ?ctx.header_read_timeout, "closing: no complete request head in time");
                    return Next::Close;
                }
            }
        };
        let total = req.head_len + req.body_len;
        while buf.len() < total {
            buf.reserve(total - buf.len());
            let read = tokio::time::timeout(ctx.idle_timeout, conn.tcp.read_buf(&mut buf));
            let r = tokio::select! {
                biased;
                r = read => r,
                _ = ctx.hard_stop.cancelled() => return Next::Close,
            };
            match r {
                Ok(Ok(n)) if n > 0 => conn.state.touch(),
                _ => return Next::Close,
            }
        }
        ctx.served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        conn.state
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let close = req.close || ctx.shutdown.is_cancelled();
        let tcp = &mut *conn.tcp;
        let exchange = exchange(
            fwd,
            &settings,
            &route,
            tcp,
            conn.worker,
            &req,
            &buf[..total],
            close,
            ctx,
        );
        // As a hyper connection: once shutting down, the grace period's end cuts the request.
        let stop = async {
            ctx.shutdown.cancelled().await;
            ctx.hard_stop.cancelled().await;
        };
        let ok = tokio::select! {
            biased;
            ok = exchange => ok,
            () = stop => false,
        };
        conn.state.touch();
        if !ok || close {
            return Next::Close;
        }
        buf.drain(..total);
        if buf.is_empty() {
            return Next::Idle;
        }
        // The next head (pipelined, maybe partial) has its own time, as after parking.
        deadline = Instant::now() + ctx.header_read_timeout;
    }
}

/// One request: forwarded (with the hyper path's retry rules), answered, counted. `false`
/// when the client connection must close (the answer could not be sent whole).
#[allow(clippy::too_many_arguments)]
async fn exchange(
    fwd: &Forwarder,
    settings: &Settings,
    route: &RouteSnapshot,
    tcp: &mut TcpStream,
    worker: usize,
    req: &ReqHead,
    raw: &[u8],
    close: bool,
    ctx: &ServerCtx,
) -> bool {
    let started = Instant::now();
    let tokens = fwd.drain_tokens(worker);
    let result = forward(fwd, settings, route, worker, req, raw, close, &tokens).await;
    match result {
        Ok((site, up, head, rbuf)) => {
            fwd.passive_status(site, head.status);
            fwd.count_request(site, status_code(head.status), started);
            let pool = settings.raw_pool(site, worker);
            let cut = Cut {
                drain: &tokens.drain,
                hard_stop: &ctx.hard_stop,
                pause: settings.upstream_timeout(),
            };
            relay(tcp, up, head, rbuf, pool, cut).await
        }
        Err(e) => {
            let site = e.site().unwrap_or(route.active);
            tracing::warn!(site = site.as_str(), kind = e.kind(), error = %e, "request failed");
            let resp = e.into_response();
            fwd.count_request(site, resp.status(), started);
            let mut out = Vec::with_capacity(256);
            local_answer(resp, req.is_head, close, &mut out);
            tcp.write_all(&out).await.is_ok()
        }
    }
}

fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)
}

/// The request on the active site, and once more on the other when the hyper path would retry
/// it there (`Forwarder::forward`): the same safety, budget, metrics and logs.
#[allow(clippy::too_many_arguments)]
async fn forward(
    fwd: &Forwarder,
    settings: &Settings,
    route: &RouteSnapshot,
    worker: usize,
    req: &ReqHead,
    raw: &[u8],
    close: bool,
    tokens: &crate::drain::Tokens,
) -> Result<(Site, TcpStream, RespHead, Vec<u8>), ProxyError> {
    fwd.budget_deposit();
    let first = route.active;
    let other = first.other();
    let has_body = req.body_len > 0;
    let may_retry = route.usable[other.index()];
    let moved = req.idempotent && !has_body && may_retry;
    let wire = req.wire(raw);
    let err = match attempt(
        settings, first, worker, req, &wire, close, tokens, moved, fwd,
    )
    .await
    {
        Ok((up, head, rbuf)) => return Ok((first, up, head, rbuf)),
        Err(err) => err,
    };
    fwd.count_error(&err);
    let safe = match err.retry() {
        RetryType::Always => true,
        RetryType::IfIdempotent => req.idempotent && !has_body,
        RetryType::Never => false,
    };
    // The body is buffered: it is there for a retry whenever the hyper path would still have
    // it (an attempt that failed before sending it: a connect failure).
    if safe
        && may_retry
        && (err.retry() == RetryType::Always
            || matches!(err, ProxyError::Moved { .. })
            || fwd.budget_withdraw())
    {
        tracing::info!(
            from = first.as_str(),
            to = other.as_str(),
            kind = err.kind(),
            "retrying on the other site"
        );
        fwd.count_retry(first, other);
        let base = settings.base_path(other);
        let wire = match base == settings.base_path(first) {
            true => wire,
            false => req.wire_for(raw, base),
        };
        return match attempt(
            settings, other, worker, req, &wire, close, tokens, false, fwd,
        )
        .await
        {
            Ok((up, head, rbuf)) => Ok((other, up, head, rbuf)),
            Err(err2) => {
                fwd.count_error(&err2);
                Err(ProxyError::NoSite(Box::new(err2)))
            }
        };
    }
    if route.none_available || (err.retry() == RetryType::Always && !route.usable[other.index()]) {
        return Err(ProxyError::NoSite(Box::new(err)));
    }
    Err(err)
}

/// One exchange with `site` up to the answer's head, bounded like the hyper path's
/// (`proxy.upstream_timeout`, the drain, a move off a site that went down).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    settings: &Settings,
    site: Site,
    worker: usize,
    req: &ReqHead,
    wire: &[u8],
    close: bool,
    tokens: &crate::drain::Tokens,
    moved: bool,
    fwd: &Forwarder,
) -> Result<(TcpStream, RespHead, Vec<u8>), ProxyError> {
    let Some(pool) = settings.raw_pool(site, worker) else {
        return Err(ProxyError::Internal("no plain pool for the site".into()));
    };
    let timeout = settings.upstream_timeout();
    let mut rbuf = Vec::new();
    let send = pool.exchange(wire, &mut rbuf, req.idempotent, req.is_head, close);
    let exchange = tokio::time::timeout(timeout, send);
    let result = tokio::select! {
        biased;
        r = exchange => r,
        _ = tokens.drain.cancelled() => return Err(ProxyError::Drained { site }),
        _ = tokens.moved.cancelled(), if moved => return Err(ProxyError::Moved { site }),
    };
    match result {
        Ok(Ok((up, head))) => Ok((up, head, rbuf)),
        Ok(Err(PoolError::Connect(source))) => {
            fwd.passive_connect_failure(site);
            Err(ProxyError::Connect { site, source })
        }
        Ok(Err(PoolError::Request(source))) => Err(ProxyError::Upstream { site, source }),
        Err(_) => Err(ProxyError::Timeout { site, timeout }),
    }
}

/// What cuts a long answer: the drain timeout, the hard stop, or a site silent for `pause`
/// mid-body (`proxy.upstream_timeout`, as on the hyper path).
struct Cut<'a> {
    drain: &'a tokio_util::sync::CancellationToken,
    hard_stop: &'a tokio_util::sync::CancellationToken,
    pause: Duration,
}

/// Sends the answer's head and relays its body; the site connection goes back to `pool` when
/// its answer ended cleanly. `false`: the client connection must close (the site failed,
/// went silent or was cut mid-answer, or the client went away).
async fn relay(
    client: &mut TcpStream,
    mut up: TcpStream,
    head: RespHead,
    mut rbuf: Vec<u8>,
    pool: Option<&RawPool>,
    Cut {
        drain,
        hard_stop,
        pause,
    }: Cut<'_>,
) -> bool {
    let RespHead {
        head_len,
        framing,
        mut reusable,
        mut out,
        chunks,
        ..
    } = head;
    let body = &rbuf[head_len..];
    let mut body_state = match framing {
        Framing::None => {
            reusable &= body.is_empty();
            BodyState::Done
        }
        Framing::Length(n) => {
            let take = body.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            out.extend_from_slice(&body[..take]);
            reusable &= take == body.len();
            match n - take as u64 {
                0 => BodyState::Done,
                rest => BodyState::Length(rest),
            }
        }
        Framing::Chunked => {
            // `parse_response` scanned the bytes read with the head.
            debug_assert!(chunks.is_some(), "a chunked head comes with its scan");
            let (scan, used) = chunks.unwrap_or_default();
            out.extend_from_slice(&body[..used]);
            reusable &= used == body.len();
            match scan.done() {
                true => BodyState::Done,
                false => BodyState::Chunked(scan),
            }
        }
        Framing::Eof => {
            reusable = false;
            if !body.is_empty() {
                chunk_frame(&mut out, body);
            }
            BodyState::Eof
        }
    };
    if client.write_all(&out).await.is_err() {
        return false;
    }
    drop(out);
    if matches!(body_state, BodyState::Done) {
        if reusable {
            if let Some(pool) = pool {
                pool.checkin(up);
            }
        }
        return true;
    }
    // A long answer: read and write through one buffer, cut by the drain or the hard stop.
    let cut = async {
        tokio::select! {
            _ = drain.cancelled() => {}
            _ = hard_stop.cancelled() => {}
        }
    };
    tokio::pin!(cut);
    let size = match &body_state {
        BodyState::Length(rest) => {
            usize::try_from(*rest).map_or(RELAY_BUF, |r| r.clamp(FIRST_READ, RELAY_BUF))
        }
        _ => RELAY_BUF,
    };
    rbuf.clear();
    rbuf.resize(size, 0);
    let mut frame = Vec::new();
    loop {
        let want = match &body_state {
            BodyState::Length(rest) => size.min(usize::try_from(*rest).unwrap_or(size)),
            _ => size,
        };
        let n = tokio::select! {
            biased;
            r = tokio::time::timeout(pause, up.read(&mut rbuf[..want])) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "site connection failed mid-answer");
                    return false;
                }
                Err(_) => {
                    tracing::warn!(?pause, "answer cut: the site sent nothing mid-body for proxy.upstream_timeout");
                    return false;
                }
            },
            () = &mut cut => {
                tracing::info!("answer cut: drain timeout passed or shutting down");
                return false;
            }
        };
        let data = &rbuf[..n];
        let (send, finished): (&[u8], bool) = match &mut body_state {
            BodyState::Length(rest) => {
                if n == 0 {
                    tracing::debug!("site closed mid-answer");
                    return false;
                }
                *rest -= n as u64;
                (data, *rest == 0)
            }
            BodyState::Chunked(scan) => {
                if n == 0 {
                    tracing::debug!("site closed mid-answer");
                    return false;
                }
                match scan.feed(data) {
                    Ok(used) => {
                        reusable &= used == n;
                        (&data[..used], scan.done())
                    }
                    Err(()) => {
                        tracing::debug!("site sent a malformed chunked body");
                        return false;
                    }
                }
            }
            BodyState::Eof => {
                frame.clear();
                if n == 0 {
                    frame.extend_from_slice(b"0\r\n\r\n");
                } else {
                    chunk_frame(&mut frame, data);
                }
                (&frame[..], n == 0)
            }
            BodyState::Done => (&[][..], true),
        };
        if !send.is_empty() && client.write_all(send).await.is_err() {
            return false;
        }
        if finished {
            body_state = BodyState::Done;
            break;
        }
    }
    debug_assert!(matches!(body_state, BodyState::Done));
    if reusable {
        if let Some(pool) = pool {
            pool.checkin(up);
        }
    }
    true
}

/// Where a relayed body is.
enum BodyState {
    Done,
    Length(u64),
    Chunked(Chunked),
    Eof,
}

/// Appends `data` as one chunk.
fn chunk_frame(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// A local answer (an error) encoded as hyper's server encodes it.
fn local_answer(resp: http::Response<ProxyBody>, is_head: bool, close: bool, out: &mut Vec<u8>) {
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in resp.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let body = resp.body().full_bytes().unwrap_or_default();
    let has_len = !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED;
    if has_len && !(is_head && body.is_empty()) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    push_date(out);
    out.extend_from_slice(b"\r\n");
    if !is_head && has_len {
        out.extend_from_slice(body);
    }
}

/// `date: <now>\r\n`, formatted once a second per thread (hyper's server adds it the same way).
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_empty() {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(d.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

fn reserve(buf: &mut Vec<u8>) {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(buf.capacity().max(FIRST_READ));
    }
}

/// The client's IP as text, in `space`.
fn format_ip(peer: std::net::SocketAddr, space: &mut [u8; 48]) -> &[u8] {
    use std::io::Write;
    let mut cursor = io::Cursor::new(&mut space[..]);
    let _ = write!(cursor, "{}", peer.ip());
    let n = usize::try_from(cursor.position()).unwrap_or(0);
    &space[..n]
}

/// The edge limits (`proxy.max_header_bytes`, `proxy.max_headers`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// A request head the fast path takes.
#[derive(Debug)]
pub(crate) struct ReqHead {
    /// Bytes of the head in the client's buffer.
    pub head_len: usize,
    /// `Content-Length` (0 without one); at most [`MAX_BODY`].
    pub body_len: usize,
    /// GET, HEAD or OPTIONS: safe to send twice when bodiless (the hyper path's rule).
    pub idempotent: bool,
    pub is_head: bool,
    /// The client asked to close after this answer.
    pub close: bool,
    /// The method and the path, as ranges of the client's buffer.
    method: (usize, usize),
    path: (usize, usize),
    /// The head for the site, request line included (`line` bytes long).
    wire: Vec<u8>,
    line: usize,
}

impl ReqHead {
    /// The bytes for the site: the rewritten head, then the body.
    fn wire(&self, raw: &[u8]) -> Vec<u8> {
        let mut w = Vec::with_capacity(self.wire.len() + self.body_len);
        w.extend_from_slice(&self.wire);
        w.extend_from_slice(&raw[self.head_len..self.head_len + self.body_len]);
        w
    }

    /// The same for a site with another path prefix.
    fn wire_for(&self, raw: &[u8], base: &str) -> Vec<u8> {
        let mut w = Vec::with_capacity(self.wire.len() + base.len() + self.body_len);
        request_line(
            &mut w,
            &raw[self.method.0..self.method.1],
            base,
            &raw[self.path.0..self.path.1],
        );
        w.extend_from_slice(&self.wire[self.line..]);
        w.extend_from_slice(&raw[self.head_len..self.head_len + self.body_len]);
        w
    }
}

fn request_line(w: &mut Vec<u8>, method: &[u8], base: &str, path: &[u8]) {
    w.extend_from_slice(method);
    w.push(b' ');
    w.extend_from_slice(base.as_bytes());
    w.extend_from_slice(path);
    w.extend_from_slice(b" HTTP/1.1\r\n");
}

/// What [`parse_request`] found.
#[derive(Debug)]
pub(crate) enum ReqParse {
    /// The head is not complete yet (and within the size limit).
    Partial,
    Done(ReqHead),
    /// Not for the fast path: the hyper path takes it (and refuses it, if it is bad).
    Fallback,
}

fn eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// A path byte the fast path forwards as is (RFC 3986 `pchar`, `/`, `?`); anything else goes to
/// the hyper path, whose URI parser decides.
fn path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// `HeaderValue::to_str` would accept it (visible ASCII and tabs).
fn visible(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (32..127).contains(&b))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// hyper's `Content-Length` rule: digits only.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Parses a request head at the start of `buf` and writes the head the site gets (path under
/// `base`); `ip` is the client's address for `X-Forwarded-For`.
pub(crate) fn parse_request(buf: &[u8], limits: Limits, ip: &[u8], base: &str) -> ReqParse {
    let mut stack = [httparse::EMPTY_HEADER; 100];
    let mut heap;
    let slots: &mut [httparse::Header<'_>] = if limits.max_headers <= stack.len() {
        &mut stack[..limits.max_headers]
    } else {
        heap = vec![httparse::EMPTY_HEADER; limits.max_headers];
        &mut heap
    };
    let mut req = httparse::Request::new(slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < limits.max_header_bytes => {
            return ReqParse::Partial
        }
        // Too large, too many headers, malformed: hyper answers it (431 or 400).
        _ => return ReqParse::Fallback,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return ReqParse::Fallback;
    };
    if head_len > limits.max_header_bytes
        || method == "CONNECT"
        || !path.starts_with('/')
        || path.len() >= usize::from(u16::MAX) - 1
        || !path.bytes().all(path_byte)
        || crate::detect::is_detect_path(path.split('?').next().unwrap_or(path))
    {
        return ReqParse::Fallback;
    }
    let offset = |s: &str| {
        let at = s.as_ptr() as usize - buf.as_ptr() as usize;
        (at, at + s.len())
    };
    let mut wire = Vec::with_capacity(head_len + base.len() + 96 + ip.len());
    request_line(&mut wire, method.as_bytes(), base, path.as_bytes());
    let line = wire.len();
    let (mut cl, mut host, mut xff, mut close) = (None, None, None, false);
    for h in req.headers.iter() {
        let (name, value) = (h.name, h.value);
        let keep = match name.len() {
            4 if eq(name, "host") => {
                if host.replace(value).is_some() {
                    return ReqParse::Fallback;
                }
                true
            }
            14 if eq(name, "content-length") => {
                match (cl, content_length(value)) {
                    (None, Some(n)) => cl = Some(n),
                    // Repeated or invalid: hyper decides (400, or one length when equal).
                    _ => return ReqParse::Fallback,
                }
                true
            }
            10 if eq(name, "connection") => {
                for token in value.split(|&b| b == b',').map(trim) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        // It names headers to remove, or asks for an upgrade.
                        return ReqParse::Fallback;
                    }
                }
                false
            }
            15 if eq(name, "x-forwarded-for") => {
                if xff.replace(value).is_some() {
                    return ReqParse::Fallback;
                }
                false
            }
            17 if eq(name, "transfer-encoding") => return ReqParse::Fallback,
            7 if eq(name, "upgrade") => return ReqParse::Fallback,
            6 if eq(name, "expect") => return ReqParse::Fallback,
            // Set below, or describing the hop (`Proxy-*` included).
            _ if eq(name, "x-forwarded-proto")
                || eq(name, "x-forwarded-host")
                || crate::forward::is_hop_by_hop(name) =>
            {
                false
            }
            _ => true,
        };
        if keep {
            wire.extend_from_slice(name.as_bytes());
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(value);
            wire.extend_from_slice(b"\r\n");
        }
    }
    let Some(host) = host else {
        return ReqParse::Fallback;
    };
    let body_len = match cl.map(usize::try_from) {
        None => 0,
        Some(Ok(n)) if n <= MAX_BODY => n,
        Some(_) => return ReqParse::Fallback,
    };
    wire.extend_from_slice(b"x-forwarded-host: ");
    wire.extend_from_slice(host);
    wire.extend_from_slice(b"\r\nx-forwarded-proto: http\r\nx-forwarded-for: ");
    if let Some(prev) = xff.filter(|v| visible(v) && !trim(v).is_empty()) {
        wire.extend_from_slice(prev);
        wire.extend_from_slice(b", ");
    }
    wire.extend_from_slice(ip);
    wire.extend_from_slice(b"\r\n\r\n");
    let idempotent = matches!(method, "GET" | "HEAD" | "OPTIONS");
    ReqParse::Done(ReqHead {
        head_len,
        body_len,
        idempotent,
        is_head: method == "HEAD",
        close,
        method: offset(method),
        path: offset(path),
        wire,
        line,
    })
}

/// How an answer's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 204, 304).
    None,
    Length(u64),
    /// Relayed verbatim, scanned for its end.
    Chunked,
    /// Until the site closes; sent to the client chunked.
    Eof,
}

/// An answer's head as the client gets it.
#[derive(Debug)]
pub(crate) struct RespHead {
    /// Bytes of the site's head in the read buffer.
    pub head_len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The site connection may carry another request after this answer.
    pub reusable: bool,
    /// The head for the client.
    pub out: Vec<u8>,
    /// A chunked body: the scan of the body bytes read with the head (by [`parse_response`],
    /// which refuses a malformed one, so before anything reached the client) and how many of
    /// those bytes belong to this answer.
    pub chunks: Option<(Chunked, usize)>,
}

/// What [`parse_response`] found.
#[derive(Debug)]
pub(crate) enum RespParse {
    Partial,
    /// A 1xx answer of this many bytes, to skip (as hyper's client does).
    Informational(usize),
    Done(RespHead),
    Invalid(&'static str),
}

/// Parses a site's answer head and writes the client's: hop-by-hop headers removed (and those
/// its `Connection` names), `Transfer-Encoding: chunked` for chunked and read-to-end bodies,
/// `Date` when the site sent none, `Connection: close` when the client connection closes.
pub(crate) fn parse_response(buf: &[u8], req_is_head: bool, close: bool) -> RespParse {
    let mut slots = [httparse::EMPTY_HEADER; MAX_RESP_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return RespParse::Partial,
        Err(_) => return RespParse::Invalid("malformed answer head"),
    };
    let (Some(version), Some(code)) = (resp.version, resp.code) else {
        return RespParse::Invalid("malformed answer head");
    };
    if (100..200).contains(&code) {
        return match code {
            101 => RespParse::Invalid("unexpected 101 Switching Protocols"),
            _ => RespParse::Informational(head_len),
        };
    }
    // Whether the site's `Connection` names headers (dropped below), and whether it closes.
    let mut reusable = version == 1;
    let mut names_headers = false;
    let (mut cl, mut te_lines, mut te_line): (_, usize, &[u8]) = (None, 0, &[]);
    for h in resp.headers.iter() {
        if eq(h.name, "connection") {
            for token in h.value.split(|&b| b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    names_headers = true;
                }
            }
        } else if eq(h.name, "transfer-encoding") {
            te_lines += 1;
            te_line = trim(h.value);
        } else if eq(h.name, "content-length") {
            match (cl, content_length(h.value)) {
                (None, Some(n)) => cl = Some(n),
                (Some(a), Some(b)) if a == b => {}
                _ => return RespParse::Invalid("invalid Content-Length"),
            }
        }
    }
    // Several `Transfer-Encoding` lines are one list, in their order (RFC 9110 §5.3).
    let joined: Vec<u8>;
    let te_value = match te_lines {
        0 => None,
        1 => Some(te_line),
        _ => {
            let lines = resp
                .headers
                .iter()
                .filter(|h| eq(h.name, "transfer-encoding"));
            joined = lines
                .map(|h| trim(h.value))
                .collect::<Vec<_>>()
                .join(&b", "[..]);
            Some(&joined[..])
        }
    };
    let te = te_value.is_some();
    // RFC 9112 §6.1: `chunked` frames the body only as the last coding, and is applied once;
    // with any other last coding the body runs to the close. The site's codings before a
    // final `chunked` (e.g. `gzip`) are kept for the client.
    let (mut chunked, mut codings): (bool, &[u8]) = (false, &[]);
    if let Some(v) = te_value {
        let (rest, last) = match v.iter().rposition(|&b| b == b',') {
            Some(i) => (trim(&v[..i]), trim(&v[i + 1..])),
            None => (&[][..], v),
        };
        chunked = last.eq_ignore_ascii_case(b"chunked");
        codings = if chunked { rest } else { v };
        if !codings
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b" ,-_.".contains(&b))
        {
            return RespParse::Invalid("invalid Transfer-Encoding");
        }
        if rest
            .split(|&b| b == b',')
            .any(|c| trim(c).eq_ignore_ascii_case(b"chunked"))
        {
            return RespParse::Invalid("chunked before the last transfer coding");
        }
    }
    let no_body = req_is_head || code == 204 || code == 304;
    let framing = match (no_body, chunked, te, cl) {
        (true, ..) => Framing::None,
        (false, true, ..) => Framing::Chunked,
        // Another last coding: to the close (a length beside it is not the framing).
        (false, false, true, _) => Framing::Eof,
        (false, false, false, Some(n)) => Framing::Length(n),
        (false, false, false, None) => Framing::Eof,
    };
    // A malformed chunked body among the bytes read with the head is an invalid answer like
    // a malformed head: refused before anything reached the client.
    let chunks = match framing {
        Framing::Chunked => {
            let mut scan = Chunked::default();
            let Ok(used) = scan.feed(&buf[head_len..]) else {
                return RespParse::Invalid("malformed chunked body");
            };
            Some((scan, used))
        }
        _ => None,
    };
    let mut out = Vec::with_capacity(head_len + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut date = false;
    for h in resp.headers.iter() {
        let name = h.name;
        let drop = crate::forward::is_hop_by_hop(name)
            || (te && eq(name, "content-length"))
            // A length the site names is still the body's framing for the client (hyper
            // writes it back from the body's size).
            || (names_headers
                && !eq(name, "content-length")
                && named_by_connection(resp.headers, name));
        if drop {
            continue;
        }
        date |= eq(name, "date");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if matches!(framing, Framing::Chunked | Framing::Eof) {
        out.extend_from_slice(b"transfer-encoding: ");
        if !codings.is_empty() {
            out.extend_from_slice(codings);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(b"chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !date {
        push_date(&mut out);
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::Eof {
        reusable = false;
    }
    RespParse::Done(RespHead {
        head_len,
        status: code,
        framing,
        reusable,
        out,
        chunks,
    })
}

/// Whether a `Connection` header of `headers` names the header `name` (any number of tokens,
/// on any number of lines).
fn named_by_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| eq(h.name, "connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| trim(t).eq_ignore_ascii_case(name.as_bytes()))
}

/// Finds the end of a chunked body (RFC 9112 §7.1) as its bytes pass, strictly: hex sizes,
/// CRLF line ends, extensions and trailers skipped.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    step: Step,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// In a chunk-size line: the size so far and its digits.
    #[default]
    SizeStart,
    Size(u64, u8),
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

impl Chunked {
    /// Consumes bytes of `data` up to the end of the body; how many belong to the body.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<usize, ()> {
        let mut i = 0;
        while i < data.len() && self.step != Step::Done {
            let b = data[i];
            self.step = match self.step {
                Step::SizeStart | Step::Size(..) => {
                    let (n, digits) = match self.step {
                        Step::Size(n, d) => (n, d),
                        _ => (0, 0),
                    };
                    match (b as char).to_digit(16) {
                        Some(d) if digits < 15 => Step::Size(n * 16 + u64::from(d), digits + 1),
                        Some(_) => return Err(()),
                        None if digits == 0 => return Err(()),
                        None => match b {
                            b'\r' => Step::SizeLf(n),
                            b';' | b' ' | b'\t' => Step::Ext(n),
                            _ => return Err(()),
                        },
                    }
                }
                Step::Ext(n) => match b {
                    b'\r' => Step::SizeLf(n),
                    b'\n' => return Err(()),
                    _ => Step::Ext(n),
                },
                Step::SizeLf(n) => match (b, n) {
                    (b'\n', 0) => Step::TrailerStart,
                    (b'\n', n) => Step::Data(n),
                    _ => return Err(()),
                },
                Step::Data(n) => {
                    let take = (data.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    self.step = if left == 0 {
                        Step::DataCr
                    } else {
                        Step::Data(left)
                    };
                    continue;
                }
                Step::DataCr if b == b'\r' => Step::DataLf,
                Step::DataLf if b == b'\n' => Step::SizeStart,
                Step::TrailerStart => match b {
                    b'\r' => Step::FinalLf,
                    b'\n' => return Err(()),
                    _ => Step::Trailer,
                },
                Step::Trailer => match b {
                    b'\r' => Step::TrailerLf,
                    b'\n' => return Err(()),
                    _ => Step::Trailer,
                },
                Step::TrailerLf if b == b'\n' => Step::TrailerStart,
                Step::FinalLf if b == b'\n' => Step::Done,
                _ => return Err(()),
            };
            i += 1;
        }
        Ok(i)
    }

    /// The body's last byte has passed.
    pub(crate) fn done(&self) -> bool {
        self.step == Step::Done
    }
}

/// What an exchange on one connection ran into.
enum Failure {
    /// The request could not be written: a kept connection the site had closed.
    Unsent(io::Error),
    /// The site closed (or reset) the connection before a byte of answer.
    NoAnswer(BoxError),
    /// Anything else after the request was sent.
    Failed(BoxError),
}

/// One worker's plain TCP connections to one `http://` site, for the fast path.
#[derive(Debug)]
pub(crate) struct RawPool {
    /// `host:port`, as connected to.
    authority: String,
    connect_timeout: Duration,
    /// A connection unused for this long is closed.
    idle_timeout: Duration,
    max_idle: usize,
    /// Kept connections, the most recently used last. Only the worker's own thread takes this
    /// lock, never across an await.
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl RawPool {
    /// The pool for the site at `authority` (`host[:port]`, port 80 when absent).
    pub(crate) fn new(
        authority: &http::uri::Authority,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> RawPool {
        RawPool {
            authority: crate::pool::host_port(authority),
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The most recently used kept connection that is still open and not expired.
    fn checkout(&self) -> Option<TcpStream> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((tcp, since)) = idle.pop() {
            if now.duration_since(since) < self.idle_timeout && open(&tcp) {
                return Some(tcp);
            }
        }
        None
    }

    fn checkin(&self, tcp: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push((tcp, Instant::now()));
        }
    }

    /// Closes connections idle past the idle timeout, or closed by the site (`all`: every one).
    pub(crate) fn sweep(&self, all: bool) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|(tcp, since)| {
            !all && now.duration_since(*since) < self.idle_timeout && open(tcp)
        });
    }

    /// Sends `wire` and reads the answer's head into `rbuf`: on a kept connection, or a new
    /// one. A kept connection the site closed meanwhile costs nothing: a request it could not
    /// take, or an idempotent one it closed on without answering, goes once on a new one.
    async fn exchange(
        &self,
        wire: &[u8],
        rbuf: &mut Vec<u8>,
        idempotent: bool,
        is_head: bool,
        close: bool,
    ) -> Result<(TcpStream, RespHead), PoolError> {
        if let Some(mut tcp) = self.checkout() {
            match send(&mut tcp, wire, rbuf, is_head, close).await {
                Ok(head) => return Ok((tcp, head)),
                Err(Failure::Unsent(e)) => {
                    tracing::debug!(error = %e, "kept site connection was closed: new one");
                }
                Err(Failure::NoAnswer(e)) if idempotent => {
                    tracing::debug!(error = %e, "kept site connection closed without answer: new one");
                }
                Err(Failure::NoAnswer(e) | Failure::Failed(e)) => {
                    return Err(PoolError::Request(e))
                }
            }
        }
        let connect = crate::pool::connect_site(&self.authority, self.connect_timeout);
        let mut tcp = Box::pin(connect).await.map_err(PoolError::Connect)?;
        match send(&mut tcp, wire, rbuf, is_head, close).await {
            Ok(head) => Ok((tcp, head)),
            Err(Failure::Unsent(e)) => Err(PoolError::Request(Box::new(e))),
            Err(Failure::NoAnswer(e) | Failure::Failed(e)) => Err(PoolError::Request(e)),
        }
    }
}

/// A kept connection is still open: no end of stream (or stray bytes) seen on it. Asks the
/// socket only when the reactor has seen it readable, so a live one costs no system call.
fn open(tcp: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match tcp.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

/// Writes the request and reads the answer's head.
async fn send(
    tcp: &mut TcpStream,
    wire: &[u8],
    rbuf: &mut Vec<u8>,
    is_head: bool,
    close: bool,
) -> Result<RespHead, Failure> {
    tcp.write_all(wire).await.map_err(Failure::Unsent)?;
    rbuf.clear();
    if rbuf.capacity() < FIRST_READ {
        rbuf.reserve(FIRST_READ);
    }
    loop {
        if rbuf.len() >= MAX_RESP_HEAD {
            return Err(Failure::Failed("answer head too large".into()));
        }
        reserve(rbuf);
        match tcp.read_buf(rbuf).await {
            Ok(0) if rbuf.is_empty() => {
                return Err(Failure::NoAnswer("closed before answering".into()))
            }
            Ok(0) => return Err(Failure::Failed("closed in the answer head".into())),
            Ok(_) => {}
            Err(e) if rbuf.is_empty() => return Err(Failure::NoAnswer(Box::new(e))),
            Err(e) => return Err(Failure::Failed(Box::new(e))),
        }
        loop {
            match parse_response(rbuf, is_head, close) {
                RespParse::Partial => break,
                RespParse::Informational(n) => {
                    rbuf.drain(..n);
                    if rbuf.is_empty() {
                        break;
                    }
                }
                RespParse::Done(head) => return Ok(head),
                RespParse::Invalid(why) => return Err(Failure::Failed(why.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_header_bytes: 1024,
        max_headers: 10,
    };

    fn parse(req: &str) -> ReqParse {
        parse_request(req.as_bytes(), LIMITS, b"10.1.2.3", "")
    }

    fn done(req: &str) -> (ReqHead, String) {
        match parse(req) {
            ReqParse::Done(h) => {
                let wire = String::from_utf8(h.wire(req.as_bytes())).expect("utf-8");
                (h, wire)
            }
            other => panic!("{req:?}: {other:?}"),
        }
    }

    fn falls_back(req: &str) {
        assert!(
            matches!(parse(req), ReqParse::Fallback),
            "{req:?} must go to hyper"
        );
    }

    #[test]
    fn a_request_is_rewritten_as_the_hyper_path_does() {
        let (h, wire) = done(
            "GET /a?b=1 HTTP/1.1\r\nHost: meet.example\r\nConnection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: x\r\n\
             X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\
             Accept: */*\r\n\r\n",
        );
        assert!(h.idempotent && !h.close && h.body_len == 0);
        assert_eq!(
            wire,
            "GET /a?b=1 HTTP/1.1\r\nHost: meet.example\r\nAccept: */*\r\n\
             x-forwarded-host: meet.example\r\nx-forwarded-proto: http\r\n\
             x-forwarded-for: 192.0.2.1, 10.1.2.3\r\n\r\n"
        );
        let (h, wire) = done(
            "POST /p HTTP/1.1\r\nhost: h\r\nconnection: close\r\ncontent-length: 3\r\n\r\nabc",
        );
        assert!(!h.idempotent && h.close && h.body_len == 3);
        assert!(
            wire.ends_with("x-forwarded-for: 10.1.2.3\r\n\r\nabc"),
            "{wire}"
        );
        let r = "GET /x HTTP/1.1\r\nHost: h\r\n\r\n";
        let ReqParse::Done(h) = parse(r) else {
            panic!()
        };
        let again = String::from_utf8(h.wire_for(r.as_bytes(), "/base")).expect("utf-8");
        assert!(
            again.starts_with("GET /base/x HTTP/1.1\r\nHost: h\r\n"),
            "{again}"
        );
    }

    #[test]
    fn what_the_fast_path_does_not_take_goes_to_hyper() {
        for req in [
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: x-secret\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: a\r\nX-Forwarded-For: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : h\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  folded\r\n\r\n",
            "GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /a\"b HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /detectbackup HTTP/1.1\r\nHost: h\r\n\r\n",
            "CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            falls_back(req);
        }
        // Too many headers, too large: hyper answers 431.
        let many: String = (0..11).map(|i| format!("X-{i}: 1\r\n")).collect();
        falls_back(&format!("GET / HTTP/1.1\r\nHost: h\r\n{many}\r\n"));
        let big = "a".repeat(1100);
        falls_back(&format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {big}"));
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: h\r\n"),
            ReqParse::Partial
        ));
    }

    fn resp(head: &str, is_head: bool) -> RespHead {
        match parse_response(head.as_bytes(), is_head, false) {
            RespParse::Done(h) => h,
            other => panic!("{head:?}: {other:?}"),
        }
    }

    #[test]
    fn an_answer_head_is_rewritten_and_framed() {
        let h = resp(
            "HTTP/1.1 200 OK\r\nDate: x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\nContent-Length: 5\r\n\r\nhello",
            false,
        );
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.reusable);
        let out = String::from_utf8(h.out).expect("utf-8");
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 5\r\n\r\n"
        );
        let h = resp(
            "HTTP/1.1 201 Made\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let out = String::from_utf8(h.out).expect("utf-8");
        assert!(
            out.starts_with("HTTP/1.1 201 Made\r\ntransfer-encoding: chunked\r\ndate: "),
            "{out}"
        );
        assert!(!out.contains("Content-Length"), "{out}");
        let h = resp("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false);
        assert_eq!(h.framing, Framing::Eof);
        assert!(!h.reusable);
        let h = resp("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(h.framing, Framing::None);
        let h = resp("HTTP/1.0 304 Not Modified\r\n\r\n", false);
        assert_eq!(h.framing, Framing::None);
        assert!(!h.reusable, "HTTP/1.0 site connection is not kept");
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
                false,
                false
            ),
            RespParse::Informational(25)
        ));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\x01, chunked\r\n\r\n",
            // Chunked applied twice, or not last: no framing a client could rely on.
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            // A malformed chunk size read with the head: refused before the head goes out.
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
        ] {
            assert!(
                matches!(
                    parse_response(bad.as_bytes(), false, false),
                    RespParse::Invalid(_)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_sites_other_transfer_codings_reach_the_client() {
        // `gzip, chunked`: chunked frames the body, gzip stays for the client to decode.
        let h = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let out = String::from_utf8(h.out).expect("utf-8");
        assert!(
            out.contains("transfer-encoding: gzip, chunked\r\n"),
            "{out}"
        );
        // `gzip` last: the body runs to the close (a length beside it is not its framing),
        // relayed to the client chunked after the gzip.
        let h = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Eof);
        assert!(!h.reusable);
        let out = String::from_utf8(h.out).expect("utf-8");
        assert!(
            out.contains("transfer-encoding: gzip, chunked\r\n"),
            "{out}"
        );
        assert!(!out.contains("Content-Length"), "{out}");
    }

    #[test]
    fn several_transfer_encoding_lines_are_one_list() {
        let h = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let out = String::from_utf8(h.out).expect("utf-8");
        assert!(
            out.contains("transfer-encoding: gzip, chunked\r\n"),
            "{out}"
        );
        assert_eq!(out.matches("transfer-encoding").count(), 1, "{out}");
    }

    #[test]
    fn every_header_the_sites_connection_names_is_dropped() {
        // More names than any fixed table, on two lines.
        let names: Vec<String> = (0..20).map(|i| format!("X-Hop-{i}")).collect();
        let mut head = format!(
            "HTTP/1.1 200 OK\r\nConnection: {}\r\nConnection: X-Last\r\n",
            names.join(", ")
        );
        for n in names.iter().chain([&"X-Last".to_owned()]) {
            head.push_str(&format!("{n}: 1\r\n"));
        }
        head.push_str("X-Kept: 1\r\nContent-Length: 0\r\n\r\n");
        let h = resp(&head, false);
        assert!(h.reusable);
        let out = String::from_utf8(h.out).expect("utf-8");
        assert!(!out.contains("X-Hop-"), "{out}");
        assert!(!out.contains("X-Last"), "{out}");
        assert!(out.contains("X-Kept: 1\r\n"), "{out}");
    }

    #[test]
    fn a_length_the_site_names_in_connection_still_frames_the_answer() {
        // Dropping it would leave the client an answer with neither length nor chunking (read
        // to the end) on a connection the proxy keeps: the next answer would join this body.
        let h = resp(
            "HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
            false,
        );
        assert_eq!(h.framing, Framing::Length(5));
        let out = String::from_utf8(h.out).expect("utf-8");
        assert!(out.contains("Content-Length: 5\r\n"), "{out}");
    }

    #[test]
    fn the_end_of_a_chunked_body_is_found_across_reads() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for split in 0..=body.len() - 4 {
            let mut c = Chunked::default();
            let a = c.feed(&body[..split]).expect("valid");
            assert_eq!(a, split);
            let b = c.feed(&body[split..]).expect("valid");
            assert!(c.done(), "split at {split}");
            assert_eq!(split + b, body.len() - 4);
        }
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"0\r\n\n",
            b"ffffffffffffffffff\r\n",
        ] {
            assert!(
                Chunked::default().feed(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
