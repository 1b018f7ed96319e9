//! Benchmarks 3 (replication: gsb and Bucardo two way, pglogical one way) and 4 (config copy).
//!
//! Lag is commit-to-visible, measured by this process with one clock: a writer records when its
//! INSERT's commit is acknowledged on site A; an `ENABLE ALWAYS` trigger on site B (it also fires
//! in replica sessions, so for pglogical's apply and gsb's alike) sends `NOTIFY bench, <id>`, and
//! a listener on B records when the notification arrives (it is sent when the apply commits).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use gsb_tests::pg::{connect, Cluster, ClusterOptions};
use gsb_tests::{free_port, gsb_bin, Proc};

use crate::procstat;
use crate::report::Report;
use crate::Scale;

/// The reference site's tables (the shapes the replicator is specified against).
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS users (id uuid PRIMARY KEY, email text, name text,
  created_at timestamptz, updated_at timestamptz);
CREATE TABLE IF NOT EXISTS meetings (id uuid PRIMARY KEY, host_id uuid, topic text,
  start_time timestamptz, duration_minutes int, status text, created_at timestamptz,
  updated_at timestamptz);
CREATE TABLE IF NOT EXISTS site_config (key text PRIMARY KEY, value text);
CREATE TABLE IF NOT EXISTS custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE IF NOT EXISTS client_versions (platform text PRIMARY KEY, version text,
  download_url text);
CREATE TABLE IF NOT EXISTS usage_records (id uuid PRIMARY KEY, meeting_id uuid, user_id uuid,
  kind text, minutes int, site text, recorded_at timestamptz);
";

/// The visibility probe (see the module doc).
pub(crate) const NOTIFY_TRIGGER: &str = "
CREATE OR REPLACE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN
    PERFORM pg_notify('bench', CASE TG_OP WHEN 'UPDATE' THEN NEW.name ELSE NEW.id::text END);
    RETURN NULL;
  END $$;
DROP TRIGGER IF EXISTS bench_notify ON users;
CREATE TRIGGER bench_notify AFTER INSERT OR UPDATE ON users FOR EACH ROW EXECUTE FUNCTION bench_notify();
ALTER TABLE users ENABLE ALWAYS TRIGGER bench_notify;
";

/// Two PostgreSQL servers with database `site` and the site tables.
pub(crate) struct Pair {
    pub(crate) primary: Cluster,
    pub(crate) backup: Cluster,
}

impl Pair {
    pub(crate) async fn start(settings: Vec<(String, String)>) -> anyhow::Result<Pair> {
        let mk = move |s: Vec<(String, String)>| -> anyhow::Result<Cluster> {
            let mut c = Cluster::init(ClusterOptions {
                fsync: false,
                settings: s,
                ..ClusterOptions::default()
            })?;
            c.start()?;
            c.create_database("site")?;
            Ok(c)
        };
        let s2 = settings.clone();
        let a = tokio::task::spawn_blocking(move || mk(settings));
        let b = tokio::task::spawn_blocking(move || mk(s2));
        let pair = Pair {
            primary: a.await??,
            backup: b.await??,
        };
        for c in [&pair.primary, &pair.backup] {
            connect(&c.dsn("site")).await.batch_execute(TABLES).await?;
        }
        Ok(pair)
    }
}

/// The gsb replicator as a child process.
struct Replicator {
    config: PathBuf,
    status_url: String,
    proc: Option<Proc>,
    _dir: tempfile::TempDir,
}

impl Replicator {
    /// `gsb replicator` on `pair` with default settings but `capture` (`logical`, `triggers`).
    fn new(pair: &Pair, capture: &str) -> anyhow::Result<Replicator> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let config = dir.path().join("gsb.toml");
        std::fs::write(
            &config,
            format!(
                "[replicator]\nprimary_dsn = \"{}\"\nbackup_dsn = \"{}\"\nmetrics_listen = \"127.0.0.1:{port}\"\ncapture = \"{capture}\"\n",
                pair.primary.dsn("site"),
                pair.backup.dsn("site")
            ),
        )?;
        Ok(Replicator {
            config,
            status_url: format!("http://127.0.0.1:{port}/status"),
            proc: None,
            _dir: dir,
        })
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        self.proc = Some(Proc::spawn(
            "gsb-replicator",
            Command::new(gsb_bin())
                .args(["replicator", "--config"])
                .arg(&self.config)
                .env("RUST_LOG", "warn"),
        ));
        let end = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        loop {
            let active = match client
                .get(&self.status_url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
            {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .map(|v| v["active"] == serde_json::Value::Bool(true))
                    .unwrap_or(false),
                Err(_) => false,
            };
            if active {
                return Ok(());
            }
            if Instant::now() > end {
                let tail = self.proc.as_ref().map(|p| p.tail(30)).unwrap_or_default();
                bail!("gsb replicator not active within 30 s: {tail}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
    }
}

/// When each written id was acknowledged and when it became visible on the other site.
#[derive(Default)]
struct Times {
    acked: HashMap<Uuid, Instant>,
    seen: HashMap<Uuid, Instant>,
}

/// Listens for `bench` notifications on `dsn` and records arrival times into `times`.
async fn listen(
    dsn: &str,
    times: Arc<Mutex<Times>>,
    tracker: &TaskTracker,
) -> anyhow::Result<Client> {
    let (client, mut conn) = tokio_postgres::connect(dsn, NoTls).await?;
    let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tracker.spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if let AsyncMessage::Notification(n) = msg {
                if let Ok(id) = n.payload().parse::<Uuid>() {
                    times
                        .lock()
                        .expect("times lock")
                        .seen
                        .entry(id)
                        .or_insert_with(Instant::now);
                }
            }
        }
    });
    client.batch_execute("LISTEN bench").await?;
    Ok(client)
}

/// What a lag run writes.
#[derive(Clone)]
enum Writes {
    /// New users, each known by its id.
    Inserts,
    /// The name of these users, in turn, each write known by the new name (a fresh uuid).
    Updates(Arc<Vec<Uuid>>),
    /// Both in turn: a new user, then an update of one of these (a meeting service creates
    /// rows and changes recent ones), so a batch holds both.
    Mixed(Arc<Vec<Uuid>>),
}

/// Writes `rate` users per second for `dur` on `dsn` (4 connections, open loop); records acks.
async fn write_load(
    dsn: &str,
    tag: &str,
    rate: f64,
    dur: Duration,
    times: Arc<Mutex<Times>>,
) -> anyhow::Result<u64> {
    write_load_of(dsn, tag, Writes::Inserts, rate, dur, times).await
}

async fn write_load_of(
    dsn: &str,
    tag: &str,
    writes: Writes,
    rate: f64,
    dur: Duration,
    times: Arc<Mutex<Times>>,
) -> anyhow::Result<u64> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(connect(dsn).await));
    }
    let n = (rate * dur.as_secs_f64()) as u64;
    let tracker = TaskTracker::new();
    let start = tokio::time::Instant::now();
    const INSERT: &str = "INSERT INTO users (id, email, name, created_at, updated_at) \
                          VALUES ($1, $2, 'bench', now(), now())";
    const UPDATE: &str = "UPDATE users SET name = $2, updated_at = now() WHERE id = $1";
    // Per connection: the statement of even writes, then of odd ones.
    let sql = match writes {
        Writes::Inserts => [INSERT, INSERT],
        Writes::Updates(_) => [UPDATE, UPDATE],
        Writes::Mixed(_) => [INSERT, UPDATE],
    };
    let mut stmts = Vec::new();
    for c in &clients {
        stmts.push([c.prepare(sql[0]).await?, c.prepare(sql[1]).await?]);
    }
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let k = (i % 4) as usize;
        let (c, s, times, errors) = (
            clients[k].clone(),
            stmts[k][(i % 2) as usize].clone(),
            times.clone(),
            errors.clone(),
        );
        let fresh = Uuid::new_v4();
        // The row, the value the statement writes, and what the probe will report.
        let (row, value, known) = match &writes {
            Writes::Inserts => (fresh, format!("{tag}-{i}@bench"), fresh),
            Writes::Updates(ids) => (ids[i as usize % ids.len()], fresh.to_string(), fresh),
            Writes::Mixed(_) if i % 2 == 0 => (fresh, format!("{tag}-{i}@bench"), fresh),
            Writes::Mixed(ids) => (ids[i as usize / 2 % ids.len()], fresh.to_string(), fresh),
        };
        tracker.spawn(async move {
            match c.execute(&s, &[&row, &value]).await {
                Ok(1) => {
                    times
                        .lock()
                        .expect("times lock")
                        .acked
                        .insert(known, Instant::now());
                }
                _ => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(errors.load(std::sync::atomic::Ordering::Relaxed))
}

/// Lag percentiles in ms (p50, p99) and the number of rows never seen within the deadline.
async fn lag_of(times: &Arc<Mutex<Times>>, deadline: Duration) -> (f64, f64, u64) {
    let end = Instant::now() + deadline;
    loop {
        let done = {
            let t = times.lock().expect("times lock");
            t.acked.keys().all(|k| t.seen.contains_key(k))
        };
        if done || Instant::now() > end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = times.lock().expect("times lock");
    let mut h =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let mut missing = 0;
    for (id, a) in &t.acked {
        match t.seen.get(id) {
            Some(s) => {
                let _ = h.record((s.saturating_duration_since(*a).as_micros() as u64).max(1));
            }
            None => missing += 1,
        }
    }
    (
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        missing,
    )
}

/// Per direction: (name, (lag p50 ms, lag p99 ms, rows never seen)).
pub(crate) type DirLags = Vec<(&'static str, (f64, f64, u64))>;

/// One lag run: writes at `rate` on the primary (and on the backup if `both`), returns per
/// direction (p50, p99, missing).
pub(crate) async fn lag_run(
    pair: &Pair,
    rate: f64,
    dur: Duration,
    both: bool,
    tag: &str,
) -> anyhow::Result<DirLags> {
    let tracker = TaskTracker::new();
    let p2b = Arc::new(Mutex::new(Times::default()));
    let b2p = Arc::new(Mutex::new(Times::default()));
    let _lb = listen(&pair.backup.dsn("site"), p2b.clone(), &tracker).await?;
    let _lp = listen(&pair.primary.dsn("site"), b2p.clone(), &tracker).await?;
    let (pd, bd) = (pair.primary.dsn("site"), pair.backup.dsn("site"));
    let (ptag, btag) = (format!("{tag}-p"), format!("{tag}-b"));
    let w1 = write_load(&pd, &ptag, rate, dur, p2b.clone());
    let w2 = async {
        if both {
            write_load(&bd, &btag, rate, dur, b2p.clone()).await
        } else {
            Ok(0)
        }
    };
    let (e1, e2) = tokio::join!(w1, w2);
    let (e1, e2) = (e1?, e2?);
    if e1 + e2 > 0 {
        bail!("{} writes failed", e1 + e2);
    }
    let deadline = Duration::from_secs(30);
    let mut out = vec![("primary_to_backup", lag_of(&p2b, deadline).await)];
    if both {
        out.push(("backup_to_primary", lag_of(&b2p, deadline).await));
    }
    drop((_lb, _lp));
    tracker.close();
    Ok(out)
}

/// One-way lag of updates at `rate`: `rate * dur` users are inserted on the primary and
/// awaited on the backup first, then each is updated once (open loop), each update's commit
/// to its arrival on the backup. `mixed`: half the writes are inserts of new users, in turn
/// with the updates (of half as many seeded users).
pub(crate) async fn update_lag_run(
    pair: &Pair,
    rate: f64,
    dur: Duration,
    tag: &str,
    mixed: bool,
) -> anyhow::Result<DirLags> {
    let n = (rate * dur.as_secs_f64()) as i64 / if mixed { 2 } else { 1 };
    let (p, b) = (
        connect(&pair.primary.dsn("site")).await,
        connect(&pair.backup.dsn("site")).await,
    );
    let pattern = format!("{tag}-%@seed");
    let ids: Vec<Uuid> = p
        .query(
            "INSERT INTO users (id, email, name, created_at, updated_at) \
             SELECT gen_random_uuid(), $1 || g || '@seed', 'seed', now(), now() \
             FROM generate_series(1, $2::int8) g RETURNING id",
            &[&format!("{tag}-"), &n],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let there: i64 = b
            .query_one(
                "SELECT count(*) FROM users WHERE email LIKE $1",
                &[&pattern],
            )
            .await?
            .get(0);
        if there == n {
            break;
        }
        if Instant::now() > end {
            bail!("{there} of {n} seeded rows reached the backup in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tracker = TaskTracker::new();
    let times = Arc::new(Mutex::new(Times::default()));
    let _l = listen(&pair.backup.dsn("site"), times.clone(), &tracker).await?;
    let ids = Arc::new(ids);
    let errors = write_load_of(
        &pair.primary.dsn("site"),
        tag,
        match mixed {
            true => Writes::Mixed(ids),
            false => Writes::Updates(ids),
        },
        rate,
        dur,
        times.clone(),
    )
    .await?;
    if errors > 0 {
        bail!("{errors} writes failed");
    }
    let out = vec![(
        "primary_to_backup",
        lag_of(&times, Duration::from_secs(30)).await,
    )];
    drop(_l);
    tracker.close();
    Ok(out)
}

/// The update lag runs of one contender, reported as "lag of updates @rate writes/s one way"
/// (`mixed`: "lag of mixed writes ...", inserts and updates in turn).
pub(crate) async fn update_lag_runs(
    pair: &Pair,
    dur: Duration,
    contender: &str,
    mixed: bool,
    report: &mut Report,
) {
    let what = if mixed { "mixed writes" } else { "updates" };
    for rate in [1000.0, 5000.0] {
        let tag = format!("{}{rate}", if mixed { "x" } else { "u" });
        let res = update_lag_run(pair, rate, dur, &tag, mixed).await;
        match res {
            Ok(dirs) => {
                for (_, (p50, p99, missing)) in dirs {
                    let m = format!("lag of {what} @{rate} writes/s one way");
                    report.put(
                        "replication",
                        &format!("{m} p50"),
                        "ms",
                        true,
                        contender,
                        p50,
                    );
                    report.put(
                        "replication",
                        &format!("{m} p99"),
                        "ms",
                        true,
                        contender,
                        p99,
                    );
                    if missing > 0 {
                        report.note(&format!(
                            "replication: {contender} {what} @{rate}/s: {missing} not visible within 30 s"
                        ));
                    }
                }
            }
            Err(e) => report.note(&format!("replication: {contender} {what} @{rate}/s: {e:#}")),
        }
    }
}

/// Only the pglogical half of the replication benchmark.
pub async fn pglogical_only(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    pglogical(&Params::new(scale), report).await
}

/// pglogical one way, primary (provider) -> backup (subscriber), users table only.
async fn pglogical_setup(pair: &Pair) -> anyhow::Result<()> {
    let p = connect(&pair.primary.dsn("site")).await;
    let b = connect(&pair.backup.dsn("site")).await;
    p.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS pglogical;
         SELECT pglogical.create_node(node_name := 'provider', dsn := '{}');
         SELECT pglogical.replication_set_add_table('default', 'users');",
        pair.primary.dsn("site")
    ))
    .await?;
    b.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS pglogical;
         SELECT pglogical.create_node(node_name := 'subscriber', dsn := '{}');
         SELECT pglogical.create_subscription(subscription_name := 'bench', provider_dsn := '{}',
           synchronize_data := false);",
        pair.backup.dsn("site"),
        pair.primary.dsn("site")
    ))
    .await?;
    // Wait until the subscription replicates.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let st: String = b
            .query_one(
                "SELECT status FROM pglogical.show_subscription_status('bench')",
                &[],
            )
            .await?
            .get(0);
        if st == "replicating" {
            return Ok(());
        }
        if Instant::now() > end {
            let log = |c: &Cluster| {
                let t = std::fs::read_to_string(c.log_path()).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(8)..].join("\n")
            };
            bail!(
                "pglogical subscription status {st:?} after 60 s; subscriber log:\n{}\nprovider log:\n{}",
                log(&pair.backup),
                log(&pair.primary)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `count_sql` on `c` returns at least `n`; returns the time taken.
pub(crate) async fn wait_count(
    c: &Client,
    count_sql: &str,
    n: i64,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    poll_count(c, count_sql, n, deadline, Duration::from_millis(100)).await
}

/// Runs `count_sql` on `c` every `every` until it returns at least `n`; returns the time taken.
async fn poll_count(
    c: &Client,
    count_sql: &str,
    n: i64,
    deadline: Duration,
    every: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let got: i64 = c.query_one(count_sql, &[]).await?.get(0);
        if got >= n {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            bail!("only {got} of {n} rows after {deadline:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until the backlog `tag` of `n` rows (see [`backlog`]) is on `c`: its last row, found
/// by key every 20 ms (a whole-table count that often would take CPU the apply needs), then
/// every row counted once; returns the time until the last row was seen with all of them.
pub(crate) async fn wait_backlog(
    c: &Client,
    tag: &str,
    n: u64,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    let last = format!("SELECT count(*) FROM users WHERE id = md5('{tag}-{n}')::uuid");
    let seen = poll_count(c, &last, 1, deadline, Duration::from_millis(20)).await?;
    let all = poll_count(
        c,
        &count_sql(tag),
        n as i64,
        deadline.saturating_sub(seen),
        Duration::from_millis(100),
    )
    .await?;
    Ok(seen + all)
}

/// Inserts `n` users tagged `tag` on `c` in transactions of 10,000 rows; row `g`'s key is
/// `md5('<tag>-<g>')` (so [`wait_backlog`] finds the last one by key).
pub(crate) async fn backlog(c: &Client, tag: &str, n: u64) -> anyhow::Result<()> {
    let mut done = 0;
    while done < n {
        let k = (n - done).min(10_000);
        c.batch_execute(&format!(
            "INSERT INTO users SELECT md5('{tag}-' || g)::uuid, '{tag}-' || g, 'backlog', now(), now() \
             FROM generate_series({}, {}) g",
            done + 1,
            done + k
        ))
        .await?;
        done += k;
    }
    Ok(())
}

pub(crate) fn count_sql(tag: &str) -> String {
    format!("SELECT count(*) FROM users WHERE email LIKE '{tag}-%'")
}

pub(crate) const RATES: [f64; 3] = [100.0, 1000.0, 5000.0];

/// The sizes of one replication run, shared by every contender so their figures line up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// How long each lag run writes.
    pub(crate) dur: Duration,
    /// Rows of the one-way catch-up backlog.
    pub(crate) big: u64,
    /// Rows of the backlog in each direction for the two-way apply rate.
    pub(crate) each: u64,
    /// Seconds of each pgbench run of the capture overhead.
    pub(crate) pgb_secs: u64,
    /// Rows updated on both sites at once in the conflict run.
    pub(crate) conflicts: u64,
}

impl Params {
    fn new(scale: &Scale) -> Params {
        Params {
            dur: Duration::from_secs(scale.secs(5)),
            big: scale.count(500_000),
            each: scale.count(100_000),
            pgb_secs: scale.secs(5),
            conflicts: scale.count(200),
        }
    }
}

/// Whether `BENCH_PARTS` (a comma-separated list of lag, updates, mixed, conflicts, catch-up,
/// two-way, overhead) selects `part` of a contender's run; unset or empty selects every part.
pub(crate) fn part(part: &str) -> bool {
    env_selects("BENCH_PARTS", part)
}

/// Whether `BENCH_ONLY` (a comma-separated list of gsb, pglogical, bucardo) selects `who`;
/// unset or empty selects every contender.
pub(crate) fn wanted(who: &str) -> bool {
    env_selects("BENCH_ONLY", who)
}

/// Whether the comma-separated list in `var` names `name` (any case); unset or empty: yes.
fn env_selects(var: &str, name: &str) -> bool {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|w| w.trim().eq_ignore_ascii_case(name)),
        _ => true,
    }
}

/// Records the figures of one lag run of `contender` under the metric names every contender uses.
pub(crate) fn put_lag(
    report: &mut Report,
    contender: &str,
    rate: f64,
    both: bool,
    res: anyhow::Result<DirLags>,
) {
    let how = if both { "each way at once" } else { "one way" };
    match res {
        Ok(dirs) => {
            for (dir, (p50, p99, missing)) in dirs {
                let m = format!("lag @{rate} writes/s {how}");
                let (m50, m99) = if both {
                    (format!("{m} p50 ({dir})"), format!("{m} p99 ({dir})"))
                } else {
                    (format!("{m} p50"), format!("{m} p99"))
                };
                report.put("replication", &m50, "ms", true, contender, p50);
                report.put("replication", &m99, "ms", true, contender, p99);
                if missing > 0 {
                    let col = if both {
                        format!("{contender} {dir}")
                    } else {
                        contender.to_owned()
                    };
                    report.note(&format!(
                        "replication: {col} @{rate}/s {how}: {missing} rows not visible within 30 s"
                    ));
                }
            }
        }
        Err(e) => report.note(&format!("replication: {contender} @{rate}/s {how}: {e:#}")),
    }
}

/// Records a catch-up of `big` rows that took `t` (or failed).
pub(crate) fn put_catch_up(
    report: &mut Report,
    contender: &str,
    big: u64,
    t: anyhow::Result<Duration>,
) {
    match t {
        Ok(t) => {
            report.put(
                "replication",
                &format!("catch-up of {big} rows"),
                "s",
                true,
                contender,
                t.as_secs_f64(),
            );
            report.put(
                "replication",
                "catch-up rate",
                "rows/s",
                false,
                contender,
                big as f64 / t.as_secs_f64(),
            );
        }
        Err(e) => report.note(&format!("replication: {contender} catch-up: {e:#}")),
    }
}

/// Waits for `each` rows of a backlog in both directions at once and records each direction's
/// apply rate.
pub(crate) async fn two_way_apply(
    pair: &Pair,
    each: u64,
    report: &mut Report,
    contender: &str,
) -> anyhow::Result<()> {
    let pc = connect(&pair.primary.dsn("site")).await;
    let bc = connect(&pair.backup.dsn("site")).await;
    let (r1, r2) = tokio::join!(
        wait_backlog(&bc, "ap", each, Duration::from_secs(300)),
        wait_backlog(&pc, "ab", each, Duration::from_secs(300)),
    );
    for (dir, r) in [("primary_to_backup", r1), ("backup_to_primary", r2)] {
        match r {
            Ok(t) => report.put(
                "replication",
                &format!("apply rate, both ways at once ({dir})"),
                "rows/s",
                false,
                contender,
                each as f64 / t.as_secs_f64(),
            ),
            Err(e) => report.note(&format!("replication: {contender} apply rate {dir}: {e:#}")),
        }
    }
    Ok(())
}

/// Both capture overhead figures of `contender` (`off`: what its capture off is): with
/// everything sharing both cores, then with the writer's server and pgbench on core 0 and the
/// replication side (the other site's server, the replicator or Bucardo's daemons) on core 1,
/// as when the other site runs on its own machine: what the capture itself costs the writer.
pub(crate) async fn overheads(
    pair: &Pair,
    secs: u64,
    capture: &mut impl Capture,
    report: &mut Report,
    contender: &str,
    off: &str,
) {
    // Pinning needs taskset and pgrep (util-linux, procps); without them the figure would be
    // an unpinned one under the pinned name.
    let can_pin = ["taskset", "pgrep"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    for pinned in [false, true] {
        if pinned && !can_pin {
            report.note(&format!(
                "replication: {contender}: capture overhead not measured pinned (taskset or pgrep missing)"
            ));
            continue;
        }
        let res = capture_overhead(pair, secs, capture, pinned).await;
        put_overhead(report, contender, off, res, pinned);
    }
    pin_tree(pair.primary.pid(), "0-1");
    pin_tree(pair.backup.pid(), "0-1");
}

/// Records the pgbench A/B of [`capture_overhead`] (or its failure).
fn put_overhead(
    report: &mut Report,
    contender: &str,
    off: &str,
    res: anyhow::Result<(f64, f64)>,
    pinned: bool,
) {
    let how = if pinned {
        " (writer on core 0, replication side on core 1)"
    } else {
        ""
    };
    match res {
        Ok((with, without)) => {
            report.put(
                "replication",
                &format!("pgbench tps while capturing (streaming to the other site){how}"),
                "tps",
                false,
                contender,
                with,
            );
            report.put(
                "replication",
                &format!("pgbench tps with the capture off (baseline){how}"),
                "tps",
                false,
                contender,
                without,
            );
            report.note(&format!(
                "replication: {contender} capture off = {off}{how}: {without:.0} tps vs {with:.0} capturing"
            ));
            report.put(
                "replication",
                &format!("capture overhead{how}"),
                "%",
                true,
                contender,
                (1.0 - with / without) * 100.0,
            );
        }
        Err(e) => report.note(&format!(
            "replication: {contender} capture overhead{how}: {e:#}"
        )),
    }
}

/// Sets the CPU affinity of `pid` (its threads too) and of every process below it to `cpus`
/// (a `taskset` list); processes forked later inherit it.
fn pin_tree(pid: Option<u32>, cpus: &str) {
    let Some(pid) = pid else { return };
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output();
    if let Ok(out) = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
    {
        for child in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
        {
            pin_tree(Some(child), cpus);
        }
    }
}

/// The replication side on core 1: the other site's server, and the replicator's or
/// Bucardo's processes (started anew by each `Capture::on`).
fn pin_replication_side(pair: &Pair) {
    pin_tree(pair.backup.pid(), "1");
    for pattern in ["gsb replicator", "[Bb]ucardo"] {
        if let Ok(out) = Command::new("pgrep").args(["-f", pattern]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
            {
                pin_tree(Some(pid), "1");
            }
        }
    }
}

/// Conflicts converging: `n` rows inserted on the primary and replicated, then each updated on
/// both sites at about the same time (the two UPDATEs sent at once, one row after the other).
/// Returns how many rows ended equal on both sites (holding one of the two written values) and
/// the time from the last UPDATE until all were equal (or until the deadline of 60 s).
pub(crate) async fn conflicts(pair: &Pair, n: u64) -> anyhow::Result<(u64, Duration)> {
    let pc = connect(&pair.primary.dsn("site")).await;
    let bc = connect(&pair.backup.dsn("site")).await;
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let ins = pc
        .prepare(
            "INSERT INTO users (id, email, name, created_at, updated_at) \
             SELECT i, 'cf-' || i::text, 'cf', now(), now() FROM unnest($1::uuid[]) i",
        )
        .await?;
    pc.execute(&ins, &[&ids]).await?;
    wait_count(
        &bc,
        "SELECT count(*) FROM users WHERE email LIKE 'cf-%'",
        n as i64,
        Duration::from_secs(60),
    )
    .await
    .context("the conflict rows did not reach the backup")?;
    let sql = "UPDATE users SET name = $1, updated_at = now() WHERE id = $2";
    let (ps, bs) = (pc.prepare(sql).await?, bc.prepare(sql).await?);
    for (i, id) in ids.iter().enumerate() {
        let (a, b) = (format!("a-{i}"), format!("b-{i}"));
        let (pa, pb): ([&(dyn ToSql + Sync); 2], [&(dyn ToSql + Sync); 2]) = ([&a, id], [&b, id]);
        let (ra, rb) = tokio::join!(pc.execute(&ps, &pa), bc.execute(&bs, &pb));
        ra?;
        rb?;
    }
    let start = Instant::now();
    let read = "SELECT id, name FROM users WHERE id = ANY($1)";
    loop {
        let params: [&(dyn ToSql + Sync); 1] = [&ids];
        let (ra, rb) = tokio::join!(pc.query(read, &params), bc.query(read, &params));
        let a: HashMap<Uuid, String> = ra?.iter().map(|r| (r.get(0), r.get(1))).collect();
        let b: HashMap<Uuid, String> = rb?.iter().map(|r| (r.get(0), r.get(1))).collect();
        let equal = ids
            .iter()
            .filter(|id| match (a.get(id), b.get(id)) {
                (Some(x), Some(y)) => x == y && x != "cf",
                _ => false,
            })
            .count() as u64;
        if equal == n || start.elapsed() > Duration::from_secs(60) {
            return Ok((equal, start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records the conflict run of `contender`.
pub(crate) fn put_conflicts(
    report: &mut Report,
    contender: &str,
    n: u64,
    res: anyhow::Result<(u64, Duration)>,
) {
    match res {
        Ok((equal, t)) => {
            report.put(
                "replication",
                &format!("conflicts converged (of {n} rows updated on both sites at once)"),
                "rows",
                false,
                contender,
                equal as f64,
            );
            if equal == n {
                report.put(
                    "replication",
                    "conflicts: last update -> both sites equal",
                    "s",
                    true,
                    contender,
                    t.as_secs_f64(),
                );
            } else {
                report.note(&format!(
                    "replication: {contender} conflicts: only {equal} of {n} rows equal on both sites after {t:?}"
                ));
            }
        }
        Err(e) => report.note(&format!("replication: {contender} conflicts: {e:#}")),
    }
}

/// Drops the visibility probe on both sites (catch-up and apply rates count rows instead).
pub(crate) async fn drop_probe(pair: &Pair) -> anyhow::Result<()> {
    for c in [&pair.primary, &pair.backup] {
        connect(&c.dsn("site"))
            .await
            .batch_execute("DROP TRIGGER IF EXISTS bench_notify ON users")
            .await?;
    }
    Ok(())
}

/// Installs the visibility probe on both sites.
pub(crate) async fn add_probe(pair: &Pair) -> anyhow::Result<()> {
    for c in [&pair.primary, &pair.backup] {
        connect(&c.dsn("site"))
            .await
            .batch_execute(NOTIFY_TRIGGER)
            .await?;
    }
    Ok(())
}

/// Replication lag, apply rate, catch-up, capture overhead, conflicts: gsb and Bucardo two way,
/// pglogical one way, each on a fresh pair of servers. `BENCH_ONLY` picks contenders.
pub async fn replication(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let p = Params::new(scale);
    let Params {
        dur,
        big,
        each,
        pgb_secs,
        conflicts: ncf,
    } = p;
    report.setup(
        "replication",
        &format!(
            "two PostgreSQL 15 servers on this machine (fsync=off, same settings for all), table \
             users(uuid pk, 4 columns). Writers: 4 connections per site, open-loop single-row \
             INSERTs, {dur:?} per rate; lag = commit ack on A -> NOTIFY from an ENABLE ALWAYS \
             trigger on B received (one clock). gsb replicator as `gsb replicator` with default \
             settings. Catch-up: {big} rows inserted (10k-row transactions) with the replicator \
             stopped, then started; time until all visible (the last row polled by key every 20 ms, then all counted). Apply rate: {each} rows backlog in \
             each direction at once. Conflicts: {ncf} replicated rows, each updated on both sites \
             at once (the two UPDATEs sent together, row after row), then the time until every row \
             is equal on both sites. Capture overhead: pgbench -c4 -j2 -T{pgb_secs} (INSERT + \
             UPDATE by key, autocommit) on the primary's database while the contender streams it \
             to the backup vs with its capture off (best of 2 alternating runs each); then again with \
             the primary's server and pgbench on core 0 and the replication side (the backup's \
             server, the replicator, Bucardo's daemons) on core 1 (taskset), as when the other \
             site is its own machine: what the capture costs the writer itself. pglogical 2 \
             one way (provider -> subscriber, users table) at the same rates and with the same \
             backlog; its capture off = subscription disabled. Bucardo two way: see its line."
        ),
    );
    if !["gsb", "gsb-triggers", "pglogical", "bucardo"]
        .iter()
        .any(|w| wanted(w))
    {
        bail!("BENCH_ONLY names no contender: use gsb, gsb-triggers, pglogical and/or bucardo");
    }
    for (who, capture) in [("gsb", "logical"), ("gsb-triggers", "triggers")] {
        if wanted(who) {
            if let Err(e) = gsb(&p, report, who, capture).await {
                report.note(&format!("replication: {who}: {e:#}"));
            }
        }
    }
    if wanted("pglogical") {
        if !Path::new("/usr/lib/postgresql/15/lib/pglogical.so").exists() {
            report.note("replication: pglogical not installed (apt-get install postgresql-15-pglogical); skipped");
        } else if let Err(e) = pglogical(&p, report).await {
            report.note(&format!("replication: pglogical: {e:#}"));
        }
    }
    if wanted("bucardo") {
        if let Err(e) = crate::bucardo::bucardo(&p, report).await {
            report.note(&format!("replication: Bucardo: {e:#}"));
        }
    }
    Ok(())
}

/// gsb two way on a fresh pair with default settings.
/// The lag runs at every rate, one way and each way at once, reported for `contender`; during
/// the each-way runs, the CPU cores each of `pids` used (a coarse profile of where the CPU goes
/// while both directions carry the load). With `metrics` (a gsb replicator's `/metrics`),
/// a note per one-way run says how long its batches took to apply (where the lag goes).
pub(crate) async fn lag_runs(
    pair: &Pair,
    dur: Duration,
    pids: &[(&str, Option<u32>)],
    metrics: Option<&str>,
    contender: &str,
    tag: &str,
    report: &mut Report,
) {
    for rate in RATES {
        for both in [false, true] {
            let batches0 = match (metrics, both) {
                (Some(url), false) => apply_time(url).await,
                _ => None,
            };
            let cpu0: Vec<f64> = pids
                .iter()
                .map(|(_, p)| p.map(procstat::cpu_seconds).unwrap_or(0.0))
                .collect();
            let t0 = Instant::now();
            let res = lag_run(pair, rate, dur, both, &format!("{tag}{rate}{both}")).await;
            if both {
                let secs = t0.elapsed().as_secs_f64();
                for ((name, p), c0) in pids.iter().zip(cpu0) {
                    if let Some(p) = p {
                        let used = (procstat::cpu_seconds(*p) - c0) / secs;
                        let m = format!("CPU cores used @{rate} writes/s each way: {name}");
                        report.put("replication", &m, "cores", true, contender, used);
                    }
                }
            }
            put_lag(report, contender, rate, both, res);
            if let (Some((s0, n0)), Some(url)) = (batches0, metrics) {
                if let Some((s1, n1)) = apply_time(url).await {
                    let n = n1 - n0;
                    if n > 0.0 {
                        report.note(&format!(
                            "replication: {contender} @{rate} writes/s one way: {n} batches, \
                             {:.0} µs each to apply on average (gsb_replication_batch_duration_seconds)",
                            (s1 - s0) / n * 1e6
                        ));
                    }
                }
            }
        }
    }
}

/// The primary -> backup direction's total apply time (s) and batches, from gsb's metrics.
async fn apply_time(url: &str) -> Option<(f64, f64)> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    let find = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("primary_to_backup"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((
        find("gsb_replication_batch_duration_seconds_sum")?,
        find("gsb_replication_batch_duration_seconds_count")?,
    ))
}

/// gsb (contender `who`) with `capture`, every figure.
async fn gsb(p: &Params, report: &mut Report, who: &str, capture: &str) -> anyhow::Result<()> {
    let Params {
        dur,
        big,
        each,
        pgb_secs,
        conflicts: ncf,
    } = *p;
    let pair = Pair::start(Vec::new()).await?;
    let mut repl = Replicator::new(&pair, capture)?;
    repl.start().await?;
    add_probe(&pair).await?;
    let pids = [
        ("replicator", repl.proc.as_ref().map(Proc::pid)),
        ("primary PostgreSQL", pair.primary.pid()),
        ("backup PostgreSQL", pair.backup.pid()),
    ];
    if part("lag") {
        let metrics = repl.status_url.replace("/status", "/metrics");
        lag_runs(&pair, dur, &pids, Some(&metrics), who, "g", report).await;
    }
    if part("updates") {
        update_lag_runs(&pair, dur, who, false, report).await;
    }
    if part("mixed") {
        update_lag_runs(&pair, dur, who, true, report).await;
    }
    if part("conflicts") {
        let res = conflicts(&pair, ncf).await;
        put_conflicts(report, who, ncf, res);
    }
    // Catch-up and apply rates: no visibility probe needed.
    drop_probe(&pair).await?;
    let pc = connect(&pair.primary.dsn("site")).await;
    let bc = connect(&pair.backup.dsn("site")).await;
    repl.stop();
    if part("catch-up") {
        backlog(&pc, "cu", big).await?;
        repl.start().await?;
        let t = wait_backlog(&bc, "cu", big, Duration::from_secs(600)).await;
        put_catch_up(report, who, big, t);
        repl.stop();
    }
    if part("two-way") {
        tokio::try_join!(backlog(&pc, "ap", each), backlog(&bc, "ab", each))?;
        repl.start().await?;
        two_way_apply(&pair, each, report, who).await?;
        repl.stop();
    }
    if !part("overhead") {
        return Ok(());
    }
    // Capture overhead on the primary's server: the same database with the replicator
    // streaming it (logical decoding, or the triggers, of every write, applied on the backup)
    // vs stopped (and the triggers disabled: as if gsb were not installed).
    if capture == "triggers" {
        let primary = connect(&pair.primary.dsn("site")).await;
        let mut off = TriggersOff {
            repl: &mut repl,
            primary,
        };
        let off_is = "replicator stopped, capture trigger on users disabled";
        overheads(&pair, pgb_secs, &mut off, report, who, off_is).await;
    } else {
        overheads(
            &pair,
            pgb_secs,
            &mut repl,
            report,
            who,
            "replicator stopped",
        )
        .await;
    }
    Ok(())
}

/// A capture that [`capture_overhead`] turns on and off between pgbench runs.
pub(crate) trait Capture {
    /// Capturing and streaming to the other site.
    async fn on(&mut self) -> anyhow::Result<()>;
    /// Not capturing.
    async fn off(&mut self) -> anyhow::Result<()>;
}

impl Capture for Replicator {
    async fn on(&mut self) -> anyhow::Result<()> {
        self.start().await
    }

    async fn off(&mut self) -> anyhow::Result<()> {
        self.stop();
        Ok(())
    }
}

/// gsb's trigger capture: off = replicator stopped and the capture trigger on the primary's
/// users disabled.
struct TriggersOff<'a> {
    repl: &'a mut Replicator,
    primary: Client,
}

impl Capture for TriggersOff<'_> {
    async fn on(&mut self) -> anyhow::Result<()> {
        self.primary
            .batch_execute("ALTER TABLE users ENABLE TRIGGER gsb_capture")
            .await?;
        self.repl.start().await
    }

    async fn off(&mut self) -> anyhow::Result<()> {
        self.repl.stop();
        self.primary
            .batch_execute("ALTER TABLE users DISABLE TRIGGER gsb_capture")
            .await?;
        Ok(())
    }
}

/// pglogical's subscription on the backup: enabled streams, disabled does not decode.
struct PglogicalSub(Client);

impl Capture for PglogicalSub {
    async fn on(&mut self) -> anyhow::Result<()> {
        self.0
            .batch_execute("SELECT pglogical.alter_subscription_enable('bench', true)")
            .await?;
        Ok(())
    }

    async fn off(&mut self) -> anyhow::Result<()> {
        self.0
            .batch_execute("SELECT pglogical.alter_subscription_disable('bench', true)")
            .await?;
        Ok(())
    }
}

async fn pglogical(p: &Params, report: &mut Report) -> anyhow::Result<()> {
    let Params {
        dur, big, pgb_secs, ..
    } = *p;
    let s = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let mut settings = vec![
        s("wal_level", "logical"),
        s("shared_preload_libraries", "pglogical"),
        s("max_worker_processes", "16"),
        s("max_replication_slots", "10"),
        s("max_wal_senders", "10"),
        s("track_commit_timestamp", "on"),
    ];
    // Some Debian builds only load trusted output plugins (pglogical brings its own); others
    // do not know the setting and refuse to start with it.
    let knows = Command::new(Cluster::find_bin_dir()?.join("postgres"))
        .arg("--describe-config")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("output_plugin_libraries"))
        .unwrap_or(false);
    if knows {
        settings.push(s(
            "output_plugin_libraries",
            "pgoutput, test_decoding, pglogical_output",
        ));
    }
    let pair = Pair::start(settings).await?;
    pglogical_setup(&pair).await?;
    add_probe(&pair).await?;
    if part("lag") {
        for rate in RATES {
            let res = lag_run(&pair, rate, dur, false, &format!("l{rate}")).await;
            put_lag(report, "pglogical", rate, false, res);
        }
    }
    if part("updates") {
        update_lag_runs(&pair, dur, "pglogical", false, report).await;
    }
    if part("mixed") {
        update_lag_runs(&pair, dur, "pglogical", true, report).await;
    }
    drop_probe(&pair).await?;
    let pc = connect(&pair.primary.dsn("site")).await;
    let bc = connect(&pair.backup.dsn("site")).await;
    let mut sub = PglogicalSub(connect(&pair.backup.dsn("site")).await);
    if part("catch-up") {
        sub.off().await?;
        backlog(&pc, "cu", big).await?;
        sub.on().await?;
        let t = wait_backlog(&bc, "cu", big, Duration::from_secs(600)).await;
        put_catch_up(report, "pglogical", big, t);
    }
    if !part("overhead") {
        return Ok(());
    }
    let off_is = "subscription disabled";
    overheads(&pair, pgb_secs, &mut sub, report, "pglogical", off_is).await;
    Ok(())
}

/// pgbench tps on the primary while `capture` streams it to the other site, and while it is
/// off (alternating, best of two runs each); leaves the capture off. `pinned`: the primary's
/// server and pgbench on core 0, the replication side on core 1.
async fn capture_overhead(
    pair: &Pair,
    secs: u64,
    capture: &mut impl Capture,
    pinned: bool,
) -> anyhow::Result<(f64, f64)> {
    let server = &pair.primary;
    if pinned {
        pin_tree(server.pid(), "0");
        pin_replication_side(pair);
    }
    let seed = "INSERT INTO users SELECT md5(g::text)::uuid, 'seed-' || g, 'seed', now(), now() \
                FROM generate_series(1, 10000) g ON CONFLICT DO NOTHING";
    connect(&server.dsn("site"))
        .await
        .batch_execute(seed)
        .await?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("bench.sql");
    std::fs::write(
        &script,
        "\\set k random(1, 10000)\n\
         INSERT INTO users (id, email, name, created_at, updated_at) VALUES (gen_random_uuid(), 'pgb-' || :k, 'n', now(), now());\n\
         UPDATE users SET name = 'u' || :k, updated_at = now() WHERE id = md5(:k::text)::uuid;\n",
    )?;
    let bin = Cluster::find_bin_dir()?.join("pgbench");
    let run = |db: &str| -> anyhow::Result<f64> {
        let mut cmd = if pinned {
            let mut c = Command::new("taskset");
            c.args(["-c", "0"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let out = cmd
            .args(["-n", "-c4", "-j2", &format!("-T{secs}"), "-h", "127.0.0.1"])
            .args([
                "-p",
                &server.port().to_string(),
                "-U",
                server.superuser(),
                "-f",
            ])
            .arg(&script)
            .arg(db)
            .output()
            .context("running pgbench")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| {
                format!(
                    "pgbench printed no tps: {text} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    };
    // Alternate and keep the better of two runs each, so a neighbour's burst hurts neither side alone.
    let mut with: f64 = 0.0;
    let mut without: f64 = 0.0;
    for _ in 0..2 {
        capture.off().await?;
        without = without.max(run("site")?);
        capture.on().await?;
        if pinned {
            pin_replication_side(pair);
        }
        // Let it catch up with what the stopped run wrote before measuring.
        tokio::time::sleep(Duration::from_secs(3)).await;
        with = with.max(run("site")?);
    }
    capture.off().await?;
    Ok((with, without))
}

/// Config copy of 100k rows: `gsb copy-config` vs pg_dump | psql of the same tables.
pub async fn config_copy(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let n = scale.count(100_000);
    report.setup(
        "config",
        &format!(
            "{n} rows in site_config (key text pk, value md5 text) + 10 custom_pages + 5 \
             client_versions on the primary, two servers on this machine (fsync=off); wall time of \
             `gsb copy-config` (snapshot, replace, checksum verify) vs `pg_dump -a | psql` into \
             truncated tables (no verification)."
        ),
    );
    let pair = Pair::start(Vec::new()).await?;
    let pc = connect(&pair.primary.dsn("site")).await;
    pc.batch_execute(&format!(
        "INSERT INTO site_config SELECT 'key-' || g, md5(g::text) FROM generate_series(1, {n}) g;
         INSERT INTO custom_pages SELECT '/p' || g, 'title ' || g, repeat('body ', 50) FROM generate_series(1, 10) g;
         INSERT INTO client_versions SELECT 'os' || g, '1.' || g, 'https://dl/' || g FROM generate_series(1, 5) g;"
    ))
    .await?;
    let repl = Replicator::new(&pair, "logical")?;
    let start = Instant::now();
    let out = Command::new(gsb_bin())
        .args(["copy-config", "--config"])
        .arg(&repl.config)
        .env("RUST_LOG", "warn")
        .output()?;
    let t = start.elapsed();
    let bc = connect(&pair.backup.dsn("site")).await;
    let got: i64 = bc
        .query_one("SELECT count(*) FROM site_config", &[])
        .await?
        .get(0);
    if !out.status.success() || got != n as i64 {
        report.note(&format!(
            "config: gsb copy-config failed (exit {:?}, {got} of {n} rows): {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    } else {
        report.put(
            "config",
            &format!("copy + verify {n} rows"),
            "s",
            true,
            "gsb",
            t.as_secs_f64(),
        );
    }
    bc.batch_execute("TRUNCATE site_config, custom_pages, client_versions")
        .await?;
    let bin = Cluster::find_bin_dir()?;
    let start = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{}/pg_dump -a -t site_config -t custom_pages -t client_versions '{}' | {}/psql -q -v ON_ERROR_STOP=1 '{}' >/dev/null",
            bin.display(),
            pair.primary.dsn("site"),
            bin.display(),
            pair.backup.dsn("site")
        ))
        .status()?;
    let t = start.elapsed();
    let got: i64 = bc
        .query_one("SELECT count(*) FROM site_config", &[])
        .await?
        .get(0);
    if st.success() && got == n as i64 {
        report.put(
            "config",
            &format!("copy + verify {n} rows"),
            "s",
            true,
            "pg_dump+psql",
            t.as_secs_f64(),
        );
    } else {
        report.note(&format!("config: pg_dump | psql failed ({got} rows)"));
    }
    Ok(())
}
