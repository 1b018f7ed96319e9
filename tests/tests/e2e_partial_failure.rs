//! Story 3: a partial failure (the primary's meetings component broken by the site's fault
//! switch) does not move traffic; `/status` and `/metrics` show `degraded`; `gsb failover --to
//! backup` moves it; `gsb failback` brings it back.

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::{metric, Stack, StackOptions, FAILOVER_DEADLINE, PRIMARY};
use gsb_tests::wait_until;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_failure_alerts_and_an_operator_moves_traffic() {
    let stack = Stack::start(StackOptions {
        allow_faults: true,
        ..StackOptions::default()
    })
    .await;
    let faults = format!("{}/_faults", stack.site_urls[PRIMARY]);
    let r = stack
        .post(&faults, &json!({"component": "meetings", "broken": true}))
        .await;
    assert_eq!(r.status, 200, "fault switch: {}", r.body);

    wait_until(
        Duration::from_secs(10),
        "metrics to show the primary degraded",
        || async {
            let m = stack.proxy_metrics().await;
            metric(
                &m,
                "gsb_site_state",
                &[("site", "primary"), ("state", "degraded")],
            ) == Some(1.0)
        },
    )
    .await;
    let m = stack.proxy_metrics().await;
    assert_eq!(
        metric(
            &m,
            "gsb_site_state",
            &[("site", "primary"), ("state", "healthy")]
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "gsb_component_up",
            &[("site", "primary"), ("component", "meetings")]
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "gsb_component_up",
            &[("site", "primary"), ("component", "db")]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "gsb_active_site", &[("site", "primary")]),
        Some(1.0),
        "{m}"
    );
    let status = stack.proxy_status().await;
    assert_eq!(status["sites"][0]["site"], "primary", "{status:#}");
    assert_eq!(status["sites"][0]["verdict"], "degraded", "{status:#}");
    assert_eq!(status["sites"][0]["degraded_alert"], true, "{status:#}");
    assert_eq!(status["active"], "primary", "{status:#}");

    // Degraded alone never moves traffic: it stays for many probe rounds and past the
    // hold-down times (interval 100ms, fall 2, min_dwell 1s).
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(
            stack.detect().await.as_deref(),
            Some("Primary"),
            "a partial failure moved traffic"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = stack
        .gsb(&[
            "failover",
            "--to",
            "backup",
            "--reason",
            "meetings broken on primary",
        ])
        .await;
    assert!(out.status.success(), "gsb failover failed");
    stack.wait_served_by("Backup", FAILOVER_DEADLINE).await;
    let r = stack
        .get(&format!("{}/api/meetings", stack.proxy_url))
        .await;
    assert_eq!(
        r.status, 200,
        "meetings through the proxy after the failover: {}",
        r.body
    );
    assert_eq!(r.site, "backup");

    let out = stack.gsb(&["status"]).await;
    assert!(out.status.success(), "gsb status failed");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        text.contains("backup"),
        "gsb status does not name the active site: {text}"
    );
    let status = stack.proxy_status().await;
    assert_eq!(status["active"], "backup", "{status:#}");
    assert!(
        status.to_string().contains("meetings broken on primary"),
        "the operator's reason is not in /status: {status:#}"
    );

    // Repaired: the operator's failover still holds (a forced state) until the failback.
    let r = stack
        .post(&faults, &json!({"component": "meetings", "broken": false}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until(
        Duration::from_secs(10),
        "metrics to show the primary healthy",
        || async {
            let m = stack.proxy_metrics().await;
            metric(
                &m,
                "gsb_site_state",
                &[("site", "primary"), ("state", "healthy")],
            ) == Some(1.0)
        },
    )
    .await;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(
            stack.detect().await.as_deref(),
            Some("Backup"),
            "the forced failover did not hold"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = stack.gsb(&["failback"]).await;
    assert!(out.status.success(), "gsb failback failed");
    stack.wait_served_by("Primary", FAILOVER_DEADLINE).await;
    let r = stack
        .get(&format!("{}/api/meetings", stack.proxy_url))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.site, "primary");

    // `gsb auto` hands the decision back to the health checker: nothing is forced any more.
    let out = stack.gsb(&["auto"]).await;
    assert!(out.status.success(), "gsb auto failed");
    let status = stack.proxy_status().await;
    assert_eq!(status["forced"], "none", "{status:#}");
    assert_eq!(status["active"], "primary", "{status:#}");
}
