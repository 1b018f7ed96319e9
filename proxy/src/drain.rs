//! Draining: when the active site moves, work already running on the old site (requests,
//! streamed answers, upgraded tunnels) may finish up to `failover.drain_timeout`, then it is cut.
//!
//! Each route generation has a [`CancellationToken`]; work started under it holds a clone. When
//! the generation changes, a timer cancels the old token after the drain timeout. (A request
//! retried on the new active site also holds the old token; it is cut with the rest, which is
//! rare and bounded by the same timeout.)
//!
//! Each generation also has a `moved` token, cancelled at once when traffic leaves a site that
//! is down: an idempotent request still waiting there for its answer (a black-holed site never
//! answers) is then sent to the new active site instead of waiting out `upstream_timeout`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::route::Router;

/// The tokens of one route generation.
#[derive(Debug)]
struct Generation {
    /// Cancelled `drain_timeout` after the move away from this generation.
    drain: CancellationToken,
    /// Cancelled at the move away from this generation when the old site is down.
    moved: CancellationToken,
    /// Per worker, children of both: a request holds its worker's (one reference count bumped
    /// on a value only that worker's thread touches) and waits on them, so the waiter lists
    /// and locks of the tokens are never shared between the workers' cores.
    workers: Box<[Arc<Tokens>]>,
}

impl Generation {
    fn new(workers: usize) -> Generation {
        let (drain, moved) = (CancellationToken::new(), CancellationToken::new());
        let workers = (0..workers.max(1))
            .map(|_| {
                Arc::new(Tokens {
                    drain: drain.child_token(),
                    moved: moved.child_token(),
                })
            })
            .collect();
        Generation {
            drain,
            moved,
            workers,
        }
    }
}

/// What work started under one route generation on one worker waits on.
#[derive(Debug)]
pub struct Tokens {
    /// Cancelled `drain_timeout` after the move away from the generation: the work is cut.
    pub drain: CancellationToken,
    /// Cancelled at the move away from the generation when the old site is down: a request
    /// still waiting there for its answer may go to the new active site.
    pub moved: CancellationToken,
}

/// The tokens of the current route generation.
#[derive(Debug)]
pub struct Drain {
    current: ArcSwap<Generation>,
    /// Request-path workers (one child token pair per worker and generation).
    workers: usize,
    /// `failover.drain_timeout` in milliseconds; a config reload may change it (applies to the
    /// next move).
    timeout_ms: AtomicU64,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new(1)
    }
}

impl Drain {
    /// Tokens for `workers` request-path workers.
    pub fn new(workers: usize) -> Drain {
        Drain {
            current: ArcSwap::from_pointee(Generation::new(workers)),
            workers,
            timeout_ms: AtomicU64::new(2 * 3600 * 1000),
        }
    }

    /// The token work starting now holds; cancelled `drain_timeout` after the next move.
    pub fn token(&self) -> CancellationToken {
        self.current.load().drain.clone()
    }

    /// The tokens of the current generation for work on worker `worker` (any index works:
    /// one past the workers shares a worker's tokens).
    pub fn tokens(&self, worker: usize) -> Arc<Tokens> {
        let current = self.current.load();
        current.workers[worker % current.workers.len()].clone()
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
        let mut active = router.load().active;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            let generation = *changes.borrow_and_update();
            let now = router.load();
            let old = self.current.swap(Arc::new(Generation::new(self.workers)));
            if now.active != active && !now.usable[active.index()] {
                // The old site is down: what still waits there for an answer won't get one.
                old.moved.cancel();
            }
            active = now.active;
            let old = old.drain.clone();
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

    /// A `Drain` following `router` with a 10 s drain timeout.
    async fn follow(router: &Arc<Router>) -> (Arc<Drain>, TaskTracker, CancellationToken) {
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
        (drain, tracker, shutdown)
    }

    async fn stop(tracker: TaskTracker, shutdown: CancellationToken) {
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn old_generation_is_cut_after_the_drain_timeout() {
        let router = Router::new(RouteSnapshot::initial(Site::Primary));
        let (drain, tracker, shutdown) = follow(&router).await;

        let tokens = drain.tokens(0);
        let (before, moved) = (&tokens.drain, &tokens.moved);
        router.publish(RouteSnapshot {
            active: Site::Backup,
            usable: [false, true],
            none_available: false,
            generation: 1,
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = drain.token();
        assert!(!before.is_cancelled(), "old work may still finish");
        assert!(
            moved.is_cancelled(),
            "the old site is down: waiting requests move at once"
        );
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(!before.is_cancelled());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(before.is_cancelled(), "cut after the drain timeout");
        assert!(!after.is_cancelled(), "new work is not cut");

        stop(tracker, shutdown).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_away_from_a_healthy_site_does_not_move_waiting_requests() {
        let router = Router::new(RouteSnapshot::initial(Site::Primary));
        let (drain, tracker, shutdown) = follow(&router).await;

        let moved = drain.tokens(0).moved.clone();
        // A manual failover: the primary is still usable, so its requests may finish there.
        router.publish(RouteSnapshot {
            active: Site::Backup,
            usable: [true, true],
            none_available: false,
            generation: 1,
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !moved.is_cancelled(),
            "a healthy old site keeps its waiting requests"
        );

        stop(tracker, shutdown).await;
    }
}
