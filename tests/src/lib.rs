//! gsb-tests: the test harness shared by every crate's tests (real PostgreSQL servers, child
//! processes killed on drop, waiting on a condition with a deadline, free ports).
//!
//! It depends on no product crate (only `gsb-pgctl`), so any crate may use it as a dev-dependency.
#![forbid(unsafe_code)]

pub mod pg;
mod proc;
pub mod upstream;
mod wait;

pub use proc::{gsb_bin, Proc};
pub use wait::{free_port, wait_for, wait_until};
