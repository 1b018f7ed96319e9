//! The apply paths over two real PostgreSQL servers: a large batch mixing clean rows,
//! conflicts, deletes and a unique key swap (default capture), and the trigger capture's
//! clock-skew rejection and tombstone pruning.

use std::time::Duration;

mod common;

use common::{count, start, text};

use gsb_replicator::verify;
use gsb_tests::wait_until;

/// `users.email` is unique: a second key the set-based apply can trip over.
const SITE_SCHEMA: &str = "
CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE, name text);
CREATE TABLE meetings (id uuid PRIMARY KEY, topic text, status text);
CREATE TABLE site_config (key text PRIMARY KEY, value text);
CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
CREATE TABLE usage_records (id uuid PRIMARY KEY, kind text, minutes int);
";

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_mixes_set_based_rows_conflicts_deletes_and_a_unique_key_swap() {
    let (ps, bs, config) = common::pair(SITE_SCHEMA, "").await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let r = start(&config);
    p.batch_execute("INSERT INTO users SELECT i, 'u' || i, 'v0' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    wait_until(WAIT, "100 users on the backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 100
    })
    .await;
    r.shutdown().await;
    // Partition. The primary's batch: 98 updates in one transaction (far above the set-based
    // threshold), then a swap of two unique emails through a temporary value: row 99 changes
    // once (set-based) but can only take 'u98' after row 98's two changes (per row) freed it.
    p.batch_execute("UPDATE users SET name = 'p' WHERE id NOT IN (98, 99)")
        .await
        .unwrap();
    p.batch_execute(
        "BEGIN; UPDATE users SET email = 'tmp' WHERE id = 98; \
         UPDATE users SET email = 'u98' WHERE id = 99; \
         UPDATE users SET email = 'u99' WHERE id = 98; COMMIT",
    )
    .await
    .unwrap();
    // Later on the backup: 10 concurrent updates (the backup's later stamps win) and 5
    // deletes (a delete beats a concurrent update).
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.batch_execute(
        "UPDATE users SET name = 'b' WHERE id <= 10; DELETE FROM users WHERE id BETWEEN 11 AND 15",
    )
    .await
    .unwrap();
    let r = start(&config);
    wait_until(WAIT, "converged", || async {
        verify(&config).await.unwrap().is_equal()
    })
    .await;
    for c in [&p, &b] {
        assert_eq!(count(c, "SELECT count(*) FROM users").await, 95);
        assert_eq!(
            count(c, "SELECT count(*) FROM users WHERE name = 'b'").await,
            10
        );
        assert_eq!(
            count(c, "SELECT count(*) FROM users WHERE name = 'p'").await,
            83
        );
        assert_eq!(
            text(c, "SELECT email FROM users WHERE id = 98")
                .await
                .as_deref(),
            Some("u99")
        );
        assert_eq!(
            text(c, "SELECT email FROM users WHERE id = 99")
                .await
                .as_deref(),
            Some("u98")
        );
    }
    // Each of the 15 concurrently written rows is logged as a conflict where the loser arrived:
    // on the backup for the primary's 10 losing edits and 5 losing (deleted-row) updates.
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM gsb.conflicts WHERE reason = 'concurrent_write' AND loser_origin = 'primary'"
        )
        .await,
        15
    );
    // No echo: the backup shipped its own 15 writes, none of the primary's applied there.
    assert_eq!(r.applied("backup_to_primary", "users"), 15);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_stamped_beyond_the_clock_skew_is_rejected_logged_and_counted() {
    // The trigger capture's HLC stamp (a skewed clock is simulated through its floor); the
    // logical capture's commit-time rejection is in tests/logical.rs.
    let (ps, bs, config) = common::pair(
        SITE_SCHEMA,
        "capture = \"triggers\"\nmax_clock_skew = \"10s\"\n",
    )
    .await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let r = start(&config);
    p.batch_execute("INSERT INTO users VALUES (1, 'ok1', 'n')")
        .await
        .unwrap();
    wait_until(WAIT, "first user on the backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 1
    })
    .await;
    // A primary whose clock runs an hour ahead: its HLC floor makes the next stamp an hour
    // in the future (the stamp is the capture trigger's, as for a real skewed clock).
    p.batch_execute(
        "UPDATE gsb.site SET hlc_floor = (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint + 3600000) << 16; \
         INSERT INTO users VALUES (2, 'skewed', 'n'); \
         UPDATE gsb.site SET hlc_floor = 0",
    )
    .await
    .unwrap();
    // Then a normal write, committed after it: once it is on the backup, the skewed one has
    // been through the apply too (commit order).
    p.batch_execute("INSERT INTO users VALUES (3, 'ok3', 'n')")
        .await
        .unwrap();
    wait_until(WAIT, "third user on the backup", || async {
        count(&b, "SELECT count(*) FROM users WHERE id = 3").await == 1
    })
    .await;
    assert_eq!(
        count(&b, "SELECT count(*) FROM users WHERE id = 2").await,
        0,
        "the skewed change is not applied"
    );
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM gsb.row_versions WHERE pk = '{\"id\": 2}'"
        )
        .await,
        0,
        "nor is its version recorded"
    );
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM gsb.conflicts WHERE reason = 'clock_skew' AND pk = '{\"id\": 2}' AND loser_origin = 'primary' AND loser_row->>'email' = 'skewed'"
        )
        .await,
        1
    );
    // The hour-ahead stamp did not raise the backup's clock floor either.
    let floor_ahead: bool = b
        .query_one(
            "SELECT hlc_floor >> 16 > floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint + 60000 FROM gsb.site",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!floor_ahead);
    assert_eq!(
        r.counter(
            "gsb_replication_clock_skew_rejected_total",
            "direction",
            "primary_to_backup"
        ),
        1
    );
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_older_than_the_retention_are_pruned_on_both_sites() {
    // Tombstones are the trigger capture's (the logical capture needs none: an update of a
    // row that is gone is skipped and logged).
    let (ps, bs, config) = common::pair(
        SITE_SCHEMA,
        "capture = \"triggers\"\ntombstone_retention = \"10s\"\n",
    )
    .await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let r = start(&config);
    p.batch_execute("INSERT INTO users SELECT i, 'u' || i, 'n' FROM generate_series(1, 50) i")
        .await
        .unwrap();
    wait_until(WAIT, "users on the backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 50
    })
    .await;
    p.batch_execute("DELETE FROM users WHERE id <= 20")
        .await
        .unwrap();
    let tombstones = "SELECT count(*) FROM gsb.row_versions WHERE tbl = 'public.users' AND deleted";
    wait_until(
        WAIT,
        "deletes on the backup, tombstones on both",
        || async {
            count(&b, "SELECT count(*) FROM users").await == 30 && count(&b, tombstones).await == 20
        },
    )
    .await;
    // Still there right after the delete: the retention has not passed.
    assert_eq!(count(&p, tombstones).await, 20);
    wait_until(WAIT, "tombstones pruned on both sites", || async {
        count(&p, tombstones).await == 0 && count(&b, tombstones).await == 0
    })
    .await;
    // Live rows keep their versions.
    for c in [&p, &b] {
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM gsb.row_versions WHERE tbl = 'public.users'"
            )
            .await,
            30
        );
    }
    assert_eq!(
        r.counter("gsb_replication_tombstones_pruned_total", "site", "primary")
            + r.counter("gsb_replication_tombstones_pruned_total", "site", "backup"),
        40
    );
    r.shutdown().await;
}
