//! `gsb proxy` and the proxy half of `gsb check-config`.

use std::path::Path;

use tokio_util::sync::CancellationToken;

/// Runs the proxy until `shutdown`.
pub async fn proxy(config_path: &Path, registry: prometheus::Registry, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = (config_path, registry, shutdown);
    anyhow::bail!("gsb proxy: not built yet")
}

/// Validates the proxy's sections of a config file.
pub fn check(config_text: &str) -> Result<(), String> {
    gsb_proxy::Config::from_toml_str(config_text).map(|_| ()).map_err(|e| e.to_string())
}
