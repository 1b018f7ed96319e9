//! `[coordination]`: where the fleet's etcd is and how this member takes part. Absent, a proxy
//! decides alone (the single-proxy behaviour) and the replicator elects by advisory lock.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A `[coordination]` value that makes no sense: the key and what would be valid.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// Dotted key, e.g. `coordination.lease_ttl`.
    pub key: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: format!("coordination.{key}"),
        message: message.into(),
    }
}

/// How many fresh votes make a fleet verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quorum {
    /// More than half of the fresh members (the default).
    #[default]
    Majority,
    /// At least this many fresh members must agree, however many there are.
    Count(usize),
}

impl<'de> Deserialize<'de> for Quorum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Number(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "majority" => Ok(Quorum::Majority),
            Raw::Number(n) if n >= 1 => Ok(Quorum::Count(n as usize)),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected \"majority\" or a number of proxies >= 1, got {w:?}"
            ))),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "expected \"majority\" or a number of proxies >= 1, got {n}"
            ))),
        }
    }
}

/// What a proxy does while it cannot reach etcd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLoss {
    /// Keep routing to the last decided site; never move alone (the default: no split brain).
    #[default]
    Hold,
    /// After `local_after` without etcd, decide alone on this proxy's own probes (trades
    /// split-brain safety for availability while the store is gone).
    Local,
}

/// `[coordination]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationConfig {
    /// etcd client endpoints, e.g. `["https://etcd-a:2379", "https://etcd-b:2379"]`. Required.
    pub etcd: Vec<String>,
    /// This member's name in the fleet (unique per proxy). Default: the host name.
    #[serde(default)]
    pub name: Option<String>,
    /// A free-form location label shown beside the member's votes. Default `""`.
    #[serde(default)]
    pub region: String,
    /// Key prefix of this fleet in etcd (one fleet per site pair). Default `/gsb`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Lease of a member's keys: a dead member's votes and leadership vanish after this.
    /// Default 5s.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Votes needed for a fleet verdict: `"majority"` (default) of the fresh members, or a number.
    #[serde(default)]
    pub quorum: Quorum,
    /// PEM CA that signs the etcd servers' certificates (with `https://` endpoints).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd's client-cert auth (with `key_file`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// etcd user (role-based auth), with `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the etcd user's password (trimmed).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `"hold"` (default) or `"local"`.
    #[serde(default)]
    pub on_loss: OnLoss,
    /// With `on_loss = "local"`: time without etcd before this proxy decides alone. Default 30s.
    #[serde(default = "default_local_after", with = "humantime_serde")]
    pub local_after: Duration,
}

fn default_prefix() -> String {
    "/gsb".into()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(5)
}

fn default_local_after() -> Duration {
    Duration::from_secs(30)
}

impl CoordinationConfig {
    /// A minimal config for `endpoints` with every default.
    pub fn new(endpoints: Vec<String>) -> CoordinationConfig {
        CoordinationConfig {
            etcd: endpoints,
            name: None,
            region: String::new(),
            prefix: default_prefix(),
            lease_ttl: default_lease_ttl(),
            quorum: Quorum::Majority,
            ca_file: None,
            cert_file: None,
            key_file: None,
            user: None,
            password_file: None,
            on_loss: OnLoss::Hold,
            local_after: default_local_after(),
        }
    }

    /// Checks what serde cannot; every error names the key and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.etcd.is_empty() {
            return Err(invalid(
                "etcd",
                "list at least one etcd endpoint, e.g. [\"http://127.0.0.1:2379\"] (three members in production)",
            ));
        }
        let mut https = None;
        for (i, e) in self.etcd.iter().enumerate() {
            let tls = match e.split_once("://") {
                Some(("http", rest)) if !rest.is_empty() => false,
                Some(("https", rest)) if !rest.is_empty() => true,
                _ => {
                    return Err(invalid(
                        &format!("etcd[{i}]"),
                        format!("expected http://host:port or https://host:port, got {e:?}"),
                    ))
                }
            };
            if *https.get_or_insert(tls) != tls {
                return Err(invalid(
                    "etcd",
                    "mixes http:// and https:// endpoints; use one scheme for every member",
                ));
            }
        }
        let https = https.unwrap_or(false);
        if let Some(name) = &self.name {
            if name.is_empty() || name.contains('/') || name.len() > 128 {
                return Err(invalid(
                    "name",
                    format!("must be 1-128 characters without '/', got {name:?}"),
                ));
            }
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(invalid(
                "prefix",
                format!(
                    "must start with '/' and not end with one, e.g. \"/gsb\", got {:?}",
                    self.prefix
                ),
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(300) {
            return Err(invalid(
                "lease_ttl",
                "must be between 2s and 300s (etcd leases have a one-second grain), e.g. \"5s\"",
            ));
        }
        if self.ca_file.is_some() && !https {
            return Err(invalid(
                "ca_file",
                "is only used with https:// etcd endpoints; remove it or use https://",
            ));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(invalid("key_file", "is required with cert_file"));
            }
            (None, Some(_)) => {
                return Err(invalid("cert_file", "is required with key_file"));
            }
            (Some(_), Some(_)) if !https => {
                return Err(invalid(
                    "cert_file",
                    "client certificates need https:// etcd endpoints",
                ));
            }
            _ => {}
        }
        match (&self.user, &self.password_file) {
            (Some(_), None) => return Err(invalid("password_file", "is required with user")),
            (None, Some(_)) => return Err(invalid("user", "is required with password_file")),
            _ => {}
        }
        if self.on_loss == OnLoss::Local && self.local_after < self.lease_ttl {
            return Err(invalid(
                "local_after",
                "must be at least lease_ttl: a proxy must not decide alone while the fleet's leases still hold",
            ));
        }
        Ok(())
    }

    /// Makes relative file paths relative to the config file's directory.
    pub fn resolve_paths(&mut self, dir: &Path) {
        for p in [
            &mut self.ca_file,
            &mut self.cert_file,
            &mut self.key_file,
            &mut self.password_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// This member's name: `name`, else the host name.
    pub fn member_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "gsb-proxy".into())
    }

    /// How old a vote may be and still count (`lease_ttl`: a member refreshes its vote far more
    /// often, so an older one means its probing is stuck).
    pub fn stale_after(&self) -> Duration {
        self.lease_ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<CoordinationConfig, String> {
        let c: CoordinationConfig =
            toml::from_str(&format!("etcd = [\"http://127.0.0.1:2379\"]\n{extra}"))
                .map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.prefix, "/gsb");
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
        assert_eq!(c.quorum, Quorum::Majority);
        assert_eq!(c.on_loss, OnLoss::Hold);
        assert_eq!(c.region, "");
        assert!(!c.member_name().is_empty());
    }

    #[test]
    fn quorum_is_majority_or_a_number() {
        assert_eq!(parse("quorum = 2").unwrap().quorum, Quorum::Count(2));
        let e = parse("quorum = 0").unwrap_err();
        assert!(e.contains("quorum") && e.contains(">= 1"), "{e}");
        let e = parse("quorum = \"most\"").unwrap_err();
        assert!(e.contains("majority"), "{e}");
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let cases = [
            (
                "lease_ttl = \"500ms\"",
                "coordination.lease_ttl: must be between 2s",
            ),
            (
                "prefix = \"gsb\"",
                "coordination.prefix: must start with '/'",
            ),
            (
                "ca_file = \"ca.pem\"",
                "coordination.ca_file: is only used with https://",
            ),
            (
                "user = \"gsb\"",
                "coordination.password_file: is required with user",
            ),
            (
                "name = \"a/b\"",
                "coordination.name: must be 1-128 characters",
            ),
            (
                "on_loss = \"local\"\nlocal_after = \"1s\"",
                "coordination.local_after: must be at least lease_ttl",
            ),
        ];
        for (extra, want) in cases {
            let e = parse(extra).unwrap_err();
            assert!(e.starts_with(want), "{extra}: {e}");
        }
        let e = parse("on_loss = \"panic\"").unwrap_err();
        assert!(e.contains("hold") && e.contains("local"), "{e}");
        let c: CoordinationConfig = toml::from_str("etcd = []").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("coordination.etcd: list at least one"));
        let c: CoordinationConfig =
            toml::from_str("etcd = [\"http://a:2379\", \"https://b:2379\"]").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("mixes"));
        let c: CoordinationConfig = toml::from_str("etcd = [\"a:2379\"]").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("coordination.etcd[0]: expected http://"));
    }

    #[test]
    fn relative_files_resolve_beside_the_config() {
        let mut c = parse("").unwrap();
        c.password_file = Some("etcd.pass".into());
        c.resolve_paths(Path::new("/srv/gsb"));
        assert_eq!(
            c.password_file.as_deref(),
            Some(Path::new("/srv/gsb/etcd.pass"))
        );
    }
}
