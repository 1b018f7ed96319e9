//! `run`: the whole proxy process — listeners bound first, then the control task, the admin
//! listener and the public listeners on one task tracker, until shutdown, then a bounded drain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::mpsc;

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminToken;
use crate::config::Config;
use crate::drain::Drain;
use crate::error::Error;
use crate::forward::Forwarder;
use crate::metrics::ProxyMetrics;
use crate::passive::PassiveHealth;
use crate::reload::Reloader;
use crate::route::{RouteSnapshot, Router, Site};
use crate::server::{self, ServerCtx};
use crate::tls::{CertStore, RELOAD_POLL};

/// After shutdown is requested, in-flight requests and tunnels get this long to finish; what is
/// left is then closed (kept below the usual 30 s SIGKILL deadline of service managers).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Runs the proxy until `shutdown` is cancelled, then stops accepting, lets in-flight work
/// finish (at most [`SHUTDOWN_GRACE`]) and returns `Ok`.
///
/// Everything that can be wrong with the config (token file, TLS files, site `ca_file`s, ports
/// in use) is reported before any task starts.
pub async fn run(
    config: Config,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_inner(config, None, registry, shutdown).await
}

/// [`run`], plus a config reload at every message on `reloads` (the binary sends one per
/// SIGHUP): `config_path` is read again, relative paths resolved beside it, and the new config
/// applied without dropping connections, or refused with one log line naming the key while the
/// running config stays. See [`crate::reload`].
pub async fn run_with_reload(
    config: Config,
    config_path: PathBuf,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<()>,
) -> Result<(), Error> {
    run_inner(config, Some((config_path, reloads)), registry, shutdown).await
}

async fn run_inner(
    config: Config,
    reload: Option<(PathBuf, mpsc::Receiver<()>)>,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let metrics = ProxyMetrics::register(&registry, config.coordination.is_some())?;
    let token: AdminToken = Arc::new(ArcSwapOption::new(read_token(&config)?.map(Arc::new)));
    let certs = match &config.proxy.tls {
        Some(t) => Some(CertStore::load(&t.cert, &t.key)?),
        None => None,
    };
    let tls_config = certs.as_ref().map(|c| c.server_config()).transpose()?;

    let router = Router::new(RouteSnapshot::initial(Site::Primary));
    let passive = Arc::new(PassiveHealth::default());
    let tracker = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let drain = Arc::new(Drain::new(config.proxy.workers()));
    // Built before binding: a site URL or `ca_file` that cannot be used stops the start first.
    let forwarder = Arc::new(Forwarder::new(
        &config,
        router.clone(),
        passive.clone(),
        metrics.clone(),
        drain.clone(),
        tracker.clone(),
        hard_stop.clone(),
    )?);

    let workers = config.proxy.workers();
    let public = server::bind_workers(config.proxy.listen, "proxy.listen", workers).await?;
    let tls_listeners = match &config.proxy.tls {
        Some(t) => Some(server::bind_workers(t.listen, "proxy.tls.listen", workers).await?),
        None => None,
    };
    let admin = server::bind(config.admin.listen, "admin.listen").await?;

    // Fleet mode: the etcd session starts before the control task, which waits for it (at
    // most lease_ttl) so the first request is routed on the fleet's current decision.
    let fleet = match &config.coordination {
        Some(c) => Some(
            gsb_fleet::Fleet::start(c, c.member_name(), &tracker, shutdown.clone())
                .map_err(|e| Error::Control(Box::new(e)))?,
        ),
        None => None,
    };
    let control = crate::control::start(
        &config,
        router.clone(),
        passive,
        metrics.clone(),
        fleet,
        &tracker,
        shutdown.clone(),
    )
    .await
    .map_err(|e| Error::Control(Box::new(e)))?;
    if let Some((path, reloads)) = reload {
        let reloader = Reloader {
            path,
            started: config.clone(),
            applied: config.clone(),
            forwarder: forwarder.clone(),
            control: control.clone(),
            certs: certs.clone(),
            token: token.clone(),
            drain: drain.clone(),
        };
        tracker.spawn(reloader.run(reloads, shutdown.clone()));
    }
    {
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) =
                crate::admin::serve_admin(admin, control, registry, token, shutdown).await
            {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
    }
    tracker.spawn(drain.run(
        router,
        config.failover.drain_timeout,
        tracker.clone(),
        shutdown.clone(),
    ));

    let ctx = Arc::new(ServerCtx::new(
        forwarder,
        &config.proxy,
        metrics.client_connections.clone(),
        shutdown.clone(),
        hard_stop.clone(),
    ));
    // The public listeners: one thread per worker with its own current-thread runtime,
    // listening sockets and upstream pools (see `server::spawn_worker`).
    let acceptor = tls_config.map(TlsAcceptor::from);
    let mut tls_listeners = tls_listeners.map(Vec::into_iter);
    let mut threads = Vec::with_capacity(workers);
    for (index, plain) in public.into_iter().enumerate() {
        let tls = match (tls_listeners.as_mut().and_then(Iterator::next), &acceptor) {
            (Some(l), Some(a)) => Some((l, a.clone())),
            _ => None,
        };
        threads.push(server::spawn_worker(
            index,
            plain,
            tls,
            ctx.clone(),
            tracker.clone(),
        )?);
    }
    if let Some(certs) = certs {
        tracker.spawn(certs.watch(RELOAD_POLL, shutdown.clone()));
    }

    shutdown.cancelled().await;
    tracing::info!(grace = ?SHUTDOWN_GRACE, "shutting down: not accepting, draining in-flight requests");
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over: closing the connections still open");
        hard_stop.cancel();
        tracker.wait().await;
    }
    // The workers leave their runtimes once the tracker is empty.
    let joined = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    let _ = joined.await;
    tracing::info!("proxy stopped");
    Ok(())
}

/// Reads `admin.token_file` (trimmed); `None` when not configured.
pub(crate) fn read_token(config: &Config) -> Result<Option<String>, Error> {
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::TokenFile {
        path: path.clone(),
        message: format!("cannot read it: {e}"),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Error::TokenFile {
            path: path.clone(),
            message: "the file is empty; put the bearer token in it".into(),
        });
    }
    Ok(Some(token.to_owned()))
}
