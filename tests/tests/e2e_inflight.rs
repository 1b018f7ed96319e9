//! Story 8: requests in flight during the failover. Clients loop idempotent GETs through the
//! proxy while the primary is killed (site process and database); every one gets a good answer.

mod e2e_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e_support::{Stack, StackOptions, BACKUP, FAILOVER_DEADLINE, REPLICATION_DEADLINE};
use gsb_tests::wait_until;

/// Concurrent clients.
const CLIENTS: usize = 4;
/// Pause between one client's requests: a steady load, not a flood that would only measure the
/// retry budget.
const PACE: Duration = Duration::from_millis(10);

/// What the clients saw.
#[derive(Default)]
struct Tally {
    primary: AtomicU64,
    backup: AtomicU64,
    failures: AtomicU64,
    /// The first few failures, for the message.
    examples: std::sync::Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_idempotent_request_fails_during_the_failover() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let url = stack.proxy_url.clone();
    let ada = stack.create_user(&url, "Ada", "primary").await;
    let path = format!("/api/users/{}", ada["id"].as_str().unwrap());
    stack
        .wait_json(
            &format!("{}{path}", stack.site_urls[BACKUP]),
            "Ada replicated to the backup",
            REPLICATION_DEADLINE,
        )
        .await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tracker = tokio_util::task::TaskTracker::new();
    for _ in 0..CLIENTS {
        let (http, target, tally, stop) = (
            stack.http.clone(),
            format!("{url}{path}"),
            tally.clone(),
            stop.clone(),
        );
        tracker.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let outcome = match http.get(&target).send().await {
                    Ok(resp) if resp.status() == 200 => {
                        let site = resp
                            .headers()
                            .get("x-gsb-site")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        match (site.as_str(), resp.text().await) {
                            ("primary", Ok(body)) if body.contains("Ada") => Ok(&tally.primary),
                            ("backup", Ok(body)) if body.contains("Ada") => Ok(&tally.backup),
                            (s, body) => Err(format!("200 from {s:?} with body {body:?}")),
                        }
                    }
                    Ok(resp) => {
                        let (code, site) =
                            (resp.status(), resp.headers().get("x-gsb-site").cloned());
                        Err(format!(
                            "{code} from {site:?}: {:?}",
                            resp.text().await.unwrap_or_default()
                        ))
                    }
                    Err(e) => Err(format!("no answer: {e}")),
                };
                match outcome {
                    Ok(counter) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(what) => {
                        tally.failures.fetch_add(1, Ordering::Relaxed);
                        let mut ex = tally.examples.lock().unwrap();
                        if ex.len() < 10 {
                            ex.push(what);
                        }
                    }
                }
                tokio::time::sleep(PACE).await;
            }
        });
    }
    tracker.close();

    wait_until(
        Duration::from_secs(10),
        "requests served by the primary",
        || async { tally.primary.load(Ordering::Relaxed) >= 100 },
    )
    .await;
    stack.kill_primary();
    let took = stack.wait_served_by("Backup", FAILOVER_DEADLINE).await;
    wait_until(
        Duration::from_secs(10),
        "requests served by the backup",
        || async { tally.backup.load(Ordering::Relaxed) >= 100 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    tracker.wait().await;

    let (p, b, f) = (
        tally.primary.load(Ordering::Relaxed),
        tally.backup.load(Ordering::Relaxed),
        tally.failures.load(Ordering::Relaxed),
    );
    eprintln!("in-flight story: {p} answers from the primary, {b} from the backup, {f} failures; detectbackup turned after {took:?}");
    assert_eq!(
        f,
        0,
        "requests failed during the failover: {:?}",
        tally.examples.lock().unwrap()
    );
}
