//! End-to-end tests of the proxy's control plane: the real `gsb proxy` binary in front of two
//! test upstreams over loopback (listeners on free ports): health-driven failover and failback,
//! partial failure, the admin API and CLI, anti-flap, forced state across restarts, bad config.
//! Every wait polls a condition with a deadline.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gsb_tests::upstream::{self, Upstream};
use gsb_tests::{free_port, gsb_bin, wait_for, wait_until, Proc};
use serde_json::Value;

const READY: Duration = Duration::from_secs(15);
const TOKEN: &str = "s3cret-admin-token";

/// A running `gsb proxy` and its config directory.
struct Gsb {
    proc: Proc,
    port: u16,
    admin: u16,
    dir: tempfile::TempDir,
}

fn write_config(
    dir: &Path,
    port: u16,
    admin: u16,
    primary: &Upstream,
    backup: &Upstream,
    failover: &str,
) -> PathBuf {
    std::fs::write(dir.join("admin.token"), format!("{TOKEN}\n")).unwrap();
    let config = format!(
        r#"
[proxy]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"
token_file = "admin.token"

[sites.primary]
url = "{p}"
[sites.backup]
url = "{b}"

[health]
interval = "100ms"
timeout = "300ms"
rise = 2
fall = 2
[[health.components]]
name = "web"
path = "/health/web"
[[health.components]]
name = "api"
path = "/health/api"

[failover]
{failover}
"#,
        p = primary.url(),
        b = backup.url(),
    );
    let path = dir.join("gsb.toml");
    std::fs::write(&path, config).unwrap();
    path
}

impl Gsb {
    /// Starts a proxy in a new directory; `failover` holds the `[failover]` lines.
    async fn start(primary: &Upstream, backup: &Upstream, failover: &str) -> Gsb {
        let dir = tempfile::tempdir().unwrap();
        let (port, admin) = (free_port(), free_port());
        write_config(dir.path(), port, admin, primary, backup, failover);
        Gsb::launch(dir, port, admin).await
    }

    async fn launch(dir: tempfile::TempDir, port: u16, admin: u16) -> Gsb {
        let proc = Proc::spawn(
            "gsb-proxy",
            Command::new(gsb_bin())
                .arg("proxy")
                .arg("--config")
                .arg(dir.path().join("gsb.toml")),
        );
        let gsb = Gsb {
            proc,
            port,
            admin,
            dir,
        };
        // Ready: the admin API answers and both sites have a verdict.
        wait_until(READY, "the proxy to probe both sites", || async {
            gsb.try_status().await.is_some_and(|s| {
                s["sites"]
                    .as_array()
                    .is_some_and(|a| a.len() == 2 && a.iter().all(|x| !x["verdict"].is_null()))
            })
        })
        .await;
        gsb
    }

    /// Stops it (SIGTERM) and starts it again with the same directory and ports.
    async fn restart(mut self) -> Gsb {
        let st = self.proc.terminate();
        assert!(st.success(), "SIGTERM exits 0, got {st:?}");
        Gsb::launch(self.dir, self.port, self.admin).await
    }

    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    async fn try_status(&self) -> Option<Value> {
        let r = reqwest::get(format!("{}/status", self.admin_url()))
            .await
            .ok()?;
        r.json().await.ok()
    }

    async fn status(&self) -> Value {
        self.try_status().await.expect("GET /status")
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .unwrap()
    }

    async fn detect(&self) -> Option<String> {
        let r = reqwest::get(format!("http://127.0.0.1:{}/detectbackup.php", self.port))
            .await
            .ok()?;
        r.text().await.ok()
    }

    async fn wait_detect(&self, want: &str, deadline: Duration) {
        wait_until(deadline, &format!("detectbackup to say {want}"), || async {
            self.detect().await.as_deref() == Some(want)
        })
        .await;
    }

    /// Runs a `gsb` admin subcommand against this proxy.
    async fn cli(&self, args: &[&str], with_token: bool) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(gsb_bin());
        cmd.args(args)
            .arg("--admin")
            .arg(self.admin_url())
            .env_remove("GSB_ADMIN_TOKEN");
        if with_token {
            cmd.arg("--token-file")
                .arg(self.dir.path().join("admin.token"));
        }
        cmd.output().await.unwrap()
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        let mut req = reqwest::Client::new()
            .post(format!("{}{path}", self.admin_url()))
            .body(body.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

/// The value of a metric line `name{labels} value` (labels as Prometheus prints them, sorted).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

async fn sites() -> (Upstream, Upstream) {
    (
        upstream::start("primary").await,
        upstream::start("backup").await,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn full_failure_moves_traffic_to_the_backup_and_back_after_hold_down() {
    let (primary, backup) = sites().await;
    let gsb = Gsb::start(
        &primary,
        &backup,
        "failback_after = \"1s\"\nmin_dwell = \"500ms\"",
    )
    .await;
    assert_eq!(gsb.detect().await.as_deref(), Some("Primary"));
    assert_eq!(gsb.get("/hello").await.headers()["x-upstream"], "primary");

    let stopped = Instant::now();
    primary.stop().await;
    gsb.wait_detect("Backup", Duration::from_secs(5)).await;
    let detected = stopped.elapsed();
    assert!(
        detected < Duration::from_secs(2),
        "full failure detected and moved in {detected:?}"
    );
    let r = gsb.get("/hello").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-upstream"],
        "backup",
        "requests get the backup's answers"
    );
    let s = gsb.status().await;
    assert_eq!(s["active"], "backup");
    assert_eq!(s["sites"][0]["verdict"], "down");
    assert_eq!(s["timeline"][0]["reason"], "primary_down");
    let m = gsb.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"gsb_failovers_total{from="primary",reason="primary_down",to="backup"}"#
        ),
        Some(1.0)
    );
    assert_eq!(metric(&m, r#"gsb_active_site{site="backup"}"#), Some(1.0));

    primary.restart().await;
    let back = Instant::now();
    gsb.wait_detect("Primary", Duration::from_secs(10)).await;
    assert!(
        back.elapsed() >= Duration::from_secs(1),
        "failback waited for the hold-down: {:?}",
        back.elapsed()
    );
    let s = gsb.status().await;
    assert_eq!(s["timeline"][1]["reason"], "failback");
    assert_eq!(gsb.get("/hello").await.headers()["x-upstream"], "primary");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_of_two_critical_components_failing_stays_on_primary_and_alerts() {
    let (primary, backup) = sites().await;
    let gsb = Gsb::start(&primary, &backup, "min_dwell = \"100ms\"").await;
    primary.set_component("api", 503);
    wait_until(
        Duration::from_secs(5),
        "primary degraded in /status",
        || async { gsb.status().await["sites"][0]["verdict"] == "degraded" },
    )
    .await;
    let m = gsb.metrics().await;
    assert_eq!(
        metric(&m, r#"gsb_degraded_alert{site="primary"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"gsb_site_state{site="primary",state="degraded"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"gsb_component_up{component="api",site="primary"}"#),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, r#"gsb_component_up{component="web",site="primary"}"#),
        Some(1.0)
    );
    // Many probe rounds later, traffic has not moved.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert_eq!(gsb.detect().await.as_deref(), Some("Primary"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = gsb.status().await;
    assert_eq!(s["active"], "primary");
    assert_eq!(s["sites"][0]["degraded_alert"], true);
    assert!(
        s["sites"][0]["evidence"].as_str().unwrap().contains("api"),
        "{s}"
    );
    assert!(s["timeline"].as_array().unwrap().is_empty());
    let page = reqwest::get(gsb.admin_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("Primary serving") && page.contains("DEGRADED"),
        "status page shows it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn manual_failover_and_failback_through_the_cli_need_the_token() {
    let (primary, backup) = sites().await;
    let gsb = Gsb::start(&primary, &backup, "").await;

    let out = gsb
        .cli(&["failover", "--to", "backup", "--reason", "drill"], false)
        .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "says why: {err}");
    assert_eq!(gsb.detect().await.as_deref(), Some("Primary"));

    let out = gsb
        .cli(&["failover", "--to", "backup", "--reason", "drill"], true)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        gsb.detect().await.as_deref(),
        Some("Backup"),
        "the move is effective when the command returns"
    );
    let out = gsb.cli(&["status"], false).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("active site: Backup") && text.contains("FORCED"),
        "{text}"
    );
    let s = gsb.status().await;
    assert_eq!(
        (s["forced"].as_str(), s["forced_reason"].as_str()),
        (Some("operator"), Some("drill"))
    );
    assert_eq!(metric(&gsb.metrics().await, "gsb_forced_state"), Some(1.0));

    let out = gsb.cli(&["failback"], true).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(gsb.detect().await.as_deref(), Some("Primary"));
    let s = gsb.status().await;
    assert_eq!(s["forced"], "none");
    let reasons: Vec<&str> = s["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["manual", "manual"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_rejects_bad_requests() {
    let (primary, backup) = sites().await;
    let gsb = Gsb::start(&primary, &backup, "").await;
    assert_eq!(
        gsb.post("/failover", None, r#"{"to":"backup"}"#).await.0,
        401
    );
    assert_eq!(
        gsb.post("/failover", Some("wrong"), r#"{"to":"backup"}"#)
            .await
            .0,
        401
    );
    assert_eq!(
        gsb.post("/auto", Some("s3cret-admin-tokeX"), "").await.0,
        401
    );
    let (code, body) = gsb
        .post("/failover", Some(TOKEN), r#"{"to":"elsewhere"}"#)
        .await;
    assert_eq!(code, 400);
    assert!(body.contains("`to`"), "names the field: {body}");
    let (code, body) = gsb.post("/failover", Some(TOKEN), "{not json").await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = gsb
        .post("/failover", Some(TOKEN), r#"{"to":"backup","reason":5}"#)
        .await;
    assert_eq!(code, 400);
    assert!(body.contains("`reason`"), "{body}");
    let r = reqwest::get(format!("{}/failover", gsb.admin_url()))
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = reqwest::get(format!("{}/nope", gsb.admin_url()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::get(format!("{}/healthz", gsb.admin_url()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        gsb.detect().await.as_deref(),
        Some("Primary"),
        "nothing moved"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn flapping_primary_moves_at_most_once_per_min_dwell() {
    let (primary, backup) = sites().await;
    let dwell = Duration::from_secs(3);
    let gsb = Gsb::start(
        &primary,
        &backup,
        "failback_after = \"300ms\"\nmin_dwell = \"3s\"",
    )
    .await;
    let flapper = {
        let primary = primary.clone();
        tokio::spawn(async move {
            for i in 0..10 {
                let code = if i % 2 == 0 { 503 } else { 200 };
                primary.set_component("web", code);
                primary.set_component("api", code);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            primary.set_component("web", 200);
            primary.set_component("api", 200);
        })
    };
    // Record when the active site changes, as seen from outside.
    let mut changes: Vec<(Instant, String)> = Vec::new();
    let mut last = "Primary".to_string();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if let Some(now) = gsb.detect().await {
            if now != last {
                changes.push((Instant::now(), now.clone()));
                last = now;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flapper.await.unwrap();
    assert!(
        !changes.is_empty(),
        "the flapping primary did cause a failover"
    );
    for pair in changes.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        // 150 ms of slack for the observer's polling.
        assert!(
            gap + Duration::from_millis(150) >= dwell,
            "moves {gap:?} apart: {changes:?}"
        );
    }
    let moves = gsb.status().await["timeline"].as_array().unwrap().len();
    assert!(moves <= 4, "at most one move per 3s in 10s, got {moves}");
    assert_eq!(moves, changes.len(), "every move is in the timeline");
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_state_survives_a_proxy_restart() {
    let (primary, backup) = sites().await;
    let gsb = Gsb::start(
        &primary,
        &backup,
        "failback_after = \"200ms\"\nmin_dwell = \"100ms\"",
    )
    .await;
    let (code, body) = gsb
        .post(
            "/failover",
            Some(TOKEN),
            r#"{"to":"backup","reason":"db migration"}"#,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        gsb.dir.path().join("gsb-proxy.state").is_file(),
        "state file written beside the config"
    );
    let gsb = gsb.restart().await;
    let s = gsb.status().await;
    assert_eq!(
        s["active"], "backup",
        "a restart never silently moves traffic"
    );
    assert_eq!(s["forced"], "operator");
    assert_eq!(s["sites"][0]["verdict"], "healthy");
    // Well past failback_after with a healthy primary, the operator's choice still holds.
    let seen_rounds = wait_for(
        Duration::from_secs(5),
        "a second of probe rounds",
        || async {
            let m = gsb.metrics().await;
            metric(&m, "gsb_probe_round_duration_seconds_count").filter(|n| *n >= 10.0)
        },
    )
    .await;
    assert!(seen_rounds >= 10.0);
    assert_eq!(gsb.detect().await.as_deref(), Some("Backup"));
    // Releasing it hands the decision back: the healthy primary gets traffic again.
    let (code, _) = gsb.post("/auto", Some(TOKEN), "").await;
    assert_eq!(code, 200);
    gsb.wait_detect("Primary", Duration::from_secs(5)).await;
    let gsb = gsb.restart().await;
    assert_eq!(gsb.status().await["forced"], "none");
    assert_eq!(gsb.detect().await.as_deref(), Some("Primary"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_config_is_rejected_with_exit_64_naming_the_key() {
    let (primary, backup) = sites().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        free_port(),
        free_port(),
        &primary,
        &backup,
        "min_dwell = \"10s\"",
    );
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("rise = 2", "rise = 0");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(gsb_bin())
        .arg("proxy")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("health.rise"), "names the key: {err}");
    let out = Command::new(gsb_bin())
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("health.rise"));

    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("rise = 0", "rise = 2\nsurprise = 1");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(gsb_bin())
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("surprise"),
        "unknown keys are named"
    );
}

/// A stand-in for the replicator's `GET /status`: answers the shape the proxy reads, with
/// `backup_to_primary.pending_rows` taken from `pending` at each request, and `active` from
/// `active` (a standby answers `false`).
async fn fake_replicator(
    pending: std::sync::Arc<std::sync::atomic::AtomicU64>,
    active: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/status", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let pending = pending.clone();
            let active = active.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let n = pending.load(std::sync::atomic::Ordering::SeqCst);
                let active = active.load(std::sync::atomic::Ordering::SeqCst);
                let body = serde_json::json!({"active": active, "directions": {
                    "backup_to_primary": {"pending_rows": n, "oldest_pending_age_seconds": 1.5},
                    "primary_to_backup": {"pending_rows": 0, "oldest_pending_age_seconds": 0.0}}})
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn failback_waits_for_the_replication_backlog() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let (primary, backup) = sites().await;
    let pending = Arc::new(AtomicU64::new(0));
    let active = Arc::new(AtomicBool::new(true));
    let (url, task) = fake_replicator(pending.clone(), active.clone()).await;
    let failover = format!(
        "failback_after = \"300ms\"\nmin_dwell = \"100ms\"\nreplicator_status = \"{url}\"\nfailback_max_wait = \"1h\""
    );
    let gsb = Gsb::start(&primary, &backup, &failover).await;
    primary.stop().await;
    gsb.wait_detect("Backup", Duration::from_secs(5)).await;
    // Users wrote on the backup; those rows have not reached the primary yet.
    pending.store(7, Ordering::SeqCst);
    primary.restart().await;
    wait_until(
        Duration::from_secs(5),
        "failback blocked by the backlog",
        || async {
            let s = gsb.status().await;
            s["replication"]["failback_blocked"] == true
                && s["replication"]["backup_to_primary_pending"] == 7
        },
    )
    .await;
    assert_eq!(
        metric(&gsb.metrics().await, "gsb_failback_blocked"),
        Some(1.0)
    );
    assert_eq!(
        gsb.detect().await.as_deref(),
        Some("Backup"),
        "no failback with rows pending"
    );
    // A standby answers now (the active replicator died): its zero is not a drained backlog.
    active.store(false, Ordering::SeqCst);
    pending.store(0, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(5),
        "the gate to distrust the standby",
        || async {
            let s = gsb.status().await;
            s["replication"]["failback_blocked"] == true
                && s["replication"]["replicator_active"] == false
                && s["replication"]["gate"]
                    .as_str()
                    .is_some_and(|g| g.contains("standby"))
        },
    )
    .await;
    let page = reqwest::get(gsb.admin_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("standby"),
        "the status page says why failback waits"
    );
    assert_eq!(gsb.detect().await.as_deref(), Some("Backup"));
    assert!(
        gsb.proc.output().contains("standby"),
        "the log says why failback waits"
    );
    active.store(true, Ordering::SeqCst);
    gsb.wait_detect("Primary", Duration::from_secs(5)).await;
    let s = gsb.status().await;
    assert_eq!(s["timeline"][1]["reason"], "failback");
    assert_eq!(s["replication"]["failback_blocked"], false);
    task.abort();
}

/// Sends SIGHUP to the proxy (config reload).
fn hangup(gsb: &Gsb) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gsb.proc.pid()).expect("pid fits"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_config_and_refuses_a_bad_one() {
    let (primary, backup) = sites().await;
    let other = upstream::start("backup2").await;
    let gsb = Gsb::start(&primary, &backup, "failback_after = \"1h\"").await;
    // A long request in flight on the primary must survive the reload.
    let slow = {
        let url = format!("http://127.0.0.1:{}/slow?ms=1500", gsb.port);
        tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status().as_u16()) })
    };
    wait_until(
        Duration::from_secs(5),
        "the slow request to reach the primary",
        || async { primary.requests_to("/slow") == 1 },
    )
    .await;

    // New backup URL, slower health timing, and a new listener address (needs a restart).
    let path = write_config(
        gsb.dir.path(),
        free_port(),
        gsb.admin,
        &primary,
        &other,
        "failback_after = \"1h\"",
    );
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("interval = \"100ms\"", "interval = \"200ms\"");
    std::fs::write(&path, text).unwrap();
    hangup(&gsb);
    wait_until(
        Duration::from_secs(5),
        "the reload to be applied",
        || async {
            let s = gsb.status().await;
            s["config_reload"]["ok"] == true && s["sites"][1]["url"] == other.url().as_str()
        },
    )
    .await;
    let s = gsb.status().await;
    assert_eq!(
        s["config_reload"]["needs_restart"],
        serde_json::json!(["proxy.listen"])
    );
    let message = s["config_reload"]["message"].as_str().unwrap();
    assert!(
        message.contains("sites.backup") && message.contains("health"),
        "{message}"
    );
    assert_eq!(s["active"], "primary", "a reload moves no traffic");
    assert_eq!(s["timeline"], serde_json::json!([]));
    // The old listener still serves (not rebound); the in-flight request finished.
    assert_eq!(gsb.get("/hello").await.headers()["x-upstream"], "primary");
    assert_eq!(
        slow.await.unwrap().ok(),
        Some(200),
        "in-flight request kept"
    );
    // The new backup takes traffic when the proxy fails over.
    wait_until(
        Duration::from_secs(5),
        "the new backup to be probed healthy",
        || async { gsb.status().await["sites"][1]["verdict"] == "healthy" },
    )
    .await;
    let out = gsb.cli(&["failover", "--to", "backup"], true).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(gsb.get("/hello").await.headers()["x-upstream"], "backup2");
    assert_eq!(
        backup.requests_to("/hello"),
        0,
        "the old backup is not used"
    );

    // A bad file is refused, named, and the running config kept.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("rise = 2", "rise = 0")).unwrap();
    hangup(&gsb);
    wait_until(
        Duration::from_secs(5),
        "the bad reload to be refused",
        || async { gsb.status().await["config_reload"]["ok"] == false },
    )
    .await;
    let s = gsb.status().await;
    assert!(
        s["config_reload"]["message"]
            .as_str()
            .unwrap()
            .contains("health.rise"),
        "{s:#}"
    );
    assert_eq!(
        s["sites"][1]["url"],
        other.url().as_str(),
        "old config kept"
    );
    assert_eq!(gsb.get("/hello").await.headers()["x-upstream"], "backup2");
    let log = gsb.proc.output();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("config reload REFUSED"))
        .collect();
    assert_eq!(refused.len(), 1, "one clear log line: {log}");
    assert!(refused[0].contains("health.rise"), "{}", refused[0]);
}

/// Headless Chromium, or `None` when `GSB_SKIP_BROWSER=1` lets the test skip without one.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        });
    match found {
        Some(p) => Some(p),
        None if std::env::var("GSB_SKIP_BROWSER").as_deref() == Ok("1") => {
            eprintln!("SKIPPED: no chromium on PATH and GSB_SKIP_BROWSER=1");
            None
        }
        None => panic!(
            "the status page test needs headless Chromium: `apt-get install -y chromium` \
             (or set GSB_SKIP_BROWSER=1 to skip it knowingly)"
        ),
    }
}

/// Runs headless Chromium on `url` with `args` (`--dump-dom`, `--screenshot=...`); returns stdout.
async fn browse(browser: &Path, url: &str, args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("chromium finished within 60s")
        .expect("chromium ran");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where test artifacts (screenshots) are kept: `target/test-artifacts/`.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_renders_in_a_real_browser_and_follows_a_failover() {
    let Some(browser) = chromium() else { return };
    let (primary, backup) = sites().await;
    let gsb = Gsb::start(&primary, &backup, "").await;
    let page = gsb.admin_url() + "/";

    let dom = browse(&browser, &page, &["--dump-dom".into()]).await;
    assert!(dom.contains("Primary serving"), "{dom}");
    assert!(
        dom.contains("id=\"token\""),
        "a token field for the buttons"
    );
    assert!(
        !dom.contains(TOKEN),
        "the token is never embedded in the page"
    );
    assert!(
        dom.contains("gsb failover --to backup"),
        "copyable commands"
    );

    let out = gsb
        .cli(
            &["failover", "--to", "backup", "--reason", "browser test"],
            true,
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = browse(&browser, &page, &["--dump-dom".into()]).await;
    assert!(dom.contains("Backup serving"), "{dom}");
    assert!(dom.contains("browser test"), "the reason is shown");

    let shot = artifacts_dir().join("status-page-backup.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &browser,
        &page,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,900".into(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    println!("status page screenshot: {}", shot.display());
}
