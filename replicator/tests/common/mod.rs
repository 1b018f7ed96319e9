//! Setup shared by the replicator's test files: two real PostgreSQL servers holding a site
//! schema, a replicator config for them, and the replicator run in-process.
#![allow(dead_code)] // each test file uses its own subset

use gsb_replicator::Config;
use gsb_tests::pg::PgServer;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// Two servers with `schema` installed in database `site`, and a replicator config for them with
/// fast polling and pruning plus the `extra` `[replicator]` lines.
pub async fn pair(schema: &str, extra: &str) -> (PgServer, PgServer, Config) {
    let mut s = tokio::task::spawn_blocking(|| PgServer::start_many(2))
        .await
        .unwrap();
    let b = s.pop().unwrap();
    let p = s.pop().unwrap();
    for srv in [&p, &b] {
        srv.client("site")
            .await
            .batch_execute(schema)
            .await
            .unwrap();
    }
    let config = Config::from_toml_str(&format!(
        "[replicator]\nprimary_dsn = \"{}\"\nbackup_dsn = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\npoll_interval = \"50ms\"\nprune_interval = \"200ms\"\n{extra}",
        p.dsn("site"),
        b.dsn("site")
    ))
    .unwrap();
    (p, b, config)
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

/// One `bigint` from `sql`.
pub async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// One optional `text` from `sql`.
pub async fn text(c: &Client, sql: &str) -> Option<String> {
    c.query_opt(sql, &[]).await.unwrap().map(|r| r.get(0))
}
