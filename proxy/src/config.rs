//! The proxy's view of the gsb config file: typed, defaulted, validated before any port is bound.
//!
//! The file is shared with the replicator: its `[replicator]` table is accepted here unread (the
//! replicator validates it). Every other unknown key is an error naming the key and what is valid.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// A config error: the key it is about and what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML or does not match the schema (the message names the key).
    #[error("{0}")]
    Parse(String),
    /// A value parsed but makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted path of the offending key, e.g. `health.rise`.
        key: String,
        /// What is wrong and what would be valid.
        message: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The config path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole file, as the proxy reads it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[proxy]`: the public listeners.
    #[serde(default)]
    pub proxy: ListenerConfig,
    /// `[admin]`: the admin listener (metrics, status, failover API).
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[sites.primary]` and `[sites.backup]`.
    pub sites: SitesConfig,
    /// `[health]`: probes and thresholds.
    #[serde(default)]
    pub health: HealthConfig,
    /// `[failover]`: when traffic moves.
    #[serde(default)]
    pub failover: FailoverConfig,
    /// `[[maintenance]]`: scheduled windows that move traffic to the backup.
    #[serde(default)]
    pub maintenance: Vec<MaintenanceConfig>,
    /// `[replicator]`: read by the replicator, ignored here.
    #[serde(default)]
    pub replicator: Option<toml::Value>,
    /// `[coordination]`: the fleet's etcd. Absent, this proxy decides alone.
    #[serde(default)]
    pub coordination: Option<gsb_fleet::CoordinationConfig>,
}

/// Whether the public listener forwards requests or redirects clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward every request to the active site (default).
    #[default]
    Proxy,
    /// Answer 307 to the active site's public URL.
    Redirect,
}

/// `[proxy]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Plain HTTP listener. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Optional TLS listener beside the plain one; cert and key are reloaded when the files change.
    pub tls: Option<TlsConfig>,
    /// `proxy` (default) or `redirect`.
    pub mode: Mode,
    /// Time to open a TCP connection to a site before giving up (then retry on the other). Default 1s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time a client has to send complete request headers (slowloris guard). Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a site has to send response headers before a 504, and the longest it may send
    /// nothing in the middle of an answer body before the answer is cut (the client
    /// connection closed, as HAProxy's `timeout server` and nginx's `proxy_read_timeout`).
    /// Default 60s.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Idle keep-alive time of client and pooled upstream connections. Default 60s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Share of requests that may be retried on the other site (0.0..=1.0). Default 0.2.
    pub retry_budget: f64,
    /// Log one line per request (common log format fields). Default false.
    pub request_log: bool,
    /// Largest request head a client may send (request line and headers, in bytes); a larger
    /// one is answered 431 and never forwarded. Default 32768 (nginx's 4 x 8k, HAProxy's
    /// 16k buffer minus its reserve sit near it).
    pub max_header_bytes: usize,
    /// Most request headers a client may send; more are answered 431 and never forwarded.
    /// Default 100 (HAProxy's and hyper's default).
    pub max_headers: usize,
    /// Threads serving the public listeners, each with its own runtime, listening socket
    /// (`SO_REUSEPORT`) and upstream connections; nothing but the route is shared between
    /// them. Default: the number of cores.
    pub workers: Option<usize>,
}

impl ListenerConfig {
    /// `workers`, or the number of cores when it is not set.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            listen: "0.0.0.0:8080".parse().expect("valid literal"),
            tls: None,
            mode: Mode::Proxy,
            connect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            retry_budget: 0.2,
            request_log: false,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            workers: None,
        }
    }
}

/// `[proxy.tls]` (or `tls = { ... }`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// HTTPS listener address.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[admin]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin listener; loopback by default so the API is not exposed by accident.
    pub listen: SocketAddr,
    /// File holding the bearer token for POSTs. Without it, POSTs are refused (403).
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".parse().expect("valid literal"),
            token_file: None,
        }
    }
}

/// `[sites]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SitesConfig {
    /// `[sites.primary]`.
    pub primary: SiteConfig,
    /// `[sites.backup]`.
    pub backup: SiteConfig,
}

/// One site.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Base URL the proxy forwards to and probes, e.g. `http://10.0.0.5:8001`.
    pub url: String,
    /// URL clients are redirected to in `mode = "redirect"`; defaults to `url`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// PEM file of the CA(s) that sign an `https://` site's certificate (a private CA); when set
    /// only these are trusted, by default the system roots are. Relative to the config file;
    /// read at start and at each reload.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// What a site's TLS client depends on: its `url`, its `ca_file` path and that file's content
/// (so a reload after the CA file was replaced in place rebuilds the client too).
pub type TrustKey = (String, Option<PathBuf>, Option<Vec<u8>>);

impl SiteConfig {
    /// This site's [`TrustKey`]; an unreadable file reads as no content (building the client
    /// then reports the error).
    pub fn trust_key(&self) -> TrustKey {
        let content = self.ca_file.as_ref().and_then(|p| std::fs::read(p).ok());
        (self.url.clone(), self.ca_file.clone(), content)
    }

    /// The rustls client config the proxy and its probes use toward this site (`key` is
    /// `sites.primary` or `sites.backup`): `ca_file` read and parsed, else the system roots.
    /// An `http://` site gets an empty trust store (no TLS is ever spoken to it).
    pub fn client_tls(&self, key: &str) -> Result<rustls::ClientConfig, crate::tls::TlsError> {
        if !self.url.starts_with("https://") {
            return Ok(gsb_health::tls::with_roots(rustls::RootCertStore::empty()));
        }
        gsb_health::tls::client_config(self.ca_file.as_deref()).map_err(|source| {
            crate::tls::TlsError::CaFile {
                key: format!("{key}.ca_file"),
                source,
            }
        })
    }
}

/// `[health]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between probe rounds. Default 500ms.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Time one probe may take before it counts as failed. Default 400ms.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring a component up. Default 2.
    pub rise: u32,
    /// Consecutive failures that take a component down. Default 3.
    pub fall: u32,
    /// The components probed on each site. Default: one critical `web` at `/health/web`.
    pub components: Vec<ComponentConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(400),
            rise: 2,
            fall: 3,
            components: vec![ComponentConfig {
                name: "web".into(),
                path: Some("/health/web".into()),
                tcp: None,
                critical: true,
                expect_status: None,
                body_contains: None,
            }],
        }
    }
}

/// `[[health.components]]`: an HTTP probe (`path`) or a TCP probe (`tcp`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// Component name, used in metrics and the status page.
    pub name: String,
    /// HTTP path probed on the site's `url`.
    #[serde(default)]
    pub path: Option<String>,
    /// `host:port` to open a TCP connection to, instead of an HTTP probe.
    #[serde(default)]
    pub tcp: Option<String>,
    /// A site whose critical components are all down is `down`. Default true.
    #[serde(default = "default_true")]
    pub critical: bool,
    /// Accepted status range like `"200-399"` (default) or `"200"`.
    #[serde(default)]
    pub expect_status: Option<String>,
    /// The body must contain this text.
    #[serde(default)]
    pub body_contains: Option<String>,
}

fn default_true() -> bool {
    true
}

/// How traffic returns to the primary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailbackMode {
    /// Automatically, after the primary is healthy for `failback_after` (default).
    #[default]
    Auto,
    /// Only when an operator says so.
    Manual,
}

/// `[failover]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Fail over automatically when the primary is down. Default true.
    pub auto: bool,
    /// `auto` (default) or `manual`.
    pub failback: FailbackMode,
    /// Primary healthy this long before automatic failback. Default 30s.
    #[serde(with = "humantime_serde")]
    pub failback_after: Duration,
    /// Minimum time between two automatic moves (anti-flap). Default 10s.
    #[serde(with = "humantime_serde")]
    pub min_dwell: Duration,
    /// Requests and upgraded connections on the old site may finish within this. Default 2h.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Replicator `/status` URL; failback waits until backup->primary is drained.
    pub replicator_status: Option<String>,
    /// Longest failback waits for replication before going anyway (logged loudly). Default 10m.
    #[serde(with = "humantime_serde")]
    pub failback_max_wait: Duration,
    /// Where forced states (operator failover, pins) are kept across restarts.
    /// Default `gsb-proxy.state` beside the config file.
    pub state_file: Option<PathBuf>,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            auto: true,
            failback: FailbackMode::Auto,
            failback_after: Duration::from_secs(30),
            min_dwell: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(2 * 3600),
            replicator_status: None,
            failback_max_wait: Duration::from_secs(600),
            state_file: None,
        }
    }
}

/// `[[maintenance]]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Days the window starts on: `mon`..`sun`; empty or missing = every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// Local start time `HH:MM`.
    pub start: String,
    /// Window length.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// IANA time zone, e.g. `America/Los_Angeles`. Default `UTC`.
    #[serde(default = "default_tz")]
    pub timezone: String,
}

fn default_tz() -> String {
    "UTC".into()
}

impl Config {
    /// Parses and validates the config text.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text)
    }

    /// Makes relative paths relative to the config file's directory (so a config works from any
    /// working directory); `failover.state_file` defaults to `gsb-proxy.state` beside it.
    pub fn resolve_paths(&mut self, config_path: &std::path::Path) {
        let dir = config_path
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        let beside = |p: &PathBuf| {
            if p.is_relative() {
                dir.join(p)
            } else {
                p.clone()
            }
        };
        let state = self
            .failover
            .state_file
            .get_or_insert_with(|| PathBuf::from("gsb-proxy.state"));
        *state = beside(state);
        if let Some(token) = &mut self.admin.token_file {
            *token = beside(token);
        }
        if let Some(tls) = &mut self.proxy.tls {
            tls.cert = beside(&tls.cert);
            tls.key = beside(&tls.key);
        }
        for site in [&mut self.sites.primary, &mut self.sites.backup] {
            if let Some(ca) = &mut site.ca_file {
                *ca = beside(ca);
            }
        }
        if let Some(c) = &mut self.coordination {
            c.resolve_paths(&dir);
        }
    }

    /// Checks what serde cannot: ranges, URLs, time zones, consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, site) in [
            ("sites.primary", &self.sites.primary),
            ("sites.backup", &self.sites.backup),
        ] {
            validate_url(&format!("{key}.url"), &site.url)?;
            if let Some(public) = &site.public_url {
                validate_url(&format!("{key}.public_url"), public)?;
            }
            if let Some(ca) = &site.ca_file {
                if ca.as_os_str().is_empty() {
                    return Err(invalid(
                        format!("{key}.ca_file"),
                        "is empty; give the PEM file of the site's CA, or remove the key to trust the system roots",
                    ));
                }
                if !site.url.starts_with("https://") {
                    return Err(invalid(
                        format!("{key}.ca_file"),
                        format!(
                            "is only used for an https:// url, but url is {:?}; remove ca_file or use https://",
                            site.url
                        ),
                    ));
                }
            }
        }
        if !(0.0..=1.0).contains(&self.proxy.retry_budget) {
            return Err(invalid(
                "proxy.retry_budget",
                "must be between 0.0 and 1.0 (0.2 = at most 20% of requests retried)",
            ));
        }
        if !(1024..=1024 * 1024).contains(&self.proxy.max_header_bytes) {
            return Err(invalid(
                "proxy.max_header_bytes",
                "must be between 1024 and 1048576 (bytes of request line and headers), e.g. 32768",
            ));
        }
        if !(1..=10_000).contains(&self.proxy.max_headers) {
            return Err(invalid(
                "proxy.max_headers",
                "must be between 1 and 10000, e.g. 100",
            ));
        }
        if self.proxy.workers.is_some_and(|w| !(1..=1024).contains(&w)) {
            return Err(invalid(
                "proxy.workers",
                "must be between 1 and 1024; remove the key to use one worker per core",
            ));
        }
        let h = &self.health;
        if h.rise == 0 {
            return Err(invalid("health.rise", "must be at least 1"));
        }
        if h.fall == 0 {
            return Err(invalid("health.fall", "must be at least 1"));
        }
        if h.interval.is_zero() {
            return Err(invalid(
                "health.interval",
                "must be greater than 0, e.g. \"500ms\"",
            ));
        }
        if h.timeout.is_zero() || h.timeout > h.interval.max(Duration::from_secs(60)) {
            return Err(invalid(
                "health.timeout",
                "must be greater than 0 and at most 60s, e.g. \"400ms\"",
            ));
        }
        if h.components.is_empty() {
            return Err(invalid(
                "health.components",
                "at least one component is needed, e.g. { name = \"web\", path = \"/health/web\" }",
            ));
        }
        if !h.components.iter().any(|c| c.critical) {
            return Err(invalid(
                "health.components",
                "at least one component must be critical = true",
            ));
        }
        for (i, c) in h.components.iter().enumerate() {
            let key = format!("health.components[{i}]");
            match (&c.path, &c.tcp) {
                (Some(p), None) if p.starts_with('/') => {}
                (Some(_), None) => {
                    return Err(invalid(format!("{key}.path"), "must start with '/'"))
                }
                (None, Some(addr)) if addr.contains(':') => {}
                (None, Some(_)) => return Err(invalid(format!("{key}.tcp"), "must be host:port")),
                _ => {
                    return Err(invalid(
                        &key,
                        "set exactly one of `path` (HTTP probe) or `tcp` (host:port)",
                    ))
                }
            }
            if let Some(range) = &c.expect_status {
                parse_status_range(range).ok_or_else(|| {
                    invalid(
                        format!("{key}.expect_status"),
                        format!("expected a status or range like \"200-399\", got {range:?}"),
                    )
                })?;
            }
        }
        if let Some(url) = &self.failover.replicator_status {
            validate_url("failover.replicator_status", url)?;
        }
        if let Some(c) = &self.coordination {
            c.validate().map_err(|e| invalid(e.key, e.message))?;
        }
        for (i, w) in self.maintenance.iter().enumerate() {
            let key = format!("maintenance[{i}]");
            for d in &w.days {
                parse_weekday(d).ok_or_else(|| {
                    invalid(
                        format!("{key}.days"),
                        format!("unknown day {d:?}; valid: mon, tue, wed, thu, fri, sat, sun"),
                    )
                })?;
            }
            parse_hh_mm(&w.start).ok_or_else(|| {
                invalid(
                    format!("{key}.start"),
                    format!("expected HH:MM (24h), got {:?}", w.start),
                )
            })?;
            w.timezone.parse::<chrono_tz::Tz>().map_err(|_| {
                invalid(
                    format!("{key}.timezone"),
                    format!(
                        "unknown IANA time zone {:?}, e.g. \"America/Los_Angeles\"",
                        w.timezone
                    ),
                )
            })?;
            if w.duration.is_zero() || w.duration > Duration::from_secs(7 * 24 * 3600) {
                return Err(invalid(
                    format!("{key}.duration"),
                    "must be between 1s and 7 days",
                ));
            }
        }
        Ok(())
    }
}

fn validate_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url.parse().map_err(|_| {
        invalid(
            key,
            format!("not a URL: {url:?}; expected like \"http://127.0.0.1:8001\""),
        )
    })?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.authority().is_some() => Ok(()),
        _ => Err(invalid(
            key,
            format!("expected an http:// or https:// URL with a host, got {url:?}"),
        )),
    }
}

/// Parses `"200"` or `"200-399"` into an inclusive range.
pub fn parse_status_range(s: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (lo.trim().parse().ok()?, hi.trim().parse().ok()?),
        None => {
            let v = s.trim().parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&lo) && (lo..=599).contains(&hi)).then_some(lo..=hi)
}

/// Parses `mon`..`sun` (also full English names).
pub fn parse_weekday(s: &str) -> Option<chrono::Weekday> {
    let s = s.trim().to_ascii_lowercase();
    s.get(..3)?
        .parse()
        .ok()
        .filter(|_| s.len() == 3 || s.parse::<chrono::Weekday>().is_ok())
}

/// Parses `HH:MM` (24h).
pub fn parse_hh_mm(s: &str) -> Option<chrono::NaiveTime> {
    chrono::NaiveTime::parse_from_str(s.trim(), "%H:%M").ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(backup_extra: &str, backup_url: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(&format!(
            "[sites.primary]\nurl = \"https://primary.example\"\n\
             [sites.backup]\nurl = \"{backup_url}\"\n{backup_extra}\n"
        ))
    }

    #[test]
    fn ca_file_needs_an_https_url_and_a_path() {
        let e = config("ca_file = \"ca.pem\"", "http://127.0.0.1:2").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("sites.backup.ca_file: is only used for an https:// url"),
            "{e}"
        );
        let e = config("ca_file = \"\"", "https://b.example").unwrap_err();
        assert!(
            e.to_string().starts_with("sites.backup.ca_file: is empty"),
            "{e}"
        );
        let e = config("ca_file = 3", "https://b.example").unwrap_err();
        assert!(e.to_string().contains("ca_file"), "{e}");
        let ok = config("ca_file = \"ca.pem\"", "https://b.example").expect("valid");
        assert_eq!(
            ok.sites.backup.ca_file.as_deref(),
            Some(Path::new("ca.pem"))
        );
        assert_eq!(ok.sites.primary.ca_file, None);
    }

    #[test]
    fn ca_file_is_resolved_beside_the_config() {
        let mut c = config("ca_file = \"certs/ca.pem\"", "https://b.example").unwrap();
        c.resolve_paths(Path::new("/srv/gsb/gsb.toml"));
        assert_eq!(
            c.sites.backup.ca_file.as_deref(),
            Some(Path::new("/srv/gsb/certs/ca.pem"))
        );
    }

    #[test]
    fn ca_file_must_be_readable_and_hold_a_ca_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("ca_file = \"ca.pem\"", "https://b.example").unwrap();
        c.resolve_paths(&dir.path().join("gsb.toml"));
        let site = &c.sites.backup;

        let e = site.client_tls("sites.backup").unwrap_err().to_string();
        assert!(
            e.starts_with("sites.backup.ca_file: ") && e.contains("cannot read it"),
            "{e}"
        );

        std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
        let e = site.client_tls("sites.backup").unwrap_err().to_string();
        assert!(
            e.starts_with("sites.backup.ca_file: ") && e.contains("no CERTIFICATE"),
            "{e}"
        );

        let ca = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        site.client_tls("sites.backup")
            .expect("a PEM CA is accepted");
        // Without ca_file an https site trusts the system roots; an http site needs no TLS.
        c.sites
            .primary
            .client_tls("sites.primary")
            .expect("system roots");
    }
}
