//! Throughput and lag probes over two real PostgreSQL servers. Ignored by default (they take
//! tens of seconds and their figures only mean something in a release build):
//!
//! `cargo test --release -p gsb-replicator --test perf -- --ignored --nocapture --test-threads 1`
//!
//! `GSB_PERF_ROWS` (default 50000) sets the catch-up backlog, `GSB_PERF_RATE` (default 1000)
//! the writes/s per direction and `GSB_PERF_SECS` (default 10) the duration of the lag probe;
//! `GSB_PERF_FSYNC=on` runs the servers with `fsync = on` (a production disk's commit cost; the
//! harness default is off).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use futures_util::StreamExt;
use gsb_replicator::{verify, Config};
use gsb_tests::pg::PgServer;
use gsb_tests::wait_until;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

const SITE_SCHEMA: &str = "
CREATE TABLE users (id uuid PRIMARY KEY, email text, name text, created_at timestamptz, updated_at timestamptz);
CREATE TABLE meetings (id uuid PRIMARY KEY, host_id uuid, topic text, start_time timestamptz, duration_minutes int, status text, created_at timestamptz, updated_at timestamptz);
CREATE TABLE site_config (key text PRIMARY KEY, value text);
CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
CREATE TABLE usage_records (id uuid PRIMARY KEY, meeting_id uuid, user_id uuid, kind text, minutes int, site text, recorded_at timestamptz);
";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn pair() -> (PgServer, PgServer, Config) {
    // Default polling and pruning: the figures are those of a default deployment.
    let fsync: &'static [(&str, &str)] = if std::env::var("GSB_PERF_FSYNC").is_ok_and(|v| v == "on")
    {
        &[("fsync", "on")]
    } else {
        &[]
    };
    let (p, b) = common::servers_with(SITE_SCHEMA, fsync).await;
    // GSB_PERF_CAPTURE=triggers: the trigger capture instead of the default.
    let capture = std::env::var("GSB_PERF_CAPTURE").unwrap_or_else(|_| "logical".into());
    let text = common::config_text(&p, &b, &common::capture_line(&capture));
    let config = Config::from_toml_str(&text).unwrap();
    (p, b, config)
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), gsb_replicator::Error>>,
}

fn start(config: &Config) -> Running {
    let stop = CancellationToken::new();
    let task = tokio::spawn(gsb_replicator::run(
        config.clone(),
        prometheus::Registry::new(),
        stop.clone(),
    ));
    Running { stop, task }
}

impl Running {
    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Sets the capture up (publication and slot on each site, or the capture triggers) by
/// running the replicator until both sites have it; what is written afterwards is kept for it.
async fn install(config: &Config, p: &Client, b: &Client) {
    let r = start(config);
    wait_until(Duration::from_secs(30), "capture set up", || async {
        let q = "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'gsb_%') \
                 + (SELECT count(*) FROM pg_trigger WHERE tgname = 'gsb_capture')";
        count(p, q).await >= 1 && count(b, q).await >= 1
    })
    .await;
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput probe: run in release with --ignored --nocapture"]
async fn catch_up_of_a_backlog_both_ways() {
    let rows = env_or("GSB_PERF_ROWS", 50_000) as i64;
    let (ps, bs, config) = pair().await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    install(&config, &p, &b).await;
    // The backlog: `rows` users on each site written while no replicator runs, in chunks of
    // 5000 (one transaction each, like a busy site's commits piling up).
    let t = Instant::now();
    for (c, tag) in [(&p, "p"), (&b, "b")] {
        for k in 0..(rows / 5000).max(1) {
            let n = rows.min(5000);
            c.batch_execute(&format!(
                "INSERT INTO users (id, email, name, created_at, updated_at) \
                 SELECT gen_random_uuid(), '{tag}{k}-' || g, 'name ' || g, now(), now() \
                 FROM generate_series(1, {n}) g"
            ))
            .await
            .unwrap();
        }
    }
    let per_site = count(&p, "SELECT count(*) FROM users").await;
    println!(
        "backlog written: {per_site} rows per site in {:.2}s (capture trigger included)",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let r = start(&config);
    let mut done: [Option<f64>; 2] = [None, None];
    // Polled every 200 ms: a count of the whole table costs the servers CPU the apply needs.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let q = "SELECT count(*) FROM users";
        let arrived = [count(&b, q).await, count(&p, q).await];
        for (slot, n) in done.iter_mut().zip(arrived) {
            if slot.is_none() && n == 2 * per_site {
                *slot = Some(t.elapsed().as_secs_f64());
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backlog not applied within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (p2b, b2p) = (done[0].unwrap(), done[1].unwrap());
    println!(
        "catch-up, both directions at once: primary_to_backup {per_site} rows in {p2b:.2}s = {:.0} rows/s; \
         backup_to_primary {per_site} rows in {b2p:.2}s = {:.0} rows/s",
        per_site as f64 / p2b,
        per_site as f64 / b2p
    );
    r.shutdown().await;
    assert!(verify(&config).await.unwrap().is_equal());
}

/// Records, per row id, when the insert's commit was acknowledged and when the other site
/// notified that the row became visible there.
#[derive(Default)]
struct Times {
    committed: HashMap<String, Instant>,
    visible: HashMap<String, Instant>,
}

/// A connection to a site with a trigger that notifies `perf` with the id of every user
/// inserted by the replicator's apply; notifications are delivered when the inserting (apply) transaction commits.
async fn visibility_listener(
    dsn: &str,
    times: Arc<Mutex<Times>>,
    stop: CancellationToken,
) -> (Client, tokio::task::JoinHandle<()>) {
    let (client, mut conn) = tokio_postgres::connect(dsn, NoTls).await.unwrap();
    let task = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return,
                m = messages.next() => m,
            };
            match m {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let now = Instant::now();
                    times
                        .lock()
                        .unwrap()
                        .visible
                        .insert(n.payload().to_owned(), now);
                }
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    });
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION perf_notify() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN IF current_setting('gsb.applying', true) = 'on' THEN \
             PERFORM pg_notify('perf', NEW.id::text); END IF; RETURN NULL; END $$; \
             CREATE TRIGGER perf_notify AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION perf_notify(); \
             LISTEN perf",
        )
        .await
        .unwrap();
    (client, task)
}

/// Inserts single-row transactions at `rate`/s for `secs` on `conns` connections.
async fn writer(dsn: String, tag: &'static str, rate: u64, secs: u64, times: Arc<Mutex<Times>>) {
    const CONNS: u64 = 4;
    let mut tasks = Vec::new();
    for w in 0..CONNS {
        let dsn = dsn.clone();
        let times = times.clone();
        tasks.push(tokio::spawn(async move {
            let c = gsb_tests::pg::connect(&dsn).await;
            let ins = c
                .prepare("INSERT INTO users (id, email, name, created_at, updated_at) VALUES ($1::text::uuid, $2, 'x', now(), now())")
                .await
                .unwrap();
            let every = Duration::from_secs_f64(CONNS as f64 / rate as f64);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in 0..(rate * secs / CONNS) {
                tick.tick().await;
                let id = uuid::Uuid::new_v4().to_string();
                c.execute(&ins, &[&id, &format!("{tag}{w}-{i}")])
                    .await
                    .unwrap();
                let now = Instant::now();
                times.lock().unwrap().committed.insert(id, now);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn percentiles(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] * 1000.0;
    format!(
        "n={} p50={:.1}ms p90={:.1}ms p99={:.1}ms max={:.1}ms",
        v.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "lag probe: run in release with --ignored --nocapture"]
async fn steady_writes_both_ways_commit_to_visible_lag() {
    let rate = env_or("GSB_PERF_RATE", 1000);
    let secs = env_or("GSB_PERF_SECS", 10);
    let (ps, bs, config) = pair().await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    install(&config, &p, &b).await;
    let stop = CancellationToken::new();
    // Rows written on the primary become visible on the backup, and the other way round.
    let p2b = Arc::new(Mutex::new(Times::default()));
    let b2p = Arc::new(Mutex::new(Times::default()));
    let l1 = visibility_listener(&config.backup_dsn, p2b.clone(), stop.clone()).await;
    let l2 = visibility_listener(&config.primary_dsn, b2p.clone(), stop.clone()).await;
    let r = start(&config);
    wait_until(Duration::from_secs(30), "heartbeats crossing", || async {
        count(&p, "SELECT count(*) FROM gsb.heartbeat").await == 2
            && count(&b, "SELECT count(*) FROM gsb.heartbeat").await == 2
    })
    .await;
    let t = Instant::now();
    let w1 = tokio::spawn(writer(
        config.primary_dsn.clone(),
        "p",
        rate,
        secs,
        p2b.clone(),
    ));
    let w2 = tokio::spawn(writer(
        config.backup_dsn.clone(),
        "b",
        rate,
        secs,
        b2p.clone(),
    ));
    w1.await.unwrap();
    w2.await.unwrap();
    let wrote = t.elapsed().as_secs_f64();
    let expect = (rate * secs / 4 * 4) as usize;
    wait_until(Duration::from_secs(120), "every row visible", || async {
        p2b.lock().unwrap().visible.len() >= expect && b2p.lock().unwrap().visible.len() >= expect
    })
    .await;
    stop.cancel();
    for (client, task) in [l1, l2] {
        task.await.unwrap();
        drop(client);
    }
    r.shutdown().await;
    for (name, times) in [("primary_to_backup", &p2b), ("backup_to_primary", &b2p)] {
        let t = times.lock().unwrap();
        let lags: Vec<f64> = t
            .committed
            .iter()
            .filter_map(|(id, c)| {
                t.visible
                    .get(id)
                    .map(|v| v.saturating_duration_since(*c).as_secs_f64())
            })
            .collect();
        assert_eq!(lags.len(), expect, "{name}: every committed row seen");
        println!(
            "{name}: {:.0} writes/s offered over {wrote:.1}s; commit-to-visible {}",
            expect as f64 / wrote,
            percentiles(lags)
        );
    }
    assert!(verify(&config).await.unwrap().is_equal());
}
