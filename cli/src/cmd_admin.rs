//! `gsb status`, `gsb failover`, `gsb failback`, `gsb auto`: clients of the proxy's admin API.

use std::process::ExitCode;

use crate::AdminArgs;

/// Prints the proxy's state.
pub async fn status(admin: &AdminArgs, json: bool) -> anyhow::Result<ExitCode> {
    let _ = (admin, json);
    anyhow::bail!("not built yet")
}

/// Forces traffic to a site.
pub async fn failover(admin: &AdminArgs, to: &str, reason: &str) -> anyhow::Result<ExitCode> {
    let _ = (admin, to, reason);
    anyhow::bail!("not built yet")
}

/// Moves traffic back to the primary.
pub async fn failback(admin: &AdminArgs, reason: &str) -> anyhow::Result<ExitCode> {
    let _ = (admin, reason);
    anyhow::bail!("not built yet")
}

/// Releases forced states.
pub async fn auto(admin: &AdminArgs) -> anyhow::Result<ExitCode> {
    let _ = admin;
    anyhow::bail!("not built yet")
}
