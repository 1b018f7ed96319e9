//! `kill -9` of the real `gsb replicator` binary mid-batch under a steady write load, then a
//! restart: verify equal, no duplicate, no loss. Needs `cargo build -p gsb` first.

use std::process::Command;
use std::time::Duration;

mod common;

use gsb_replicator::{verify, Config};
use gsb_tests::{gsb_bin, wait_until, Proc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_binary_under_load_then_restart_loses_and_duplicates_nothing() {
    let (p, b) = common::servers(common::SITE_TABLES).await;
    let text = common::config_text(&p, &b, "batch_size = 200\n");
    let config = Config::from_toml_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gsb.toml");
    std::fs::write(&path, &text).unwrap();
    let spawn = || {
        Proc::spawn(
            "gsb-replicator",
            Command::new(gsb_bin())
                .arg("replicator")
                .arg("--config")
                .arg(&path),
        )
    };
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
