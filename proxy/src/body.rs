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
        }
    }

    /// No body.
    pub fn empty() -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(None),
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
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
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
        }
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
