//! gsb-pgctl: the lifecycle of one local PostgreSQL server (init, start, stop, crash).
//!
//! Used by the test harness (`gsb-tests`) and by `gsb up`. When running as root, `initdb` and
//! `postgres` run as the `postgres` OS user, because both refuse to run as root.
#![forbid(unsafe_code)]

mod cluster;
mod error;

pub use cluster::{Cluster, ClusterOptions};
pub use error::Error;
