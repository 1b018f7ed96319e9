//! The site's database: a small reconnecting pool, the schema, and every query the site runs.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use crate::model::{
    next_status, ClientVersion, Meeting, MeetingAction, Page, UsageRecord, UsageReport, User,
};
use crate::Error;

/// Connections kept per site; the reference site is small and the proxy probes it often.
const POOL_SIZE: usize = 16;
/// How long one connection attempt may take; short, so a dead database turns health red fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request waits for a free or new connection before answering 503.
const POOL_WAIT: Duration = Duration::from_secs(3);

/// Idempotent schema. No foreign keys and no unique constraints beside primary keys: the
/// replicator delivers rows in any table order, so a meeting may arrive before its host.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id uuid PRIMARY KEY,
    email text NOT NULL,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS meetings (
    id uuid PRIMARY KEY,
    host_id uuid NOT NULL,
    topic text NOT NULL,
    start_time timestamptz,
    duration_minutes int NOT NULL DEFAULT 60,
    status text NOT NULL DEFAULT 'scheduled',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS site_config (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS custom_pages (
    path text PRIMARY KEY,
    title text NOT NULL,
    body text NOT NULL
);
CREATE TABLE IF NOT EXISTS client_versions (
    platform text PRIMARY KEY,
    version text NOT NULL,
    download_url text NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_records (
    id uuid PRIMARY KEY,
    meeting_id uuid NOT NULL,
    user_id uuid,
    kind text NOT NULL,
    minutes int NOT NULL DEFAULT 0,
    site text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS users_created_at_idx ON users (created_at);
CREATE INDEX IF NOT EXISTS meetings_created_at_idx ON meetings (created_at);
CREATE INDEX IF NOT EXISTS usage_records_meeting_id_idx ON usage_records (meeting_id);
";

/// Serialises concurrent schema installs on one database (two processes racing on
/// `CREATE TABLE IF NOT EXISTS` can still hit a duplicate-type error). Arbitrary constant.
const SCHEMA_LOCK_KEY: i64 = 0x6773_625f_7369_7465; // "gsb_site"

const USER_COLS: &str = "id, email, name, created_at, updated_at";
const MEETING_COLS: &str =
    "id, host_id, topic, start_time, duration_minutes, status, created_at, updated_at";
const USAGE_COLS: &str = "id, meeting_id, user_id, kind, minutes, site, recorded_at";

/// A database failure, split by whether the database was unreachable or answered with an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    #[error("database unavailable: {0}")]
    Pool(#[from] PoolError),
    #[error("database query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
}

impl DbError {
    /// True when the database could not be reached (503, retry later) rather than having
    /// rejected the statement (500).
    pub(crate) fn is_unavailable(&self) -> bool {
        match self {
            DbError::Pool(_) | DbError::Timeout(_) => true,
            // No SQL state means the connection itself failed (closed, reset, I/O).
            DbError::Query(e) => {
                e.code().is_none() || e.code() == Some(&SqlState::UNDEFINED_TABLE) || e.is_closed()
            }
        }
    }

    /// True when a table is missing: the database was recreated under us and the schema must
    /// be installed again.
    pub(crate) fn is_missing_table(&self) -> bool {
        matches!(self, DbError::Query(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE))
    }
}

/// The outcome of a meeting action on a row that exists.
pub(crate) enum ActionOutcome {
    /// The action happened; the meeting as it is now, and the usage row it wrote if any.
    Done(Box<Meeting>, Option<UsageRecord>),
    /// The action is illegal in the meeting's current status.
    Illegal(String),
}

/// The site's handle on its database.
#[derive(Clone)]
pub(crate) struct Db {
    pool: Pool,
}

impl Db {
    /// Builds the pool without connecting: the site must start while its database is down.
    pub(crate) fn new(dsn: &str) -> Result<Self, Error> {
        let mut pg = tokio_postgres::Config::from_str(dsn).map_err(Error::Dsn)?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(CONNECT_TIMEOUT);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("gsb-site");
        }
        // The default search_path is `"$user", public`: when the role is named like a schema
        // (the replicator's `gsb` schema and the role `gsb` of `gsb up`), unqualified CREATE and
        // SELECT would land in that schema instead of the site's tables in `public`.
        if pg.get_options().is_none() {
            pg.options("-c search_path=public");
        }
        // `Verified` runs an empty query on checkout, so a connection whose server died is
        // replaced instead of failing the request that drew it.
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(Error::Pool)?;
        Ok(Db { pool })
    }

    /// Closes the pool; connections are dropped as they come back.
    pub(crate) fn close(&self) {
        self.pool.close();
    }

    /// Installs the tables (idempotent).
    pub(crate) async fn install_schema(&self) -> Result<(), DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
            .await?;
        // "already exists, skipping" notices on every start would only be log noise.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await?;
        tx.batch_execute(SCHEMA).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Checks a connection out of the pool (proves the pool can serve), bounded by `limit`.
    pub(crate) async fn check_pool(&self, limit: Duration) -> Result<(), DbError> {
        let client = tokio::time::timeout(limit, self.pool.get())
            .await
            .map_err(|_| DbError::Timeout(limit))??;
        drop(client);
        Ok(())
    }

    /// Runs `SELECT 1`, bounded by `limit`.
    pub(crate) async fn ping(&self, limit: Duration) -> Result<(), DbError> {
        tokio::time::timeout(limit, async {
            let client = self.pool.get().await?;
            client.query_one("SELECT 1", &[]).await?;
            Ok(())
        })
        .await
        .map_err(|_| DbError::Timeout(limit))?
    }

    /// Runs a real query on `meetings`, bounded by `limit`.
    pub(crate) async fn probe_meetings(&self, limit: Duration) -> Result<(), DbError> {
        tokio::time::timeout(limit, async {
            let client = self.pool.get().await?;
            client
                .query_opt("SELECT id FROM meetings LIMIT 1", &[])
                .await?;
            Ok(())
        })
        .await
        .map_err(|_| DbError::Timeout(limit))?
    }

    pub(crate) async fn create_user(&self, email: &str, name: &str) -> Result<User, DbError> {
        let client = self.pool.get().await?;
        let sql = format!(
            "INSERT INTO users (id, email, name) VALUES ($1, $2, $3) RETURNING {USER_COLS}"
        );
        let row = client
            .query_one(&sql, &[&Uuid::new_v4(), &email, &name])
            .await?;
        Ok(user(&row))
    }

    pub(crate) async fn get_user(&self, id: Uuid) -> Result<Option<User>, DbError> {
        let client = self.pool.get().await?;
        let sql = format!("SELECT {USER_COLS} FROM users WHERE id = $1");
        Ok(client.query_opt(&sql, &[&id]).await?.as_ref().map(user))
    }

    pub(crate) async fn list_users(&self, limit: i64) -> Result<Vec<User>, DbError> {
        let client = self.pool.get().await?;
        let sql = format!("SELECT {USER_COLS} FROM users ORDER BY created_at DESC, id LIMIT $1");
        Ok(client
            .query(&sql, &[&limit])
            .await?
            .iter()
            .map(user)
            .collect())
    }

    pub(crate) async fn create_meeting(
        &self,
        host_id: Uuid,
        topic: &str,
        start_time: Option<DateTime<Utc>>,
        duration_minutes: i32,
    ) -> Result<Meeting, DbError> {
        let client = self.pool.get().await?;
        let sql = format!(
            "INSERT INTO meetings (id, host_id, topic, start_time, duration_minutes) \
             VALUES ($1, $2, $3, $4, $5) RETURNING {MEETING_COLS}"
        );
        let row = client
            .query_one(
                &sql,
                &[
                    &Uuid::new_v4(),
                    &host_id,
                    &topic,
                    &start_time,
                    &duration_minutes,
                ],
            )
            .await?;
        Ok(meeting(&row))
    }

    pub(crate) async fn get_meeting(&self, id: Uuid) -> Result<Option<Meeting>, DbError> {
        let client = self.pool.get().await?;
        let sql = format!("SELECT {MEETING_COLS} FROM meetings WHERE id = $1");
        Ok(client.query_opt(&sql, &[&id]).await?.as_ref().map(meeting))
    }

    /// Newest first; `status` filters when given.
    pub(crate) async fn list_meetings(
        &self,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Meeting>, DbError> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {MEETING_COLS} FROM meetings WHERE ($1::text IS NULL OR status = $1) \
             ORDER BY created_at DESC, id LIMIT $2"
        );
        Ok(client
            .query(&sql, &[&status, &limit])
            .await?
            .iter()
            .map(meeting)
            .collect())
    }

    /// Meetings not yet ended, soonest first (those without a start time last).
    pub(crate) async fn upcoming_meetings(&self, limit: i64) -> Result<Vec<Meeting>, DbError> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {MEETING_COLS} FROM meetings WHERE status <> 'ended' \
             ORDER BY start_time ASC NULLS LAST, created_at DESC LIMIT $1"
        );
        Ok(client
            .query(&sql, &[&limit])
            .await?
            .iter()
            .map(meeting)
            .collect())
    }

    /// Applies `action` in one transaction with the meeting row locked, so two concurrent
    /// `end`s cannot both write a usage row. `None` when the meeting does not exist.
    pub(crate) async fn meeting_action(
        &self,
        id: Uuid,
        action: MeetingAction,
        user_id: Option<Uuid>,
        site: &str,
    ) -> Result<Option<ActionOutcome>, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // The schema has no `started_at`: while a meeting is in progress its `updated_at` is
        // the moment it started (start is the last write), which gives the minutes elapsed.
        let sql = format!(
            "SELECT {MEETING_COLS}, \
             GREATEST(1, FLOOR(EXTRACT(EPOCH FROM (now() - updated_at)) / 60))::int AS elapsed \
             FROM meetings WHERE id = $1 FOR UPDATE"
        );
        let Some(row) = tx.query_opt(&sql, &[&id]).await? else {
            return Ok(None);
        };
        let current = meeting(&row);
        let elapsed: i32 = row.get("elapsed");
        let Some(next) = next_status(&current.status, action) else {
            return Ok(Some(ActionOutcome::Illegal(current.status)));
        };
        let updated = if next != current.status {
            let sql = format!(
                "UPDATE meetings SET status = $2, updated_at = now() WHERE id = $1 \
                 RETURNING {MEETING_COLS}"
            );
            meeting(&tx.query_one(&sql, &[&id, &next]).await?)
        } else {
            current
        };
        let usage = match action {
            MeetingAction::Start => None,
            MeetingAction::End => Some(("meeting_end", elapsed, None)),
            MeetingAction::Join => Some(("join", 0, user_id)),
        };
        let record = match usage {
            None => None,
            Some((kind, minutes, user)) => {
                let sql = format!(
                    "INSERT INTO usage_records (id, meeting_id, user_id, kind, minutes, site) \
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING {USAGE_COLS}"
                );
                let row = tx
                    .query_one(&sql, &[&Uuid::new_v4(), &id, &user, &kind, &minutes, &site])
                    .await?;
                Some(usage_record(&row))
            }
        };
        tx.commit().await?;
        Ok(Some(ActionOutcome::Done(Box::new(updated), record)))
    }

    pub(crate) async fn usage_report(&self) -> Result<UsageReport, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT site, kind, count(*)::bigint, COALESCE(sum(minutes), 0)::bigint \
                 FROM usage_records GROUP BY site, kind",
                &[],
            )
            .await?;
        Ok(UsageReport::from_groups(
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))),
        ))
    }

    pub(crate) async fn all_config(&self) -> Result<BTreeMap<String, String>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query("SELECT key, value FROM site_config ORDER BY key", &[])
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub(crate) async fn get_config(&self, key: &str) -> Result<Option<String>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt("SELECT value FROM site_config WHERE key = $1", &[&key])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(crate) async fn put_config(&self, key: &str, value: &str) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO site_config (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&key, &value],
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn list_pages(&self) -> Result<Vec<Page>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT path, title, body FROM custom_pages ORDER BY path",
                &[],
            )
            .await?;
        Ok(rows.iter().map(page).collect())
    }

    pub(crate) async fn get_page(&self, path: &str) -> Result<Option<Page>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT path, title, body FROM custom_pages WHERE path = $1",
                &[&path],
            )
            .await?;
        Ok(row.as_ref().map(page))
    }

    pub(crate) async fn put_page(
        &self,
        path: &str,
        title: &str,
        body: &str,
    ) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO custom_pages (path, title, body) VALUES ($1, $2, $3) \
                 ON CONFLICT (path) DO UPDATE SET title = EXCLUDED.title, body = EXCLUDED.body",
                &[&path, &title, &body],
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn list_client_versions(&self) -> Result<Vec<ClientVersion>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT platform, version, download_url FROM client_versions ORDER BY platform",
                &[],
            )
            .await?;
        Ok(rows.iter().map(client_version).collect())
    }

    pub(crate) async fn put_client_version(
        &self,
        platform: &str,
        version: &str,
        download_url: &str,
    ) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO client_versions (platform, version, download_url) VALUES ($1, $2, $3) \
                 ON CONFLICT (platform) DO UPDATE \
                 SET version = EXCLUDED.version, download_url = EXCLUDED.download_url",
                &[&platform, &version, &download_url],
            )
            .await?;
        Ok(())
    }
}

fn user(row: &Row) -> User {
    User {
        id: row.get("id"),
        email: row.get("email"),
        name: row.get("name"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    }
}

fn meeting(row: &Row) -> Meeting {
    Meeting {
        id: row.get("id"),
        host_id: row.get("host_id"),
        topic: row.get("topic"),
        start_time: row.get("start_time"),
        duration_minutes: row.get("duration_minutes"),
        status: row.get("status"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    }
}

fn usage_record(row: &Row) -> UsageRecord {
    UsageRecord {
        id: row.get("id"),
        meeting_id: row.get("meeting_id"),
        user_id: row.get("user_id"),
        kind: row.get("kind"),
        minutes: row.get("minutes"),
        site: row.get("site"),
        recorded_at: row.get("recorded_at"),
    }
}

fn page(row: &Row) -> Page {
    Page {
        path: row.get(0),
        title: row.get(1),
        body: row.get(2),
    }
}

fn client_version(row: &Row) -> ClientVersion {
    ClientVersion {
        platform: row.get(0),
        version: row.get(1),
        download_url: row.get(2),
    }
}
