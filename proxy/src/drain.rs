//! Draining: when the active site moves, work already running on the old site (requests,
//! streamed answers, upgraded tunnels) may finish up to `failover.drain_timeout`, then it is cut.
//!
//! Each route generation has a [`CancellationToken`]; work started under it holds a clone. When
//! the generation changes, a timer cancels the old token after the drain timeout. (A request
//! retried on the new active site also holds the old token; it is cut with the rest, which is
//! rare and bounded by the same timeout.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::route::Router;

/// The token of the current route generation.
#[derive(Debug)]
pub struct Drain {
    current: ArcSwap<CancellationToken>,
    /// `failover.drain_timeout` in milliseconds; a config reload may change it (applies to the
    /// next move).
    timeout_ms: AtomicU64,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            current: ArcSwap::from_pointee(CancellationToken::new()),
            timeout_ms: AtomicU64::new(2 * 3600 * 1000),
        }
    }
}

impl Drain {
    /// The token work starting now holds; cancelled `drain_timeout` after the next move.
    pub fn token(&self) -> CancellationToken {
        CancellationToken::clone(&self.current.load())
    }

    /// Sets the drain timeout of the next moves.
    pub fn set_timeout(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Follows `router` until `shutdown`: at every move, starts the drain timer of the old
    /// generation (on `tracker`, so shutdown waits for it or cancels it).
    pub async fn run(
        self: Arc<Self>,
        router: Arc<Router>,
        drain_timeout: Duration,
        tracker: TaskTracker,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        self.set_timeout(drain_timeout);
        let mut changes = router.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            let generation = *changes.borrow_and_update();
            let old = self.current.swap(Arc::new(CancellationToken::new()));
            let drain_timeout = self.timeout();
            tracing::info!(
                generation,
                ?drain_timeout,
                "route moved: draining work on the old site"
            );
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(drain_timeout) => {
                        tracing::info!(generation, "drain timeout passed: closing what still runs on the old site");
                        old.cancel();
                    }
                    // On shutdown the server's own grace period bounds the old work.
                    _ = shutdown.cancelled() => {}
                    _ = old.cancelled() => {}
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{RouteSnapshot, Site};

    #[tokio::test(start_paused = true)]
    async fn old_generation_is_cut_after_the_drain_timeout() {
        let router = Router::new(RouteSnapshot::initial(Site::Primary));
        let drain = Arc::new(Drain::default());
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        tracker.spawn(drain.clone().run(
            router.clone(),
            Duration::from_secs(10),
            tracker.clone(),
            shutdown.clone(),
        ));
        tokio::task::yield_now().await;

        let before = drain.token();
        router.publish(RouteSnapshot {
            active: Site::Backup,
            usable: [false, true],
            none_available: false,
            generation: 1,
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = drain.token();
        assert!(!before.is_cancelled(), "old work may still finish");
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(!before.is_cancelled());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(before.is_cancelled(), "cut after the drain timeout");
        assert!(!after.is_cancelled(), "new work is not cut");

        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
