//! Body types of the data path: what clients receive and what sites receive. Both stream; no
//! body is ever buffered whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::error::BoxError;

/// A body sent to a client: a short local answer, or a site's answer streamed through.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    /// The request log line, written when the body is dropped (sent, or the client left);
    /// `None` unless `proxy.request_log` is on.
    log: Option<Box<AccessLog>>,
}

/// One request log line (`proxy.request_log`), emitted as a `gsb::access` tracing event when
/// the response body is done, so `bytes` and `duration_ms` cover the whole transfer.
#[derive(Debug)]
pub struct AccessLog {
    /// The client's address.
    pub client: std::net::SocketAddr,
    /// Request method.
    pub method: http::Method,
    /// Path and query as the client sent them.
    pub path: String,
    /// HTTP version of the client's request.
    pub version: http::Version,
    /// Status sent to the client.
    pub status: u16,
    /// The site that answered (the active one for local answers).
    pub site: crate::route::Site,
    /// The request was retried on the other site.
    pub retried: bool,
    /// When the request arrived.
    pub started: tokio::time::Instant,
    /// Body bytes sent to the client.
    pub bytes: u64,
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        // Fields for machines (`--log-format json`); the message is a common-log-like line for
        // people reading the human format.
        tracing::info!(
            target: "gsb::access",
            client = %self.client.ip(),
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes = self.bytes,
            duration_ms,
            site = self.site.as_str(),
            retried = self.retried,
            "{} \"{} {} {:?}\" {} {} {:.1}ms site={} retried={}",
            self.client.ip(),
            self.method,
            self.path,
            self.version,
            self.status,
            self.bytes,
            duration_ms,
            self.site.as_str(),
            self.retried,
        );
    }
}

#[derive(Debug)]
enum Kind {
    /// A local answer (detectbackup, errors, redirects); `None` once sent.
    Full(Option<Bytes>),
    /// A site's answer. `cut` fires when the site was drained away from and the drain timeout
    /// passed: the response is then aborted (h1: connection closed, h2: stream reset).
    Upstream {
        body: Incoming,
        /// The drain token, until the body first has to wait (then it moves into `cut`).
        drain: Option<CancellationToken>,
        cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        /// The longest the site may send nothing mid-body (`proxy.upstream_timeout`).
        pause: Duration,
        /// Armed when the body first waits for the site; re-armed at the next wait after
        /// bytes came.
        silence: Option<Pin<Box<Sleep>>>,
        /// A frame came since `silence` was armed.
        moved: bool,
    },
}

impl ProxyBody {
    /// A complete local body.
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        let bytes = bytes.into();
        ProxyBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            log: None,
        }
    }

    /// No body.
    pub fn empty() -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(None),
            log: None,
        }
    }

    /// A site's body streamed through, aborted when `drain` is cancelled or when the site
    /// sends nothing for `pause` (as HAProxy's `timeout server` and nginx's
    /// `proxy_read_timeout` cut a stalled answer).
    pub fn upstream(
        body: Incoming,
        drain: Option<&CancellationToken>,
        pause: Duration,
    ) -> ProxyBody {
        // A body that is already complete needs no drain watch (no token clone, no allocation).
        let drain = drain.filter(|_| !body.is_end_stream()).cloned();
        ProxyBody {
            kind: Kind::Upstream {
                body,
                drain,
                cut: None,
                pause,
                silence: None,
                moved: false,
            },
            log: None,
        }
    }

    /// The bytes of a complete local answer (`None` for a site's answer streamed through).
    pub(crate) fn full_bytes(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Full(bytes) => Some(bytes.as_deref().unwrap_or_default()),
            Kind::Upstream { .. } => None,
        }
    }

    /// Attaches the request log line, written when this body is dropped.
    pub fn with_access_log(mut self, log: Box<AccessLog>) -> ProxyBody {
        self.log = Some(log);
        self
    }
}

/// The error that aborts a body cut by the drain timeout.
fn drained() -> BoxError {
    "the site was drained: traffic moved and the drain timeout passed".into()
}

/// The error that aborts a body whose site went silent.
fn silent(pause: Duration) -> BoxError {
    format!("the site sent nothing for {pause:?} mid-answer (proxy.upstream_timeout)").into()
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream {
                body,
                drain,
                cut,
                pause,
                silence,
                moved,
            } => {
                let cut_now = match cut {
                    Some(c) => c.as_mut().poll(cx).is_ready(),
                    None => drain.as_ref().is_some_and(|t| t.is_cancelled()),
                };
                if cut_now {
                    (*cut, *drain) = (None, None);
                    return Poll::Ready(Some(Err(drained())));
                }
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => {
                        // Only a body that waits for the site needs a wake-up when the drain
                        // cuts it: a small answer that came with its head never allocates
                        // the watch (saves a box and the waiter-list locking per request).
                        if let Some(t) = drain.take() {
                            let mut c = Box::pin(t.cancelled_owned());
                            if c.as_mut().poll(cx).is_ready() {
                                return Poll::Ready(Some(Err(drained())));
                            }
                            *cut = Some(c);
                        }
                        // Likewise the silence timer: armed at the first wait, moved on at
                        // a wait after bytes came (not at every frame).
                        let deadline = tokio::time::Instant::now() + *pause;
                        let timer = silence.get_or_insert_with(|| {
                            *moved = false;
                            Box::pin(tokio::time::sleep_until(deadline))
                        });
                        if std::mem::take(moved) {
                            timer.as_mut().reset(deadline);
                        }
                        if timer.as_mut().poll(cx).is_ready() {
                            *silence = None;
                            tracing::warn!(pause = ?*pause, "answer cut: the site sent nothing mid-body for proxy.upstream_timeout");
                            return Poll::Ready(Some(Err(silent(*pause))));
                        }
                        Poll::Pending
                    }
                    ready => {
                        *moved = true;
                        ready.map_err(BoxError::from)
                    }
                }
            }
        };
        if let (Some(log), Poll::Ready(Some(Ok(frame)))) = (&mut this.log, &polled) {
            if let Some(data) = frame.data_ref() {
                log.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

/// A body sent to a site.
#[derive(Debug)]
pub enum ReqBody {
    /// The client sent no body.
    Empty,
    /// The client's body, streamed.
    Stream(ReturnableBody),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Stream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Stream(b) => b.size_hint(),
        }
    }
}

/// A client's request body that comes back (through a oneshot) if it is dropped before a single
/// frame was read: when the connection to a site fails, the request can be retried elsewhere
/// with its body intact.
#[derive(Debug)]
pub struct ReturnableBody {
    inner: Option<Incoming>,
    polled: bool,
    back: Option<oneshot::Sender<Incoming>>,
}

impl ReturnableBody {
    /// Wraps `body`; the receiver gets it back if it is dropped unread.
    pub fn new(body: Incoming) -> (ReturnableBody, oneshot::Receiver<Incoming>) {
        let (tx, rx) = oneshot::channel();
        (
            ReturnableBody {
                inner: Some(body),
                polled: false,
                back: Some(tx),
            },
            rx,
        )
    }
}

impl Body for ReturnableBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        this.polled = true;
        match &mut this.inner {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(b) => b.is_end_stream(),
            None => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for ReturnableBody {
    fn drop(&mut self) {
        if !self.polled {
            if let (Some(body), Some(tx)) = (self.inner.take(), self.back.take()) {
                let _ = tx.send(body);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real hyper response body whose site sent `sent` of a 10-byte body and then stalls.
    async fn stalled_body(sent: &'static [u8]) -> (Incoming, tokio::io::DuplexStream) {
        let (client, mut site) = tokio::io::duplex(4096);
        let (mut send, conn) =
            hyper::client::conn::http1::handshake::<_, String>(TokioIo::new(client))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let resp = tokio::spawn(send.send_request(http::Request::new(String::new())));
        // Read the request head first: an answer before the request is an unexpected message.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut buf = [0u8; 256];
            let n = site.read(&mut buf).await.expect("request");
            assert!(n > 0, "request head incomplete");
            head.extend_from_slice(&buf[..n]);
        }
        site.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
            .await
            .expect("head");
        site.write_all(sent).await.expect("body start");
        let resp = resp.await.expect("task").expect("response");
        (resp.into_body(), site)
    }

    #[tokio::test]
    async fn a_body_waiting_for_its_site_is_cut_when_the_drain_fires() {
        let (body, _site) = stalled_body(b"hello").await;
        let drain = CancellationToken::new();
        let mut body = ProxyBody::upstream(body, Some(&drain), Duration::from_secs(60));
        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "hello");
        // The rest never comes: the cut must wake the waiting body.
        let cutter = drain.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            cutter.cancel();
        });
        let next = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("woken by the cut");
        assert!(matches!(next, Some(Err(_))), "cut with an error");
    }

    #[tokio::test]
    async fn a_drained_body_is_cut_even_with_data_ready() {
        let (body, _site) = stalled_body(b"hello").await;
        let drain = CancellationToken::new();
        drain.cancel();
        let mut body = ProxyBody::upstream(body, Some(&drain), Duration::from_secs(60));
        let next = body.frame().await;
        assert!(matches!(next, Some(Err(_))), "cut before any data");
    }

    #[tokio::test(start_paused = true)]
    async fn a_site_silent_mid_body_for_the_upstream_timeout_is_cut_and_not_before() {
        let (body, mut site) = stalled_body(b"he").await;
        let mut body = ProxyBody::upstream(body, None, Duration::from_secs(60));
        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "he");
        // Bytes every 50 s: each pause is under the timeout, the whole answer is not.
        for part in [&b"ll"[..], b"o"] {
            let wait = tokio::time::timeout(Duration::from_secs(50), body.frame()).await;
            assert!(wait.is_err(), "nothing came yet");
            site.write_all(part).await.expect("more");
            let frame = body.frame().await.expect("frame").expect("data");
            assert_eq!(frame.into_data().expect("data"), part);
        }
        let started = tokio::time::Instant::now();
        let next = tokio::time::timeout(Duration::from_secs(120), body.frame())
            .await
            .expect("cut, not left waiting");
        assert!(matches!(next, Some(Err(_))), "cut with an error");
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn a_body_that_is_not_drained_streams_whole() {
        let (body, mut site) = stalled_body(b"hello").await;
        let drain = CancellationToken::new();
        let body = ProxyBody::upstream(body, Some(&drain), Duration::from_secs(60));
        site.write_all(b"world").await.expect("rest");
        let all = body.collect().await.expect("body").to_bytes();
        assert_eq!(all, "helloworld");
        assert!(!drain.is_cancelled());
    }
}
