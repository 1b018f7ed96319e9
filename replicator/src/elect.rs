//! Electing the one active replicator of a site pair: with `[coordination]` a leased key in the
//! fleet's etcd (the holder keeps it while its session lives, a standby takes it `lease_ttl`
//! after the holder is gone, whichever database is down); without it an advisory lock on the
//! primary, for single-machine setups. Either way the apply's own position check (cursor or
//! replication origin, committed with the changes) stays the last fence against two appliers.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::{connect, Conn, Site};
use crate::{Config, Error};

/// Advisory lock key electing the one active replicator per site pair (on the primary).
const LEADER_LOCK: i64 = 0x6773_625f_6c65_6164; // "gsb_lead"
/// How often the standby retries and the leader checks that it still holds the role.
const POLL: Duration = Duration::from_secs(1);
/// The etcd key (under the fleet's prefix) of the active replicator.
const ETCD_KEY: &str = "replicator/leader";

/// What this replicator holds while active.
pub(crate) enum Held {
    /// The advisory lock's session.
    Lock(Conn),
    /// The etcd key, on this process's lease.
    Etcd,
}

/// The election, for the life of the process.
pub(crate) struct Elector {
    etcd: Option<(gsb_fleet::Election, String)>,
}

impl Elector {
    /// An election on etcd with `[coordination]`, else on the advisory lock.
    pub(crate) fn new(
        config: &Config,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Elector, Error> {
        let Some(c) = &config.coordination else {
            return Ok(Elector { etcd: None });
        };
        let me = format!("{}-replicator-{}", c.member_name(), std::process::id());
        let fleet = gsb_fleet::Fleet::start(c, me.clone(), tracker, shutdown.clone())
            .map_err(|e| Error::Protocol(format!("coordination: {e}")))?;
        tracing::info!(holder = %me, endpoints = ?c.etcd, "replicator election on etcd");
        Ok(Elector {
            etcd: Some((fleet.election(ETCD_KEY), me)),
        })
    }

    /// Waits until this replicator holds the role; `None` at shutdown.
    pub(crate) async fn acquire(
        &mut self,
        config: &Config,
        shutdown: &CancellationToken,
    ) -> Result<Option<Held>, Error> {
        let mut announced = false;
        let lock = match &self.etcd {
            Some(_) => None,
            None => Some(connect(&config.link(Site::Primary)?).await?),
        };
        loop {
            let got = match (&mut self.etcd, &lock) {
                (Some((election, me)), _) => match election.campaign(me).await {
                    Ok(got) => got,
                    Err(e) => {
                        tracing::debug!(error = %e, "etcd election not reachable");
                        false
                    }
                },
                (None, Some(lock)) => lock
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                    .await
                    .map_err(|e| Error::db("primary", "taking the leader lock", e))?
                    .get(0),
                (None, None) => unreachable!("a lock session without etcd"),
            };
            if got {
                return Ok(Some(match lock {
                    Some(conn) => Held::Lock(conn),
                    None => Held::Etcd,
                }));
            }
            if !announced {
                let holder = self.etcd.as_ref().and_then(|(e, _)| e.holder());
                tracing::info!(holder = ?holder, "another replicator is active; waiting as standby");
                announced = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Returns when shutdown is requested (false) or the role is lost (true).
    pub(crate) async fn hold(&self, held: &Held, shutdown: &CancellationToken) -> bool {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(POLL) => {}
            }
            let alive = match (held, &self.etcd) {
                (Held::Lock(lock), _) => matches!(
                    tokio::time::timeout(POLL * 5, lock.simple_query("SELECT 1")).await,
                    Ok(Ok(_))
                ),
                // Without a live session the lease may be gone: stop applying at once.
                (Held::Etcd, Some((election, _))) => election.is_leader(),
                (Held::Etcd, None) => false,
            };
            if !alive {
                return true;
            }
        }
    }

    /// Gives the role up at shutdown so the standby takes over at once.
    pub(crate) async fn release(&mut self) {
        if let Some((election, _)) = &mut self.etcd {
            if let Err(e) = election.resign().await {
                tracing::warn!(error = %e, "could not resign the replicator role; the standby takes over after lease_ttl");
            }
        }
    }
}
