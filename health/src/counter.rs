//! Per-component rise/fall counting: a pure function of consecutive probe results.

/// A component's state changed (after `rise` successes or `fall` failures in a row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The component is now up.
    Up,
    /// The component is now down.
    Down,
}

/// Counts consecutive results of one component against its rise/fall thresholds.
///
/// The first result decides the state at once (there is no history to smooth yet), so a proxy
/// that starts while a site is down does not route to it for `fall` rounds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ComponentCounter {
    /// `None` until the first result arrives.
    up: Option<bool>,
    /// Consecutive results contradicting the current state.
    streak: u32,
}

impl ComponentCounter {
    /// A counter with no result yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the component is up; `None` before the first result.
    pub fn is_up(&self) -> Option<bool> {
        self.up
    }

    /// Records one probe result; returns the transition if the state changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        match self.up {
            None => {
                self.up = Some(ok);
                self.streak = 0;
                Some(if ok { Transition::Up } else { Transition::Down })
            }
            Some(up) if up == ok => {
                self.streak = 0;
                None
            }
            Some(_) => {
                self.streak += 1;
                let needed = if ok { rise } else { fall }.max(1);
                if self.streak >= needed {
                    self.up = Some(ok);
                    self.streak = 0;
                    Some(if ok { Transition::Up } else { Transition::Down })
                } else {
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides() {
        let mut c = ComponentCounter::new();
        assert_eq!(c.is_up(), None);
        assert_eq!(c.record(false, 2, 3), Some(Transition::Down));
        assert_eq!(c.is_up(), Some(false));
    }

    #[test]
    fn falls_after_fall_failures_in_a_row() {
        let mut c = ComponentCounter::new();
        c.record(true, 2, 3);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), Some(Transition::Down));
        assert_eq!(c.is_up(), Some(false));
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut c = ComponentCounter::new();
        c.record(true, 2, 3);
        c.record(false, 2, 3);
        c.record(false, 2, 3);
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.is_up(), Some(true));
    }

    #[test]
    fn rises_after_rise_successes() {
        let mut c = ComponentCounter::new();
        c.record(false, 2, 3);
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(true, 2, 3), Some(Transition::Up));
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut c = ComponentCounter::new();
        c.record(true, 0, 0);
        assert_eq!(c.record(false, 0, 0), Some(Transition::Down));
    }
}
