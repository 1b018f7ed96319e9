//! The switch of a pair from the trigger capture (schema v3, `capture = "triggers"`) to the
//! logical capture, losing and duplicating nothing the change logs hold, with writers running.
//!
//! 1. Both change logs are drained by the trigger capture's own apply while the application
//!    writes (so what is left for step 3 is what arrives in the meantime).
//! 2. Each source still capturing by trigger gets a fresh slot (no snapshot): from its
//!    consistent point on, every commit is decoded.
//! 3. On each site still capturing by trigger, one transaction locks the captured tables
//!    (`SHARE ROW EXCLUSIVE`: the application's writers wait, readers do not), reads the WAL
//!    insert position P (the peer's origin progress for this site is set to P), applies what
//!    the peer's change log still holds for it under the peer's replication origin (the
//!    cursor moves in this transaction), and drops the triggers. The logical stream of this
//!    site starts at P, and logical decoding skips every transaction that committed before
//!    its start: exactly the ones the triggers captured (every writer of the tables had
//!    committed when the lock was granted; every later one commits after the drop; the
//!    switch's own transaction carries the origin, so its applied rows are not shipped back).
//! 4. Commit, primary then backup.
//!
//! Crash safety: until a site's transaction commits nothing of it holds (its triggers, its
//! cursor); the slot and the origin progress are redone by the next attempt (the progress is
//! set and flushed before the commit, so a committed switch always has it). A crash between
//! the two commits leaves one site switched: the next start finishes the other one; the
//! change log of the switched site no longer grows, and what the other site's log gained in
//! between is applied to the switched site (under the origin, so never shipped back) by the
//! trigger apply, whose conflict rule does not see the switched site's own writes since its
//! switch: a row edited on both sites in that window (between a crash between the two
//! commits and the next start) can end different on the two sites, and only `gsb verify`
//! shows it. Two-phase commit would close it but needs `max_prepared_transactions` > 0 on
//! both servers (0 by default).

use crate::changelog;
use crate::db::{Conn, Site};
use crate::logical::{create_origin, drop_slot, origin_name, slot_name};
use crate::metrics::Metrics;
use crate::walstream::{fmt_lsn, parse_lsn};
use crate::worker::{drain_change_log, Direction, Drain};
use crate::{Config, Error};

/// The tables of `c` that still carry the capture trigger.
async fn triggered(c: &Conn, site: Site) -> Result<Vec<String>, Error> {
    let rows = c
        .query(
            "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = 'gsb_capture' ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| Error::db(site.as_str(), "looking for the trigger capture", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Switches whichever of the two sites still captures by trigger (see the module doc). `p`
/// and `b` are plain sessions; `p_lock`, `b_lock` sessions this function may hold a
/// transaction on. Does nothing when no site has a capture trigger.
pub(crate) async fn switch_from_triggers(
    cfg: &Config,
    [p, b, p_lock, b_lock]: [&Conn; 4],
    p2b: &Direction,
    b2p: &Direction,
    metrics: &Metrics,
) -> Result<(), Error> {
    let p_trig = triggered(p, Site::Primary).await?;
    let b_trig = triggered(b, Site::Backup).await?;
    if p_trig.is_empty() && b_trig.is_empty() {
        return Ok(());
    }
    tracing::info!(
        primary_tables = p_trig.len(),
        backup_tables = b_trig.len(),
        "switching from the trigger capture to the logical capture"
    );
    // 1. With writers running, into each site still capturing (a site switched already, by an
    // attempt that committed on one site only, gets its share under the origin in step 3).
    let mut n1 = 0;
    let mut n2 = 0;
    if !b_trig.is_empty() {
        n1 = drain_change_log(p2b, cfg, p, b, metrics, Drain::CaughtUp, false).await?;
    }
    if !p_trig.is_empty() {
        n2 = drain_change_log(b2p, cfg, b, p, metrics, Drain::CaughtUp, false).await?;
    }
    tracing::info!(
        primary_to_backup = n1,
        backup_to_primary = n2,
        "change logs drained with writers running"
    );
    // 2. Slots of the sources still capturing by trigger.
    for (c, site, tables, d) in [
        (p, Site::Primary, &p_trig, p2b),
        (b, Site::Backup, &b_trig, b2p),
    ] {
        if !tables.is_empty() {
            fresh_slot(c, site, &slot_name(d)).await?;
        }
    }
    // 3. Lock, drain the rest, drop, set the progress.
    let sites = [
        (p_lock, Site::Primary, &p_trig, b, b2p, p2b),
        (b_lock, Site::Backup, &b_trig, p, p2b, b2p),
    ];
    let mut open = Vec::new();
    let mut result = Ok(());
    for (lock, site, tables, _, _, _) in &sites {
        if tables.is_empty() {
            continue;
        }
        open.push(*lock);
        result = begin_and_lock(lock, *site, tables).await;
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = finish(cfg, p, b, &sites, metrics).await;
    }
    // 4. Commit (or roll back every open transaction); after a failed COMMIT the rest roll
    // back, so a failure leaves at most the sites committed before it switched.
    for lock in open {
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let r = lock
            .batch_execute(end)
            .await
            .map_err(|e| Error::db("primary or backup", "ending the capture switch", e));
        if result.is_ok() {
            result = r;
        }
    }
    if result.is_ok() {
        tracing::info!("trigger capture removed: logical capture from now on");
    }
    result
}

type SiteStep<'a> = (
    &'a Conn,
    Site,
    &'a Vec<String>,
    &'a Conn,
    &'a Direction,
    &'a Direction,
);

/// Step 3 once every capturing site's tables are locked.
///
/// The start P of each capturing site's stream is set on the peer first (an origin can
/// only be advanced while no session has it set up). Then each site gets what the peer's
/// change log still holds, applied under the peer's replication origin (inside the locking
/// transaction when the site still captures, else on its plain session): the rows carry
/// the peer's origin like every row the logical capture applies, so the logical rule later
/// sees them as the peer's, and this site's stream drops them as echoes.
async fn finish(
    cfg: &Config,
    p: &Conn,
    b: &Conn,
    sites: &[SiteStep<'_>; 2],
    metrics: &Metrics,
) -> Result<(), Error> {
    for (lock, site, tables, peer, _, outbound) in sites {
        if tables.is_empty() {
            continue;
        }
        let s = site.as_str();
        let at: String = lock
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(|e| Error::db(s, "reading the WAL position of the switch", e))?
            .get(0);
        let origin = origin_name(*site);
        let ps = outbound.target.as_str();
        create_origin(peer, outbound.target, &origin).await?;
        peer.execute(
            "SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)",
            &[&origin, &at],
        )
        .await
        .map_err(|e| Error::db(ps, format!("setting the start of {origin}"), e))?;
        // The advance is WAL-logged but not flushed: a synchronous commit of a transaction with
        // an xid flushes it, before this site's switch can commit.
        peer.batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); COMMIT",
        )
        .await
        .map_err(|e| Error::db(ps, format!("flushing the start of {origin}"), e))?;
        let at = parse_lsn(&at).map(fmt_lsn).unwrap_or(at);
        tracing::info!(site = s, start = %at, "the logical stream of this site starts here");
    }
    for (lock, site, tables, _, inbound, _) in sites {
        let (src, plain) = match site {
            Site::Primary => (b, p),
            Site::Backup => (p, b),
        };
        let dst = if tables.is_empty() { plain } else { *lock };
        let s = site.as_str();
        let origin = origin_name(inbound.source);
        create_origin(plain, *site, &origin).await?;
        dst.execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
            .map_err(|e| Error::db(s, format!("setting up origin {origin}"), e))?;
        let nested = !tables.is_empty();
        let drained =
            drain_change_log(inbound, cfg, src, dst, metrics, Drain::Settled, nested).await;
        if tables.is_empty() {
            // Committed already (no transaction is open on the plain session); released
            // whatever the drain did, so the next attempt can advance it.
            dst.execute("SELECT pg_replication_origin_session_reset()", &[])
                .await
                .map_err(|e| Error::db(s, format!("releasing origin {origin}"), e))?;
        }
        let n = drained?;
        tracing::info!(
            direction = inbound.name,
            changes = n,
            "change log drained under the switch lock"
        );
    }
    for (lock, site, tables, _, _, _) in sites {
        let s = site.as_str();
        for t in tables.iter() {
            lock.batch_execute(&format!("DROP TRIGGER gsb_capture ON {t}"))
                .await
                .map_err(|e| Error::db(s, format!("dropping the capture trigger on {t}"), e))?;
        }
        if !tables.is_empty() {
            tracing::info!(site = s, tables = tables.len(), "capture triggers dropped");
        }
    }
    Ok(())
}

async fn begin_and_lock(c: &Conn, site: Site, tables: &[String]) -> Result<(), Error> {
    let s = site.as_str();
    c.batch_execute("BEGIN")
        .await
        .map_err(|e| Error::db(s, "starting the capture switch", e))?;
    if tables.is_empty() {
        return Ok(());
    }
    // Bounded: behind a long transaction on the tables the switch gives up and is retried
    // (writers queue behind a waiting lock).
    c.batch_execute(&format!(
        "SET LOCAL lock_timeout = '10s'; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
        tables.join(", ")
    ))
    .await
    .map_err(|e| Error::db(s, "locking the tables for the capture switch", e))
}

/// Moves a pair on the trigger capture from the first generation's apply (HLC stamps, row
/// versions) to the apply it shares with the logical capture, losing nothing its change logs
/// hold. Per direction whose cursor the first generation left: one transaction on the source
/// locks its captured tables (`lock_timeout` 10 s); with every writer of them committed, the
/// target drains the whole change log with the first generation's apply, under the source's
/// replication origin (the rows are the source's for the new rule), and records the source's
/// snapshot of that moment as the new cursor, in one transaction; then the lock is released.
/// Every later change commits after that snapshot, so it is exactly what the new reader
/// starts with. Once both directions have moved, each site's triggers stop stamping (format
/// 2, swapped under the captured tables' lock) and its row versions are dropped. A crash at
/// any point leaves a state the next start finishes: a direction moves in one target commit;
/// the change log's format 1 rows are read by either apply.
///
/// A row last written by the first generation's apply carries no origin, so the new rule
/// sees it as the target's own: the next change of it from the source wins by its later
/// commit time (and is logged as a conflict, the winner right, the log over-reporting once).
pub(crate) async fn adopt(
    cfg: &Config,
    [p, b, p_lock, b_lock]: [&Conn; 4],
    p2b: &Direction,
    b2p: &Direction,
    metrics: &Metrics,
) -> Result<(), Error> {
    for (d, src, lock, dst) in [(p2b, p, p_lock, b), (b2p, b, b_lock, p)] {
        if changelog::read_cursor(dst, d.target, d.name)
            .await?
            .is_some()
        {
            continue;
        }
        let tables = triggered(src, d.source).await?;
        tracing::info!(
            direction = d.name,
            tables = tables.len(),
            "moving the trigger capture to the shared apply: draining the change log under a lock"
        );
        let (ss, ts) = (d.source.as_str(), d.target.as_str());
        begin_and_lock(lock, d.source, &tables).await?;
        let origin = origin_name(d.source);
        let moved = async {
            let at: String = lock
                .query_one("SELECT pg_current_snapshot()::text", &[])
                .await
                .map_err(|e| Error::db(ss, "reading the snapshot of the move", e))?
                .get(0);
            create_origin(dst, d.target, &origin).await?;
            crate::logical::setup_origin_session(dst, ts, &origin).await?;
            dst.batch_execute("BEGIN")
                .await
                .map_err(|e| Error::db(ts, "starting the move", e))?;
            let n = drain_change_log(d, cfg, src, dst, metrics, Drain::Settled, true).await?;
            dst.execute(
                "UPDATE gsb.cursors SET done = $2::text::pg_snapshot, part = NULL, part_id = NULL, \
                 applied_at = now() WHERE direction = $1",
                &[&d.name, &at],
            )
            .await
            .map_err(|e| Error::db(ts, "recording the new cursor", e))?;
            dst.batch_execute("COMMIT")
                .await
                .map_err(|e| Error::db(ts, "committing the move", e))?;
            Ok::<_, Error>(n)
        }
        .await;
        if moved.is_err() {
            let _ = dst.batch_execute("ROLLBACK").await;
        }
        let _ = dst
            .execute("SELECT pg_replication_origin_session_reset()", &[])
            .await;
        let _ = lock.batch_execute("ROLLBACK").await;
        let n = moved?;
        tracing::info!(
            direction = d.name,
            changes = n,
            "change log drained; the shared apply reads it from now on"
        );
    }
    for (c, site) in [(p, Site::Primary), (b, Site::Backup)] {
        let s = site.as_str();
        let format: i32 = c
            .query_one("SELECT capture_format FROM gsb.site", &[])
            .await
            .map_err(|e| Error::db(s, "reading gsb.site", e))?
            .get(0);
        if format != 1 {
            continue;
        }
        // Under the tables' lock: no writer still runs the stamping function after it.
        let tables = triggered(c, site).await?;
        begin_and_lock(c, site, &tables).await?;
        let swapped = c
            .batch_execute(&format!(
                "{} UPDATE gsb.site SET capture_format = 2; TRUNCATE gsb.row_versions; COMMIT",
                crate::sql::capture_functions(s, 2)
            ))
            .await
            .map_err(|e| Error::db(s, "moving the capture triggers to format 2", e));
        if swapped.is_err() {
            let _ = c.batch_execute("ROLLBACK").await;
        }
        swapped?;
        tracing::info!(
            site = s,
            "capture triggers no longer stamp changes (format 2)"
        );
    }
    Ok(())
}

/// Drops the slot `slot` if it exists and creates it again: a slot left from an earlier
/// attempt or capture may start anywhere.
async fn fresh_slot(c: &Conn, site: Site, slot: &str) -> Result<(), Error> {
    drop_slot(c, site, slot).await?;
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .map_err(|e| Error::db(site.as_str(), format!("creating slot {slot}"), e))?;
    Ok(())
}
