//! Fleet mode of the control task (`[coordination]` set): the proxy probes, publishes its vote,
//! and routes on the fleet's decision in etcd. Only the elected decider feeds the routing state
//! machine, with the fleet verdict of the fresh votes, and writes the decision in a transaction
//! fenced by its leadership token and the decision's revision; an operator's command on any
//! proxy is one compare-and-swap of the decision. See `gsb_fleet` for the etcd side.
//!
//! Leadership is given up only by a refused (fenced) confirmation or a lost etcd session, never
//! on a mere notification: a decider that was paused (SIGSTOP, a long GC-like stall) tries its
//! confirmation first and learns from the fence that another member decides now.

use std::time::Instant;

use chrono::{DateTime, Utc};
use gsb_fleet::{
    fleet_verdict, CoordinationConfig, DeciderStatus, Fleet, FleetVerdict, FleetView, OnLoss,
    SiteVote, Vote,
};
use gsb_health::Verdict;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{Control, TimelineEntry, TIMELINE_LEN};
use crate::metrics::FleetMetrics;
use crate::route::Site;
use crate::routing::{self, Action, AdminCommand, Event, Forced, RoutingState};

/// Moves kept in the decision's own timeline (the decision is one small etcd value).
const DECISION_TIMELINE: usize = 50;
/// Retries of an operator's compare-and-swap that lost a race with another write.
const CAS_TRIES: usize = 5;

/// The fleet's routing decision: the one value every proxy routes on (JSON in etcd).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The site new requests go to.
    pub active: Site,
    /// Why (status page).
    pub reason: String,
    /// An operator's hold, or a manual-failback hold.
    pub forced: Forced,
    /// Traffic is on the backup for a maintenance window.
    #[serde(default)]
    pub maintenance_hold: bool,
    /// The last move (min_dwell holds across deciders).
    #[serde(default)]
    pub last_move_at: Option<DateTime<Utc>>,
    /// Who wrote it.
    pub decided_by: String,
    /// When.
    pub decided_at: DateTime<Utc>,
    /// The fleet's moves, newest last.
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
}

impl Decision {
    /// Whether `other` routes the same way (ignores who wrote it and when).
    fn same_route(&self, other: &Decision) -> bool {
        self.active == other.active
            && self.forced == other.forced
            && self.maintenance_hold == other.maintenance_hold
            && self.reason == other.reason
            && self.timeline.len() == other.timeline.len()
            && self.timeline.last().map(|t| t.at) == other.timeline.last().map(|t| t.at)
    }
}

/// One member in the fleet section of the status.
#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its vote counts (younger than `lease_ttl`).
    pub fresh: bool,
    /// Age of its vote.
    pub age_ms: i64,
    /// Its verdicts `{primary, backup}`.
    pub primary: Option<Verdict>,
    /// ...
    pub backup: Option<Verdict>,
    /// The decision revision it routes on.
    pub applied_revision: i64,
    /// It routes on the current decision.
    pub follows: bool,
    /// It is the decider.
    pub decider: bool,
    /// Its readiness (false: its balancer should drain it).
    pub ready: bool,
    /// Why not ready.
    pub unready_reason: Option<String>,
}

/// The fleet section of `GET /status`.
#[derive(Clone, Debug, Serialize)]
pub struct FleetStatus {
    /// This proxy.
    pub member: String,
    /// Its region.
    pub region: String,
    /// etcd is reachable (a session holds).
    pub coordination_up: bool,
    /// Why not.
    pub coordination_error: Option<String>,
    /// `hold` or `local`.
    pub on_loss: &'static str,
    /// This proxy decides alone (`on_loss = "local"`, etcd lost for `local_after`).
    pub deciding_locally: bool,
    /// The decider's name.
    pub decider: Option<String>,
    /// This proxy is the decider.
    pub is_decider: bool,
    /// The current decision's revision (0: none yet).
    pub decision_revision: i64,
    /// The revision this proxy routes on.
    pub applied_revision: i64,
    /// Who wrote the decision and when.
    pub decided_by: Option<String>,
    /// ...
    pub decided_at: Option<DateTime<Utc>>,
    /// Votes needed for a fleet verdict.
    pub quorum_needed: usize,
    /// The fleet verdict `{primary, backup}` of the fresh votes.
    pub verdict: [Option<Verdict>; 2],
    /// Members that see a site down while the fleet does not (their path to it is broken).
    pub dissent: Vec<String>,
    /// Every member.
    pub members: Vec<MemberView>,
    /// Refused writes of this proxy since start.
    pub fenced_writes: u64,
}

/// The fleet side of the control task.
pub(super) struct FleetLink {
    fleet: Fleet,
    view: watch::Receiver<FleetView>,
    config: CoordinationConfig,
    name: String,
    metrics: FleetMetrics,
    /// The vote publisher's input (a task puts the newest vote; slow etcd never stalls probing).
    votes: watch::Sender<Option<Vote>>,
    /// This member's leadership token while it believes it decides.
    leader: Option<i64>,
    leader_since: DateTime<Utc>,
    last_confirm: Instant,
    /// The decision this proxy routes on, with its revision.
    applied: Option<(i64, Decision)>,
    /// Since when etcd has been unreachable.
    down_since: Option<Instant>,
    /// Deciding alone (`on_loss = "local"`).
    local: bool,
    /// The fleet verdict of the latest view.
    verdict: FleetVerdict,
    fenced: u64,
    /// The view's session number last handled (a new session means a fresh read).
    session: u64,
    /// Since when this proxy's probes see the active site down while the fleet does not.
    cut_off_since: Option<Instant>,
}

impl FleetLink {
    /// Wires a started [`Fleet`] into the control task; spawns the vote publisher.
    pub(super) fn new(
        fleet: Fleet,
        config: CoordinationConfig,
        metrics: FleetMetrics,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> FleetLink {
        let (votes, mut rx) = watch::channel::<Option<Vote>>(None);
        let publisher = fleet.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    changed = rx.changed() => if changed.is_err() { break },
                }
                let vote = rx.borrow_and_update().clone();
                if let Some(vote) = vote {
                    if let Err(e) = publisher.publish_vote(&vote).await {
                        tracing::debug!(error = %e, "vote not published");
                    }
                }
            }
        });
        FleetLink {
            name: fleet.name().to_string(),
            view: fleet.view(),
            fleet,
            config,
            metrics,
            votes,
            leader: None,
            leader_since: Utc::now(),
            last_confirm: Instant::now(),
            applied: None,
            down_since: Some(Instant::now()),
            local: false,
            verdict: FleetVerdict::default(),
            fenced: 0,
            session: 0,
            cut_off_since: None,
        }
    }

    /// Waits (at most `lease_ttl`) for a session, so the proxy serves the current decision from
    /// its first request; without etcd it starts on what the state file cached.
    pub(super) async fn wait_for_session(&mut self) -> bool {
        let ttl = self.config.lease_ttl;
        tokio::time::timeout(ttl, self.view.wait_for(|v| v.up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether this proxy routes by the fleet now (false while deciding alone).
    pub(super) fn following(&self) -> bool {
        !self.local
    }

    /// Notified when the fleet's keys change.
    pub(super) async fn changed(&mut self) {
        if self.view.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn decider_status(&self) -> DeciderStatus {
        DeciderStatus {
            name: self.name.clone(),
            region: self.config.region.clone(),
            since: self.leader_since,
            confirmed_at: Utc::now(),
        }
    }
}

/// Wall-clock time of an instant in the past, and back.
fn to_wall(then: Instant) -> DateTime<Utc> {
    super::wall(Instant::now(), then)
}

fn to_instant(t: DateTime<Utc>) -> Instant {
    let age = (Utc::now() - t).to_std().unwrap_or_default();
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

impl Control {
    fn link(&mut self) -> &mut FleetLink {
        self.fleet.as_mut().expect("fleet mode")
    }

    /// The decision the current state stands for.
    fn decision_of(&self, state: &RoutingState, timeline: &[TimelineEntry]) -> Decision {
        let name = self
            .fleet
            .as_ref()
            .map(|f| f.name.clone())
            .unwrap_or_default();
        let skip = timeline.len().saturating_sub(DECISION_TIMELINE);
        Decision {
            active: state.active,
            reason: state.active_reason.clone(),
            forced: state.forced.clone(),
            maintenance_hold: state.maintenance_hold,
            last_move_at: state.last_move.map(to_wall),
            decided_by: name,
            decided_at: Utc::now(),
            timeline: timeline[skip..].to_vec(),
        }
    }

    /// Routes on `decision` (revision `rev`): the persisted part of the routing state is taken
    /// from it; what this proxy measures itself (verdicts, hold-down timers, backlog) is kept.
    pub(super) fn adopt(&mut self, rev: i64, decision: Decision) {
        let link = self.fleet.as_mut().expect("fleet mode");
        if link.applied.as_ref().is_some_and(|(r, _)| *r >= rev) {
            return;
        }
        // What the request path routes on now (the decider's state may already hold a
        // tentative move).
        let before = self.router.load().active;
        let moved = before != decision.active;
        self.state.active = decision.active;
        self.state.forced = decision.forced.clone();
        self.state.maintenance_hold = decision.maintenance_hold;
        self.state.active_reason = decision.reason.clone();
        self.state.last_move = decision.last_move_at.map(to_instant);
        self.timeline = decision.timeline.iter().cloned().collect();
        if moved {
            self.active_since = decision
                .timeline
                .last()
                .map(|t| t.at)
                .unwrap_or(decision.decided_at);
            let reason = decision
                .timeline
                .last()
                .map(|t| t.reason.clone())
                .unwrap_or_else(|| "fleet".into());
            self.metrics
                .failovers
                .with_label_values(&[before.as_str(), decision.active.as_str(), &reason])
                .inc();
            warn!(from = %before, to = %decision.active, revision = rev, decided_by = %decision.decided_by,
                reason = %decision.reason, "traffic moved by the fleet's decision: {before} -> {}", decision.active);
        } else {
            info!(revision = rev, decided_by = %decision.decided_by, active = %decision.active,
                forced = decision.forced.as_str(), "fleet decision applied");
        }
        link.metrics.decision_revision.set(rev);
        link.applied = Some((rev, decision));
        if let Some(path) = &self.state_file {
            // A cache for a start without etcd; etcd holds the truth.
            if let Err(e) = super::save_state(path, &self.state.forced, self.state.active) {
                warn!(error = %e, "the last fleet decision is not cached in the state file");
            }
        }
        self.publish();
        self.update_metrics();
        self.send_vote();
    }

    /// Adopts the newest decision of the view, if newer than the applied one.
    fn adopt_from_view(&mut self) {
        let link = self.fleet.as_ref().expect("fleet mode");
        let applied = link.applied.as_ref().map_or(0, |(r, _)| *r);
        let stored = link
            .view
            .borrow()
            .decision
            .clone()
            .filter(|d| d.mod_revision > applied);
        let Some(stored) = stored else { return };
        match serde_json::from_slice::<Decision>(&stored.value) {
            Ok(d) => self.adopt(stored.mod_revision, d),
            Err(e) => {
                error!(error = %e, revision = stored.mod_revision,
                    "the fleet decision in etcd is not readable: routing stays as it is; fix or delete the key")
            }
        }
    }

    /// Handles a change of the fleet's keys: session up/down, a new decision, the decider gone.
    pub(super) async fn on_fleet_change(&mut self) {
        let now = Instant::now();
        let (up, session, error, decider) = {
            let link = self.link();
            let v = link.view.borrow_and_update();
            (v.up, v.session, v.error.clone(), v.decider.clone())
        };
        let link = self.link();
        link.metrics.up.set(i64::from(up));
        if !up {
            if link.down_since.is_none() {
                link.down_since = Some(now);
                let on_loss = link.config.on_loss;
                error!(error = ?error, on_loss = ?on_loss, active = %self.state.active,
                    "COORDINATION LOST: etcd is unreachable; this proxy keeps routing to the last decided site ({}) and does not move alone{}",
                    self.state.active,
                    if on_loss == OnLoss::Local { " until local_after passes" } else { "" });
            }
            let link = self.link();
            if link.leader.take().is_some() {
                link.metrics.decider.set(0);
                warn!("no longer the decider: leadership cannot be confirmed without etcd");
            }
            self.refresh_fleet();
            return;
        }
        if link.down_since.take().is_some() {
            info!(
                session,
                "coordination restored: following the fleet's decision"
            );
        }
        if link.session != session {
            link.session = session;
            // A fresh read: the newest decision whatever was applied before (it may be older
            // after a restore of etcd from a backup, which only an operator does).
            if let Some((rev, _)) = &link.applied {
                let current = link.view.borrow().decision_revision();
                if current < *rev {
                    warn!(applied = rev, current, "the fleet decision in etcd is older than the one applied here; following etcd");
                    link.applied = None;
                }
            }
        }
        if link.local {
            link.local = false;
            // What this proxy decided alone is dropped: the fleet's decision applies again,
            // even at the revision applied before the loss.
            link.applied = None;
            info!("stopped deciding alone: etcd is back, the fleet's decision applies again");
        }
        self.adopt_from_view();
        let link = self.link();
        if let Some(leader) = link.leader {
            if decider.as_ref().map(|d| d.create_revision) != Some(leader) {
                // Someone else holds the key (or it is gone): confirm at once; the fence says.
                self.confirm(None).await;
            }
        } else if decider.is_none() {
            self.campaign().await;
        }
        self.refresh_fleet();
        // The decider acts on a changed fleet verdict at once, not at its next round: the
        // votes that make a quorum arrive between its rounds.
        let current = self.state.verdicts;
        let link = self.link();
        if link.leader.is_some() && link.verdict.verdicts != current {
            let fleet = link.verdict.verdicts;
            self.apply(Event::Verdicts(fleet), now);
            self.confirm(None).await;
        }
    }

    /// Tries to become the decider.
    async fn campaign(&mut self) {
        let link = self.link();
        link.leader_since = Utc::now();
        let status = link.decider_status();
        match link.fleet.campaign(&status).await {
            Ok(Some(token)) => {
                link.leader = Some(token);
                link.last_confirm = Instant::now();
                link.metrics.decider.set(1);
                warn!(token, "this proxy is now the fleet's DECIDER");
                // A fleet without a decision yet starts from this proxy's state (the state
                // file of a single proxy that joins a fleet carries its forced state over).
                if link.view.borrow().decision.is_none() {
                    self.confirm(Some(0)).await;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "campaign failed"),
        }
    }

    /// The decider's confirmation, carrying the current decision when it changed (or when
    /// `force_expected` is given: the revision the write expects). A refused confirmation
    /// demotes this proxy (leadership lost) or adopts the newer decision (changed under it).
    async fn confirm(&mut self, force_expected: Option<i64>) {
        let Some(leader) = self.link().leader else {
            return;
        };
        let decision = self.decision_of(
            &self.state,
            &self.timeline.iter().cloned().collect::<Vec<_>>(),
        );
        let link = self.link();
        let write = match (&link.applied, force_expected) {
            (_, Some(expected)) => Some(expected),
            (Some((rev, applied)), None) if !applied.same_route(&decision) => Some(*rev),
            (None, None) => Some(link.view.borrow().decision_revision()),
            _ => None,
        };
        let status = link.decider_status();
        let payload = write.map(|rev| (rev, serde_json::to_vec(&decision).expect("serializes")));
        match link.fleet.confirm(leader, &status, payload).await {
            Ok(gsb_fleet::Confirm::Confirmed { written }) => {
                link.last_confirm = Instant::now();
                if let Some(rev) = written {
                    info!(revision = rev, active = %decision.active, "fleet decision written");
                    self.adopt(rev, decision);
                }
            }
            Ok(gsb_fleet::Confirm::Fenced {
                lost_leadership,
                decider,
                decision: now,
            }) => {
                link.fenced += 1;
                link.metrics.fenced_writes.inc();
                if lost_leadership {
                    link.leader = None;
                    link.metrics.decider.set(0);
                    let holder = decider
                        .and_then(|d| serde_json::from_slice::<DeciderStatus>(&d.value).ok())
                        .map(|d| d.name);
                    error!(token = leader, now_deciding = ?holder, wanted_write = write.is_some(),
                        "write FENCED: this proxy is no longer the decider (its lease ended while it was away); the newer decision stands");
                } else {
                    warn!("write fenced: the decision changed under the decider (an operator's command); adopting it");
                }
                if let Some(stored) = now {
                    if let Ok(d) = serde_json::from_slice::<Decision>(&stored.value) {
                        // Take the fleet's decision, even over a tentative local move.
                        self.link().applied = None;
                        self.adopt(stored.mod_revision, d);
                    }
                }
            }
            Err(e) => {
                let ttl = link.config.lease_ttl;
                if link.last_confirm.elapsed() >= ttl {
                    link.leader = None;
                    link.metrics.decider.set(0);
                    warn!(error = %e, "no longer the decider: leadership not confirmed within lease_ttl");
                } else {
                    tracing::debug!(error = %e, "confirmation failed; retried next round");
                }
                // Route on what was decided, not on the tentative state.
                if let Some((rev, d)) = self.link().applied.clone() {
                    self.link().applied = None;
                    self.adopt(rev, d);
                }
            }
        }
    }

    /// The fleet part of a probe round, after this proxy's own verdicts are in `local`.
    /// A decider that has not confirmed for longer than a few rounds was away (paused,
    /// starved): it confirms before it probes or decides anything, and the fence tells it
    /// whether it still leads.
    pub(super) async fn confirm_after_absence(&mut self) {
        let interval = self.interval;
        let link = self.link();
        if link.leader.is_some() && link.last_confirm.elapsed() > interval * 4 {
            warn!(away = ?link.last_confirm.elapsed(), "the decider was away: confirming its leadership first");
            self.confirm(None).await;
        }
    }

    pub(super) async fn fleet_round(&mut self, local: [Option<Verdict>; 2], now: Instant) {
        let link = self.link();
        let up = link.view.borrow().up;
        if !up {
            if link.config.on_loss == OnLoss::Local
                && link
                    .down_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= link.config.local_after)
            {
                if !link.local {
                    link.local = true;
                    error!(local_after = ?link.config.local_after,
                        "DECIDING ALONE (on_loss = \"local\"): etcd unreachable for local_after; split brain is possible until it returns");
                }
                self.local_step(local, now);
            } else {
                self.state.verdicts = local;
                self.publish();
                self.update_metrics();
            }
            self.refresh_fleet();
            return;
        }
        self.refresh_fleet();
        if self.link().leader.is_some() {
            let fleet = self.link().verdict.verdicts;
            self.local_step(fleet, now);
            self.confirm(None).await;
        } else {
            self.state.verdicts = local;
            self.publish();
            self.update_metrics();
            let no_decider = self.link().view.borrow().decider.is_none();
            if no_decider {
                self.campaign().await;
            }
        }
        self.send_vote();
    }

    /// Runs the state machine on `verdicts` with this round's other inputs (the caller then
    /// confirms, in fleet mode).
    fn local_step(&mut self, verdicts: [Option<Verdict>; 2], now: Instant) {
        self.apply(Event::Verdicts(verdicts), now);
        self.round_inputs(now);
    }

    /// An operator's command in fleet mode: one compare-and-swap of the decision, retried if
    /// another write got in first. Errors say why the fleet could not be changed.
    pub(super) async fn fleet_command(&mut self, cmd: AdminCommand) -> Result<(), String> {
        if self.link().local {
            self.apply(Event::Admin(cmd), Instant::now());
            return Ok(());
        }
        for _ in 0..CAS_TRIES {
            let active = self.state.active;
            let link = self.link();
            if !link.view.borrow().up {
                let why = link.view.borrow().error.clone().unwrap_or_default();
                return Err(format!(
                    "coordination is down (etcd unreachable: {why}): the fleet's decision cannot change now; this proxy keeps routing to the {active} site"
                ));
            }
            let expected = link.applied.as_ref().map_or(0, |(r, _)| *r);
            let is_decider = link.leader.is_some();
            let mut state = self.state.clone();
            if !is_decider {
                // Only the decider applies the automatic rules, on the fleet's verdicts.
                state.verdicts = [None, None];
                state.primary_healthy_since = None;
            }
            let now = Instant::now();
            let (next, actions) =
                routing::step(&self.policy, state, &Event::Admin(cmd.clone()), now);
            let mut timeline: Vec<TimelineEntry> = self.timeline.iter().cloned().collect();
            for a in &actions {
                if let Action::Move {
                    from,
                    to,
                    reason,
                    detail,
                } = a
                {
                    timeline.push(TimelineEntry {
                        at: Utc::now(),
                        from: *from,
                        to: *to,
                        reason: reason.as_str().to_string(),
                        detail: detail.clone(),
                    });
                }
            }
            if timeline.len() > TIMELINE_LEN {
                timeline.drain(..timeline.len() - TIMELINE_LEN);
            }
            let decision = self.decision_of(&next, &timeline);
            let value = serde_json::to_vec(&decision).expect("serializes");
            match self.link().fleet.cas_decision(expected, value).await {
                Ok(gsb_fleet::Cas::Written(rev)) => {
                    info!(revision = rev, command = ?cmd, active = %decision.active, "operator command written to the fleet decision");
                    self.state.failback_wait_since = next.failback_wait_since;
                    self.adopt(rev, decision);
                    return Ok(());
                }
                Ok(gsb_fleet::Cas::Conflict(now)) => {
                    if let Some(stored) = now {
                        if let Ok(d) = serde_json::from_slice::<Decision>(&stored.value) {
                            self.adopt(stored.mod_revision, d);
                        }
                    }
                }
                Err(e) => return Err(format!("the fleet decision could not be written: {e}")),
            }
        }
        Err("the fleet decision kept changing under the command; try again".into())
    }

    /// Publishes this proxy's vote (the publisher task puts it).
    fn send_vote(&self) {
        let Some(link) = &self.fleet else { return };
        let site = |i: usize| SiteVote {
            verdict: self.local_verdicts[i],
            evidence: self.health[i].report().evidence(Instant::now()),
        };
        let vote = Vote {
            name: link.name.clone(),
            region: link.config.region.clone(),
            seen_at: Utc::now(),
            sites: [site(0), site(1)],
            applied_revision: link.applied.as_ref().map_or(0, |(r, _)| *r),
            ready: self.ready.0,
            unready_reason: self.ready.1.clone(),
        };
        link.votes.send_replace(Some(vote));
    }

    /// Recomputes the fleet verdict, readiness and the fleet metrics from the view.
    fn refresh_fleet(&mut self) {
        let local = self.local_verdicts;
        let Some(link) = self.fleet.as_mut() else {
            return;
        };
        let view = link.view.borrow().clone();
        let mut votes: Vec<Vote> = view.members.values().map(|(v, _)| v.clone()).collect();
        // This proxy's own vote as it is now (etcd may hold the previous round's).
        votes.retain(|v| v.name != link.name);
        if view.up {
            votes.push(Vote {
                name: link.name.clone(),
                region: link.config.region.clone(),
                seen_at: Utc::now(),
                sites: [
                    SiteVote {
                        verdict: local[0],
                        evidence: String::new(),
                    },
                    SiteVote {
                        verdict: local[1],
                        evidence: String::new(),
                    },
                ],
                applied_revision: 0,
                ready: true,
                unready_reason: None,
            });
        }
        let now = Utc::now();
        link.verdict = fleet_verdict(&votes, now, link.config.stale_after(), link.config.quorum);
        let m = &link.metrics;
        m.members
            .with_label_values(&["fresh"])
            .set(link.verdict.fresh.len() as i64);
        m.members
            .with_label_values(&["stale"])
            .set(link.verdict.stale.len() as i64);
        for site in Site::ALL {
            let t = &link.verdict.tallies[site.index()];
            for (label, n) in [
                ("healthy", t.healthy.len()),
                ("degraded", t.degraded.len()),
                ("down", t.down.len()),
                ("unknown", t.unknown.len()),
            ] {
                m.votes
                    .with_label_values(&[site.as_str(), label])
                    .set(n as i64);
            }
        }
        m.dissent.reset();
        for d in &link.verdict.dissent {
            m.dissent
                .with_label_values(&[&d.member, &d.region, Site::ALL[d.site].as_str()])
                .set(1);
        }
        // Readiness: this proxy cannot reach the site the fleet keeps serving.
        let active = self.state.active;
        let fleet_sees = link.verdict.verdicts[active.index()];
        let cut_off = view.up
            && local[active.index()] == Some(Verdict::Down)
            && fleet_sees != Some(Verdict::Down);
        // Held for half a lease first: when the site really fails, the fleet's verdict follows
        // this proxy's within a round or two, and readiness should not flap meanwhile.
        let since = match (cut_off, link.cut_off_since) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, Some(t)) => Some(t),
        };
        link.cut_off_since = since;
        let ready = if since.is_some_and(|t| t.elapsed() >= link.config.lease_ttl / 2) {
            (
                false,
                Some(format!(
                    "this proxy cannot reach the active site ({active}) while the fleet can (fleet verdict {}): drain it and check its network path to the {active}",
                    fleet_sees.map_or("unknown", |v| v.as_str())
                )),
            )
        } else {
            (true, None)
        };
        if ready != self.ready {
            match &ready.1 {
                Some(why) => error!(member = %link.name, "NOT READY: {why}"),
                None => info!(member = %link.name, "ready again"),
            }
            self.ready = ready;
        }
        self.metrics.ready.set(i64::from(self.ready.0));
    }

    /// The fleet section of the status.
    pub(super) fn fleet_status(&self) -> Option<FleetStatus> {
        let link = self.fleet.as_ref()?;
        let view = link.view.borrow();
        let decider = view.decider_status().map(|d| d.name);
        let current = view.decision_revision();
        let decision: Option<Decision> = view
            .decision
            .as_ref()
            .and_then(|d| serde_json::from_slice(&d.value).ok());
        let now = Utc::now();
        let stale_after = link.config.stale_after();
        let members = view
            .members
            .values()
            .map(|(v, _)| MemberView {
                name: v.name.clone(),
                region: v.region.clone(),
                fresh: gsb_fleet::is_fresh(v.seen_at, now, stale_after),
                age_ms: (now - v.seen_at).num_milliseconds(),
                primary: v.sites[0].verdict,
                backup: v.sites[1].verdict,
                applied_revision: v.applied_revision,
                follows: v.applied_revision == current,
                decider: decider.as_deref() == Some(v.name.as_str()),
                ready: v.ready,
                unready_reason: v.unready_reason.clone(),
            })
            .collect();
        Some(FleetStatus {
            member: link.name.clone(),
            region: link.config.region.clone(),
            coordination_up: view.up,
            coordination_error: view.error.clone(),
            on_loss: match link.config.on_loss {
                OnLoss::Hold => "hold",
                OnLoss::Local => "local",
            },
            deciding_locally: link.local,
            is_decider: link.leader.is_some(),
            decider,
            decision_revision: current,
            applied_revision: link.applied.as_ref().map_or(0, |(r, _)| *r),
            decided_by: decision.as_ref().map(|d| d.decided_by.clone()),
            decided_at: decision.as_ref().map(|d| d.decided_at),
            quorum_needed: link.verdict.needed,
            verdict: link.verdict.verdicts,
            dissent: link
                .verdict
                .dissent
                .iter()
                .map(|d| {
                    format!(
                        "{} ({}) sees the {} down",
                        d.member,
                        if d.region.is_empty() {
                            "no region"
                        } else {
                            &d.region
                        },
                        Site::ALL[d.site]
                    )
                })
                .collect(),
            members,
            fenced_writes: link.fenced,
        })
    }

    /// At shutdown: the decider resigns so another proxy takes over at once.
    pub(super) async fn fleet_shutdown(&mut self) {
        if let Some(link) = self.fleet.as_mut() {
            if let Some(token) = link.leader.take() {
                match link.fleet.resign(token).await {
                    Ok(()) => info!("resigned as the fleet's decider"),
                    Err(e) => {
                        warn!(error = %e, "could not resign; another proxy decides after lease_ttl")
                    }
                }
            }
        }
    }
}

// The decision's timeline must fit in the status timeline it is adopted into.
const _: () = assert!(DECISION_TIMELINE <= TIMELINE_LEN);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn decision(active: Site, forced: Forced) -> Decision {
        Decision {
            active,
            reason: "r".into(),
            forced,
            maintenance_hold: false,
            last_move_at: None,
            decided_by: "a".into(),
            decided_at: Utc::now(),
            timeline: vec![],
        }
    }

    #[test]
    fn same_route_ignores_who_and_when_but_not_the_route() {
        let a = decision(Site::Primary, Forced::None);
        let mut b = a.clone();
        b.decided_by = "b".into();
        b.decided_at = a.decided_at + chrono::Duration::seconds(9);
        assert!(a.same_route(&b));
        b.active = Site::Backup;
        assert!(!a.same_route(&b));
        let c = decision(
            Site::Primary,
            Forced::Operator {
                site: Site::Primary,
                reason: "pin".into(),
            },
        );
        assert!(!a.same_route(&c));
    }

    #[test]
    fn a_decision_round_trips_through_json() {
        let mut d = decision(
            Site::Backup,
            Forced::Operator {
                site: Site::Backup,
                reason: "drill".into(),
            },
        );
        d.timeline.push(TimelineEntry {
            at: Utc::now(),
            from: Site::Primary,
            to: Site::Backup,
            reason: "manual".into(),
            detail: "operator: drill".into(),
        });
        let back: Decision = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn instants_survive_the_wall_clock_round_trip() {
        let then = Instant::now() - Duration::from_secs(30);
        let back = to_instant(to_wall(then));
        let diff = if back > then {
            back - then
        } else {
            then - back
        };
        assert!(diff < Duration::from_millis(50), "{diff:?}");
    }
}
