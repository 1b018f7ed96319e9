//! Listener, connection tasks, the schema keeper, and graceful shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::app::App;
use crate::{Error, SiteOptions};

/// How long requests already running may take to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// First and largest pause between schema install attempts while the database is away.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Binds `opts.listen` and serves until `shutdown` is cancelled.
pub async fn run(opts: SiteOptions, shutdown: CancellationToken) -> Result<(), Error> {
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: opts.listen,
            source,
        })?;
    serve(listener, opts, shutdown).await
}

/// Serves on an already bound listener until `shutdown` is cancelled, then lets running
/// requests finish (bounded) and returns. The database may be down at start: the site answers
/// at once (health red) and installs its schema when the database appears.
pub async fn serve(
    listener: TcpListener,
    opts: SiteOptions,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let addr = listener.local_addr().map_err(Error::LocalAddr)?;
    let app = Arc::new(App::new(&opts)?);
    let role = opts.role.as_str();
    let span = info_span!("site", role, %addr);
    async move {
        info!(%addr, role, allow_faults = opts.allow_faults, "site listening");
        let tracker = TaskTracker::new();
        tracker.spawn(schema_keeper(app.clone(), shutdown.clone()).in_current_span());
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Usually out of file descriptors: pause instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        }
                    }
                },
            };
            let app = app.clone();
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req).await) }
            });
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tracker.spawn(
                async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "connection ended with an error");
                    }
                }
                .instrument(info_span!("conn", %peer)),
            );
        }
        drop(listener);
        info!("site shutting down");
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(DRAIN_TIMEOUT) => {
                warn!(timeout = ?DRAIN_TIMEOUT, "requests still running after the drain timeout; closing");
            }
        }
        tracker.close();
        // Connections past the drain timeout are dropped with the runtime; do not wait again.
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
        app.db.close();
        info!("site stopped");
        Ok(())
    }
    .instrument(span)
    .await
}

/// Installs the schema whenever it is missing: at start (the database may still be coming
/// up) and again if a request finds a table gone. Retries with capped exponential backoff.
async fn schema_keeper(app: Arc<App>, shutdown: CancellationToken) {
    loop {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match app.db.install_schema().await {
                Ok(()) => {
                    app.schema.set_ready();
                    info!(attempts, "database schema ready");
                    break;
                }
                // The first failures are expected while the database starts; say so sparingly.
                Err(e) if attempts % 10 == 1 => {
                    warn!(error = %e, attempts, "cannot install the schema yet; retrying");
                }
                Err(_) => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = app.schema.missing() => {}
        }
    }
}

/// Capped exponential backoff: `min`, `2*min`, ... up to `max`, then `max` for ever.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff { next: min, max }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
    }

    /// With the clock paused, a site whose database never appears retries on the backoff
    /// schedule and stops retrying the moment shutdown is asked for.
    #[tokio::test(start_paused = true)]
    async fn schema_keeper_stops_on_shutdown_while_the_database_is_missing() {
        let opts = SiteOptions {
            role: crate::Role::Primary,
            // Port 1 on loopback refuses at once: every attempt fails fast.
            dsn: "host=127.0.0.1 port=1 user=nobody dbname=none".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            allow_faults: false,
        };
        let app = Arc::new(App::new(&opts).unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(schema_keeper(app.clone(), shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            !task.is_finished(),
            "keeps retrying while the database is missing"
        );
        assert!(!app.schema.is_ready());
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("stops promptly on shutdown")
            .unwrap();
    }
}
