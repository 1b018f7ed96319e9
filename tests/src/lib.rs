//! gsb-tests: the test harness shared by every crate's tests (real PostgreSQL servers, a real
//! etcd cluster, child processes killed on drop, a TCP relay that can black-hole a path,
//! waiting on a condition with a deadline, free ports).
//!
//! It depends on no product crate (only `gsb-pgctl`), so any crate may use it as a dev-dependency.
#![forbid(unsafe_code)]

pub mod etcd;
pub mod pg;
mod proc;
pub mod relay;
pub mod upstream;
mod wait;

pub use proc::{gsb_bin, Proc};
pub use wait::{free_port, wait_for, wait_until};
