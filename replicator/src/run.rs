//! `run`: metrics listener, leader election (etcd or advisory lock, see `elect`), schema install, the two
//! directions, heartbeats and the config copy schedule.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::qualify;
use crate::config::Capture;
use crate::db::{connect, Site};
use crate::metrics::{Metrics, SharedStatus, Status};
use crate::schema::{install, table_info, TableInfo};
use crate::worker::{heartbeat, run_direction, Direction};
use crate::{copy, Config, Error};

/// Runs the replicator until `shutdown`: serves `/metrics` and `/status` on `metrics_listen`,
/// waits as a standby until it holds the lock, then replicates. Returns early only for errors
/// retrying cannot fix (missing table, no primary key, permission, bad listener).
pub async fn run(
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let metrics = Metrics::register(&registry)?;
    if config.legacy_tombstone_retention {
        tracing::warn!(
            "replicator.tombstone_retention no longer has an effect: both captures share one apply, which keeps no tombstones (an update of a row that is gone is skipped and logged); remove the key"
        );
    }
    let status: SharedStatus = Arc::new(Mutex::new(Status::default()));
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.metrics_listen,
            source,
        })?;
    // The bound address, not the configured one: port 0 picks a free port (tests, several
    // instances on one host) and this line is how callers learn it.
    let bound = listener.local_addr().unwrap_or(config.metrics_listen);
    tracing::info!(listen = %bound, "replicator metrics and status listening");
    let tracker = TaskTracker::new();
    tracker.spawn(crate::http::serve(
        listener,
        registry,
        status.clone(),
        shutdown.clone(),
        tracker.clone(),
    ));
    let result = match crate::elect::Elector::new(&config, &tracker, &shutdown) {
        Ok(mut elector) => {
            let r = elect_and_replicate(&config, &metrics, &status, &mut elector, &shutdown).await;
            elector.release().await;
            r
        }
        Err(e) => Err(e),
    };
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

async fn elect_and_replicate(
    config: &Config,
    metrics: &Metrics,
    status: &SharedStatus,
    elector: &mut crate::elect::Elector,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match lead_once(config, metrics, status, elector, shutdown).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) if e.is_permanent() => {
                tracing::error!(error = %e, "replicator cannot run");
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "replicator: retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    Ok(())
}

/// Waits for the active role, replicates while holding it; returns when the role is lost.
async fn lead_once(
    config: &Config,
    metrics: &Metrics,
    status: &SharedStatus,
    elector: &mut crate::elect::Elector,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let Some(held) = elector.acquire(config, shutdown).await? else {
        return Ok(());
    };
    tracing::info!("holding the active role; installing schema");
    setup(config, metrics).await?;
    set_active(metrics, status, true);
    let work = shutdown.child_token();
    let tasks = TaskTracker::new();
    let (p2b, b2p) = directions(config);
    for d in [p2b, b2p] {
        let name = d.name;
        let direction = run_direction(
            d,
            config.clone(),
            metrics.clone(),
            status.clone(),
            work.clone(),
        );
        tasks.spawn(on_own_thread(
            name,
            direction,
            metrics.clone(),
            status.clone(),
        ));
    }
    for site in [Site::Primary, Site::Backup] {
        tasks.spawn(heartbeat(
            config.link(site)?,
            config.heartbeat_interval,
            work.clone(),
        ));
    }
    tasks.spawn(copy::schedule(
        config.clone(),
        metrics.clone(),
        status.clone(),
        work.clone(),
    ));
    if !config.verify_interval.is_zero() {
        tasks.spawn(verify_loop(
            config.clone(),
            metrics.clone(),
            status.clone(),
            work.clone(),
        ));
    }
    tasks.close();
    let lost = elector.hold(&held, shutdown).await;
    work.cancel();
    tasks.wait().await;
    set_active(metrics, status, false);
    drop(held);
    if lost {
        tracing::warn!(
            "lost the active role (lock session or etcd lease); stopped replicating, trying to take it again"
        );
    }
    Ok(())
}

/// Runs a direction on a thread of its own, on a current-thread runtime; resolves when it ends.
/// The direction's reader, applier and database connections then wake each other without
/// crossing threads (no work stealing, no cross-thread wake-up per batch), and the two
/// directions still run in parallel, never one behind the other. Measured against both
/// directions on the shared multi-thread runtime: 15-27 % less replicator CPU at 1,000
/// writes/s each way, level at 4,000 (BENCHMARKS.md, "direction threads"). Where no thread
/// or runtime can be had, the direction runs on the caller's runtime instead.
async fn on_own_thread<F>(name: &'static str, direction: F, metrics: Metrics, status: SharedStatus)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(direction = name, error = %e, "no runtime of its own for the direction; sharing the main one");
            return direction.await;
        }
    };
    // The future moves to the thread only once it runs there: a failed spawn gives it back.
    let slot = Arc::new(Mutex::new(Some(direction)));
    let theirs = slot.clone();
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let direction = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(direction) = direction {
                runtime.block_on(direction);
            }
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            if ended.await.is_err() {
                let what =
                    "the direction's thread panicked (a bug, please report it with the log); \
                    this direction stopped replicating until the replicator restarts";
                tracing::error!(direction = name, "{what}");
                metrics.errors.with_label_values(&[name]).inc();
                crate::metrics::with_dir(&status, name, |s| s.error = Some(what.to_owned()));
            }
        }
        Err(e) => {
            tracing::warn!(direction = name, error = %e, "no thread of its own for the direction; sharing the main runtime");
            let direction = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(direction) = direction {
                direction.await;
            }
        }
    }
}

fn set_active(metrics: &Metrics, status: &SharedStatus, active: bool) {
    metrics.active.set(i64::from(active));
    status.lock().unwrap_or_else(|p| p.into_inner()).active = active;
}

/// Checks the capture's prerequisites and installs the schema on both sites: the primary
/// captures two_way tables and applies two_way and usage tables; the backup captures both and
/// applies two_way. The trigger capture then moves cursors the first generation left to the
/// shared apply (`upgrade::adopt`); the logical capture sets up each source's publication
/// instead of triggers and switches a pair still capturing by trigger (`upgrade.rs`).
pub(crate) async fn setup(config: &Config, metrics: &Metrics) -> Result<(), Error> {
    let mut p = connect(&config.link(Site::Primary)?).await?;
    let mut b = connect(&config.link(Site::Backup)?).await?;
    let logical = config.capture == Capture::Logical;
    crate::logical::check_prerequisites(&p, Site::Primary, config.capture).await?;
    crate::logical::check_prerequisites(&b, Site::Backup, config.capture).await?;
    let p_two = infos(&p.client, Site::Primary, &config.two_way).await?;
    let p_usage = infos(&p.client, Site::Primary, &config.usage_tables).await?;
    let b_two = infos(&b.client, Site::Backup, &config.two_way).await?;
    let b_usage = infos(&b.client, Site::Backup, &config.usage_tables).await?;
    infos(&p.client, Site::Primary, &config.config_tables).await?;
    infos(&b.client, Site::Backup, &config.config_tables).await?;
    let p_apply: Vec<TableInfo> = p_two.iter().chain(&p_usage).cloned().collect();
    let b_capture: Vec<TableInfo> = b_two.iter().chain(&b_usage).cloned().collect();
    install(&mut p.client, Site::Primary, &p_two, &p_apply, !logical).await?;
    install(&mut b.client, Site::Backup, &b_capture, &b_two, !logical).await?;
    let (p2b, b2p) = directions(config);
    let p_lock = connect(&config.link(Site::Primary)?).await?;
    let b_lock = connect(&config.link(Site::Backup)?).await?;
    if !logical {
        crate::upgrade::adopt(config, [&p, &b, &p_lock, &b_lock], &p2b, &b2p, metrics).await?;
    } else {
        // Publications first: pgoutput reads them as of each decoded commit, so a slot made
        // by the switch must not predate them.
        crate::logical::prepare_source(&p, &p2b, &p_two).await?;
        crate::logical::prepare_source(&b, &b2p, &b_capture).await?;
        crate::upgrade::switch_from_triggers(
            config,
            [&p, &b, &p_lock, &b_lock],
            &p2b,
            &b2p,
            metrics,
        )
        .await?;
    }
    Ok(())
}

/// The two directions and the tables each ships (heartbeats included).
pub(crate) fn directions(config: &Config) -> (Direction, Direction) {
    let two_way: Vec<String> = config.two_way.iter().map(|t| qualify(t)).collect();
    let usage: Vec<String> = config.usage_tables.iter().map(|t| qualify(t)).collect();
    let hb = "gsb.heartbeat".to_owned();
    let p2b = Direction {
        name: "primary_to_backup",
        source: Site::Primary,
        target: Site::Backup,
        tables: two_way.iter().cloned().chain([hb.clone()]).collect(),
    };
    let b2p = Direction {
        name: "backup_to_primary",
        source: Site::Backup,
        target: Site::Primary,
        tables: two_way.iter().chain(&usage).cloned().chain([hb]).collect(),
    };
    (p2b, b2p)
}

async fn verify_loop(
    config: Config,
    metrics: Metrics,
    status: SharedStatus,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.verify_interval) => {}
        }
        match crate::verify(&config).await {
            Ok(r) => {
                let equal = r.is_equal();
                metrics.verify_equal.set(i64::from(equal));
                status.lock().unwrap_or_else(|p| p.into_inner()).last_verify =
                    Some(crate::metrics::VerifyStatus {
                        at: chrono::Utc::now(),
                        equal,
                    });
                if !equal {
                    tracing::warn!(report = %r, "periodic verify: sites differ");
                }
            }
            Err(e) => tracing::warn!(error = %e, "periodic verify failed"),
        }
    }
}

async fn infos(
    c: &tokio_postgres::Client,
    site: Site,
    names: &[String],
) -> Result<Vec<TableInfo>, Error> {
    let mut v = Vec::new();
    for n in names {
        v.push(table_info(c, site, &qualify(n)).await?);
    }
    Ok(v)
}

/// What `gsb check-config --databases` reports for one site: reachable, and (for the logical
/// capture) every prerequisite met, else the first one missing with its fix.
pub async fn check_databases(config: &Config) -> Vec<(Site, Result<(), Error>)> {
    let mut out = Vec::new();
    for site in [Site::Primary, Site::Backup] {
        let r = async {
            let link = config.link(site)?;
            let c = tokio::time::timeout(Duration::from_secs(10), connect(&link))
                .await
                .map_err(|_| {
                    Error::Protocol(format!("{}: no answer within 10s", site.as_str()))
                })??;
            crate::logical::check_prerequisites(&c, site, config.capture).await?;
            Ok(())
        }
        .await;
        out.push((site, r));
    }
    out
}
