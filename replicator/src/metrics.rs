//! Replicator metrics (names from the DESIGN contract) and the `/status` state.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
use serde::Serialize;

/// Every metric the replicator exports, registered on the binary's registry.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub lag: GaugeVec,
    pub applied: IntCounterVec,
    pub pending: IntGaugeVec,
    pub pending_bytes: IntGaugeVec,
    pub slot_retained: IntGaugeVec,
    pub late: IntGaugeVec,
    pub oldest_pending_age: GaugeVec,
    pub conflicts: IntCounterVec,
    pub skew_rejected: IntCounterVec,
    pub errors: IntCounterVec,
    pub batch_seconds: HistogramVec,
    pub active: IntGauge,
    pub copy_last_success: Gauge,
    pub copy_rows: IntGaugeVec,
    pub copy_failures: IntCounter,
    pub verify_equal: IntGauge,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(r: &Registry) -> Result<Metrics, prometheus::Error> {
        let m = Metrics {
            lag: GaugeVec::new(
                Opts::new("gsb_replication_lag_seconds", "End-to-end lag: commit on the source to visible on the target, from heartbeats"),
                &["direction"],
            )?,
            applied: IntCounterVec::new(
                Opts::new("gsb_replication_applied_total", "Changes applied on the target"),
                &["direction", "table"],
            )?,
            pending: IntGaugeVec::new(
                Opts::new("gsb_replication_pending", "Changes captured on the source not yet applied on the target"),
                &["direction"],
            )?,
            pending_bytes: IntGaugeVec::new(
                Opts::new("gsb_replication_pending_wal_bytes", "Logical capture: source WAL not yet confirmed applied on the target"),
                &["direction"],
            )?,
            slot_retained: IntGaugeVec::new(
                Opts::new("gsb_replication_slot_retained_bytes", "Logical capture: WAL the source keeps for the direction's slot (restart_lsn to the WAL end)"),
                &["direction"],
            )?,
            late: IntGaugeVec::new(
                Opts::new("gsb_replication_recovery_window", "Last reconnect to a source: what it had committed that was shipped only after the reconnect (kind = transactions, rows, lost_conflicts)"),
                &["direction", "kind"],
            )?,
            oldest_pending_age: GaugeVec::new(
                Opts::new("gsb_replication_oldest_pending_age_seconds", "Age of the oldest change not yet applied"),
                &["direction"],
            )?,
            conflicts: IntCounterVec::new(
                Opts::new("gsb_replication_conflicts_total", "Concurrent writes resolved (the loser is in gsb.conflicts)"),
                &["table"],
            )?,
            skew_rejected: IntCounterVec::new(
                Opts::new("gsb_replication_clock_skew_rejected_total", "Remote changes rejected: stamp beyond max_clock_skew"),
                &["direction"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("gsb_replication_errors_total", "Replication sessions that failed (then retried)"),
                &["direction"],
            )?,
            batch_seconds: HistogramVec::new(
                HistogramOpts::new("gsb_replication_batch_duration_seconds", "Time to fetch and apply one batch")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
                &["direction"],
            )?,
            active: IntGauge::new("gsb_replicator_active", "1 when this instance holds the lock and replicates, 0 when standby")?,
            copy_last_success: Gauge::new(
                "gsb_config_copy_last_success_timestamp_seconds",
                "Unix time of the last successful config copy",
            )?,
            copy_rows: IntGaugeVec::new(
                Opts::new("gsb_config_copy_rows", "Rows copied per config table in the last copy"),
                &["table"],
            )?,
            copy_failures: IntCounter::new("gsb_config_copy_failures_total", "Failed config copies")?,
            verify_equal: IntGauge::new("gsb_verify_equal", "Last periodic verify: 1 equal, 0 different, -1 never run")?,
        };
        r.register(Box::new(m.lag.clone()))?;
        r.register(Box::new(m.applied.clone()))?;
        r.register(Box::new(m.pending.clone()))?;
        r.register(Box::new(m.pending_bytes.clone()))?;
        r.register(Box::new(m.slot_retained.clone()))?;
        r.register(Box::new(m.late.clone()))?;
        r.register(Box::new(m.oldest_pending_age.clone()))?;
        r.register(Box::new(m.conflicts.clone()))?;
        r.register(Box::new(m.skew_rejected.clone()))?;
        r.register(Box::new(m.errors.clone()))?;
        r.register(Box::new(m.batch_seconds.clone()))?;
        r.register(Box::new(m.active.clone()))?;
        r.register(Box::new(m.copy_last_success.clone()))?;
        r.register(Box::new(m.copy_rows.clone()))?;
        r.register(Box::new(m.copy_failures.clone()))?;
        r.register(Box::new(m.verify_equal.clone()))?;
        m.verify_equal.set(-1);
        Ok(m)
    }
}

/// One direction in `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DirectionStatus {
    pub pending_rows: Option<i64>,
    /// Logical capture: source WAL bytes not yet confirmed applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_wal_bytes: Option<i64>,
    /// The last reconnect to the source (e.g. the primary back after a failover): what it had
    /// committed that reached the target only then, and which of it lost a conflict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<RecoveryWindow>,
    /// Why the direction stopped, when it needs an operator (e.g. an invalidated slot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub oldest_pending_age_seconds: Option<f64>,
    pub lag_seconds: Option<f64>,
    pub last_apply: Option<DateTime<Utc>>,
}

/// What a source had committed that was shipped only after a reconnect.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct RecoveryWindow {
    /// When the window closed (everything committed before the reconnect applied).
    pub at: DateTime<Utc>,
    /// Source transactions shipped late.
    pub transactions: u64,
    /// Rows shipped late.
    pub rows: u64,
    /// `gsb.conflicts` ids (on the target) where a late version lost.
    pub lost_conflict_ids: Vec<i64>,
}

/// Result of the last verify in `/status`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VerifyStatus {
    pub at: DateTime<Utc>,
    pub equal: bool,
}

/// Directions of `/status`, keyed by the contract's names.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Directions {
    pub primary_to_backup: DirectionStatus,
    pub backup_to_primary: DirectionStatus,
}

/// The `/status` JSON document.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Status {
    pub active: bool,
    pub directions: Directions,
    pub last_verify: Option<VerifyStatus>,
    pub last_config_copy: Option<DateTime<Utc>>,
}

/// Shared status; the lock is never held across an await.
pub(crate) type SharedStatus = Arc<Mutex<Status>>;

/// Runs `f` on one direction's status.
pub(crate) fn with_dir(
    status: &SharedStatus,
    direction: &str,
    f: impl FnOnce(&mut DirectionStatus),
) {
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    match direction {
        "primary_to_backup" => f(&mut s.directions.primary_to_backup),
        _ => f(&mut s.directions.backup_to_primary),
    }
}
