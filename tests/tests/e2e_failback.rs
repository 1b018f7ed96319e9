//! Story 2: during the failover a user is created and a meeting scheduled and started on the
//! backup; the primary returns; after failback both exist on the primary and the meeting shows
//! `in_progress` there; nothing written on either side is missing (`gsb verify` equal).

mod e2e_support;

use e2e_support::{
    Stack, StackOptions, BACKUP, FAILBACK_DEADLINE, FAILOVER_DEADLINE, PRIMARY,
    REPLICATION_DEADLINE,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_the_backup_are_on_the_primary_after_failback() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let url = stack.proxy_url.clone();

    // Written on the primary before the disaster.
    let ada = stack.create_user(&url, "Ada", "primary").await;
    let ada_id = ada["id"].as_str().unwrap().to_owned();
    stack
        .wait_json(
            &format!("{}/api/users/{ada_id}", stack.site_urls[BACKUP]),
            "Ada replicated to the backup",
            REPLICATION_DEADLINE,
        )
        .await;

    stack.kill_primary();
    stack.wait_served_by("Backup", FAILOVER_DEADLINE).await;

    // Written on the backup during the failover, through the same URL.
    let bob = stack.create_user(&url, "Bob", "backup").await;
    let bob_id = bob["id"].as_str().unwrap().to_owned();
    let m = stack
        .create_meeting(&url, &bob_id, "incident call", "backup")
        .await;
    let m_id = m["id"].as_str().unwrap().to_owned();
    let started = stack
        .meeting_action(&url, &m_id, "start", None, "backup")
        .await;
    assert_eq!(started["status"], "in_progress");

    stack.restart_primary().await;
    let took = stack.wait_served_by("Primary", FAILBACK_DEADLINE).await;
    eprintln!("primary back -> failback after {took:?}");

    // What the user wrote on the backup is on the primary the moment traffic is back.
    let r = stack.get(&format!("{url}/api/users/{bob_id}")).await;
    if r.status != 200 {
        // What the failback gate saw, for whoever reads the failure.
        let gate = stack.proxy_status().await["replication"].clone();
        let repl = stack.replicator_status().await;
        panic!(
            "Bob is not on the primary after failback ({}: {}); proxy replication gate: {gate:#}; replicator /status: {repl:#?}",
            r.status, r.body
        );
    }
    assert_eq!(r.site, "primary");
    assert_eq!(r.json()["name"], "Bob");
    let r = stack.get(&format!("{url}/api/meetings/{m_id}")).await;
    assert_eq!(r.status, 200, "the meeting after failback: {}", r.body);
    assert_eq!(r.site, "primary");
    assert_eq!(r.json()["status"], "in_progress");
    assert_eq!(r.json()["topic"], "incident call");
    // And what was written on the primary before the disaster survived its crash.
    let r = stack
        .get(&format!("{}/api/users/{ada_id}", stack.site_urls[PRIMARY]))
        .await;
    assert_eq!(r.status, 200, "Ada on the primary: {}", r.body);

    stack.wait_verify_equal(REPLICATION_DEADLINE).await;
}
