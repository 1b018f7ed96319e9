//! Benchmark 1 (proxy data path) and 2 (failover).

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::load::{self, open_loop};
use crate::proxies::{self, Kind, Probe, FAST, GSB_DEFAULT};
use crate::report::Report;
use crate::{procstat, upstream, Scale};

/// Runs the data-path benchmark for direct, gsb, HAProxy and nginx (and a baseline gsb binary
/// when `BENCH_GSB_BASELINE` names one) once per entry of `workers` (worker threads or
/// processes each proxy gets; metrics of runs other than 1 worker are suffixed `[N workers]`).
/// Saturation runs `rounds` times, interleaved across the contenders (see [`saturation`]).
pub async fn data_path(
    scale: &Scale,
    report: &mut Report,
    workers: &[usize],
    rounds: usize,
) -> anyhow::Result<()> {
    for &w in workers {
        data_path_with(scale, report, w, rounds).await?;
    }
    Ok(())
}

/// The two bodies: path, label, fixed rate of the open-loop run.
const BODIES: [(&str, &str, f64); 2] = [("small", "100 B", 2000.0), ("large", "1 MiB", 100.0)];

async fn data_path_with(
    scale: &Scale,
    report: &mut Report,
    workers: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let suffix = match workers {
        1 => String::new(),
        n => format!(" [{n} workers]"),
    };
    let primary = upstream::spawn("primary")?;
    let backup = upstream::spawn("backup")?;
    let secs = scale.secs(5) as u32;
    let fixed = Duration::from_secs(scale.secs(5));
    let conns = 64;
    // 9,500, not 10,000: the hard fd limit here is 20,000 and HAProxy reserves two fds per
    // connection (maxconn 9,990 is its ceiling), so every contender gets the same count.
    let idle_n = scale.count(9_500) as usize;
    report.setup(
        "proxy",
        &format!(
            "loopback upstream (hyper, 1 thread, separate process); each proxy N workers \
             (gsb proxy.workers=N and TOKIO_WORKER_THREADS=N, haproxy nbthread N, nginx \
             worker_processes N; N=1 unless the metric says `[N workers]`), \
             keep-alive to upstream, no cache, no access log. Every contender runs at once \
             (an idle one costs nothing) and is warmed by a 1 s wrk. Saturation: wrk -t1 \
             -c{conns} -d{secs}s, {rounds} rounds interleaved across the contenders (each \
             round in another order), the median of each figure reported (errors: the \
             sum). Fixed rate: open-loop client, {fixed:?} at 2000 req/s (100 B) and \
             100 req/s (1 MiB), latency from the intended send time. CPU = user+sys of the \
             proxy's process tree over the wrk run. Idle: {idle_n} keep-alive client \
             connections after one request each, RSS delta."
        ),
    );
    let mut kinds = vec![Kind::Direct, Kind::Gsb];
    if proxies::baseline_bin().is_some() {
        kinds.push(Kind::GsbBaseline);
    }
    kinds.extend([Kind::Haproxy, Kind::Nginx]);
    let mut running = Vec::new();
    for kind in kinds {
        match proxies::start(kind, &primary, &backup, None, workers).await {
            Ok(r) => running.push((kind, r)),
            Err(e) => report.note(&format!("proxy: {} could not start: {e:#}", kind.name())),
        }
    }
    // Warm-up: first connections to the site, allocator arenas, caches; for every contender.
    for (_, r) in &running {
        let url = format!("{}/small", r.url);
        tokio::task::spawn_blocking(move || load::wrk(&url, conns, 1)).await??;
    }
    for (body, label, _) in BODIES {
        let label = format!("{label}{suffix}");
        saturation(report, &running, body, &label, (conns, secs), rounds).await?;
    }
    for (kind, r) in &running {
        let k = kind.name();
        for (body, label, rate) in BODIES {
            let url = format!("{}/{body}", r.url);
            let (recs, _) = open_loop(&url, false, rate, fixed, Duration::from_secs(5)).await;
            let (p50, p99, p999, failed) = load::percentiles(&recs);
            let fr = format!("{label}{suffix} @{rate} req/s");
            report.put("proxy", &format!("{fr} p50"), "ms", true, k, p50 / 1e3);
            report.put("proxy", &format!("{fr} p99"), "ms", true, k, p99 / 1e3);
            report.put("proxy", &format!("{fr} p99.9"), "ms", true, k, p999 / 1e3);
            report.put(
                "proxy",
                &format!("{fr} failed"),
                "count",
                true,
                k,
                failed as f64,
            );
        }
        if let Some(pid) = r.pid() {
            report.put(
                "proxy",
                &format!("peak RSS after load{suffix}"),
                "MiB",
                true,
                k,
                mib(procstat::peak_rss(pid)),
            );
            let before = procstat::rss(pid);
            match load::idle_connections(&r.addr, "/small", idle_n).await {
                Ok(conns) => {
                    // Let lazily freed buffers settle before reading RSS.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let after = procstat::rss(pid);
                    let delta = after.saturating_sub(before);
                    report.put(
                        "proxy",
                        &format!("{idle_n} idle conns: RSS growth{suffix}"),
                        "MiB",
                        true,
                        k,
                        mib(delta),
                    );
                    report.put(
                        "proxy",
                        &format!("idle conn: RSS each{suffix}"),
                        "KiB",
                        true,
                        k,
                        delta as f64 / 1024.0 / conns.len().max(1) as f64,
                    );
                    report.put(
                        "proxy",
                        &format!("{idle_n} idle conns: RSS total{suffix}"),
                        "MiB",
                        true,
                        k,
                        mib(after),
                    );
                    drop(conns);
                }
                Err(e) => report.note(&format!(
                    "proxy: {k}: {idle_n} idle connections failed: {e:#}"
                )),
            }
        }
    }
    Ok(())
}

/// One saturation figure set of one contender in one round.
#[derive(Clone, Copy)]
struct Sat {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: f64,
    /// CPU seconds per 100k requests (None for direct).
    cpu: Option<f64>,
}

/// Saturation of every contender on `/body`, `rounds` times; round `r` starts at contender `r`
/// (mod n), so no contender always follows the same one, and drift of the machine (another
/// process, a warming cache) falls on all alike. Each figure is the median of its rounds; the
/// rounds of throughput and CPU are in a note.
async fn saturation(
    report: &mut Report,
    running: &[(Kind, proxies::Running)],
    body: &str,
    label: &str,
    (conns, secs): (u32, u32),
    rounds: usize,
) -> anyhow::Result<()> {
    let n = running.len();
    let mut got: Vec<Vec<Sat>> = vec![Vec::new(); n];
    for round in 0..rounds {
        for i in (0..n).map(|j| (j + round) % n) {
            let r = &running[i].1;
            let url = format!("{}/{body}", r.url);
            let cpu0 = r.pid().map(procstat::cpu_seconds);
            let w = tokio::task::spawn_blocking(move || load::wrk(&url, conns, secs)).await??;
            let cpu1 = r.pid().map(procstat::cpu_seconds);
            let cpu = match (cpu0, cpu1) {
                (Some(a), Some(b)) if w.requests > 0 => {
                    Some((b - a) / w.requests as f64 * 100_000.0)
                }
                _ => None,
            };
            got[i].push(Sat {
                rps: w.rps,
                p50_ms: w.p50_us / 1e3,
                p99_ms: w.p99_us / 1e3,
                p999_ms: w.p999_us / 1e3,
                errors: w.errors as f64,
                cpu,
            });
        }
    }
    for ((kind, _), sats) in running.iter().zip(&got) {
        let k = kind.name();
        let med = |f: fn(&Sat) -> f64| median(sats.iter().map(f).collect());
        let put = |report: &mut Report, what: &str, unit: &str, lower: bool, v: f64| {
            report.put("proxy", &format!("{label} {what}"), unit, lower, k, v)
        };
        put(
            report,
            "saturation throughput",
            "req/s",
            false,
            med(|s| s.rps),
        );
        put(report, "saturation p50", "ms", true, med(|s| s.p50_ms));
        put(report, "saturation p99", "ms", true, med(|s| s.p99_ms));
        put(report, "saturation p99.9", "ms", true, med(|s| s.p999_ms));
        let errors = sats.iter().map(|s| s.errors).sum();
        put(report, "saturation errors", "count", true, errors);
        let cpus: Vec<f64> = sats.iter().filter_map(|s| s.cpu).collect();
        if !cpus.is_empty() {
            put(report, "CPU per 100k req", "s", true, median(cpus.clone()));
        }
        if rounds > 1 {
            let list = |v: Vec<f64>, prec: usize| {
                v.iter()
                    .map(|x| format!("{x:.prec$}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let rps = list(sats.iter().map(|s| s.rps).collect(), 0);
            let p99 = list(sats.iter().map(|s| s.p99_ms).collect(), 2);
            let cpu = match cpus.is_empty() {
                true => String::new(),
                false => format!("; CPU per 100k req (s) {}", list(cpus, 2)),
            };
            report.note(&format!(
                "proxy: {label} saturation rounds of {k}: req/s {rps}; p99 (ms) {p99}{cpu}"
            ));
        }
    }
    Ok(())
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// How the primary fails.
#[derive(Clone, Copy)]
enum Failure {
    /// SIGKILL: connects are refused at once.
    Kill,
    /// SIGSTOP: the kernel still completes TCP handshakes (backlog), nothing answers: a hang.
    Stop,
    /// iptables DROP of every packet to the primary's port (inside a network namespace of our
    /// own): connects and open connections hang, a real black hole.
    BlackHole,
}

/// Runs the failover benchmark: gsb (defaults, fast) and HAProxy (defaults, gsb's settings, fast).
/// Runs the failover benchmark; the hang case is a real black hole (iptables DROP) when this
/// process can run itself in a fresh network namespace, else SIGSTOP of the primary.
pub async fn failover(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    if std::env::var_os("BENCH_IN_NETNS").is_some() {
        return failover_with(scale, report, Failure::BlackHole).await;
    }
    let netns_ok = Command::new("sh")
        .args(["-c", "command -v iptables >/dev/null && unshare -n true"])
        .status()
        .is_ok_and(|s| s.success());
    if !netns_ok {
        report.note(
            "failover: no network namespace or iptables here: the hang case is a SIGSTOPped \
             primary, not a black hole (apt-get install iptables; needs CAP_SYS_ADMIN)",
        );
        return failover_with(scale, report, Failure::Stop).await;
    }
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new("unshare")
        .args([
            "-n",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" failover --scale \"$1\" --rows",
        ])
        .arg(&exe)
        .arg(scale.factor().to_string())
        .env("BENCH_IN_NETNS", "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    if !out.status.success() {
        anyhow::bail!("failover in a network namespace exited with {}", out.status);
    }
    report.absorb(&String::from_utf8_lossy(&out.stdout));
    Ok(())
}

async fn failover_with(scale: &Scale, report: &mut Report, hang: Failure) -> anyhow::Result<()> {
    let get_rate = 200.0;
    let post_rate = 100.0;
    report.setup(
        "failover",
        &format!(
            "primary+backup upstream processes; steady load {get_rate} GET/s + {post_rate} POST/s \
             open-loop (client timeout 3 s); the primary is SIGKILLed (connects refused) or \
             black-holed 1 s into the load: the whole run happens in a network namespace of \
             its own (unshare -n) where `iptables -A INPUT -p tcp --dport <primary> -j DROP` \
             makes new connects and open connections hang (fallback without netns: SIGSTOP). Detection = failure -> first \
             2xx answer from the backup. gsb default probe = interval 500ms timeout 400ms fall 3; \
             fast = interval {}ms timeout {}ms fall {}; HAProxy default = `check` (inter 2s fall 3).",
            FAST.interval_ms, FAST.timeout_ms, FAST.fall
        ),
    );
    let cases: [(Kind, &str, Option<Probe>, u64); 5] = [
        (Kind::Gsb, "default", None, 8),
        (Kind::Gsb, "fast", Some(FAST), 6),
        // HAProxy's defaults need more than 11 s against a black hole: give them 20 s.
        (Kind::Haproxy, "default", None, 20),
        (Kind::Haproxy, "default", Some(GSB_DEFAULT), 8),
        (Kind::Haproxy, "fast", Some(FAST), 6),
    ];
    for (kind, profile, probe, secs) in cases {
        for failure in [Failure::Kill, hang] {
            let fname = match failure {
                Failure::Kill => "kill",
                Failure::Stop => "hang (SIGSTOP)",
                Failure::BlackHole => "black hole",
            };
            // HAProxy "default" with gsb's probe settings is reported under gsb's default column.
            let col = match (kind, probe) {
                (Kind::Haproxy, None) => "haproxy-defaults".to_owned(),
                _ => kind.name().to_owned(),
            };
            let secs = scale.secs(secs).max(4);
            match failover_case(kind, probe, failure, secs).await {
                Ok((detect, settled, get_failed, post_failed)) => {
                    let m = format!("{profile} profile, {fname}");
                    match detect {
                        Some(d) => report.put(
                            "failover",
                            &format!("{m}: to first backup answer"),
                            "s",
                            true,
                            &col,
                            d,
                        ),
                        None => report.note(&format!(
                            "failover: {col} {m}: no backup answer within {secs} s"
                        )),
                    }
                    if let Some(t) = settled {
                        let what = format!("{m}: to last failed GET (due time)");
                        report.put("failover", &what, "s", true, &col, t);
                    }
                    report.put(
                        "failover",
                        &format!("{m}: failed GETs"),
                        "count",
                        true,
                        &col,
                        get_failed as f64,
                    );
                    report.put(
                        "failover",
                        &format!("{m}: failed POSTs"),
                        "count",
                        true,
                        &col,
                        post_failed as f64,
                    );
                }
                Err(e) => report.note(&format!("failover: {col} {profile} {fname}: {e:#}")),
            }
        }
    }
    Ok(())
}

async fn failover_case(
    kind: Kind,
    probe: Option<Probe>,
    failure: Failure,
    secs: u64,
) -> anyhow::Result<(Option<f64>, Option<f64>, u64, u64)> {
    let primary = upstream::spawn("primary")?;
    let backup = upstream::spawn("backup")?;
    let r = proxies::start(kind, &primary, &backup, probe, 1).await?;
    let url = format!("{}/small", r.url);
    let dur = Duration::from_secs(secs);
    let timeout = Duration::from_secs(3);
    let (gu, pu) = (url.clone(), url.clone());
    let get = tokio::spawn(async move { open_loop(&gu, false, 200.0, dur, timeout).await });
    let post = tokio::spawn(async move { open_loop(&pu, true, 100.0, dur, timeout).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = Pid::from_raw(primary.proc.pid() as i32);
    let failed_at = Instant::now();
    match failure {
        Failure::Kill => kill(pid, Signal::SIGKILL)?,
        Failure::Stop => kill(pid, Signal::SIGSTOP)?,
        Failure::BlackHole => {
            let port = primary.port.to_string();
            let st = Command::new("iptables")
                .args(["-A", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"])
                .status()?;
            anyhow::ensure!(st.success(), "iptables DROP failed");
        }
    }
    let (grec, gstart) = get.await?;
    let (prec, _) = post.await?;
    let fail_off = failed_at.saturating_duration_since(gstart);
    let detect = grec
        .iter()
        .filter(|r| r.ok() && r.upstream.as_deref() == Some("backup"))
        .map(|r| r.done)
        .min()
        .map(|d| d.saturating_sub(fail_off).as_secs_f64());
    // When the move is over for clients: the last failing GET's due time after the failure
    // (0 when none failed).
    let settled = grec
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.due.saturating_sub(fail_off).as_secs_f64())
        .reduce(f64::max)
        .or(Some(0.0));
    let gf = grec.iter().filter(|r| !r.ok()).count() as u64;
    let pf = prec.iter().filter(|r| !r.ok()).count() as u64;
    drop(r);
    Ok((detect, settled, gf, pf))
}
