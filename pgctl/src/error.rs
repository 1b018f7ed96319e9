//! Errors of the cluster lifecycle.

use std::path::PathBuf;

/// Everything that can go wrong while initialising, starting or stopping a local server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No PostgreSQL binaries were found on `PATH` nor under `/usr/lib/postgresql/*/bin`.
    #[error("PostgreSQL binaries (initdb, postgres) not found on PATH nor in /usr/lib/postgresql/*/bin; install the Debian package `postgresql` (apt-get install postgresql)")]
    BinariesNotFound,
    /// Running as root, but the `postgres` OS user (needed because postgres refuses root) is missing.
    #[error("running as root but there is no `postgres` OS user to run the server as; install the Debian package `postgresql` or run as a non-root user")]
    NoPostgresUser,
    /// A filesystem or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `initdb` exited with an error.
    #[error("initdb for {dir} failed ({status}): {output}")]
    InitDb {
        /// The data directory.
        dir: PathBuf,
        /// Exit status text.
        status: String,
        /// Its combined output.
        output: String,
    },
    /// The server exited or did not become ready before the deadline.
    #[error(
        "postgres in {dir} on port {port} did not start: {reason}; last log lines:\n{log_tail}"
    )]
    StartFailed {
        /// The data directory.
        dir: PathBuf,
        /// The port it was asked to listen on.
        port: u16,
        /// Why we gave up.
        reason: String,
        /// The end of the server log.
        log_tail: String,
    },
    /// The server did not stop before the deadline.
    #[error("postgres (pid {pid}) did not stop within {secs}s")]
    StopTimeout {
        /// The postmaster pid.
        pid: u32,
        /// The deadline in seconds.
        secs: u64,
    },
    /// A `psql` command (used for `create_database`) failed.
    #[error("psql failed on port {port} ({status}): {output}")]
    Psql {
        /// The port.
        port: u16,
        /// Exit status text.
        status: String,
        /// Its output.
        output: String,
    },
    /// The server is not running but the operation needs it.
    #[error("postgres in {0} is not running")]
    NotRunning(PathBuf),
    /// A database name that cannot be used.
    #[error("invalid database name {0:?}: use letters, digits, `_` and `-` only")]
    BadName(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
