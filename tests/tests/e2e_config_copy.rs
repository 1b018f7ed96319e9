//! Story 4: config changed on the primary reaches the backup by `gsb copy-config`; config changed
//! on the backup does not reach the primary (and the next copy replaces it on the backup).

mod e2e_support;

use e2e_support::{Stack, StackOptions, REPLICATION_DEADLINE};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_is_copied_one_way_primary_to_backup() {
    let stack = Stack::start(StackOptions::default()).await;
    let [p, b] = stack.site_urls.clone();
    let url = stack.proxy_url.clone();

    // An admin edits the site through the one URL: that lands on the primary.
    let r = stack
        .put(
            &format!("{url}/api/config/welcome"),
            &json!({"value": "Welcome to Acme"}),
        )
        .await;
    assert_eq!((r.status, r.site.as_str()), (200, "primary"), "{}", r.body);
    let r = stack
        .put(
            &format!("{url}/api/pages/help"),
            &json!({"title": "Help", "body": "Call the helpdesk"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = stack
        .put(
            &format!("{url}/api/client_versions/linux"),
            &json!({"version": "6.1.0", "download_url": "https://example.com/linux"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let config = stack.config.display().to_string();
    let out = stack.gsb(&["copy-config", "--config", &config]).await;
    assert!(out.status.success(), "gsb copy-config failed");

    let r = stack.get(&format!("{b}/api/config/welcome")).await;
    assert_eq!(r.status, 200, "welcome on the backup: {}", r.body);
    assert_eq!(r.json()["value"], "Welcome to Acme");
    let r = stack.get(&format!("{b}/api/pages/help")).await;
    assert_eq!(r.status, 200, "page on the backup: {}", r.body);
    assert_eq!(r.json()["body"], "Call the helpdesk");
    let r = stack.get(&format!("{b}/api/client_versions/linux")).await;
    assert_eq!(r.status, 200, "client version on the backup: {}", r.body);
    assert_eq!(r.json()["version"], "6.1.0");

    // Someone edits the backup's config by hand.
    let r = stack
        .put(
            &format!("{b}/api/config/welcome"),
            &json!({"value": "edited on the backup"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = stack
        .put(
            &format!("{b}/api/config/backup_only"),
            &json!({"value": "x"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A barrier: a user created on the backup after those edits has reached the primary, so the
    // replicator has processed everything the backup wrote before it.
    let marker = stack.create_user(&b, "Marker", "backup").await;
    stack
        .wait_json(
            &format!("{p}/api/users/{}", marker["id"].as_str().unwrap()),
            "the marker user on the primary",
            REPLICATION_DEADLINE,
        )
        .await;
    let r = stack.get(&format!("{p}/api/config/welcome")).await;
    assert_eq!(
        r.json()["value"],
        "Welcome to Acme",
        "the backup's edit reached the primary"
    );
    let r = stack.get(&format!("{p}/api/config/backup_only")).await;
    assert_eq!(
        r.status, 404,
        "a key made on the backup reached the primary: {}",
        r.body
    );

    // The next copy makes the backup the primary's snapshot again (even after a copy runs the
    // other way is never taken).
    let out = stack.gsb(&["copy-config", "--config", &config]).await;
    assert!(out.status.success(), "second gsb copy-config failed");
    let r = stack.get(&format!("{b}/api/config/welcome")).await;
    assert_eq!(r.json()["value"], "Welcome to Acme");
    let r = stack.get(&format!("{b}/api/config/backup_only")).await;
    assert_eq!(
        r.status, 404,
        "the copy did not replace the backup's rows: {}",
        r.body
    );
    let r = stack.get(&format!("{p}/api/config/backup_only")).await;
    assert_eq!(r.status, 404, "{}", r.body);
}
