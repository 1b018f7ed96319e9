//! `kill -9` of the real `gsb replicator` binary mid-batch under a steady write load, then a
//! restart: verify equal, no duplicate, no loss. Needs `cargo build -p gsb` first.

use std::process::Command;
use std::time::Duration;

use gsb_replicator::{verify, Config};
use gsb_tests::pg::PgServer;
use gsb_tests::{gsb_bin, wait_until, Proc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_binary_under_load_then_restart_loses_and_duplicates_nothing() {
    let mut s = tokio::task::spawn_blocking(|| PgServer::start_many(2))
        .await
        .unwrap();
    let (b, p) = (s.pop().unwrap(), s.pop().unwrap());
    for srv in [&p, &b] {
        srv.client("site").await.batch_execute(
            "CREATE TABLE users (id uuid PRIMARY KEY, email text, name text, created_at timestamptz, updated_at timestamptz);
             CREATE TABLE meetings (id uuid PRIMARY KEY, host_id uuid, topic text, start_time timestamptz, duration_minutes int, status text, created_at timestamptz, updated_at timestamptz);
             CREATE TABLE site_config (key text PRIMARY KEY, value text);
             CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
             CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
             CREATE TABLE usage_records (id uuid PRIMARY KEY, meeting_id uuid, user_id uuid, kind text, minutes int, site text, recorded_at timestamptz);",
        ).await.unwrap();
    }
    let text = format!(
        "[replicator]\nprimary_dsn = \"{}\"\nbackup_dsn = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\nbatch_size = 200\n",
        p.dsn("site"),
        b.dsn("site")
    );
    let config = Config::from_toml_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gsb.toml");
    std::fs::write(&path, &text).unwrap();
    let spawn = || {
        Proc::spawn(
            "gsb-replicator",
            Command::new(gsb_bin())
                .arg("replicator")
                .arg("--config")
                .arg(&path),
        )
    };
    let mut rep = spawn();
    let (pc, bc) = (p.client("site").await, b.client("site").await);
    let writers: Vec<_> = [(p.client("site").await, "p"), (b.client("site").await, "b")]
        .into_iter()
        .map(|(c, tag)| {
            tokio::spawn(async move {
                for i in 0..60 {
                    c.batch_execute(&format!("INSERT INTO users (id, email) SELECT gen_random_uuid(), '{tag}{i}-' || g FROM generate_series(1, 50) g")).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(30), "replication under way", || async {
        let n: i64 = bc
            .query_one("SELECT count(*) FROM users WHERE email LIKE 'p%'", &[])
            .await
            .unwrap()
            .get(0);
        n > 200
    })
    .await;
    rep.kill9();
    for w in writers {
        w.await.unwrap();
    }
    let _rep = spawn();
    wait_until(
        Duration::from_secs(60),
        "verify equal after kill -9 and restart",
        || async { verify(&config).await.map(|r| r.is_equal()).unwrap_or(false) },
    )
    .await;
    for c in [&pc, &bc] {
        let (n, d): (i64, i64) = {
            let r = c
                .query_one("SELECT count(*), count(DISTINCT email) FROM users", &[])
                .await
                .unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!((n, d), (6000, 6000), "no loss, no duplicate");
    }
}
