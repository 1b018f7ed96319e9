//! End-to-end tests of a fleet of three real `gsb proxy` processes on a real three-member etcd
//! cluster on loopback: one decision for the whole fleet, a quorum of votes before a move, a
//! proxy cut off from the primary that drains itself instead of moving, the decider's lease
//! and fence, operators talking to the fleet once, and etcd losing members.
//!
//! The tests in this file run one at a time (they time hand-overs on a 2-core machine).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use gsb_tests::etcd::EtcdCluster;
use gsb_tests::relay::Relay;
use gsb_tests::upstream::{self, Upstream};
use gsb_tests::{free_port, gsb_bin, wait_for, wait_until, Proc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const TOKEN: &str = "fleet-admin-token";
const LEASE_TTL: Duration = Duration::from_secs(2);
const READY: Duration = Duration::from_secs(30);

/// One fleet test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One proxy of the fleet.
struct Member {
    name: String,
    port: u16,
    admin: u16,
    config: PathBuf,
    proc: Option<Proc>,
}

impl Member {
    fn spawn(&mut self) {
        self.proc = Some(Proc::spawn(
            &self.name,
            Command::new(gsb_bin())
                .args(["proxy", "--config"])
                .arg(&self.config)
                .env("RUST_LOG", "info,gsb_fleet=debug"),
        ));
    }

    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.proc.as_ref().expect("running").pid() as i32)
    }

    async fn status(&self) -> Option<Value> {
        let r = reqwest::Client::new()
            .get(format!("{}/status", self.admin_url()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    async fn detect(&self) -> Option<String> {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/detectbackup", self.port))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url()))
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap()
    }

    async fn healthz(&self) -> (u16, String) {
        let r = reqwest::get(format!("{}/healthz", self.admin_url()))
            .await
            .expect("healthz");
        (r.status().as_u16(), r.text().await.unwrap())
    }

    fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.output()).unwrap_or_default()
    }
}

/// Three proxies, two sites, three etcd members.
struct Rig {
    etcd: EtcdCluster,
    primary: Upstream,
    _backup: Upstream,
    members: Vec<Member>,
    /// The relay `p1` reaches the primary through (to cut that one path).
    relay: Relay,
    _dir: tempfile::TempDir,
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

impl Rig {
    async fn start() -> Rig {
        let etcd = EtcdCluster::start(3).await;
        let (primary, backup) = upstream::start_pair().await;
        let relay = Relay::start(primary.addr()).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), TOKEN).unwrap();
        let mut members = Vec::new();
        for i in 0..3 {
            let name = format!("p{i}");
            let (port, admin) = (free_port(), free_port());
            let primary_url = if i == 1 { relay.url() } else { primary.url() };
            let config = dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"
[proxy]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
token_file = "admin.token"
[sites.primary]
url = "{primary_url}"
[sites.backup]
url = "{backup}"
[health]
interval = "100ms"
timeout = "300ms"
rise = 2
fall = 2
[failover]
failback_after = "3s"
min_dwell = "1s"
state_file = "{name}.state"
[coordination]
etcd = {etcd}
name = "{name}"
region = "{region}"
lease_ttl = "{ttl}s"
"#,
                    backup = backup.url(),
                    etcd = etcd.toml_endpoints(),
                    region = if i == 2 { "west" } else { "east" },
                    ttl = LEASE_TTL.as_secs(),
                ),
            )
            .unwrap();
            let mut m = Member {
                name,
                port,
                admin,
                config,
                proc: None,
            };
            m.spawn();
            members.push(m);
        }
        let rig = Rig {
            etcd,
            primary,
            _backup: backup,
            members,
            relay,
            _dir: dir,
        };
        rig.wait_formed().await;
        rig
    }

    /// Every member fresh in every member's view, one decider, everyone on the same revision.
    async fn wait_formed(&self) {
        wait_until(READY, "the fleet of 3 formed with one decider", || async {
            let mut deciders = 0;
            for m in &self.members {
                let Some(s) = m.status().await else {
                    return false;
                };
                let f = &s["fleet"];
                let fresh = f["members"]
                    .as_array()
                    .map_or(0, |a| a.iter().filter(|m| m["fresh"] == true).count());
                if fresh != 3 || f["coordination_up"] != true || f["decision_revision"] == 0 {
                    return false;
                }
                if f["applied_revision"] != f["decision_revision"] {
                    return false;
                }
                if f["verdict"][0] != "healthy" {
                    return false;
                }
                deciders += usize::from(f["is_decider"] == true);
            }
            deciders == 1
        })
        .await;
    }

    async fn decider(&self) -> usize {
        wait_for(READY, "a decider", || async {
            for (i, m) in self.members.iter().enumerate() {
                if m.proc.is_some() && m.status().await?["fleet"]["is_decider"] == true {
                    return Some(i);
                }
            }
            None
        })
        .await
    }

    async fn all_detect(&self, want: &str, deadline: Duration) {
        wait_until(deadline, &format!("every proxy answers {want}"), || async {
            for m in self.members.iter().filter(|m| m.proc.is_some()) {
                if m.detect().await.as_deref() != Some(want) {
                    return false;
                }
            }
            true
        })
        .await;
    }

    /// The fleet's moves as the decision records them (from any live member).
    async fn moves(&self) -> Vec<Value> {
        for m in self.members.iter().filter(|m| m.proc.is_some()) {
            if let Some(s) = m.status().await {
                return s["timeline"].as_array().cloned().unwrap_or_default();
            }
        }
        panic!("no member answers /status");
    }

    fn cli(&self, member: usize, args: &[&str]) -> std::process::Output {
        Command::new(gsb_bin())
            .args(args)
            .args(["--admin", &self.members[member].admin_url()])
            .env("GSB_ADMIN_TOKEN", TOKEN)
            .output()
            .expect("running gsb")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_killed_moves_the_whole_fleet_with_one_recorded_move() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    rig.all_detect("Primary", READY).await;
    rig.primary.stop().await;
    let started = Instant::now();
    rig.all_detect("Backup", Duration::from_secs(10)).await;
    let took = started.elapsed();
    let moves = rig.moves().await;
    assert_eq!(moves.len(), 1, "one move of the fleet: {moves:?}");
    assert_eq!(moves[0]["reason"], "primary_down");
    // Every proxy routes on the same decision, and each moved its traffic once.
    let mut revisions = Vec::new();
    for m in &rig.members {
        let s = m.status().await.unwrap();
        revisions.push(s["fleet"]["applied_revision"].clone());
        assert_eq!(s["timeline"].as_array().unwrap().len(), 1, "{}", m.name);
        let moved = metric(
            &m.metrics().await,
            "gsb_failovers_total{from=\"primary\",reason=\"primary_down\",to=\"backup\"}",
        );
        assert_eq!(moved, Some(1.0), "{} moved once", m.name);
    }
    assert!(revisions.windows(2).all(|w| w[0] == w[1]), "{revisions:?}");
    println!("fleet of 3 on the backup {took:?} after the primary died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_the_primary_drains_itself_and_nothing_moves() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    rig.all_detect("Primary", READY).await;
    // p1 reaches the primary through the relay: black-hole that one path.
    rig.relay.drop_traffic(true);
    let cut = &rig.members[1];
    let (code, body) = wait_for(Duration::from_secs(10), "p1 unready", || async {
        let (code, body) = cut.healthz().await;
        (code == 503).then_some((code, body))
    })
    .await;
    assert_eq!(code, 503);
    assert!(
        body.contains("cannot reach the active site (primary)"),
        "{body}"
    );
    // The alert names it, on every proxy.
    for m in &rig.members {
        wait_until(
            Duration::from_secs(5),
            "the dissent alert names p1",
            || async {
                let text = m.metrics().await;
                metric(
                    &text,
                    "gsb_fleet_dissent{member=\"p1\",region=\"east\",site=\"primary\"}",
                ) == Some(1.0)
            },
        )
        .await;
    }
    let s = rig.members[0].status().await.unwrap();
    let dissent = s["fleet"]["dissent"].to_string();
    assert!(dissent.contains("p1"), "{dissent}");
    // For 30 s: no move, every proxy still on the primary, the others ready.
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        for m in &rig.members {
            assert_eq!(m.detect().await.as_deref(), Some("Primary"), "{}", m.name);
        }
        assert_eq!(rig.members[0].healthz().await.0, 200);
        assert_eq!(rig.members[2].healthz().await.0, 200);
        assert!(rig.moves().await.is_empty(), "no move");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The path heals: p1 is ready again.
    rig.relay.drop_traffic(false);
    wait_until(Duration::from_secs(10), "p1 ready again", || async {
        cut.healthz().await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decider_killed_hands_over_within_the_lease_without_a_move() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start().await;
    let old = rig.decider().await;
    let killed_at = Instant::now();
    rig.members[old].proc.take().unwrap().kill9();
    let new = rig.decider().await;
    let took = killed_at.elapsed();
    assert_ne!(new, old);
    assert!(
        took <= LEASE_TTL + Duration::from_secs(1),
        "another member decides within lease_ttl ({LEASE_TTL:?}): took {took:?}"
    );
    rig.all_detect("Primary", Duration::from_secs(5)).await;
    assert!(rig.moves().await.is_empty());
    // The dead member's vote is gone with its lease.
    let s = rig.members[new].status().await.unwrap();
    let names: Vec<&str> = s["fleet"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(
        !names.contains(&rig.members[old].name.as_str()),
        "{names:?}"
    );
    println!("new decider after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_decider_steps_down_and_the_newer_decision_stands() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let old = rig.decider().await;
    kill(rig.members[old].pid(), Signal::SIGSTOP).unwrap();
    let new = wait_for(READY, "another decider", || async {
        for (i, m) in rig.members.iter().enumerate() {
            if i != old && m.status().await?["fleet"]["is_decider"] == true {
                return Some(i);
            }
        }
        None
    })
    .await;
    // While the old decider sleeps, the fleet moves on: an operator fails over.
    let other = (0..3).find(|i| *i != old && *i != new).unwrap();
    let out = rig.cli(other, &["failover", "--to", "backup", "--reason", "drill"]);
    assert!(out.status.success(), "{out:?}");
    // The proxy that wrote the command routes on it when the command returns.
    let newer = rig.members[other].status().await.unwrap()["fleet"]["applied_revision"].clone();
    kill(rig.members[old].pid(), Signal::SIGCONT).unwrap();
    let paused = &rig.members[old];
    // Woken, it steps down one of two ways, whichever it meets first: its next write is
    // refused by the fence, or it finds its leadership unconfirmed past lease_ttl (its etcd
    // session was lost while it slept). Either way it must not overwrite the newer decision
    // (checked below).
    wait_until(
        Duration::from_secs(10),
        "the old decider stepped down",
        || async {
            metric(&paused.metrics().await, "gsb_fleet_fenced_writes_total").unwrap_or(0.0) >= 1.0
                || paused.log().contains("no longer the decider")
        },
    )
    .await;
    let log = paused.log();
    assert!(
        log.contains("write FENCED") || log.contains("no longer the decider"),
        "{log}"
    );
    rig.all_detect("Backup", Duration::from_secs(5)).await;
    // Every member comes to route on the operator's decision, and etcd still holds it: had the
    // old decider overwritten it, the revision would have moved past it for good.
    for (i, m) in rig.members.iter().enumerate() {
        wait_until(
            Duration::from_secs(10),
            "the newer decision everywhere",
            || async {
                m.status().await.is_some_and(|s| {
                    s["fleet"]["decision_revision"] == newer
                        && s["fleet"]["applied_revision"] == newer
                        && s["fleet"]["coordination_up"] == true
                })
            },
        )
        .await;
        let s = m.status().await.unwrap();
        assert_eq!(s["forced"], "operator", "{}", m.name);
        assert_eq!(s["fleet"]["is_decider"], i == new, "{}", m.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gsb_failover_to_one_proxy_moves_the_fleet_and_survives_restarting_every_proxy() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start().await;
    rig.all_detect("Primary", READY).await;
    let out = rig.cli(2, &["failover", "--to", "backup", "--reason", "db slow"]);
    assert!(out.status.success(), "{out:?}");
    rig.all_detect("Backup", Duration::from_secs(2)).await;
    let out = rig.cli(0, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fleet: decider p"), "{text}");
    assert_eq!(text.matches("follows").count(), 3, "{text}");
    for m in rig.members.iter_mut() {
        m.proc.take().unwrap().terminate();
    }
    for m in rig.members.iter_mut() {
        m.spawn();
    }
    rig.all_detect("Backup", READY).await;
    for m in &rig.members {
        let s = m.status().await.unwrap();
        assert_eq!(s["forced"], "operator", "{}", m.name);
        assert_eq!(s["forced_reason"], "db slow");
    }
    let out = rig.cli(1, &["failback", "--reason", "fixed"]);
    assert!(out.status.success(), "{out:?}");
    rig.all_detect("Primary", Duration::from_secs(2)).await;
    assert_eq!(rig.moves().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_to_one_member_holds_the_route_and_a_restart_resumes_the_watches() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start().await;
    rig.all_detect("Primary", READY).await;
    // Every proxy's first endpoint is m0: kill the members one by one, m0 first.
    rig.etcd.kill(0);
    rig.etcd.kill(1);
    for m in &rig.members {
        wait_until(
            Duration::from_secs(15),
            "coordination down reported",
            || async { metric(&m.metrics().await, "gsb_coordination_up") == Some(0.0) },
        )
        .await;
        let s = m.status().await.unwrap();
        assert_eq!(s["fleet"]["coordination_up"], false);
    }
    rig.all_detect("Primary", Duration::from_secs(1)).await;
    let out = rig.cli(0, &["failover", "--to", "backup"]);
    assert!(!out.status.success(), "no fleet change without etcd");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("coordination is down"),
        "{out:?}"
    );
    // The members come back: watches resume and a manual failover reaches all.
    rig.etcd.restart(0);
    rig.etcd.restart(1);
    rig.etcd.wait_healthy(Duration::from_secs(30)).await;
    for m in &rig.members {
        wait_until(Duration::from_secs(20), "coordination restored", || async {
            metric(&m.metrics().await, "gsb_coordination_up") == Some(1.0)
        })
        .await;
    }
    rig.all_detect("Primary", Duration::from_secs(1)).await;
    // One member restarted while the fleet runs.
    rig.etcd.restart(2);
    rig.etcd.wait_healthy(Duration::from_secs(30)).await;
    let out = wait_for(Duration::from_secs(10), "a failover accepted", || async {
        let out = rig.cli(
            1,
            &["failover", "--to", "backup", "--reason", "after restart"],
        );
        out.status.success().then_some(out)
    })
    .await;
    assert!(out.status.success());
    rig.all_detect("Backup", Duration::from_secs(2)).await;
}
