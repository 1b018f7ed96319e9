//! gsb-proxy: the one URL of the meeting service.
//!
//! Listeners (HTTP, TLS), forwarding to the active site, the routing state machine fed by the
//! health checker, detectbackup, the admin API and the proxy's metrics.
#![forbid(unsafe_code)]

pub mod config;
pub mod maintenance;
pub mod metrics;
pub mod passive;
pub mod route;
pub mod routing;

pub use config::{Config, ConfigError};
pub use route::{RouteSnapshot, Router, Site};
