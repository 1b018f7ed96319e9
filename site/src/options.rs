//! What a site is told at startup: its role, its database and where to listen.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// Which of the two sites this process plays; shown in every response and in `detectbackup`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The site that normally serves users.
    Primary,
    /// The standby site that serves users during a failover.
    Backup,
}

impl Role {
    /// Lower-case name, as used in the `X-Gsb-Site` header and in `usage_records.site`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }

    /// Capitalised name, the exact `detectbackup` body.
    pub fn title(self) -> &'static str {
        match self {
            Role::Primary => "Primary",
            Role::Backup => "Backup",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is neither `primary` nor `backup`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid site role {0:?}: expected \"primary\" or \"backup\"")]
pub struct ParseRoleError(String);

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("primary") {
            Ok(Role::Primary)
        } else if s.eq_ignore_ascii_case("backup") {
            Ok(Role::Backup)
        } else {
            Err(ParseRoleError(s.to_owned()))
        }
    }
}

/// Startup options of one reference site.
#[derive(Clone)]
pub struct SiteOptions {
    /// The role this site answers with (`detectbackup`, `X-Gsb-Site`, usage rows).
    pub role: Role,
    /// libpq-style connection string of the site's own database (key=value or URL form).
    pub dsn: String,
    /// Address `run` binds; ignored by `serve`, which is handed a bound listener.
    pub listen: SocketAddr,
    /// Enables `POST/GET /_faults`; without it those routes answer 404 so a production-like
    /// stack cannot be broken by a stray request.
    pub allow_faults: bool,
}

// Hand-written so a password inside the DSN never reaches a log line.
impl fmt::Debug for SiteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteOptions")
            .field("role", &self.role)
            .field("dsn", &"<redacted>")
            .field("listen", &self.listen)
            .field("allow_faults", &self.allow_faults)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_parses_both_names_and_rejects_others() {
        assert_eq!("primary".parse::<Role>(), Ok(Role::Primary));
        assert_eq!("Backup".parse::<Role>(), Ok(Role::Backup));
        let err = "standby".parse::<Role>().unwrap_err();
        assert!(err.to_string().contains("standby"), "{err}");
    }

    #[test]
    fn debug_hides_the_dsn() {
        let opts = SiteOptions {
            role: Role::Backup,
            dsn: "host=x password=hunter2".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            allow_faults: false,
        };
        assert!(!format!("{opts:?}").contains("hunter2"));
    }
}
