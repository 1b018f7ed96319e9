//! Maintenance windows: scheduled, time-zone aware periods during which traffic goes to the
//! backup. Pure functions of the wall-clock time, so they are tested without waiting.

use chrono::{DateTime, Duration as ChronoDuration, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;

use crate::config::{parse_hh_mm, parse_weekday, ConfigError, MaintenanceConfig};

/// One recurring window: on `days` (all when empty), from `start` local time, for `duration`.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    days: Vec<Weekday>,
    start: NaiveTime,
    duration: ChronoDuration,
    tz: Tz,
}

impl Window {
    /// Builds a window from its config section (`key` names it in errors, e.g. `maintenance[0]`).
    pub fn from_config(key: &str, c: &MaintenanceConfig) -> Result<Window, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            key: format!("{key}.{field}"),
            message,
        };
        let days = c
            .days
            .iter()
            .map(|d| {
                parse_weekday(d)
                    .ok_or_else(|| invalid("days", format!("unknown day {d:?}; valid: mon..sun")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let start = parse_hh_mm(&c.start)
            .ok_or_else(|| invalid("start", format!("expected HH:MM, got {:?}", c.start)))?;
        let tz = c.timezone.parse::<Tz>().map_err(|_| {
            invalid(
                "timezone",
                format!("unknown IANA time zone {:?}", c.timezone),
            )
        })?;
        let duration = ChronoDuration::from_std(c.duration)
            .map_err(|_| invalid("duration", "too long".to_string()))?;
        Ok(Window {
            days,
            start,
            duration,
            tz,
        })
    }

    /// The UTC start of the window beginning on local `date`, if the window runs that day.
    fn start_on(&self, date: NaiveDate) -> Option<DateTime<Utc>> {
        use chrono::Datelike;
        if !self.days.is_empty() && !self.days.contains(&date.weekday()) {
            return None;
        }
        let local = date.and_time(self.start);
        // A start inside a DST gap (e.g. 02:30 on spring-forward day) begins when the clock
        // resumes, an hour later; in an overlap the first occurrence counts.
        let zoned = self.tz.from_local_datetime(&local).earliest().or_else(|| {
            self.tz
                .from_local_datetime(&(local + ChronoDuration::hours(1)))
                .earliest()
        })?;
        Some(zoned.with_timezone(&Utc))
    }

    /// Starts of the windows that could contain or follow `now` (from 8 days before to 8 after).
    fn starts_around(&self, now: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let today = now.with_timezone(&self.tz).date_naive();
        (-8..=8).filter_map(move |d| self.start_on(today + ChronoDuration::days(d)))
    }

    /// Whether the window is running at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.starts_around(now)
            .any(|s| s <= now && now < s + self.duration)
    }

    /// The next start or end of this window strictly after `now`.
    pub fn next_transition(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.starts_around(now)
            .flat_map(|s| [s, s + self.duration])
            .filter(|t| *t > now)
            .min()
    }
}

/// Every configured window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schedule {
    windows: Vec<Window>,
}

impl Schedule {
    /// Builds the schedule from the `[[maintenance]]` sections.
    pub fn from_config(windows: &[MaintenanceConfig]) -> Result<Schedule, ConfigError> {
        let windows = windows
            .iter()
            .enumerate()
            .map(|(i, w)| Window::from_config(&format!("maintenance[{i}]"), w))
            .collect::<Result<_, _>>()?;
        Ok(Schedule { windows })
    }

    /// No window configured.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Whether any window is running at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.windows.iter().any(|w| w.is_active(now))
    }

    /// The next time any window starts or ends, after `now`.
    pub fn next_transition(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.windows
            .iter()
            .filter_map(|w| w.next_transition(now))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn window(days: &[&str], start: &str, hours: u64, tz: &str) -> Window {
        let c = MaintenanceConfig {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            duration: Duration::from_secs(hours * 3600),
            timezone: tz.into(),
        };
        Window::from_config("maintenance[0]", &c).unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn daily_window_in_los_angeles_follows_daylight_saving() {
        let w = window(&[], "19:00", 2, "America/Los_Angeles");
        // Summer: PDT = UTC-7, so 19:00 local = 02:00 UTC next day.
        assert!(!w.is_active(utc("2024-07-10T01:59:59Z")));
        assert!(w.is_active(utc("2024-07-10T02:00:00Z")));
        assert!(w.is_active(utc("2024-07-10T03:59:59Z")));
        assert!(!w.is_active(utc("2024-07-10T04:00:00Z")));
        // Winter: PST = UTC-8, so 19:00 local = 03:00 UTC.
        assert!(!w.is_active(utc("2024-01-10T02:30:00Z")));
        assert!(w.is_active(utc("2024-01-10T03:30:00Z")));
        assert_eq!(
            w.next_transition(utc("2024-01-10T03:30:00Z")),
            Some(utc("2024-01-10T05:00:00Z"))
        );
        assert_eq!(
            w.next_transition(utc("2024-01-10T05:00:00Z")),
            Some(utc("2024-01-11T03:00:00Z"))
        );
    }

    #[test]
    fn weekly_window_spanning_midnight_only_on_its_day() {
        // Saturday 23:00 UTC for 2h: active into Sunday 01:00, not on Friday night.
        let w = window(&["sat"], "23:00", 2, "UTC");
        assert!(w.is_active(utc("2024-06-01T23:30:00Z"))); // Saturday
        assert!(w.is_active(utc("2024-06-02T00:59:00Z"))); // Sunday, still inside
        assert!(!w.is_active(utc("2024-06-02T01:00:00Z")));
        assert!(!w.is_active(utc("2024-05-31T23:30:00Z"))); // Friday
        assert_eq!(
            w.next_transition(utc("2024-06-02T01:00:00Z")),
            Some(utc("2024-06-08T23:00:00Z"))
        );
    }

    #[test]
    fn start_in_a_dst_gap_begins_when_the_clock_resumes() {
        // 2024-03-10 02:30 does not exist in Los Angeles; the window starts at 03:30 PDT.
        let w = window(&["sun"], "02:30", 1, "America/Los_Angeles");
        assert!(!w.is_active(utc("2024-03-10T10:29:00Z")));
        assert!(w.is_active(utc("2024-03-10T10:30:00Z")));
    }

    #[test]
    fn schedule_combines_windows() {
        let s = Schedule {
            windows: vec![
                window(&[], "01:00", 1, "UTC"),
                window(&[], "05:00", 1, "UTC"),
            ],
        };
        assert!(s.is_active(utc("2024-06-01T05:10:00Z")));
        assert!(!s.is_active(utc("2024-06-01T03:00:00Z")));
        assert_eq!(
            s.next_transition(utc("2024-06-01T03:00:00Z")),
            Some(utc("2024-06-01T05:00:00Z"))
        );
        assert!(Schedule::default()
            .next_transition(utc("2024-06-01T03:00:00Z"))
            .is_none());
    }
}
