//! Story 7: the replicator is down during a failover. Users write on the backup meanwhile; the
//! primary returns but failback waits (the proxy's `/status` shows it blocked) until the
//! replicator is back and everything written meanwhile has reached the primary.

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::{
    Stack, StackOptions, BACKUP, FAILBACK_DEADLINE, FAILOVER_DEADLINE, PRIMARY,
    REPLICATION_DEADLINE,
};
use gsb_tests::{wait_for, wait_until};

/// How long the test watches the proxy hold the backup with a healthy primary: well past
/// `failback_after` (1s) and `min_dwell` (1s).
const HOLD: Duration = Duration::from_secs(4);
/// Users written straight into the backup's database during the outage.
const BULK: i64 = 30_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_waits_for_the_replicator_to_drain() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let url = stack.proxy_url.clone();

    stack.kill_replicator();
    stack.kill_primary();
    stack.wait_served_by("Backup", FAILOVER_DEADLINE).await;

    let carol = stack.create_user(&url, "Carol", "backup").await;
    let carol_id = carol["id"].as_str().unwrap().to_owned();
    let m = stack
        .create_meeting(&url, &carol_id, "war room", "backup")
        .await;
    let m_id = m["id"].as_str().unwrap().to_owned();
    stack
        .meeting_action(&url, &m_id, "start", None, "backup")
        .await;

    // Many more users signed up on the backup meanwhile (written straight into its database:
    // a backlog big enough that draining it takes a while after the replicator returns).
    let backup_db = gsb_tests::pg::connect(&stack.dsns[BACKUP]).await;
    backup_db
        .batch_execute(&format!(
            "INSERT INTO users (id, email, name) SELECT gen_random_uuid(), 'bulk' || g || '@example.com', 'Bulk ' || g FROM generate_series(1, {BULK}) g"
        ))
        .await
        .expect("bulk users on the backup");

    stack.restart_primary().await;
    let primary_user = format!("{}/api/users/{carol_id}", stack.site_urls[PRIMARY]);
    assert_eq!(
        stack.get(&primary_user).await.status,
        404,
        "Carol is on the primary although no replicator runs"
    );
    // The primary is healthy, but what Carol wrote is not there: traffic must stay.
    let until = Instant::now() + HOLD;
    while Instant::now() < until {
        assert_eq!(
            stack.detect().await.as_deref(),
            Some("Backup"),
            "failback went to a primary that lacks the backup's writes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = stack.proxy_status().await;
    assert_eq!(
        status["replication"]["failback_blocked"], true,
        "/status does not show failback blocked on replication: {status:#}"
    );

    stack.start_replicator().await;
    // While the replicator drains the backlog, the proxy says failback is blocked on it, with the
    // rows it waits for, and traffic stays on the backup.
    let saw_backlog = wait_for(
        FAILBACK_DEADLINE,
        "the proxy to report the backlog",
        || async {
            let status = stack.proxy_status().await;
            let gate = &status["replication"];
            if gate["failback_blocked"] == true
                && gate["backup_to_primary_pending"].as_u64() > Some(0)
            {
                let still = stack.detect().await;
                assert_eq!(
                    still.as_deref(),
                    Some("Backup"),
                    "failback while {gate} rows are pending"
                );
                return Some(true);
            }
            (status["active"] == "primary").then_some(false)
        },
    )
    .await;
    assert!(
        saw_backlog,
        "failback happened before the proxy ever saw the backlog: make BULK larger"
    );
    let drain_started = Instant::now();
    stack.wait_served_by("Primary", FAILBACK_DEADLINE).await;
    eprintln!(
        "backlog of {BULK} users drained and traffic back on the primary {:?} after the proxy first saw the backlog",
        drain_started.elapsed()
    );
    // The moment traffic is back, Carol and her running meeting are on the primary.
    let r = stack.get(&format!("{url}/api/users/{carol_id}")).await;
    assert_eq!((r.status, r.site.as_str()), (200, "primary"), "{}", r.body);
    let r = stack.get(&format!("{url}/api/meetings/{m_id}")).await;
    assert_eq!((r.status, r.site.as_str()), (200, "primary"), "{}", r.body);
    assert_eq!(r.json()["status"], "in_progress");
    // The backlog the replicator reports is drained.
    wait_until(
        REPLICATION_DEADLINE,
        "the replicator to report no backlog",
        || async {
            stack.replicator_status().await.is_some_and(|s| {
                s["directions"]["backup_to_primary"]["pending_rows"] == 0
                    && s["directions"]["primary_to_backup"]["pending_rows"] == 0
            })
        },
    )
    .await;
    let primary_db = gsb_tests::pg::connect(&stack.dsns[PRIMARY]).await;
    let n: i64 = primary_db
        .query_one("SELECT count(*) FROM users WHERE email LIKE 'bulk%'", &[])
        .await
        .expect("counting users on the primary")
        .get(0);
    assert_eq!(n, BULK, "bulk users on the primary after failback");
    stack.wait_verify_equal(REPLICATION_DEADLINE).await;
}
