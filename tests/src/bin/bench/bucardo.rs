//! Bucardo 5 (Debian's `bucardo`), two way: the same job as gsb, on the same tables and server
//! settings, measured with the same helpers as gsb and pglogical (see `replbench`).
//!
//! The bench sets Bucardo up entirely under a temporary directory: a third PostgreSQL server of
//! the harness holds Bucardo's control database (`bucardo`, with plperlu), `bucardo install
//! --batch` fills it, both site databases are added, and the `users` table goes into one
//! multi-source sync (`A:source,B:source`, `conflict_strategy=bucardo_latest`). The CLI runs with
//! `HOME` set to that directory (its `.pgpass` lands there) and a `--bucardorc` file naming the
//! control database, the pid directory and the log directory; the conflict, warning and reason
//! files are moved there too. The daemons (MCP, controller, kid, VAC) run in their own process
//! group; `bucardo stop` ends them and, should one linger, dropping [`Bucardo`] kills them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use gsb_tests::pg::{connect, Cluster, ClusterOptions};

use crate::replbench::{
    add_probe, backlog, conflicts, drop_probe, lag_runs, overheads, put_catch_up, put_conflicts,
    two_way_apply, wait_backlog, Capture, Pair, Params,
};
use crate::report::Report;

/// The sync's name (its kick trigger on `users` is `bucardo_kick_<name>`).
const SYNC: &str = "bench";

/// Bucardo's loop sleeps, lowered from the defaults (MCP and controller 0.2 s, kid 0.5 s, kid
/// with no delta rows 0.5 s), which alone put its lag at ~0.65 s; with these it is bound by its
/// own work per kick, not by a timer.
const SLEEPS: [(&str, &str); 4] = [
    ("mcp_loop_sleep", "0.02"),
    ("ctl_sleep", "0.02"),
    ("kid_sleep", "0.02"),
    ("kid_nodeltarows_sleep", "0.02"),
];

/// What is missing for Bucardo on this machine, if anything.
fn missing() -> Option<String> {
    let mut miss = Vec::new();
    let on_path = std::process::Command::new("sh")
        .args(["-c", "command -v bucardo"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !on_path {
        miss.push("the bucardo program");
    }
    let plperl = Cluster::find_bin_dir()
        .ok()
        .and_then(|b| b.parent().map(|d| d.join("lib/plperl.so")))
        .is_some_and(|p| p.is_file());
    if !plperl {
        miss.push("PL/Perl for the server (plperl.so)");
    }
    (!miss.is_empty()).then(|| miss.join(" and "))
}

/// The pid on the first line of a pid file, if it names a live Bucardo process.
fn live_pid(file: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(file).ok()?;
    let pid: u32 = text.split_whitespace().next()?.parse().ok()?;
    is_bucardo(pid).then_some(pid)
}

/// Whether `pid` is a Bucardo daemon (they set their title to "Bucardo ...").
fn is_bucardo(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"Bucardo"))
}

/// The process group of `pid`, from `/proc/<pid>/stat`.
fn pgrp(pid: u32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// Bucardo daemons, its control database and its directory; the daemons are killed on drop.
pub(crate) struct Bucardo {
    rc: PathBuf,
    run: PathBuf,
    log: PathBuf,
    /// Process groups of the daemons started so far (each `bucardo start` makes a new one).
    groups: Vec<i32>,
    /// The MCP's pid while running (its tree holds the controller, the kid and the VAC).
    mcp: Option<u32>,
    /// The server of the control database.
    control: Cluster,
    /// Which table's triggers `off` disables and `on` enables again (the primary's).
    primary_dsn: String,
    bin_dir: PathBuf,
    dir: tempfile::TempDir,
}

impl Bucardo {
    /// Installs Bucardo's control database on a server of its own and sets up the two-way sync of
    /// `users` between the pair's site databases (not started yet).
    async fn setup(pair: &Pair) -> anyhow::Result<Bucardo> {
        let control = tokio::task::spawn_blocking(|| -> anyhow::Result<Cluster> {
            let mut c = Cluster::init(ClusterOptions {
                fsync: false,
                ..ClusterOptions::default()
            })?;
            c.start()?;
            Ok(c)
        })
        .await??;
        let dir = tempfile::Builder::new().prefix("gsb-bucardo-").tempdir()?;
        let (run, log) = (dir.path().join("run"), dir.path().join("log"));
        std::fs::create_dir(&run)?;
        std::fs::create_dir(&log)?;
        let rc = dir.path().join("bucardorc");
        std::fs::write(
            &rc,
            format!(
                "dbhost=127.0.0.1\ndbport={}\ndbuser=bucardo\ndbname=bucardo\npiddir={}\nlogdest={}\n",
                control.port(),
                run.display(),
                log.display()
            ),
        )?;
        let b = Bucardo {
            rc,
            run,
            log,
            groups: Vec::new(),
            mcp: None,
            primary_dsn: pair.primary.dsn("site"),
            bin_dir: Cluster::find_bin_dir()?,
            control,
            dir,
        };
        // The installer connects as the harness's superuser, creates the `bucardo` superuser
        // and database (plperlu) and loads bucardo.schema.
        let su = b.control.superuser().to_owned();
        b.cli(&[
            "install", "--batch", "--dbuser", &su, "--dbname", "postgres",
        ])
        .await
        .context("bucardo install")?;
        let mut set: Vec<String> = [
            ("log_conflict_file", b.log.join("conflict.log")),
            ("warning_file", b.log.join("warning.log")),
            ("reason_file", b.log.join("restart.reason")),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", v.display()))
        .collect();
        set.extend(SLEEPS.iter().map(|(k, v)| format!("{k}={v}")));
        // Development: e.g. BENCH_BUCARDO_LOG_LEVEL=VERBOSE (Bucardo's default is NORMAL).
        if let Ok(level) = std::env::var("BENCH_BUCARDO_LOG_LEVEL") {
            set.push(format!("log_level={level}"));
        }
        let mut args = vec!["set"];
        args.extend(set.iter().map(String::as_str));
        b.cli(&args).await?;
        for (name, c) in [("A", &pair.primary), ("B", &pair.backup)] {
            b.cli(&[
                "add",
                "db",
                name,
                "dbname=site",
                "host=127.0.0.1",
                &format!("port={}", c.port()),
                &format!("user={}", c.superuser()),
            ])
            .await?;
        }
        b.cli(&[
            "add",
            "table",
            "public.users",
            "db=A",
            &format!("relgroup={SYNC}"),
        ])
        .await?;
        b.cli(&[
            "add",
            "sync",
            SYNC,
            &format!("relgroup={SYNC}"),
            "dbs=A:source,B:source",
            "conflict_strategy=bucardo_latest",
        ])
        .await?;
        Ok(b)
    }

    /// Runs the bucardo CLI with our rc file and home; returns what it printed.
    async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        // Output to a file, not a pipe: `start` forks the daemon, which must not hold our pipe.
        let out_path = self.dir.path().join("cli.out");
        let out = std::fs::File::create(&out_path)?;
        let status = tokio::process::Command::new("bucardo")
            .arg("--bucardorc")
            .arg(&self.rc)
            .args(args)
            .env("HOME", self.dir.path())
            .env("PGBINDIR", &self.bin_dir)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .await
            .context("running bucardo")?;
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if !status.success() {
            bail!(
                "bucardo {} failed ({status}): {}",
                args.join(" "),
                text.trim()
            );
        }
        Ok(text)
    }

    /// `bucardo start`, then waits until the sync's kid is up (it applies from then on).
    async fn start(&mut self) -> anyhow::Result<()> {
        if self.mcp.is_some() {
            return Ok(());
        }
        for f in ["ctl", "kid"] {
            let _ = std::fs::remove_file(self.run.join(format!("bucardo.{f}.sync.{SYNC}.pid")));
        }
        self.cli(&["start", "gsb bench"]).await?;
        let kid = self.run.join(format!("bucardo.kid.sync.{SYNC}.pid"));
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(mcp) = live_pid(&self.run.join("bucardo.mcp.pid")) {
                if let Some(g) = pgrp(mcp) {
                    if !self.groups.contains(&g) {
                        self.groups.push(g);
                    }
                }
                if live_pid(&kid).is_some() {
                    self.mcp = Some(mcp);
                    return Ok(());
                }
            }
            if Instant::now() > end {
                bail!(
                    "Bucardo's kid for sync {SYNC} not up within 60 s; log tail:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `bucardo stop`, then waits until every daemon has exited (SIGKILL after 30 s).
    async fn stop(&mut self) -> anyhow::Result<()> {
        if self.mcp.take().is_none() {
            return Ok(());
        }
        self.cli(&["stop", "gsb bench"]).await?;
        let end = Instant::now() + Duration::from_secs(30);
        while !self.daemons().is_empty() {
            if Instant::now() > end {
                self.kill_all();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// With the daemons stopped, Bucardo's own purge (what its VAC daemon runs every 30 s for
    /// deltas older than 45 s) of every delta and track row both sites have seen, so a backlog
    /// starts from tables as small as they get in steady state, not from the lag runs' leftovers.
    async fn purge(&self, pair: &Pair) -> anyhow::Result<()> {
        for c in [&pair.primary, &pair.backup] {
            connect(&c.dsn("site"))
                .await
                .batch_execute("SELECT bucardo.bucardo_purge_delta('0 seconds')")
                .await
                .context("bucardo_purge_delta")?;
        }
        Ok(())
    }

    /// Live Bucardo processes in the process groups we started.
    fn daemons(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| pgrp(*p).is_some_and(|g| self.groups.contains(&g)) && is_bucardo(*p))
            .collect()
    }

    fn kill_all(&self) {
        for p in self.daemons() {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
        }
    }

    fn log_tail(&self, n: usize) -> String {
        let t = std::fs::read_to_string(self.log.join("log.bucardo")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// How many conflicts the kids resolved so far, from their log lines.
    fn conflicts_logged(&self) -> u64 {
        let t = std::fs::read_to_string(self.log.join("log.bucardo")).unwrap_or_default();
        t.lines()
            .filter_map(|l| l.split("Conflicts for public.users: ").nth(1))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum()
    }
}

impl Capture for Bucardo {
    /// Bucardo's triggers on the primary's `users` enabled, the daemons running.
    async fn on(&mut self) -> anyhow::Result<()> {
        connect(&self.primary_dsn)
            .await
            .batch_execute(&format!(
                "ALTER TABLE users ENABLE TRIGGER bucardo_delta, ENABLE TRIGGER bucardo_kick_{SYNC}"
            ))
            .await?;
        self.start().await
    }

    /// The daemons stopped and Bucardo's triggers disabled: as if Bucardo were not installed.
    async fn off(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        connect(&self.primary_dsn)
            .await
            .batch_execute(&format!(
                "ALTER TABLE users DISABLE TRIGGER bucardo_delta, DISABLE TRIGGER bucardo_kick_{SYNC}"
            ))
            .await?;
        Ok(())
    }
}

impl Drop for Bucardo {
    fn drop(&mut self) {
        // Before the control server (a field) and the sites (the caller's) go away.
        self.kill_all();
        // For a look at what the daemons did: BENCH_BUCARDO_LOG=<dir> keeps their logs.
        if let Some(keep) = std::env::var_os("BENCH_BUCARDO_LOG") {
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            for f in std::fs::read_dir(&self.log).into_iter().flatten().flatten() {
                let _ = std::fs::copy(f.path(), keep.join(f.file_name()));
            }
        }
    }
}

/// Bucardo two way on a fresh pair with the same settings and tables as gsb's.
pub(crate) async fn bucardo(p: &Params, report: &mut Report) -> anyhow::Result<()> {
    if let Some(what) = missing() {
        report.note(&format!(
            "replication: Bucardo not compared: {what} not installed \
             (apt-get install -y bucardo postgresql-plperl-15, or bench --install); skipped"
        ));
        return Ok(());
    }
    let Params {
        dur,
        big,
        each,
        pgb_secs,
        conflicts: ncf,
    } = *p;
    let version = std::process::Command::new("bucardo")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    eprintln!("  Bucardo: {version}");
    let pair = Pair::start(Vec::new()).await?;
    // Declared after the pair: dropped (daemons killed) before the sites stop.
    let mut bc = Bucardo::setup(&pair).await?;
    report.setup(
        "replication: Bucardo",
        &format!(
            "{version} (Debian package), set up by the bench under a temp dir: control database \
             `bucardo` (plperlu) on a third PostgreSQL server with the same settings, `bucardo \
             install --batch`, site databases A (primary) and B (backup) added, table users in one \
             sync `{SYNC}` with dbs=A:source,B:source (multi-source, two way), \
             conflict_strategy=bucardo_latest, autokick on (the default); loop sleeps lowered to \
             {} s ({}; the defaults of 0.2-0.5 s alone give ~0.65 s of lag). Capture is by \
             triggers: a row trigger writes each changed key to a delta table and a statement \
             trigger sends a NOTIFY (the kick); the controller hears it and wakes the kid, which \
             reads the delta keys, then DELETEs those rows on the other side and COPYs them over. \
             Its lag therefore includes that kick and the daemons' polling loops. Catch-up and \
             apply: `bucardo stop`, `bucardo_purge_delta` on both sites (the VAC daemon's purge, \
             run at once), backlog, `bucardo start`, timed from the kid's start. \
             Capture off = daemons stopped and Bucardo's two triggers on users disabled.",
            SLEEPS[0].1,
            SLEEPS
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(", "),
        ),
    );
    bc.start().await?;
    add_probe(&pair).await?;
    let pids = [
        ("replicator", bc.mcp),
        ("primary PostgreSQL", pair.primary.pid()),
        ("backup PostgreSQL", pair.backup.pid()),
        ("Bucardo's control PostgreSQL", bc.control.pid()),
    ];
    lag_runs(&pair, dur, &pids, None, "Bucardo", "b", report).await;
    let before = bc.conflicts_logged();
    let res = conflicts(&pair, ncf).await;
    put_conflicts(report, "Bucardo", ncf, res);
    report.note(&format!(
        "replication: Bucardo's log counts {} conflict resolutions in the conflict run (per \
         sync run: a row whose two updates land in different runs counts more than once)",
        bc.conflicts_logged() - before
    ));
    drop_probe(&pair).await?;
    let pc = connect(&pair.primary.dsn("site")).await;
    let bcl = connect(&pair.backup.dsn("site")).await;
    bc.stop().await?;
    bc.purge(&pair).await?;
    backlog(&pc, "cu", big).await?;
    bc.start().await?;
    let t = wait_backlog(&bcl, "cu", big, Duration::from_secs(600)).await;
    put_catch_up(report, "Bucardo", big, t);
    bc.stop().await?;
    bc.purge(&pair).await?;
    tokio::try_join!(backlog(&pc, "ap", each), backlog(&bcl, "ab", each))?;
    bc.start().await?;
    two_way_apply(&pair, each, report, "Bucardo").await?;
    let off_is = "daemons stopped, Bucardo's triggers disabled";
    overheads(&pair, pgb_secs, &mut bc, report, "Bucardo", off_is).await;
    let warnings = std::fs::read_to_string(bc.log.join("warning.log")).unwrap_or_default();
    if !warnings.trim().is_empty() {
        let lines: Vec<&str> = warnings.lines().collect();
        report.note(&format!(
            "replication: Bucardo logged {} warnings, the last: {}",
            lines.len(),
            lines.last().copied().unwrap_or_default()
        ));
    }
    bc.stop().await?;
    Ok(())
}
