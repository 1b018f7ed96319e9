//! Errors of the replicator, saying which site and whether retrying can help.

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect to a site's database (retried by `run`).
    #[error(
        "{site}: cannot connect to the database: {source}{}",
        tls_cause(source)
    )]
    Connect {
        /// `primary` or `backup`.
        site: &'static str,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement failed (retried by `run` unless the cause is permanent).
    #[error("{site}: {context}: {}", db_text(.source))]
    Db {
        /// `primary` or `backup`.
        site: &'static str,
        /// What we were doing.
        context: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A configured table does not exist.
    #[error(
        "{site}: table {table} does not exist; create it or remove it from the [replicator] config"
    )]
    MissingTable {
        /// `primary` or `backup`.
        site: &'static str,
        /// The table.
        table: String,
    },
    /// A configured table has no primary key (rows could not be matched across sites).
    #[error("{site}: table {table} has no primary key; replication matches rows by primary key, add one (UUIDs recommended)")]
    NoPrimaryKey {
        /// `primary` or `backup`.
        site: &'static str,
        /// The table.
        table: String,
    },
    /// The database user lacks a privilege the replicator needs.
    #[error("{site}: permission denied while {context}: {message}; the replicator's user needs CREATE on the database, ownership of (or TRIGGER on) the replicated tables, and read/write on them")]
    Permission {
        /// `primary` or `backup`.
        site: &'static str,
        /// What we were doing.
        context: String,
        /// The server's message.
        message: String,
    },
    /// The `gsb` schema was installed by a newer gsb.
    #[error("{site}: gsb schema version {found} is newer than this gsb supports ({supported}); upgrade gsb")]
    SchemaTooNew {
        /// `primary` or `backup`.
        site: &'static str,
        /// Version found in the database.
        found: i32,
        /// Version this build knows.
        supported: i32,
    },
    /// The database was set up as the other site (both DSNs point at the same database?).
    #[error("{site}: this database is registered as the {found} site; primary_dsn and backup_dsn must name different databases")]
    WrongSite {
        /// The site we expected.
        site: &'static str,
        /// The site recorded in `gsb.site`.
        found: String,
    },
    /// The config copy's checksum on the backup differs from the primary's snapshot.
    #[error("config copy of {table}: checksum on the backup {backup} differs from the primary snapshot {primary}; rolled back")]
    Checksum {
        /// The table.
        table: String,
        /// Checksum of the primary snapshot.
        primary: String,
        /// Checksum on the backup after the copy.
        backup: String,
    },
    /// The metrics listener could not be bound.
    #[error("replicator.metrics_listen {addr}: cannot listen: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A metric could not be registered (duplicate name in the registry).
    #[error("registering replicator metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The replication stream (logical capture) failed: connection, protocol or walsender
    /// error (retried by `run`).
    #[error("{site}: replication stream: {what}")]
    Replication {
        /// `primary` or `backup`.
        site: &'static str,
        /// What happened.
        what: String,
    },
    /// A server setting or privilege the capture needs is missing.
    #[error("{site}: {setting}: {found}; the {capture} capture needs it: {fix}{hint}")]
    Prerequisite {
        /// `logical` or `trigger`.
        capture: &'static str,
        /// For the logical capture, the fallback where it cannot be enabled.
        hint: &'static str,
        /// `primary` or `backup`.
        site: &'static str,
        /// The setting or privilege, e.g. `wal_level`.
        setting: &'static str,
        /// What the server has now.
        found: String,
        /// The exact fix.
        fix: String,
    },
    /// A source's slot was invalidated (its WAL was removed): changes were lost from the
    /// stream, the pair must be rebuilt with `gsb resync`.
    #[error("{site}: replication slot {slot} is invalidated (its WAL was removed, max_slot_wal_keep_size exceeded); run `gsb resync --config FILE` to rebuild the pair")]
    SlotInvalidated {
        /// The source site.
        site: &'static str,
        /// The slot.
        slot: String,
    },
    /// The database answered something unexpected.
    #[error("{0}")]
    Protocol(String),
}

impl Error {
    /// Whether retrying cannot help (a config or setup problem an operator must fix).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::MissingTable { .. }
                | Error::NoPrimaryKey { .. }
                | Error::Permission { .. }
                | Error::SchemaTooNew { .. }
                | Error::WrongSite { .. }
                | Error::Prerequisite { .. }
                | Error::SlotInvalidated { .. }
                | Error::Listen { .. }
                | Error::Metrics(_)
        )
    }

    /// Wraps a statement error, recognising missing privileges.
    pub(crate) fn db(
        site: &'static str,
        context: impl Into<String>,
        e: tokio_postgres::Error,
    ) -> Self {
        let context = context.into();
        if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            let message = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string());
            return Error::Permission {
                site,
                context,
                message,
            };
        }
        Error::Db {
            site,
            context,
            source: e,
        }
    }
}

/// The driver error with the server's message and code (the driver's own text says only
/// "db error"), or with its cause for other failures.
fn db_text(e: &tokio_postgres::Error) -> String {
    if let Some(d) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            d.severity(),
            d.message(),
            d.code().code()
        );
    }
    match std::error::Error::source(e) {
        Some(cause) if !e.to_string().contains(&cause.to_string()) => format!("{e}: {cause}"),
        _ => e.to_string(),
    }
}

/// `: <the TLS failure>` when a connection failed in its TLS handshake (the driver's own text
/// only says that the handshake failed).
fn tls_cause(e: &tokio_postgres::Error) -> String {
    gsb_health::tls::tls_failure(e)
        .map(|t| format!(": {t} (the server's certificate is checked against replicator.ca_file, or the system's roots without it)"))
        .unwrap_or_default()
}
