//! The logical capture over two real PostgreSQL servers (wal_level = logical): a transaction
//! larger than `logical_decoding_work_mem`, an update that leaves a TOASTed column unchanged,
//! both servers crashed and restarted mid-stream, a column added on both sites while running,
//! a missing prerequisite, and the upgrade from the trigger capture.

use std::time::Duration;

#[macro_use]
mod common;

use common::{count, start, text};

use gsb_replicator::{verify, Config};
use gsb_tests::pg::PgServer;
use gsb_tests::wait_until;
use tokio_util::sync::CancellationToken;

/// Users carry a `bio` large enough to be TOASTed.
const SCHEMA: &str = "
CREATE TABLE users (id uuid PRIMARY KEY, email text, name text, bio text);
CREATE TABLE meetings (id uuid PRIMARY KEY, topic text, status text);
CREATE TABLE site_config (key text PRIMARY KEY, value text);
CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
CREATE TABLE usage_records (id uuid PRIMARY KEY, kind text, minutes int);
";

const WAIT: Duration = Duration::from_secs(30);

async fn equal(config: &Config) -> bool {
    verify(config).await.map(|r| r.is_equal()).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_logical_decoding_work_mem_arrives_whole() {
    let (ps, bs, config) = common::pair(SCHEMA, "").await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    // The smallest setting: the walsender spills any transaction above 64kB to disk.
    p.batch_execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'")
        .await
        .unwrap();
    p.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let r = start(&config);
    common::wait_streaming(&p, &b).await;
    // About 8MB of changes in one transaction: inserts, then updates and deletes of some.
    p.batch_execute(
        "BEGIN; \
         INSERT INTO users (id, email, name) SELECT gen_random_uuid(), 'big' || g, repeat('x', 200) FROM generate_series(1, 30000) g; \
         UPDATE users SET name = 'updated' WHERE email LIKE 'big1%'; \
         DELETE FROM users WHERE email LIKE 'big2%'; \
         COMMIT",
    )
    .await
    .unwrap();
    let want = count(&p, "SELECT count(*) FROM users").await;
    let updated = count(&p, "SELECT count(*) FROM users WHERE name = 'updated'").await;
    // Atomic on the target as on the source: never a part of it.
    wait_until(
        Duration::from_secs(60),
        "the big transaction on the backup",
        || async {
            let n = count(&b, "SELECT count(*) FROM users").await;
            assert!(
                n == 0 || n == want,
                "{n} of {want} rows visible: not atomic"
            );
            n == want
        },
    )
    .await;
    assert_eq!(
        count(&b, "SELECT count(*) FROM users WHERE name = 'updated'").await,
        updated
    );
    assert!(equal(&config).await);
    // The test did exercise the spill path.
    let spilled = count(
        &p,
        "SELECT coalesce(sum(spill_txns), 0)::int8 FROM pg_stat_replication_slots",
    )
    .await;
    assert!(spilled >= 1, "the transaction was not spilled to disk");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_leaving_a_toasted_column_unchanged_keeps_it_on_the_other_site() {
    let (ps, bs, config) = common::pair(SCHEMA, "").await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let r = start(&config);
    common::wait_streaming(&p, &b).await;
    // ~100kB of hex: stored out of line (TOAST).
    p.batch_execute(
        "INSERT INTO users (id, email, bio) SELECT '00000000-0000-0000-0000-000000000001', 'a@x', \
         string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 3000) g",
    )
    .await
    .unwrap();
    let md5 = text(&p, "SELECT md5(bio) FROM users").await.unwrap();
    let external: bool = p
        .query_one(
            "SELECT pg_column_size(bio) < octet_length(bio) OR pg_column_size(bio) > 2000 FROM users",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(external, "bio is TOASTed");
    wait_until(WAIT, "the user on the backup", || async {
        text(&b, "SELECT md5(bio) FROM users").await.as_deref() == Some(md5.as_str())
    })
    .await;
    // Only the email changes: pgoutput sends bio as "unchanged TOAST", not its value.
    p.batch_execute("UPDATE users SET email = 'new@x'")
        .await
        .unwrap();
    wait_until(WAIT, "the new email on the backup", || async {
        text(&b, "SELECT email FROM users").await.as_deref() == Some("new@x")
    })
    .await;
    assert_eq!(
        text(&b, "SELECT md5(bio) FROM users").await.as_deref(),
        Some(md5.as_str()),
        "the unchanged TOASTed column is intact (not NULL)"
    );
    // And the other way, from a row the backup received.
    b.batch_execute("UPDATE users SET name = 'Ann'")
        .await
        .unwrap();
    wait_until(WAIT, "the name on the primary", || async {
        text(&p, "SELECT coalesce(name, '') FROM users")
            .await
            .as_deref()
            == Some("Ann")
    })
    .await;
    assert_eq!(
        text(&p, "SELECT md5(bio) FROM users").await.as_deref(),
        Some(md5.as_str())
    );
    assert!(equal(&config).await);
    r.shutdown().await;
}

/// Writes 60 transactions of 50 users with deterministic ids on the server at `dsn`, each
/// retried until it commits (the server may be crashed meanwhile): idempotent, so a retry
/// after a lost commit acknowledgement adds nothing.
async fn crash_tolerant_writer(dsn: String, tag: &'static str) {
    let mut c = gsb_tests::pg::connect(&dsn).await;
    for i in 0..60 {
        let q = format!(
            "INSERT INTO users (id, email) SELECT md5('{tag}{i}-' || g)::uuid, '{tag}{i}-' || g \
             FROM generate_series(1, 50) g ON CONFLICT (id) DO NOTHING"
        );
        while c.batch_execute(&q).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c = gsb_tests::pg::connect(&dsn).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_servers_crashed_and_restarted_mid_stream_lose_and_duplicate_nothing() {
    let (mut ps, mut bs, config) = common::pair(SCHEMA, "").await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let r = start(&config);
    common::wait_streaming(&p, &b).await;
    drop((p, b));
    let writers = [
        tokio::spawn(crash_tolerant_writer(ps.dsn("site"), "p")),
        tokio::spawn(crash_tolerant_writer(bs.dsn("site"), "b")),
    ];
    // Mid-stream: the target of primary -> backup crashes, then the source does.
    tokio::time::sleep(Duration::from_millis(400)).await;
    bs.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    bs.restart();
    tokio::time::sleep(Duration::from_millis(400)).await;
    ps.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ps.restart();
    for w in writers {
        w.await.unwrap();
    }
    wait_until(
        Duration::from_secs(90),
        "verify equal after the crashes",
        || equal(&config),
    )
    .await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    common::assert_no_loss_no_duplicate([&p, &b], 6000).await;
    r.shutdown().await;
}

both_captures!(a_column_added_on_both_sites_while_running_is_replicated);

async fn a_column_added_on_both_sites_while_running_is_replicated(capture: &str) {
    let (ps, bs, config) = common::pair(SCHEMA, &common::capture_line(capture)).await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let r = start(&config);
    common::wait_streaming(&p, &b).await;
    p.batch_execute(
        "INSERT INTO users (id, email) VALUES ('00000000-0000-0000-0000-000000000001', 'a@x')",
    )
    .await
    .unwrap();
    wait_until(WAIT, "the user on the backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 1
    })
    .await;
    // Additive DDL on both sites (not replicated), then writes that use it.
    for c in [&b, &p] {
        c.batch_execute("ALTER TABLE users ADD COLUMN nickname text")
            .await
            .unwrap();
    }
    p.batch_execute("UPDATE users SET nickname = 'annie'; INSERT INTO users (id, email, nickname) VALUES ('00000000-0000-0000-0000-000000000002', 'b@x', 'bee')")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO users (id, email, nickname) VALUES ('00000000-0000-0000-0000-000000000003', 'c@x', 'cee')")
        .await
        .unwrap();
    wait_until(WAIT, "nicknames on both sites", || async {
        count(
            &b,
            "SELECT count(*) FROM users WHERE nickname IN ('annie', 'bee')",
        )
        .await
            == 2
            && count(&p, "SELECT count(*) FROM users WHERE nickname = 'cee'").await == 1
    })
    .await;
    assert!(equal(&config).await);
    r.shutdown().await;
}

/// Runs the replicator on `p`/`b` and returns the error it stops with.
async fn refused(p: &PgServer, b: &PgServer, extra: &str) -> String {
    for s in [p, b] {
        s.client("site").await.batch_execute(SCHEMA).await.unwrap();
    }
    let config = Config::from_toml_str(&common::config_text(p, b, extra)).unwrap();
    let run = gsb_replicator::run(
        config,
        prometheus::Registry::new(),
        tokio_util::sync::CancellationToken::new(),
    );
    match tokio::time::timeout(WAIT, run).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => panic!("the replicator ended without an error"),
        Err(_) => panic!("the replicator did not refuse to start"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_prerequisite_refuses_the_start_naming_the_setting_and_the_fix() {
    let servers = tokio::task::spawn_blocking(|| {
        [
            PgServer::start_with(&[("wal_level", "replica")]),
            PgServer::start(),
            PgServer::start(),
            PgServer::start_with(&[("track_commit_timestamp", "off")]),
        ]
    })
    .await
    .unwrap();
    let e = refused(&servers[0], &servers[1], "").await;
    assert!(
        e.starts_with("primary: wal_level: is replica;")
            && e.contains("ALTER SYSTEM SET wal_level = logical; then restart the server"),
        "{e}"
    );
    let e = refused(&servers[2], &servers[3], "").await;
    assert!(
        e.starts_with("backup: track_commit_timestamp: is off;")
            && e.contains("ALTER SYSTEM SET track_commit_timestamp = on"),
        "{e}"
    );
    // `gsb check-config --databases` reports the same before any start, site by site; the
    // trigger capture needs none of it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gsb.toml");
    let check = |extra: &str| {
        std::fs::write(&path, common::config_text(&servers[0], &servers[1], extra)).unwrap();
        let out = std::process::Command::new(gsb_tests::gsb_bin())
            .args(["check-config", "--databases", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = check("");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("primary database: primary: wal_level: is replica;")
            && out.contains("ALTER SYSTEM SET wal_level = logical")
            && out.contains("backup database: ok (logical capture)"),
        "{out}"
    );
    let (code, out) = check("capture = \"triggers\"\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("primary database: ok (triggers capture)"),
        "{out}"
    );
    // Nothing was installed on the application's tables.
    let c = servers[0].client("site").await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'gsb_capture'"
        )
        .await,
        0
    );
}

async fn capture_triggers(c: &tokio_postgres::Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'gsb_capture'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_the_trigger_capture_under_writes_keeps_what_its_change_log_holds() {
    let (ps, bs) = common::servers(SCHEMA).await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let triggers = Config::from_toml_str(&common::config_text(
        &ps,
        &bs,
        "capture = \"triggers\"\npoll_interval = \"50ms\"\n",
    ))
    .unwrap();
    let logical = Config::from_toml_str(&common::config_text(&ps, &bs, "")).unwrap();
    let r = start(&triggers);
    common::wait_streaming(&p, &b).await;
    p.batch_execute("INSERT INTO users (id, email) SELECT md5('old' || g)::uuid, 'old' || g FROM generate_series(1, 20) g")
        .await
        .unwrap();
    wait_until(WAIT, "the first rows on the backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 20
    })
    .await;
    r.shutdown().await;
    // Written while no replicator runs: held only by the trigger change logs. Updates and
    // deletes of rows both sites hold, and new rows on each side.
    p.batch_execute(
        "INSERT INTO users (id, email) SELECT gen_random_uuid(), 'p' || g FROM generate_series(1, 100) g; \
         UPDATE users SET name = 'updated while stopped' WHERE email IN ('old1', 'old2', 'old3'); \
         DELETE FROM users WHERE email IN ('old4', 'old5')",
    )
    .await
    .unwrap();
    b.batch_execute("INSERT INTO users (id, email) SELECT gen_random_uuid(), 'b' || g FROM generate_series(1, 100) g; \
         UPDATE users SET name = 'updated on the backup' WHERE email = 'old6'")
        .await
        .unwrap();
    // The application keeps writing on both sites across the switch.
    let stop = CancellationToken::new();
    let wp = tokio::spawn(common::steady_writer(ps.dsn("site"), "wp", stop.clone()));
    let wb = tokio::spawn(common::steady_writer(bs.dsn("site"), "wb", stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = start(&logical);
    wait_until(WAIT, "the triggers removed", || async {
        capture_triggers(&p).await + capture_triggers(&b).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let (np, nb) = (wp.await.unwrap(), wb.await.unwrap());
    assert!(np > 0 && nb > 0, "the writers wrote ({np}, {nb})");
    let want = 20 - 2 + 200 + np + nb;
    wait_until(WAIT, "every row on both sites", || async {
        count(&p, "SELECT count(*) FROM users").await == want
            && count(&b, "SELECT count(*) FROM users").await == want
    })
    .await;
    for c in [&p, &b] {
        for (tag, n) in [("wp", np), ("wb", nb)] {
            assert_eq!(
                count(
                    c,
                    &format!("SELECT count(*) FROM users WHERE email LIKE '{tag}-%'")
                )
                .await,
                n,
                "{tag}"
            );
        }
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM users WHERE name = 'updated while stopped'"
            )
            .await,
            3
        );
        assert_eq!(
            text(c, "SELECT name FROM users WHERE email = 'old6'")
                .await
                .as_deref(),
            Some("updated on the backup")
        );
        assert_eq!(capture_triggers(c).await, 0);
    }
    assert!(equal(&logical).await);
    p.batch_execute("INSERT INTO users (id, email) VALUES (gen_random_uuid(), 'after')")
        .await
        .unwrap();
    wait_until(WAIT, "a write after the switch on the backup", || async {
        count(&b, "SELECT count(*) FROM users WHERE email = 'after'").await == 1
    })
    .await;
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_reported_and_resync_rebuilds_the_pair() {
    let (ps, bs, config) = common::pair(SCHEMA, "").await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    // The primary keeps at most 1MB of WAL for a slot.
    p.batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await
        .unwrap();
    p.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let r = start(&config);
    common::wait_streaming(&p, &b).await;
    r.shutdown().await;
    // Far more WAL than that while the replicator is down, then a checkpoint: the slot is lost.
    for i in 0..4 {
        p.batch_execute(&format!("INSERT INTO users (id, email, bio) SELECT gen_random_uuid(), 'w{i}-' || g, repeat('x', 1000) FROM generate_series(1, 10000) g"))
            .await
            .unwrap();
        p.batch_execute("SELECT pg_switch_wal(); CHECKPOINT")
            .await
            .unwrap();
    }
    wait_until(WAIT, "the slot invalidated", || async {
        text(&p, "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'gsb_primary_to_backup'").await.as_deref() == Some("lost")
    })
    .await;
    // Reported: /status names the direction's error, with the fix.
    let port = gsb_tests::free_port();
    let text_cfg =
        common::config_text(&ps, &bs, "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let config = Config::from_toml_str(&text_cfg).unwrap();
    let r = start(&config);
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/status");
    wait_until(WAIT, "the invalidated slot on /status", || async {
        let v: serde_json::Value = match http.get(&url).send().await {
            Ok(resp) => resp.json().await.unwrap_or_default(),
            Err(_) => return false,
        };
        v["directions"]["primary_to_backup"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("invalidated") && e.contains("gsb resync"))
    })
    .await;
    // gsb resync while the replicator runs: it rebuilds the pair.
    let report = gsb_replicator::resync(&config).await.unwrap();
    assert!(
        report
            .to_string()
            .contains("slot gsb_primary_to_backup on the primary dropped (was lost)"),
        "{report}"
    );
    wait_until(Duration::from_secs(60), "verify equal after resync", || {
        equal(&config)
    })
    .await;
    assert_eq!(count(&b, "SELECT count(*) FROM users").await, 40_000);
    // And it streams again.
    p.batch_execute("INSERT INTO users (id, email) VALUES (gen_random_uuid(), 'after')")
        .await
        .unwrap();
    wait_until(WAIT, "a new write on the backup", || async {
        count(&b, "SELECT count(*) FROM users WHERE email = 'after'").await == 1
    })
    .await;
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_source_committed_before_it_was_cut_off_is_reported_on_return() {
    let (ps, bs) = common::servers(SCHEMA).await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let port = gsb_tests::free_port();
    let config = Config::from_toml_str(
        &common::config_text(&ps, &bs, "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let r = start(&config);
    common::wait_streaming(&p, &b).await;
    p.batch_execute(
        "INSERT INTO users (id, email, name) VALUES ('00000000-0000-0000-0000-000000000001', 'x@x', 'v0')",
    )
    .await
    .unwrap();
    wait_until(WAIT, "the user on the backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 1
    })
    .await;
    // The primary is cut off: what it commits now does not reach the backup, which takes
    // the users meanwhile and edits the same row later.
    r.shutdown().await;
    for i in 0..3 {
        p.batch_execute(&format!("INSERT INTO users (id, email) SELECT gen_random_uuid(), 'late{i}-' || g FROM generate_series(1, 3) g"))
            .await
            .unwrap();
    }
    p.batch_execute("UPDATE users SET name = 'p-late' WHERE email = 'x@x'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.batch_execute("UPDATE users SET name = 'b-wins' WHERE email = 'x@x'")
        .await
        .unwrap();
    // Back: the window is reported on /status (and logged, and as a metric).
    let r = start(&config);
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/status");
    let w = gsb_tests::wait_for(WAIT, "the recovery window on /status", || async {
        let v: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
        let w = v["directions"]["primary_to_backup"]["last_recovery"].clone();
        w.is_object().then_some(w)
    })
    .await;
    assert_eq!(
        (w["transactions"].as_u64(), w["rows"].as_u64()),
        (Some(4), Some(10)),
        "{w}"
    );
    let ids = w["lost_conflict_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "{w}");
    let id = ids[0].as_i64().unwrap();
    assert_eq!(
        text(
            &b,
            &format!("SELECT loser_row->>'name' FROM gsb.conflicts WHERE id = {id}")
        )
        .await
        .as_deref(),
        Some("p-late")
    );
    wait_until(WAIT, "converged", || equal(&config)).await;
    assert_eq!(
        text(&p, "SELECT name FROM users WHERE email = 'x@x'")
            .await
            .as_deref(),
        Some("b-wins")
    );
    r.shutdown().await;
}
