//! What each member publishes under its lease (its vote), and what the decider publishes under
//! its leadership key. Plain data, JSON in etcd.

use chrono::{DateTime, Utc};
use gsb_health::Verdict;
use serde::{Deserialize, Serialize};

/// One member's view of one site.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteVote {
    /// `healthy`, `degraded`, `down`; `null` before this member's first verdict.
    pub verdict: Option<Verdict>,
    /// Components down and for how long, as this member's probes saw them.
    #[serde(default)]
    pub evidence: String,
}

/// A member's vote: its own probes' verdicts of both sites, refreshed every probe round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// The member (`coordination.name`).
    pub name: String,
    /// Its region label.
    #[serde(default)]
    pub region: String,
    /// When its probes produced these verdicts (its wall clock).
    pub seen_at: DateTime<Utc>,
    /// `[primary, backup]`.
    pub sites: [SiteVote; 2],
    /// The decision revision this member routes on (0: none yet).
    #[serde(default)]
    pub applied_revision: i64,
    /// False while this member cannot serve its users (e.g. cut off from the active site).
    #[serde(default = "yes")]
    pub ready: bool,
    /// Why it is not ready.
    #[serde(default)]
    pub unready_reason: Option<String>,
}

fn yes() -> bool {
    true
}

impl Vote {
    /// The verdicts `[primary, backup]`.
    pub fn verdicts(&self) -> [Option<Verdict>; 2] {
        [self.sites[0].verdict, self.sites[1].verdict]
    }
}

/// What the decider writes under its leadership key at every confirmation: who decides and
/// since when (the key's create revision is the fence).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeciderStatus {
    /// The deciding member.
    pub name: String,
    /// Its region.
    #[serde(default)]
    pub region: String,
    /// When it won the election.
    pub since: DateTime<Utc>,
    /// Its last confirmation.
    pub confirmed_at: DateTime<Utc>,
}
