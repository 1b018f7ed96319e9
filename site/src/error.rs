//! Errors: `Error` for the caller of `run`/`serve`, `ApiError` for one HTTP request.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use http_body_util::Full;

use crate::db::DbError;

/// Why the site could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `dsn` option is not a valid PostgreSQL connection string (a configuration error).
    #[error("invalid database dsn: {0}")]
    Dsn(#[source] tokio_postgres::Error),
    /// The connection pool could not be built (a configuration error, never a database outage).
    #[error("cannot build the database pool: {0}")]
    Pool(#[source] deadpool_postgres::BuildError),
    /// The listen address could not be bound (in use, or not permitted).
    #[error("cannot bind the site listener on {addr}: {source}")]
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The bound listener has no readable local address.
    #[error("cannot read the listener's local address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// One failed request, mapped to a status code and a JSON `{"error": ...}` body in one place.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The client sent something invalid; `field` names the offending input when there is one.
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed(&'static [Method]),
    /// An illegal state transition; `status` is the state the resource is in now.
    #[error("{message}")]
    Conflict { message: String, status: String },
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The database (or a component marked broken) cannot serve now; retrying later is safe.
    #[error("{0}")]
    Unavailable(String),
    /// A table is missing (the database was recreated); the schema keeper is woken to
    /// reinstall it, and the request may be retried.
    #[error("database schema missing; reinstalling it")]
    SchemaMissing,
    /// A bug or an unexpected database answer; not worth retrying.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming the field that was wrong.
    pub(crate) fn field(field: &str, problem: impl std::fmt::Display) -> Self {
        ApiError::BadRequest {
            field: Some(field.to_owned()),
            message: format!("field `{field}`: {problem}"),
        }
    }

    /// A 400 about the request as a whole (unreadable JSON, wrong content).
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field: None,
            message: message.into(),
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::SchemaMissing => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn into_response(self) -> Response<Full<Bytes>> {
        let mut body = serde_json::json!({ "error": self.to_string() });
        match &self {
            ApiError::BadRequest {
                field: Some(field), ..
            } => body["field"] = field.as_str().into(),
            ApiError::Conflict { status, .. } => body["status"] = status.as_str().into(),
            _ => {}
        }
        let mut builder = Response::builder()
            .status(self.status())
            .header(header::CONTENT_TYPE, "application/json");
        if let ApiError::MethodNotAllowed(allowed) = &self {
            let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            builder = builder.header(header::ALLOW, allow.join(", "));
        }
        if let ApiError::Unavailable(_) | ApiError::SchemaMissing = &self {
            builder = builder.header(header::RETRY_AFTER, "1");
        }
        builder
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_missing_table() {
            ApiError::SchemaMissing
        } else if e.is_unavailable() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}
