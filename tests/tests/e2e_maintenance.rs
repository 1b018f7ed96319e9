//! Story 6: a maintenance window that starts now (the current UTC minute, ending ~10 s after the
//! proxy starts) moves traffic to the backup, and back to the primary at its end.

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::{Stack, StackOptions, FAILBACK_DEADLINE};

/// How long the window lasts from the moment the proxy's config is written.
const WINDOW: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_window_moves_traffic_to_the_backup_and_back() {
    let stack = Stack::start(StackOptions {
        maintenance_ends_in: Some(WINDOW),
        ..StackOptions::default()
    })
    .await;
    let end = stack.maintenance_end.expect("a maintenance window");

    stack.wait_served_by("Backup", WINDOW / 2).await;
    assert!(
        Instant::now() < end,
        "the window ended before traffic moved"
    );
    let r = stack
        .get(&format!("{}/api/meetings", stack.proxy_url))
        .await;
    assert_eq!((r.status, r.site.as_str()), (200, "backup"), "{}", r.body);
    let status = stack.proxy_status().await;
    assert_eq!(status["maintenance_active"], true, "{status:#}");
    assert!(
        status["timeline"]
            .to_string()
            .to_lowercase()
            .contains("maintenance"),
        "the timeline does not say why traffic moved: {status:#}"
    );

    stack
        .wait_served_by("Primary", WINDOW + FAILBACK_DEADLINE)
        .await;
    // The window's end is known to the second (it is written as HH:MM plus whole seconds).
    let early = end.saturating_duration_since(Instant::now());
    assert!(
        early < Duration::from_millis(1500),
        "traffic came back {early:?} before the window ended"
    );
    let r = stack
        .get(&format!("{}/api/meetings", stack.proxy_url))
        .await;
    assert_eq!((r.status, r.site.as_str()), (200, "primary"), "{}", r.body);
}
