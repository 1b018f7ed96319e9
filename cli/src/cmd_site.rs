//! `gsb site`: the reference meeting site.

use tokio_util::sync::CancellationToken;

/// Runs the site until `shutdown`.
pub async fn site(opts: gsb_site::SiteOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = (opts, shutdown);
    anyhow::bail!("gsb site: not built yet")
}
