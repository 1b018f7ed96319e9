//! Body types of the data path: what clients receive and what sites receive. Both stream; no
//! body is ever buffered whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;
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
        cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
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

    /// A site's body streamed through, aborted when `drain` is cancelled.
    pub fn upstream(body: Incoming, drain: Option<CancellationToken>) -> ProxyBody {
        // A body that is already complete needs no drain watch (and no allocation for it).
        let cut = drain
            .filter(|_| !body.is_end_stream())
            .map(|t| Box::pin(t.cancelled_owned()));
        ProxyBody {
            kind: Kind::Upstream { body, cut },
            log: None,
        }
    }

    /// Attaches the request log line, written when this body is dropped.
    pub fn with_access_log(mut self, log: Box<AccessLog>) -> ProxyBody {
        self.log = Some(log);
        self
    }
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
            Kind::Upstream { body, cut } => {
                if let Some(c) = cut {
                    if c.as_mut().poll(cx).is_ready() {
                        *cut = None;
                        return Poll::Ready(Some(Err(
                            "the site was drained: traffic moved and the drain timeout passed"
                                .into(),
                        )));
                    }
                }
                Pin::new(body).poll_frame(cx).map_err(BoxError::from)
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
