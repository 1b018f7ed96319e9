//! The site verdict: healthy, degraded or down, from the components' rise/fall state.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::counter::{ComponentCounter, Transition};
use crate::probe::{ProbeOutcome, ProbeSpec};

/// A site's health as the routing state machine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every critical component is up.
    Healthy,
    /// Some critical component is down but not all: a partial failure (alert, no automatic move).
    Degraded,
    /// Every critical component is down, or the site is unreachable.
    Down,
}

impl Verdict {
    /// All verdicts, for metric labels.
    pub const ALL: [Verdict; 3] = [Verdict::Healthy, Verdict::Degraded, Verdict::Down];

    /// Lower-case name used in metric labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Degraded => "degraded",
            Verdict::Down => "down",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One component's state, for the status page and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentStatus {
    /// The component name from the config.
    pub name: String,
    /// Whether it counts towards `down`.
    pub critical: bool,
    /// Up after rise/fall counting; `None` before the first probe.
    pub up: Option<bool>,
    /// When it last changed state (the evidence: "down since ...").
    pub since: Option<Instant>,
    /// What the last probe saw (status code, error), for the logs.
    pub last_detail: String,
}

/// A site's verdict with the evidence behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteReport {
    /// The verdict; `None` before the first probe round.
    pub verdict: Option<Verdict>,
    /// Every component, in config order.
    pub components: Vec<ComponentStatus>,
    /// False once no probe could even connect for `fall` rounds in a row.
    pub reachable: bool,
}

impl SiteReport {
    /// Names of the components currently down, with how long, e.g. `web (down 3s: connect refused)`.
    pub fn evidence(&self, now: Instant) -> String {
        let mut parts: Vec<String> = self
            .components
            .iter()
            .filter(|c| c.up == Some(false))
            .map(|c| {
                let age = c
                    .since
                    .map(|s| now.saturating_duration_since(s))
                    .unwrap_or_default();
                format!(
                    "{} (down {:.1}s: {})",
                    c.name,
                    age.as_secs_f64(),
                    c.last_detail
                )
            })
            .collect();
        if !self.reachable {
            parts.push("site unreachable".into());
        }
        if parts.is_empty() {
            "all components up".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The pure health state of one site: per-component counters and the verdict derived from them.
#[derive(Clone, Debug)]
pub struct SiteHealth {
    components: Vec<ComponentStatus>,
    counters: Vec<ComponentCounter>,
    /// Consecutive rounds in which no probe could connect (counts against `fall`).
    unreachable_rounds: u32,
    reachable: bool,
    rise: u32,
    fall: u32,
}

impl SiteHealth {
    /// A site with the given components, none probed yet.
    pub fn new(specs: &[ProbeSpec], rise: u32, fall: u32) -> Self {
        SiteHealth {
            components: specs
                .iter()
                .map(|s| ComponentStatus {
                    name: s.name.clone(),
                    critical: s.critical,
                    up: None,
                    since: None,
                    last_detail: String::new(),
                })
                .collect(),
            counters: vec![ComponentCounter::new(); specs.len()],
            unreachable_rounds: 0,
            reachable: true,
            rise,
            fall,
        }
    }

    /// Takes new probe specs and thresholds (a config reload): a component whose spec is
    /// unchanged keeps its state and counters, so a reload does not forget what is known (and
    /// cannot move traffic by itself); new or changed components start unprobed.
    pub fn reconfigure(&mut self, old: &[ProbeSpec], new: &[ProbeSpec], rise: u32, fall: u32) {
        let mut next = SiteHealth::new(new, rise, fall);
        for (i, spec) in new.iter().enumerate() {
            if let Some(j) = old.iter().position(|o| o == spec) {
                if let (Some(c), Some(k)) = (self.components.get(j), self.counters.get(j)) {
                    next.components[i] = c.clone();
                    next.counters[i] = k.clone();
                }
            }
        }
        next.unreachable_rounds = self.unreachable_rounds;
        next.reachable = self.reachable;
        *self = next;
    }

    /// Records one probe round (`outcomes[i]` is component `i`); returns the components that
    /// changed state in this round.
    pub fn observe(
        &mut self,
        outcomes: &[ProbeOutcome],
        now: Instant,
    ) -> Vec<(String, Transition)> {
        let mut changed = Vec::new();
        for ((status, counter), outcome) in self
            .components
            .iter_mut()
            .zip(&mut self.counters)
            .zip(outcomes)
        {
            status.last_detail.clone_from(&outcome.detail);
            if let Some(t) = counter.record(outcome.ok, self.rise, self.fall) {
                status.up = counter.is_up();
                status.since = Some(now);
                changed.push((status.name.clone(), t));
            }
        }
        if !outcomes.is_empty() && outcomes.iter().all(|o| !o.connected) {
            self.unreachable_rounds = self.unreachable_rounds.saturating_add(1);
            if self.unreachable_rounds >= self.fall.max(1) {
                self.reachable = false;
            }
        } else {
            self.unreachable_rounds = 0;
            self.reachable = true;
        }
        changed
    }

    /// The verdict now; `None` before the first round.
    pub fn verdict(&self) -> Option<Verdict> {
        verdict_of(
            self.components.iter().map(|c| (c.critical, c.up)),
            self.reachable,
        )
    }

    /// The verdict with its evidence.
    pub fn report(&self) -> SiteReport {
        SiteReport {
            verdict: self.verdict(),
            components: self.components.clone(),
            reachable: self.reachable,
        }
    }
}

/// The verdict from `(critical, up)` per component: down when the site is unreachable or every
/// critical component is down; degraded when some critical one is; `None` before any result.
pub fn verdict_of(
    components: impl IntoIterator<Item = (bool, Option<bool>)>,
    reachable: bool,
) -> Option<Verdict> {
    if !reachable {
        return Some(Verdict::Down);
    }
    let (mut critical, mut critical_down, mut known) = (0, 0, false);
    for (is_critical, up) in components {
        known |= up.is_some();
        if is_critical {
            critical += 1;
            // A critical component not probed yet is not evidence of a failure.
            if up == Some(false) {
                critical_down += 1;
            }
        }
    }
    if !known {
        None
    } else if critical > 0 && critical_down == critical {
        Some(Verdict::Down)
    } else if critical_down > 0 {
        Some(Verdict::Degraded)
    } else {
        Some(Verdict::Healthy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ProbeKind;
    use std::time::Duration;

    fn spec(name: &str, critical: bool) -> ProbeSpec {
        ProbeSpec {
            name: name.into(),
            critical,
            kind: ProbeKind::Tcp {
                addr: "127.0.0.1:1".into(),
            },
        }
    }

    fn outcome(ok: bool, connected: bool) -> ProbeOutcome {
        ProbeOutcome {
            ok,
            connected,
            duration: Duration::from_millis(1),
            detail: String::new(),
        }
    }

    #[test]
    fn reconfigure_keeps_unchanged_components() {
        let (web, api, db) = (spec("web", true), spec("api", true), spec("db", false));
        let old = vec![web.clone(), api.clone()];
        let mut h = SiteHealth::new(&old, 2, 2);
        let now = Instant::now();
        h.observe(&[outcome(true, true), outcome(false, true)], now);
        assert_eq!(h.verdict(), Some(Verdict::Degraded));
        // `api` dropped, `db` added, thresholds raised: `web` keeps its state.
        let new = vec![db.clone(), web.clone()];
        h.reconfigure(&old, &new, 5, 5);
        let r = h.report();
        assert_eq!(r.components[0].up, None, "new component starts unprobed");
        assert_eq!(r.components[1].name, "web");
        assert_eq!(r.components[1].up, Some(true), "unchanged component kept");
        assert_eq!(h.verdict(), Some(Verdict::Healthy));
        // The new fall threshold applies: four failures do not take `web` down, five do.
        for i in 1..=5 {
            h.observe(&[outcome(true, true), outcome(false, true)], now);
            let want = if i < 5 { Some(true) } else { Some(false) };
            assert_eq!(h.report().components[1].up, want, "failure {i}");
        }
    }

    #[test]
    fn verdict_rules() {
        assert_eq!(
            verdict_of([(true, Some(true)), (true, Some(true))], true),
            Some(Verdict::Healthy)
        );
        assert_eq!(
            verdict_of([(true, Some(true)), (true, Some(false))], true),
            Some(Verdict::Degraded)
        );
        assert_eq!(
            verdict_of([(true, Some(false)), (true, Some(false))], true),
            Some(Verdict::Down)
        );
        // A non-critical component down does not change the verdict.
        assert_eq!(
            verdict_of([(true, Some(true)), (false, Some(false))], true),
            Some(Verdict::Healthy)
        );
        // Non-critical up does not save a site whose critical components are all down.
        assert_eq!(
            verdict_of([(true, Some(false)), (false, Some(true))], true),
            Some(Verdict::Down)
        );
        assert_eq!(verdict_of([(true, Some(true))], false), Some(Verdict::Down));
        assert_eq!(verdict_of([(true, None)], true), None);
    }

    #[test]
    fn one_of_two_critical_failing_is_degraded_after_fall_rounds() {
        let t0 = Instant::now();
        let mut h = SiteHealth::new(&[spec("web", true), spec("api", true)], 2, 2);
        h.observe(&[outcome(true, true), outcome(true, true)], t0);
        assert_eq!(h.verdict(), Some(Verdict::Healthy));
        h.observe(
            &[outcome(true, true), outcome(false, true)],
            t0 + Duration::from_secs(1),
        );
        assert_eq!(
            h.verdict(),
            Some(Verdict::Healthy),
            "one failure is below fall = 2"
        );
        let changed = h.observe(
            &[outcome(true, true), outcome(false, true)],
            t0 + Duration::from_secs(2),
        );
        assert_eq!(changed, vec![("api".to_string(), Transition::Down)]);
        assert_eq!(h.verdict(), Some(Verdict::Degraded));
        let ev = h.report().evidence(t0 + Duration::from_secs(5));
        assert!(ev.starts_with("api (down 3.0s"), "{ev}");
    }

    #[test]
    fn unreachable_site_is_down_even_with_only_non_critical_probes_failing_to_connect() {
        let t0 = Instant::now();
        let mut h = SiteHealth::new(&[spec("web", true), spec("extra", false)], 1, 2);
        h.observe(&[outcome(true, true), outcome(true, true)], t0);
        h.observe(&[outcome(false, false), outcome(false, false)], t0);
        // fall = 2: the components are counted, but both verdict rules need the second round.
        assert_eq!(h.verdict(), Some(Verdict::Healthy));
        h.observe(&[outcome(false, false), outcome(false, false)], t0);
        assert_eq!(h.verdict(), Some(Verdict::Down));
        assert!(!h.report().reachable);
        h.observe(&[outcome(true, true), outcome(true, true)], t0);
        assert_eq!(
            h.verdict(),
            Some(Verdict::Healthy),
            "rise = 1 brings it back in one round"
        );
    }
}
