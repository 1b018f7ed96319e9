//! gsb-replicator: two-way real-time sync of the two sites' databases (capture by row triggers
//! into `gsb.changes`, read by transaction visibility, applied in batches with the cursor in the
//! same transaction), hybrid-logical-clock conflicts with a conflict log, daily config copy
//! primary -> backup, usage merge backup -> primary, and `verify`.
//!
//! Invariants: a change applied by the replicator is never captured again (`gsb.applying`);
//! a cursor only moves in the transaction that applied what it covers; only changes of
//! finished transactions (xid below the snapshot's xmin) are read.
#![forbid(unsafe_code)]

mod config;
mod copy;
mod db;
mod elect;
mod error;
mod http;
mod metrics;
mod run;
mod schema;
mod sql;
mod verify;
mod worker;

pub use config::{Config, ConfigError};
pub use copy::{copy_config, CopiedTable, CopyReport};
pub use db::Site;
pub use error::Error;
pub use run::run;
pub use verify::{verify, TableReport, VerifyReport};
