//! The trigger capture's reader: the source's change log (`gsb.changes`, filled by the capture
//! triggers) cut into batches of the shape the logical capture's apply takes
//! ([`apply::Batch`]), so both captures share one apply and conflict path.
//!
//! A batch is the changes of the transactions committed between two snapshots of the source,
//! visible in the newer one and not in the cursor's (the batches of Skytools PgQ), applied in
//! change id order. Why that order is enough: a change's id is drawn while its transaction
//! holds the row's lock, so the changes of one row are in id order whatever the order of their
//! transactions' xids or commits; and a transaction that changed a row before a committed
//! change of it had itself committed (it held the lock), so a snapshot never holds a row's
//! change without the ones before it. No committed change waits behind an older transaction
//! still open (the first generation read only below the snapshot's xmin).
//!
//! A set larger than the batch size is applied in several batches: the cursor then holds the
//! set's snapshot and the last id applied (`part`, `part_id`) until the set is done. Each
//! change carries its transaction's commit time (`pg_xact_commit_timestamp`), which the apply
//! decides conflicts by, as for the logical capture.
//!
//! The values travel as the logical capture's do, in their text form: each change's JSON row
//! is turned back into the table's row type (`jsonb_populate_record`) and each column cast to
//! text on the source, so every type round-trips exactly; a column the JSON lacks (added
//! after the change was captured) is left as it is on the target.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_postgres::{Client, Statement};

use crate::apply::{Batch, Change, Fence, Op, Shape};
use crate::db::Site;
use crate::pgoutput::{Column, Value};
use crate::schema::{ident, qident};
use crate::Error;

/// How far a direction's target has applied the source's change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// Every change of a transaction visible in this snapshot is applied.
    pub done: String,
    /// A set being applied in several batches: its snapshot ...
    pub part: Option<String>,
    /// ... and the last id of it applied.
    pub part_id: Option<i64>,
}

/// The parameters of `sql::ADVANCE_CURSOR` moving `direction`'s cursor from `from` to `to`.
pub(crate) fn advance_params<'a>(
    direction: &'a &'static str,
    from: &'a Cursor,
    to: &'a Cursor,
) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 7] {
    [
        direction,
        &from.done,
        &from.part,
        &from.part_id,
        &to.done,
        &to.part,
        &to.part_id,
    ]
}

/// Reads a direction's cursor on the target: `None` while the first generation's (xid, id)
/// cursor is still in force (its change log not drained yet by `upgrade::adopt`).
pub(crate) async fn read_cursor(
    dst: &Client,
    site: Site,
    direction: &str,
) -> Result<Option<Cursor>, Error> {
    let r = dst
        .query_opt(crate::sql::CURSOR, &[&direction])
        .await
        .map_err(|e| Error::db(site.as_str(), "reading the cursor", e))?;
    Ok(r.and_then(|r| {
        let done: Option<String> = r.get(0);
        done.map(|done| Cursor {
            done,
            part: r.get(1),
            part_id: r.get(2),
        })
    }))
}

/// One direction's reader on its source.
pub(crate) struct Reader {
    site: Site,
    tables: Vec<String>,
    shapes: HashMap<String, Arc<Shape>>,
    fetch: Statement,
}

/// What one fetch found.
pub(crate) enum Next {
    /// Changes to apply; the batch's fence says where the cursor goes.
    Batch(Batch),
    /// Nothing new; the source's snapshot of now (a cursor with nothing to apply may move
    /// there, which keeps the next reads short).
    Idle(String),
}

impl Reader {
    /// Reads the shapes of `tables` on the source `src` and prepares the fetch.
    pub(crate) async fn new(src: &Client, site: Site, tables: &[String]) -> Result<Self, Error> {
        let shapes = shapes(src, site, tables).await?;
        let fetch = prepare_fetch(src, site, tables, &shapes).await?;
        Ok(Self {
            site,
            tables: tables.to_vec(),
            shapes,
            fetch,
        })
    }

    /// The next batch after `cursor` (at most `limit` changes) of direction `direction`.
    pub(crate) async fn next(
        &mut self,
        src: &Client,
        direction: &'static str,
        cursor: &Cursor,
        limit: i64,
    ) -> Result<Next, Error> {
        let mut rows = self.query(src, cursor, limit).await?;
        // A column added on the source since the shapes were read: read them again.
        if rows
            .iter()
            .any(|r| r.get::<_, Option<bool>>(7) == Some(true))
        {
            tracing::info!(
                site = self.site.as_str(),
                "a replicated table has a column its reader did not know; reading the tables again"
            );
            self.shapes = shapes(src, self.site, &self.tables).await?;
            self.fetch = prepare_fetch(src, self.site, &self.tables, &self.shapes).await?;
            rows = self.query(src, cursor, limit).await?;
        }
        let snap: String = rows
            .first()
            .map(|r| r.get(8))
            .ok_or_else(|| Error::Protocol("the change log fetch returned no row".into()))?;
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.get::<_, Option<i64>>(0).is_some())
            .collect();
        if rows.is_empty() {
            return Ok(Next::Idle(snap));
        }
        let more = rows.len() as i64 > limit;
        let rows = &rows[..rows.len().min(limit as usize)];
        let mut batch = Batch::default();
        let mut xids: HashSet<&str> = HashSet::new();
        let mut data_xids: HashSet<&str> = HashSet::new();
        let mut last_id = 0;
        for r in rows {
            let id: i64 = r.get(0);
            let xid: &str = r.get(1);
            let tbl: &str = r.get(2);
            let op = match r.get::<_, &str>(3) {
                "I" => Op::Insert,
                "U" => Op::Update,
                "D" => Op::Delete,
                other => {
                    return Err(Error::Protocol(format!(
                        "gsb.changes id {id}: unknown operation {other:?}"
                    )))
                }
            };
            let shape = self.shapes.get(tbl).ok_or_else(|| {
                Error::Protocol(format!(
                    "gsb.changes id {id}: table {tbl} is not replicated"
                ))
            })?;
            let vals: Vec<Option<String>> = r.get(5);
            let present: Vec<bool> = r.get(6);
            let vals = vals
                .into_iter()
                .zip(present)
                .map(|(v, p)| match (v, p) {
                    (Some(v), true) => Value::Text(v.into()),
                    (None, true) => Value::Null,
                    // A delete carries its key only; an insert or update lacks a column added
                    // after it was captured: left as it is.
                    (_, false) if op == Op::Delete => Value::Null,
                    (_, false) => Value::UnchangedToast,
                })
                .collect();
            let ts_us: i64 = r.get(4);
            let initial: bool = r.get(9);
            xids.insert(xid);
            if tbl != "gsb.heartbeat" {
                batch.data_rows += 1;
                data_xids.insert(xid);
            }
            batch.commit_ts_us = batch.commit_ts_us.max(ts_us);
            batch.changes.push(Change {
                shape: shape.clone(),
                op,
                vals,
                ts_us,
                initial,
            });
            last_id = id;
        }
        batch.txns = xids.len();
        batch.data_txns = data_xids.len();
        let to = if more {
            Cursor {
                done: cursor.done.clone(),
                part: Some(snap),
                part_id: Some(last_id),
            }
        } else {
            Cursor {
                done: snap,
                part: None,
                part_id: None,
            }
        };
        batch.fence = Some(Fence {
            direction,
            from: cursor.clone(),
            to,
        });
        Ok(Next::Batch(batch))
    }

    async fn query(
        &self,
        src: &Client,
        c: &Cursor,
        limit: i64,
    ) -> Result<Vec<tokio_postgres::Row>, Error> {
        src.query(
            &self.fetch,
            &[&c.done, &c.part, &c.part_id, &self.tables, &(limit + 1)],
        )
        .await
        .map_err(|e| Error::db(self.site.as_str(), "fetching changes", e))
    }
}

/// The source's columns of each table (generated ones are not captured).
async fn shapes(
    src: &Client,
    site: Site,
    tables: &[String],
) -> Result<HashMap<String, Arc<Shape>>, Error> {
    let mut out = HashMap::new();
    for t in tables {
        let rows = src
            .query(
                "SELECT a.attname::text, a.atttypid::oid, \
                        coalesce(a.attnum = ANY(i.indkey::int2[]), false) \
                 FROM pg_attribute a \
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                   AND a.attgenerated = '' ORDER BY a.attnum",
                &[&qident(t)],
            )
            .await
            .map_err(|e| Error::db(site.as_str(), format!("reading the columns of {t}"), e))?;
        let columns = rows
            .iter()
            .map(|r| Column {
                name: r.get(0),
                type_oid: r.get(1),
                key: r.get(2),
            })
            .collect();
        out.insert(
            t.clone(),
            Arc::new(Shape {
                name: t.clone(),
                columns,
            }),
        );
    }
    Ok(out)
}

/// The fetch: per change its id, xid, table, operation, commit time (Unix µs), values (text,
/// in the shape's column order), which of them the JSON row holds, whether it holds a column
/// the shape lacks, the snapshot the set is read at, and whether it is an initial row.
/// Parameters: done, part, part_id, tables, limit. Always one row at least (the snapshot).
/// No condition on the xid range: the only plan is then the id index in order, stopping after
/// `limit` rows (a generic plan over the (xid, id) key read and sorted the whole pending set for
/// each batch: 200 ms a batch at 500k rows pending).
async fn prepare_fetch(
    src: &Client,
    site: Site,
    tables: &[String],
    shapes: &HashMap<String, Arc<Shape>>,
) -> Result<Statement, Error> {
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let (mut vals, mut present, mut extra) = (String::new(), String::new(), String::new());
    for t in tables {
        let cols = &shapes[t].columns;
        let names = cols.iter().map(|c| lit(&c.name)).collect::<Vec<_>>();
        vals += &format!(
            " WHEN {} THEN (SELECT ARRAY[{}]::text[] FROM jsonb_populate_record(NULL::{}, j.r) r)",
            lit(t),
            cols.iter()
                .map(|c| format!("r.{}::text", ident(&c.name)))
                .collect::<Vec<_>>()
                .join(", "),
            qident(t)
        );
        present += &format!(
            " WHEN {} THEN ARRAY[{}]::bool[]",
            lit(t),
            names
                .iter()
                .map(|n| format!("j.r ? {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        extra += &format!(
            " WHEN {} THEN j.r - ARRAY[{}]::text[] <> '{{}}'::jsonb",
            lit(t),
            names.join(", ")
        );
    }
    let sql = format!(
        "SELECT c.id, c.xid::text, c.tbl, c.op::text, \
                (extract(epoch FROM coalesce(pg_xact_commit_timestamp(c.xid::xid), c.created_at)) * 1000000)::int8, \
                CASE c.tbl{vals} END, CASE c.tbl{present} END, CASE c.tbl{extra} END, \
                s.snap::text, coalesce(c.hlc = 0, false) \
         FROM (SELECT coalesce($2::text::pg_snapshot, pg_current_snapshot()) AS snap) s \
         LEFT JOIN LATERAL ( \
             SELECT * FROM gsb.changes c \
             WHERE pg_visible_in_snapshot(c.xid, s.snap) \
               AND NOT pg_visible_in_snapshot(c.xid, $1::text::pg_snapshot) \
               AND c.id > coalesce($3::int8, 0) AND c.tbl = ANY($4::text[]) \
             ORDER BY c.id LIMIT $5::int8) c ON true \
         LEFT JOIN LATERAL (SELECT coalesce(c.\"row\", c.pk) AS r) j ON true \
         ORDER BY c.id"
    );
    src.prepare(&sql)
        .await
        .map_err(|e| Error::db(site.as_str(), "preparing the change log fetch", e))
}
