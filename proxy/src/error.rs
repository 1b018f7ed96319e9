//! Typed errors of the data path, and the ONE place they become client answers (502/503/504).
//!
//! Each request error says where it came from ([`ErrorSource`]) and whether another attempt on
//! the other site is safe ([`ProxyError::retry`]), as pingora-error does.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::route::Site;

/// A boxed error from a lower layer (hyper, hyper-util, the OS).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long clients are told to wait before trying again when no site answers.
pub const RETRY_AFTER_SECS: u64 = 5;

/// Where an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorSource {
    /// The site (connect, timeout, reset, bad answer).
    Upstream,
    /// The client (bad request, went away).
    Downstream,
    /// The proxy itself.
    Internal,
}

/// Whether an attempt that failed with this error may be repeated on the other site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryType {
    /// Nothing reached the site: always safe to try elsewhere.
    Always,
    /// The site may have seen the request: safe only for idempotent requests without a body.
    IfIdempotent,
    /// Never retry.
    Never,
}

/// One failed request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No connection to the site could be opened (refused, unreachable, connect timeout).
    #[error("cannot connect to the {site} site: {source}")]
    Connect {
        /// The site tried.
        site: Site,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The site did not send response headers in time.
    #[error("the {site} site did not answer within {timeout:?}")]
    Timeout {
        /// The site tried.
        site: Site,
        /// `proxy.upstream_timeout`.
        timeout: Duration,
    },
    /// The exchange with the site failed after the connection was made, before any response.
    #[error("the {site} site failed before answering: {source}")]
    Upstream {
        /// The site tried.
        site: Site,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Traffic moved away from this site and the drain timeout passed.
    #[error("the {site} site is drained: traffic moved and the drain timeout passed")]
    Drained {
        /// The old site.
        site: Site,
    },
    /// Traffic moved away from this site because it is down, while an idempotent request without
    /// a body was still waiting for its answer there: it is sent to the new active site at once.
    #[error("the {site} site went down while this request waited for its answer")]
    Moved {
        /// The site that went down.
        site: Site,
    },
    /// Both sites were tried (or none is usable) and none answered.
    #[error("no site can serve the request ({0})")]
    NoSite(Box<ProxyError>),
    /// The client's request cannot be forwarded.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request head has more headers than `proxy.max_headers` (HTTP/1 heads larger than
    /// `proxy.max_header_bytes` are answered 431 by hyper before they reach the proxy).
    #[error("request headers too large (proxy.max_headers)")]
    HeadersTooLarge,
    /// A bug or resource problem in the proxy.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// Where the error came from.
    pub fn source_kind(&self) -> ErrorSource {
        match self {
            ProxyError::Connect { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Drained { .. }
            | ProxyError::Moved { .. }
            | ProxyError::NoSite(_) => ErrorSource::Upstream,
            ProxyError::BadRequest(_) | ProxyError::HeadersTooLarge => ErrorSource::Downstream,
            ProxyError::Internal(_) => ErrorSource::Internal,
        }
    }

    /// Whether another attempt on the other site is safe.
    pub fn retry(&self) -> RetryType {
        match self {
            ProxyError::Connect { .. } => RetryType::Always,
            ProxyError::Timeout { .. } | ProxyError::Upstream { .. } | ProxyError::Moved { .. } => {
                RetryType::IfIdempotent
            }
            _ => RetryType::Never,
        }
    }

    /// The `kind` label of `gsb_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Connect { .. } => "connect",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Upstream { .. } => "protocol",
            ProxyError::Drained { .. } => "drained",
            ProxyError::Moved { .. } => "moved",
            ProxyError::NoSite(_) => "no_site",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::HeadersTooLarge => "headers_too_large",
            ProxyError::Internal(_) => "internal",
        }
    }

    /// The site the error is about, if any.
    pub fn site(&self) -> Option<Site> {
        match self {
            ProxyError::Connect { site, .. }
            | ProxyError::Timeout { site, .. }
            | ProxyError::Upstream { site, .. }
            | ProxyError::Drained { site }
            | ProxyError::Moved { site } => Some(*site),
            ProxyError::NoSite(inner) => inner.site(),
            _ => None,
        }
    }

    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Drained { .. } | ProxyError::Moved { .. } | ProxyError::NoSite(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The answer sent to the client: a short plain-text body saying what failed, and
    /// `Retry-After` on 503 (nothing can serve now, try again shortly).
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let body = format!(
            "{} {}: {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self
        );
        let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}

/// Why the proxy could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address in the config.
        addr: std::net::SocketAddr,
        /// Which listener (`proxy.listen`, `proxy.tls.listen`, `admin.listen`).
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// `admin.token_file` could not be read or is empty.
    #[error("admin.token_file {path}: {message}")]
    TokenFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The metrics could not be registered.
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The control task could not start (e.g. unreadable state file).
    #[error("starting the control task: {0}")]
    Control(#[source] BoxError),
    /// The upstream client could not be built.
    #[error("upstream client: {0}")]
    Client(String),
    /// A worker thread or its runtime could not be started.
    #[error("starting a proxy worker: {0}")]
    Worker(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_retry_safety() {
        let connect = ProxyError::Connect {
            site: Site::Primary,
            source: "refused".into(),
        };
        assert_eq!(connect.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(connect.retry(), RetryType::Always);
        assert_eq!(connect.kind(), "connect");
        let timeout = ProxyError::Timeout {
            site: Site::Backup,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(timeout.retry(), RetryType::IfIdempotent);
        let none = ProxyError::NoSite(Box::new(timeout));
        assert_eq!(none.retry(), RetryType::Never);
        assert_eq!(none.site(), Some(Site::Backup));
        let resp = none.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
        let resp = connect.into_response();
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
    }
}
