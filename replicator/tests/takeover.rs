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

/// Starts one replicator, waits until it is active, then starts a second one (a standby);
/// returns both with their `/status` URLs.
async fn active_then_standby(
    http: &reqwest::Client,
    config: &Path,
) -> (Proc, String, Proc, String) {
    let first = spawn("replicator-1", config);
    let first_url = status_url(&first).await;
    wait_until(
        Duration::from_secs(30),
        "first replicator active",
        || async { active(http, &first_url).await == Some(true) },
    )
    .await;
    let second = spawn("replicator-2", config);
    let second_url = status_url(&second).await;
    (first, first_url, second, second_url)
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

    let (mut first, first_url, second, second_url) = active_then_standby(&http, &path).await;
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

/// With `[coordination]` the active replicator is elected on etcd, not on the primary's
/// database: a standby takes the role after the active one dies even while the primary's
/// database is down, and replicates once it is back, losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_election_hands_over_while_the_primary_database_is_down() {
    let etcd = gsb_tests::etcd::EtcdCluster::start(1).await;
    let (mut p, b) = common::servers(common::SITE_TABLES).await;
    let text = format!(
        "{}\n[coordination]\netcd = {}\nlease_ttl = \"2s\"\n",
        common::config_text(&p, &b, "batch_size = 200\n"),
        etcd.toml_endpoints()
    );
    let config = Config::from_toml_str(&text).unwrap();
    assert!(config.coordination.is_some());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gsb.toml");
    std::fs::write(&path, &text).unwrap();
    let http = reqwest::Client::new();
    let holder = || {
        let out = etcd.etcdctl(&["get", "--print-value-only", "/gsb/replicator/leader"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };

    let (mut first, _, second, second_url) = active_then_standby(&http, &path).await;
    let first_holder = holder();
    assert!(
        first_holder.ends_with(&format!("-replicator-{}", first.pid())),
        "{first_holder}"
    );
    assert_eq!(active(&http, &second_url).await, Some(false));

    let pc = p.client("site").await;
    let writers = common::two_way_load(&p, &b, Duration::from_millis(20)).await;
    for w in writers {
        w.await.unwrap();
    }
    drop(pc);
    // The primary's database goes down, then the active replicator dies.
    tokio::task::block_in_place(|| p.stop());
    first.kill9();
    let killed = Instant::now();
    wait_until(TAKEOVER, "the standby holds the role on etcd", || async {
        holder().ends_with(&format!("-replicator-{}", second.pid()))
    })
    .await;
    println!(
        "etcd role handed over after SIGKILL: {:?}",
        killed.elapsed()
    );
    // The primary returns: the new active replicator catches up, nothing lost or doubled.
    tokio::task::block_in_place(|| p.restart());
    wait_until(
        Duration::from_secs(30),
        "the second replicator active",
        || async { active(&http, &second_url).await == Some(true) },
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "verify equal after the takeover",
        || async { verify(&config).await.map(|r| r.is_equal()).unwrap_or(false) },
    )
    .await;
    let (pc, bc) = (p.client("site").await, b.client("site").await);
    common::assert_no_loss_no_duplicate([&pc, &bc], 6000).await;
    drop(second);
}
