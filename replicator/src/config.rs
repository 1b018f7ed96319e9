//! The `[replicator]` section of the gsb config file, validated before anything connects.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::NaiveTime;
use serde::Deserialize;

/// Top-level sections owned by other components: accepted and ignored here.
const OTHER_SECTIONS: &[&str] = &[
    "proxy",
    "admin",
    "sites",
    "health",
    "failover",
    "maintenance",
    "coordination",
];

/// A config error naming the key and what would be valid.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// How changes are captured on the sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// From the WAL by logical decoding (`pgoutput`), the default: no trigger on the
    /// application's tables; needs `wal_level = logical` and `track_commit_timestamp = on`.
    Logical,
    /// Row triggers into the `gsb.changes` log, for databases where logical decoding cannot
    /// be enabled.
    Triggers,
}

/// The validated `[replicator]` section.
#[derive(Debug, Clone)]
pub struct Config {
    /// libpq-style connection string of the primary site's database.
    pub primary_dsn: String,
    /// `capture`: "logical" (default) or "triggers".
    pub capture: Capture,
    /// Connection string of the backup site's database.
    pub backup_dsn: String,
    /// Tables replicated both ways (default users, meetings); `schema.table` or `table` (public).
    pub two_way: Vec<String>,
    /// Tables copied primary -> backup once a day and on demand.
    pub config_tables: Vec<String>,
    /// Local time of the daily config copy (default 03:00).
    pub config_copy_at: NaiveTime,
    /// Time zone of `config_copy_at` (default UTC).
    pub config_copy_timezone: chrono_tz::Tz,
    /// Tables copied backup -> primary in real time, one way (default usage_records).
    pub usage_tables: Vec<String>,
    /// Where `/metrics` and `/status` are served (default 127.0.0.1:9091).
    pub metrics_listen: SocketAddr,
    /// Most changes applied in one target transaction (default 1000).
    pub batch_size: i64,
    /// Fallback polling period when no NOTIFY arrives (default 100ms).
    pub poll_interval: Duration,
    /// Remote stamps further ahead of the local clock than this are rejected (default 30s).
    pub max_clock_skew: Duration,
    /// How often each site writes its heartbeat row (default 1s).
    pub heartbeat_interval: Duration,
    /// How often applied changes are pruned from the source change log (default 5s).
    pub prune_interval: Duration,
    /// How often the running replicator verifies the sites; 0 disables (default 0s).
    pub verify_interval: Duration,
    /// `tombstone_retention` was set: the first generation's key, accepted so an older file
    /// still loads, without effect since both captures share the apply (no tombstones: an
    /// update of a row that is gone is skipped and logged). The start warns.
    pub legacy_tombstone_retention: bool,
    /// `ca_file`: PEM certificates the sites' database servers are verified against. When set,
    /// every database link (SQL and replication) is TLS with the server certificate verified
    /// and its host name checked; without it, a connection string with `sslmode=require` is
    /// TLS verified against the system's roots, and any other is plain.
    pub ca_file: Option<std::path::PathBuf>,
    /// The TLS client settings, built from `ca_file` (or the system's roots) on first use and
    /// shared by every connection and clone of this config.
    pub(crate) tls: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>>>,
    /// `[coordination]` (the proxies' etcd): when set, the one active replicator is elected on
    /// etcd (a leased key), so a standby takes over whichever database is down; otherwise by
    /// an advisory lock on the primary.
    pub coordination: Option<gsb_fleet::CoordinationConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    capture: Option<String>,
    primary_dsn: Option<String>,
    backup_dsn: Option<String>,
    two_way: Option<Vec<String>>,
    config_tables: Option<Vec<String>>,
    config_copy_at: Option<String>,
    config_copy_timezone: Option<String>,
    usage_tables: Option<Vec<String>>,
    metrics_listen: Option<String>,
    batch_size: Option<i64>,
    poll_interval: Option<String>,
    max_clock_skew: Option<String>,
    heartbeat_interval: Option<String>,
    prune_interval: Option<String>,
    verify_interval: Option<String>,
    tombstone_retention: Option<String>,
    ca_file: Option<std::path::PathBuf>,
}

impl Config {
    /// Parses the whole gsb config file and validates its `[replicator]` section.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = s
            .parse()
            .map_err(|e| ConfigError(format!("config is not valid TOML: {e}")))?;
        for key in table.keys() {
            if key != "replicator" && !OTHER_SECTIONS.contains(&key.as_str()) {
                return Err(ConfigError(format!(
                    "{key}: unknown top-level key; valid: replicator, {}",
                    OTHER_SECTIONS.join(", ")
                )));
            }
        }
        let section = table.get("replicator").ok_or_else(|| {
            ConfigError(
                "replicator: section [replicator] is missing (needs primary_dsn and backup_dsn)"
                    .into(),
            )
        })?;
        let raw: Raw = section
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(format!("replicator: {}", e.message())))?;
        let dsn = |key: &str, v: Option<String>| -> Result<String, ConfigError> {
            let v = v.ok_or_else(|| {
                ConfigError(format!(
                    "replicator.{key}: missing; e.g. \"host=127.0.0.1 port=5432 user=gsb dbname=site\""
                ))
            })?;
            v.parse::<tokio_postgres::Config>().map_err(|e| {
                ConfigError(format!("replicator.{key}: invalid connection string: {e}"))
            })?;
            Ok(v)
        };
        let primary_dsn = dsn("primary_dsn", raw.primary_dsn)?;
        let backup_dsn = dsn("backup_dsn", raw.backup_dsn)?;
        if primary_dsn == backup_dsn {
            return Err(ConfigError(
                "replicator.backup_dsn: must name a different database than primary_dsn".into(),
            ));
        }
        let tables = |key: &str, v: Option<Vec<String>>, default: &[&str]| {
            let v = v.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect());
            for t in &v {
                let ok = !t.is_empty()
                    && t.split('.').count() <= 2
                    && t.split('.').all(|p| {
                        !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    });
                if !ok {
                    return Err(ConfigError(format!(
                        "replicator.{key}: invalid table name {t:?}; use `table` or `schema.table` (letters, digits, _)"
                    )));
                }
            }
            Ok(v)
        };
        let two_way = tables("two_way", raw.two_way, &["users", "meetings"])?;
        let config_tables = tables(
            "config_tables",
            raw.config_tables,
            &["site_config", "custom_pages", "client_versions"],
        )?;
        let usage_tables = tables("usage_tables", raw.usage_tables, &["usage_records"])?;
        let mut seen = std::collections::HashSet::new();
        for t in two_way.iter().chain(&config_tables).chain(&usage_tables) {
            if !seen.insert(qualify(t)) {
                return Err(ConfigError(format!(
                    "replicator: table {t:?} is listed more than once in two_way, config_tables, usage_tables; each table has one replication mode"
                )));
            }
        }
        let at = raw.config_copy_at.unwrap_or_else(|| "03:00".into());
        let config_copy_at = NaiveTime::parse_from_str(&at, "%H:%M").map_err(|_| {
            ConfigError(format!(
                "replicator.config_copy_at: expected HH:MM (00:00 to 23:59), got {at:?}"
            ))
        })?;
        let tz = raw.config_copy_timezone.unwrap_or_else(|| "UTC".into());
        let config_copy_timezone: chrono_tz::Tz = tz.parse().map_err(|_| {
            ConfigError(format!(
                "replicator.config_copy_timezone: unknown time zone {tz:?}; use an IANA name such as \"UTC\" or \"America/Los_Angeles\""
            ))
        })?;
        let listen = raw
            .metrics_listen
            .unwrap_or_else(|| "127.0.0.1:9091".into());
        let metrics_listen = listen.parse().map_err(|_| {
            ConfigError(format!(
                "replicator.metrics_listen: expected IP:PORT such as \"127.0.0.1:9091\", got {listen:?}"
            ))
        })?;
        let batch_size = raw.batch_size.unwrap_or(1000);
        if !(1..=100_000).contains(&batch_size) {
            return Err(ConfigError(format!(
                "replicator.batch_size: expected 1 to 100000, got {batch_size}"
            )));
        }
        let dur = |key: &str, v: Option<String>, default: &str, allow_zero: bool| {
            let v = v.unwrap_or_else(|| default.into());
            let d = humantime::parse_duration(&v).map_err(|e| {
                ConfigError(format!(
                    "replicator.{key}: expected a duration such as \"500ms\" or \"30s\", got {v:?} ({e})"
                ))
            })?;
            if d.is_zero() && !allow_zero {
                return Err(ConfigError(format!(
                    "replicator.{key}: must be more than 0"
                )));
            }
            Ok(d)
        };
        let capture = match raw.capture.as_deref() {
            None | Some("logical") => Capture::Logical,
            Some("triggers") => Capture::Triggers,
            Some(other) => {
                return Err(ConfigError(format!(
                    "replicator.capture: expected \"logical\" (from the WAL, needs wal_level = logical) or \"triggers\", got {other:?}"
                )))
            }
        };
        Ok(Config {
            capture,
            primary_dsn,
            backup_dsn,
            two_way,
            config_tables,
            config_copy_at,
            config_copy_timezone,
            usage_tables,
            metrics_listen,
            batch_size,
            poll_interval: dur("poll_interval", raw.poll_interval, "100ms", false)?,
            max_clock_skew: dur("max_clock_skew", raw.max_clock_skew, "30s", false)?,
            heartbeat_interval: dur("heartbeat_interval", raw.heartbeat_interval, "1s", false)?,
            prune_interval: dur("prune_interval", raw.prune_interval, "5s", false)?,
            verify_interval: dur("verify_interval", raw.verify_interval, "0s", true)?,
            legacy_tombstone_retention: {
                dur(
                    "tombstone_retention",
                    raw.tombstone_retention.clone(),
                    "7d",
                    false,
                )?;
                raw.tombstone_retention.is_some()
            },
            ca_file: raw.ca_file,
            tls: Default::default(),
            coordination: match table.get("coordination") {
                None => None,
                Some(v) => {
                    let c: gsb_fleet::CoordinationConfig =
                        v.clone().try_into().map_err(|e: toml::de::Error| {
                            ConfigError(format!("coordination: {}", e.message()))
                        })?;
                    c.validate().map_err(|e| ConfigError(e.to_string()))?;
                    Some(c)
                }
            },
        })
    }

    /// Makes a relative `ca_file` relative to `dir` (the config file's directory), as every
    /// path in the file; the `[coordination]` paths too.
    pub fn resolve_paths(&mut self, dir: &std::path::Path) {
        if let Some(p) = self.ca_file.as_mut().filter(|p| p.is_relative()) {
            *p = dir.join(&*p);
        }
        if let Some(c) = self.coordination.as_mut() {
            c.resolve_paths(dir);
        }
    }
}

/// `users` -> `public.users`; `s.t` unchanged.
pub(crate) fn qualify(t: &str) -> String {
    if t.contains('.') {
        t.to_owned()
    } else {
        format!("public.{t}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[replicator]\nprimary_dsn = \"host=127.0.0.1 port=1 user=gsb dbname=site\"\nbackup_dsn = \"host=127.0.0.1 port=2 user=gsb dbname=site\"\n";

    #[test]
    fn defaults() {
        let c = Config::from_toml_str(MIN).unwrap();
        assert_eq!(c.two_way, ["users", "meetings"]);
        assert_eq!(
            c.config_tables,
            ["site_config", "custom_pages", "client_versions"]
        );
        assert_eq!(c.usage_tables, ["usage_records"]);
        assert_eq!(c.config_copy_at, NaiveTime::from_hms_opt(3, 0, 0).unwrap());
        assert_eq!(c.config_copy_timezone, chrono_tz::UTC);
        assert_eq!(c.metrics_listen, "127.0.0.1:9091".parse().unwrap());
        assert_eq!(c.poll_interval, Duration::from_millis(100));
        assert_eq!(c.capture, Capture::Logical);
        let c = Config::from_toml_str(&format!("{MIN}capture = \"triggers\"\n")).unwrap();
        assert_eq!(c.capture, Capture::Triggers);
        let e = Config::from_toml_str(&format!("{MIN}capture = \"wal\"\n"))
            .unwrap_err()
            .0;
        assert!(e.starts_with("replicator.capture: expected"), "{e}");
        assert!(!c.legacy_tombstone_retention);
        let e = Config::from_toml_str(&format!("{MIN}tombstone_retention = \"0s\"\n"))
            .unwrap_err()
            .0;
        assert_eq!(e, "replicator.tombstone_retention: must be more than 0");
    }

    #[test]
    fn other_sections_are_ignored_unknown_rejected() {
        let ok = format!("[proxy]\nlisten = \"x\"\n[[maintenance]]\ndays = []\n{MIN}");
        Config::from_toml_str(&ok).unwrap();
        let bad = format!("[proxyy]\n{MIN}");
        let e = Config::from_toml_str(&bad).unwrap_err().0;
        assert!(e.starts_with("proxyy: unknown top-level key"), "{e}");
        let bad = format!("{MIN}wat = 1\n");
        let e = Config::from_toml_str(&bad).unwrap_err().0;
        assert!(e.contains("replicator") && e.contains("wat"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml_str("[proxy]\n").unwrap_err().0;
        assert!(e.contains("[replicator] is missing"), "{e}");
        let e = Config::from_toml_str(&format!("{MIN}config_copy_at = \"25:00\"\n"))
            .unwrap_err()
            .0;
        assert_eq!(
            e,
            "replicator.config_copy_at: expected HH:MM (00:00 to 23:59), got \"25:00\""
        );
        let e = Config::from_toml_str(&format!("{MIN}config_copy_timezone = \"Mars/Base\"\n"))
            .unwrap_err()
            .0;
        assert!(e.starts_with("replicator.config_copy_timezone"), "{e}");
        let e = Config::from_toml_str(&format!("{MIN}poll_interval = \"soon\"\n"))
            .unwrap_err()
            .0;
        assert!(e.starts_with("replicator.poll_interval"), "{e}");
        let e = Config::from_toml_str(&format!("{MIN}usage_tables = [\"users\"]\n"))
            .unwrap_err()
            .0;
        assert!(e.contains("more than once"), "{e}");
        let e = Config::from_toml_str("[replicator]\nbackup_dsn = \"host=x\"\n")
            .unwrap_err()
            .0;
        assert!(e.starts_with("replicator.primary_dsn: missing"), "{e}");
    }
}
