//! Story 1: a meeting scheduled on the primary; the primary fails fully (its site process and its
//! PostgreSQL server killed); a client using the one URL is served by the backup within a
//! deadline, finds the meeting, and detectbackup says `Backup`.

mod e2e_support;

use std::time::Instant;

use e2e_support::{Stack, StackOptions, BACKUP, FAILOVER_DEADLINE, REPLICATION_DEADLINE};
use gsb_tests::wait_for;
use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_failure_of_the_primary_is_served_by_the_backup() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let url = stack.proxy_url.clone();

    let ada = stack.create_user(&url, "Ada", "primary").await;
    let meeting = stack
        .create_meeting(&url, ada["id"].as_str().unwrap(), "standup", "primary")
        .await;
    let id = meeting["id"].as_str().unwrap().to_owned();
    // The meeting must have reached the backup before the disaster for it to be found there.
    let on_backup = format!("{}/api/meetings/{id}", stack.site_urls[BACKUP]);
    stack
        .wait_json(
            &on_backup,
            "the meeting replicated to the backup",
            REPLICATION_DEADLINE,
        )
        .await;

    stack.kill_primary();
    let killed = Instant::now();
    // What the user sees: the meeting, answered by the backup, through the same URL.
    let r = wait_for(
        FAILOVER_DEADLINE,
        "the meeting served by the backup",
        || async {
            let r = stack
                .send(Method::GET, &format!("{url}/api/meetings/{id}"), None)
                .await?;
            (r.status == 200 && r.site == "backup").then_some(r)
        },
    )
    .await;
    let served = killed.elapsed();
    let took = stack.wait_served_by("Backup", FAILOVER_DEADLINE).await + served;
    eprintln!("full failure: meeting served by the backup after {served:?}, detectbackup Backup after {took:?}");
    assert_eq!(r.json()["topic"], "standup");
    assert_eq!(r.json()["status"], "scheduled");

    // Every detectbackup path answers the proxy's own view, exactly as the contract says.
    for path in [
        "/detectbackup.php",
        "/meet/detectbackup.php",
        "/detectbackup",
    ] {
        let resp = stack
            .http
            .get(format!("{url}{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(resp.status(), 200, "{path}");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with("text/plain"), "{path}");
        assert_eq!(header("cache-control"), "no-store", "{path}");
        assert_eq!(resp.text().await.unwrap(), "Backup", "{path}");
    }

    // The HTML home page works too (what a browser user sees), served by the backup.
    let home = stack.get(&format!("{url}/")).await;
    assert_eq!(home.status, 200, "{}", home.body);
    assert_eq!(home.site, "backup");
}
