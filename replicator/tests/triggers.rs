//! What the trigger capture's reader adds to the shared apply, over two real PostgreSQL
//! servers: batches of committed transactions (no commit waits behind an older open
//! transaction, a row's changes apply in the order they were made whatever the order of
//! their transactions' xids, a set cut into many batches), and the move of a change log the
//! first generation's apply left.

use std::time::Duration;

mod common;

use common::{count, start, text};

use gsb_replicator::verify;
use gsb_tests::wait_until;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_shipped_while_an_older_transaction_stays_open_and_row_order_holds() {
    // Batches of two changes: every set below is cut.
    let (ps, bs, config) = common::pair(
        common::INT_USERS,
        "capture = \"triggers\"\nbatch_size = 2\n",
    )
    .await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let r = start(&config);
    common::wait_streaming(&p, &b).await;
    p.batch_execute("INSERT INTO users VALUES (1, 'k', 'v0'), (2, 'other', 'v0')")
        .await
        .unwrap();
    wait_until(WAIT, "rows on the backup", || async {
        count(&b, "SELECT count(*) FROM users").await == 2
    })
    .await;
    // A: an older transaction, holding an xid (it wrote row 2), left open.
    let a = ps.client("site").await;
    a.batch_execute("BEGIN; UPDATE users SET name = 'a-first' WHERE id = 2")
        .await
        .unwrap();
    // B: younger (a higher xid), changes row 1 and commits.
    p.batch_execute("UPDATE users SET name = 'b' WHERE id = 1")
        .await
        .unwrap();
    // B reaches the backup while A is still open (the first generation read only below the
    // oldest open transaction, so B would have waited for A).
    wait_until(
        WAIT,
        "B's commit on the backup with A still open",
        || async {
            text(&b, "SELECT name FROM users WHERE id = 1")
                .await
                .as_deref()
                == Some("b")
        },
    )
    .await;
    // A then changes row 1 after B (row lock order) and commits: A's xid is lower than B's,
    // but A's change of row 1 is the later one and must be the one left.
    a.batch_execute("UPDATE users SET name = 'a-last' WHERE id = 1; COMMIT")
        .await
        .unwrap();
    // Many small transactions with a row changed over and over: sets cut in batches of two.
    for i in 0..20 {
        p.batch_execute(&format!(
            "UPDATE users SET email = 'k{i}' WHERE id = 2; INSERT INTO users VALUES ({0}, 'n{0}', 'x')",
            100 + i
        ))
        .await
        .unwrap();
    }
    wait_until(WAIT, "converged", || async {
        verify(&config).await.unwrap().is_equal()
    })
    .await;
    assert_eq!(
        text(&b, "SELECT name FROM users WHERE id = 1")
            .await
            .as_deref(),
        Some("a-last")
    );
    assert_eq!(
        text(&b, "SELECT email FROM users WHERE id = 2")
            .await
            .as_deref(),
        Some("k19")
    );
    assert_eq!(count(&b, "SELECT count(*) FROM users").await, 22);
    // The source's own order is not a conflict.
    assert_eq!(count(&b, "SELECT count(*) FROM gsb.conflicts").await, 0);
    r.shutdown().await;
}

/// Puts `site` back in the state the first generation left: its triggers stamp (format 1),
/// its inbound cursor is an (xid, id) one, its change log empty.
async fn as_first_generation(c: &tokio_postgres::Client, inbound: &str) {
    c.batch_execute(&format!(
        "DELETE FROM gsb.changes; UPDATE gsb.site SET capture_format = 1; \
         UPDATE gsb.cursors SET done = NULL, part = NULL, part_id = NULL, xid = '0', id = 0 \
         WHERE direction = '{inbound}'"
    ))
    .await
    .unwrap();
}

/// A write as the first generation's trigger recorded it: the row, and in the same
/// transaction its change stamped with an HLC and its row version (the current triggers are
/// bypassed with `gsb.applying`, as for an applied change).
async fn first_generation_insert(c: &tokio_postgres::Client, site: &str, id: i32) {
    c.batch_execute(&format!(
        "BEGIN; SET LOCAL gsb.applying = 'on';
         INSERT INTO users VALUES ({id}, 'old{id}', '{site}');
         INSERT INTO gsb.row_versions (tbl, pk, hlc, origin)
             VALUES ('public.users', '{{\"id\": {id}}}', (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint << 16) + {id}, '{site}');
         INSERT INTO gsb.changes (tbl, op, pk, \"row\", hlc, origin)
             SELECT 'public.users', 'I', '{{\"id\": {id}}}', to_jsonb(u), (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint << 16) + {id}, '{site}'
             FROM users u WHERE id = {id};
         COMMIT"
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_log_of_the_first_generation_is_drained_then_read_by_the_shared_apply() {
    let (ps, bs, config) = common::pair(common::INT_USERS, "capture = \"triggers\"\n").await;
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    let r = start(&config);
    common::wait_streaming(&p, &b).await;
    r.shutdown().await;
    // Both sites as an older gsb left them, with changes its apply never saw.
    as_first_generation(&p, "backup_to_primary").await;
    as_first_generation(&b, "primary_to_backup").await;
    for id in 1..=30 {
        first_generation_insert(&p, "primary", id).await;
        first_generation_insert(&b, "backup", 1000 + id).await;
    }
    // The move waits behind a transaction holding the primary's users table (as behind a
    // running writer), so writers provably run across it: captured by the first generation's
    // triggers (the start installs them again for these sites) until the move, by the new
    // ones after.
    let holder = ps.client("site").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE users IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let r = start(&config);
    let stamping = "SELECT count(*) FROM pg_proc WHERE proname = 'record' \
                    AND pronamespace = 'gsb'::regnamespace AND prosrc LIKE '%row_versions%'";
    wait_until(
        WAIT,
        "the first generation's triggers installed again",
        || async { count(&p, stamping).await == 1 && count(&b, stamping).await == 1 },
    )
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = [(ps.dsn("site"), 10_000), (bs.dsn("site"), 20_000)].map(|(dsn, base)| {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = gsb_tests::pg::connect(&dsn).await;
            let mut n = 0;
            while !stop.is_cancelled() {
                c.batch_execute(&format!(
                    "INSERT INTO users VALUES ({0}, 'w{0}', 'w')",
                    base + n
                ))
                .await
                .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&b, "SELECT capture_format::int8 FROM gsb.site").await,
        1,
        "the move waits for the holder"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    wait_until(WAIT, "both sites moved to format 2", || async {
        count(&p, "SELECT capture_format::int8 FROM gsb.site").await == 2
            && count(&b, "SELECT capture_format::int8 FROM gsb.site").await == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    let total = 60 + written;
    wait_until(WAIT, "every row on both sites", || async {
        count(&p, "SELECT count(*) FROM users").await == total
            && count(&b, "SELECT count(*) FROM users").await == total
    })
    .await;
    assert!(verify(&config).await.unwrap().is_equal());
    for c in [&p, &b] {
        assert_eq!(count(c, "SELECT count(*) FROM gsb.row_versions").await, 0);
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM gsb.cursors WHERE done IS NULL AND direction IN ('primary_to_backup', 'backup_to_primary')"
            )
            .await,
            0
        );
    }
    // The first generation's changes were the source's own: no conflict.
    assert_eq!(
        count(&p, "SELECT count(*) FROM gsb.conflicts").await
            + count(&b, "SELECT count(*) FROM gsb.conflicts").await,
        0
    );
    r.shutdown().await;
}
