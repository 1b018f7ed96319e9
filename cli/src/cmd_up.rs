//! `gsb up`: the local two-site stack, supervised by one process.
//!
//! Two PostgreSQL servers (via `gsb-pgctl`), two reference sites, the replicator and the proxy;
//! with `--proxies N` (N >= 2) a local three-member etcd and N proxies forming a fleet on it.
//! The sites, the replicator and the proxy run as child processes of this one (the same `gsb`
//! binary), so a disaster drill can kill exactly one of them, and what runs here is what runs in
//! production. The stack is described in `<dir>/stack.json` for scripts and tests.
//!
//! A component that dies is not restarted by itself (that would hide the drill); SIGHUP starts
//! again whatever is not running. Ctrl-C (SIGINT) or SIGTERM stops the children, then the
//! databases, and leaves no process behind.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gsb_pgctl::{Cluster, ClusterOptions};
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Options of `gsb up`.
#[derive(Debug)]
pub struct UpOptions {
    /// Data directory kept across starts; `None` = temporary.
    pub dir: Option<PathBuf>,
    /// Public proxy listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Enable the sites' fault switch.
    pub allow_faults: bool,
    /// Proxies to run (>= 2: a fleet on a local 3-member etcd).
    pub proxies: usize,
}

/// Members of the local etcd of a fleet.
const ETCD_MEMBERS: usize = 3;

/// The database each site uses inside its PostgreSQL server.
const SITE_DB: &str = "site";
/// How long each child may take to answer its health endpoint after start.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long children get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the supervisor looks for dead children.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);

/// What `<dir>/stack.json` holds: every URL, port and pid of the running stack.
#[derive(Debug, Serialize)]
struct StackFile {
    pid: u32,
    dir: PathBuf,
    config: PathBuf,
    site_url: String,
    detectbackup_url: String,
    status_url: String,
    admin_url: String,
    admin_token: String,
    proxy_metrics_url: String,
    replicator_metrics_url: String,
    replicator_status_url: String,
    primary: SiteInfo,
    backup: SiteInfo,
    replicator_pid: Option<u32>,
    proxy_pid: Option<u32>,
    /// Every proxy (one unless `--proxies`).
    proxies: Vec<ProxyInfo>,
    /// The fleet's etcd members (empty for one proxy).
    etcd: Vec<EtcdInfo>,
}

#[derive(Debug, Serialize)]
struct ProxyInfo {
    name: String,
    url: String,
    admin_url: String,
    config: PathBuf,
    pid: Option<u32>,
}

#[derive(Debug, Serialize)]
struct EtcdInfo {
    name: String,
    client_url: String,
    pid: Option<u32>,
}

#[derive(Debug, Serialize)]
struct SiteInfo {
    url: String,
    pid: Option<u32>,
    postgres_port: u16,
    postgres_pid: Option<u32>,
    dsn: String,
}

/// One supervised child process of the stack.
struct Supervised {
    name: String,
    /// The program: the gsb binary itself, or etcd.
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// URL answering 200 once the child is ready.
    ready_url: String,
    /// Text the ready answer must contain (the replicator answers while still a standby).
    ready_text: &'static str,
    child: Option<Child>,
}

impl Supervised {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env(crate::PARENT_PID_ENV, std::process::id().to_string())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        tracing::info!(component = %self.name, pid = child.id(), "started");
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Reaps the child if it exited; returns a description of how it ended.
    fn reap(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status.to_string())
            }
            Ok(None) => None,
            Err(e) => {
                self.child = None;
                Some(format!("lost: {e}"))
            }
        }
    }

    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(component = %self.name, "did not stop in time; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Runs the stack until `shutdown`.
pub async fn up(opts: UpOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the gsb binary")?;
    let (dir, _temp) = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (std::fs::canonicalize(d)?, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("gsb-up-")
                .tempdir()
                .context("creating a temporary directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    check_reachable_by_postgres(&dir)?;
    let fleet = opts.proxies >= 2;
    let etcd_bin = if fleet { Some(find_etcd()?) } else { None };
    let listens = consecutive(opts.listen, opts.proxies, "--listen")?;
    let admins = consecutive(opts.admin_listen, opts.proxies, "--admin-listen")?;
    for (l, a) in listens.iter().zip(&admins) {
        ensure_free(*l, "--listen")?;
        ensure_free(*a, "--admin-listen")?;
    }
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;

    for name in ["postgres-primary", "postgres-backup"] {
        stop_leftover_server(&dir.join(name)).await;
    }
    eprintln!(
        "gsb up: starting two PostgreSQL servers in {} ...",
        dir.display()
    );
    let mut clusters = start_clusters(&dir).await?;

    let token = admin_token(&dir)?;
    let ports = [free_port()?, free_port()?, free_port()?];
    let (primary_url, backup_url) = (
        format!("http://127.0.0.1:{}", ports[0]),
        format!("http://127.0.0.1:{}", ports[1]),
    );
    let replicator_listen = format!("127.0.0.1:{}", ports[2]);
    let dsns = [clusters[0].dsn(SITE_DB), clusters[1].dsn(SITE_DB)];
    let etcd_ports = if fleet {
        etcd_ports(&dir.join("etcd"))?
    } else {
        vec![]
    };
    let coordination = (!etcd_ports.is_empty()).then(|| {
        let endpoints: Vec<String> = etcd_ports
            .iter()
            .map(|(client, _)| format!("\"http://127.0.0.1:{client}\""))
            .collect();
        format!(
            "\n[coordination]\n# The fleet's local etcd ({ETCD_MEMBERS} members); each proxy's file sets its name.\netcd = [{}]\nlease_ttl = \"3s\"\n",
            endpoints.join(", ")
        )
    });
    // `gsb.toml` is the first proxy's and the replicator's; proxy i >= 1 gets `proxy-<i>.toml`.
    let config_path = dir.join("gsb.toml");
    let mut proxy_configs = Vec::new();
    for i in 0..opts.proxies {
        let path = if i == 0 {
            config_path.clone()
        } else {
            dir.join(format!("proxy-{i}.toml"))
        };
        let mut text = stack_config(
            &ProxyListen {
                listen: listens[i],
                admin: admins[i],
                state_file: if i == 0 {
                    dir.join("gsb-proxy.state")
                } else {
                    dir.join(format!("gsb-proxy-{i}.state"))
                },
            },
            &primary_url,
            &backup_url,
            &dsns,
            &replicator_listen,
            &dir,
        );
        if let Some(c) = &coordination {
            text.push_str(c);
            text.push_str(&format!("name = \"proxy-{i}\"\nregion = \"local\"\n"));
        }
        std::fs::write(&path, text)?;
        proxy_configs.push(path);
    }

    let site = |name: &'static str, role: &str, port: u16, dsn: &str| {
        let mut args = vec![
            "site".to_string(),
            "--role".into(),
            role.into(),
            "--dsn".into(),
            dsn.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        if opts.allow_faults {
            args.push("--allow-faults".into());
        }
        Supervised {
            name: name.into(),
            program: exe.clone(),
            args,
            log: logs.join(format!("{name}.log")),
            // Meetings answer only once the site reached its database and installed its tables,
            // which the replicator (started next) needs.
            ready_url: format!("http://127.0.0.1:{port}/health/meetings"),
            ready_text: "",
            child: None,
        }
    };
    let config_arg = config_path.display().to_string();
    let mut children = Vec::new();
    if let Some(etcd) = &etcd_bin {
        let initial = etcd_ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("etcd-{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        for (i, (client, peer)) in etcd_ports.iter().enumerate() {
            children.push(Supervised {
                name: format!("etcd-{i}"),
                program: etcd.clone(),
                args: etcd_args(i, *client, *peer, &initial, &dir.join("etcd")),
                log: logs.join(format!("etcd-{i}.log")),
                ready_url: format!("http://127.0.0.1:{client}/health"),
                ready_text: "",
                child: None,
            });
        }
    }
    children.push(site("primary-site", "primary", ports[0], &dsns[0]));
    children.push(site("backup-site", "backup", ports[1], &dsns[1]));
    children.push(Supervised {
        name: "replicator".into(),
        program: exe.clone(),
        args: vec!["replicator".into(), "--config".into(), config_arg.clone()],
        log: logs.join("replicator.log"),
        ready_url: format!("http://{replicator_listen}/status"),
        ready_text: "\"active\":true",
        child: None,
    });
    for (i, path) in proxy_configs.iter().enumerate() {
        children.push(Supervised {
            name: if fleet {
                format!("proxy-{i}")
            } else {
                "proxy".into()
            },
            program: exe.clone(),
            args: vec![
                "proxy".into(),
                "--config".into(),
                path.display().to_string(),
            ],
            log: logs.join(if fleet {
                format!("proxy-{i}.log")
            } else {
                "proxy.log".into()
            }),
            ready_url: format!("http://{}/healthz", admins[i]),
            ready_text: "",
            child: None,
        });
    }
    // etcd members must start together (a member waits for its peers' quorum): spawn them all
    // before waiting for any.
    let members = if fleet { ETCD_MEMBERS } else { 0 };

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let started = async {
        for child in children.iter_mut().take(members) {
            child.spawn()?;
        }
        for (i, child) in children.iter_mut().enumerate() {
            if i >= members {
                child.spawn()?;
            }
            wait_ready(&http, child, &shutdown).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = started {
        stop_all(&mut children, &mut clusters).await;
        return Err(e);
    }

    let site_url = format!("http://{}", opts.listen);
    let admin_url = format!("http://{}", opts.admin_listen);
    let pid_of = |children: &[Supervised], name: &str| {
        children
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.pid())
    };
    let proxy_name = |i: usize| {
        if fleet {
            format!("proxy-{i}")
        } else {
            "proxy".into()
        }
    };
    let write_stack =
        |children: &[Supervised], clusters: &mut [Cluster; 2]| -> anyhow::Result<()> {
            let info = |i: usize, url: &str| SiteInfo {
                url: url.to_string(),
                pid: pid_of(
                    children,
                    if i == 0 {
                        "primary-site"
                    } else {
                        "backup-site"
                    },
                ),
                postgres_port: clusters[i].port(),
                postgres_pid: clusters[i].pid(),
                dsn: dsns[i].clone(),
            };
            let stack = StackFile {
                pid: std::process::id(),
                dir: dir.to_path_buf(),
                config: config_path.clone(),
                site_url: format!("{site_url}/"),
                detectbackup_url: format!("{site_url}/detectbackup.php"),
                status_url: format!("{admin_url}/"),
                admin_url: admin_url.clone(),
                admin_token: token.clone(),
                proxy_metrics_url: format!("{admin_url}/metrics"),
                replicator_metrics_url: format!("http://{replicator_listen}/metrics"),
                replicator_status_url: format!("http://{replicator_listen}/status"),
                primary: info(0, &primary_url),
                backup: info(1, &backup_url),
                replicator_pid: pid_of(children, "replicator"),
                proxy_pid: pid_of(children, &proxy_name(0)),
                proxies: (0..opts.proxies)
                    .map(|i| ProxyInfo {
                        name: proxy_name(i),
                        url: format!("http://{}/", listens[i]),
                        admin_url: format!("http://{}", admins[i]),
                        config: proxy_configs[i].clone(),
                        pid: pid_of(children, &proxy_name(i)),
                    })
                    .collect(),
                etcd: etcd_ports
                    .iter()
                    .enumerate()
                    .map(|(i, (client, _))| EtcdInfo {
                        name: format!("etcd-{i}"),
                        client_url: format!("http://127.0.0.1:{client}"),
                        pid: pid_of(children, &format!("etcd-{i}")),
                    })
                    .collect(),
            };
            let tmp = dir.join("stack.json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&stack)?)?;
            std::fs::rename(&tmp, dir.join("stack.json"))?;
            Ok(())
        };
    write_stack(&children, &mut clusters)?;

    println!(
        "\ngsb up: the two-site stack is running (data in {dir})\n\
         \n  site URL:        {site_url}/\
         \n  detectbackup:    {site_url}/detectbackup.php\
         \n  status page:     {admin_url}/   (admin token: {token}; also in {dir}/admin.token)\
         \n  metrics:         {admin_url}/metrics (proxy), http://{replicator_listen}/metrics (replicator)\
         \n  primary site:    {primary_url}/  (pid {p_pid}, its PostgreSQL pid {p_pg})\
         \n  backup site:     {backup_url}/  (pid {b_pid}, its PostgreSQL pid {b_pg})\
         \n  config, logs:    {config}, {dir}/logs/\
         \n\n  simulate a disaster: kill -9 {p_pid} {p_pg}    (the same URL keeps working; detectbackup turns to Backup)\
         \n  bring it back:       kill -HUP {me}\
         \n  Ctrl-C stops everything.\n",
        dir = dir.display(),
        config = config_path.display(),
        p_pid = opt(pid_of(&children, "primary-site")),
        p_pg = opt(clusters[0].pid()),
        b_pid = opt(pid_of(&children, "backup-site")),
        b_pg = opt(clusters[1].pid()),
        me = std::process::id(),
    );
    if fleet {
        println!(
            "  a fleet of {} proxies on a local {ETCD_MEMBERS}-member etcd:",
            opts.proxies
        );
        for i in 0..opts.proxies {
            println!(
                "    {:<8} http://{}/  admin http://{}/  (pid {})",
                proxy_name(i),
                listens[i],
                admins[i],
                opt(pid_of(&children, &proxy_name(i)))
            );
        }
        for (i, (client, _)) in etcd_ports.iter().enumerate() {
            println!(
                "    etcd-{i}   http://127.0.0.1:{client}  (pid {})",
                opt(pid_of(&children, &format!("etcd-{i}")))
            );
        }
        println!("  the decider: `gsb status` shows it (curl -s {admin_url}/status | grep -o '\"decider\":\"[^\"]*\"')\n");
    }

    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: starting again whatever is not running");
                if let Err(e) = restart_dead(&http, &mut children, &mut clusters, &shutdown).await {
                    tracing::error!(error = %format!("{e:#}"), "restart failed");
                }
                write_stack(&children, &mut clusters)?;
            }
            _ = tick.tick() => {
                for child in children.iter_mut() {
                    if let Some(how) = child.reap() {
                        tracing::warn!(component = %child.name, exit = %how, "exited; `kill -HUP {}` starts it again", std::process::id());
                    }
                }
                for (i, cluster) in clusters.iter_mut().enumerate() {
                    if cluster.pid().is_some() && !cluster.is_running() {
                        tracing::warn!(component = if i == 0 { "primary-postgres" } else { "backup-postgres" }, "PostgreSQL exited; `kill -HUP {}` starts it again", std::process::id());
                    }
                }
            }
        }
    }
    eprintln!("gsb up: stopping ...");
    stop_all(&mut children, &mut clusters).await;
    eprintln!("gsb up: stopped");
    Ok(())
}

fn opt(pid: Option<u32>) -> String {
    pid.map_or_else(|| "-".into(), |p| p.to_string())
}

/// Starts (and, on first use, initialises) both servers and their site databases.
async fn start_clusters(dir: &Path) -> anyhow::Result<[Cluster; 2]> {
    let make = |name: &'static str| {
        let data = dir.join(name);
        tokio::task::spawn_blocking(move || -> anyhow::Result<Cluster> {
            let mut c = Cluster::init(ClusterOptions {
                dir: Some(data),
                ..ClusterOptions::default()
            })
            .with_context(|| format!("initialising {name}"))?;
            c.start().with_context(|| format!("starting {name}"))?;
            c.create_database(SITE_DB)
                .with_context(|| format!("creating database {SITE_DB} in {name}"))?;
            Ok(c)
        })
    };
    let (p, b) = tokio::join!(make("postgres-primary"), make("postgres-backup"));
    Ok([p??, b??])
}

/// A `gsb up` killed with SIGKILL could not stop its PostgreSQL servers; the next start with the
/// same `--dir` stops such a leftover (fast shutdown) instead of failing on its lock file.
async fn stop_leftover_server(data_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains(&*data_dir.to_string_lossy());
    if !ours {
        return;
    }
    tracing::warn!(pid, dir = %data_dir.display(), "stopping a PostgreSQL server left over by an earlier `gsb up`");
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let deadline = Instant::now() + STOP_GRACE * 3;
    while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGHUP: starts the databases first, then every child that is not running.
async fn restart_dead(
    http: &reqwest::Client,
    children: &mut [Supervised],
    clusters: &mut [Cluster; 2],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    for cluster in clusters.iter_mut() {
        if !cluster.is_running() {
            tokio::task::block_in_place(|| cluster.start())?;
            tracing::info!(port = cluster.port(), "PostgreSQL started again");
        }
    }
    for child in children.iter_mut() {
        child.reap();
        if child.child.is_none() {
            child.spawn()?;
            wait_ready(http, child, shutdown).await?;
        }
    }
    Ok(())
}

async fn stop_all(children: &mut [Supervised], clusters: &mut [Cluster; 2]) {
    // Proxy first, so clients get clean refusals rather than errors from half a stack.
    for child in children.iter_mut().rev() {
        child.stop().await;
    }
    for cluster in clusters.iter_mut() {
        if let Err(e) = tokio::task::block_in_place(|| cluster.stop()) {
            tracing::warn!(error = %e, "stopping PostgreSQL");
        }
    }
}

/// Polls the child's ready URL until it answers 200, it exits, or the deadline passes.
async fn wait_ready(
    http: &reqwest::Client,
    child: &mut Supervised,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        if let Ok(resp) = http.get(&child.ready_url).send().await {
            if resp.status().is_success()
                && resp
                    .text()
                    .await
                    .is_ok_and(|t| t.contains(child.ready_text))
            {
                return Ok(());
            }
        }
        if let Some(how) = child.reap() {
            bail!(
                "{} exited during start ({how}); see {}",
                child.name,
                child.log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready at {} after {:?}; see {}",
                child.name,
                child.ready_url,
                READY_DEADLINE,
                child.log.display()
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => bail!("interrupted while starting {}", child.name),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The admin token: kept in `<dir>/admin.token` across starts, created at random the first time.
fn admin_token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("admin.token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let token: String = {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        (0..32)
            .map(|_| format!("{:x}", rng.gen_range(0..16u8)))
            .collect()
    };
    std::fs::write(&path, &token)?;
    Ok(token)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn ensure_free(addr: SocketAddr, flag: &str) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("{addr} is already in use: stop what holds it or pass another {flag}, e.g. {flag} 127.0.0.1:18080"))
}

/// As root, postgres runs as the `postgres` user, which must be able to reach the data directory.
fn check_reachable_by_postgres(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(());
    }
    for ancestor in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor)?.permissions().mode();
        if mode & 0o001 == 0 {
            bail!(
                "PostgreSQL runs as the `postgres` user here (it refuses root) and cannot reach {}: {} is not searchable by others; use a --dir under /var/tmp or /srv, or `chmod o+x {}`",
                dir.display(),
                ancestor.display(),
                ancestor.display()
            );
        }
    }
    Ok(())
}

/// One proxy's own settings in the stack.
struct ProxyListen {
    listen: SocketAddr,
    admin: SocketAddr,
    state_file: PathBuf,
}

/// `n` addresses on consecutive ports from `first` (8080, 8081, ...).
fn consecutive(first: SocketAddr, n: usize, flag: &str) -> anyhow::Result<Vec<SocketAddr>> {
    (0..n)
        .map(|i| {
            let port = u16::try_from(usize::from(first.port()) + i)
                .with_context(|| format!("{flag} {first}: {n} consecutive ports do not fit"))?;
            Ok(SocketAddr::new(first.ip(), port))
        })
        .collect()
}

/// The `etcd` binary on PATH, or the fix.
fn find_etcd() -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .context(
            "--proxies needs etcd for the fleet: install it with `apt-get install -y etcd-server`",
        )
}

/// The local etcd's ports, kept in `<dir>/ports` so a member's data (which records its peers'
/// addresses) stays valid across starts with the same `--dir`.
fn etcd_ports(dir: &Path) -> anyhow::Result<Vec<(u16, u16)>> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join("ports");
    if let Ok(text) = std::fs::read_to_string(&file) {
        let ports: Vec<(u16, u16)> = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(c, p)| Some((c.parse().ok()?, p.parse().ok()?)))
            .collect();
        if ports.len() == ETCD_MEMBERS
            && ports.iter().all(|(c, p)| {
                ensure_free(SocketAddr::from(([127, 0, 0, 1], *c)), "").is_ok()
                    && ensure_free(SocketAddr::from(([127, 0, 0, 1], *p)), "").is_ok()
            })
        {
            return Ok(ports);
        }
        // The old ports are taken: start the local etcd afresh on new ones.
        tracing::warn!(dir = %dir.display(), "the local etcd's ports are in use; starting it afresh");
        for i in 0..ETCD_MEMBERS {
            let _ = std::fs::remove_dir_all(dir.join(format!("etcd-{i}")));
        }
    }
    let ports: Vec<(u16, u16)> = (0..ETCD_MEMBERS)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let text: String = ports.iter().map(|(c, p)| format!("{c} {p}\n")).collect();
    std::fs::write(&file, text)?;
    Ok(ports)
}

/// One member of the local etcd: loopback only, short heartbeats, compaction on (the fleet
/// writes a vote per proxy per second or so).
fn etcd_args(i: usize, client: u16, peer: u16, initial: &str, dir: &Path) -> Vec<String> {
    vec![
        format!("--name=etcd-{i}"),
        format!("--data-dir={}", dir.join(format!("etcd-{i}")).display()),
        format!("--listen-client-urls=http://127.0.0.1:{client}"),
        format!("--advertise-client-urls=http://127.0.0.1:{client}"),
        format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-cluster={initial}"),
        "--initial-cluster-token=gsb-up".into(),
        "--initial-cluster-state=new".into(),
        "--heartbeat-interval=100".into(),
        "--election-timeout=1000".into(),
        "--auto-compaction-mode=revision".into(),
        "--auto-compaction-retention=10000".into(),
        "--logger=zap".into(),
        "--log-level=warn".into(),
    ]
}

/// The config of the local stack: the same file format an SRE writes for production.
fn stack_config(
    opts: &ProxyListen,
    primary_url: &str,
    backup_url: &str,
    dsns: &[String; 2],
    replicator_listen: &str,
    dir: &Path,
) -> String {
    format!(
        r#"# Written by `gsb up`; rewritten at every start.
[proxy]
listen = "{listen}"

[admin]
listen = "{admin}"
token_file = "{dir}/admin.token"

[sites.primary]
url = "{primary_url}"
[sites.backup]
url = "{backup_url}"

[health]
interval = "500ms"
timeout = "400ms"
rise = 2
fall = 3
# A site whose database is gone is down for its users: only the components that need the
# database are critical, so a dead database fails over, one broken component only alerts.
[[health.components]]
name = "web"
path = "/health/web"
critical = false
[[health.components]]
name = "meetings"
path = "/health/meetings"
[[health.components]]
name = "api"
path = "/health/api"
[[health.components]]
name = "db"
path = "/health/db"

[failover]
auto = true
failback = "auto"
failback_after = "10s"
min_dwell = "10s"
drain_timeout = "30s"
replicator_status = "http://{replicator_listen}/status"
failback_max_wait = "5m"
state_file = "{state_file}"

[replicator]
primary_dsn = "{p_dsn}"
backup_dsn = "{b_dsn}"
two_way = ["users", "meetings"]
config_tables = ["site_config", "custom_pages", "client_versions"]
config_copy_at = "03:00"
config_copy_timezone = "UTC"
usage_tables = ["usage_records"]
metrics_listen = "{replicator_listen}"
"#,
        listen = opts.listen,
        admin = opts.admin,
        state_file = opts.state_file.display(),
        dir = dir.display(),
        p_dsn = dsns[0],
        b_dsn = dsns[1],
    )
}
