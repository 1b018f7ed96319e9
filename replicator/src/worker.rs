//! One replication direction's loop (either capture), the trigger capture's session (the
//! change log read by `changelog.rs`, applied by `apply.rs`, the cursor moved in each batch's
//! transaction), the first generation's drain, and each site's heartbeat writer.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::apply::Applier;
use crate::changelog;
use crate::config::Capture;
use crate::db::{connect, Conn, Link, Site};
use crate::metrics::{with_dir, Metrics, SharedStatus};
use crate::{sql, Config, Error};

/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often pending rows and lag are refreshed.
const PENDING_EVERY: Duration = Duration::from_secs(1);

/// A replication direction.
#[derive(Debug, Clone)]
pub(crate) struct Direction {
    /// `primary_to_backup` or `backup_to_primary`.
    pub name: &'static str,
    pub source: Site,
    pub target: Site,
    /// Qualified tables shipped this way (including `gsb.heartbeat`).
    pub tables: Vec<String>,
}

/// Runs the direction until `shutdown`, reconnecting with backoff after any failure.
pub(crate) async fn run_direction(
    d: Direction,
    cfg: Config,
    metrics: Metrics,
    status: SharedStatus,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let res = match cfg.capture {
            Capture::Logical => {
                crate::logical::session(&d, &cfg, &metrics, &status, &shutdown).await
            }
            Capture::Triggers => session(&d, &cfg, &metrics, &status, &shutdown).await,
        };
        match res {
            Ok(()) => return,
            Err(e) if e.is_permanent() => {
                metrics.errors.with_label_values(&[d.name]).inc();
                tracing::error!(direction = d.name, error = %e, "replication stopped: this needs an operator");
                with_dir(&status, d.name, |s| s.error = Some(e.to_string()));
                // Retried slowly: the operator's fix (e.g. `gsb resync`) is picked up.
                backoff = MAX_BACKOFF;
            }
            Err(e) => {
                metrics.errors.with_label_values(&[d.name]).inc();
                tracing::warn!(direction = d.name, error = %e, retry_in = ?backoff, "replication session failed; retrying");
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One session of the trigger capture: the source's change log read by `changelog::Reader`,
/// applied by the logical capture's `Applier` under the source's replication origin, the
/// cursor moved in each batch's transaction.
async fn session(
    d: &Direction,
    cfg: &Config,
    metrics: &Metrics,
    status: &SharedStatus,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let (ss, ts) = (d.source.as_str(), d.target.as_str());
    let src = connect(&cfg.link(d.source)?).await?;
    let dst = connect(&cfg.link(d.target)?).await?;
    crate::logical::claim_apply_session(&dst, d).await?;
    src.batch_execute("LISTEN gsb_changes")
        .await
        .map_err(|e| Error::db(ss, "LISTEN gsb_changes", e))?;
    let pending = src
        .prepare(sql::PENDING)
        .await
        .map_err(|e| Error::db(ss, "preparing pending", e))?;
    let prune = src
        .prepare(sql::PRUNE)
        .await
        .map_err(|e| Error::db(ss, "preparing prune", e))?;
    let (mut applier, _) = applier_for(d, cfg, &dst).await?;
    let mut reader = changelog::Reader::new(&src, d.source, &d.tables).await?;
    let mut cursor = changelog::read_cursor(&dst, d.target, d.name)
        .await?
        .ok_or_else(|| {
            Error::Protocol(format!(
                "{ts}: the cursor of {} is still the first generation's (the setup drains it first)",
                d.name
            ))
        })?;
    tracing::info!(direction = d.name, cursor = ?cursor, "replicating");
    let mut last_pending = Instant::now() - PENDING_EVERY;
    let mut last_prune = Instant::now();
    let mut last_hb: Option<(Instant, f64)> = None;
    loop {
        let t0 = Instant::now();
        let mut full = false;
        match reader.next(&src, d.name, &cursor, cfg.batch_size).await? {
            changelog::Next::Batch(batch) => {
                let n = batch.changes.len();
                full = n as i64 >= cfg.batch_size;
                let span = tracing::info_span!(
                    "batch",
                    direction = d.name,
                    rows = n,
                    lag = tracing::field::Empty,
                    conflicts = tracing::field::Empty
                );
                let res = applier.apply(&dst, &batch).instrument(span.clone()).await?;
                if let Some(f) = batch.fence {
                    cursor = f.to;
                }
                metrics
                    .batch_seconds
                    .with_label_values(&[d.name])
                    .observe(t0.elapsed().as_secs_f64());
                let n_conflicts = record_result(d, cfg, &res, metrics);
                if let Some(hb) = res["heartbeat_lag"].as_f64() {
                    last_hb = Some((Instant::now(), hb.max(0.0)));
                }
                span.record("lag", res["max_lag"].as_f64().unwrap_or(0.0));
                span.record("conflicts", n_conflicts);
                span.in_scope(|| tracing::debug!("batch applied"));
                with_dir(status, d.name, |s| s.last_apply = Some(chrono::Utc::now()));
            }
            changelog::Next::Idle(snap) => {
                // Nothing new: at most once a second the cursor moves to the source's snapshot
                // of now, so the next reads start from a recent horizon.
                if cursor.part.is_none()
                    && snap != cursor.done
                    && last_pending.elapsed() >= PENDING_EVERY
                {
                    let to = changelog::Cursor {
                        done: snap,
                        part: None,
                        part_id: None,
                    };
                    let params = changelog::advance_params(&d.name, &cursor, &to);
                    dst.execute(sql::ADVANCE_CURSOR, &params)
                        .await
                        .map_err(|e| Error::db(ts, "moving the cursor", e))?;
                    cursor = to;
                }
            }
        }
        if last_pending.elapsed() >= PENDING_EVERY {
            last_pending = Instant::now();
            let p = src
                .query_one(
                    &pending,
                    &[&cursor.done, &cursor.part, &cursor.part_id, &d.tables],
                )
                .await
                .map_err(|e| Error::db(ss, "counting pending changes", e))?;
            let rows: i64 = p.get(0);
            let age: Option<f64> = p.get(1);
            let age = age.unwrap_or(0.0).max(0.0);
            // Lag from the last applied heartbeat, growing while no heartbeat arrives.
            let lag = match last_hb {
                Some((at, hb)) if at.elapsed() > cfg.heartbeat_interval * 2 => {
                    hb + at.elapsed().as_secs_f64()
                }
                Some((_, hb)) => hb,
                None => age,
            };
            metrics.pending.with_label_values(&[d.name]).set(rows);
            metrics
                .oldest_pending_age
                .with_label_values(&[d.name])
                .set(age);
            metrics.lag.with_label_values(&[d.name]).set(lag);
            with_dir(status, d.name, |s| {
                s.pending_rows = Some(rows);
                s.oldest_pending_age_seconds = Some(age);
                s.lag_seconds = Some(lag);
            });
        }
        if last_prune.elapsed() >= cfg.prune_interval {
            last_prune = Instant::now();
            let k = src
                .execute(&prune, &[&cursor.done, &d.tables])
                .await
                .map_err(|e| Error::db(ss, "pruning applied changes", e))?;
            tracing::debug!(direction = d.name, pruned = k, "pruned applied changes");
        }
        if full {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            continue;
        }
        // The NOTIFY of a captured write wakes us at once; the poll is the fallback.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = src.notify.notified() => {}
            _ = tokio::time::sleep(cfg.poll_interval) => {}
        }
    }
}

/// The apply of direction `d` on `dst` for the trigger capture: the logical capture's, under
/// the source's replication origin (created if missing, and set up on the session unless one
/// already is; true when this set it up).
async fn applier_for(d: &Direction, cfg: &Config, dst: &Conn) -> Result<(Applier, bool), Error> {
    let ts = d.target.as_str();
    let origin = crate::logical::origin_name(d.source);
    crate::logical::create_origin(dst, d.target, &origin).await?;
    let ready: bool = dst
        .query_one("SELECT pg_replication_origin_session_is_setup()", &[])
        .await
        .map_err(|e| Error::db(ts, "checking the replication origin", e))?
        .get(0);
    if !ready {
        crate::logical::setup_origin_session(dst, ts, &origin).await?;
    }
    let applier = Applier::new(
        dst,
        d.source.as_str(),
        ts,
        d.source == Site::Primary,
        &origin,
        cfg.max_clock_skew.as_micros() as i64,
    )
    .await?;
    Ok((applier, !ready))
}

/// Counts what an apply function reported (applied and conflicts per table, clock-skew
/// rejections); returns the number of conflicts. Shared by both captures.
pub(crate) fn record_result(
    d: &Direction,
    cfg: &Config,
    res: &serde_json::Value,
    metrics: &Metrics,
) -> u64 {
    let mut n_conflicts = 0;
    if let Some(m) = res["applied"].as_object() {
        for (t, v) in m {
            metrics
                .applied
                .with_label_values(&[d.name, label(t)])
                .inc_by(v.as_u64().unwrap_or(0));
        }
    }
    if let Some(m) = res["conflicts"].as_object() {
        for (t, v) in m {
            let c = v.as_u64().unwrap_or(0);
            n_conflicts += c;
            metrics.conflicts.with_label_values(&[label(t)]).inc_by(c);
        }
    }
    let skew = res["skew_rejected"].as_u64().unwrap_or(0);
    if skew > 0 {
        metrics
            .skew_rejected
            .with_label_values(&[d.name])
            .inc_by(skew);
        tracing::error!(direction = d.name, rejected = skew, max_clock_skew = ?cfg.max_clock_skew,
            "rejected changes stamped beyond the maximum clock skew (see gsb.conflicts reason clock_skew); check NTP on both sites");
    }
    n_conflicts
}

/// How far `drain_change_log` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drain {
    /// Writers may still be adding: finished transactions only, up to the first short batch.
    CaughtUp,
    /// The source's captured tables are locked or no longer captured: every committed change,
    /// until none is left.
    Settled,
}

/// Applies what the source's trigger change log holds after the target's cursor, batch by
/// batch, each batch with its cursor move. `nested`: `dst` is inside the caller's transaction
/// (each batch a savepoint; the caller commits). Returns the changes applied. Used by the
/// switches between captures. A cursor the first generation left is drained by its own apply
/// (`gsb.apply_batch`), as it was written for.
pub(crate) async fn drain_change_log(
    d: &Direction,
    cfg: &Config,
    src: &tokio_postgres::Client,
    dst: &Conn,
    metrics: &Metrics,
    how: Drain,
    nested: bool,
) -> Result<i64, Error> {
    let Some(mut cursor) = changelog::read_cursor(dst, d.target, d.name).await? else {
        return drain_v1(d, cfg, src, dst, metrics, how).await;
    };
    let ts = d.target.as_str();
    let origin = crate::logical::origin_name(d.source);
    let (applier, set_up) = applier_for(d, cfg, dst).await?;
    let drained = async {
        let mut applier = applier;
        if nested {
            applier = applier.nested();
        }
        let mut reader = changelog::Reader::new(src, d.source, &d.tables).await?;
        let mut total = 0;
        loop {
            let batch = match reader.next(src, d.name, &cursor, cfg.batch_size).await? {
                changelog::Next::Batch(b) => b,
                changelog::Next::Idle(_) => return Ok(total),
            };
            let n = batch.changes.len() as i64;
            let res = applier.apply(dst, &batch).await?;
            record_result(d, cfg, &res, metrics);
            total += n;
            if let Some(f) = batch.fence {
                cursor = f.to;
            }
            if how == Drain::CaughtUp && n < cfg.batch_size {
                return Ok(total);
            }
        }
    }
    .await;
    if set_up {
        // Released, so the caller may advance or set up the origin itself.
        dst.execute("SELECT pg_replication_origin_session_reset()", &[])
            .await
            .map_err(|e| Error::db(ts, format!("releasing origin {origin}"), e))?;
    }
    drained
}

/// `drain_change_log` for a cursor the first generation's apply left.
async fn drain_v1(
    d: &Direction,
    cfg: &Config,
    src: &tokio_postgres::Client,
    dst: &tokio_postgres::Client,
    metrics: &Metrics,
    how: Drain,
) -> Result<i64, Error> {
    let (ss, ts) = (d.source.as_str(), d.target.as_str());
    let fetch = src
        .prepare(match how {
            Drain::CaughtUp => sql::V1_FETCH,
            Drain::Settled => sql::V1_FETCH_SETTLED,
        })
        .await
        .map_err(|e| Error::db(ss, "preparing fetch", e))?;
    let (mut xid, mut id): (String, i64) = dst
        .query_opt(sql::CURSOR, &[&d.name])
        .await
        .map_err(|e| Error::db(ts, "reading the cursor", e))?
        .map_or(("0".into(), 0), |r| (r.get(3), r.get(4)));
    let skew_ms = cfg.max_clock_skew.as_millis() as i64;
    let mut total = 0;
    loop {
        let batch = fetch_batch(src, &fetch, ss, &xid, id, &d.tables, cfg.batch_size).await?;
        let Some(to) = batch.to else {
            return Ok(total);
        };
        let params = apply_params(d, (&xid, &id), &to, &batch.json, &skew_ms);
        let res: String = dst
            .query_one(sql::V1_APPLY, &params)
            .await
            .map_err(|e| {
                Error::db(
                    ts,
                    format!("applying {} changes of the change log", batch.rows),
                    e,
                )
            })?
            .get(0);
        let res: serde_json::Value = serde_json::from_str(&res)
            .map_err(|e| Error::Protocol(format!("apply_batch returned bad JSON: {e}")))?;
        record_result(d, cfg, &res, metrics);
        total += batch.rows;
        (xid, id) = to;
        if how == Drain::CaughtUp && batch.rows < cfg.batch_size {
            return Ok(total);
        }
    }
}

/// The parameters of `sql::V1_APPLY` for a batch from cursor `from` to `to`.
fn apply_params<'a>(
    d: &'a Direction,
    from: (&'a String, &'a i64),
    to: &'a (String, i64),
    json: &'a String,
    skew_ms: &'a i64,
) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 8] {
    [
        &d.name, from.0, from.1, &to.0, &to.1, json, skew_ms, &"primary",
    ]
}

/// One fetched batch.
struct Fetched {
    /// Changes in the batch.
    rows: i64,
    /// Cursor after the batch's last change (None when empty).
    to: Option<(String, i64)>,
    /// The changes, as the JSON array `gsb.apply_batch` takes.
    json: String,
}

/// Reads up to `limit` finished changes after (`xid`, `id`) from the source.
async fn fetch_batch(
    src: &tokio_postgres::Client,
    fetch: &tokio_postgres::Statement,
    site: &'static str,
    xid: &str,
    id: i64,
    tables: &[String],
    limit: i64,
) -> Result<Fetched, Error> {
    let r = src
        .query_one(fetch, &[&xid, &id, &tables, &limit])
        .await
        .map_err(|e| Error::db(site, "fetching changes", e))?;
    let rows: i64 = r.get(0);
    let to = if rows > 0 {
        Some((r.get(1), r.get(2)))
    } else {
        None
    };
    Ok(Fetched {
        rows,
        to,
        json: r.get(3),
    })
}

/// `public.users` -> `users` for metric labels.
fn label(t: &str) -> &str {
    t.strip_prefix("public.").unwrap_or(t)
}

/// Writes this site's heartbeat row every `heartbeat_interval` until `shutdown`.
pub(crate) async fn heartbeat(link: Link, every: Duration, shutdown: CancellationToken) {
    let site = link.site;
    let mut conn = None;
    loop {
        if conn.is_none() {
            match connect(&link).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::debug!(site = site.as_str(), error = %e, "heartbeat: cannot connect")
                }
            }
        }
        if let Some(c) = &conn {
            if let Err(e) = c.execute(sql::HEARTBEAT, &[&site.as_str()]).await {
                tracing::debug!(site = site.as_str(), error = %e, "heartbeat write failed");
                conn = None;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
