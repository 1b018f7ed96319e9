//! gsb-health: probes a site's components and decides whether the site is healthy, degraded or
//! down. It knows nothing of routing: the proxy's control task feeds these verdicts to its state
//! machine.
//!
//! I/O (the probes, in [`probe`]) is kept apart from the decisions ([`counter`] and [`verdict`]),
//! which are pure functions of the observed results and the time, unit-tested without sockets.
#![forbid(unsafe_code)]

pub mod counter;
pub mod probe;
pub mod tls;
pub mod verdict;

pub use counter::{ComponentCounter, Transition};
pub use probe::{ProbeError, ProbeKind, ProbeOutcome, ProbeSpec, Prober};
pub use verdict::{ComponentStatus, SiteHealth, SiteReport, Verdict};
