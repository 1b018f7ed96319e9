//! `gsb site`: runs one reference meeting site (primary or backup) until shutdown.

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// Runs the reference site with `opts` until `shutdown` is cancelled.
pub async fn site(opts: gsb_site::SiteOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let role = opts.role;
    let listen = opts.listen;
    gsb_site::run(opts, shutdown)
        .await
        .with_context(|| format!("reference site ({role}) on {listen} failed"))
}
