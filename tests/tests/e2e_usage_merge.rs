//! Story 5: usage recorded on the backup (during a failover) shows in the primary's usage report;
//! usage recorded on the primary is not copied to the backup (the merge is one way).

mod e2e_support;

use e2e_support::{Stack, StackOptions, FAILOVER_DEADLINE, REPLICATION_DEADLINE};
use gsb_tests::wait_for;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_on_the_backup_reaches_the_primary_report() {
    let stack = Stack::start(StackOptions::default()).await;
    let url = stack.proxy_url.clone();
    let [p, b] = stack.site_urls.clone();

    let ada = stack.create_user(&url, "Ada", "primary").await;
    let ada_id = ada["id"].as_str().unwrap().to_owned();

    // An operator sends traffic to the backup; users hold a meeting there.
    let out = stack
        .gsb(&["failover", "--to", "backup", "--reason", "usage drill"])
        .await;
    assert!(out.status.success(), "gsb failover failed");
    stack.wait_served_by("Backup", FAILOVER_DEADLINE).await;
    // Ada was replicated to the backup (she joins there).
    stack
        .wait_json(
            &format!("{b}/api/users/{ada_id}"),
            "Ada on the backup",
            REPLICATION_DEADLINE,
        )
        .await;
    let m = stack
        .create_meeting(&url, &ada_id, "review", "backup")
        .await;
    let m_id = m["id"].as_str().unwrap().to_owned();
    stack
        .meeting_action(&url, &m_id, "start", None, "backup")
        .await;
    stack
        .meeting_action(&url, &m_id, "join", Some(&ada_id), "backup")
        .await;
    let ended = stack
        .meeting_action(&url, &m_id, "end", None, "backup")
        .await;
    assert_eq!(ended["status"], "ended");

    let out = stack.gsb(&["failback"]).await;
    assert!(out.status.success(), "gsb failback failed");
    stack.wait_served_by("Primary", FAILOVER_DEADLINE).await;

    // The primary's report, through the one URL, covers what was recorded on the backup.
    let report: Value = wait_for(
        REPLICATION_DEADLINE,
        "the backup's usage in the primary's report",
        || async {
            let r = stack.get(&format!("{url}/api/usage/report")).await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.site, "primary");
            let rep = r.json();
            (rep["by_site"]["backup"]["joins"] == 1
                && rep["by_site"]["backup"]["meetings_ended"] == 1)
                .then_some(rep)
        },
    )
    .await;
    assert!(
        report["by_site"]["backup"]["minutes"].as_i64().unwrap() >= 1,
        "{report:#}"
    );
    assert_eq!(report["joins"], 1, "{report:#}");
    assert_eq!(report["meetings_ended"], 1, "{report:#}");

    // One way: a join recorded on the primary stays out of the backup's report.
    let m2 = stack.create_meeting(&p, &ada_id, "local", "primary").await;
    stack
        .meeting_action(
            &p,
            m2["id"].as_str().unwrap(),
            "join",
            Some(&ada_id),
            "primary",
        )
        .await;
    let marker = stack.create_user(&p, "Marker", "primary").await;
    stack
        .wait_json(
            &format!("{b}/api/users/{}", marker["id"].as_str().unwrap()),
            "the marker user on the backup",
            REPLICATION_DEADLINE,
        )
        .await;
    let rep = stack.get(&format!("{b}/api/usage/report")).await.json();
    assert_eq!(
        rep["by_site"]["primary"]["joins"], 0,
        "primary usage was copied to the backup: {rep:#}"
    );
    let rep = stack.get(&format!("{p}/api/usage/report")).await.json();
    assert_eq!(rep["joins"], 2, "{rep:#}");
}
