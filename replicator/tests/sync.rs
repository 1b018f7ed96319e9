//! End-to-end replication over two real PostgreSQL servers (started by `gsb-tests`).

use std::time::Duration;

#[macro_use]
mod common;

use common::{count, start, text};

use gsb_replicator::{copy_config, verify, Config};
use gsb_tests::pg::PgServer;
use gsb_tests::wait_until;

const SITE_SCHEMA: &str = "
CREATE TABLE users (id uuid PRIMARY KEY, email text, name text, created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now());
CREATE TABLE meetings (id uuid PRIMARY KEY, host_id uuid, topic text, start_time timestamptz, duration_minutes int, status text, created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now());
CREATE TABLE site_config (key text PRIMARY KEY, value text);
CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
CREATE TABLE usage_records (id uuid PRIMARY KEY, meeting_id uuid, user_id uuid, kind text, minutes int, site text, recorded_at timestamptz DEFAULT now());
";

const WAIT: Duration = Duration::from_secs(20);

struct Pair {
    p: PgServer,
    b: PgServer,
    config: Config,
}

async fn pair(capture: &str) -> Pair {
    let (p, b, config) = common::pair(SITE_SCHEMA, &common::capture_line(capture)).await;
    Pair { p, b, config }
}

both_captures!(
    insert_update_delete_both_ways_without_echo,
    concurrent_conflicts_converge_and_are_logged_delete_wins,
    stopped_site_catches_up_and_replicator_restart_under_load_loses_nothing,
);

async fn insert_update_delete_both_ways_without_echo(capture: &str) {
    let t = pair(capture).await;
    let (p, b) = (t.p.client("site").await, t.b.client("site").await);
    let r = start(&t.config);
    // Counted below: every write goes through the stream (none through the initial sync).
    common::wait_streaming(&p, &b).await;
    p.batch_execute("INSERT INTO users (id, email, name) VALUES ('00000000-0000-0000-0000-000000000001', 'a@x', 'Ann')").await.unwrap();
    b.batch_execute("INSERT INTO meetings (id, topic, status) VALUES ('10000000-0000-0000-0000-000000000001', 'standup', 'scheduled')").await.unwrap();
    wait_until(WAIT, "user on backup and meeting on primary", || async {
        count(&b, "SELECT count(*) FROM users").await == 1
            && count(&p, "SELECT count(*) FROM meetings").await == 1
    })
    .await;
    // A meeting started on the backup shows in progress on the primary.
    b.batch_execute("UPDATE meetings SET status = 'in_progress'")
        .await
        .unwrap();
    p.batch_execute("UPDATE users SET name = 'Anna'")
        .await
        .unwrap();
    wait_until(WAIT, "updates crossed", || async {
        text(&p, "SELECT status FROM meetings").await.as_deref() == Some("in_progress")
            && text(&b, "SELECT name FROM users").await.as_deref() == Some("Anna")
    })
    .await;
    p.batch_execute("DELETE FROM meetings").await.unwrap();
    b.batch_execute("DELETE FROM users").await.unwrap();
    wait_until(WAIT, "deletes crossed", || async {
        count(&b, "SELECT count(*) FROM meetings").await == 0
            && count(&p, "SELECT count(*) FROM users").await == 0
    })
    .await;
    // No echo: applied changes are never captured again. Each direction applied exactly the
    // writes made on its source (an echo would ship them back and count them again).
    wait_until(WAIT, "verify equal", || async {
        verify(&t.config).await.unwrap().is_equal()
    })
    .await;
    assert_eq!(r.applied("primary_to_backup", "users"), 2, "insert, update");
    assert_eq!(r.applied("primary_to_backup", "meetings"), 1, "delete");
    assert_eq!(
        r.applied("backup_to_primary", "meetings"),
        2,
        "insert, update"
    );
    assert_eq!(r.applied("backup_to_primary", "users"), 1, "delete");
    wait_until(WAIT, "verify equal", || async {
        verify(&t.config).await.unwrap().is_equal()
    })
    .await;
    r.shutdown().await;
}

async fn concurrent_conflicts_converge_and_are_logged_delete_wins(capture: &str) {
    let t = pair(capture).await;
    let (p, b) = (t.p.client("site").await, t.b.client("site").await);
    let r = start(&t.config);
    p.batch_execute("INSERT INTO users (id, email, name) VALUES ('00000000-0000-0000-0000-000000000001', 'a@x', 'v0'), ('00000000-0000-0000-0000-000000000002', 'b@x', 'v0')").await.unwrap();
    wait_until(WAIT, "rows on backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 2
    })
    .await;
    // Partition: stop replicating, write the same rows on both sides.
    r.shutdown().await;
    p.batch_execute("UPDATE users SET name = 'primary-edit' WHERE email = 'a@x'")
        .await
        .unwrap();
    b.batch_execute("UPDATE users SET name = 'backup-edit' WHERE email = 'a@x'")
        .await
        .unwrap();
    b.batch_execute("DELETE FROM users WHERE email = 'b@x'")
        .await
        .unwrap();
    p.batch_execute("UPDATE users SET name = 'late update' WHERE email = 'b@x'")
        .await
        .unwrap();
    let r = start(&t.config);
    wait_until(WAIT, "converged", || async {
        verify(&t.config).await.unwrap().is_equal()
    })
    .await;
    // The later write (backup's) wins; the delete beats the concurrent (even later) update.
    assert_eq!(
        text(&p, "SELECT name FROM users WHERE email = 'a@x'")
            .await
            .as_deref(),
        Some("backup-edit")
    );
    assert_eq!(
        count(&p, "SELECT count(*) FROM users WHERE email = 'b@x'").await,
        0
    );
    let logged = count(&p, "SELECT count(*) FROM gsb.conflicts WHERE loser_row->>'name' = 'primary-edit' AND winner_row->>'name' = 'backup-edit'").await
        + count(&b, "SELECT count(*) FROM gsb.conflicts WHERE loser_row->>'name' = 'primary-edit'").await;
    assert!(logged >= 1, "losing version kept in the conflict log");
    let late = count(
        &p,
        "SELECT count(*) FROM gsb.conflicts WHERE loser_row->>'name' = 'late update'",
    )
    .await;
    assert_eq!(late, 1, "late update logged as the loser on the primary");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_copy_replaces_one_way_and_usage_is_one_way() {
    let t = pair("logical").await;
    let (p, b) = (t.p.client("site").await, t.b.client("site").await);
    p.batch_execute("INSERT INTO site_config VALUES ('title', 'Meet'), ('color', 'blue'); INSERT INTO client_versions VALUES ('mac', '1.2', 'u')").await.unwrap();
    b.batch_execute(
        "INSERT INTO site_config VALUES ('title', 'changed on backup'), ('stale', 'x')",
    )
    .await
    .unwrap();
    let report = copy_config(&t.config).await.unwrap();
    assert!(
        report.to_string().contains("public.site_config: 2 rows"),
        "{report}"
    );
    assert_eq!(count(&b, "SELECT count(*) FROM site_config").await, 2);
    assert_eq!(
        text(&b, "SELECT value FROM site_config WHERE key = 'title'")
            .await
            .as_deref(),
        Some("Meet")
    );
    assert_eq!(count(&b, "SELECT count(*) FROM client_versions").await, 1);
    // Never back: the primary keeps its rows after a backup edit and another copy.
    b.batch_execute("UPDATE site_config SET value = 'red' WHERE key = 'color'")
        .await
        .unwrap();
    assert_eq!(
        text(&p, "SELECT value FROM site_config WHERE key = 'color'")
            .await
            .as_deref(),
        Some("blue")
    );

    let r = start(&t.config);
    b.batch_execute("INSERT INTO usage_records (id, kind, minutes, site) VALUES ('20000000-0000-0000-0000-000000000001', 'meeting', 5, 'backup')").await.unwrap();
    p.batch_execute("INSERT INTO usage_records (id, kind, minutes, site) VALUES ('20000000-0000-0000-0000-000000000002', 'meeting', 7, 'primary')").await.unwrap();
    wait_until(WAIT, "backup usage on the primary", || async {
        count(&p, "SELECT count(*) FROM usage_records").await == 2
    })
    .await;
    // A heartbeat round trip later, the primary's own usage has still not gone to the backup.
    let hb = text(
        &p,
        "SELECT at::text FROM gsb.heartbeat WHERE site = 'backup'",
    )
    .await;
    wait_until(WAIT, "a newer backup heartbeat on the primary", || async {
        text(
            &p,
            "SELECT at::text FROM gsb.heartbeat WHERE site = 'backup'",
        )
        .await
            != hb
    })
    .await;
    assert_eq!(count(&b, "SELECT count(*) FROM usage_records").await, 1);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_a_hand_made_divergence() {
    let t = pair("logical").await;
    let (p, b) = (t.p.client("site").await, t.b.client("site").await);
    let r = start(&t.config);
    p.batch_execute("INSERT INTO users (id, email, name) SELECT gen_random_uuid(), 'u' || i, 'n' FROM generate_series(1, 500) i").await.unwrap();
    wait_until(WAIT, "500 users on backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 500
    })
    .await;
    r.shutdown().await;
    assert!(verify(&t.config).await.unwrap().is_equal());
    // By hand, behind the replicator's back (as if applied): no capture.
    b.batch_execute("BEGIN; SET LOCAL gsb.applying = 'on'; UPDATE users SET name = 'tampered' WHERE email = 'u7'; COMMIT").await.unwrap();
    let report = verify(&t.config).await.unwrap();
    assert!(!report.is_equal());
    let key: String = b
        .query_one(
            "SELECT jsonb_build_object('id', id)::text FROM users WHERE email = 'u7'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(report.to_string().contains(&key), "{report}");
}

async fn stopped_site_catches_up_and_replicator_restart_under_load_loses_nothing(capture: &str) {
    let mut t = pair(capture).await;
    let p = t.p.client("site").await;
    let r = start(&t.config);
    // Backup down for a while under writes on the primary.
    t.b.stop();
    p.batch_execute("INSERT INTO users (id, email) SELECT gen_random_uuid(), 'a' || i FROM generate_series(1, 2000) i").await.unwrap();
    t.b.restart();
    let b = t.b.client("site").await;
    wait_until(Duration::from_secs(60), "backup caught up", || async {
        count(&b, "SELECT count(*) FROM users").await == 2000
    })
    .await;
    // Replicator stopped mid-stream under a steady write load, then restarted.
    let writer = {
        let p = t.p.client("site").await;
        tokio::spawn(async move {
            for i in 0..40 {
                p.batch_execute(&format!("INSERT INTO users (id, email) SELECT gen_random_uuid(), 'w{i}-' || g FROM generate_series(1, 100) g")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    // In-process stop mid-stream (the kill -9 of the binary is left to a binary e2e test).
    r.shutdown().await;
    writer.await.unwrap();
    let r = start(&t.config);
    wait_until(
        Duration::from_secs(60),
        "verify equal after restart",
        || async { verify(&t.config).await.unwrap().is_equal() },
    )
    .await;
    assert_eq!(count(&b, "SELECT count(*) FROM users").await, 6000);
    assert_eq!(
        count(&b, "SELECT count(DISTINCT email) FROM users").await,
        6000
    );
    // Pruned once applied.
    wait_until(WAIT, "change log pruned", || async {
        count(
            &p,
            "SELECT count(*) FROM gsb.changes WHERE tbl = 'public.users'",
        )
        .await
            == 0
    })
    .await;
    r.shutdown().await;
}
