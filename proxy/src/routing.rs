//! The routing state machine: which site is active, as a pure function
//! `step(policy, state, event, now) -> (state, actions)`. No sockets, no clocks, no awaits: the
//! control task feeds it verdicts, admin commands, maintenance and replication status, and
//! carries out the actions (publish the route, count, log, persist).
//!
//! Rules: only a `down` primary (with a backup that is not down) moves traffic automatically;
//! `degraded` raises an alert and nothing else; automatic moves are at least `min_dwell` apart;
//! failback needs the primary healthy for `failback_after` and, when a replicator is watched, the
//! backup->primary backlog drained (or `failback_max_wait` passed); an operator's forced site
//! holds until `failback`/`auto`; maintenance moves to the backup at the start and back at the end.

use std::time::{Duration, Instant};

use gsb_health::Verdict;
use serde::{Deserialize, Serialize};

use crate::config::{FailbackMode, FailoverConfig};
use crate::gate::Backlog;
use crate::route::Site;

/// The failover settings the machine needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Move to the backup automatically when the primary is down.
    pub auto_failover: bool,
    /// Automatic or operator-driven return to the primary.
    pub failback: FailbackMode,
    /// Primary healthy this long before automatic failback.
    pub failback_after: Duration,
    /// Minimum time between two automatic moves.
    pub min_dwell: Duration,
    /// Whether failback waits for the replicator's backup->primary backlog.
    pub replication_gate: bool,
    /// Longest failback waits for the backlog before going anyway.
    pub failback_max_wait: Duration,
}

impl Policy {
    /// The policy of a `[failover]` section.
    pub fn from_config(c: &FailoverConfig) -> Policy {
        Policy {
            auto_failover: c.auto,
            failback: c.failback,
            failback_after: c.failback_after,
            min_dwell: c.min_dwell,
            replication_gate: c.replicator_status.is_some(),
            failback_max_wait: c.failback_max_wait,
        }
    }
}

/// A route an operator (or the failback mode) imposed; persisted so a restart keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Forced {
    /// The machine decides.
    #[default]
    None,
    /// An operator sent traffic to `site`; it stays there until `failback` or `auto`.
    Operator {
        /// The forced site.
        site: Site,
        /// The operator's reason.
        reason: String,
    },
    /// `failback = "manual"` and traffic is on the backup: it stays there until an operator
    /// fails back.
    ManualFailbackPending,
}

impl Forced {
    /// The site this forced state holds traffic on, if any.
    pub fn site(&self) -> Option<Site> {
        match self {
            Forced::None => None,
            Forced::Operator { site, .. } => Some(*site),
            Forced::ManualFailbackPending => Some(Site::Backup),
        }
    }

    /// Short name for metrics, JSON and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Forced::None => "none",
            Forced::Operator { .. } => "operator",
            Forced::ManualFailbackPending => "manual_failback_pending",
        }
    }
}

/// Why the active site moved (a bounded set: it is a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The primary is down and the backup is not.
    PrimaryDown,
    /// Traffic was on the backup, which went down while the primary is not.
    BackupDown,
    /// Both sites are down: the primary is preferred.
    BothDown,
    /// The primary was healthy for `failback_after` (and replication drained).
    Failback,
    /// Failback went ahead after `failback_max_wait` with replication not drained.
    FailbackMaxWait,
    /// An operator's command.
    Manual,
    /// A maintenance window started.
    MaintenanceStart,
    /// A maintenance window ended.
    MaintenanceEnd,
}

impl Reason {
    /// The label value (`primary_down`, `manual`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PrimaryDown => "primary_down",
            Reason::BackupDown => "backup_down",
            Reason::BothDown => "both_down",
            Reason::Failback => "failback",
            Reason::FailbackMaxWait => "failback_max_wait",
            Reason::Manual => "manual",
            Reason::MaintenanceStart => "maintenance_start",
            Reason::MaintenanceEnd => "maintenance_end",
        }
    }
}

/// An operator's command from the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminCommand {
    /// Send traffic to `to` and hold it there.
    Failover {
        /// The site to force.
        to: Site,
        /// Why (timeline, logs).
        reason: String,
    },
    /// Send traffic to the primary now and let the machine decide again.
    Failback {
        /// Why (timeline, logs).
        reason: String,
    },
    /// Release any forced state.
    Auto,
}

/// What the machine is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The latest verdicts `[primary, backup]` (`None` before the first probe round).
    Verdicts([Option<Verdict>; 2]),
    /// An operator's command.
    Admin(AdminCommand),
    /// Whether a maintenance window is running.
    Maintenance(bool),
    /// The failback gate's latest reading of the backup -> primary backlog.
    Backlog(Backlog),
    /// Time passed (re-evaluates hold-downs and waits).
    Tick,
}

/// What the control task must do after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The active site changed: publish, count, log, add to the timeline.
    Move {
        /// Previous active site.
        from: Site,
        /// New active site.
        to: Site,
        /// Why.
        reason: Reason,
        /// Human detail (operator text, evidence), for logs and the timeline.
        detail: String,
    },
    /// A site became degraded (`raised`) or stopped being degraded.
    DegradedAlert {
        /// The site.
        site: Site,
        /// True when the alert starts.
        raised: bool,
    },
    /// Failback started or stopped waiting for the replication backlog.
    FailbackBlocked {
        /// True while waiting.
        blocked: bool,
        /// What the gate saw.
        detail: String,
    },
    /// Both sites became down (`true`) or one came back (`false`).
    NoneAvailable(bool),
    /// The forced state changed: write the state file.
    PersistForced,
}

/// Everything the machine remembers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingState {
    /// The site new requests go to.
    pub active: Site,
    /// Operator / manual-failback hold.
    pub forced: Forced,
    /// Latest verdicts `[primary, backup]`.
    pub verdicts: [Option<Verdict>; 2],
    /// When the active site last moved (anti-flap).
    pub last_move: Option<Instant>,
    /// Why the active site is what it is (status page).
    pub active_reason: String,
    /// Since when the primary has been continuously healthy (failback hold-down).
    pub primary_healthy_since: Option<Instant>,
    /// A maintenance window is running.
    pub maintenance: bool,
    /// Traffic is on the backup because of a maintenance window (returns at its end).
    pub maintenance_hold: bool,
    /// Latest backup->primary backlog as the gate reads it (only an active replicator's
    /// count is trusted).
    pub backlog: Backlog,
    /// Since when failback has been waiting for the backlog.
    pub failback_wait_since: Option<Instant>,
}

impl RoutingState {
    /// The state at start-up: on `forced`'s site if any, else the primary.
    pub fn new(forced: Forced) -> RoutingState {
        let active = forced.site().unwrap_or(Site::Primary);
        let active_reason = match &forced {
            Forced::None => "start-up".to_string(),
            Forced::Operator { reason, .. } => {
                format!("forced by operator before restart: {reason}")
            }
            Forced::ManualFailbackPending => {
                "failed over before restart; waiting for a manual failback".into()
            }
        };
        RoutingState {
            active,
            forced,
            verdicts: [None, None],
            last_move: None,
            active_reason,
            primary_healthy_since: None,
            maintenance: false,
            maintenance_hold: false,
            backlog: Backlog::not_asked(),
            failback_wait_since: None,
        }
    }

    /// Whether a site may take traffic (not known to be down).
    pub fn usable(&self) -> [bool; 2] {
        self.verdicts.map(|v| v != Some(Verdict::Down))
    }

    /// Both sites are down.
    pub fn none_available(&self) -> bool {
        self.verdicts.iter().all(|v| *v == Some(Verdict::Down))
    }

    /// Failback is currently held back by the replication gate.
    pub fn failback_blocked(&self) -> bool {
        self.failback_wait_since.is_some()
    }

    fn verdict(&self, site: Site) -> Option<Verdict> {
        self.verdicts[site.index()]
    }

    fn is_down(&self, site: Site) -> bool {
        self.verdict(site) == Some(Verdict::Down)
    }

    fn move_to(
        &mut self,
        to: Site,
        reason: Reason,
        detail: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let from = self.active;
        self.active = to;
        self.last_move = Some(now);
        self.active_reason = format!("{}: {detail}", reason.as_str());
        actions.push(Action::Move {
            from,
            to,
            reason,
            detail,
        });
    }

    fn set_forced(&mut self, forced: Forced, actions: &mut Vec<Action>) {
        if self.forced != forced {
            self.forced = forced;
            actions.push(Action::PersistForced);
        }
    }
}

/// One step of the machine.
pub fn step(
    policy: &Policy,
    mut s: RoutingState,
    event: &Event,
    now: Instant,
) -> (RoutingState, Vec<Action>) {
    let mut actions = Vec::new();
    let was_blocked = s.failback_blocked();
    let old_backlog = s.backlog.clone();
    match event {
        Event::Verdicts(v) => {
            let was_none = s.none_available();
            for site in Site::ALL {
                let (old, new) = (s.verdicts[site.index()], v[site.index()]);
                let (was_deg, is_deg) = (
                    old == Some(Verdict::Degraded),
                    new == Some(Verdict::Degraded),
                );
                if was_deg != is_deg {
                    actions.push(Action::DegradedAlert {
                        site,
                        raised: is_deg,
                    });
                }
            }
            s.verdicts = *v;
            if s.verdict(Site::Primary) == Some(Verdict::Healthy) {
                s.primary_healthy_since.get_or_insert(now);
            } else {
                s.primary_healthy_since = None;
            }
            if was_none != s.none_available() {
                actions.push(Action::NoneAvailable(s.none_available()));
            }
        }
        Event::Admin(AdminCommand::Failover { to, reason }) => {
            s.set_forced(
                Forced::Operator {
                    site: *to,
                    reason: reason.clone(),
                },
                &mut actions,
            );
            s.maintenance_hold = false;
            if s.active != *to {
                s.move_to(
                    *to,
                    Reason::Manual,
                    format!("operator: {reason}"),
                    now,
                    &mut actions,
                );
            } else {
                s.active_reason = format!("manual: operator pinned {to}: {reason}");
            }
        }
        Event::Admin(AdminCommand::Failback { reason }) => {
            s.set_forced(Forced::None, &mut actions);
            s.maintenance_hold = false;
            s.failback_wait_since = None;
            if s.active != Site::Primary {
                let mut detail = format!("operator: {reason}");
                if policy.replication_gate && !s.backlog.is_drained() {
                    detail.push_str(&format!(" ({}; not waited for)", s.backlog));
                }
                s.move_to(Site::Primary, Reason::Manual, detail, now, &mut actions);
            }
        }
        Event::Admin(AdminCommand::Auto) => s.set_forced(Forced::None, &mut actions),
        Event::Maintenance(on) => s.maintenance = *on,
        Event::Backlog(b) => s.backlog = b.clone(),
        Event::Tick => {}
    }
    if !matches!(s.forced, Forced::Operator { .. }) {
        decide(policy, &mut s, now, &mut actions);
    } else {
        s.failback_wait_since = None;
    }
    // Said once when failback starts or stops waiting, and again when the reason for waiting
    // changes (a count turning into "the replicator is a standby"), not at every new count.
    let cause_changed = s.failback_blocked() && !old_backlog.same_cause(&s.backlog);
    if was_blocked != s.failback_blocked() || cause_changed {
        actions.push(Action::FailbackBlocked {
            blocked: s.failback_blocked(),
            detail: s.backlog.to_string(),
        });
    }
    (s, actions)
}

/// The automatic rules (no operator hold).
fn decide(policy: &Policy, s: &mut RoutingState, now: Instant, actions: &mut Vec<Action>) {
    let dwell_ok = match s.last_move {
        None => true,
        Some(t) => now.saturating_duration_since(t) >= policy.min_dwell,
    };
    let (p_down, b_down) = (s.is_down(Site::Primary), s.is_down(Site::Backup));
    let mut failback_candidate = None;
    match s.active {
        Site::Primary => {
            if s.maintenance && !b_down {
                s.maintenance_hold = true;
                s.move_to(
                    Site::Backup,
                    Reason::MaintenanceStart,
                    "maintenance window started".into(),
                    now,
                    actions,
                );
            } else if policy.auto_failover && p_down && !b_down && dwell_ok {
                s.move_to(
                    Site::Backup,
                    Reason::PrimaryDown,
                    "primary down, backup up".into(),
                    now,
                    actions,
                );
            }
        }
        Site::Backup => {
            if b_down && dwell_ok {
                let reason = if p_down {
                    Reason::BothDown
                } else {
                    Reason::BackupDown
                };
                let detail = if p_down {
                    "both sites down: preferring the primary"
                } else {
                    "backup down, primary up"
                };
                s.maintenance_hold = false;
                s.move_to(Site::Primary, reason, detail.into(), now, actions);
            } else if s.maintenance_hold {
                if !s.maintenance && !p_down {
                    failback_candidate = Some(Reason::MaintenanceEnd);
                }
            } else if policy.failback == FailbackMode::Auto && s.forced == Forced::None && dwell_ok
            {
                let held = s
                    .primary_healthy_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= policy.failback_after);
                if held {
                    failback_candidate = Some(Reason::Failback);
                }
            }
        }
    }
    match failback_candidate {
        Some(reason) => gated_failback(policy, s, reason, now, actions),
        None => s.failback_wait_since = None,
    }
    // In manual failback mode, sitting on the backup is a hold that must survive a restart.
    let want_pending =
        s.active == Site::Backup && policy.failback == FailbackMode::Manual && !s.maintenance_hold;
    match (&s.forced, want_pending) {
        (Forced::None, true) => s.set_forced(Forced::ManualFailbackPending, actions),
        (Forced::ManualFailbackPending, false) => s.set_forced(Forced::None, actions),
        _ => {}
    }
}

/// Returns to the primary once the replication backlog is drained (or waited for too long).
fn gated_failback(
    policy: &Policy,
    s: &mut RoutingState,
    reason: Reason,
    now: Instant,
    actions: &mut Vec<Action>,
) {
    let what = if reason == Reason::MaintenanceEnd {
        "maintenance window ended"
    } else {
        "primary healthy"
    };
    if !policy.replication_gate || s.backlog.is_drained() {
        let detail = if policy.replication_gate {
            format!("{what}, replication drained")
        } else {
            what.to_string()
        };
        s.failback_wait_since = None;
        s.maintenance_hold = false;
        s.move_to(Site::Primary, reason, detail, now, actions);
        return;
    }
    let since = *s.failback_wait_since.get_or_insert(now);
    if now.saturating_duration_since(since) >= policy.failback_max_wait {
        let detail = format!(
            "{what}; replication NOT confirmed drained ({}) after waiting {:?}: going anyway",
            s.backlog, policy.failback_max_wait
        );
        s.failback_wait_since = None;
        s.maintenance_hold = false;
        s.move_to(Site::Primary, Reason::FailbackMaxWait, detail, now, actions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::{Degraded, Down, Healthy};

    fn policy() -> Policy {
        Policy {
            auto_failover: true,
            failback: FailbackMode::Auto,
            failback_after: Duration::from_secs(30),
            min_dwell: Duration::from_secs(10),
            replication_gate: false,
            failback_max_wait: Duration::from_secs(600),
        }
    }

    /// Drives the machine with synthetic time.
    struct Sim {
        policy: Policy,
        state: RoutingState,
        t0: Instant,
        now: Instant,
        moves: Vec<(Duration, Site, Reason)>,
        all: Vec<Action>,
    }

    impl Sim {
        fn new(policy: Policy) -> Sim {
            let t0 = Instant::now();
            Sim {
                policy,
                state: RoutingState::new(Forced::None),
                t0,
                now: t0,
                moves: vec![],
                all: vec![],
            }
        }
        fn at(&mut self, secs: f64) -> &mut Sim {
            self.now = self.t0 + Duration::from_secs_f64(secs);
            self
        }
        fn send(&mut self, e: Event) -> Vec<Action> {
            let (s, actions) = step(&self.policy, self.state.clone(), &e, self.now);
            self.state = s;
            for a in &actions {
                if let Action::Move { to, reason, .. } = a {
                    self.moves.push((self.now - self.t0, *to, *reason));
                }
            }
            self.all.extend(actions.clone());
            actions
        }
        fn verdicts(&mut self, p: Verdict, b: Verdict) -> Vec<Action> {
            self.send(Event::Verdicts([Some(p), Some(b)]))
        }
    }

    #[test]
    fn primary_down_fails_over_and_backup_down_does_not() {
        let mut m = Sim::new(policy());
        m.verdicts(Healthy, Down);
        assert_eq!(m.state.active, Site::Primary);
        m.at(1.0).verdicts(Down, Healthy);
        assert_eq!(m.state.active, Site::Backup);
        assert_eq!(
            m.moves,
            vec![(Duration::from_secs(1), Site::Backup, Reason::PrimaryDown)]
        );
    }

    #[test]
    fn degraded_alerts_but_never_moves() {
        let mut m = Sim::new(policy());
        m.verdicts(Healthy, Healthy);
        let a = m.at(1.0).verdicts(Degraded, Healthy);
        assert_eq!(
            a,
            vec![Action::DegradedAlert {
                site: Site::Primary,
                raised: true
            }]
        );
        for i in 2..100 {
            m.at(i as f64).verdicts(Degraded, Healthy);
        }
        assert_eq!(m.state.active, Site::Primary);
        assert!(m.moves.is_empty());
        let a = m.at(100.0).verdicts(Healthy, Healthy);
        assert_eq!(
            a,
            vec![Action::DegradedAlert {
                site: Site::Primary,
                raised: false
            }]
        );
    }

    #[test]
    fn no_automatic_failover_when_disabled() {
        let mut m = Sim::new(Policy {
            auto_failover: false,
            ..policy()
        });
        m.verdicts(Down, Healthy);
        assert_eq!(m.state.active, Site::Primary);
    }

    #[test]
    fn both_down_prefers_primary_and_reports_none_available() {
        let mut m = Sim::new(policy());
        m.verdicts(Down, Healthy);
        assert_eq!(m.state.active, Site::Backup);
        let a = m.at(20.0).verdicts(Down, Down);
        assert!(a.contains(&Action::NoneAvailable(true)));
        assert_eq!(m.state.active, Site::Primary);
        assert_eq!(m.moves.last().unwrap().2, Reason::BothDown);
        assert!(m.state.none_available());
        assert_eq!(m.state.usable(), [false, false]);
    }

    #[test]
    fn failback_after_hold_down_and_dwell() {
        let mut m = Sim::new(policy());
        m.verdicts(Down, Healthy);
        m.at(5.0).verdicts(Healthy, Healthy);
        m.at(34.9).send(Event::Tick);
        assert_eq!(m.state.active, Site::Backup, "healthy only 29.9s");
        m.at(35.0).send(Event::Tick);
        assert_eq!(m.state.active, Site::Primary);
        assert_eq!(
            m.moves.last().unwrap(),
            &(Duration::from_secs(35), Site::Primary, Reason::Failback)
        );
    }

    #[test]
    fn a_degraded_primary_resets_the_failback_hold_down() {
        let mut m = Sim::new(policy());
        m.verdicts(Down, Healthy);
        m.at(1.0).verdicts(Healthy, Healthy);
        m.at(20.0).verdicts(Degraded, Healthy);
        m.at(21.0).verdicts(Healthy, Healthy);
        m.at(40.0).send(Event::Tick);
        assert_eq!(m.state.active, Site::Backup);
        m.at(51.0).send(Event::Tick);
        assert_eq!(m.state.active, Site::Primary);
    }

    #[test]
    fn flapping_primary_moves_at_most_once_per_min_dwell() {
        let mut m = Sim::new(Policy {
            failback_after: Duration::from_millis(500),
            ..policy()
        });
        // The primary flips every second for 10 minutes; events every 100ms.
        for tenth in 0..6000 {
            let t = tenth as f64 / 10.0;
            let p = if (tenth / 10) % 2 == 0 { Down } else { Healthy };
            m.at(t).verdicts(p, Healthy);
        }
        assert!(
            m.moves.len() >= 2,
            "it did fail over and back: {:?}",
            m.moves
        );
        for pair in m.moves.windows(2) {
            assert!(
                pair[1].0 - pair[0].0 >= Duration::from_secs(10),
                "moves too close: {pair:?}"
            );
        }
    }

    #[test]
    fn operator_failover_holds_until_auto() {
        let mut m = Sim::new(policy());
        m.verdicts(Healthy, Healthy);
        let a = m.at(1.0).send(Event::Admin(AdminCommand::Failover {
            to: Site::Backup,
            reason: "db slow".into(),
        }));
        assert!(a.contains(&Action::PersistForced));
        assert_eq!(m.state.active, Site::Backup);
        m.at(500.0).verdicts(Healthy, Healthy);
        assert_eq!(
            m.state.active,
            Site::Backup,
            "forced state holds against a healthy primary"
        );
        m.at(501.0).send(Event::Admin(AdminCommand::Auto));
        assert_eq!(m.state.forced, Forced::None);
        assert_eq!(
            m.state.active,
            Site::Primary,
            "primary healthy long enough: auto fails back"
        );
    }

    #[test]
    fn operator_failback_ignores_dwell_and_releases() {
        let mut m = Sim::new(policy());
        m.verdicts(Down, Healthy);
        m.at(1.0).send(Event::Admin(AdminCommand::Failback {
            reason: "fixed".into(),
        }));
        assert_eq!(m.state.active, Site::Primary);
        assert_eq!(m.moves.last().unwrap().2, Reason::Manual);
    }

    #[test]
    fn restart_keeps_the_forced_site() {
        let forced = Forced::Operator {
            site: Site::Backup,
            reason: "drill".into(),
        };
        let json = serde_json::to_string(&forced).unwrap();
        let back: Forced = serde_json::from_str(&json).unwrap();
        let s = RoutingState::new(back);
        assert_eq!(s.active, Site::Backup);
        let (s, actions) = step(
            &policy(),
            s,
            &Event::Verdicts([Some(Healthy), Some(Healthy)]),
            Instant::now(),
        );
        assert_eq!(s.active, Site::Backup);
        assert!(actions.is_empty());
    }

    #[test]
    fn manual_failback_mode_stays_on_backup_and_persists() {
        let mut m = Sim::new(Policy {
            failback: FailbackMode::Manual,
            ..policy()
        });
        let a = m.verdicts(Down, Healthy);
        assert!(a.contains(&Action::PersistForced));
        assert_eq!(m.state.forced, Forced::ManualFailbackPending);
        m.at(1.0).verdicts(Healthy, Healthy);
        m.at(1000.0).send(Event::Tick);
        assert_eq!(m.state.active, Site::Backup);
        m.at(1001.0).send(Event::Admin(AdminCommand::Failback {
            reason: "checked".into(),
        }));
        assert_eq!(m.state.active, Site::Primary);
        assert_eq!(m.state.forced, Forced::None);
    }

    #[test]
    fn failback_waits_for_replication_backlog() {
        let mut m = Sim::new(Policy {
            replication_gate: true,
            ..policy()
        });
        m.verdicts(Down, Healthy);
        m.at(1.0).verdicts(Healthy, Healthy);
        m.send(Event::Backlog(Backlog::Pending(42)));
        let a = m.at(40.0).send(Event::Tick);
        assert!(
            matches!(a[..], [Action::FailbackBlocked { blocked: true, .. }]),
            "{a:?}"
        );
        assert_eq!(m.state.active, Site::Backup);
        let a = m.at(41.0).send(Event::Backlog(Backlog::Pending(0)));
        assert_eq!(m.state.active, Site::Primary);
        assert!(a
            .iter()
            .any(|a| matches!(a, Action::FailbackBlocked { blocked: false, .. })));
        assert_eq!(m.moves.last().unwrap().2, Reason::Failback);
    }

    #[test]
    fn failback_goes_anyway_after_max_wait() {
        let mut m = Sim::new(Policy {
            replication_gate: true,
            ..policy()
        });
        m.verdicts(Down, Healthy);
        m.at(1.0).verdicts(Healthy, Healthy);
        m.send(Event::Backlog(Backlog::Unknown("no answer".into())));
        m.at(31.0).send(Event::Tick);
        m.at(630.0).send(Event::Tick);
        assert_eq!(m.state.active, Site::Backup);
        m.at(631.0).send(Event::Tick);
        assert_eq!(m.state.active, Site::Primary);
        assert_eq!(m.moves.last().unwrap().2, Reason::FailbackMaxWait);
    }

    #[test]
    fn a_standby_replicator_keeps_failback_blocked_and_says_why() {
        let mut m = Sim::new(Policy {
            replication_gate: true,
            ..policy()
        });
        m.verdicts(Down, Healthy);
        m.at(1.0).verdicts(Healthy, Healthy);
        // The active replicator had 5 rows to go, then the answer comes from a standby.
        m.send(Event::Backlog(Backlog::Pending(5)));
        let a = m.at(31.0).send(Event::Tick);
        assert!(
            matches!(&a[..], [Action::FailbackBlocked { blocked: true, detail }] if detail.contains("5 rows")),
            "{a:?}"
        );
        let standby = crate::gate::parse_status(&serde_json::json!({"active": false,
            "directions": {"backup_to_primary": {"pending_rows": 0}}}));
        let a = m.at(32.0).send(Event::Backlog(standby.clone()));
        assert!(
            matches!(&a[..], [Action::FailbackBlocked { blocked: true, detail }] if detail.contains("standby")),
            "a new reason to wait is said once: {a:?}"
        );
        assert_eq!(
            m.state.active,
            Site::Backup,
            "a standby's zero is not trusted"
        );
        assert!(
            m.at(33.0).send(Event::Backlog(standby)).is_empty(),
            "not repeated"
        );
        m.at(630.0).send(Event::Tick);
        assert_eq!(m.state.active, Site::Backup);
        m.at(631.0).send(Event::Tick);
        assert_eq!(
            m.state.active,
            Site::Primary,
            "failback_max_wait still bounds the wait"
        );
        assert_eq!(m.moves.last().unwrap().2, Reason::FailbackMaxWait);
    }

    #[test]
    fn a_count_changing_while_blocked_is_not_repeated() {
        let mut m = Sim::new(Policy {
            replication_gate: true,
            ..policy()
        });
        m.verdicts(Down, Healthy);
        m.at(1.0).verdicts(Healthy, Healthy);
        m.send(Event::Backlog(Backlog::Pending(9)));
        m.at(31.0).send(Event::Tick);
        assert!(m
            .at(32.0)
            .send(Event::Backlog(Backlog::Pending(8)))
            .is_empty());
    }

    #[test]
    fn maintenance_moves_to_backup_and_back() {
        let mut m = Sim::new(Policy {
            failback: FailbackMode::Manual,
            ..policy()
        });
        m.verdicts(Healthy, Healthy);
        m.at(1.0).send(Event::Maintenance(true));
        assert_eq!(m.state.active, Site::Backup);
        assert_eq!(
            m.state.forced,
            Forced::None,
            "a maintenance hold is not a manual-failback hold"
        );
        // The primary being down during its maintenance moves nothing.
        m.at(2.0).verdicts(Down, Healthy);
        m.at(3.0).verdicts(Healthy, Healthy);
        m.at(4.0).send(Event::Maintenance(false));
        assert_eq!(
            m.state.active,
            Site::Primary,
            "the window's end returns without waiting for dwell"
        );
        assert_eq!(
            m.moves.iter().map(|x| x.2).collect::<Vec<_>>(),
            vec![Reason::MaintenanceStart, Reason::MaintenanceEnd]
        );
    }

    #[test]
    fn maintenance_does_not_move_to_a_down_backup() {
        let mut m = Sim::new(policy());
        m.verdicts(Healthy, Down);
        m.at(1.0).send(Event::Maintenance(true));
        assert_eq!(m.state.active, Site::Primary);
    }
}
