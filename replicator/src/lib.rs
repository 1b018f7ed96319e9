//! gsb-replicator: two-way real-time sync of the two sites' databases, conflicts with a
//! conflict log, daily config copy primary -> backup, usage merge backup -> primary, and
//! `verify`. Two captures: from the WAL by logical decoding (`pgoutput` over the replication
//! protocol, the default) or by row triggers into `gsb.changes` (the fallback), both applied
//! by one apply with one conflict rule (`apply.rs`).
//!
//! Invariants: a change applied by the replicator is never captured again (replication
//! origins for the logical capture, `gsb.applying` for the triggers); the restart position
//! (origin progress / cursor) only moves in the transaction that applied what it covers.
#![forbid(unsafe_code)]

mod apply;
mod changelog;
mod config;
mod copy;
mod copybin;
mod db;
mod elect;
mod error;
mod http;
mod logical;
mod metrics;
mod pgoutput;
mod run;
mod schema;
mod sql;
mod upgrade;
mod verify;
mod walstream;
mod worker;

pub use config::{Capture, Config, ConfigError};
pub use copy::{copy_config, CopiedTable, CopyReport};
pub use db::Site;
pub use error::Error;
pub use logical::{resync, ResyncReport};
pub use run::{check_databases, run};
pub use verify::{verify, TableReport, VerifyReport};
