//! The apply over two real PostgreSQL servers, fed by either capture: a large batch mixing
//! clean rows, conflicts, deletes and a unique key swap. (The clock-skew rule is the apply's
//! own, tested in `apply.rs` with stamps a test can set.)

use std::time::Duration;

#[macro_use]
mod common;

use common::{count, start, text};

use gsb_replicator::verify;
use gsb_tests::wait_until;

const WAIT: Duration = Duration::from_secs(30);

both_captures!(
    a_large_batch_mixes_set_based_rows_conflicts_deletes_and_a_unique_key_swap,
    rows_updated_on_both_sites_at_once_converge,
);

async fn a_large_batch_mixes_set_based_rows_conflicts_deletes_and_a_unique_key_swap(capture: &str) {
    let (ps, bs, config) = common::pair(common::INT_USERS, &common::capture_line(capture)).await;
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

/// Each row updated on both sites at the same moment (the two UPDATEs sent together, row after
/// row, while both directions apply): the apply often finds the row locked by the local update
/// and must judge the version it gets once the lock is free, not the one it first saw.
async fn rows_updated_on_both_sites_at_once_converge(capture: &str) {
    let (ps, bs, config) = common::pair(common::INT_USERS, &common::capture_line(capture)).await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let r = start(&config);
    common::wait_streaming(&p, &b).await;
    p.batch_execute("INSERT INTO users SELECT g, 'cf' || g, 'cf' FROM generate_series(1, 400) g")
        .await
        .unwrap();
    wait_until(WAIT, "rows on the backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 400
    })
    .await;
    let sql = "UPDATE users SET name = $1 WHERE id = $2";
    let (sp, sb) = (p.prepare(sql).await.unwrap(), b.prepare(sql).await.unwrap());
    for i in 1..=400i32 {
        let (a, z) = (format!("a-{i}"), format!("b-{i}"));
        type P<'a> = [&'a (dyn tokio_postgres::types::ToSql + Sync); 2];
        let (pa, pz): (P, P) = ([&a, &i], [&z, &i]);
        let (x, y) = tokio::join!(p.execute(&sp, &pa), b.execute(&sb, &pz));
        x.unwrap();
        y.unwrap();
    }
    wait_until(WAIT, "converged", || async {
        verify(&config).await.unwrap().is_equal()
    })
    .await;
    // Every row holds one of its two edits; the losing one is in a conflict log.
    assert_eq!(
        count(
            &p,
            "SELECT count(*) FROM users WHERE name = 'a-' || id OR name = 'b-' || id"
        )
        .await,
        400
    );
    r.shutdown().await;
}
