//! The fleet benchmark: three `gsb proxy` processes on a real three-member etcd (loopback),
//! beside one single proxy in the same run, with the same probe settings (gsb's defaults).
//!
//! - primary killed under load: time until EVERY proxy serves the backup, failed GETs, vs the
//!   single proxy's time to its first backup answer;
//! - manual failover through one proxy: time until the last proxy switched (p50/p99 of N);
//! - one proxy cut off from the primary: moves and split-brain seconds (samples where two
//!   proxies answer detectbackup differently);
//! - the etcd leader killed at the moment the primary dies: the failover still completes.

use std::process::Command;
use std::time::{Duration, Instant};

use gsb_tests::etcd::EtcdCluster;
use gsb_tests::relay::Relay;
use gsb_tests::{free_port, gsb_bin, Proc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::load::open_loop;
use crate::proxies::{self, Kind};
use crate::report::Report;
use crate::upstream::{self, UpstreamProc};
use crate::Scale;

const TOKEN: &str = "bench-token";

/// A fleet member.
struct Member {
    _proc: Proc,
    port: u16,
    admin: u16,
}

/// Three proxies; `via[i]` is the primary URL member i uses (a relay for the cut-off case).
async fn start_fleet(
    etcd: &EtcdCluster,
    primary: &str,
    backup: &UpstreamProc,
    dir: &std::path::Path,
    via: [Option<String>; 3],
) -> anyhow::Result<Vec<Member>> {
    std::fs::write(dir.join("admin.token"), TOKEN)?;
    let mut out = Vec::new();
    for (i, via) in via.into_iter().enumerate() {
        let (port, admin) = (free_port(), free_port());
        let path = dir.join(format!("p{i}.toml"));
        std::fs::write(
            &path,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:{port}\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 token_file = \"admin.token\"\n[sites.primary]\nurl = \"{p}\"\n[sites.backup]\n\
                 url = \"{b}\"\n[failover]\nstate_file = \"p{i}.state\"\n\
                 [coordination]\netcd = {etcd}\nname = \"p{i}\"\n",
                p = via.as_deref().unwrap_or(primary),
                b = backup.url(),
                etcd = etcd.toml_endpoints(),
            ),
        )?;
        let proc = Proc::spawn(
            &format!("fleet-p{i}"),
            Command::new(gsb_bin())
                .args(["proxy", "--config"])
                .arg(&path)
                .env("TOKIO_WORKER_THREADS", "1")
                .env("RUST_LOG", "warn"),
        );
        out.push(Member {
            _proc: proc,
            port,
            admin,
        });
    }
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    'formed: loop {
        anyhow::ensure!(Instant::now() < deadline, "the fleet did not form in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        for m in &out {
            let Ok(r) = http
                .get(format!("http://127.0.0.1:{}/status", m.admin))
                .send()
                .await
            else {
                continue 'formed;
            };
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            let f = &v["fleet"];
            if f["decision_revision"] == 0 || f["applied_revision"] != f["decision_revision"] {
                continue 'formed;
            }
            if v["sites"][0]["verdict"] != "healthy" {
                continue 'formed;
            }
        }
        break;
    }
    Ok(out)
}

/// A fleet of 3 on a fresh 3-member etcd in front of two fresh upstreams; with `cut_off`, the
/// second proxy reaches the primary through a relay that can drop its traffic.
struct Rig {
    etcd: EtcdCluster,
    primary: UpstreamProc,
    _backup: UpstreamProc,
    relay: Option<Relay>,
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start(cut_off: bool) -> anyhow::Result<Rig> {
        let etcd = EtcdCluster::start(3).await;
        let primary = upstream::spawn("primary")?;
        let backup = upstream::spawn("backup")?;
        let relay = match cut_off {
            true => Some(Relay::start(format!("127.0.0.1:{}", primary.port).parse()?).await),
            false => None,
        };
        let dir = tempfile::tempdir()?;
        let via = [None, relay.as_ref().map(Relay::url), None];
        let members = start_fleet(&etcd, &primary.url(), &backup, dir.path(), via).await?;
        Ok(Rig {
            etcd,
            primary,
            _backup: backup,
            relay,
            members,
            _dir: dir,
        })
    }

    fn ports(&self) -> Vec<u16> {
        self.members.iter().map(|m| m.port).collect()
    }
}

async fn detect(http: &reqwest::Client, port: u16) -> Option<String> {
    let r = http
        .get(format!("http://127.0.0.1:{port}/detectbackup"))
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

/// Figures of one "primary killed" run.
struct Killed {
    /// Until every proxy's detectbackup answers `Backup` (the route moved everywhere).
    routed: Option<f64>,
    /// Until the last proxy's first answer from the backup (connect failures are retried on
    /// the backup at once, before the route moves).
    first_answer: Option<f64>,
    /// GETs that failed or timed out, over every proxy.
    failed: u64,
}

/// GET load on every proxy, the primary SIGKILLed 1 s in (and, with `etcd_leader_too`, the
/// etcd leader at the same instant).
async fn primary_killed(
    ports: &[u16],
    primary: &UpstreamProc,
    etcd_leader_too: Option<&mut EtcdCluster>,
    secs: u64,
) -> anyhow::Result<Killed> {
    let dur = Duration::from_secs(secs);
    let mut loads = Vec::new();
    for port in ports {
        let url = format!("http://127.0.0.1:{port}/small");
        loads.push(tokio::spawn(async move {
            open_loop(&url, false, 100.0, dur, Duration::from_secs(3)).await
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = match &etcd_leader_too {
        Some(etcd) => Some(
            etcd.leader()
                .await
                .ok_or_else(|| anyhow::anyhow!("no etcd leader"))?,
        ),
        None => None,
    };
    let failed_at = Instant::now();
    kill(Pid::from_raw(primary.proc.pid() as i32), Signal::SIGKILL)?;
    if let (Some(etcd), Some(l)) = (etcd_leader_too, leader) {
        etcd.kill(l);
    }
    let http = reqwest::Client::new();
    let mut routed = None;
    while failed_at.elapsed() < dur {
        let mut all = true;
        for p in ports {
            all &= detect(&http, *p).await.as_deref() == Some("Backup");
        }
        if all {
            routed = Some(failed_at.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut last = Some(0.0f64);
    let mut failed = 0;
    for load in loads {
        let (records, start) = load.await?;
        let off = failed_at.saturating_duration_since(start);
        failed += records.iter().filter(|r| !r.ok()).count() as u64;
        let first = records
            .iter()
            .filter(|r| r.ok() && r.upstream.as_deref() == Some("backup"))
            .map(|r| r.done.saturating_sub(off).as_secs_f64())
            .reduce(f64::min);
        last = match (last, first) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    Ok(Killed {
        routed,
        first_answer: last,
        failed,
    })
}

/// Runs the fleet benchmark.
pub async fn fleet(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    report.setup(
        "fleet",
        "3 gsb proxies with [coordination] on a 3-member etcd 3.4 (loopback, heartbeat 100 ms, \
         election 1 s), gsb's default probes (interval 500ms, timeout 400ms, fall 3) and lease_ttl \
         5s; 1 tokio worker each; beside one single proxy (no etcd) with the same probes, in the \
         same run. Load: 100 GET/s open loop on each proxy (client timeout 3 s).",
    );
    let secs = scale.secs(8).max(6);

    // Single proxy, same probes, same load.
    let single = {
        let primary = upstream::spawn("primary")?;
        let backup = upstream::spawn("backup")?;
        let single = proxies::start(Kind::Gsb, &primary, &backup, None, 1).await?;
        let port: u16 = single.addr.rsplit(':').next().unwrap_or("0").parse()?;
        primary_killed(&[port], &primary, None, secs).await?
    };
    // The fleet: primary killed, then with the etcd leader killed at the same time.
    let mut fleet = Vec::new();
    for kill_leader in [false, true] {
        let mut rig = Rig::start(false).await?;
        let ports = rig.ports();
        let etcd = kill_leader.then_some(&mut rig.etcd);
        fleet.push(primary_killed(&ports, &rig.primary, etcd, secs).await?);
    }
    let rows = [
        ("primary killed", &fleet[0], "single proxy", &single),
        (
            "primary + etcd leader killed",
            &fleet[1],
            "fleet, etcd leader alive",
            &fleet[0],
        ),
    ];
    for (what, gsb, peer, base) in rows {
        for (metric, a, b) in [
            (
                "every proxy routes to the backup (detectbackup)",
                gsb.routed,
                base.routed,
            ),
            (
                "every proxy's first answer from the backup",
                gsb.first_answer,
                base.first_answer,
            ),
        ] {
            let metric = format!("{what}: {metric}");
            match a {
                Some(v) => report.put("fleet", &metric, "s", true, "gsb", v),
                None => report.note(&format!("fleet: {metric}: not within {secs} s")),
            }
            if let Some(v) = b {
                report.put("fleet", &metric, "s", true, peer, v);
            }
        }
        let metric = format!("{what}: failed GETs");
        report.put("fleet", &metric, "count", true, "gsb", gsb.failed as f64);
        report.put("fleet", &metric, "count", true, peer, base.failed as f64);
    }

    // Manual failover through one proxy: until the last proxy answers the new site.
    {
        let rig = Rig::start(false).await?;
        let members = &rig.members;
        let http = reqwest::Client::new();
        let tries = scale.count(20).max(10);
        let mut h = hdrhistogram::Histogram::<u64>::new(3)?;
        for i in 0..tries {
            let (path, body, want) = if i % 2 == 0 {
                ("failover", r#"{"to":"backup","reason":"bench"}"#, "Backup")
            } else {
                ("failback", r#"{"reason":"bench"}"#, "Primary")
            };
            let via = &members[i as usize % members.len()];
            let started = Instant::now();
            let r = http
                .post(format!("http://127.0.0.1:{}/{path}", via.admin))
                .bearer_auth(TOKEN)
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "{path}: {}", r.status());
            let mut pending: Vec<u16> = members.iter().map(|m| m.port).collect();
            while !pending.is_empty() {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(10),
                    "{path} did not reach every proxy"
                );
                let mut still = Vec::new();
                for p in pending {
                    if detect(&http, p).await.as_deref() != Some(want) {
                        still.push(p);
                    }
                }
                pending = still;
            }
            h.record(started.elapsed().as_micros() as u64)?;
            // min_dwell does not bound operators; a short pause keeps the tries apart.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        report.put(
            "fleet",
            &format!("manual failover via one proxy, last proxy switched, p50 ({tries} tries)"),
            "ms",
            true,
            "gsb",
            ms(0.5),
        );
        report.put(
            "fleet",
            &format!("manual failover via one proxy, last proxy switched, p99 ({tries} tries)"),
            "ms",
            true,
            "gsb",
            ms(0.99),
        );
    }

    // One proxy cut off from the primary.
    {
        let rig = Rig::start(true).await?;
        let (members, relay) = (&rig.members, rig.relay.as_ref().expect("cut-off rig"));
        let http = reqwest::Client::new();
        relay.drop_traffic(true);
        let cut = Duration::from_secs(scale.secs(60));
        let started = Instant::now();
        let (mut samples, mut split) = (0u64, 0u64);
        while started.elapsed() < cut {
            let mut seen = Vec::new();
            for m in members {
                seen.push(detect(&http, m.port).await);
            }
            samples += 1;
            if seen.windows(2).any(|w| w[0] != w[1]) {
                split += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status: serde_json::Value = http
            .get(format!("http://127.0.0.1:{}/status", members[0].admin))
            .send()
            .await?
            .json()
            .await?;
        let moves = status["timeline"].as_array().map_or(0, Vec::len);
        let unready = http
            .get(format!("http://127.0.0.1:{}/healthz", members[1].admin))
            .send()
            .await?
            .status()
            .as_u16();
        report.put(
            "fleet",
            &format!(
                "one proxy cut off from the primary for {} s: moves",
                cut.as_secs()
            ),
            "count",
            true,
            "gsb",
            moves as f64,
        );
        report.put(
            "fleet",
            &format!(
                "one proxy cut off from the primary for {} s: split-brain seconds",
                cut.as_secs()
            ),
            "s",
            true,
            "gsb",
            split as f64 * cut.as_secs_f64() / samples.max(1) as f64,
        );
        report.note(&format!(
            "fleet: the cut-off proxy's /healthz answered {unready} at the end ({samples} detectbackup samples of the 3 proxies, {split} disagreeing)"
        ));
    }
    Ok(())
}
