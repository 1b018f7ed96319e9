//! The control task: the one writer of the route. It probes both sites, runs the routing state
//! machine, publishes [`RouteSnapshot`]s, keeps the health metrics, the timeline and the status
//! view, polls the replicator's backlog, and persists forced states across restarts.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use gsb_health::{ProbeKind, ProbeSpec, Prober, SiteHealth, SiteReport, Verdict};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::config::{parse_status_range, Config};
use crate::gate::Backlog;
use crate::maintenance::Schedule;
use crate::metrics::ProxyMetrics;
use crate::passive::PassiveHealth;
use crate::route::{RouteSnapshot, Router, Site};
use crate::routing::{self, Action, AdminCommand, Event, Forced, Policy, RoutingState};

mod fleet;
pub use fleet::{Decision, FleetStatus, MemberView};

/// Moves kept in the timeline (older ones are dropped; the counter metric keeps the totals).
const TIMELINE_LEN: usize = 200;
/// Largest replicator `/status` body read.
const MAX_STATUS_BODY: usize = 1024 * 1024;

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The state file exists but cannot be read; starting anyway could silently move traffic.
    #[error("cannot read the state file {path}: {source}")]
    StateRead {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state file is not what this proxy writes; fix or delete it (after checking the route).
    #[error("state file {path} is corrupt ({message}); check the route, then delete or fix it")]
    StateCorrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        message: String,
    },
    /// Writing the state file failed: the forced state would not survive a restart.
    #[error("cannot write the state file {path}: {source}")]
    StateWrite {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config could not be turned into probes or windows.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A site's `ca_file` cannot be used for the probes.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The control task has stopped (shutdown).
    #[error("the control task has stopped")]
    Stopped,
    /// Fleet mode: the fleet's decision could not be changed (etcd unreachable, a race).
    #[error("{0}")]
    Coordination(String),
}

/// What is persisted in `failover.state_file`.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    forced: Forced,
    /// The active site when written (informational; `forced` decides).
    active: Site,
    written_at: DateTime<Utc>,
}

/// One move of the active site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Previous active site.
    pub from: Site,
    /// New active site.
    pub to: Site,
    /// Reason label (`primary_down`, `manual`, ...).
    pub reason: String,
    /// Detail: operator text or health evidence.
    pub detail: String,
}

/// One component in the status view.
#[derive(Clone, Debug, Serialize)]
pub struct ComponentView {
    /// Name from the config.
    pub name: String,
    /// Counts towards `down`.
    pub critical: bool,
    /// Up after rise/fall; `null` before the first probe.
    pub up: Option<bool>,
    /// Since when in this state.
    pub since: Option<DateTime<Utc>>,
    /// The last probe's result.
    pub last: String,
}

/// One site in the status view.
#[derive(Clone, Debug, Serialize)]
pub struct SiteView {
    /// `primary` or `backup`.
    pub site: Site,
    /// Base URL probed and forwarded to.
    pub url: String,
    /// `healthy`, `degraded`, `down`, or `null` before the first probe.
    pub verdict: Option<Verdict>,
    /// A partial failure an operator should look at.
    pub degraded_alert: bool,
    /// False when no probe could connect.
    pub reachable: bool,
    /// Components down and for how long.
    pub evidence: String,
    /// Every component.
    pub components: Vec<ComponentView>,
}

/// The replication gate in the status view.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicationView {
    /// The replicator status URL.
    pub url: String,
    /// The replicator answering is the active one (`null`: no answer).
    pub replicator_active: Option<bool>,
    /// Rows waiting to go backup -> primary, as an active replicator counted them (`null`:
    /// unknown or not trusted).
    pub backup_to_primary_pending: Option<u64>,
    /// What the gate concluded, in words (drained, N pending, or why it is unknown).
    pub gate: String,
    /// Every direction the replicator reported, as it reported it.
    pub directions: serde_json::Value,
    /// Failback is waiting for the backlog.
    pub failback_blocked: bool,
    /// The last poll's error, if it failed.
    pub error: Option<String>,
}

/// The whole state, as `GET /status` returns it.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The site serving new requests.
    pub active: Site,
    /// `Primary` / `Backup`, as detectbackup says it.
    pub active_title: &'static str,
    /// Since when.
    pub since: DateTime<Utc>,
    /// Why.
    pub reason: String,
    /// Operator hold: `none`, `operator`, `manual_failback_pending`.
    pub forced: &'static str,
    /// The operator's reason when forced.
    pub forced_reason: Option<String>,
    /// Neither site answers.
    pub none_available: bool,
    /// A maintenance window is running.
    pub maintenance_active: bool,
    /// Next maintenance start or end.
    pub maintenance_next: Option<DateTime<Utc>>,
    /// `[primary, backup]`.
    pub sites: Vec<SiteView>,
    /// Failback's replication gate, when configured.
    pub replication: Option<ReplicationView>,
    /// Moves, newest last.
    pub timeline: Vec<TimelineEntry>,
    /// Route generation (increments at every move).
    pub generation: u64,
    /// `auto` or `manual`.
    pub failback_mode: &'static str,
    /// The last config reload (SIGHUP), `null` when none since start.
    pub config_reload: Option<ReloadView>,
    /// This proxy can serve its users (`GET /healthz` answers 503 when not).
    pub ready: bool,
    /// Why not.
    pub unready_reason: Option<String>,
    /// The fleet (`[coordination]` set): members, votes, the decider, who follows.
    pub fleet: Option<FleetStatus>,
}

type Reply = oneshot::Sender<Result<Arc<Status>, ControlError>>;

/// What the control task is asked to do.
#[derive(Debug)]
enum Msg {
    /// An operator's command.
    Admin(AdminCommand, Reply),
    /// A config reload: the new settings (`None` when the new file was refused) and the outcome
    /// shown in the status.
    Reload(Option<Box<ControlConfig>>, ReloadView, Reply),
}

/// The outcome of the last config reload, as the status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadView {
    /// When the reload was asked for (SIGHUP).
    pub at: DateTime<Utc>,
    /// The new config was applied.
    pub ok: bool,
    /// What changed, or why the new config was refused (naming the key).
    pub message: String,
    /// Changed settings that only a restart applies (listener addresses...).
    pub needs_restart: Vec<String>,
}

/// Admin commands and the status view; cheap to clone.
#[derive(Clone, Debug)]
pub struct ControlHandle {
    commands: mpsc::Sender<Msg>,
    status: Arc<ArcSwap<Status>>,
}

impl ControlHandle {
    /// Applies an operator command; returns the status after it.
    pub async fn command(&self, cmd: AdminCommand) -> Result<Arc<Status>, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Msg::Admin(cmd, tx))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Hands a reload's outcome to the control task: `new` settings are applied (probes,
    /// thresholds, sites, failover policy, maintenance, replicator gate) keeping what is known
    /// about unchanged components; `view` is shown in the status either way.
    pub async fn reload(
        &self,
        new: Option<ControlConfig>,
        view: ReloadView,
    ) -> Result<Arc<Status>, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Msg::Reload(new.map(Box::new), view, tx))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// The latest status view (no await, no lock).
    pub fn status(&self) -> Arc<Status> {
        self.status.load_full()
    }
}

/// The control task's settings from one config, validated (built) before anything is swapped.
#[derive(Debug)]
pub struct ControlConfig {
    policy: Policy,
    specs: Vec<ProbeSpec>,
    rise: u32,
    fall: u32,
    timeout: Duration,
    interval: Duration,
    urls: [String; 2],
    /// Each site's trust inputs (to know when a reload must rebuild its prober).
    trust: [crate::config::TrustKey; 2],
    /// Each site's TLS client config for its probes.
    tls: [rustls::ClientConfig; 2],
    schedule: Schedule,
    replicator_status: Option<String>,
    state_file: Option<PathBuf>,
    failback_mode: &'static str,
}

impl ControlConfig {
    /// Builds the probes, windows and policy of `config`; an error names the key.
    pub fn from_config(config: &Config) -> Result<ControlConfig, ControlError> {
        let h = &config.health;
        Ok(ControlConfig {
            policy: Policy::from_config(&config.failover),
            specs: probe_specs(config)?,
            rise: h.rise,
            fall: h.fall,
            timeout: h.timeout,
            interval: h.interval,
            urls: [
                config.sites.primary.url.clone(),
                config.sites.backup.url.clone(),
            ],
            trust: [
                config.sites.primary.trust_key(),
                config.sites.backup.trust_key(),
            ],
            tls: [
                config.sites.primary.client_tls("sites.primary")?,
                config.sites.backup.client_tls("sites.backup")?,
            ],
            schedule: Schedule::from_config(&config.maintenance)?,
            replicator_status: config.failover.replicator_status.clone(),
            state_file: config.failover.state_file.clone(),
            failback_mode: match config.failover.failback {
                crate::config::FailbackMode::Auto => "auto",
                crate::config::FailbackMode::Manual => "manual",
            },
        })
    }
}

/// The client that polls the replicator, bounded like a probe.
fn replicator_poll(url: String, timeout: Duration) -> ReplicatorPoll {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout));
    ReplicatorPoll {
        url,
        client: Client::builder(TokioExecutor::new()).build(connector),
        // Same bound as a probe: a hung replicator must not slow down failure detection.
        timeout,
        directions: serde_json::Value::Null,
        active: None,
        error: None,
    }
}

/// The control task's own state.
struct Control {
    policy: Policy,
    state: RoutingState,
    health: [SiteHealth; 2],
    specs: Vec<ProbeSpec>,
    urls: [String; 2],
    /// Each site's trust inputs (url, ca_file, CA content), as its prober was built with.
    trust: [crate::config::TrustKey; 2],
    /// One prober per site: each trusts its own site's CA.
    probers: [Prober; 2],
    router: Arc<Router>,
    passive: Arc<PassiveHealth>,
    metrics: ProxyMetrics,
    schedule: Schedule,
    state_file: Option<PathBuf>,
    timeline: VecDeque<TimelineEntry>,
    active_since: DateTime<Utc>,
    replicator: Option<ReplicatorPoll>,
    status: Arc<ArcSwap<Status>>,
    interval: Duration,
    failback_mode: &'static str,
    /// The last config reload (status).
    last_reload: Option<ReloadView>,
    /// Fleet mode (`[coordination]`): votes, the decider, the decision in etcd.
    fleet: Option<fleet::FleetLink>,
    /// This proxy's own verdicts `[primary, backup]` (its vote; in fleet mode the state machine
    /// may be fed the fleet's instead).
    local_verdicts: [Option<Verdict>; 2],
    /// The replicator's latest backlog reading, for this round's step.
    backlog_reading: Option<Backlog>,
    /// Readiness and why not.
    ready: (bool, Option<String>),
}

/// Polls the replicator's `/status`.
struct ReplicatorPoll {
    url: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    directions: serde_json::Value,
    /// The last answer's `active` (`None`: no answer or no such field).
    active: Option<bool>,
    /// Why the last answer is not trusted.
    error: Option<String>,
}

impl ReplicatorPoll {
    /// Asks the replicator; anything but an active replicator's count is `Unknown` (see
    /// [`crate::gate`]).
    async fn poll(&mut self) -> Backlog {
        let backlog = match tokio::time::timeout(self.timeout, self.fetch()).await {
            Ok(Ok(v)) => {
                self.directions = v.get("directions").cloned().unwrap_or_default();
                self.active = v.get("active").and_then(|a| a.as_bool());
                crate::gate::parse_status(&v)
            }
            Ok(Err(e)) => {
                self.active = None;
                Backlog::Unknown(format!("the replicator did not answer: {e}"))
            }
            Err(_) => {
                self.active = None;
                Backlog::Unknown(format!(
                    "the replicator did not answer within {:?}",
                    self.timeout
                ))
            }
        };
        self.error = match &backlog {
            Backlog::Pending(_) => None,
            Backlog::Unknown(why) => Some(why.clone()),
        };
        backlog
    }

    async fn fetch(&self) -> Result<serde_json::Value, String> {
        let uri: http::Uri = self.url.parse().map_err(|e| format!("{e}"))?;
        let req = http::Request::get(uri)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_STATUS_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("status {status}"));
        }
        serde_json::from_slice(&body.to_bytes()).map_err(|e| format!("bad JSON: {e}"))
    }
}

/// Loads the state file, publishes the initial route, and spawns the control task on `tracker`.
///
/// With `fleet` (fleet mode) it first waits, at most `lease_ttl`, for etcd and routes on the
/// fleet's current decision before it returns, so the proxy never serves a stale route after a
/// restart; without etcd it starts on the state file's cached decision and holds it.
pub async fn start(
    config: &Config,
    router: Arc<Router>,
    passive: Arc<PassiveHealth>,
    metrics: ProxyMetrics,
    fleet: Option<gsb_fleet::Fleet>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<ControlHandle, ControlError> {
    let cc = ControlConfig::from_config(config)?;
    let forced = match &cc.state_file {
        Some(path) => load_state(path)?,
        None => Forced::None,
    };
    if forced != Forced::None {
        warn!(forced = forced.as_str(), site = ?forced.site(), "forced state restored from the state file");
    }
    let state = RoutingState::new(forced);
    let current = router.load();
    let generation = if current.active == state.active {
        current.generation
    } else {
        current.generation + 1
    };
    router.publish(RouteSnapshot {
        active: state.active,
        usable: [true, true],
        none_available: false,
        generation,
    });
    let mut control = Control {
        health: [
            SiteHealth::new(&cc.specs, cc.rise, cc.fall),
            SiteHealth::new(&cc.specs, cc.rise, cc.fall),
        ],
        state,
        replicator: cc
            .replicator_status
            .clone()
            .map(|url| replicator_poll(url, cc.timeout)),
        probers: cc.tls.map(|tls| Prober::with_tls(cc.timeout, tls)),
        trust: cc.trust,
        router,
        passive,
        metrics,
        timeline: VecDeque::new(),
        active_since: Utc::now(),
        status: Arc::new(ArcSwap::from_pointee(placeholder_status())),
        policy: cc.policy,
        specs: cc.specs,
        urls: cc.urls,
        schedule: cc.schedule,
        state_file: cc.state_file,
        interval: cc.interval,
        failback_mode: cc.failback_mode,
        last_reload: None,
        fleet: None,
        local_verdicts: [None, None],
        backlog_reading: None,
        ready: (true, None),
    };
    if let (Some(fleet), Some(coordination)) = (fleet, &config.coordination) {
        let fleet_metrics = control
            .metrics
            .fleet
            .clone()
            .expect("fleet metrics are registered with [coordination]");
        let mut link = fleet::FleetLink::new(
            fleet,
            coordination.clone(),
            fleet_metrics,
            tracker,
            shutdown.clone(),
        );
        let up = link.wait_for_session().await;
        control.fleet = Some(link);
        if up {
            control.on_fleet_change().await;
        } else {
            // Hold what the fleet last decided, as cached beside the config.
            if let Some(active) = control.state_file.as_deref().and_then(cached_active) {
                control.state.active = active;
                control.publish();
            }
            warn!(waited = ?coordination.lease_ttl, active = %control.state.active,
                "etcd not reachable at start: serving the route cached in the state file and holding it until the fleet is reachable");
        }
    }
    control.update_metrics();
    control.refresh_status(Instant::now());
    let (tx, rx) = mpsc::channel(16);
    let handle = ControlHandle {
        commands: tx,
        status: control.status.clone(),
    };
    tracker.spawn(
        control
            .run(rx, shutdown)
            .instrument(tracing::info_span!("control")),
    );
    Ok(handle)
}

fn placeholder_status() -> Status {
    Status {
        active: Site::Primary,
        active_title: Site::Primary.title(),
        since: Utc::now(),
        reason: String::new(),
        forced: "none",
        forced_reason: None,
        none_available: false,
        maintenance_active: false,
        maintenance_next: None,
        sites: vec![],
        replication: None,
        timeline: vec![],
        generation: 0,
        failback_mode: "auto",
        config_reload: None,
        ready: true,
        unready_reason: None,
        fleet: None,
    }
}

/// The probes of the `[health]` section.
fn probe_specs(config: &Config) -> Result<Vec<ProbeSpec>, ControlError> {
    config
        .health
        .components
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let kind = match (&c.path, &c.tcp) {
                (_, Some(addr)) => ProbeKind::Tcp { addr: addr.clone() },
                (Some(path), None) => {
                    let range = c.expect_status.as_deref().unwrap_or("200-399");
                    let expect_status = parse_status_range(range).ok_or_else(|| {
                        crate::config::ConfigError::Invalid {
                            key: format!("health.components[{i}].expect_status"),
                            message: format!(
                                "expected a status or range like \"200-399\", got {range:?}"
                            ),
                        }
                    })?;
                    ProbeKind::Http {
                        path: path.clone(),
                        expect_status,
                        body_contains: c.body_contains.clone(),
                    }
                }
                (None, None) => {
                    return Err(crate::config::ConfigError::Invalid {
                        key: format!("health.components[{i}]"),
                        message: "set `path` or `tcp`".into(),
                    }
                    .into())
                }
            };
            Ok(ProbeSpec {
                name: c.name.clone(),
                critical: c.critical,
                kind,
            })
        })
        .collect()
}

/// The active site the state file recorded (fleet mode caches the last decision there).
fn cached_active(path: &Path) -> Option<Site> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str::<StateFile>(&text)
        .ok()
        .map(|s| s.active)
}

/// Reads the forced state; a missing file means none.
fn load_state(path: &Path) -> Result<Forced, ControlError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<StateFile>(&text)
            .map(|s| s.forced)
            .map_err(|e| ControlError::StateCorrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Forced::None),
        Err(source) => Err(ControlError::StateRead {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes the state file atomically (temp file in the same directory, fsync, rename).
fn save_state(path: &Path, forced: &Forced, active: Site) -> Result<(), ControlError> {
    use std::io::Write;
    let err = |source| ControlError::StateWrite {
        path: path.to_path_buf(),
        source,
    };
    let body = serde_json::to_vec_pretty(&StateFile {
        forced: forced.clone(),
        active,
        written_at: Utc::now(),
    })
    .map_err(|e| err(std::io::Error::other(e)))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&body).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Wall-clock time of an `Instant` in the past.
fn wall(now: Instant, then: Instant) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::from_std(now.saturating_duration_since(then)).unwrap_or_default()
}

impl Control {
    async fn run(mut self, mut commands: mpsc::Receiver<Msg>, shutdown: CancellationToken) {
        info!(
            primary = %self.urls[0],
            backup = %self.urls[1],
            active = %self.state.active,
            interval = ?self.interval,
            "health checker started"
        );
        let mut next_round = tokio::time::Instant::now();
        let mut last_round = tokio::time::Instant::now() - self.interval;
        loop {
            let fleet_mode = self.fleet.is_some();
            tokio::select! {
                // In this order: a round that is due runs before a fleet notification is read,
                // so a decider back from a pause confirms (and is fenced) before anything else.
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next_round) => {
                    self.round("scheduled").await;
                    last_round = tokio::time::Instant::now();
                    next_round = last_round + self.interval;
                }
                // Live traffic saw failures: probe now instead of at the next interval, but not
                // more often than four times an interval.
                _ = self.passive.woken(), if last_round.elapsed() >= self.interval / 4 => {
                    let failures = Site::ALL.map(|s| self.passive.take_connect_failures(s));
                    info!(connect_failures_primary = failures[0], connect_failures_backup = failures[1],
                        "early probe round: live traffic reported failures");
                    self.round("passive").await;
                    last_round = tokio::time::Instant::now();
                    next_round = last_round + self.interval;
                }
                Some(msg) = commands.recv() => match msg {
                    Msg::Admin(cmd, reply) => {
                        info!(command = ?cmd, "admin command");
                        let outcome = if fleet_mode {
                            self.fleet_command(cmd).await.map_err(ControlError::Coordination)
                        } else {
                            self.apply(Event::Admin(cmd), Instant::now());
                            Ok(())
                        };
                        self.refresh_status(Instant::now());
                        let _ = reply.send(outcome.map(|()| self.status.load_full()));
                    }
                    Msg::Reload(new, view, reply) => {
                        if let Some(new) = new {
                            self.reconfigure(*new);
                        }
                        self.last_reload = Some(view);
                        // Re-evaluates the rules under the new policy (and refreshes the status).
                        if self.fleet.is_none() {
                            self.apply(Event::Tick, Instant::now());
                        }
                        self.refresh_status(Instant::now());
                        let _ = reply.send(Ok(self.status.load_full()));
                    }
                },
                _ = async { self.fleet.as_mut().expect("fleet mode").changed().await }, if fleet_mode => {
                    self.on_fleet_change().await;
                    self.refresh_status(Instant::now());
                }
            }
        }
        self.fleet_shutdown().await;
        info!("health checker stopped");
    }

    /// Applies reloaded settings. Components whose probe did not change keep their state, so a
    /// reload alone never changes a verdict; a site whose URL changed starts unprobed (it is
    /// another server).
    fn reconfigure(&mut self, new: ControlConfig) {
        for site in Site::ALL {
            let i = site.index();
            if self.urls[i] != new.urls[i] {
                info!(site = %site, old = %self.urls[i], new = %new.urls[i], "reload: site URL changed; its health starts over");
                self.health[i] = SiteHealth::new(&new.specs, new.rise, new.fall);
            } else {
                self.health[i].reconfigure(&self.specs, &new.specs, new.rise, new.fall);
            }
        }
        for (i, tls) in new.tls.into_iter().enumerate() {
            if new.timeout != self.probers[i].timeout() || self.trust[i] != new.trust[i] {
                self.probers[i] = Prober::with_tls(new.timeout, tls);
            }
        }
        self.trust = new.trust;
        let replicator_changed = self.replicator.as_ref().map(|r| &r.url)
            != new.replicator_status.as_ref()
            || self
                .replicator
                .as_ref()
                .is_some_and(|r| r.timeout != new.timeout);
        if replicator_changed {
            self.replicator = new
                .replicator_status
                .clone()
                .map(|url| replicator_poll(url, new.timeout));
        }
        self.policy = new.policy;
        self.specs = new.specs;
        self.urls = new.urls;
        self.schedule = new.schedule;
        self.state_file = new.state_file;
        self.interval = new.interval;
        self.failback_mode = new.failback_mode;
    }

    /// One probe round of both sites (concurrently, each bounded by the probe timeout), plus
    /// the replicator poll and the maintenance schedule, then the state machine.
    async fn round(&mut self, trigger: &'static str) {
        if self.fleet.is_some() {
            self.confirm_after_absence().await;
        }
        let started = Instant::now();
        let replicator = self.replicator.as_mut();
        let (primary, backup, backlog) = tokio::join!(
            self.probers[0].probe_site(&self.urls[0], &self.specs),
            self.probers[1].probe_site(&self.urls[1], &self.specs),
            async {
                match replicator {
                    Some(r) => Some(r.poll().await),
                    None => None,
                }
            }
        );
        self.metrics
            .probe_round
            .observe(started.elapsed().as_secs_f64());
        let now = Instant::now();
        for (site, outcomes) in Site::ALL.into_iter().zip([primary, backup]) {
            let before = self.health[site.index()].verdict();
            let changed = self.health[site.index()].observe(&outcomes, now);
            for (spec, o) in self.specs.iter().zip(&outcomes) {
                self.metrics
                    .probe_duration
                    .with_label_values(&[site.as_str(), &spec.name])
                    .observe(o.duration.as_secs_f64());
            }
            let report = self.health[site.index()].report();
            for c in &report.components {
                if let Some(up) = c.up {
                    self.metrics
                        .component_up
                        .with_label_values(&[site.as_str(), &c.name])
                        .set(up as i64);
                }
            }
            let after = report.verdict;
            if before != after {
                let evidence = report.evidence(now);
                match after {
                    Some(Verdict::Healthy) => {
                        info!(site = %site, verdict = "healthy", was = ?before.map(|v| v.as_str()), trigger, %evidence, "site verdict changed")
                    }
                    _ => {
                        warn!(site = %site, verdict = ?after.map(|v| v.as_str()), was = ?before.map(|v| v.as_str()), trigger, %evidence, changed = ?changed, "site verdict changed")
                    }
                }
            }
        }
        let verdicts = [self.health[0].verdict(), self.health[1].verdict()];
        self.local_verdicts = verdicts;
        self.backlog_reading = backlog;
        match self.fleet.as_ref().map(|f| f.following()) {
            Some(true) => {
                if let Some(b) = self.backlog_reading.clone() {
                    // Followers show the gate; only the decider steps on it.
                    self.state.backlog = b;
                }
                self.fleet_round(verdicts, now).await;
                self.refresh_status(now);
            }
            Some(false) => self.fleet_round(verdicts, now).await,
            None => {
                self.apply(Event::Verdicts(verdicts), now);
                self.round_inputs(now);
            }
        }
    }

    /// The round's other inputs to the state machine: the replicator's backlog, the
    /// maintenance schedule, the passing of time.
    fn round_inputs(&mut self, now: Instant) {
        if let Some(backlog) = self.backlog_reading.take() {
            if backlog != self.state.backlog {
                self.apply(Event::Backlog(backlog), now);
            }
        }
        // (Also when a reload removed every window while one was running: it ends.)
        {
            let on = !self.schedule.is_empty() && self.schedule.is_active(Utc::now());
            if on != self.state.maintenance {
                info!(
                    active = on,
                    "maintenance window {}",
                    if on { "started" } else { "ended" }
                );
                self.apply(Event::Maintenance(on), now);
            }
        }
        self.apply(Event::Tick, now);
    }

    /// Runs one step of the state machine and carries out its actions. In fleet mode (not
    /// deciding alone) the route is not published here: the decider writes the decision first
    /// and every proxy routes on what was written.
    fn apply(&mut self, event: Event, now: Instant) {
        let fleet_follows = self.fleet.as_ref().is_some_and(|f| f.following());
        let (next, actions) = routing::step(&self.policy, self.state.clone(), &event, now);
        self.state = next;
        for action in actions {
            match action {
                Action::Move {
                    from,
                    to,
                    reason,
                    detail,
                } => {
                    self.active_since = Utc::now();
                    // Evidence of both sites: which components are down and for how long.
                    let primary = self.health[0].report().evidence(now);
                    let backup = self.health[1].report().evidence(now);
                    warn!(from = %from, to = %to, reason = reason.as_str(), %detail,
                        primary_evidence = %primary, backup_evidence = %backup,
                        "traffic moved from the {from} to the {to} site ({}): {detail}; primary: {primary}; backup: {backup}", reason.as_str());
                    if !fleet_follows {
                        self.metrics
                            .failovers
                            .with_label_values(&[from.as_str(), to.as_str(), reason.as_str()])
                            .inc();
                    }
                    if self.timeline.len() == TIMELINE_LEN {
                        self.timeline.pop_front();
                    }
                    self.timeline.push_back(TimelineEntry {
                        at: Utc::now(),
                        from,
                        to,
                        reason: reason.as_str().to_string(),
                        detail,
                    });
                }
                Action::DegradedAlert { site, raised } => {
                    let evidence = self.health[site.index()].report().evidence(now);
                    if raised {
                        warn!(site = %site, %evidence, "site DEGRADED: partial failure, traffic not moved; an operator may fail over by hand");
                    } else {
                        info!(site = %site, "site no longer degraded");
                    }
                }
                Action::FailbackBlocked { blocked, detail } => {
                    if blocked {
                        let waited = self
                            .state
                            .failback_wait_since
                            .map(|t| now.saturating_duration_since(t))
                            .unwrap_or_default();
                        warn!(%detail, waited = ?waited, max_wait = ?self.policy.failback_max_wait,
                            "failback BLOCKED until replication backup->primary is confirmed drained: {detail}");
                    } else {
                        info!(%detail, "failback no longer waiting for replication");
                    }
                }
                Action::NoneAvailable(none) => {
                    if none {
                        error!(primary = %self.health[0].report().evidence(now), backup = %self.health[1].report().evidence(now),
                            "BOTH sites down: requests go to the primary and get 503 when it does not answer");
                    } else {
                        info!("a site is available again");
                    }
                }
                // In fleet mode the forced state is part of the decision in etcd.
                Action::PersistForced if fleet_follows => {}
                Action::PersistForced => {
                    if let Some(path) = &self.state_file {
                        match save_state(path, &self.state.forced, self.state.active) {
                            Ok(()) => {
                                info!(forced = self.state.forced.as_str(), path = %path.display(), "forced state saved")
                            }
                            Err(e) => {
                                error!(error = %e, "forced state NOT saved: a restart would not keep it")
                            }
                        }
                    }
                }
            }
        }
        if !fleet_follows {
            self.publish();
        }
        self.update_metrics();
        self.refresh_status(now);
    }

    /// Publishes a new snapshot when anything the request path reads changed.
    fn publish(&self) {
        let current = self.router.load();
        let usable = self.state.usable();
        let none_available = self.state.none_available();
        let active = self.state.active;
        if current.active != active
            || current.usable != usable
            || current.none_available != none_available
        {
            let generation = current.generation + u64::from(current.active != active);
            self.router.publish(RouteSnapshot {
                active,
                usable,
                none_available,
                generation,
            });
        }
    }

    fn update_metrics(&self) {
        let m = &self.metrics;
        for site in Site::ALL {
            m.active_site
                .with_label_values(&[site.as_str()])
                .set(i64::from(site == self.state.active));
            let verdict = self.state.verdicts[site.index()];
            for v in Verdict::ALL {
                m.site_state
                    .with_label_values(&[site.as_str(), v.as_str()])
                    .set(i64::from(verdict == Some(v)));
            }
            m.degraded_alert
                .with_label_values(&[site.as_str()])
                .set(i64::from(verdict == Some(Verdict::Degraded)));
        }
        m.forced.set(i64::from(self.state.forced != Forced::None));
        m.failback_blocked
            .set(i64::from(self.state.failback_blocked()));
    }

    fn refresh_status(&self, now: Instant) {
        let site_view = |site: Site| {
            let report: SiteReport = self.health[site.index()].report();
            SiteView {
                site,
                url: self.urls[site.index()].clone(),
                verdict: report.verdict,
                degraded_alert: report.verdict == Some(Verdict::Degraded),
                reachable: report.reachable,
                evidence: report.evidence(now),
                components: report
                    .components
                    .iter()
                    .map(|c| ComponentView {
                        name: c.name.clone(),
                        critical: c.critical,
                        up: c.up,
                        since: c.since.map(|s| wall(now, s)),
                        last: c.last_detail.clone(),
                    })
                    .collect(),
            }
        };
        let wall_now = Utc::now();
        let status = Status {
            active: self.state.active,
            active_title: self.state.active.title(),
            since: self.active_since,
            reason: self.state.active_reason.clone(),
            forced: self.state.forced.as_str(),
            forced_reason: match &self.state.forced {
                Forced::Operator { reason, .. } => Some(reason.clone()),
                _ => None,
            },
            none_available: self.state.none_available(),
            maintenance_active: self.state.maintenance,
            maintenance_next: self.schedule.next_transition(wall_now),
            sites: vec![site_view(Site::Primary), site_view(Site::Backup)],
            replication: self.replicator.as_ref().map(|r| ReplicationView {
                url: r.url.clone(),
                replicator_active: r.active,
                backup_to_primary_pending: self.state.backlog.pending(),
                gate: self.state.backlog.to_string(),
                directions: r.directions.clone(),
                failback_blocked: self.state.failback_blocked(),
                error: r.error.clone(),
            }),
            timeline: self.timeline.iter().cloned().collect(),
            generation: self.router.load().generation,
            failback_mode: self.failback_mode,
            config_reload: self.last_reload.clone(),
            ready: self.ready.0,
            unready_reason: self.ready.1.clone(),
            fleet: self.fleet_status(),
        };
        self.status.store(Arc::new(status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gsb-proxy.state");
        assert_eq!(
            load_state(&path).unwrap(),
            Forced::None,
            "missing file: no forced state"
        );
        let forced = Forced::Operator {
            site: Site::Backup,
            reason: "drill".into(),
        };
        save_state(&path, &forced, Site::Backup).unwrap();
        assert_eq!(load_state(&path).unwrap(), forced);
        assert!(
            !path.with_extension("tmp").exists(),
            "temp file renamed away"
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            load_state(&path),
            Err(ControlError::StateCorrupt { .. })
        ));
    }
}
