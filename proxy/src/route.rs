//! The route snapshot: the one value the request path reads, written only by the control task.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Which of the two sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Site {
    /// The site that normally serves traffic.
    Primary,
    /// The standby site that takes traffic when the primary fails.
    Backup,
}

impl Site {
    /// Both sites, primary first.
    pub const ALL: [Site; 2] = [Site::Primary, Site::Backup];

    /// The other site.
    pub fn other(self) -> Site {
        match self {
            Site::Primary => Site::Backup,
            Site::Backup => Site::Primary,
        }
    }

    /// Lower-case name, as used in metric labels, JSON and config (`primary`, `backup`).
    pub fn as_str(self) -> &'static str {
        match self {
            Site::Primary => "primary",
            Site::Backup => "backup",
        }
    }

    /// Capitalised name, the exact body of a detectbackup answer (`Primary`, `Backup`).
    pub fn title(self) -> &'static str {
        match self {
            Site::Primary => "Primary",
            Site::Backup => "Backup",
        }
    }

    /// Index into per-site arrays (`[primary, backup]`).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the request path needs to route one request. Cheap to clone, immutable once published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSnapshot {
    /// The site new requests go to.
    pub active: Site,
    /// Per site (`Site::index`): may it take a retried request? (not `down` by the health checker)
    pub usable: [bool; 2],
    /// Neither site answers probes: the request path still tries `active`, and answers 503 with
    /// `Retry-After` when that fails.
    pub none_available: bool,
    /// Incremented at every move of `active`; lets connections started on an older generation
    /// know they are draining.
    pub generation: u64,
}

impl RouteSnapshot {
    /// The state before the first probe round: primary active, both presumed usable.
    pub fn initial(active: Site) -> Self {
        RouteSnapshot {
            active,
            usable: [true, true],
            none_available: false,
            generation: 0,
        }
    }
}

/// The published route: lock-free reads on the request path, change notifications for draining.
#[derive(Debug)]
pub struct Router {
    snapshot: ArcSwap<RouteSnapshot>,
    changed: watch::Sender<u64>,
}

impl Router {
    /// A router publishing `initial`.
    pub fn new(initial: RouteSnapshot) -> Arc<Router> {
        let (changed, _) = watch::channel(initial.generation);
        Arc::new(Router {
            snapshot: ArcSwap::from_pointee(initial),
            changed,
        })
    }

    /// The current snapshot (no lock, no await).
    pub fn load(&self) -> Arc<RouteSnapshot> {
        self.snapshot.load_full()
    }

    /// A copy of the current snapshot (no lock, no await, and no reference count bumped:
    /// the request path reads it from every worker at once).
    pub fn current(&self) -> RouteSnapshot {
        RouteSnapshot::clone(&self.snapshot.load())
    }

    /// Publishes a new snapshot; only the control task calls this.
    pub fn publish(&self, next: RouteSnapshot) {
        let generation = next.generation;
        self.snapshot.store(Arc::new(next));
        self.changed.send_replace(generation);
    }

    /// Notified with the new generation at every publish (used to start drain timers).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
