//! Starting the reverse proxies under test (gsb, HAProxy, nginx) in front of two upstreams with
//! equivalent settings: one worker, keep-alive to the upstream, no caching, no access log.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;

use gsb_tests::{free_port, gsb_bin, Proc};

use crate::upstream::UpstreamProc;

/// Health-probe settings (the same for gsb and HAProxy when compared "with the same settings").
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Time between probes.
    pub interval_ms: u64,
    /// Probe timeout.
    pub timeout_ms: u64,
    /// Failures that take a server down.
    pub fall: u32,
    /// Successes that bring it up.
    pub rise: u32,
}

/// gsb's defaults (DESIGN.md `[health]`).
pub const GSB_DEFAULT: Probe = Probe {
    interval_ms: 500,
    timeout_ms: 400,
    fall: 3,
    rise: 2,
};
/// The documented fast profile (BENCHMARKS.md): probe every 100 ms, 2 failures.
pub const FAST: Probe = Probe {
    interval_ms: 100,
    timeout_ms: 100,
    fall: 2,
    rise: 2,
};

/// Which proxy (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The upstream reached directly.
    Direct,
    /// `gsb proxy`.
    Gsb,
    /// Another `gsb` binary (`BENCH_GSB_BASELINE`, e.g. the main branch's) for an A/B in one run.
    GsbBaseline,
    /// HAProxy 2.6.
    Haproxy,
    /// nginx 1.22.
    Nginx,
}

impl Kind {
    /// Column name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Gsb => "gsb",
            Kind::GsbBaseline => "gsb-baseline",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
        }
    }
}

/// A running contender.
pub struct Running {
    /// The proxy process (None for direct); killed on drop.
    pub proc: Option<Proc>,
    /// Base URL clients use.
    pub url: String,
    /// `host:port` clients connect to.
    pub addr: String,
    /// Stopped by SIGTERM first (nginx: its master then stops its workers; a SIGKILLed master
    /// leaves them running, holding the listen socket and whatever fds the bench had).
    graceful: bool,
    /// Holds config files.
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let (true, Some(p)) = (self.graceful, self.proc.as_mut()) {
            p.terminate();
        }
    }
}

impl Running {
    /// Pid whose process tree is measured (None for direct).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

/// The baseline binary of [`Kind::GsbBaseline`], when `BENCH_GSB_BASELINE` names one.
pub fn baseline_bin() -> Option<std::path::PathBuf> {
    std::env::var_os("BENCH_GSB_BASELINE").map(Into::into)
}

/// Starts `kind` in front of `primary` (active) and `backup` with `workers` worker threads or
/// processes; `probe` None = the proxy's defaults.
pub async fn start(
    kind: Kind,
    primary: &UpstreamProc,
    backup: &UpstreamProc,
    probe: Option<Probe>,
    workers: usize,
) -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let port = if kind == Kind::Direct {
        primary.port
    } else {
        free_port()
    };
    let proc = match kind {
        Kind::Direct => None,
        Kind::Gsb | Kind::GsbBaseline => {
            let bin = match kind {
                Kind::GsbBaseline => baseline_bin().unwrap_or_else(gsb_bin),
                _ => gsb_bin(),
            };
            // A baseline build may predate `proxy.workers`: it gets the runtime threads only.
            let key = kind == Kind::Gsb;
            let p = start_gsb(
                &bin,
                dir.path(),
                port,
                primary,
                backup,
                probe,
                (workers, key),
            )?;
            Some(p)
        }
        Kind::Haproxy => Some(start_haproxy(
            dir.path(),
            port,
            primary,
            backup,
            probe,
            workers,
        )?),
        Kind::Nginx => Some(start_nginx(dir.path(), port, primary, workers)?),
    };
    let r = Running {
        proc,
        graceful: kind == Kind::Nginx,
        url: format!("http://127.0.0.1:{port}"),
        addr: format!("127.0.0.1:{port}"),
        _dir: dir,
    };
    wait_ready(&r, kind).await?;
    Ok(r)
}

async fn wait_ready(r: &Running, kind: Kind) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = client
            .get(format!("{}/small", r.url))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .map(|resp| {
                resp.status().is_success()
                    && resp
                        .headers()
                        .get("x-upstream")
                        .is_some_and(|v| v == "primary")
            })
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > end {
            let tail = r.proc.as_ref().map(|p| p.tail(30)).unwrap_or_default();
            bail!(
                "{} not serving the primary within 30 s: {tail}",
                kind.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_gsb(
    bin: &Path,
    dir: &Path,
    port: u16,
    primary: &UpstreamProc,
    backup: &UpstreamProc,
    probe: Option<Probe>,
    (workers, with_key): (usize, bool),
) -> anyhow::Result<Proc> {
    let health = match probe {
        Some(p) => format!(
            "[health]\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nrise = {}\nfall = {}\n",
            p.interval_ms, p.timeout_ms, p.rise, p.fall
        ),
        None => String::new(),
    };
    let cfg = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\n{workers}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [sites.primary]\nurl = \"{p}\"\n[sites.backup]\nurl = \"{b}\"\n\n{health}\n\
         [failover]\nstate_file = \"{state}\"\n",
        admin = free_port(),
        workers = match with_key {
            true => format!("workers = {workers}\n"),
            false => String::new(),
        },
        p = primary.url(),
        b = backup.url(),
        state = dir.join("gsb-proxy.state").display(),
    );
    let path = dir.join("gsb.toml");
    std::fs::write(&path, cfg)?;
    Ok(Proc::spawn(
        "gsb-proxy",
        Command::new(bin)
            .args(["proxy", "--config"])
            .arg(&path)
            // `workers` request-path threads: the budget of nginx's worker_processes and
            // HAProxy's nbthread. The main runtime (probes, admin; the request path too in a
            // build before `proxy.workers`) gets as many.
            .env("TOKIO_WORKER_THREADS", workers.to_string())
            .env("RUST_LOG", "warn"),
    ))
}

fn start_haproxy(
    dir: &Path,
    port: u16,
    primary: &UpstreamProc,
    backup: &UpstreamProc,
    probe: Option<Probe>,
    workers: usize,
) -> anyhow::Result<Proc> {
    let (check, tcheck) = match probe {
        Some(p) => (
            format!(
                "check inter {i}ms fastinter {i}ms downinter {i}ms fall {} rise {}",
                p.fall,
                p.rise,
                i = p.interval_ms
            ),
            format!("    timeout check {}ms\n", p.timeout_ms),
        ),
        // HAProxy's defaults: inter 2s, fall 3, rise 2.
        None => ("check".to_owned(), String::new()),
    };
    let cfg = format!(
        "global\n    nbthread {workers}\n    maxconn 9990\n\n\
         defaults\n    mode http\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n\
         \n    timeout http-keep-alive 60s\n{tcheck}\n\
         frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n\n\
         backend be\n    option httpchk GET /health/web\n    http-reuse always\n\
         \n    server primary 127.0.0.1:{pp} {check}\n    server backup 127.0.0.1:{bp} {check} backup\n",
        pp = primary.port,
        bp = backup.port,
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    Ok(Proc::spawn(
        "haproxy",
        Command::new("haproxy").arg("-db").arg("-f").arg(&path),
    ))
}

fn start_nginx(
    dir: &Path,
    port: u16,
    primary: &UpstreamProc,
    workers: usize,
) -> anyhow::Result<Proc> {
    let d = dir.display();
    let cfg = format!(
        "daemon off;\nworker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         worker_rlimit_nofile 20000;\nevents {{ worker_connections 12000; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           keepalive_timeout 60s;\n  keepalive_requests 1000000;\n\
           upstream up {{ server 127.0.0.1:{pp}; keepalive 128; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://up;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
               proxy_buffering off;\n      proxy_request_buffering off;\n    }}\n  }}\n}}\n",
        pp = primary.port,
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, cfg)?;
    Ok(Proc::spawn(
        "nginx",
        Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&path),
    ))
}
