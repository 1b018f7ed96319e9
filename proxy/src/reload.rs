//! Config reload on SIGHUP: the new file is read and everything built from it (site targets,
//! probes, maintenance windows, TLS pair, token) before anything is swapped, so a bad file
//! changes nothing. Listener addresses and connection settings are bound once: a change to them
//! is reported as "needs restart", never rebound.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::AdminToken;
use crate::config::Config;
use crate::control::{ControlConfig, ControlHandle, ReloadView};
use crate::drain::Drain;
use crate::forward::{Forwarder, Settings};
use crate::tls::CertStore;

/// Settings bound at start that a reload cannot change: `(key, changed?)`.
pub fn needs_restart(running: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (&running.proxy, &new.proxy);
    let tls_listen = |c: &Config| c.proxy.tls.as_ref().map(|t| t.listen);
    [
        ("proxy.listen", a.listen != b.listen),
        ("proxy.tls.listen", tls_listen(running) != tls_listen(new)),
        ("admin.listen", running.admin.listen != new.admin.listen),
        (
            "proxy.connect_timeout",
            a.connect_timeout != b.connect_timeout,
        ),
        (
            "proxy.header_read_timeout",
            a.header_read_timeout != b.header_read_timeout,
        ),
        ("proxy.idle_timeout", a.idle_timeout != b.idle_timeout),
        ("proxy.retry_budget", a.retry_budget != b.retry_budget),
        (
            "proxy.max_header_bytes",
            a.max_header_bytes != b.max_header_bytes,
        ),
        ("proxy.max_headers", a.max_headers != b.max_headers),
        ("proxy.workers", a.workers != b.workers),
        // The fleet session (endpoints, name, lease) is set up once, before serving.
        ("coordination", running.coordination != new.coordination),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key.to_owned())
    .collect()
}

/// The reloadable settings that differ between `old` and `new` (for the log line).
pub fn changed(old: &Config, new: &Config) -> Vec<&'static str> {
    let tls_files = |c: &Config| {
        c.proxy
            .tls
            .as_ref()
            .map(|t| (t.cert.clone(), t.key.clone()))
    };
    [
        ("sites.primary", old.sites.primary != new.sites.primary),
        ("sites.backup", old.sites.backup != new.sites.backup),
        ("health", old.health != new.health),
        ("failover", old.failover != new.failover),
        ("maintenance", old.maintenance != new.maintenance),
        ("proxy.mode", old.proxy.mode != new.proxy.mode),
        (
            "proxy.upstream_timeout",
            old.proxy.upstream_timeout != new.proxy.upstream_timeout,
        ),
        (
            "proxy.request_log",
            old.proxy.request_log != new.proxy.request_log,
        ),
        ("proxy.tls.cert/key", tls_files(old) != tls_files(new)),
        (
            "admin.token_file",
            old.admin.token_file != new.admin.token_file,
        ),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key)
    .collect()
}

/// Everything a reload swaps, and the config it started from.
pub(crate) struct Reloader {
    /// The config file re-read at each reload.
    pub path: PathBuf,
    /// The config the listeners were bound with (for "needs restart").
    pub started: Config,
    /// The config applied last.
    pub applied: Config,
    pub forwarder: Arc<Forwarder>,
    pub control: ControlHandle,
    pub certs: Option<Arc<CertStore>>,
    pub token: AdminToken,
    pub drain: Arc<Drain>,
}

/// What a reload would swap in, all built before anything is swapped.
struct Prepared {
    config: Config,
    settings: Settings,
    control: ControlConfig,
    token: Option<String>,
    tls: Option<(PathBuf, PathBuf, rustls::sign::CertifiedKey)>,
}

impl Reloader {
    /// Reloads at every message on `reloads` until `shutdown`.
    pub async fn run(mut self, mut reloads: mpsc::Receiver<()>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = reloads.recv() => match r {
                    Some(()) => self.reload().await,
                    None => return,
                },
            }
        }
    }

    /// Reads the file again and applies it, or refuses it and keeps the running config.
    pub async fn reload(&mut self) {
        let path = self.path.display().to_string();
        info!(config = %path, "reloading the config (SIGHUP)");
        match self.prepare() {
            Err(message) => {
                error!(config = %path, error = %message,
                    "config reload REFUSED, still running the previous config: {message}");
                let view = ReloadView {
                    at: Utc::now(),
                    ok: false,
                    message,
                    needs_restart: vec![],
                };
                let _ = self.control.reload(None, view).await;
            }
            Ok(p) => {
                let changed = changed(&self.applied, &p.config);
                let restart = needs_restart(&self.started, &p.config);
                self.forwarder.reconfigure(p.settings);
                self.drain.set_timeout(p.config.failover.drain_timeout);
                self.token.store(p.token.map(Arc::new));
                if let (Some(certs), Some((cert, key, pair))) = (&self.certs, p.tls) {
                    certs.replace(&cert, &key, pair);
                }
                let message = if changed.is_empty() {
                    "no reloadable setting changed".to_owned()
                } else {
                    format!("applied: {}", changed.join(", "))
                };
                if restart.is_empty() {
                    info!(config = %path, changed = ?changed, "config reloaded: {message}");
                } else {
                    warn!(config = %path, changed = ?changed, needs_restart = ?restart,
                        "config reloaded ({message}); NOT applied until a restart: {}", restart.join(", "));
                }
                let view = ReloadView {
                    at: Utc::now(),
                    ok: true,
                    message,
                    needs_restart: restart,
                };
                let _ = self.control.reload(Some(p.control), view).await;
                self.applied = p.config;
            }
        }
    }

    /// Builds everything from the file; the error names the key (or file) that is wrong.
    fn prepare(&self) -> Result<Prepared, String> {
        let mut config = Config::load(&self.path).map_err(|e| e.to_string())?;
        config.resolve_paths(&self.path);
        let settings = self.forwarder.prepare(&config).map_err(|e| e.to_string())?;
        let control = ControlConfig::from_config(&config).map_err(|e| e.to_string())?;
        let token = crate::runner::read_token(&config).map_err(|e| e.to_string())?;
        let tls = match (&self.certs, &config.proxy.tls) {
            (Some(_), Some(t)) => {
                let pair = crate::tls::load_pair(&t.cert, &t.key)
                    .map_err(|e| format!("proxy.tls: {e}"))?;
                Some((t.cert.clone(), t.key.clone(), pair))
            }
            _ => None,
        };
        Ok(Prepared {
            config,
            settings,
            control,
            token,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml_str(&format!(
            "[proxy]\nlisten = \"127.0.0.1:1\"\n{extra}\n[sites.primary]\nurl = \"http://127.0.0.1:2\"\n\
             [sites.backup]\nurl = \"http://127.0.0.1:3\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn listener_changes_need_a_restart_and_the_rest_is_reloadable() {
        let old = config("");
        let mut new = config("request_log = true\nmode = \"redirect\"");
        new.proxy.listen = "127.0.0.1:9".parse().unwrap();
        new.admin.listen = "127.0.0.1:8".parse().unwrap();
        new.sites.backup.url = "http://127.0.0.1:4".into();
        new.health.rise = 5;
        assert_eq!(
            needs_restart(&old, &new),
            vec!["proxy.listen", "admin.listen"]
        );
        assert_eq!(
            changed(&old, &new),
            vec!["sites.backup", "health", "proxy.mode", "proxy.request_log"]
        );
        assert!(needs_restart(&old, &old).is_empty());
        assert!(changed(&old, &old).is_empty());
    }
}
