//! Setup shared by the replicator's test files: two real PostgreSQL servers holding a site
//! schema, a replicator config for them, and the replicator run in-process.
#![allow(dead_code)] // each test file uses its own subset

use gsb_replicator::Config;
use gsb_tests::pg::PgServer;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The reference site's tables, without defaults (rows are written by the tests).
pub const SITE_TABLES: &str = "
CREATE TABLE users (id uuid PRIMARY KEY, email text, name text, created_at timestamptz, updated_at timestamptz);
CREATE TABLE meetings (id uuid PRIMARY KEY, host_id uuid, topic text, start_time timestamptz, duration_minutes int, status text, created_at timestamptz, updated_at timestamptz);
CREATE TABLE site_config (key text PRIMARY KEY, value text);
CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
CREATE TABLE usage_records (id uuid PRIMARY KEY, meeting_id uuid, user_id uuid, kind text, minutes int, site text, recorded_at timestamptz);
";

/// The replicated tables with small integer user ids, and `users.email` unique (a second key
/// the set-based apply can trip over).
pub const INT_USERS: &str = "
CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE, name text);
CREATE TABLE meetings (id uuid PRIMARY KEY, topic text, status text);
CREATE TABLE site_config (key text PRIMARY KEY, value text);
CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
CREATE TABLE usage_records (id uuid PRIMARY KEY, kind text, minutes int);
";

/// Two servers with `schema` installed in database `site`.
pub async fn servers(schema: &str) -> (PgServer, PgServer) {
    servers_with(schema, &[]).await
}

/// The same with extra server `settings` (e.g. `fsync = on`).
pub async fn servers_with(schema: &str, settings: &'static [(&str, &str)]) -> (PgServer, PgServer) {
    let (p, b) = tokio::task::spawn_blocking(move || {
        if settings.is_empty() {
            let mut s = PgServer::start_many(2);
            let b = s.pop().unwrap();
            (s.pop().unwrap(), b)
        } else {
            (
                PgServer::start_with(settings),
                PgServer::start_with(settings),
            )
        }
    })
    .await
    .unwrap();
    for srv in [&p, &b] {
        srv.client("site")
            .await
            .batch_execute(schema)
            .await
            .unwrap();
    }
    (p, b)
}

/// A `[replicator]` config text for the pair plus the `extra` lines (defaults otherwise).
pub fn config_text(p: &PgServer, b: &PgServer, extra: &str) -> String {
    format!(
        "[replicator]\nprimary_dsn = \"{}\"\nbackup_dsn = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\n{extra}",
        p.dsn("site"),
        b.dsn("site")
    )
}

/// Two servers with `schema` installed, and a replicator config for them with fast polling and
/// pruning plus the `extra` `[replicator]` lines.
pub async fn pair(schema: &str, extra: &str) -> (PgServer, PgServer, Config) {
    let (p, b) = servers(schema).await;
    let text = config_text(
        &p,
        &b,
        &format!("poll_interval = \"50ms\"\nprune_interval = \"200ms\"\n{extra}"),
    );
    (p, b, Config::from_toml_str(&text).unwrap())
}

/// Starts a write load on both sites: 60 transactions of 50 users each, `pause` apart; the
/// emails are `p<i>-<g>` on the primary and `b<i>-<g>` on the backup (6000 in all).
pub async fn two_way_load(
    p: &PgServer,
    b: &PgServer,
    pause: std::time::Duration,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut writers = Vec::new();
    for (c, tag) in [(p.client("site").await, "p"), (b.client("site").await, "b")] {
        writers.push(tokio::spawn(async move {
            for i in 0..60 {
                c.batch_execute(&format!("INSERT INTO users (id, email) SELECT gen_random_uuid(), '{tag}{i}-' || g FROM generate_series(1, 50) g")).await.unwrap();
                tokio::time::sleep(pause).await;
            }
        }));
    }
    writers
}

/// Waits until the backup holds some of the primary's writes.
pub async fn wait_replicating(backup: &Client) {
    gsb_tests::wait_until(
        std::time::Duration::from_secs(30),
        "replication under way",
        || async { count(backup, "SELECT count(*) FROM users WHERE email LIKE 'p%'").await > 200 },
    )
    .await;
}

/// Both sites hold exactly `n` users with `n` distinct emails: nothing lost, nothing duplicated.
pub async fn assert_no_loss_no_duplicate(clients: [&Client; 2], n: i64) {
    for c in clients {
        let r = c
            .query_one("SELECT count(*), count(DISTINCT email) FROM users", &[])
            .await
            .unwrap();
        let (rows, distinct): (i64, i64) = (r.get(0), r.get(1));
        assert_eq!((rows, distinct), (n, n), "no loss, no duplicate");
    }
}

/// A replicator running in-process.
pub struct Running {
    stop: CancellationToken,
    registry: prometheus::Registry,
    task: tokio::task::JoinHandle<Result<(), gsb_replicator::Error>>,
}

/// Starts the replicator on `config`.
pub fn start(config: &Config) -> Running {
    let stop = CancellationToken::new();
    let registry = prometheus::Registry::new();
    let task = tokio::spawn(gsb_replicator::run(
        config.clone(),
        registry.clone(),
        stop.clone(),
    ));
    Running {
        stop,
        registry,
        task,
    }
}

impl Running {
    /// Stops it and checks it ended without an error.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// The value of counter `name` with label `label`=`value` (0 when absent).
    pub fn counter(&self, name: &str, label: &str, value: &str) -> u64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.get_name() == name)
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.get_name() == label && l.get_value() == value)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }
}

impl Running {
    /// The value of counter `name` whose labels include all of `labels` (0 when absent).
    pub fn counter_with(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.get_name() == name)
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.get_name() == *k && l.get_value() == *v)
                })
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// The value of gauge `name` for `direction` (None when not set yet).
    pub fn gauge(&self, name: &str, direction: &str) -> Option<f64> {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.get_name() == name)
            .flat_map(|f| f.get_metric())
            .find(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.get_name() == "direction" && l.get_value() == direction)
            })
            .map(|m| m.get_gauge().get_value())
    }

    /// Changes applied in `direction` to `table` (`gsb_replication_applied_total`).
    pub fn applied(&self, direction: &str, table: &str) -> u64 {
        self.counter_with(
            "gsb_replication_applied_total",
            &[("direction", direction), ("table", table)],
        )
    }
}

/// Waits until each site holds the other's heartbeat: both directions are replicating (with
/// the logical capture, both slots exist and their initial syncs are done).
pub async fn wait_streaming(p: &Client, b: &Client) {
    gsb_tests::wait_until(
        std::time::Duration::from_secs(30),
        "heartbeats crossed both ways",
        || async {
            // The schema may not be installed yet.
            let n = |c: &'static str| async move {
                let q = format!("SELECT count(*) FROM gsb.heartbeat WHERE site = '{c}'");
                (if c == "backup" { p } else { b })
                    .query_one(&q, &[])
                    .await
                    .map(|r| r.get::<_, i64>(0))
                    .unwrap_or(0)
            };
            n("backup").await == 1 && n("primary").await == 1
        },
    )
    .await;
}

/// One `bigint` from `sql`.
pub async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// One optional `text` from `sql`.
pub async fn text(c: &Client, sql: &str) -> Option<String> {
    c.query_opt(sql, &[]).await.unwrap().map(|r| r.get(0))
}

/// Inserts one user `<tag>-<n>` per statement on `dsn` until `stop`; returns how many
/// committed (each acknowledged insert must reach the other site exactly once).
pub async fn steady_writer(dsn: String, tag: &'static str, stop: CancellationToken) -> i64 {
    let c = gsb_tests::pg::connect(&dsn).await;
    let mut n = 0;
    while !stop.is_cancelled() {
        c.execute(
            "INSERT INTO users (id, email) VALUES (md5($1)::uuid, $1)",
            &[&format!("{tag}-{n}")],
        )
        .await
        .unwrap();
        n += 1;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    n
}

/// The `[replicator]` line choosing `capture` (`logical` or `triggers`).
pub fn capture_line(capture: &str) -> String {
    format!("capture = \"{capture}\"\n")
}

/// Defines the tests `logical::<name>` and `triggers::<name>`, each running
/// `<name>(capture)`: both captures feed one apply and conflict path, so the same story
/// must hold for each.
#[allow(unused_macros)]
macro_rules! both_captures {
    ($($name:ident),* $(,)?) => {
        mod logical {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name("logical").await
                }
            )*
        }
        mod triggers {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name("triggers").await
                }
            )*
        }
    };
}
