//! `gsb proxy` and the proxy half of `gsb check-config`.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::BadConfig;

/// Runs the proxy until `shutdown` (SIGTERM/SIGINT), then drains and returns; SIGHUP reloads
/// the config file.
pub async fn proxy(
    config_path: &Path,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bad = |message: String| BadConfig {
        path: config_path.display().to_string(),
        message,
    };
    let text = crate::read_config(config_path)?;
    let mut config = gsb_proxy::Config::from_toml_str(&text).map_err(|e| bad(e.to_string()))?;
    resolve_paths(&mut config, config_path);
    tracing::info!(
        config = %config_path.display(),
        listen = %config.proxy.listen,
        admin = %config.admin.listen,
        primary = %config.sites.primary.url,
        backup = %config.sites.backup.url,
        "starting the proxy"
    );
    // SIGHUP re-reads the config. The handler is installed before the proxy starts, so a HUP
    // never hits the default action (terminate) once the proxy is up.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let forward_hangups = {
        let shutdown = shutdown.clone();
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    got = hangups.recv() => match got {
                        // A reload already queued covers this one too.
                        Some(()) => { let _ = reload_tx.try_send(()); }
                        None => break,
                    },
                }
            }
        }
    };
    let run = gsb_proxy::run_with_reload(
        config,
        config_path.to_path_buf(),
        registry,
        shutdown.clone(),
        reload_rx,
    );
    let (result, ()) = tokio::join!(
        async {
            let r = run.await;
            // The proxy may stop on its own (an error): stop forwarding signals too.
            shutdown.cancel();
            r
        },
        forward_hangups
    );
    match result {
        Ok(()) => Ok(()),
        // A certificate or token file that cannot be used is a config problem (exit 64).
        Err(e @ (gsb_proxy::Error::Tls(_) | gsb_proxy::Error::TokenFile { .. })) => {
            Err(bad(e.to_string()).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Relative paths in the file are relative to the file (see `Config::resolve_paths`).
fn resolve_paths(config: &mut gsb_proxy::Config, config_path: &Path) {
    config.resolve_paths(config_path);
}

/// Validates the proxy's sections of a config file.
pub fn check(config_text: &str) -> Result<(), String> {
    gsb_proxy::Config::from_toml_str(config_text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_resolved_beside_the_config() {
        let text = r#"
            [proxy]
            listen = "127.0.0.1:0"
            tls = { listen = "127.0.0.1:0", cert = "cert.pem", key = "/etc/gsb/key.pem" }
            [admin]
            token_file = "admin.token"
            [sites.primary]
            url = "http://127.0.0.1:1"
            [sites.backup]
            url = "http://127.0.0.1:2"
        "#;
        let mut config = gsb_proxy::Config::from_toml_str(text).expect("valid");
        resolve_paths(&mut config, Path::new("/srv/gsb/gsb.toml"));
        assert_eq!(
            config.failover.state_file.as_deref(),
            Some(Path::new("/srv/gsb/gsb-proxy.state"))
        );
        assert_eq!(
            config.admin.token_file.as_deref(),
            Some(Path::new("/srv/gsb/admin.token"))
        );
        let tls = config.proxy.tls.expect("tls");
        assert_eq!(tls.cert, Path::new("/srv/gsb/cert.pem"));
        assert_eq!(tls.key, Path::new("/etc/gsb/key.pem"));
    }
}
