//! `bench`: gsb side by side with HAProxy, nginx, pglogical and Bucardo on this machine, in one run.
//!
//! ```text
//! cargo build --release -p gsb
//! cargo run --release -p gsb-tests --bin bench -- [proxy|failover|fleet|replication|config|all] [--scale X]
//! ```
//! Contenders are found on PATH (Debian: `wrk haproxy nginx-light postgresql-15-pglogical
//! bucardo postgresql-plperl-15`); `--install` runs `apt-get update && apt-get install` for the
//! missing ones first (PL/Perl pinned to the installed server's version, so the server is not
//! upgraded under running clusters). `--scale` multiplies every duration and count (0.1 for a
//! smoke run). `proxy` runs each saturation case `--rounds` times (default 3), interleaved
//! across the contenders, and reports the medians. The report (Markdown: setups, one table of
//! figures and gsb/peer ratios, notes) goes to stdout; progress goes to stderr.
//!
//! `replication` measures gsb (two way; `gsb` with the logical capture, `gsb-triggers` with the
//! trigger capture), pglogical (one way) and Bucardo (two way), each on a fresh pair of
//! servers. For development, `BENCH_ONLY=bucardo` (a comma-separated list of `gsb`,
//! `gsb-triggers`, `pglogical`, `bucardo`) runs only those contenders, e.g.
//! `BENCH_ONLY=bucardo bench replication --scale 0.1`; `bench pglogical` is pglogical alone.
//! `BENCH_PARTS=lag` (a comma-separated list of `lag`, `conflicts`, `catch-up`, `two-way`,
//! `overhead`) runs only those parts of gsb's and pglogical's runs.
//! `BENCH_BUCARDO_LOG=<dir>` keeps Bucardo's log files (they live in a temp dir otherwise) and
//! `BENCH_BUCARDO_LOG_LEVEL=VERBOSE` (or DEBUG) makes them say what each sync run did.
#![forbid(unsafe_code)]

#[path = "bench/bucardo.rs"]
mod bucardo;
#[path = "bench/fleetbench.rs"]
mod fleetbench;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/procstat.rs"]
mod procstat;
#[path = "bench/proxies.rs"]
mod proxies;
#[path = "bench/proxybench.rs"]
mod proxybench;
#[path = "bench/replbench.rs"]
mod replbench;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/upstream.rs"]
mod upstream;

use std::process::Command;

use anyhow::bail;

/// Multiplies the suite's durations and counts (smoke runs use a small factor).
#[derive(Debug, Clone, Copy)]
pub struct Scale(f64);

impl Scale {
    /// The factor itself.
    pub fn factor(&self) -> f64 {
        self.0
    }

    /// A duration in whole seconds, at least 1.
    pub fn secs(&self, full: u64) -> u64 {
        ((full as f64 * self.0).round() as u64).max(1)
    }

    /// A count, at least 1.
    pub fn count(&self, full: u64) -> u64 {
        ((full as f64 * self.0).round() as u64).max(1)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("upstream") {
        return upstream::serve(args.get(1).map(String::as_str).unwrap_or("upstream"));
    }
    // gsb_tests::gsb_bin() looks beside a test's deps/ dir; this binary sits beside gsb itself.
    if std::env::var_os("GSB_BIN").is_none() {
        if let Some(dir) = std::env::current_exe()?.parent() {
            if dir.join("gsb").is_file() {
                std::env::set_var("GSB_BIN", dir.join("gsb"));
            }
        }
    }
    let mut what = "all".to_owned();
    let mut scale = Scale(1.0);
    let mut install = false;
    let mut rows = false;
    let mut workers = vec![1];
    let mut rounds = 3;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--scale" => {
                scale = Scale(it.next().and_then(|s| s.parse().ok()).unwrap_or(1.0));
            }
            "--install" => install = true,
            // Worker threads/processes each proxy gets in the proxy benchmark, e.g. "1,2".
            "--workers" => {
                workers = it
                    .next()
                    .map(|s| s.split(',').filter_map(|w| w.trim().parse().ok()).collect())
                    .unwrap_or_default();
                if workers.is_empty() || workers.contains(&0) {
                    bail!("--workers takes a list of counts like 1,2");
                }
            }
            // Interleaved saturation rounds per contender in the proxy benchmark (medians).
            "--rounds" => {
                rounds = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                if rounds == 0 {
                    bail!("--rounds takes a count of at least 1, e.g. 3");
                }
            }
            // A child run (the failover benchmark inside a network namespace) hands back rows.
            "--rows" => rows = true,
            "proxy" | "failover" | "fleet" | "replication" | "pglogical" | "config" | "all" => what = a.clone(),
            other => bail!("unknown argument {other:?}: bench [proxy|failover|fleet|replication|config|all] [--scale X] [--workers 1,2] [--rounds 3] [--install]"),
        }
    }
    if install {
        install_missing()?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut report = report::Report::default();
        machine(&mut report);
        let all = what == "all";
        if all || what == "proxy" {
            eprintln!("== proxy data path");
            if let Err(e) = proxybench::data_path(&scale, &mut report, &workers, rounds).await {
                report.note(&format!("proxy benchmark aborted: {e:#}"));
            }
        }
        if all || what == "failover" {
            eprintln!("== failover");
            if let Err(e) = proxybench::failover(&scale, &mut report).await {
                report.note(&format!("failover benchmark aborted: {e:#}"));
            }
        }
        if all || what == "fleet" {
            eprintln!("== fleet");
            if let Err(e) = fleetbench::fleet(&scale, &mut report).await {
                report.note(&format!("fleet benchmark aborted: {e:#}"));
            }
        }
        if all || what == "replication" {
            eprintln!("== replication");
            if let Err(e) = replbench::replication(&scale, &mut report).await {
                report.note(&format!("replication benchmark aborted: {e:#}"));
            }
        }
        if what == "pglogical" {
            if let Err(e) = replbench::pglogical_only(&scale, &mut report).await {
                report.note(&format!("pglogical benchmark aborted: {e:#}"));
            }
        }
        if all || what == "config" {
            eprintln!("== config copy");
            if let Err(e) = replbench::config_copy(&scale, &mut report).await {
                report.note(&format!("config copy benchmark aborted: {e:#}"));
            }
        }
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        report.note(&format!(
            "load average at the end (1/5/15 min): {}",
            load.trim()
        ));
        if rows {
            print!("{}", report.rows_text());
        } else {
            println!("{}", report.render());
        }
        Ok(())
    })
}

/// Notes the machine, the tool versions and the gsb binary in the report.
fn machine(report: &mut report::Report) {
    let sh = |c: &str| {
        Command::new("sh")
            .args(["-c", c])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .replace('\n', "; ")
            })
            .unwrap_or_default()
    };
    report.note(&format!(
        "machine: {} CPUs ({}), {} ; {} ; {} ; {}",
        sh("nproc"),
        sh("lscpu | sed -n 's/^Model name: *//p'"),
        sh("free -h | awk '/Mem:/ {print $2\" RAM\"}'"),
        sh("haproxy -v | head -1"),
        sh("nginx -v 2>&1"),
        sh("wrk -v 2>&1 | head -1"),
    ));
    report.note(&format!(
        "load average at the start (1/5/15 min): {}",
        sh("cat /proc/loadavg")
    ));
    report.note(&format!(
        "gsb binary: {} (built {}), work tree at commit {}",
        gsb_tests::gsb_bin().display(),
        sh(&format!(
            "date -u -r {} +%FT%TZ",
            gsb_tests::gsb_bin().display()
        )),
        sh(&format!(
            "cd {} && git rev-parse --short HEAD 2>/dev/null",
            gsb_tests::gsb_bin()
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )),
    ));
}

/// Installs the Debian packages of missing contenders; Bucardo is attempted but optional.
fn install_missing() -> anyhow::Result<()> {
    let has = |bin: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    let need: Vec<&str> = [
        ("wrk", "wrk"),
        ("haproxy", "haproxy"),
        ("nginx", "nginx-light"),
        ("iptables", "iptables"),
        ("etcd", "etcd-server"),
    ]
    .into_iter()
    .filter(|(bin, _)| !has(bin))
    .map(|(_, pkg)| pkg)
    .chain(
        (!std::path::Path::new("/usr/lib/postgresql/15/lib/pglogical.so").exists())
            .then_some("postgresql-15-pglogical"),
    )
    .collect();
    // Bucardo and PL/Perl for its control database. PL/Perl must match the installed server's
    // exact version (a newer one would upgrade postgresql-15 under running servers); Bucardo's
    // recommends would pull the newest PL/Perl, hence --no-install-recommends.
    let mut optional = Vec::new();
    if !has("bucardo") {
        optional.push("bucardo".to_owned());
    }
    if !std::path::Path::new("/usr/lib/postgresql/15/lib/plperl.so").exists() {
        let version = Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", "postgresql-15"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        optional.push(if version.is_empty() {
            "postgresql-plperl-15".to_owned()
        } else {
            format!("postgresql-plperl-15={version}")
        });
    }
    if need.is_empty() && optional.is_empty() {
        return Ok(());
    }
    let apt = |pkgs: &str, extra: &str| {
        Command::new("sh")
            .args([
                "-c",
                &format!(
                    "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q {extra} {pkgs}"
                ),
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !need.is_empty() && !apt(&need.join(" "), "") {
        bail!("apt-get install {} failed", need.join(" "));
    }
    if !optional.is_empty() && !apt(&optional.join(" "), "--no-install-recommends") {
        eprintln!(
            "bench: apt-get install {} failed; Bucardo will be skipped",
            optional.join(" ")
        );
    }
    Ok(())
}
