//! Two real `gsb replicator` processes on one site pair: the second waits as a standby
//! (`"active": false` on `/status`), takes over within a deadline after the first is killed
//! with SIGKILL mid-load, and nothing is lost or duplicated. Needs `cargo build -p gsb` first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use gsb_replicator::{verify, Config};
use gsb_tests::{gsb_bin, wait_for, wait_until, Proc};

/// Longest a standby may take to replicate after the active instance died.
const TAKEOVER: Duration = Duration::from_secs(10);

fn spawn(name: &str, config: &Path) -> Proc {
    Proc::spawn(
        name,
        Command::new(gsb_bin())
            .args(["--log-format", "json", "replicator", "--config"])
            .arg(config),
    )
}

/// The `/status` address a replicator logged (it binds port 0).
async fn status_url(p: &Proc) -> String {
    let addr: SocketAddr = wait_for(Duration::from_secs(30), "the metrics listen line", || {
        let out = p.output();
        async move {
            out.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "replicator metrics and status listening")
                .and_then(|v| v["listen"].as_str()?.parse().ok())
        }
    })
    .await;
    format!("http://{addr}/status")
}

/// `active` from `/status`, None while it does not answer.
async fn active(http: &reqwest::Client, url: &str) -> Option<bool> {
    let v: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
    v["active"].as_bool()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_sigkill_of_the_active_replicator_losing_nothing() {
    let (p, b) = common::servers(common::SITE_TABLES).await;
    let text = common::config_text(&p, &b, "batch_size = 200\n");
    let config = Config::from_toml_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gsb.toml");
    std::fs::write(&path, &text).unwrap();
    let http = reqwest::Client::new();

    let mut first = spawn("replicator-1", &path);
    let first_url = status_url(&first).await;
    wait_until(
        Duration::from_secs(30),
        "first replicator active",
        || async { active(&http, &first_url).await == Some(true) },
    )
    .await;
    let second = spawn("replicator-2", &path);
    let second_url = status_url(&second).await;
    // It answers, and keeps saying standby while the first holds the lock.
    for _ in 0..5 {
        let a = wait_for(Duration::from_secs(10), "second replicator status", || {
            active(&http, &second_url)
        })
        .await;
        assert!(!a, "two active replicators on one pair");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(active(&http, &first_url).await, Some(true));

    // A steady write load on both sites across the takeover.
    let (pc, bc) = (p.client("site").await, b.client("site").await);
    let writers = common::two_way_load(&p, &b, Duration::from_millis(20)).await;
    common::wait_replicating(&bc).await;
    first.kill9();
    let killed = Instant::now();
    wait_until(TAKEOVER, "the standby active after the SIGKILL", || async {
        active(&http, &second_url).await == Some(true)
    })
    .await;
    println!("takeover after SIGKILL: {:?}", killed.elapsed());
    for w in writers {
        w.await.unwrap();
    }
    wait_until(
        Duration::from_secs(60),
        "verify equal after the takeover",
        || async { verify(&config).await.map(|r| r.is_equal()).unwrap_or(false) },
    )
    .await;
    common::assert_no_loss_no_duplicate([&pc, &bc], 6000).await;
    drop(second);
}
