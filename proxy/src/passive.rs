//! Passive health: what live traffic tells the control task between probe rounds.
//!
//! The request path only bumps atomics and maybe wakes the control task; it never awaits. Passive
//! signals trigger an immediate probe round; they never move traffic on their own.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

use crate::route::Site;

/// Consecutive 5xx answers from one site that count as a burst worth an early probe round.
const FIVE_XX_BURST: u32 = 5;

/// Shared between the request path (writers) and the control task (reader).
#[derive(Debug)]
pub struct PassiveHealth {
    /// Per site: consecutive 5xx responses (reset by any non-5xx).
    consecutive_5xx: [AtomicU32; 2],
    /// Per site: connect failures since the control task last looked.
    connect_failures: [AtomicU64; 2],
    wake: Notify,
    created: Instant,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            consecutive_5xx: [AtomicU32::new(0), AtomicU32::new(0)],
            connect_failures: [AtomicU64::new(0), AtomicU64::new(0)],
            wake: Notify::new(),
            created: Instant::now(),
        }
    }
}

impl PassiveHealth {
    /// A connection to `site` could not be made (refused, reset before any byte, timed out).
    pub fn report_connect_failure(&self, site: Site) {
        self.connect_failures[site.index()].fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// An upstream answered with `status`; a burst of 5xx wakes the control task.
    pub fn report_status(&self, site: Site, status: u16) {
        let counter = &self.consecutive_5xx[site.index()];
        if status >= 500 {
            if counter.fetch_add(1, Ordering::Relaxed) + 1 == FIVE_XX_BURST {
                self.wake.notify_one();
            }
        } else if counter.load(Ordering::Relaxed) != 0 {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// Takes and resets the connect-failure count of `site` (control task only).
    pub fn take_connect_failures(&self, site: Site) -> u64 {
        self.connect_failures[site.index()].swap(0, Ordering::Relaxed)
    }

    /// Consecutive 5xx answers seen from `site`.
    pub fn consecutive_5xx(&self, site: Site) -> u32 {
        self.consecutive_5xx[site.index()].load(Ordering::Relaxed)
    }

    /// Resolves when live traffic asked for an early probe round.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// How long this tracker has existed (for rate computations in logs).
    pub fn age(&self) -> std::time::Duration {
        self.created.elapsed()
    }
}
