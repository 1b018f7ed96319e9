//! gsb-proxy: the one URL of the meeting service.
//!
//! Listeners (HTTP, TLS), forwarding to the active site, the routing state machine fed by the
//! health checker, detectbackup, the admin API and the proxy's metrics.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod config;
pub mod control;
pub mod detect;
pub mod drain;
pub mod error;
pub mod forward;
pub mod gate;
mod h1;
pub mod maintenance;
pub mod metrics;
pub mod passive;
mod pool;
pub mod reload;
pub mod retry;
pub mod route;
pub mod routing;
pub mod runner;
pub mod server;
pub mod status_page;
pub mod tls;

pub use config::{Config, ConfigError};
pub use error::Error;
pub use route::{RouteSnapshot, Router, Site};
pub use runner::{run, run_with_reload};
pub use server::set_idle_release;
