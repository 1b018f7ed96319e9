//! The logical capture: per direction a publication and a `pgoutput` slot on the source,
//! streamed over the replication protocol; whole source transactions applied on the target
//! by `apply.rs` under the source's replication origin.
//!
//! Exactly once: the start position is the target's origin progress, advanced in the commit
//! that applied the changes; the apply commits asynchronously (`synchronous_commit = off`) and
//! the slot is acknowledged only up to what the target made durable (the flushed origin
//! progress; or, when nothing is in flight, up to the walsender's keepalive position). No echo:
//! transactions carrying an Origin message were applied by gsb and are dropped (PG15), and a
//! 16+ server is asked for `origin = none`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap as HashMap;
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::apply::{Applier, Batch, Change, Op, Shape};
use crate::config::Capture;
use crate::db::{connect, Conn, Site};
use crate::metrics::{with_dir, Metrics, SharedStatus};
use crate::pgoutput::{self, Msg, Value};
use crate::schema::{ident, qident, TableInfo};
use crate::walstream::{fmt_lsn, parse_lsn, ReplConn, StreamMsg};
use crate::worker::Direction;
use crate::{Config, Error};

/// How often a standby status update is sent (well within the default 60s
/// `wal_sender_timeout`) and the slot is inspected.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The slot and the publication of a direction on its source (`gsb_primary_to_backup`).
pub(crate) fn slot_name(d: &Direction) -> String {
    format!("gsb_{}", d.name)
}

/// The replication origin on the target under which `source`'s changes are applied.
pub(crate) fn origin_name(source: Site) -> String {
    format!("gsb_from_{}", source.as_str())
}

/// Checks what `capture` needs on a site; each failure names the setting and the fix. Both
/// captures need commit timestamps and replication origins (they share one apply); the
/// logical capture also `wal_level = logical`, a free slot and WAL sender, and REPLICATION.
pub(crate) async fn check_prerequisites(
    c: &Client,
    site: Site,
    capture: Capture,
) -> Result<(), Error> {
    let s = site.as_str();
    let logical = capture == Capture::Logical;
    let (word, hint) = if logical {
        (
            "logical",
            " (or set replicator.capture = \"triggers\" where logical decoding cannot be enabled)",
        )
    } else {
        ("trigger", "")
    };
    let setting = |name: &'static str| async move {
        c.query_one("SELECT current_setting($1)", &[&name])
            .await
            .map(|r| r.get::<_, String>(0))
            .map_err(|e| Error::db(s, format!("reading {name}"), e))
    };
    let version = setting("server_version_num").await?;
    if version.parse::<i32>().unwrap_or(0) < 150_000 {
        return Err(Error::Prerequisite {
            capture: word,
            hint,
            site: s,
            setting: "server_version",
            found: format!("is {version} (server_version_num)"),
            fix: "upgrade the server to PostgreSQL 15 or newer".into(),
        });
    }
    let wal_level = setting("wal_level").await?;
    if logical && wal_level != "logical" {
        return Err(Error::Prerequisite {
            capture: word,
            hint,
            site: s,
            setting: "wal_level",
            found: format!("is {wal_level}"),
            fix: "ALTER SYSTEM SET wal_level = logical; then restart the server".into(),
        });
    }
    let ts = setting("track_commit_timestamp").await?;
    if ts != "on" {
        return Err(Error::Prerequisite {
            capture: word,
            hint,
            site: s,
            setting: "track_commit_timestamp",
            found: format!("is {ts}"),
            fix: "ALTER SYSTEM SET track_commit_timestamp = on; then restart the server".into(),
        });
    }
    let r = c
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, \
                    (SELECT count(*)::int FROM pg_replication_slots WHERE slot_name NOT LIKE 'gsb\\_%'), \
                    current_setting('max_wal_senders')::int, \
                    (SELECT count(*)::int FROM pg_stat_replication WHERE application_name <> 'gsb-replicator'), \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                    current_user::text, \
                    (SELECT bool_and(has_function_privilege(f, 'execute')) FROM unnest(ARRAY[ \
                        'pg_replication_origin_create(text)', 'pg_replication_origin_session_setup(text)', \
                        'pg_replication_origin_session_reset()', \
                        'pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone)', \
                        'pg_replication_origin_progress(text, boolean)', \
                        'pg_replication_origin_advance(text, pg_lsn)']) f)",
            &[],
        )
        .await
        .map_err(|e| Error::db(s, "reading the replication settings", e))?;
    let (slots, used, senders, sending): (i32, i32, i32, i32) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    if logical && slots - used < 1 {
        return Err(Error::Prerequisite {
            capture: word,
            hint,
            site: s,
            setting: "max_replication_slots",
            found: format!("is {slots} and {used} are used by others"),
            fix: format!(
                "ALTER SYSTEM SET max_replication_slots = {}; then restart the server",
                used + 2
            ),
        });
    }
    if logical && senders - sending < 1 {
        return Err(Error::Prerequisite {
            capture: word,
            hint,
            site: s,
            setting: "max_wal_senders",
            found: format!("is {senders} and {sending} are in use by others"),
            fix: format!(
                "ALTER SYSTEM SET max_wal_senders = {}; then restart the server",
                sending + 2
            ),
        });
    }
    let (repl, user, origin_ok): (bool, String, bool) = (r.get(4), r.get(5), r.get(6));
    if logical && !repl {
        return Err(Error::Prerequisite {
            capture: word,
            hint,
            site: s,
            setting: "REPLICATION",
            found: format!("role {user} lacks it"),
            fix: format!("ALTER ROLE {} REPLICATION", ident(&user)),
        });
    }
    if !origin_ok {
        return Err(Error::Prerequisite {
            capture: word,
            hint,
            site: s,
            setting: "replication origins",
            found: format!("role {user} may not use them"),
            fix: format!(
                "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text), \
                 pg_replication_origin_session_reset(), pg_replication_origin_xact_setup(pg_lsn, timestamptz), \
                 pg_replication_origin_progress(text, boolean), pg_replication_origin_advance(text, pg_lsn) TO {}",
                ident(&user)
            ),
        });
    }
    Ok(())
}

/// Prepares a site as the source of direction `d`: its publication lists exactly `tables`
/// (insert, update, delete; no TRUNCATE). A trigger capture is switched before
/// (`upgrade.rs`).
pub(crate) async fn prepare_source(
    c: &Client,
    d: &Direction,
    tables: &[TableInfo],
) -> Result<(), Error> {
    let s = d.source.as_str();
    let pubname = slot_name(d);
    let list = tables
        .iter()
        .map(|t| qident(&t.name))
        .chain(["gsb.heartbeat".to_owned()])
        .collect::<Vec<_>>()
        .join(", ");
    let exists: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&pubname],
        )
        .await
        .map_err(|e| Error::db(s, "looking up the publication", e))?
        .get(0);
    let q = if exists {
        format!("ALTER PUBLICATION {} SET TABLE {list}", ident(&pubname))
    } else {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish = 'insert, update, delete')",
            ident(&pubname)
        )
    };
    c.batch_execute(&q)
        .await
        .map_err(|e| Error::db(s, format!("setting up publication {pubname}"), e))?;
    Ok(())
}

/// The source transaction being read.
struct Txn {
    /// Carries an Origin message: applied by gsb on the source, an echo.
    skip: bool,
    /// Its commit time, Unix microseconds, for each change's conflict decision.
    ts_us: i64,
    changes: Vec<Change>,
}

/// One session of direction `d`: connect, set up origin and slot (initial sync on the first
/// start), stream and apply until `shutdown` or an error.
pub(crate) async fn session(
    d: &Direction,
    cfg: &Config,
    metrics: &Metrics,
    status: &SharedStatus,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let (ss, ts) = (d.source.as_str(), d.target.as_str());
    let slot = slot_name(d);
    let origin = origin_name(d.source);
    let src = connect(&cfg.link(d.source)?).await?;
    let mut dst = connect(&cfg.link(d.target)?).await?;
    // Commits do not wait for the WAL flush (as native logical replication and pglogical
    // apply): the slot is acknowledged only up to what the target has made durable
    // (`Durable`), so a target crash loses nothing the source would not send again.
    dst.batch_execute("SET synchronous_commit = off")
        .await
        .map_err(|e| Error::db(ts, "setting up the apply session", e))?;
    claim_apply_session(&dst, d).await?;
    create_origin(&dst, d.target, &origin).await?;
    setup_origin_session(&dst, ts, &origin).await?;
    let progress: Option<String> = dst
        .query_one(
            "SELECT pg_replication_origin_progress($1, true)::text",
            &[&origin],
        )
        .await
        .map_err(|e| Error::db(ts, "reading the origin progress", e))?
        .get(0);
    let progress = progress.as_deref().and_then(parse_lsn).filter(|l| *l > 0);
    let slot_row = src
        .query_opt(
            "SELECT coalesce(wal_status, ''), active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::db(ss, "looking up the slot", e))?;
    if let Some(r) = &slot_row {
        let wal_status: String = r.get(0);
        if wal_status == "lost" {
            return Err(Error::SlotInvalidated {
                site: ss,
                slot: slot.clone(),
            });
        }
        let pid: Option<i32> = r.get(1);
        if let Some(pid) = pid {
            tracing::info!(
                direction = d.name,
                pid,
                "ending the walsender still holding the slot"
            );
            src.execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(|e| Error::db(ss, "ending a stale walsender", e))?;
            wait_slot_free(&src, ss, &slot).await?;
        }
    }
    let mut repl = ReplConn::connect(&cfg.link(d.source)?).await?;
    let start = match (progress, slot_row.is_some()) {
        (Some(p), true) => p,
        (Some(_), false) => {
            return Err(Error::SlotInvalidated {
                site: ss,
                slot: slot.clone(),
            })
        }
        (None, exists) => {
            if exists {
                // Created, but the initial sync never committed: do both again.
                drop_slot(&src, d.source, &slot).await?;
            }
            let rows = repl
                .simple_query(&format!(
                    "CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT 'export')"
                ))
                .await?;
            let row = rows.first().ok_or_else(|| Error::Replication {
                site: ss,
                what: "CREATE_REPLICATION_SLOT returned no row".into(),
            })?;
            let cp = row
                .get(1)
                .cloned()
                .flatten()
                .as_deref()
                .and_then(parse_lsn)
                .ok_or_else(|| Error::Replication {
                    site: ss,
                    what: "CREATE_REPLICATION_SLOT returned no consistent point".into(),
                })?;
            let snapshot = row.get(2).cloned().flatten().unwrap_or_default();
            let n = initial_sync(d, cfg, &snapshot, &mut dst, cp, metrics).await?;
            tracing::info!(direction = d.name, slot = %slot, rows = n, consistent_point = %fmt_lsn(cp), "slot created, existing rows synced");
            cp
        }
    };
    let version: i32 = src
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| Error::db(ss, "reading the server version", e))?
        .get(0);
    let mut opts = vec![("proto_version", "1"), ("publication_names", slot.as_str())];
    if version >= 160_000 {
        opts.push(("origin", "none"));
    }
    repl.start_replication(&slot, start, &opts).await?;
    tracing::info!(direction = d.name, slot = %slot, start = %fmt_lsn(start), "streaming");
    with_dir(status, d.name, |s| s.error = None);
    let applier = Applier::new(
        &dst,
        ss,
        ts,
        d.source == Site::Primary,
        &origin,
        cfg.max_clock_skew.as_micros() as i64,
    )
    .await?;
    let (tx, rx) = mpsc::channel::<Batch>(1);
    let (applied_tx, applied_rx) = watch::channel(start);
    let last_hb = LastHeartbeat::default();
    // The recovery window: what the source had committed when we (re)connected.
    let window_end: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| Error::db(ss, "reading the WAL position", e))?
        .get(0);
    let conflict_floor: i64 = dst
        .query_one("SELECT coalesce(max(id), 0) FROM gsb.conflicts", &[])
        .await
        .map_err(|e| Error::db(ts, "reading the conflict log", e))?
        .get(0);
    let window = Window {
        end: parse_lsn(&window_end).unwrap_or(0),
        conflict_floor,
        txns: Default::default(),
        rows: Default::default(),
    };
    let durable = Durable {
        conn: connect(&cfg.link(d.target)?).await?,
        origin: origin.clone(),
        site: ts,
    };
    let reader = read_stream(
        d, cfg, &mut repl, &src, &durable, start, tx, applied_rx, &last_hb, &window, metrics,
        status, shutdown,
    );
    let applier = apply_batches(
        d, cfg, &dst, applier, rx, applied_tx, &last_hb, &window, metrics, status,
    );
    // The reader ends on shutdown (dropping the channel ends the applier after its batch).
    let (r, a) = tokio::join!(reader, applier);
    a.and(r)
}

/// Names `dst` the apply session of `d` and ends any other session of that name (a replicator
/// that died or lost its role may still hold the origin).
pub(crate) async fn claim_apply_session(dst: &Conn, d: &Direction) -> Result<(), Error> {
    let ts = d.target.as_str();
    let apply_name = format!("gsb-apply-{}", d.name);
    dst.batch_execute(&format!("SET application_name = '{apply_name}'"))
        .await
        .map_err(|e| Error::db(ts, "naming the apply session", e))?;
    dst.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
        &[&apply_name],
    )
    .await
    .map_err(|e| Error::db(ts, "ending a stale apply session", e))?;
    Ok(())
}

/// Sets up `origin` on the session `dst`, waiting up to 10 s for a session being ended to
/// release it.
pub(crate) async fn setup_origin_session(
    dst: &Conn,
    ts: &'static str,
    origin: &str,
) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match dst
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
        {
            Ok(_) => return Ok(()),
            // Still held by a session being terminated.
            Err(e) if Instant::now() < deadline && e.code().is_some() => {
                tracing::debug!(error = %e, "origin busy; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(Error::db(ts, format!("setting up origin {origin}"), e)),
        }
    }
}

async fn wait_slot_free(src: &Conn, ss: &'static str, slot: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let busy: bool = src
            .query_one(
                "SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)",
                &[&slot],
            )
            .await
            .map_err(|e| Error::db(ss, "checking the slot", e))?
            .get(0);
        if !busy {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Copies the rows the source held at the slot's snapshot to the target, in one transaction
/// under the origin that records `cp` as the progress. Primary -> backup replaces the
/// backup's version of a row; backup -> primary only adds rows the primary lacks (ties to
/// the primary). Heartbeats too: a heartbeat row written before the slot existed would
/// otherwise only ever arrive as updates of a row the target lacks.
async fn initial_sync(
    d: &Direction,
    cfg: &Config,
    snapshot: &str,
    dst: &mut Conn,
    cp: u64,
    metrics: &Metrics,
) -> Result<u64, Error> {
    let mut counted = Vec::new();
    let (ss, ts) = (d.source.as_str(), d.target.as_str());
    let mut snap = connect(&cfg.link(d.source)?).await?;
    let stx = snap
        .client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| Error::db(ss, "starting the initial snapshot", e))?;
    stx.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT '{}'",
        snapshot.replace('\'', "''")
    ))
    .await
    .map_err(|e| Error::db(ss, "importing the slot's snapshot", e))?;
    let dtx = dst
        .client
        .transaction()
        .await
        .map_err(|e| Error::db(ts, "starting the initial sync", e))?;
    dtx.execute(
        "SELECT set_config('gsb.applying', 'on', true), pg_current_xact_id()::text, \
         pg_replication_origin_xact_setup($1::text::pg_lsn, now())",
        &[&fmt_lsn(cp)],
    )
    .await
    .map_err(|e| Error::db(ts, "starting the initial sync", e))?;
    let mut total = 0u64;
    for t in &d.tables {
        let q = qident(t);
        let rows: String = stx
            .query_one(
                &format!("SELECT coalesce(jsonb_agg(to_jsonb(x)), '[]')::text FROM {q} x"),
                &[],
            )
            .await
            .map_err(|e| Error::db(ss, format!("reading existing rows of {t}"), e))?
            .get(0);
        let pk: Vec<String> = dtx
            .query_one("SELECT pk_cols FROM gsb.tables WHERE tbl = $1", &[t])
            .await
            .map_err(|e| Error::db(ts, format!("reading the key of {t}"), e))?
            .get(0);
        // Each site writes only its own heartbeat row: the source's is the newest.
        let on_conflict = if d.source == Site::Primary || t == "gsb.heartbeat" {
            let set = dtx
                .query(
                    "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = $1::text::regclass \
                     AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND NOT attname = ANY($2)",
                    &[&q, &pk],
                )
                .await
                .map_err(|e| Error::db(ts, format!("reading the columns of {t}"), e))?
                .iter()
                .map(|r| {
                    let c: String = r.get(0);
                    format!("{c} = EXCLUDED.{c}")
                })
                .collect::<Vec<_>>();
            if set.is_empty() {
                "DO NOTHING".to_owned()
            } else {
                format!("DO UPDATE SET {}", set.join(", "))
            }
        } else {
            "DO NOTHING".to_owned()
        };
        let keys = pk.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
        let n = dtx
            .execute(
                &format!(
                    "INSERT INTO {q} SELECT * FROM jsonb_populate_recordset(NULL::{q}, $1::text::jsonb) \
                     ON CONFLICT ({keys}) {on_conflict}"
                ),
                &[&rows],
            )
            .await
            .map_err(|e| Error::db(ts, format!("copying existing rows of {t}"), e))?;
        total += n;
        counted.push((t, n));
    }
    dtx.commit()
        .await
        .map_err(|e| Error::db(ts, "committing the initial sync", e))?;
    let _ = stx.rollback().await;
    for (t, n) in counted {
        let label = t.strip_prefix("public.").unwrap_or(t);
        metrics
            .applied
            .with_label_values(&[d.name, label])
            .inc_by(n);
    }
    Ok(total)
}

#[allow(clippy::too_many_arguments)]
async fn read_stream(
    d: &Direction,
    cfg: &Config,
    repl: &mut ReplConn,
    src: &Conn,
    durable: &Durable,
    start: u64,
    tx: mpsc::Sender<Batch>,
    mut applied: watch::Receiver<u64>,
    last_hb: &LastHeartbeat,
    window: &Window,
    metrics: &Metrics,
    status: &SharedStatus,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let ss = d.source.as_str();
    let slot = slot_name(d);
    let mut rels: HashMap<u32, Arc<Shape>> = HashMap::default();
    let mut cur: Option<Txn> = None;
    let mut pending = Batch::default();
    let mut received = start;
    let mut acked = start;
    // What the target has made durable (its origin progress, flushed): the most that may be
    // acknowledged; refreshed every status tick.
    let mut flushed_on_target = start;
    // End of the last batch handed to the applier.
    let mut sent_end = start;
    // The walsender's position from its last keepalive: safe to acknowledge when nothing is
    // in flight (every transaction that committed before it has reached us).
    let mut idle_pos = 0u64;
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max_rows = cfg.batch_size as usize;
    // Batches handed to the applier and not yet committed: (end LSN, rows).
    let mut inflight: std::collections::VecDeque<(u64, usize)> = Default::default();
    // The source's WAL end at the previous status tick: once everything up to it is applied
    // (or skipped), nothing committed before that tick is pending.
    let mut probe: Option<u64> = None;
    let mut window_open = true;
    loop {
        let ready = pending.txns > 0;
        // A batch is handed over only when the applier has committed the previous one: while
        // it works, what arrives joins the next batch (larger batches under load, as group
        // commit), instead of queueing a one-transaction batch behind it.
        let applier_idle = *applied.borrow() >= sent_end;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            done = applied.changed(), if ready && !applier_idle => {
                if done.is_err() {
                    return Ok(()); // the applier stopped; its error is reported
                }
            }
            permit = tx.reserve(), if ready && applier_idle => {
                let Ok(permit) = permit else {
                    return Ok(()); // the applier stopped; its error is reported
                };
                sent_end = pending.end_lsn;
                inflight.push_back((pending.end_lsn, pending.changes.len()));
                permit.send(std::mem::take(&mut pending));
            }
            msg = repl.recv(), if pending.changes.len() < max_rows => {
                let Some(mut msg) = msg? else {
                    return Err(Error::Replication { site: ss, what: "the server ended the stream".into() });
                };
                // Every message the read brought, in one go (one wake-up per message otherwise);
                // no further than a batch's worth, as above.
                loop {
                match msg {
                    StreamMsg::Keepalive { wal_end, reply } => {
                        idle_pos = idle_pos.max(wal_end);
                        if reply {
                            let flushed = ack_pos(flushed_on_target, sent_end, cur.is_none() && pending.txns == 0, idle_pos).max(acked);
                            repl.send_status(received.max(flushed), flushed).await?;
                            acked = flushed;
                        }
                    }
                    StreamMsg::XLogData { start: at, data } => {
                        received = received.max(at);
                        if !is_echoed_row(&cur, &data) {
                            let m = pgoutput::decode(data).map_err(|e| Error::Replication { site: ss, what: e.to_string() })?;
                            on_message(d, m, &mut rels, &mut cur, &mut pending, start)?;
                        }
                    }
                }
                if pending.changes.len() >= max_rows {
                    break;
                }
                match repl.recv_buffered()? {
                    Some(m) => msg = m,
                    None => break,
                }
                }
            }
            _ = tick.tick() => {
                let idle = cur.is_none() && pending.txns == 0;
                flushed_on_target = durable.progress().await?.max(flushed_on_target).min(*applied.borrow());
                let flushed = ack_pos(flushed_on_target, sent_end, idle, idle_pos).max(acked);
                repl.send_status(received.max(flushed), flushed).await?;
                acked = flushed;
                let done = *applied.borrow();
                while inflight.front().is_some_and(|(end, _)| *end <= done) {
                    inflight.pop_front();
                }
                let known = pending.changes.len()
                    + cur.as_ref().map_or(0, |t| t.changes.len())
                    + inflight.iter().map(|(_, n)| n).sum::<usize>();
                let drained = idle && done >= sent_end && probe.is_some_and(|p| acked >= p);
                // Rows known to be on their way; at least one while the stream has not shown
                // everything committed before the last tick to be applied.
                let rows = if drained { known as i64 } else { known.max(1) as i64 };
                if window_open && ((done >= window.end) || (idle && done >= sent_end && acked >= window.end)) {
                    window_open = false;
                    report_window(d, cfg, window, metrics, status).await?;
                }
                let (wal_now, behind) = observe_slot(d, src, &slot, metrics).await?;
                probe = Some(wal_now);
                metrics.pending.with_label_values(&[d.name]).set(rows);
                with_dir(status, d.name, |s| {
                    s.pending_rows = Some(rows);
                    s.pending_wal_bytes = Some(behind);
                });
                let lag = lag_now(last_hb, cfg.heartbeat_interval);
                if let Some(lag) = lag {
                    metrics.lag.with_label_values(&[d.name]).set(lag);
                    with_dir(status, d.name, |s| s.lag_seconds = Some(lag));
                }
            }
        }
    }
}

/// What may be acknowledged: what the target made durable; when nothing is in flight and
/// all of it is durable, the walsender's keepalive position.
fn ack_pos(durable: u64, sent_end: u64, idle: bool, idle_pos: u64) -> u64 {
    if idle && durable >= sent_end {
        durable.max(idle_pos)
    } else {
        durable
    }
}

/// The target's durable progress for one source: `pg_replication_origin_progress(.., true)`
/// flushes the target's WAL up to the last commit under the origin and returns that commit's
/// source end LSN. Asked on a connection of its own (the apply session is busy pipelining).
struct Durable {
    conn: Conn,
    origin: String,
    site: &'static str,
}

impl Durable {
    async fn progress(&self) -> Result<u64, Error> {
        let p: Option<String> = self
            .conn
            .query_one(
                "SELECT pg_replication_origin_progress($1, true)::text",
                &[&self.origin],
            )
            .await
            .map_err(|e| Error::db(self.site, "reading the durable origin progress", e))?
            .get(0);
        Ok(p.as_deref().and_then(parse_lsn).unwrap_or(0))
    }
}

/// What the source had committed when the session (re)connected, counted as it is applied.
struct Window {
    /// The source's WAL end at the reconnect.
    end: u64,
    /// `gsb.conflicts` ids on the target above this were logged since the reconnect.
    conflict_floor: i64,
    txns: std::sync::atomic::AtomicU64,
    rows: std::sync::atomic::AtomicU64,
}

/// Reports a closed recovery window: a log line, the metric and `/status`. Nothing when the
/// source had nothing pending (the usual restart).
async fn report_window(
    d: &Direction,
    cfg: &Config,
    window: &Window,
    metrics: &Metrics,
    status: &SharedStatus,
) -> Result<(), Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let (txns, rows) = (window.txns.load(Relaxed), window.rows.load(Relaxed));
    if txns == 0 {
        return Ok(());
    }
    let ts = d.target.as_str();
    let dst = connect(&cfg.link(d.target)?).await?;
    let ids: Vec<i64> = dst
        .query(
            "SELECT id FROM gsb.conflicts WHERE id > $1 AND loser_origin = $2 ORDER BY id",
            &[&window.conflict_floor, &d.source.as_str()],
        )
        .await
        .map_err(|e| Error::db(ts, "reading the conflict log", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tracing::warn!(
        direction = d.name,
        transactions = txns,
        rows,
        lost_conflicts = ids.len(),
        conflict_ids = ?ids,
        "the {} had committed changes the {} only received after the reconnect (e.g. the primary back after a failover); the listed gsb.conflicts rows on the {} are those that lost",
        d.source.as_str(), ts, ts
    );
    for (kind, v) in [
        ("transactions", txns as i64),
        ("rows", rows as i64),
        ("lost_conflicts", ids.len() as i64),
    ] {
        metrics.late.with_label_values(&[d.name, kind]).set(v);
    }
    with_dir(status, d.name, |s| {
        s.last_recovery = Some(crate::metrics::RecoveryWindow {
            at: chrono::Utc::now(),
            transactions: txns,
            rows,
            lost_conflict_ids: ids,
        })
    });
    Ok(())
}

/// Lag from the last applied heartbeat, growing while no heartbeat arrives.
fn lag_now(last_hb: &LastHeartbeat, every: Duration) -> Option<f64> {
    let hb = *last_hb.lock().unwrap_or_else(|p| p.into_inner());
    hb.map(|(at, lag)| {
        if at.elapsed() > every * 2 {
            lag + at.elapsed().as_secs_f64()
        } else {
            lag
        }
    })
}

/// When the last heartbeat was applied, and its lag then.
type LastHeartbeat = std::sync::Mutex<Option<(Instant, f64)>>;

/// Slot health: retained WAL, WAL not yet confirmed, invalidation. Returns the source's
/// current WAL end and the WAL bytes not yet confirmed applied.
async fn observe_slot(
    d: &Direction,
    src: &Conn,
    slot: &str,
    metrics: &Metrics,
) -> Result<(u64, i64), Error> {
    let ss = d.source.as_str();
    let r = src
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, \
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, coalesce(wal_status, ''), \
                    pg_current_wal_lsn()::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::db(ss, "reading the slot", e))?;
    let Some(r) = r else {
        return Err(Error::SlotInvalidated {
            site: ss,
            slot: slot.to_owned(),
        });
    };
    let retained: Option<i64> = r.get(0);
    let behind: Option<i64> = r.get(1);
    let wal_status: String = r.get(2);
    let wal_now: String = r.get(3);
    if wal_status == "lost" {
        return Err(Error::SlotInvalidated {
            site: ss,
            slot: slot.to_owned(),
        });
    }
    metrics
        .slot_retained
        .with_label_values(&[d.name])
        .set(retained.unwrap_or(0));
    let behind = behind.unwrap_or(0).max(0);
    metrics
        .pending_bytes
        .with_label_values(&[d.name])
        .set(behind);
    Ok((parse_lsn(&wal_now).unwrap_or(0), behind))
}

/// A row of a transaction that carried an Origin message (an echo of gsb's own apply): dropped
/// as it arrives, by its tag alone, never decoded (PostgreSQL 15 sends every applied row back).
fn is_echoed_row(cur: &Option<Txn>, data: &[u8]) -> bool {
    cur.as_ref().is_some_and(|t| t.skip) && pgoutput::is_row_change(data)
}

fn on_message(
    d: &Direction,
    m: Msg,
    rels: &mut HashMap<u32, Arc<Shape>>,
    cur: &mut Option<Txn>,
    pending: &mut Batch,
    start: u64,
) -> Result<(), Error> {
    let ss = d.source.as_str();
    let err = |what: String| Error::Replication { site: ss, what };
    match m {
        Msg::Begin { commit_ts_us, .. } => {
            *cur = Some(Txn {
                skip: false,
                ts_us: commit_ts_us,
                changes: Vec::new(),
            });
        }
        Msg::Origin { .. } => {
            if let Some(t) = cur.as_mut() {
                t.skip = true;
            }
        }
        Msg::Commit { end_lsn, .. } => {
            let t = cur
                .take()
                .ok_or_else(|| err("Commit without Begin".into()))?;
            // Already applied (the origin progress is at or past it) or an echo: nothing to do,
            // acknowledged with the next idle status.
            if t.skip || end_lsn <= start || t.changes.is_empty() {
                return Ok(());
            }
            let data = t
                .changes
                .iter()
                .filter(|c| c.shape.name != "gsb.heartbeat")
                .count();
            pending.changes.extend(t.changes);
            pending.txns += 1;
            pending.data_rows += data;
            pending.data_txns += usize::from(data > 0);
            pending.end_lsn = end_lsn;
            pending.commit_ts_us = t.ts_us;
        }
        Msg::Relation {
            oid,
            namespace,
            name,
            columns,
        } => {
            if !columns.iter().any(|c| c.key) {
                return Err(Error::Protocol(format!(
                    "{namespace}.{name}: the table has no replica identity key (it needs a primary key)"
                )));
            }
            rels.insert(
                oid,
                Arc::new(Shape {
                    name: format!("{namespace}.{name}"),
                    columns,
                }),
            );
        }
        Msg::Insert { oid, new } => {
            let (t, shape) = txn_rel(cur, rels, oid, &err)?;
            if !t.skip {
                t.changes.push(change(shape, Op::Insert, new, t.ts_us));
            }
        }
        Msg::Update { oid, old_key, new } => {
            let (t, shape) = txn_rel(cur, rels, oid, &err)?;
            if t.skip {
                return Ok(());
            }
            let key_moved = old_key.as_ref().is_some_and(|old| {
                shape
                    .columns
                    .iter()
                    .zip(old.iter().zip(&new))
                    .any(|(c, (o, n))| c.key && o != n)
            });
            match old_key {
                Some(old) if key_moved => {
                    // A key change ships as a delete of the old key, then an insert.
                    t.changes.push(change(shape, Op::Delete, old, t.ts_us));
                    t.changes.push(change(shape, Op::Insert, new, t.ts_us));
                }
                _ => t.changes.push(change(shape, Op::Update, new, t.ts_us)),
            }
        }
        Msg::Delete { oid, old_key } => {
            let (t, shape) = txn_rel(cur, rels, oid, &err)?;
            if !t.skip {
                t.changes.push(change(shape, Op::Delete, old_key, t.ts_us));
            }
        }
        Msg::Truncate => {
            tracing::warn!(
                direction = d.name,
                "TRUNCATE on the source is not replicated (the publication excludes it)"
            );
        }
        Msg::Type | Msg::Message => {}
    }
    Ok(())
}

fn change(shape: &Arc<Shape>, op: Op, vals: Vec<Value>, ts_us: i64) -> Change {
    Change {
        shape: shape.clone(),
        op,
        vals,
        ts_us,
        initial: false,
    }
}

fn txn_rel<'a>(
    cur: &'a mut Option<Txn>,
    rels: &'a HashMap<u32, Arc<Shape>>,
    oid: u32,
    err: &dyn Fn(String) -> Error,
) -> Result<(&'a mut Txn, &'a Arc<Shape>), Error> {
    let t = cur
        .as_mut()
        .ok_or_else(|| err("change outside a transaction".into()))?;
    let rel = rels.get(&oid).ok_or_else(|| {
        err(format!(
            "change for relation {oid} before its Relation message"
        ))
    })?;
    Ok((t, rel))
}

#[allow(clippy::too_many_arguments)]
async fn apply_batches(
    d: &Direction,
    cfg: &Config,
    dst: &Conn,
    mut applier: Applier,
    mut rx: mpsc::Receiver<Batch>,
    applied: watch::Sender<u64>,
    last_hb: &LastHeartbeat,
    window: &Window,
    metrics: &Metrics,
    status: &SharedStatus,
) -> Result<(), Error> {
    while let Some(b) = rx.recv().await {
        let t0 = Instant::now();
        let span = tracing::info_span!(
            "batch",
            direction = d.name,
            rows = b.changes.len(),
            txns = b.txns,
            lag = tracing::field::Empty,
            conflicts = tracing::field::Empty
        );
        let res = applier.apply(dst, &b).await?;
        let _ = applied.send(b.end_lsn);
        if b.end_lsn <= window.end {
            use std::sync::atomic::Ordering::Relaxed;
            window.txns.fetch_add(b.data_txns as u64, Relaxed);
            window.rows.fetch_add(b.data_rows as u64, Relaxed);
        }
        metrics
            .batch_seconds
            .with_label_values(&[d.name])
            .observe(t0.elapsed().as_secs_f64());
        let conflicts = crate::worker::record_result(d, cfg, &res, metrics);
        span.record("lag", res["max_lag"].as_f64().unwrap_or(0.0));
        span.record("conflicts", conflicts);
        span.in_scope(|| tracing::debug!(ms = t0.elapsed().as_millis() as u64, "batch applied"));
        if let Some(hb) = res["heartbeat_lag"].as_f64() {
            let hb = hb.max(0.0);
            *last_hb.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), hb));
            metrics.lag.with_label_values(&[d.name]).set(hb);
            with_dir(status, d.name, |s| s.lag_seconds = Some(hb));
        }
        with_dir(status, d.name, |s| s.last_apply = Some(chrono::Utc::now()));
    }
    Ok(())
}

/// Drops `slot` on `c` if it exists, ending a walsender still holding it (retried while it is
/// still active for a moment after being told to end); returns its `wal_status` if it existed.
pub(crate) async fn drop_slot(c: &Conn, site: Site, slot: &str) -> Result<Option<String>, Error> {
    let s = site.as_str();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .query_opt(
                "SELECT active_pid, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| Error::db(s, "looking up the slot", e))?;
        let Some(r) = r else { return Ok(None) };
        let (pid, wal): (Option<i32>, String) = (r.get(0), r.get(1));
        if let Some(pid) = pid {
            c.execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(|e| Error::db(s, "ending the walsender", e))?;
        }
        match c
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return Ok(Some(wal)),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "slot busy; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(Error::db(s, format!("dropping slot {slot}"), e)),
        }
    }
}

/// Creates the replication origin `origin` on `c` unless it exists.
pub(crate) async fn create_origin(c: &Conn, site: Site, origin: &str) -> Result<(), Error> {
    c.execute(
        "SELECT pg_replication_origin_create($1) WHERE pg_replication_origin_oid($1) IS NULL",
        &[&origin],
    )
    .await
    .map_err(|e| {
        Error::db(
            site.as_str(),
            format!("creating replication origin {origin}"),
            e,
        )
    })?;
    Ok(())
}

/// What `gsb resync` reset, per direction.
#[derive(Debug, Clone)]
pub struct ResyncReport {
    /// Per direction: `(name, what was done)`.
    pub directions: Vec<(String, String)>,
}

impl std::fmt::Display for ResyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (d, what) in &self.directions {
            writeln!(f, "{d}: {what}")?;
        }
        Ok(())
    }
}

/// Rebuilds both directions of the logical capture: drops each source's slot and the target's
/// origin progress, so the replicator (running, or at its next start) creates a new slot from a
/// consistent snapshot and merges the existing rows (the primary's version wins, the backup's
/// rows the primary lacks are added) before streaming again. Run `gsb verify` after it.
/// Changes lost with an invalidated slot cannot be replayed: a row deleted on one site while
/// its slot was lost comes back from the other.
pub async fn resync(cfg: &Config) -> Result<ResyncReport, Error> {
    let (p2b, b2p) = crate::run::directions(cfg);
    let mut report = ResyncReport {
        directions: Vec::new(),
    };
    for d in [p2b, b2p] {
        let (ss, ts) = (d.source.as_str(), d.target.as_str());
        let src = connect(&cfg.link(d.source)?).await?;
        let dst = connect(&cfg.link(d.target)?).await?;
        let slot = slot_name(&d);
        let origin = origin_name(d.source);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut what = Vec::new();
        if let Some(wal) = drop_slot(&src, d.source, &slot).await? {
            what.push(format!("slot {slot} on the {ss} dropped (was {wal})"));
        }
        loop {
            let r = dst
                .execute(
                    "SELECT pg_replication_origin_drop($1) WHERE pg_replication_origin_oid($1) IS NOT NULL",
                    &[&origin],
                )
                .await;
            match r {
                Ok(n) => {
                    if n > 0 {
                        what.push(format!("origin {origin} on the {ts} reset"));
                    }
                    break;
                }
                // In use by an apply session: end it (the replicator reconnects).
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "origin busy; ending its session");
                    dst.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        &[&format!("gsb-apply-{}", d.name)],
                    )
                    .await
                    .map_err(|e| Error::db(ts, "ending the apply session", e))?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(Error::db(ts, format!("resetting origin {origin}"), e)),
            }
        }
        if what.is_empty() {
            what.push("nothing to reset".into());
        }
        report.directions.push((d.name.to_owned(), what.join("; ")));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echoed_transactions_rows_are_dropped_undecoded() {
        let txn = |skip| {
            Some(Txn {
                skip,
                ts_us: 0,
                changes: Vec::new(),
            })
        };
        // An Insert whose value is cut short: decoding it would fail.
        let row = b"I\0\0\x40\x00N\0\x01t\0\0\0\x10abc";
        assert!(pgoutput::decode(bytes::Bytes::from_static(row)).is_err());
        assert!(
            is_echoed_row(&txn(true), row),
            "an echo's row is not decoded"
        );
        for m in [&b"U\0"[..], b"D\0"] {
            assert!(is_echoed_row(&txn(true), m));
        }
        assert!(
            !is_echoed_row(&txn(false), row),
            "a row to apply is decoded"
        );
        assert!(
            !is_echoed_row(&None, row),
            "outside a transaction: decoded, an error"
        );
        // An echo's other messages are read: a Relation message describes later rows.
        for m in [&b"R\0"[..], b"C\0", b"B\0", b"Y\0"] {
            assert!(!is_echoed_row(&txn(true), m));
        }
    }
}
