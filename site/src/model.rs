//! Rows of the site's tables as the JSON API shows them, and the meeting state machine.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// A registered user.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct User {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A scheduled, running or ended meeting.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Meeting {
    pub id: Uuid,
    pub host_id: Uuid,
    pub topic: String,
    pub start_time: Option<DateTime<Utc>>,
    pub duration_minutes: i32,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One usage event (a join, or a meeting's end with its minutes).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct UsageRecord {
    pub id: Uuid,
    pub meeting_id: Uuid,
    pub user_id: Option<Uuid>,
    pub kind: String,
    pub minutes: i32,
    pub site: String,
    pub recorded_at: DateTime<Utc>,
}

/// A custom page's content.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Page {
    pub path: String,
    pub title: String,
    pub body: String,
}

/// The current client download for one platform.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct ClientVersion {
    pub platform: String,
    pub version: String,
    pub download_url: String,
}

/// Sums over a set of usage rows.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub(crate) struct UsageTotals {
    pub joins: i64,
    pub meetings_ended: i64,
    pub minutes: i64,
}

/// `GET /api/usage/report`: totals, and the same split by the site that recorded them.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct UsageReport {
    #[serde(flatten)]
    pub total: UsageTotals,
    pub by_site: BTreeMap<String, UsageTotals>,
}

impl UsageReport {
    /// Builds the report from `(site, kind, count, minutes)` groups.
    pub(crate) fn from_groups(
        groups: impl IntoIterator<Item = (String, String, i64, i64)>,
    ) -> Self {
        let mut by_site = BTreeMap::new();
        // Both sites always appear, so a reader never has to treat a missing key as zero.
        by_site.insert("primary".to_owned(), UsageTotals::default());
        by_site.insert("backup".to_owned(), UsageTotals::default());
        let mut total = UsageTotals::default();
        for (site, kind, count, minutes) in groups {
            let entry = by_site.entry(site).or_default();
            for t in [&mut total, entry] {
                match kind.as_str() {
                    "join" => t.joins += count,
                    "meeting_end" => t.meetings_ended += count,
                    _ => {}
                }
                t.minutes += minutes;
            }
        }
        UsageReport { total, by_site }
    }
}

/// What can be done to a meeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MeetingAction {
    Start,
    End,
    Join,
}

impl MeetingAction {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "start" => Some(MeetingAction::Start),
            "end" => Some(MeetingAction::End),
            "join" => Some(MeetingAction::Join),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MeetingAction::Start => "start",
            MeetingAction::End => "end",
            MeetingAction::Join => "join",
        }
    }
}

/// The meeting state machine: the status after `action`, or `None` when it is illegal
/// (answered with 409). Joining leaves the status as it is.
pub(crate) fn next_status(status: &str, action: MeetingAction) -> Option<&'static str> {
    match (status, action) {
        ("scheduled", MeetingAction::Start) => Some("in_progress"),
        ("in_progress", MeetingAction::End) => Some("ended"),
        ("scheduled", MeetingAction::Join) => Some("scheduled"),
        ("in_progress", MeetingAction::Join) => Some("in_progress"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MeetingAction::*;

    #[test]
    fn state_machine_allows_only_forward_moves() {
        assert_eq!(next_status("scheduled", Start), Some("in_progress"));
        assert_eq!(next_status("in_progress", End), Some("ended"));
        assert_eq!(next_status("scheduled", Join), Some("scheduled"));
        assert_eq!(next_status("in_progress", Join), Some("in_progress"));
        assert_eq!(next_status("scheduled", End), None);
        assert_eq!(next_status("in_progress", Start), None);
        assert_eq!(next_status("ended", Start), None);
        assert_eq!(next_status("ended", End), None);
        assert_eq!(next_status("ended", Join), None);
        assert_eq!(next_status("bogus", Start), None);
    }

    #[test]
    fn usage_report_sums_per_site_and_total() {
        let r = UsageReport::from_groups([
            ("primary".into(), "join".into(), 3, 0),
            ("primary".into(), "meeting_end".into(), 2, 45),
            ("backup".into(), "meeting_end".into(), 1, 10),
        ]);
        assert_eq!(
            r.total,
            UsageTotals {
                joins: 3,
                meetings_ended: 3,
                minutes: 55
            }
        );
        assert_eq!(r.by_site["backup"].meetings_ended, 1);
        assert_eq!(r.by_site["primary"].minutes, 45);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["joins"], 3);
        assert_eq!(json["by_site"]["backup"]["minutes"], 10);
    }

    #[test]
    fn empty_usage_report_lists_both_sites() {
        let json = serde_json::to_value(UsageReport::from_groups([])).unwrap();
        assert_eq!(json["by_site"]["primary"]["joins"], 0);
        assert_eq!(json["by_site"]["backup"]["meetings_ended"], 0);
    }
}
