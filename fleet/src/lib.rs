//! gsb-fleet: the etcd side of a fleet of gsb proxies (and of the replicator's election).
//!
//! Every member probes both sites itself and publishes its [`Vote`] under its own lease; one
//! member, elected through a leased key, is the decider: it turns the fresh votes into the
//! [`FleetVerdict`] (a pure function, [`fleet_verdict`]), runs the routing state machine and
//! writes the decision in a transaction fenced by its leadership token and the decision's
//! revision ([`Fleet::confirm`]); operators' commands are compare-and-swap writes of the same
//! key ([`Fleet::cas_decision`]). Every member watches the keys ([`FleetView`]).
//!
//! Knows nothing of HTTP forwarding, routing rules or SQL: the decision is opaque bytes here.
#![forbid(unsafe_code)]

pub mod config;
mod election;
mod session;
pub mod verdict;
pub mod vote;

pub use config::{CoordinationConfig, OnLoss, Quorum};
pub use election::Election;
pub use session::{Cas, Confirm, Fleet, FleetError, FleetView, Keys, Stored};
pub use verdict::{fleet_verdict, is_fresh, Dissent, FleetVerdict, Tally};
pub use vote::{DeciderStatus, SiteVote, Vote};
