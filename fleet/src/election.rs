//! A leased election for a role other than the decider (the active replicator of a site pair):
//! the holder keeps the key while its session's lease lives; a standby wins it once the lease
//! is gone, whichever database is down.

use crate::session::{Fleet, FleetError};

/// One member's candidacy for the role on `key`.
#[derive(Debug)]
pub struct Election {
    fleet: Fleet,
    key: String,
    /// The key's create revision when this member won it.
    token: Option<i64>,
}

impl Election {
    pub(crate) fn new(fleet: Fleet, key: String) -> Election {
        Election {
            fleet,
            key,
            token: None,
        }
    }

    /// Whether this member holds the role now, as the live view shows it (false while etcd is
    /// unreachable: a holder that cannot renew its lease must assume it lost the role).
    pub fn is_leader(&self) -> bool {
        let (up, key) = self.key_now();
        up && self.token.is_some() && key.map(|s| s.create_revision) == self.token
    }

    /// Whether the session is up, and the role's key as the live view shows it.
    fn key_now(&self) -> (bool, Option<crate::Stored>) {
        let view = self.fleet.view();
        let view = view.borrow();
        let suffix = self
            .key
            .strip_prefix(&self.fleet.keys().all())
            .unwrap_or("");
        (view.up, view.other.get(suffix).cloned())
    }

    /// Holds the role if it can: keeps it when held, takes it when free. Returns whether this
    /// member holds it now.
    pub async fn campaign(&mut self, holder: &str) -> Result<bool, FleetError> {
        if self.is_leader() {
            return Ok(true);
        }
        self.token = self
            .fleet
            .create_leased(&self.key, holder.as_bytes().to_vec())
            .await?;
        Ok(self.token.is_some())
    }

    /// The current holder's name, as the live view shows it.
    pub fn holder(&self) -> Option<String> {
        self.key_now()
            .1
            .map(|s| String::from_utf8_lossy(&s.value).into_owned())
    }

    /// Gives the role up (at shutdown) so a standby takes over at once.
    pub async fn resign(&mut self) -> Result<(), FleetError> {
        if let Some(token) = self.token.take() {
            self.fleet.delete_if_created(&self.key, token).await?;
        }
        Ok(())
    }
}
