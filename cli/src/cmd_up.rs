//! `gsb up`: the local two-site stack.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

/// Options of `gsb up`.
#[derive(Debug)]
pub struct UpOptions {
    /// Data directory kept across starts; `None` = temporary.
    pub dir: Option<PathBuf>,
    /// Public proxy listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Enable the sites' fault switch.
    pub allow_faults: bool,
}

/// Runs the stack until `shutdown`.
pub async fn up(opts: UpOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = (opts, shutdown);
    anyhow::bail!("gsb up: not built yet")
}
