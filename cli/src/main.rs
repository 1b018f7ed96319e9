//! `gsb`: the one command users run. Thin: parses arguments, sets up logging, signals and the
//! metrics registry, and hands over to the product crates.
#![deny(unsafe_code)]

mod alloc;
mod cmd_admin;
mod cmd_proxy;
mod cmd_replicator;
mod cmd_site;
mod cmd_up;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than glibc's malloc: the proxy's per-request buffers are freed and taken
/// again at a high rate from worker threads, where glibc trims and refaults arena pages
/// (measured: page faults and `madvise` per request, CPU per request; BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a configuration the command cannot run with (as linkerd: EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "gsb",
    version,
    about = "One URL and the same data for a meeting service's primary and backup sites"
)]
struct Cli {
    /// Log format: `human` (default) or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "GSB_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Where the admin API is and how to authenticate to it.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminArgs {
    /// Admin API base URL.
    #[arg(
        long = "admin",
        env = "GSB_ADMIN",
        default_value = "http://127.0.0.1:9090"
    )]
    pub url: String,
    /// File holding the admin bearer token (else `GSB_ADMIN_TOKEN`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy and its health checker.
    Proxy {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the replicator.
    Replicator {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the local two-site stack: two PostgreSQL servers, two sites, the replicator, the proxy.
    Up {
        /// Keep data here (kept for the next start); default: a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Public proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener (metrics, status page, failover API).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// Let `POST /_faults` on the sites break one component (for partial-failure drills).
        #[arg(long)]
        allow_faults: bool,
        /// Proxies to run. With 2 or more, a local 3-member etcd is started too and the proxies
        /// form a fleet on it, on consecutive ports from --listen and --admin-listen.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        proxies: u16,
    },
    /// Show the proxy's state (active site, health, timeline).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move traffic to a site by hand (holds until `gsb failback` or `gsb auto`).
    Failover {
        #[command(flatten)]
        admin: AdminArgs,
        /// `backup` or `primary`.
        #[arg(long)]
        to: String,
        /// Why, for the timeline and the logs.
        #[arg(long, default_value = "manual failover")]
        reason: String,
    },
    /// Move traffic back to the primary by hand.
    Failback {
        #[command(flatten)]
        admin: AdminArgs,
        /// Why, for the timeline and the logs.
        #[arg(long, default_value = "manual failback")]
        reason: String,
    },
    /// Release any forced state: the health checker decides again.
    Auto {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Compare the replicated tables on both sites; exit 0 only if equal.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Rebuild the logical replication of the pair (after an invalidated slot): new slots
    /// from a consistent snapshot, existing rows merged; then run `gsb verify`.
    Resync {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Copy the configuration tables primary -> backup now.
    CopyConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file; every error names the key and the fix.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// Also connect to both sites' databases and check what the replicator's capture
        /// needs there (`wal_level`, `track_commit_timestamp`, slots, WAL senders, roles).
        #[arg(long)]
        databases: bool,
    },
    /// Run the reference meeting site (used by `gsb up` and the tests).
    Site {
        /// `primary` or `backup`.
        #[arg(long)]
        role: gsb_site::Role,
        /// PostgreSQL connection string.
        #[arg(long)]
        dsn: String,
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
        /// Enable the fault switch (`POST /_faults`).
        #[arg(long)]
        allow_faults: bool,
    },
}

/// A configuration that cannot be run with; `main` exits with `EXIT_BAD_CONFIG`.
#[derive(Debug, thiserror::Error)]
#[error("invalid config {path}: {message}")]
pub struct BadConfig {
    /// The file.
    pub path: String,
    /// What is wrong, naming the key.
    pub message: String,
}

/// Reads a config file, mapping an unreadable file to `BadConfig`.
pub fn read_config(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        BadConfig {
            path: path.display().to_string(),
            message: format!("cannot read it: {e}"),
        }
        .into()
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// Cancels `token` on SIGTERM or SIGINT (Ctrl-C); a second signal exits at once.
fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutdown requested: stopping new work, draining");
        token.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

/// Set by `gsb up` on its children: they stop when that supervisor is gone, even if it was
/// killed with SIGKILL and could not stop them itself.
pub const PARENT_PID_ENV: &str = "GSB_SUPERVISOR_PID";

/// Cancels `token` when the process named by `GSB_SUPERVISOR_PID` is no longer our parent.
fn spawn_parent_watch(token: CancellationToken) {
    let Some(parent) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = every.tick() => {}
            }
            if nix::unistd::getppid().as_raw() != parent {
                tracing::warn!(
                    supervisor = parent,
                    "the supervising `gsb up` is gone; shutting down"
                );
                token.cancel();
                return;
            }
        }
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    gsb_proxy::set_idle_release(alloc::release_thread_memory);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gsb: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(bad) = e.downcast_ref::<BadConfig>() {
                eprintln!("gsb: {bad}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            eprintln!("gsb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    spawn_parent_watch(shutdown.clone());
    match command {
        Command::Proxy { config } => {
            spawn_signal_handler(shutdown.clone());
            cmd_proxy::proxy(&config, prometheus_registry(), shutdown).await?;
        }
        Command::Replicator { config } => {
            spawn_signal_handler(shutdown.clone());
            cmd_replicator::replicator(&config, prometheus_registry(), shutdown).await?;
        }
        Command::Up {
            dir,
            listen,
            admin_listen,
            allow_faults,
            proxies,
        } => {
            spawn_signal_handler(shutdown.clone());
            cmd_up::up(
                cmd_up::UpOptions {
                    dir,
                    listen,
                    admin_listen,
                    allow_faults,
                    proxies: usize::from(proxies),
                },
                shutdown,
            )
            .await?;
        }
        Command::Status { admin, json } => return cmd_admin::status(&admin, json).await,
        Command::Failover { admin, to, reason } => {
            return cmd_admin::failover(&admin, &to, &reason).await
        }
        Command::Failback { admin, reason } => return cmd_admin::failback(&admin, &reason).await,
        Command::Auto { admin } => return cmd_admin::auto(&admin).await,
        Command::Verify { config } => return cmd_replicator::verify(&config).await,
        Command::CopyConfig { config } => cmd_replicator::copy_config(&config).await?,
        Command::Resync { config } => cmd_replicator::resync(&config).await?,
        Command::CheckConfig { config, databases } => {
            return check_config(&config, databases).await
        }
        Command::Site {
            role,
            dsn,
            listen,
            allow_faults,
        } => {
            spawn_signal_handler(shutdown.clone());
            cmd_site::site(
                gsb_site::SiteOptions {
                    role,
                    dsn,
                    listen,
                    allow_faults,
                },
                shutdown,
            )
            .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One registry per process, passed down (no global registry).
fn prometheus_registry() -> prometheus::Registry {
    prometheus::Registry::new()
}

/// Validates every section the file has: the proxy's when it has `[sites]`, the replicator's when
/// it has `[replicator]`; with `databases`, then the sites' databases for the replicator.
async fn check_config(path: &Path, databases: bool) -> anyhow::Result<ExitCode> {
    let text = read_config(path)?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| BadConfig {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut checked = Vec::new();
    let mut errors = Vec::new();
    if table.contains_key("sites") || !table.contains_key("replicator") {
        checked.push("proxy");
        if let Err(e) = cmd_proxy::check(&text) {
            errors.push(e);
        }
    }
    if table.contains_key("replicator") {
        checked.push("replicator");
        if let Err(e) = cmd_replicator::check(&text) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        println!("{}: ok ({})", path.display(), checked.join(", "));
        if databases && table.contains_key("replicator") {
            return cmd_replicator::check_databases(path).await;
        }
        Ok(ExitCode::SUCCESS)
    } else {
        Err(BadConfig {
            path: path.display().to_string(),
            message: errors.join("\n"),
        }
        .into())
    }
}
