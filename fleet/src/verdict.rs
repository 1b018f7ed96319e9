//! The fleet verdict: a pure function of the members' fresh votes. It is what the decider feeds
//! the routing state machine, so one proxy's broken path to a site never moves the fleet.
//!
//! Rules, per site, over the fresh votes (a vote older than `stale_after` is stale and ignored;
//! a dead member's vote is gone with its lease):
//! - `needed` = a majority of the fresh members (`quorum = "majority"`), or the configured count;
//! - `down` when at least `needed` fresh members see it down;
//! - else `degraded` when at least `needed` see it down or degraded;
//! - else `healthy` when at least `needed` see it healthy;
//! - else no verdict (`None`): no quorum either way (a tie, too few fresh members), which the
//!   state machine treats as "unknown": nothing moves and failback's hold-down restarts.
//!
//! Members that see a site down while the fleet does not are dissenters: their own path to
//! that site is broken. They are named in an alert, and never move traffic.

use std::time::Duration;

use chrono::{DateTime, Utc};
use gsb_health::Verdict;
use serde::Serialize;

use crate::config::Quorum;
use crate::vote::Vote;

/// Who voted what for one site.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Fresh members that see it healthy.
    pub healthy: Vec<String>,
    /// ... degraded.
    pub degraded: Vec<String>,
    /// ... down.
    pub down: Vec<String>,
    /// ... with no verdict yet.
    pub unknown: Vec<String>,
}

impl Tally {
    /// The members that voted `verdict` (`None`: no verdict).
    pub fn of(&self, verdict: Option<Verdict>) -> &[String] {
        match verdict {
            Some(Verdict::Healthy) => &self.healthy,
            Some(Verdict::Degraded) => &self.degraded,
            Some(Verdict::Down) => &self.down,
            None => &self.unknown,
        }
    }
}

/// A member whose view of a site contradicts the fleet's: it sees the site down, the fleet not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Dissent {
    /// `0` primary, `1` backup.
    pub site: usize,
    /// The member.
    pub member: String,
    /// Its region.
    pub region: String,
}

/// The fleet's verdict of both sites and the evidence behind it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FleetVerdict {
    /// `[primary, backup]`: what the routing state machine is fed.
    pub verdicts: [Option<Verdict>; 2],
    /// Votes needed for a verdict.
    pub needed: usize,
    /// Members whose vote counts.
    pub fresh: Vec<String>,
    /// Members whose vote is too old to count (alive by their lease, but not probing).
    pub stale: Vec<String>,
    /// `[primary, backup]` tallies of the fresh votes.
    pub tallies: [Tally; 2],
    /// Members that see a site down while the fleet does not.
    pub dissent: Vec<Dissent>,
}

/// Whether a vote seen at `seen_at` still counts at `now`. A vote from slightly in the future
/// (another member's clock ahead) counts.
pub fn is_fresh(seen_at: DateTime<Utc>, now: DateTime<Utc>, stale_after: Duration) -> bool {
    let age = now.signed_duration_since(seen_at);
    age <= chrono::Duration::from_std(stale_after).unwrap_or(chrono::Duration::MAX)
}

/// The fleet verdict of `votes` at `now` (pure; see the module doc for the rules).
pub fn fleet_verdict(
    votes: &[Vote],
    now: DateTime<Utc>,
    stale_after: Duration,
    quorum: Quorum,
) -> FleetVerdict {
    let mut out = FleetVerdict::default();
    let mut fresh_votes = Vec::new();
    for v in votes {
        if is_fresh(v.seen_at, now, stale_after) {
            out.fresh.push(v.name.clone());
            fresh_votes.push(v);
        } else {
            out.stale.push(v.name.clone());
        }
    }
    out.needed = match quorum {
        Quorum::Majority => fresh_votes.len() / 2 + 1,
        Quorum::Count(n) => n,
    };
    for site in 0..2 {
        let tally = &mut out.tallies[site];
        for v in &fresh_votes {
            let list = match v.sites[site].verdict {
                Some(Verdict::Healthy) => &mut tally.healthy,
                Some(Verdict::Degraded) => &mut tally.degraded,
                Some(Verdict::Down) => &mut tally.down,
                None => &mut tally.unknown,
            };
            list.push(v.name.clone());
        }
        let (down, degraded, healthy) =
            (tally.down.len(), tally.degraded.len(), tally.healthy.len());
        let n = out.needed;
        out.verdicts[site] = if fresh_votes.is_empty() {
            None
        } else if down >= n {
            Some(Verdict::Down)
        } else if down + degraded >= n {
            Some(Verdict::Degraded)
        } else if healthy >= n {
            Some(Verdict::Healthy)
        } else {
            None
        };
        if out.verdicts[site] != Some(Verdict::Down) {
            for v in &fresh_votes {
                if v.sites[site].verdict == Some(Verdict::Down) {
                    out.dissent.push(Dissent {
                        site,
                        member: v.name.clone(),
                        region: v.region.clone(),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vote::SiteVote;
    use Verdict::{Degraded, Down, Healthy};

    const STALE: Duration = Duration::from_secs(5);

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn vote(name: &str, region: &str, age_s: i64, p: Option<Verdict>, b: Option<Verdict>) -> Vote {
        Vote {
            name: name.into(),
            region: region.into(),
            seen_at: t0() - chrono::Duration::seconds(age_s),
            sites: [
                SiteVote {
                    verdict: p,
                    evidence: String::new(),
                },
                SiteVote {
                    verdict: b,
                    evidence: String::new(),
                },
            ],
            applied_revision: 0,
            ready: true,
            unready_reason: None,
        }
    }

    fn fv(votes: &[Vote]) -> FleetVerdict {
        fleet_verdict(votes, t0(), STALE, Quorum::Majority)
    }

    #[test]
    fn a_quorum_sees_the_primary_down() {
        let v = fv(&[
            vote("a", "east", 0, Some(Down), Some(Healthy)),
            vote("b", "east", 1, Some(Down), Some(Healthy)),
            vote("c", "west", 0, Some(Healthy), Some(Healthy)),
        ]);
        assert_eq!(v.verdicts, [Some(Down), Some(Healthy)]);
        assert_eq!(v.needed, 2);
        assert_eq!(v.tallies[0].down, ["a", "b"]);
        assert!(
            v.dissent.is_empty(),
            "down is the fleet's verdict: no dissent"
        );
    }

    #[test]
    fn a_minority_seeing_down_is_named_and_moves_nothing() {
        let v = fv(&[
            vote("a", "east", 0, Some(Healthy), Some(Healthy)),
            vote("b", "west", 0, Some(Down), Some(Healthy)),
            vote("c", "east", 0, Some(Healthy), Some(Healthy)),
        ]);
        assert_eq!(v.verdicts[0], Some(Healthy));
        assert_eq!(
            v.dissent,
            vec![Dissent {
                site: 0,
                member: "b".into(),
                region: "west".into()
            }]
        );
    }

    #[test]
    fn degraded_needs_a_quorum_of_degraded_or_worse() {
        let v = fv(&[
            vote("a", "", 0, Some(Down), Some(Healthy)),
            vote("b", "", 0, Some(Degraded), Some(Healthy)),
            vote("c", "", 0, Some(Healthy), Some(Healthy)),
        ]);
        assert_eq!(v.verdicts[0], Some(Degraded));
        assert_eq!(v.dissent.len(), 1, "a sees down, the fleet only degraded");
        let v = fv(&[
            vote("a", "", 0, Some(Degraded), Some(Healthy)),
            vote("b", "", 0, Some(Healthy), Some(Healthy)),
            vote("c", "", 0, Some(Healthy), Some(Healthy)),
        ]);
        assert_eq!(v.verdicts[0], Some(Healthy));
    }

    #[test]
    fn stale_votes_do_not_count() {
        let v = fv(&[
            vote("a", "", 0, Some(Down), Some(Healthy)),
            vote("b", "", 6, Some(Down), Some(Healthy)),
            vote("c", "", 0, Some(Healthy), Some(Healthy)),
        ]);
        assert_eq!(v.fresh, ["a", "c"]);
        assert_eq!(v.stale, ["b"]);
        assert_eq!(v.needed, 2);
        assert_eq!(
            v.verdicts,
            [None, Some(Healthy)],
            "1 down vs 1 healthy of 2 fresh: a tie, no verdict"
        );
        assert_eq!(v.dissent.len(), 1);
    }

    #[test]
    fn a_vote_at_exactly_stale_after_still_counts_and_future_votes_count() {
        let v = fv(&[
            vote("a", "", 5, Some(Down), Some(Healthy)),
            vote("b", "", -3, Some(Down), Some(Healthy)),
        ]);
        assert_eq!(v.fresh, ["a", "b"]);
        assert_eq!(v.verdicts[0], Some(Down));
    }

    #[test]
    fn ties_never_decide() {
        let v = fv(&[
            vote("a", "east", 0, Some(Down), Some(Healthy)),
            vote("b", "east", 0, Some(Down), Some(Healthy)),
            vote("c", "west", 0, Some(Healthy), Some(Healthy)),
            vote("d", "west", 0, Some(Healthy), Some(Healthy)),
        ]);
        assert_eq!(v.needed, 3);
        assert_eq!(v.verdicts[0], None, "2 vs 2: no quorum either way");
        assert_eq!(v.verdicts[1], Some(Healthy));
    }

    #[test]
    fn a_whole_region_cut_off_is_outvoted_by_the_others() {
        // Two regions: west (1 proxy) cannot reach the primary; east (2 proxies) can.
        let v = fv(&[
            vote("e1", "east", 0, Some(Healthy), Some(Healthy)),
            vote("e2", "east", 0, Some(Healthy), Some(Healthy)),
            vote("w1", "west", 0, Some(Down), Some(Healthy)),
        ]);
        assert_eq!(v.verdicts[0], Some(Healthy));
        assert_eq!(v.dissent[0].region, "west");
        // ...and the other way round: the majority region decides.
        let v = fv(&[
            vote("e1", "east", 0, Some(Down), Some(Healthy)),
            vote("e2", "east", 0, Some(Down), Some(Healthy)),
            vote("w1", "west", 0, Some(Healthy), Some(Healthy)),
        ]);
        assert_eq!(v.verdicts[0], Some(Down));
    }

    #[test]
    fn members_without_a_verdict_count_towards_the_quorum_size() {
        // A member that just started has no verdict yet: it is fresh, so it raises `needed`.
        let v = fv(&[
            vote("a", "", 0, Some(Down), Some(Healthy)),
            vote("b", "", 0, None, None),
            vote("c", "", 0, Some(Healthy), Some(Healthy)),
        ]);
        assert_eq!(v.needed, 2);
        assert_eq!(
            v.verdicts,
            [None, Some(Healthy)],
            "1 down + 1 healthy of 3: no quorum"
        );
        assert_eq!(v.tallies[0].unknown, ["b"]);
    }

    #[test]
    fn a_fixed_quorum_holds_when_too_few_members_are_fresh() {
        let votes = [vote("a", "", 0, Some(Down), Some(Healthy))];
        let v = fleet_verdict(&votes, t0(), STALE, Quorum::Count(2));
        assert_eq!(v.verdicts, [None, None], "1 fresh member < quorum 2");
        let v = fleet_verdict(&votes, t0(), STALE, Quorum::Majority);
        assert_eq!(
            v.verdicts,
            [Some(Down), Some(Healthy)],
            "majority of the one member left"
        );
    }

    #[test]
    fn no_votes_no_verdict() {
        let v = fv(&[]);
        assert_eq!(v.verdicts, [None, None]);
        let v = fv(&[vote("a", "", 60, Some(Down), Some(Healthy))]);
        assert_eq!(v.verdicts, [None, None], "only a stale vote");
        assert_eq!(v.stale, ["a"]);
    }

    #[test]
    fn the_backup_is_judged_by_the_same_rule() {
        let v = fv(&[
            vote("a", "", 0, Some(Down), Some(Down)),
            vote("b", "", 0, Some(Down), Some(Down)),
            vote("c", "", 0, Some(Down), Some(Healthy)),
        ]);
        assert_eq!(v.verdicts, [Some(Down), Some(Down)]);
        assert_eq!(v.tallies[1].healthy, ["c"]);
    }
}
