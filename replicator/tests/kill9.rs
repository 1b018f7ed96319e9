//! `kill -9` of the real `gsb replicator` binary mid-batch under a steady write load, then a
//! restart: verify equal, no duplicate, no loss. Needs `cargo build -p gsb` first.

use std::process::Command;
use std::time::Duration;

#[macro_use]
mod common;

use gsb_replicator::{verify, Config};
use gsb_tests::{gsb_bin, wait_until, Proc};

/// Writes `text` as `dir/gsb.toml`; returns what starts `gsb replicator` on it.
fn replicator_binary(text: &str, dir: &std::path::Path) -> impl Fn() -> Proc {
    let path = dir.join("gsb.toml");
    std::fs::write(&path, text).unwrap();
    move || {
        Proc::spawn(
            "gsb-replicator",
            Command::new(gsb_bin())
                .arg("replicator")
                .arg("--config")
                .arg(&path),
        )
    }
}

both_captures!(kill9_of_the_binary_under_load_then_restart_loses_and_duplicates_nothing);

async fn kill9_of_the_binary_under_load_then_restart_loses_and_duplicates_nothing(capture: &str) {
    let (p, b) = common::servers(common::SITE_TABLES).await;
    let extra = format!("batch_size = 200\n{}", common::capture_line(capture));
    let text = common::config_text(&p, &b, &extra);
    let config = Config::from_toml_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spawn = replicator_binary(&text, dir.path());
    let mut rep = spawn();
    let (pc, bc) = (p.client("site").await, b.client("site").await);
    let writers = common::two_way_load(&p, &b, Duration::from_millis(10)).await;
    common::wait_replicating(&bc).await;
    rep.kill9();
    for w in writers {
        w.await.unwrap();
    }
    let _rep = spawn();
    wait_until(
        Duration::from_secs(60),
        "verify equal after kill -9 and restart",
        || async { verify(&config).await.map(|r| r.is_equal()).unwrap_or(false) },
    )
    .await;
    common::assert_no_loss_no_duplicate([&pc, &bc], 6000).await;
}

async fn triggers_left(p: &tokio_postgres::Client, b: &tokio_postgres::Client) -> i64 {
    let q = "SELECT count(*) FROM pg_trigger WHERE tgname = 'gsb_capture'";
    common::count(p, q).await + common::count(b, q).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_the_switch_from_the_trigger_capture_loses_and_duplicates_nothing() {
    let (p, b) = common::servers(common::SITE_TABLES).await;
    let (pc, bc) = (p.client("site").await, b.client("site").await);
    let triggers = Config::from_toml_str(&common::config_text(
        &p,
        &b,
        "capture = \"triggers\"\npoll_interval = \"50ms\"\n",
    ))
    .unwrap();
    let r = common::start(&triggers);
    common::wait_streaming(&pc, &bc).await;
    r.shutdown().await;
    // A change log of some size on each site, then writers that keep going throughout.
    for (c, tag) in [(&pc, "p"), (&bc, "b")] {
        c.batch_execute(&format!(
            "INSERT INTO users (id, email) SELECT md5('{tag}' || g)::uuid, '{tag}' || g FROM generate_series(1, 20000) g"
        ))
        .await
        .unwrap();
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let wp = tokio::spawn(common::steady_writer(p.dsn("site"), "wp", stop.clone()));
    let wb = tokio::spawn(common::steady_writer(b.dsn("site"), "wb", stop.clone()));
    let text = common::config_text(&p, &b, "batch_size = 500\n");
    let config = Config::from_toml_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spawn = replicator_binary(&text, dir.path());
    // Killed as soon as each step of the switch has been logged (the process runs on for a
    // moment: the kill lands somewhere after it), each time restarted from what is left.
    for step in [
        "switching from the trigger capture",
        "change logs drained with writers running",
        "the logical stream of this site starts here",
        "capture triggers dropped",
    ] {
        if triggers_left(&pc, &bc).await == 0 {
            break; // an earlier run got through the whole switch before its kill
        }
        let mut rep = spawn();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !rep.output().contains(step) {
            assert!(
                rep.is_running() && std::time::Instant::now() < deadline,
                "waiting for {step:?}: {}",
                rep.tail(20)
            );
            if rep.output().contains("trigger capture removed") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        rep.kill9();
    }
    let _rep = spawn();
    wait_until(Duration::from_secs(60), "the triggers removed", || async {
        triggers_left(&pc, &bc).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let (np, nb) = (wp.await.unwrap(), wb.await.unwrap());
    let want = 40000 + np + nb;
    wait_until(
        Duration::from_secs(90),
        "every row on both sites",
        || async {
            common::count(&pc, "SELECT count(*) FROM users").await == want
                && common::count(&bc, "SELECT count(*) FROM users").await == want
        },
    )
    .await;
    for c in [&pc, &bc] {
        for (tag, n) in [("wp-", np), ("wb-", nb), ("p", 20000), ("b", 20000)] {
            let q = format!("SELECT count(*) FROM users WHERE email LIKE '{tag}%'");
            assert_eq!(common::count(c, &q).await, n, "{tag}");
        }
    }
    wait_until(Duration::from_secs(30), "verify equal", || async {
        verify(&config).await.map(|r| r.is_equal()).unwrap_or(false)
    })
    .await;
}
