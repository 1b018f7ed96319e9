//! Two real `gsb replicator` processes on one site pair: the second waits as a standby
//! (`"active": false` on `/status`), takes over within a deadline after the first is killed
//! with SIGKILL mid-load, and nothing is lost or duplicated. Needs `cargo build -p gsb` first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gsb_replicator::{verify, Config};
use gsb_tests::pg::PgServer;
use gsb_tests::{gsb_bin, wait_for, wait_until, Proc};

const SITE_SCHEMA: &str = "
CREATE TABLE users (id uuid PRIMARY KEY, email text, name text, created_at timestamptz, updated_at timestamptz);
CREATE TABLE meetings (id uuid PRIMARY KEY, host_id uuid, topic text, start_time timestamptz, duration_minutes int, status text, created_at timestamptz, updated_at timestamptz);
CREATE TABLE site_config (key text PRIMARY KEY, value text);
CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
CREATE TABLE usage_records (id uuid PRIMARY KEY, meeting_id uuid, user_id uuid, kind text, minutes int, site text, recorded_at timestamptz);
";

/// Longest a standby may take to replicate after the active instance died.
const TAKEOVER: Duration = Duration::from_secs(10);

fn spawn(name: &str, config: &Path) -> Proc {
    Proc::spawn(
        name,
        Command::new(gsb_bin())
            .args(["--log-format", "json", "replicator", "--config"])
            .arg(config),
    )
}

/// The `/status` address a replicator logged (it binds port 0).
async fn status_url(p: &Proc) -> String {
    let addr: SocketAddr = wait_for(Duration::from_secs(30), "the metrics listen line", || {
        let out = p.output();
        async move {
            out.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "replicator metrics and status listening")
                .and_then(|v| v["listen"].as_str()?.parse().ok())
        }
    })
    .await;
    format!("http://{addr}/status")
}

/// `active` from `/status`, None while it does not answer.
async fn active(http: &reqwest::Client, url: &str) -> Option<bool> {
    let v: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
    v["active"].as_bool()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_sigkill_of_the_active_replicator_losing_nothing() {
    let mut s = tokio::task::spawn_blocking(|| PgServer::start_many(2))
        .await
        .unwrap();
    let (b, p) = (s.pop().unwrap(), s.pop().unwrap());
    for srv in [&p, &b] {
        srv.client("site")
            .await
            .batch_execute(SITE_SCHEMA)
            .await
            .unwrap();
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
    let http = reqwest::Client::new();

    let mut first = spawn("replicator-1", &path);
    let first_url = status_url(&first).await;
    wait_until(
        Duration::from_secs(30),
        "first replicator active",
        || async { active(&http, &first_url).await == Some(true) },
    )
    .await;
    let second = spawn("replicator-2", &path);
    let second_url = status_url(&second).await;
    // It answers, and keeps saying standby while the first holds the lock.
    for _ in 0..5 {
        let a = wait_for(Duration::from_secs(10), "second replicator status", || {
            active(&http, &second_url)
        })
        .await;
        assert!(!a, "two active replicators on one pair");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(active(&http, &first_url).await, Some(true));

    // A steady write load on both sites across the takeover.
    let (pc, bc) = (p.client("site").await, b.client("site").await);
    let writers: Vec<_> = [(p.client("site").await, "p"), (b.client("site").await, "b")]
        .into_iter()
        .map(|(c, tag)| {
            tokio::spawn(async move {
                for i in 0..60 {
                    c.batch_execute(&format!("INSERT INTO users (id, email) SELECT gen_random_uuid(), '{tag}{i}-' || g FROM generate_series(1, 50) g")).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
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
    first.kill9();
    let killed = Instant::now();
    wait_until(TAKEOVER, "the standby active after the SIGKILL", || async {
        active(&http, &second_url).await == Some(true)
    })
    .await;
    println!("takeover after SIGKILL: {:?}", killed.elapsed());
    for w in writers {
        w.await.unwrap();
    }
    wait_until(
        Duration::from_secs(60),
        "verify equal after the takeover",
        || async { verify(&config).await.map(|r| r.is_equal()).unwrap_or(false) },
    )
    .await;
    for c in [&pc, &bc] {
        let r = c
            .query_one("SELECT count(*), count(DISTINCT email) FROM users", &[])
            .await
            .unwrap();
        let (n, d): (i64, i64) = (r.get(0), r.get(1));
        assert_eq!((n, d), (6000, 6000), "no loss, no duplicate");
    }
    drop(second);
}
