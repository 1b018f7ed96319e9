//! Config copy primary -> backup: one repeatable-read snapshot, replaced in one transaction,
//! checksum-verified; daily at `config_copy_at` and on demand.

use std::fmt;

use chrono::{DateTime, TimeZone, Utc};
use tokio_postgres::IsolationLevel;
use tokio_util::sync::CancellationToken;

use crate::config::qualify;
use crate::db::{connect, Site};
use crate::metrics::{Metrics, SharedStatus};
use crate::schema::{ident, qident, table_info};
use crate::{Config, Error};

/// One copied table.
#[derive(Debug, Clone)]
pub struct CopiedTable {
    /// `schema.table`.
    pub table: String,
    /// Rows now on the backup.
    pub rows: i64,
    /// md5 of the table's rows (as ordered JSON), equal on both sites.
    pub checksum: String,
}

/// What a config copy did.
#[derive(Debug, Clone)]
pub struct CopyReport {
    /// Per table, in config order.
    pub tables: Vec<CopiedTable>,
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tables {
            writeln!(
                f,
                "{}: {} rows copied primary -> backup, checksum {}",
                t.table, t.rows, t.checksum
            )?;
        }
        Ok(())
    }
}

/// Copies `config_tables` from the primary to the backup now.
pub async fn copy_config(config: &Config) -> Result<CopyReport, Error> {
    let mut p = connect(&config.link(Site::Primary)?).await?;
    let mut b = connect(&config.link(Site::Backup)?).await?;
    let mut infos = Vec::new();
    for t in &config.config_tables {
        let name = qualify(t);
        let info = table_info(&p, Site::Primary, &name).await?;
        table_info(&b, Site::Backup, &name).await?;
        infos.push(info);
    }
    let ptx = p
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| Error::db("primary", "starting the config snapshot", e))?;
    let btx = b
        .client
        .transaction()
        .await
        .map_err(|e| Error::db("backup", "starting the config copy", e))?;
    let mut report = CopyReport { tables: Vec::new() };
    for info in &infos {
        let q = qident(&info.name);
        let order = info
            .pk
            .iter()
            .map(|c| format!("x.{}", ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let snap = format!(
            "SELECT count(*)::int8, coalesce(jsonb_agg(to_jsonb(x) ORDER BY {order})::text, '[]') FROM {q} x"
        );
        let r = ptx
            .query_one(&snap, &[])
            .await
            .map_err(|e| Error::db("primary", format!("reading {}", info.name), e))?;
        let rows: i64 = r.get(0);
        let json: String = r.get(1);
        let sum_sql = format!(
            "SELECT md5(coalesce(jsonb_agg(to_jsonb(x) ORDER BY {order})::text, '[]')) FROM {q} x"
        );
        let primary_sum: String = ptx
            .query_one(&sum_sql, &[])
            .await
            .map_err(|e| Error::db("primary", format!("checksumming {}", info.name), e))?
            .get(0);
        btx.execute(&format!("DELETE FROM {q}"), &[])
            .await
            .map_err(|e| Error::db("backup", format!("clearing {}", info.name), e))?;
        btx.execute(
            &format!("INSERT INTO {q} SELECT * FROM jsonb_populate_recordset(NULL::{q}, $1::text::jsonb)"),
            &[&json],
        )
        .await
        .map_err(|e| Error::db("backup", format!("writing {}", info.name), e))?;
        let backup_sum: String = btx
            .query_one(&sum_sql, &[])
            .await
            .map_err(|e| Error::db("backup", format!("checksumming {}", info.name), e))?
            .get(0);
        if backup_sum != primary_sum {
            return Err(Error::Checksum {
                table: info.name.clone(),
                primary: primary_sum,
                backup: backup_sum,
            });
        }
        report.tables.push(CopiedTable {
            table: info.name.clone(),
            rows,
            checksum: primary_sum,
        });
    }
    btx.commit()
        .await
        .map_err(|e| Error::db("backup", "committing the config copy", e))?;
    let _ = ptx.commit().await;
    Ok(report)
}

/// The next `at` (local time in `tz`) strictly after `now`.
pub(crate) fn next_run(
    now: DateTime<Utc>,
    at: chrono::NaiveTime,
    tz: chrono_tz::Tz,
) -> DateTime<Utc> {
    let local_today = now.with_timezone(&tz).date_naive();
    for days in 0..3 {
        let day = local_today + chrono::Days::new(days);
        // A time skipped by a DST jump runs at the first instant after it.
        let candidate = tz
            .from_local_datetime(&day.and_time(at))
            .earliest()
            .or_else(|| {
                tz.from_local_datetime(&(day.and_time(at) + chrono::Duration::hours(1)))
                    .earliest()
            });
        if let Some(c) = candidate {
            let c = c.with_timezone(&Utc);
            if c > now {
                return c;
            }
        }
    }
    now + chrono::Duration::days(1)
}

/// Runs the copy daily until `shutdown`; a failed copy is retried every minute.
pub(crate) async fn schedule(
    cfg: Config,
    metrics: Metrics,
    status: SharedStatus,
    shutdown: CancellationToken,
) {
    let mut next = next_run(Utc::now(), cfg.config_copy_at, cfg.config_copy_timezone);
    loop {
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tracing::info!(next = %next, "next config copy");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match copy_config(&cfg).await {
            Ok(report) => {
                record_copy(&report, &metrics, &status);
                tracing::info!(tables = report.tables.len(), "config copy done");
                next = next_run(Utc::now(), cfg.config_copy_at, cfg.config_copy_timezone);
            }
            Err(e) => {
                metrics.copy_failures.inc();
                tracing::error!(error = %e, "config copy failed; retrying in 1 minute");
                next = Utc::now() + chrono::Duration::minutes(1);
            }
        }
    }
}

/// Publishes a successful copy to metrics and status.
pub(crate) fn record_copy(report: &CopyReport, metrics: &Metrics, status: &SharedStatus) {
    let now = Utc::now();
    metrics
        .copy_last_success
        .set(now.timestamp_millis() as f64 / 1000.0);
    for t in &report.tables {
        metrics
            .copy_rows
            .with_label_values(&[t.table.strip_prefix("public.").unwrap_or(&t.table)])
            .set(t.rows);
    }
    status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .last_config_copy = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveTime;

    #[test]
    fn next_run_is_today_or_tomorrow_in_the_zone() {
        let at = NaiveTime::from_hms_opt(3, 0, 0).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 1, 0, 0).unwrap();
        assert_eq!(
            next_run(now, at, chrono_tz::UTC),
            Utc.with_ymd_and_hms(2026, 11, 22, 3, 0, 0).unwrap()
        );
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 3, 0, 0).unwrap();
        assert_eq!(
            next_run(now, at, chrono_tz::UTC),
            Utc.with_ymd_and_hms(2026, 11, 23, 3, 0, 0).unwrap()
        );
        // 03:00 in Los Angeles (PST, UTC-8) is 11:00 UTC.
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 1, 0, 0).unwrap();
        assert_eq!(
            next_run(now, at, chrono_tz::America::Los_Angeles),
            Utc.with_ymd_and_hms(2026, 11, 22, 11, 0, 0).unwrap()
        );
    }

    #[test]
    fn next_run_survives_a_dst_gap() {
        // 2026-03-08 02:30 does not exist in Los Angeles.
        let at = NaiveTime::from_hms_opt(2, 30, 0).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 3, 8, 9, 0, 0).unwrap();
        let n = next_run(now, at, chrono_tz::America::Los_Angeles);
        assert!(n > now && n < now + chrono::Duration::days(1), "{n}");
    }
}
