//! The etcd side of a fleet member: one session task keeps a lease alive and a live view of the
//! fleet's keys (votes, decider, decision) from one watch; the [`Fleet`] handle does the writes,
//! each bounded by a timeout, the decision always in a fenced transaction.
//!
//! Keys under `prefix` (all JSON):
//! - `members/<name>`: a member's [`Vote`], on its lease (gone `lease_ttl` after it dies);
//! - `decider`: the elected decider's [`DeciderStatus`], on its lease; the key's create
//!   revision is the leadership token every decision write is fenced by;
//! - `decision`: the routing decision (opaque bytes here), written only by a transaction that
//!   compares its expected mod revision (and, for the decider, the leadership token);
//! - `replicator/leader`: the active replicator, on its lease ([`crate::Election`]).
//!
//! After any reconnect the session reads every key at one revision before it reports `up`,
//! then watches from the next revision, so no change between the read and the watch is missed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::CoordinationConfig;
use crate::vote::{DeciderStatus, Vote};

/// Errors talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The etcd client reported an error (transport, gRPC status, lease).
    #[error("etcd: {0}")]
    Etcd(Box<etcd_client::Error>),
    /// etcd did not answer in time (no quorum, member down, network).
    #[error("etcd did not answer {what} within {timeout:?}")]
    Timeout {
        /// The operation.
        what: &'static str,
        /// The bound.
        timeout: Duration,
    },
    /// No session yet (etcd not reached since start or since the last loss).
    #[error("not connected to etcd ({0})")]
    NotConnected(String),
    /// A TLS or password file named in `[coordination]` cannot be read.
    #[error("{key}: cannot read {path}: {source}")]
    File {
        /// The config key.
        key: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A value in etcd is not what gsb writes.
    #[error("{key} in etcd is not valid: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// The parse error.
        message: String,
    },
}

impl From<etcd_client::Error> for FleetError {
    fn from(e: etcd_client::Error) -> Self {
        FleetError::Etcd(Box::new(e))
    }
}

/// A stored value with its revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The raw value.
    pub value: Vec<u8>,
    /// Revision of its last write (the CAS token).
    pub mod_revision: i64,
    /// Revision of its creation (the leadership token for the decider key).
    pub create_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

impl Stored {
    fn of(kv: &KeyValue) -> Stored {
        Stored {
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            lease: kv.lease(),
        }
    }
}

/// The fleet as this member last saw it.
#[derive(Clone, Debug, Default)]
pub struct FleetView {
    /// A session with etcd is established (lease alive, watch running).
    pub up: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// Increments at each new session: the reader re-reads everything when it changes.
    pub session: u64,
    /// This member's lease in the current session.
    pub lease: Option<i64>,
    /// The store revision this view is at.
    pub revision: i64,
    /// Every member's vote, by name (unparsable ones are logged and left out).
    pub members: BTreeMap<String, (Vote, i64)>,
    /// The decider key.
    pub decider: Option<Stored>,
    /// The decision key.
    pub decision: Option<Stored>,
    /// Other keys under the prefix (e.g. the replicator's leader), by key suffix.
    pub other: BTreeMap<String, Stored>,
}

impl FleetView {
    /// The decider's status, when a decider holds the key.
    pub fn decider_status(&self) -> Option<DeciderStatus> {
        self.decider
            .as_ref()
            .and_then(|d| serde_json::from_slice(&d.value).ok())
    }

    /// The decision revision (0: no decision written yet).
    pub fn decision_revision(&self) -> i64 {
        self.decision.as_ref().map_or(0, |d| d.mod_revision)
    }
}

/// What a decider's confirmation found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// Leadership held; the decision was written at this revision (when one was given).
    Confirmed {
        /// The new decision's revision.
        written: Option<i64>,
    },
    /// Refused by the fence: leadership lost, or the decision changed since it was read.
    Fenced {
        /// The leadership token no longer matches (another member decides now).
        lost_leadership: bool,
        /// The decider key now.
        decider: Option<Stored>,
        /// The decision now.
        decision: Option<Stored>,
    },
}

/// What a compare-and-swap of the decision found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cas {
    /// Written at this revision.
    Written(i64),
    /// The decision changed since it was read: here it is now.
    Conflict(Option<Stored>),
}

/// The key layout under a prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (e.g. `/gsb`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }
    /// Everything of this fleet.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }
    /// One member's vote.
    pub fn member(&self, name: &str) -> String {
        format!("{}/members/{name}", self.prefix)
    }
    /// The decider's leadership key.
    pub fn decider(&self) -> String {
        format!("{}/decider", self.prefix)
    }
    /// The routing decision.
    pub fn decision(&self) -> String {
        format!("{}/decision", self.prefix)
    }
    /// A key for another election (e.g. `replicator/leader`).
    pub fn other(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.prefix)
    }
}

/// A member's handle on the fleet: the live view and the writes. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    keys: Keys,
    name: String,
    client: Arc<ArcSwapOption<Client>>,
    view: watch::Receiver<FleetView>,
    timeout: Duration,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("name", &self.name)
            .field("prefix", &self.keys.prefix)
            .finish()
    }
}

/// `f`, bounded by `timeout` (an etcd without quorum may never answer).
async fn bounded<T>(
    timeout: Duration,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FleetError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(FleetError::from),
        Err(_) => Err(FleetError::Timeout { what, timeout }),
    }
}

/// Reads the connect options `[coordination]` asks for (TLS files, password file).
fn connect_options(
    c: &CoordinationConfig,
    timeout: Duration,
) -> Result<ConnectOptions, FleetError> {
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| FleetError::File {
            key,
            path: path.display().to_string(),
            source,
        })
    };
    let mut o = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(2), timeout)
        .with_keep_alive_while_idle(true);
    if c.etcd.iter().any(|e| e.starts_with("https://")) {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &c.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read("coordination.ca_file", ca)?));
        }
        if let (Some(cert), Some(key)) = (&c.cert_file, &c.key_file) {
            tls = tls.identity(Identity::from_pem(
                read("coordination.cert_file", cert)?,
                read("coordination.key_file", key)?,
            ));
        }
        o = o.with_tls(tls);
    }
    if let (Some(user), Some(path)) = (&c.user, &c.password_file) {
        let password = String::from_utf8_lossy(&read("coordination.password_file", path)?)
            .trim()
            .to_string();
        o = o.with_user(user.clone(), password);
    }
    Ok(o)
}

impl Fleet {
    /// Starts the session task for member `name` (on `tracker`) and returns the handle. Fails
    /// only on what a restart would not fix (unreadable TLS or password files); an unreachable
    /// etcd is retried with backoff while the view says `up: false`.
    pub fn start(
        config: &CoordinationConfig,
        name: String,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Fleet, FleetError> {
        // Every call is bounded well inside a lease, so a dead member is noticed in time.
        let timeout =
            (config.lease_ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(2));
        let options = connect_options(config, timeout)?;
        let (tx, view) = watch::channel(FleetView {
            error: Some("connecting".into()),
            ..FleetView::default()
        });
        let fleet = Fleet {
            keys: Keys::new(&config.prefix),
            name,
            client: Arc::new(ArcSwapOption::empty()),
            view,
            timeout,
        };
        let session = Session {
            endpoints: config.etcd.clone(),
            options,
            ttl: config.lease_ttl,
            keys: fleet.keys.clone(),
            client: fleet.client.clone(),
            view: tx,
            timeout,
        };
        tracker.spawn(session.run(shutdown));
        Ok(fleet)
    }

    /// This member's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The live view (changes at every watched event and every session change).
    pub fn view(&self) -> watch::Receiver<FleetView> {
        self.view.clone()
    }

    fn client(&self) -> Result<(Client, i64), FleetError> {
        let view = self.view.borrow();
        let lease = match (view.up, view.lease) {
            (true, Some(l)) => l,
            _ => {
                return Err(FleetError::NotConnected(
                    view.error.clone().unwrap_or_else(|| "no session".into()),
                ))
            }
        };
        drop(view);
        let client = self
            .client
            .load_full()
            .ok_or_else(|| FleetError::NotConnected("no client".into()))?;
        Ok(((*client).clone(), lease))
    }

    async fn bounded<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, FleetError> {
        bounded(self.timeout, what, f).await
    }

    /// Publishes this member's vote under its lease.
    pub async fn publish_vote(&self, vote: &Vote) -> Result<(), FleetError> {
        let (mut client, lease) = self.client()?;
        let value = serde_json::to_vec(vote).expect("a vote serializes");
        let key = self.keys.member(&self.name);
        self.bounded(
            "the vote",
            client.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok(())
    }

    /// Tries to become the decider: creates the leadership key on this member's lease if no
    /// one holds it. Returns the leadership token (the key's create revision) on a win.
    pub async fn campaign(&self, status: &DeciderStatus) -> Result<Option<i64>, FleetError> {
        let value = serde_json::to_vec(status).expect("serializes");
        self.create_leased(&self.keys.decider(), value).await
    }

    /// The decider's confirmation: in one transaction fenced by the leadership token `leader`
    /// (and, when `write` is given, by the decision's expected mod revision), refreshes the
    /// leadership key and writes the new decision. Refused writes say why.
    pub async fn confirm(
        &self,
        leader: i64,
        status: &DeciderStatus,
        write: Option<(i64, Vec<u8>)>,
    ) -> Result<Confirm, FleetError> {
        let (mut client, lease) = self.client()?;
        let (dkey, skey) = (self.keys.decider(), self.keys.decision());
        let mut when = vec![Compare::create_revision(
            dkey.clone(),
            CompareOp::Equal,
            leader,
        )];
        let mut ops = vec![TxnOp::put(
            dkey.clone(),
            serde_json::to_vec(status).expect("serializes"),
            Some(PutOptions::new().with_lease(lease)),
        )];
        let writing = write.is_some();
        if let Some((expected, value)) = write {
            when.push(Compare::mod_revision(
                skey.clone(),
                CompareOp::Equal,
                expected,
            ));
            ops.push(TxnOp::put(skey.clone(), value, None));
        }
        let txn = Txn::new()
            .when(when)
            .and_then(ops)
            .or_else([TxnOp::get(dkey, None), TxnOp::get(skey, None)]);
        let resp = self
            .bounded("the decider's confirmation", client.txn(txn))
            .await?;
        if resp.succeeded() {
            let rev = resp.header().map_or(0, |h| h.revision());
            return Ok(Confirm::Confirmed {
                written: writing.then_some(rev),
            });
        }
        let mut got = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(Stored::of),
            _ => None,
        });
        let decider = got.next().flatten();
        let decision = got.next().flatten();
        Ok(Confirm::Fenced {
            lost_leadership: decider.as_ref().map(|d| d.create_revision) != Some(leader),
            decider,
            decision,
        })
    }

    /// Writes the decision if it is still at `expected` (0: not written yet). Used for
    /// operators' commands, which any member may carry out.
    pub async fn cas_decision(&self, expected: i64, value: Vec<u8>) -> Result<Cas, FleetError> {
        let (mut client, _) = self.client()?;
        let key = self.keys.decision();
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.bounded("the decision write", client.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Cas::Written(resp.header().map_or(0, |h| h.revision())));
        }
        let now = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(Stored::of),
            _ => None,
        });
        Ok(Cas::Conflict(now))
    }

    /// Gives leadership up (at shutdown) so another member takes over at once rather than
    /// after the lease; only deletes the key if `leader` still holds it.
    pub async fn resign(&self, leader: i64) -> Result<(), FleetError> {
        self.delete_if_created(&self.keys.decider(), leader).await
    }

    /// The election of another role (e.g. the replicator's) on `suffix`, on this member's lease.
    pub fn election(&self, suffix: &str) -> crate::Election {
        crate::Election::new(self.clone(), self.keys.other(suffix))
    }

    /// Creates `key` on this member's lease if it does not exist; its create revision is the
    /// token of whoever made it.
    pub(crate) async fn create_leased(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> Result<Option<i64>, FleetError> {
        let (mut client, lease) = self.client()?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = self.bounded("the election", client.txn(txn)).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// Deletes `key` only if it is still the one created at revision `token`.
    pub(crate) async fn delete_if_created(&self, key: &str, token: i64) -> Result<(), FleetError> {
        let (mut client, _) = self.client()?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, token)])
            .and_then([TxnOp::delete(key, None)]);
        self.bounded("the resignation", client.txn(txn)).await?;
        Ok(())
    }
}

/// The session task's state.
struct Session {
    endpoints: Vec<String>,
    options: ConnectOptions,
    ttl: Duration,
    keys: Keys,
    client: Arc<ArcSwapOption<Client>>,
    view: watch::Sender<FleetView>,
    timeout: Duration,
}

impl Session {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0usize;
        let mut was_up = false;
        let mut previous_lease = None;
        loop {
            // One endpoint per attempt, in turn: a dead or partitioned member is left for the
            // next at the first failure.
            let endpoint = self.endpoints[attempt % self.endpoints.len()].clone();
            attempt += 1;
            let started = Instant::now();
            let result = self
                .session(&endpoint, &shutdown, &mut was_up, &mut previous_lease)
                .await;
            if shutdown.is_cancelled() {
                break;
            }
            let why = match result {
                Ok(()) => "session ended".to_string(),
                Err(e) => e.to_string(),
            };
            self.client.store(None);
            self.view.send_modify(|v| {
                v.up = false;
                v.lease = None;
                v.error = Some(format!("{endpoint}: {why}"));
            });
            if was_up {
                warn!(endpoint = %endpoint, error = %why, "etcd session lost; reconnecting");
                was_up = false;
            } else {
                debug!(endpoint = %endpoint, error = %why, "etcd not reachable");
            }
            if started.elapsed() > self.ttl {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        self.view.send_modify(|v| {
            v.up = false;
            v.error = Some("stopped".into());
        });
    }

    async fn bounded<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, FleetError> {
        bounded(self.timeout, what, f).await
    }

    /// One session: connect, lease, read everything, watch until something breaks.
    async fn session(
        &self,
        endpoint: &str,
        shutdown: &CancellationToken,
        was_up: &mut bool,
        previous_lease: &mut Option<i64>,
    ) -> Result<(), FleetError> {
        let mut client = self
            .bounded(
                "the connection",
                Client::connect([endpoint], Some(self.options.clone())),
            )
            .await?;
        let ttl_secs = self.ttl.as_secs().max(1) as i64;
        let lease = self
            .bounded("the lease grant", client.lease_grant(ttl_secs, None))
            .await?
            .id();
        // A session is a lease: what the last one held (vote, leadership, an election) is given
        // up now rather than left to expire, so no holder outlives its session.
        if let Some(old) = previous_lease.replace(lease) {
            let _ = tokio::time::timeout(self.timeout, client.lease_revoke(old)).await;
        }
        let (mut keeper, mut acks) = self
            .bounded("the lease keep-alive", client.lease_keep_alive(lease))
            .await?;
        let all = self.keys.all();
        let snapshot = self
            .bounded(
                "the read of the fleet's keys",
                client.get(all.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = snapshot.header().map_or(0, |h| h.revision());
        let (_watcher, mut events) = self
            .bounded(
                "the watch",
                client.watch(
                    all,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                ),
            )
            .await?;
        self.client.store(Some(Arc::new(client.clone())));
        self.view.send_modify(|v| {
            v.up = true;
            v.error = None;
            v.session += 1;
            v.lease = Some(lease);
            v.revision = revision;
            v.members.clear();
            v.decider = None;
            v.decision = None;
            v.other.clear();
            for kv in snapshot.kvs() {
                self.apply(v, kv, false);
            }
        });
        info!(endpoint, lease, revision, "etcd session established");
        *was_up = true;
        let period = self.ttl / 3;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ack = Instant::now();
        let mut last_tick = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Leaving: the lease goes now, not `lease_ttl` later.
                    let _ = tokio::time::timeout(self.timeout, client.lease_revoke(lease)).await;
                    return Ok(());
                }
                _ = tick.tick() => {
                    // Unanswered keep-alives for a whole lease mean etcd is gone, unless this
                    // process itself did not run (paused, starved): then ask once more and let
                    // etcd's answer say whether the lease survived.
                    let away = last_tick.elapsed() > period * 2;
                    last_tick = Instant::now();
                    if last_ack.elapsed() >= self.ttl && !away {
                        return Err(FleetError::Timeout { what: "the lease keep-alive", timeout: self.ttl });
                    }
                    keeper.keep_alive().await?;
                }
                ack = acks.message() => match ack? {
                    Some(a) if a.ttl() > 0 => last_ack = Instant::now(),
                    Some(_) => return Err(FleetError::NotConnected("the lease expired".into())),
                    None => return Err(FleetError::NotConnected("the keep-alive stream ended".into())),
                },
                msg = events.message() => {
                    let Some(resp) = msg? else {
                        return Err(FleetError::NotConnected("the watch ended".into()));
                    };
                    if resp.canceled() {
                        return Err(FleetError::NotConnected(format!(
                            "the watch was cancelled: {} (compacted at {})",
                            resp.cancel_reason(), resp.compact_revision())));
                    }
                    let rev = resp.header().map_or(0, |h| h.revision());
                    self.view.send_modify(|v| {
                        for e in resp.events() {
                            if let Some(kv) = e.kv() {
                                self.apply(v, kv, e.event_type() == EventType::Delete);
                            }
                        }
                        v.revision = v.revision.max(rev);
                    });
                }
            }
        }
    }

    /// Applies one key's value (or deletion) to the view.
    fn apply(&self, v: &mut FleetView, kv: &KeyValue, deleted: bool) {
        let Ok(key) = kv.key_str() else { return };
        let Some(rest) = key.strip_prefix(&self.keys.all()) else {
            return;
        };
        if let Some(name) = rest.strip_prefix("members/") {
            if deleted {
                v.members.remove(name);
                return;
            }
            match serde_json::from_slice::<Vote>(kv.value()) {
                Ok(vote) => {
                    v.members
                        .insert(name.to_string(), (vote, kv.mod_revision()));
                }
                Err(e) => warn!(key, error = %e, "ignoring an unreadable vote"),
            }
            return;
        }
        let slot = match rest {
            "decider" => &mut v.decider,
            "decision" => &mut v.decision,
            other => {
                if deleted {
                    v.other.remove(other);
                } else {
                    v.other.insert(other.to_string(), Stored::of(kv));
                }
                return;
            }
        };
        *slot = if deleted { None } else { Some(Stored::of(kv)) };
    }
}
