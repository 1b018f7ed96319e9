//! The logical capture's apply: a batch of whole source transactions applied on the target
//! in ONE target transaction, decided in Rust and written set-based, in two round trips.
//!
//! 1. Pipelined: `BEGIN`; the origin setup (`pg_replication_origin_xact_setup(end, ts)`, so
//!    the commit records the source's commit time and moves the origin progress) with the
//!    target's clock; per table one statement that locks every local row the batch touches
//!    (in key order) and returns its values with its last writer
//!    (`pg_xact_commit_timestamp_origin(xmin)`).
//! 2. The decision, per key in source commit order, each change by its OWN commit time: a row
//!    last written by this source (or absent, for an insert) takes the change; a row written
//!    elsewhere is a concurrent write: a delete wins, otherwise the later commit time wins,
//!    ties to the primary, the losing version goes to `gsb.conflicts`; an update of a row
//!    that is gone is skipped and logged; a stamp beyond `max_clock_skew` is rejected and
//!    logged.
//! 3. Pipelined: the conflict log rows, then per table one `DELETE`, one `UPDATE` per set of
//!    columns (unchanged TOAST columns are left out, never set to NULL) and one `INSERT` of the
//!    keys' net outcomes; `COMMIT`. Rows travel as scalar parameters in a `VALUES` list of
//!    their number (up to [`VALUES_MAX`]: the server keeps one plan for it) or as text
//!    arrays through `unnest`. If a set-based
//!    statement fails (a unique key that only the source's row order satisfies), the
//!    transaction is rolled back and the batch applied again with one statement per change in
//!    commit order (still one round trip).
//!
//! A batch with nothing to read and nothing to do but one `INSERT` (the usual one-row
//! transaction under light load) is one statement that also sets up the origin, committed by
//! itself (an implicit transaction): one sync point instead of four. A batch with updates or
//! deletes is first tried without reading, its rows presumed as one-way replication leaves
//! them: a key it first inserts absent, any other last written by this source. Each `UPDATE`
//! and `DELETE` then writes only rows whose last writer is this source's origin and fails
//! unless every key was such a row. Alone it is one statement committed by itself; several
//! writes (each key in one of them) are one statement too, each write a data-modifying CTE
//! ([`combined_sql`]): one sync point either way. A row written here or by another origin, or
//! gone, or an inserted key that exists, fails it (nothing is committed), and the batch takes
//! the two round trips above. Any other batch with nothing to read is one pipelined
//! transaction (`BEGIN`, the writes, `COMMIT`) whose first write carries the origin setup.
//!
//! Statements are prepared once per table and session and derived again when the source's
//! relation changes (a Relation message: a column added). Values travel in their text form
//! and are cast to the target's column types by the statements.

use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use serde_json::{json, Map, Value as Json};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::pgoutput::{self, Text, Value};
use crate::schema::{ident, qident};
use crate::Error;

/// A relation as the source last described it.
#[derive(Debug)]
pub(crate) struct Shape {
    /// `schema.table`.
    pub name: String,
    /// The source's columns, in its order.
    pub columns: Vec<pgoutput::Column>,
}

/// What a change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Insert,
    Update,
    Delete,
}

/// One change of a source transaction.
#[derive(Debug)]
pub(crate) struct Change {
    /// The relation as it was when the change was made.
    pub shape: Arc<Shape>,
    pub op: Op,
    /// One value per column of `shape` (for a delete: the key columns, the rest NULL).
    pub vals: Vec<Value>,
    /// Commit time of its source transaction, Unix microseconds.
    pub ts_us: i64,
    /// A row the source held before replication started (the trigger capture's initial
    /// snapshot): against a different local row, the primary's version wins.
    pub initial: bool,
}

/// The trigger capture's cursor move, written in the batch's transaction: from what the
/// reader started at to the batch's end (see `changelog.rs`).
#[derive(Debug, Clone)]
pub(crate) struct Fence {
    pub direction: &'static str,
    pub from: crate::changelog::Cursor,
    pub to: crate::changelog::Cursor,
}

/// Source transactions applied in one target transaction.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Every change, in source commit order.
    pub changes: Vec<Change>,
    pub txns: usize,
    /// Rows and transactions of the application's tables (not heartbeats).
    pub data_rows: usize,
    pub data_txns: usize,
    /// End LSN of the last transaction: the origin progress once applied.
    pub end_lsn: u64,
    /// Commit time of the last transaction, Unix microseconds.
    pub commit_ts_us: i64,
    /// The trigger capture's cursor move (the logical capture's is the origin progress).
    pub fence: Option<Fence>,
}

/// What a batch did, in the shape [`crate::worker::record_result`] counts.
pub(crate) type Outcome = Json;

/// The heartbeat table: its `at` column gives the lag.
const HEARTBEAT: &str = "gsb.heartbeat";

/// A value of a target column in a change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    /// Not sent (unchanged TOAST, or a column the change's relation did not have).
    Unset,
    /// This value (None: NULL).
    Set(Option<Text>),
}

/// A target column that the source also has.
#[derive(Debug)]
struct Col {
    /// Name (unquoted).
    name: String,
    /// The target's type, without modifier (the column's own applies on assignment).
    ty: String,
    /// Part of the primary key.
    key: bool,
    /// Type OID on the source (JSON and JSONB are embedded as JSON in the conflict log).
    src_oid: u32,
    /// Its position among the columns of the table's shape.
    src_idx: usize,
}

/// One table's statements for one source shape.
struct Table {
    shape: Arc<Shape>,
    cols: Vec<Col>,
    /// Indexes into `cols` of the key columns, in key order.
    key: Vec<usize>,
    /// `COPY ... FROM STDIN` of every column (text format).
    copy: Statement,
    /// The same in the binary format, with each column's type, when every column's type is
    /// one `copybin` writes.
    copy_bin: Option<(Statement, Vec<crate::copybin::BinType>)>,
    conflict: Statement,
    /// The lock, insert, update and delete statements (see [`Form`]), prepared when first
    /// needed.
    forms: std::sync::Mutex<HashMap<Form, Statement>>,
}

/// Most rows a statement (lock, insert, update, delete) takes as a `VALUES` list of scalar
/// parameters; more go as text arrays through `unnest`. The server keeps one generic plan for a
/// `VALUES` list of a known length (a nested loop over the key's index), where a join with
/// `unnest` of parameters is planned again at every execution (its generic plan, sized for
/// ten rows, costs more than a custom one for a few) or, forced generic, hash-joined.
const VALUES_MAX: usize = 16;

/// Most statements a table keeps prepared (see [`Table::form`]): past it they are prepared
/// again as used.
const FORMS_MAX: usize = 256;

/// What one of a table's statements does: a write of the second round trip, or the lock.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Does {
    /// Lock and read the local rows.
    Lock,
    Delete,
    Insert,
    /// Set the columns of the mask (over `cols`; the key columns are always passed).
    Update(Vec<bool>),
}

/// Which statement: what it does, how its rows are passed, alone or not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Form {
    does: Does,
    /// `Some(n)`: n rows as scalar parameters (row by row) in a `VALUES` list; `None`: one
    /// text array per column.
    rows: Option<usize>,
    /// Carries the origin setup, so it can be the batch's one statement, committed by
    /// itself. An update or delete in this form is the checked one of presumed batches (see
    /// [`presumed_sql`]), alone or among the writes of one transaction.
    alone: bool,
}

impl Form {
    fn new(does: Does, rows: usize, alone: bool) -> Self {
        Self {
            does,
            rows: (rows <= VALUES_MAX).then_some(rows),
            alone,
        }
    }
}

/// A write of the second round trip with its statement.
struct Writing {
    form: Form,
    stmt: Statement,
    /// Its number of rows (a checked statement's count to match), kept as the parameter's
    /// storage.
    expected: i64,
    arrays: Arrays,
}

impl Writing {
    /// The statement's parameters: the rows, then for a form carrying the setup its end LSN
    /// and commit time, and for a checked one the source's origin and the row count.
    fn params<'a>(
        &'a self,
        setup: &[&'a (dyn ToSql + Sync); 2],
        origin: &'a i64,
    ) -> Vec<&'a (dyn ToSql + Sync)> {
        let mut p = params_of(&self.arrays, self.form.rows);
        if self.form.alone {
            p.extend(setup);
            if self.form.does != Does::Insert {
                p.push(origin);
                p.push(&self.expected);
            }
        }
        p
    }
}

/// `arrays` as parameters: each array (`rows` None) or, row by row, each value.
fn params_of(arrays: &Arrays, rows: Option<usize>) -> Vec<&(dyn ToSql + Sync)> {
    match rows {
        None => arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect(),
        Some(n) => (0..n)
            .flat_map(|r| arrays.iter().map(move |a| &a[r] as &(dyn ToSql + Sync)))
            .collect(),
    }
}

/// A statement's parameters: one text array per column it takes.
type Arrays = Vec<Vec<Option<Text>>>;

/// The local row of a key before the batch, as the lock read it.
struct Local {
    /// `roident` of its last writer (0: written on this site).
    origin: i64,
    /// Its commit time (None: unknown, e.g. older than `track_commit_timestamp`).
    ts_us: Option<i64>,
    /// Its values, per `cols`, in text form.
    vals: Vec<Option<Text>>,
}

/// Which version a conflict log column holds.
#[derive(Debug, Clone, Copy)]
enum Side {
    None,
    /// The local row before the batch.
    Local,
    /// The local row with the change's values over it.
    Merged,
    /// The change's values alone.
    Remote,
}

impl Side {
    fn as_str(self) -> Option<&'static str> {
        match self {
            Side::None => None,
            Side::Local => Some("local"),
            Side::Merged => Some("merged"),
            Side::Remote => Some("remote"),
        }
    }
}

/// One `gsb.conflicts` row to write.
struct Conflict {
    /// Index of the change it is about.
    change: usize,
    reason: &'static str,
    winner: (Option<String>, Option<i64>, Side),
    loser: (Option<String>, Option<i64>, Side),
}

/// A change converted to the target's columns.
struct Ch {
    op: Op,
    cells: Vec<Cell>,
    key: Vec<Text>,
    ts_us: i64,
    initial: bool,
}

/// The writes of one table in a batch.
#[derive(Default)]
struct Plan {
    /// Changes that are written, in commit order (index into the table's `Ch` list).
    accepted: Vec<usize>,
    conflicts: Vec<Conflict>,
    applied: u64,
    skewed: u64,
    /// Keys in first-appearance order, with whether a local row existed before the batch.
    keys: Vec<(Vec<Text>, bool)>,
    /// Per key (same order): the accepted changes.
    per_key: Vec<Vec<usize>>,
}

/// Applies batches of one direction on its target.
pub(crate) struct Applier {
    source: &'static str,
    target: &'static str,
    source_is_primary: bool,
    /// `roident` of the source's replication origin on the target.
    origin_id: i64,
    skew_us: i64,
    setup: Statement,
    tables: HashMap<String, Table>,
    /// The target's clock minus this host's, microseconds, as last measured (a batch with
    /// nothing to read decides clock skew by it instead of asking).
    clock: std::sync::atomic::AtomicI64,
    /// `gsb.advance_cursor`, prepared with the first batch that carries a fence.
    fence: Option<Statement>,
    /// Batches applied inside the caller's transaction (savepoints instead of BEGIN/COMMIT).
    nested: bool,
    /// The one-statement writes of presumed batches (see [`combined_sql`]), by the table and
    /// form of each write; cleared when a table is prepared again, bounded by [`FORMS_MAX`].
    combined: std::sync::Mutex<HashMap<Vec<(String, Form)>, Statement>>,
}

/// The statements that start, end and undo a batch's transaction.
struct TxnWords {
    begin: &'static str,
    commit: &'static str,
    rollback: &'static str,
}

const OWN_TXN: TxnWords = TxnWords {
    begin: "BEGIN",
    commit: "COMMIT",
    rollback: "ROLLBACK",
};

const NESTED_TXN: TxnWords = TxnWords {
    begin: "SAVEPOINT gsb_apply",
    commit: "RELEASE SAVEPOINT gsb_apply",
    rollback: "ROLLBACK TO SAVEPOINT gsb_apply",
};

/// What marks a transaction as the apply of a source's: no capture trigger fires for it
/// (`gsb.applying`), and its commit records the source's end LSN (`$end`) as the origin's
/// progress and the source's commit time (`$ts`) in commit_ts.
/// [`ORIGIN_SETUP`] with its end LSN and commit time as parameters `$end` and `$ts`.
fn origin_setup(end: usize, ts: usize) -> String {
    ORIGIN_SETUP
        .replace("$end", &format!("${end}"))
        .replace("$ts", &format!("${ts}"))
}

const ORIGIN_SETUP: &str = "SELECT set_config('gsb.applying', 'on', true), \
     pg_replication_origin_xact_setup($end::text::pg_lsn, $ts::text::timestamptz)::text";

fn db(site: &'static str, what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
    let what = what.into();
    move |e| Error::db(site, what, e)
}

/// A batch's writes failed with `e`: applied again another way when a constraint or a
/// serialization failure may not recur that way.
fn write_failed(site: &'static str, b: &Batch, mode: Mode, e: tokio_postgres::Error) -> Failed {
    let constraint = e
        .code()
        .is_some_and(|c| c.code().starts_with("23") || c.code().starts_with("40"));
    Failed {
        retry: constraint.then(|| mode.next()).flatten(),
        error: Error::db(site, format!("applying {} changes", b.changes.len()), e),
    }
}

impl Applier {
    /// Prepares the per-batch statements on `dst`, whose session is set up under `origin`.
    pub(crate) async fn new(
        dst: &Client,
        source: &'static str,
        target: &'static str,
        source_is_primary: bool,
        origin: &str,
        max_clock_skew_us: i64,
    ) -> Result<Self, Error> {
        let origin_id: i64 = dst
            .query_one("SELECT pg_replication_origin_oid($1)::int8", &[&origin])
            .await
            .map_err(db(target, "reading the replication origin"))?
            .get(0);
        let setup = origin_setup(1, 2);
        let setup = dst
            .prepare(&format!(
                "{setup}, (extract(epoch FROM clock_timestamp()) * 1000000)::int8"
            ))
            .await
            .map_err(db(target, "preparing the apply"))?;
        let before = local_now_us();
        let now: i64 = dst
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8",
                &[],
            )
            .await
            .map_err(db(target, "reading the clock"))?
            .get(0);
        let clock = now - (before + local_now_us()) / 2;
        Ok(Self {
            source,
            target,
            source_is_primary,
            origin_id,
            skew_us: max_clock_skew_us,
            setup,
            tables: HashMap::default(),
            clock: clock.into(),
            fence: None,
            nested: false,
            combined: Default::default(),
        })
    }

    /// From now on, batches are applied inside the transaction the caller holds open on the
    /// target (each batch a savepoint), committed by the caller.
    pub(crate) fn nested(mut self) -> Self {
        self.nested = true;
        self
    }

    fn words(&self) -> &'static TxnWords {
        if self.nested {
            &NESTED_TXN
        } else {
            &OWN_TXN
        }
    }

    /// Applies `b` in one transaction on `dst`: its changes and the origin progress
    /// `b.end_lsn`, or nothing.
    pub(crate) async fn apply(&mut self, dst: &Client, b: &Batch) -> Result<Outcome, Error> {
        // The newest shape of each table in the batch; its statements.
        let mut order: Vec<String> = Vec::new();
        let mut newest: HashMap<&str, &Arc<Shape>> = HashMap::default();
        for c in &b.changes {
            if newest.insert(&c.shape.name, &c.shape).is_none() {
                order.push(c.shape.name.clone());
            }
        }
        if b.fence.is_some() && self.fence.is_none() {
            let stmt = dst
                .prepare(crate::sql::ADVANCE_CURSOR)
                .await
                .map_err(db(self.target, "preparing the cursor move"))?;
            self.fence = Some(stmt);
        }
        for name in &order {
            let shape = newest[name.as_str()];
            if self
                .tables
                .get(name)
                .is_none_or(|t| !Arc::ptr_eq(&t.shape, shape))
            {
                let t = Table::prepare(dst, self.target, shape.clone()).await?;
                self.tables.insert(name.clone(), t);
                // Its columns may have changed: the writes combined with it are derived again.
                self.combined
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            }
        }
        // Lock order: by table name, then key (no deadlock between batches of two appliers).
        order.sort();
        let mut groups: Vec<(&Table, Vec<Ch>)> = order
            .iter()
            .map(|n| (&self.tables[n.as_str()], Vec::new()))
            .collect();
        let idx: HashMap<&str, usize> = order
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        for c in &b.changes {
            let g = &mut groups[idx[c.shape.name.as_str()]];
            g.1.push(g.0.convert(c)?);
        }
        let presumable =
            !self.nested && b.fence.is_none() && b.changes.iter().any(|c| c.op != Op::Insert);
        let mut mode = match presumable {
            true => Mode::Presumed,
            false => Mode::Optimistic,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.attempt(dst, b, &groups, mode).await {
                Ok(mut out) => {
                    // How many ways it took (a presumption or an optimism that failed).
                    out["attempts"] = json!(attempts);
                    return Ok(out);
                }
                Err(Failed {
                    retry: Some(next),
                    error,
                }) => {
                    tracing::debug!(%error, ?next, "a batch's writes failed; applying it again");
                    mode = next;
                }
                Err(e) => return Err(e.error),
            }
        }
    }

    async fn attempt(
        &self,
        dst: &Client,
        b: &Batch,
        groups: &[(&Table, Vec<Ch>)],
        mode: Mode,
    ) -> Result<Outcome, Failed> {
        let res = self.attempt_inner(dst, b, groups, mode).await;
        // A presumed batch is one statement in an implicit transaction, or a pipeline that
        // ends in COMMIT (no COPY), or nothing sent: no transaction is left open.
        if res.is_err() && mode != Mode::Presumed {
            // Whatever failed, the transaction is not left open (a no-op if COMMIT already
            // rolled the aborted one back).
            let _ = dst.batch_execute(self.words().rollback).await;
        }
        res
    }

    async fn attempt_inner(
        &self,
        dst: &Client,
        b: &Batch,
        groups: &[(&Table, Vec<Ch>)],
        mode: Mode,
    ) -> Result<Outcome, Failed> {
        let t = self.target;
        let end = crate::walstream::fmt_lsn(b.end_lsn);
        let commit_ts = fmt_ts(b.commit_ts_us);
        let setup_params: [&(dyn ToSql + Sync); 2] = [&end, &commit_ts];
        // The keys whose local row is read: all of them, but optimistically not those the
        // batch inserts first and leaves existing (then absent here, or the INSERT fails and
        // the batch is applied again reading them).
        let lock_keys: Vec<Vec<Vec<Option<Text>>>> = groups
            .iter()
            .map(|(tbl, chs)| match mode {
                Mode::Presumed => vec![Vec::new(); tbl.key.len()],
                _ => tbl.key_arrays(chs, mode == Mode::Optimistic),
            })
            .collect();
        let reads = lock_keys.iter().any(|k| !k[0].is_empty());
        let mut began = false;
        let mut locked: Vec<Vec<tokio_postgres::Row>> = vec![Vec::new(); groups.len()];
        let now_us = if reads {
            // Round trip 1: begin, origin setup with the target's clock, lock and read.
            let mut lock_stmts = Vec::with_capacity(groups.len());
            for ((tbl, _), arrays) in groups.iter().zip(&lock_keys) {
                if !arrays[0].is_empty() {
                    let f = Form::new(Does::Lock, arrays[0].len(), false);
                    let stmt = tbl.form(dst, t, f.clone()).await.map_err(Failed::fatal)?;
                    lock_stmts.push((stmt, params_of(arrays, f.rows)));
                }
            }
            let begin = dst.batch_execute(self.words().begin);
            let setup = dst.query_one(&self.setup, &setup_params);
            let locks = futures_util::future::join_all(
                lock_stmts
                    .iter()
                    .map(|(stmt, params)| dst.query(stmt, params)),
            );
            let (r_begin, r_setup, r_locks) = tokio::join!(begin, setup, locks);
            let read = r_begin.and(r_setup).and_then(|setup| {
                let rows = r_locks.into_iter().collect::<Result<Vec<_>, _>>()?;
                Ok((setup, rows))
            });
            let (setup, mut rows) =
                read.map_err(|e| Failed::fatal(Error::db(t, "locking the rows of a batch", e)))?;
            rows.reverse();
            for (slot, k) in locked.iter_mut().zip(&lock_keys) {
                if !k[0].is_empty() {
                    *slot = rows.pop().unwrap_or_default();
                }
            }
            began = true;
            let now: i64 = setup.get(2);
            self.clock
                .store(now - local_now_us(), std::sync::atomic::Ordering::Relaxed);
            now
        } else {
            // Nothing to read: the target's clock as last seen, one round trip in all.
            local_now_us() + self.clock.load(std::sync::atomic::Ordering::Relaxed)
        };
        let mut plans = Vec::with_capacity(groups.len());
        for ((tbl, chs), rows) in groups.iter().zip(locked) {
            let mut locals: HashMap<Vec<Text>, Local> =
                HashMap::with_capacity_and_hasher(rows.len(), Default::default());
            let nk = tbl.key.len();
            for r in rows {
                let key: Vec<Text> = (0..nk).map(|i| r.get::<_, Text>(i)).collect();
                let origin: Option<i64> = r.get(nk);
                let ts_us: Option<i64> = r.get(nk + 1);
                let vals = (0..tbl.cols.len()).map(|i| r.get(nk + 2 + i)).collect();
                locals.insert(
                    key,
                    Local {
                        origin: origin.unwrap_or(0),
                        ts_us,
                        vals,
                    },
                );
            }
            if mode == Mode::Presumed {
                // A key the batch first inserts is presumed absent, any other last written by
                // this source.
                let mut seen: rustc_hash::FxHashSet<&[Text]> = Default::default();
                for c in chs {
                    if seen.insert(&c.key) && c.op != Op::Insert {
                        let ours = Local {
                            origin: self.origin_id,
                            ts_us: None,
                            vals: Vec::new(),
                        };
                        locals.insert(c.key.clone(), ours);
                    }
                }
            }
            plans.push(self.decide(chs, &locals, now_us));
        }
        // Round trip 2 (with the begin and setup when there was nothing to read): the conflict
        // log, the writes, commit; a large insert goes by COPY.
        let mut logs: Vec<(&Statement, Vec<Option<String>>)> = Vec::new();
        let mut planned: Vec<(&Table, Does, Arrays)> = Vec::new();
        for ((tbl, chs), plan) in groups.iter().zip(&plans) {
            for c in &plan.conflicts {
                logs.push((&tbl.conflict, self.conflict_params(tbl, &chs[c.change], c)));
            }
            let writes = if mode == Mode::InOrder {
                tbl.ordered_writes(chs, plan)
            } else {
                tbl.set_writes(chs, plan)
            };
            planned.extend(writes.into_iter().map(|(w, arrays)| (*tbl, w, arrays)));
        }
        let presumed = mode == Mode::Presumed;
        if presumed && !logs.is_empty() {
            return Err(Failed::presumption(Error::Protocol(
                "a conflict to log".into(),
            )));
        }
        // One write and nothing else (an insert, or a presumed update or delete): one
        // statement carrying the setup, committed by itself.
        let alone = match &planned[..] {
            [(_, does, arrays)] => {
                !began
                    && !self.nested
                    && logs.is_empty()
                    && b.fence.is_none()
                    && (presumed || *does == Does::Insert)
                    && arrays[0].len() < COPY_FROM
            }
            _ => false,
        };
        if presumed && planned.len() > 1 {
            return self
                .apply_combined(dst, b, groups, &plans, now_us, planned, &setup_params)
                .await;
        }
        // With nothing read, the first write carries the origin setup (a statement fewer
        // in the pipeline): it runs before the other writes and any COPY, so every write to
        // a captured table has `gsb.applying` set (the conflict log rows sent before it are
        // not captured), and before COMMIT.
        let first_sets_up = !began
            && planned
                .iter()
                .any(|(_, does, arrays)| *does != Does::Insert || arrays[0].len() < COPY_FROM);
        let mut writes: Vec<Writing> = Vec::with_capacity(planned.len());
        let mut copies: Vec<(&Statement, bytes::Bytes)> = Vec::new();
        for (tbl, does, arrays) in planned {
            let n = arrays[0].len();
            if does == Does::Insert && n >= COPY_FROM {
                if presumed {
                    // A COPY ends the pipeline early when it fails: no presumption with it.
                    return Err(Failed::presumption(Error::Protocol("a COPY".into())));
                }
                copies.push(tbl.copy_data(&arrays));
                continue;
            }
            // Presumed: an update or delete checks that this source last wrote every row.
            let checked = presumed && does != Does::Insert;
            let sets_up = first_sets_up && writes.is_empty();
            let f = Form::new(does, n, alone || checked || sets_up);
            writes.push(Writing {
                stmt: tbl.form(dst, t, f.clone()).await.map_err(Failed::fatal)?,
                form: f,
                expected: n as i64,
                arrays,
            });
        }
        if let (true, [w]) = (alone, &writes[..]) {
            let params = w.params(&setup_params, &self.origin_id);
            return match dst.execute(&w.stmt, &params).await {
                Ok(_) => Ok(self.outcome(b, groups, &plans, now_us)),
                Err(e) if presumed => Err(Failed::presumption(Error::db(
                    t,
                    "applying presumed rows",
                    e,
                ))),
                Err(e) => Err(write_failed(t, b, mode, e)),
            };
        }
        let begin = async {
            if began {
                Ok(())
            } else if first_sets_up {
                dst.batch_execute(self.words().begin).await
            } else {
                let (b, s) = tokio::join!(
                    dst.batch_execute(self.words().begin),
                    dst.query_one(&self.setup, &setup_params)
                );
                b.and(s).map(drop)
            }
        };
        let logs = futures_util::future::join_all(logs.iter().map(|(stmt, p)| {
            let params: Vec<&(dyn ToSql + Sync)> =
                p.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            async move { dst.execute(*stmt, &params).await }
        }));
        let ws = futures_util::future::join_all(writes.iter().map(|w| {
            let params = w.params(&setup_params, &self.origin_id);
            async move { dst.execute(&w.stmt, &params).await }
        }));
        // The cursor move (trigger capture) after the writes, in the same round trip.
        let fence = async {
            match (&b.fence, &self.fence) {
                (Some(f), Some(stmt)) => {
                    let params = crate::changelog::advance_params(&f.direction, &f.from, &f.to);
                    dst.execute(stmt, &params).await.map(drop)
                }
                _ => Ok(()),
            }
        };
        // COPYs one after the other (the connection serves one at a time), then COMMIT: sent
        // only after the last COPY, so nothing can follow the transaction's end.
        let tail = async {
            for (stmt, data) in &copies {
                use futures_util::SinkExt;
                let sink = dst.copy_in::<_, bytes::Bytes>(*stmt).await?;
                futures_util::pin_mut!(sink);
                sink.send(data.clone()).await?;
                sink.finish().await?;
            }
            dst.batch_execute(self.words().commit).await
        };
        let (r_begin, r_logs, r_ws, r_fence, r_tail) = tokio::join!(begin, logs, ws, fence, tail);
        r_begin.map_err(|e| Failed::fatal(Error::db(t, "starting a batch", e)))?;
        if let Some(e) = r_logs.into_iter().find_map(Result::err) {
            return Err(Failed::fatal(Error::db(t, "logging a conflict", e)));
        }
        // A failed write aborts the transaction, failing what follows it: the write's error
        // is the one that says why (and whether another way of applying may succeed).
        let write_err = r_ws.into_iter().find_map(Result::err);
        if let (None, Err(e)) = (&write_err, r_fence) {
            return Err(Failed::fatal(Error::db(t, "moving the cursor", e)));
        }
        let failed = write_err.or(r_tail.err());
        if let Some(e) = failed {
            return Err(match presumed {
                true => Failed::presumption(Error::db(t, "applying presumed rows", e)),
                false => write_failed(t, b, mode, e),
            });
        }
        Ok(self.outcome(b, groups, &plans, now_us))
    }

    /// The writes of a presumed batch (each key in one of them) as one statement committed by
    /// itself (see [`combined_sql`]): one sync point. It fails, nothing written, where a
    /// presumption does not hold.
    #[allow(clippy::too_many_arguments)]
    async fn apply_combined(
        &self,
        dst: &Client,
        b: &Batch,
        groups: &[(&Table, Vec<Ch>)],
        plans: &[Plan],
        now_us: i64,
        planned: Vec<(&Table, Does, Arrays)>,
        setup: &[&(dyn ToSql + Sync); 2],
    ) -> Result<Outcome, Failed> {
        let t = self.target;
        if planned
            .iter()
            .any(|(_, does, arrays)| *does == Does::Insert && arrays[0].len() >= COPY_FROM)
        {
            return Err(Failed::presumption(Error::Protocol("a COPY".into())));
        }
        let key: Vec<(String, Form)> = planned
            .iter()
            .map(|(tbl, does, arrays)| {
                let f = Form::new(does.clone(), arrays[0].len(), false);
                (tbl.shape.name.clone(), f)
            })
            .collect();
        let stmt = self
            .combined_stmt(dst, &planned, &key)
            .await
            .map_err(Failed::fatal)?;
        // The checked writes' row counts, kept as their parameters' storage.
        let expected: Vec<i64> = planned
            .iter()
            .filter(|(_, does, _)| *does != Does::Insert)
            .map(|(_, _, arrays)| arrays[0].len() as i64)
            .collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for ((_, _, arrays), (_, f)) in planned.iter().zip(&key) {
            params.extend(params_of(arrays, f.rows));
        }
        params.extend(setup);
        if !expected.is_empty() {
            params.push(&self.origin_id);
            params.extend(expected.iter().map(|e| e as &(dyn ToSql + Sync)));
        }
        match dst.execute(&stmt, &params).await {
            Ok(_) => Ok(self.outcome(b, groups, plans, now_us)),
            Err(e) => Err(Failed::presumption(Error::db(
                t,
                "applying presumed rows",
                e,
            ))),
        }
    }

    /// The statement of [`Applier::apply_combined`] for writes `key` (`planned`'s), prepared
    /// on first use.
    async fn combined_stmt(
        &self,
        dst: &Client,
        planned: &[(&Table, Does, Arrays)],
        key: &[(String, Form)],
    ) -> Result<Statement, Error> {
        let cache = || self.combined.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache().get(key) {
            return Ok(s.clone());
        }
        let mut from = 1;
        let mut parts = Vec::with_capacity(planned.len());
        for ((tbl, does, _), (_, f)) in planned.iter().zip(key) {
            let (plain, n) = tbl.plain_sql(does, f.rows, from);
            from += n;
            parts.push((plain, n, *does != Does::Insert));
        }
        let stmt = dst
            .prepare(&combined_sql(&parts))
            .await
            .map_err(db(self.target, "preparing the apply of a presumed batch"))?;
        let mut combined = cache();
        if combined.len() >= FORMS_MAX {
            combined.clear();
        }
        combined.insert(key.to_vec(), stmt.clone());
        Ok(stmt)
    }

    /// Decides every change of one table against the locked local rows.
    fn decide(&self, chs: &[Ch], locals: &HashMap<Vec<Text>, Local>, now_us: i64) -> Plan {
        #[derive(Clone, Copy, PartialEq)]
        enum St {
            Absent,
            /// Last written by this source (before or in the batch).
            Ours,
            /// Written here or by another origin; still the local version before the batch.
            Theirs,
        }
        let mut plan = Plan::default();
        let mut state: HashMap<&[Text], (usize, St)> = HashMap::default();
        let limit = now_us.saturating_add(self.skew_us);
        for (i, c) in chs.iter().enumerate() {
            let (slot, st) = match state.get(c.key.as_slice()) {
                Some(s) => *s,
                None => {
                    let local = locals.get(&c.key);
                    let st = match local {
                        None => St::Absent,
                        Some(l) if l.origin == self.origin_id => St::Ours,
                        Some(_) => St::Theirs,
                    };
                    plan.keys.push((c.key.clone(), local.is_some()));
                    plan.per_key.push(Vec::new());
                    let s = (plan.keys.len() - 1, st);
                    state.insert(&c.key, s);
                    s
                }
            };
            if c.ts_us > limit {
                plan.conflicts.push(Conflict {
                    change: i,
                    reason: "clock_skew",
                    winner: (None, None, Side::None),
                    loser: (Some(self.source.into()), Some(c.ts_us), Side::Remote),
                });
                plan.skewed += 1;
                continue;
            }
            let remote = (Some(self.source.to_owned()), Some(c.ts_us));
            let next = match (st, c.op) {
                (St::Absent, Op::Insert) => Some(St::Ours),
                (St::Absent, Op::Update) => {
                    // The row is gone here: the delete beats this concurrent update.
                    plan.conflicts.push(Conflict {
                        change: i,
                        reason: "concurrent_write",
                        winner: (Some(self.target.into()), None, Side::None),
                        loser: (remote.0, remote.1, Side::Remote),
                    });
                    None
                }
                (St::Absent, Op::Delete) => None, // already gone
                (St::Ours, Op::Delete) => Some(St::Absent),
                (St::Ours, _) => Some(St::Ours),
                (St::Theirs, op) => {
                    let local = &locals[&c.key];
                    let label = if local.origin == 0 {
                        self.target.to_owned()
                    } else {
                        format!("origin {}", local.origin)
                    };
                    let mine = (Some(label), local.ts_us);
                    if op == Op::Delete {
                        plan.conflicts.push(Conflict {
                            change: i,
                            reason: "concurrent_write",
                            winner: (remote.0, remote.1, Side::None),
                            loser: (mine.0, mine.1, Side::Local),
                        });
                        Some(St::Absent)
                    } else if c.cells.iter().zip(&local.vals).all(|(n, o)| match n {
                        Cell::Unset => true,
                        Cell::Set(v) => v == o,
                    }) {
                        // The same values: nothing to decide, nothing to write.
                        plan.applied += 1;
                        None
                    } else {
                        // Two sites' rows from before replication: the primary's.
                        let win = if c.initial {
                            self.source_is_primary
                        } else {
                            local.ts_us.is_none_or(|l| {
                                c.ts_us > l || (c.ts_us == l && self.source_is_primary)
                            })
                        };
                        let (w, l) = if win {
                            (
                                (remote.0, remote.1, Side::Merged),
                                (mine.0, mine.1, Side::Local),
                            )
                        } else {
                            (
                                (mine.0, mine.1, Side::Local),
                                (remote.0, remote.1, Side::Merged),
                            )
                        };
                        plan.conflicts.push(Conflict {
                            change: i,
                            reason: "concurrent_write",
                            winner: w,
                            loser: l,
                        });
                        win.then_some(St::Ours)
                    }
                }
            };
            if let Some(n) = next {
                plan.accepted.push(i);
                plan.per_key[slot].push(i);
                plan.applied += 1;
                state.insert(&c.key, (slot, n));
            }
        }
        plan
    }

    /// The conflict statement's parameters: table, key, the change's row (JSON), reason,
    /// winner (origin, stamp, side), loser (origin, stamp, side).
    fn conflict_params(&self, tbl: &Table, c: &Ch, k: &Conflict) -> Vec<Option<String>> {
        let key: Map<String, Json> = tbl
            .key
            .iter()
            .zip(&c.key)
            .map(|(&i, v)| {
                let col = &tbl.cols[i];
                (col.name.clone(), json_value(col.src_oid, v.as_str()))
            })
            .collect();
        let row: Option<String> = (c.op != Op::Delete).then(|| {
            let m: Map<String, Json> = tbl
                .cols
                .iter()
                .zip(&c.cells)
                .filter_map(|(col, cell)| match cell {
                    Cell::Unset => None,
                    Cell::Set(None) => Some((col.name.clone(), Json::Null)),
                    Cell::Set(Some(v)) => {
                        Some((col.name.clone(), json_value(col.src_oid, v.as_str())))
                    }
                })
                .collect();
            Json::Object(m).to_string()
        });
        vec![
            Some(tbl.shape.name.clone()),
            Some(Json::Object(key).to_string()),
            row,
            Some(k.reason.to_owned()),
            k.winner.0.clone(),
            k.winner.1.map(fmt_ts),
            k.winner.2.as_str().map(str::to_owned),
            k.loser.0.clone(),
            k.loser.1.map(fmt_ts),
            k.loser.2.as_str().map(str::to_owned),
        ]
    }

    fn outcome(
        &self,
        b: &Batch,
        groups: &[(&Table, Vec<Ch>)],
        plans: &[Plan],
        now_us: i64,
    ) -> Outcome {
        let mut applied = Map::new();
        let mut conflicts = Map::new();
        let mut skewed = 0;
        for ((tbl, _), p) in groups.iter().zip(plans) {
            if p.applied > 0 {
                applied.insert(tbl.shape.name.clone(), json!(p.applied));
            }
            let n = p.conflicts.len() as u64 - p.skewed;
            if n > 0 {
                conflicts.insert(tbl.shape.name.clone(), json!(n));
            }
            skewed += p.skewed;
        }
        let oldest = b.changes.iter().map(|c| c.ts_us).min().unwrap_or(now_us);
        // The heartbeat: the newest `at` of the source's heartbeat row in the batch.
        let hb = b
            .changes
            .iter()
            .rev()
            .filter(|c| c.shape.name == HEARTBEAT && c.op != Op::Delete)
            .find_map(|c| {
                c.shape
                    .columns
                    .iter()
                    .zip(&c.vals)
                    .find_map(|(col, v)| match v {
                        Value::Text(s) if col.name == "at" => parse_ts_us(s.as_str()),
                        _ => None,
                    })
            })
            .map(|at| (now_us - at) as f64 / 1e6);
        json!({
            "applied": applied,
            "conflicts": conflicts,
            "skew_rejected": skewed,
            "max_lag": (now_us - oldest) as f64 / 1e6,
            "heartbeat_lag": hb,
        })
    }
}

/// A failed attempt, and the way of applying the batch that may succeed where it failed.
struct Failed {
    error: Error,
    retry: Option<Mode>,
}

impl Failed {
    fn fatal(error: Error) -> Self {
        Self { error, retry: None }
    }

    /// The presumption did not hold (or the batch has a conflict to log or a COPY): apply it
    /// again reading its rows.
    fn presumption(error: Error) -> Self {
        Self {
            error,
            retry: Some(Mode::Optimistic),
        }
    }
}

/// How a batch is applied; on a constraint failure the next one is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A batch with updates or deletes: nothing read, every key the batch first inserts
    /// presumed absent and every other last written by this source, which each update and
    /// delete statement checks (failing the batch's one transaction otherwise).
    Presumed,
    /// Keys the batch inserts first are presumed absent (not read); set-based writes.
    Optimistic,
    /// Every key read and locked; set-based writes.
    Locked,
    /// Every key read and locked; one statement per change in commit order.
    InOrder,
}

impl Mode {
    fn next(self) -> Option<Mode> {
        match self {
            Mode::Presumed => Some(Mode::Optimistic),
            Mode::Optimistic => Some(Mode::Locked),
            Mode::Locked => Some(Mode::InOrder),
            Mode::InOrder => None,
        }
    }
}

/// Inserts of at least this many rows of one table go by COPY (fewer: one INSERT, which
/// rides in the same round trip as the rest).
const COPY_FROM: usize = 256;

fn local_now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Rows (one array per column) in COPY's text format.
fn copy_text(cols: &[Vec<Option<Text>>]) -> bytes::Bytes {
    let rows = cols.first().map_or(0, Vec::len);
    let size: usize = cols
        .iter()
        .flatten()
        .map(|v| v.as_ref().map_or(2, |t| t.as_bytes().len()) + 1)
        .sum();
    let mut out = Vec::with_capacity(size + size / 16);
    for r in 0..rows {
        for (j, col) in cols.iter().enumerate() {
            if j > 0 {
                out.push(b'\t');
            }
            match &col[r] {
                None => out.extend_from_slice(b"\\N"),
                Some(v) => copy_escape(&mut out, v.as_bytes()),
            }
        }
        out.push(b'\n');
    }
    out.into()
}

/// Appends `v` with COPY text's escapes (backslash, tab, newline, carriage return); the runs
/// between them are copied whole.
fn copy_escape(out: &mut Vec<u8>, mut v: &[u8]) {
    loop {
        let next = v
            .iter()
            .position(|c| matches!(c, b'\\' | b'\t' | b'\n' | b'\r'));
        let Some(i) = next else {
            out.extend_from_slice(v);
            return;
        };
        out.extend_from_slice(&v[..i]);
        out.extend_from_slice(match v[i] {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            _ => b"\\r",
        });
        v = &v[i + 1..];
    }
}

impl Table {
    async fn prepare(dst: &Client, site: &'static str, shape: Arc<Shape>) -> Result<Self, Error> {
        let name = &shape.name;
        let q = qident(name);
        let pk: Option<Vec<String>> = dst
            .query_opt("SELECT pk_cols FROM gsb.tables WHERE tbl = $1", &[name])
            .await
            .map_err(db(site, format!("reading the key of {name}")))?
            .and_then(|r| r.get(0));
        let pk = pk.ok_or_else(|| Error::Protocol(format!(
            "{name}: changes arrived for a table that is not set up for replication on the {site} site (gsb.tables has no key for it)"
        )))?;
        let target: Vec<(String, String)> = dst
            .query(
                "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
                 AND attgenerated = '' ORDER BY attnum",
                &[&q],
            )
            .await
            .map_err(db(site, format!("reading the columns of {name}")))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // The target's columns the source also has; a source column the target lacks is not
        // written (as a column added on one site before the other).
        let cols: Vec<Col> = target
            .into_iter()
            .filter_map(|(n, ty)| {
                let src_idx = shape.columns.iter().position(|c| c.name == n)?;
                Some(Col {
                    key: pk.contains(&n),
                    src_oid: shape.columns[src_idx].type_oid,
                    src_idx,
                    name: n,
                    ty,
                })
            })
            .collect();
        let key: Vec<usize> = pk
            .iter()
            .map(|k| {
                cols.iter().position(|c| &c.name == k).ok_or_else(|| {
                    Error::Protocol(format!(
                        "{name}: key column {k} is missing on the source or the {site} site"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        if key.is_empty() {
            return Err(Error::Protocol(format!(
                "{name}: no primary key recorded in gsb.tables on the {site} site"
            )));
        }
        let all: Vec<usize> = (0..cols.len()).collect();
        let keys_t = keys_of_t(&cols, &key);
        let copy = format!(
            "COPY {q} ({}) FROM STDIN",
            all.iter()
                .map(|&i| ident(&cols[i].name))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let types: Option<Vec<_>> = cols
            .iter()
            .map(|c| crate::copybin::BinType::of(&c.ty))
            .collect();
        let copy_bin = match types {
            Some(types) => Some((
                dst.prepare(&format!("{copy} (FORMAT binary)"))
                    .await
                    .map_err(db(site, format!("preparing the apply of {name}")))?,
                types,
            )),
            None => None,
        };
        let conflict = format!(
            "WITH k AS (SELECT jsonb_populate_record(NULL::{q}, $2::text::jsonb) AS r), \
                  l AS (SELECT t FROM {q} t, k WHERE ({keys_t}) = ({kr})), \
                  v AS (SELECT (SELECT l.t FROM l) AS lt, \
                               jsonb_populate_record((SELECT l.t FROM l), coalesce($3::text::jsonb, '{{}}')) AS m, \
                               jsonb_populate_record(NULL::{q}, coalesce($3::text::jsonb, $2::text::jsonb)) AS rm) \
             INSERT INTO gsb.conflicts (tbl, pk, reason, winner_origin, winner_ts, winner_row, loser_origin, loser_ts, loser_row) \
             SELECT $1::text, jsonb_build_object({pkj}), $4::text, \
                    $5::text, $6::text::timestamptz, \
                    CASE $7::text WHEN 'local' THEN to_jsonb(v.lt) WHEN 'merged' THEN to_jsonb(v.m) WHEN 'remote' THEN to_jsonb(v.rm) END, \
                    $8::text, $9::text::timestamptz, \
                    CASE $10::text WHEN 'local' THEN to_jsonb(v.lt) WHEN 'merged' THEN to_jsonb(v.m) WHEN 'remote' THEN to_jsonb(v.rm) END \
             FROM k, v",
            kr = key.iter().map(|&i| format!("(k.r).{}", ident(&cols[i].name))).collect::<Vec<_>>().join(", "),
            pkj = key
                .iter()
                .map(|&i| {
                    let n = &cols[i].name;
                    format!("'{}', (k.r).{}", n.replace('\'', "''"), ident(n))
                })
                .collect::<Vec<_>>()
                .join(", "),
        );
        let prep = |sql: String| async move {
            dst.prepare(&sql)
                .await
                .map_err(db(site, format!("preparing the apply of {name}")))
        };
        Ok(Self {
            copy: prep(copy).await?,
            copy_bin,
            conflict: prep(conflict).await?,
            forms: Default::default(),
            shape,
            cols,
            key,
        })
    }

    /// The COPY of an insert's rows: in the binary format when every value is in a form
    /// `copybin` reads, else in the text format.
    fn copy_data(&self, arrays: &[Vec<Option<Text>>]) -> (&Statement, bytes::Bytes) {
        if let Some((stmt, types)) = &self.copy_bin {
            if let Some(data) = crate::copybin::encode(arrays, types) {
                return (stmt, data);
            }
        }
        (&self.copy, copy_text(arrays))
    }

    /// The change's values per target column, by column name (its shape may be older).
    fn convert(&self, c: &Change) -> Result<Ch, Error> {
        // A change of an older shape of the table (before a Relation message) by column name.
        let same = Arc::ptr_eq(&c.shape, &self.shape);
        let cells: Vec<Cell> = self
            .cols
            .iter()
            .map(|col| {
                let i = if same {
                    Some(col.src_idx)
                } else {
                    c.shape.columns.iter().position(|s| s.name == col.name)
                };
                match i.map(|i| &c.vals[i]) {
                    Some(Value::Text(s)) => Cell::Set(Some(s.clone())),
                    Some(Value::Null) => Cell::Set(None),
                    Some(Value::UnchangedToast) | None => Cell::Unset,
                }
            })
            .collect();
        let key = self
            .key
            .iter()
            .map(|&i| match &cells[i] {
                Cell::Set(Some(s)) => Ok(s.clone()),
                _ => Err(Error::Protocol(format!(
                    "{}: a change without its key column {} (the table needs a primary key as replica identity)",
                    self.shape.name, self.cols[i].name
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Ch {
            op: c.op,
            cells,
            key,
            ts_us: c.ts_us,
            initial: c.initial,
        })
    }

    /// One text array per key column: the keys whose local rows are read (all that the batch
    /// touches, or with `optimistic` not those it inserts first and leaves existing).
    fn key_arrays(&self, chs: &[Ch], optimistic: bool) -> Vec<Vec<Option<Text>>> {
        let mut first_last: HashMap<&[Text], (Op, Op)> = HashMap::default();
        let mut order: Vec<&[Text]> = Vec::new();
        for c in chs {
            first_last
                .entry(&c.key)
                .and_modify(|e| e.1 = c.op)
                .or_insert_with(|| {
                    order.push(&c.key);
                    (c.op, c.op)
                });
        }
        let mut arrays = vec![Vec::new(); self.key.len()];
        for k in order {
            let (first, last) = first_last[k];
            if optimistic && first == Op::Insert && last != Op::Delete {
                continue;
            }
            for (a, v) in arrays.iter_mut().zip(k) {
                a.push(Some(v.clone()));
            }
        }
        arrays
    }

    /// Set-based: per key its net outcome; one DELETE, one UPDATE per column set, one INSERT.
    fn set_writes(&self, chs: &[Ch], plan: &Plan) -> Vec<(Does, Arrays)> {
        let mut out = Vec::new();
        let n = self.cols.len();
        let mut deletes = vec![Vec::new(); self.key.len()];
        let mut inserts = vec![Vec::new(); n];
        let mut updates: HashMap<Vec<bool>, Vec<Vec<Option<Text>>>> = HashMap::default();
        for ((key, present), accepted) in plan.keys.iter().zip(&plan.per_key) {
            if accepted.is_empty() {
                continue;
            }
            let mut exists = *present;
            let mut reset = false;
            let mut row: Vec<Cell> = vec![Cell::Unset; n];
            for &i in accepted {
                let c = &chs[i];
                match c.op {
                    Op::Delete => {
                        exists = false;
                        reset = true;
                        row.fill(Cell::Unset);
                    }
                    Op::Insert | Op::Update => {
                        exists = true;
                        for (r, v) in row.iter_mut().zip(&c.cells) {
                            if let Cell::Set(_) = v {
                                *r = v.clone();
                            }
                        }
                    }
                }
            }
            let val = |c: &Cell| match c {
                Cell::Set(v) => v.clone(),
                Cell::Unset => None,
            };
            match (*present, exists) {
                (false, false) => {}
                (true, false) => {
                    for (a, v) in deletes.iter_mut().zip(key) {
                        a.push(Some(v.clone()));
                    }
                }
                (false, true) => {
                    // The row's cells are moved, not shared once more.
                    for (a, c) in inserts.iter_mut().zip(row) {
                        a.push(match c {
                            Cell::Set(v) => v,
                            Cell::Unset => None,
                        });
                    }
                }
                (true, true) => {
                    // Deleted and inserted again: every column; else the columns sent.
                    let mask: Vec<bool> = self
                        .cols
                        .iter()
                        .zip(&row)
                        .map(|(col, c)| !col.key && (reset || matches!(c, Cell::Set(_))))
                        .collect();
                    if !mask.contains(&true) {
                        continue;
                    }
                    let arrays = updates
                        .entry(mask.clone())
                        .or_insert_with(|| vec![Vec::new(); n]);
                    for (i, (a, c)) in arrays.iter_mut().zip(&row).enumerate() {
                        if mask[i] || self.cols[i].key {
                            a.push(val(c));
                        }
                    }
                }
            }
        }
        if !deletes[0].is_empty() {
            out.push((Does::Delete, deletes));
        }
        for (mask, arrays) in updates {
            let arrays = arrays
                .into_iter()
                .enumerate()
                .filter(|(i, _)| mask[*i] || self.cols[*i].key)
                .map(|(_, a)| a)
                .collect();
            out.push((Does::Update(mask), arrays));
        }
        if !inserts[0].is_empty() {
            out.push((Does::Insert, inserts));
        }
        out
    }

    /// In commit order: one statement per accepted change.
    fn ordered_writes(&self, chs: &[Ch], plan: &Plan) -> Vec<(Does, Arrays)> {
        let mut out = Vec::new();
        let mut exists: HashMap<&[Text], bool> =
            plan.keys.iter().map(|(k, p)| (k.as_slice(), *p)).collect();
        let one = |v: &Cell| {
            vec![match v {
                Cell::Set(v) => v.clone(),
                Cell::Unset => None,
            }]
        };
        for &i in &plan.accepted {
            let c = &chs[i];
            let e = exists.get(c.key.as_slice()).copied().unwrap_or(false);
            let keys = || c.key.iter().map(|k| vec![Some(k.clone())]).collect();
            match c.op {
                Op::Delete => {
                    out.push((Does::Delete, keys()));
                    exists.insert(&c.key, false);
                }
                Op::Insert if !e => {
                    out.push((Does::Insert, c.cells.iter().map(one).collect()));
                    exists.insert(&c.key, true);
                }
                Op::Insert | Op::Update => {
                    let mask: Vec<bool> = self
                        .cols
                        .iter()
                        .zip(&c.cells)
                        .map(|(col, v)| !col.key && matches!(v, Cell::Set(_)))
                        .collect();
                    if !mask.contains(&true) {
                        continue;
                    }
                    let arrays = c
                        .cells
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| mask[*j] || self.cols[*j].key)
                        .map(|(_, v)| one(v))
                        .collect();
                    out.push((Does::Update(mask), arrays));
                }
            }
        }
        out
    }

    /// The SQL of form `f`.
    fn form_sql(&self, f: &Form) -> String {
        let (plain, n) = self.plain_sql(&f.does, f.rows, 1);
        match (f.alone, &f.does) {
            (false, _) => plain,
            // The setup in a CTE the insert's one-time filter reads: run once, before any row.
            (true, Does::Insert) => {
                let setup = origin_setup(n + 1, n + 2);
                format!(
                    "WITH gsb_setup AS MATERIALIZED ({setup}) {plain} WHERE (SELECT true FROM gsb_setup)"
                )
            }
            (true, _) => presumed_sql(&plain, n),
        }
    }

    /// The plain statement that does `does` with `rows_of` rows (see [`Form`]), its
    /// parameters numbered from `$from`, and their number. An `INSERT` ends in its rows'
    /// subquery (a `WHERE` may follow), an `UPDATE` or `DELETE` in its `WHERE` clause (an
    /// `AND` may follow).
    fn plain_sql(&self, does: &Does, rows_of: Option<usize>, from: usize) -> (String, usize) {
        let q = qident(&self.shape.name);
        let keys_t = keys_of_t(&self.cols, &self.key);
        let rows = rows_of.unwrap_or(1);
        match does {
            // The last writer in the select list, not a LATERAL join: a row another
            // transaction changes while this waits for its lock is re-read (EvalPlanQual) and
            // the list is computed again from the new version, where a joined function's row
            // would be the old version's (its writer and time with the new values: a wrong
            // decision).
            Does::Lock => {
                let text = |i: &usize| format!("t.{}::text", ident(&self.cols[*i].name));
                let sql = format!(
                    "SELECT {ktext}, (pg_xact_commit_timestamp_origin(t.xmin)).roident::int8, \
                            (extract(epoch FROM (pg_xact_commit_timestamp_origin(t.xmin)).\"timestamp\") * 1000000)::int8, {vals} \
                     FROM {q} t \
                     WHERE ({keys_t}) IN ({src}) ORDER BY {keys_t} FOR UPDATE OF t",
                    ktext = self.key.iter().map(text).collect::<Vec<_>>().join(", "),
                    vals = (0..self.cols.len()).map(|i| text(&i)).collect::<Vec<_>>().join(", "),
                    src = select_rows(&self.cols, &self.key, from, rows_of),
                );
                (sql, self.key.len() * rows)
            }
            Does::Insert => {
                let names = self
                    .cols
                    .iter()
                    .map(|c| ident(&c.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                let all: Vec<usize> = (0..self.cols.len()).collect();
                let rows_sql = select_rows(&self.cols, &all, from, rows_of);
                (
                    format!("INSERT INTO {q} ({names}) SELECT * FROM ({rows_sql}) AS v"),
                    all.len() * rows,
                )
            }
            Does::Delete => (
                format!(
                    "DELETE FROM {q} t WHERE ({keys_t}) IN ({})",
                    select_rows(&self.cols, &self.key, from, rows_of)
                ),
                self.key.len() * rows,
            ),
            Does::Update(mask) => {
                let which: Vec<usize> = (0..self.cols.len())
                    .filter(|&i| mask[i] || self.cols[i].key)
                    .collect();
                let pos = |i: usize| which.iter().position(|&w| w == i).unwrap_or_default();
                // Column `i`'s new value, cast to its type.
                let value = |i: usize| format!("u.c{}::{}", pos(i), self.cols[i].ty);
                let set = which
                    .iter()
                    .filter(|&&i| mask[i])
                    .map(|&i| format!("{} = {}", ident(&self.cols[i].name), value(i)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let matches = self
                    .key
                    .iter()
                    .map(|&i| format!("t.{} = {}", ident(&self.cols[i].name), value(i)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let sql = format!(
                    "UPDATE {q} t SET {set} FROM {} WHERE {matches}",
                    rows_from(which.len(), from, rows_of)
                );
                (sql, which.len() * rows)
            }
        }
    }

    /// The statement of form `f`, prepared on first use.
    async fn form(&self, dst: &Client, site: &'static str, f: Form) -> Result<Statement, Error> {
        let cache = || self.forms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache().get(&f) {
            return Ok(s.clone());
        }
        let sql = self.form_sql(&f);
        let stmt = dst.prepare(&sql).await.map_err(db(
            site,
            format!("preparing the apply of {}", self.shape.name),
        ))?;
        let mut forms = cache();
        // Bounded: column sets times row counts can be many; the server's prepared
        // statements (and their plans) are closed as their last handle is dropped.
        if forms.len() >= FORMS_MAX {
            forms.clear();
        }
        forms.insert(f, stmt.clone());
        Ok(stmt)
    }
}

/// `t.k0, t.k1, ...`: the key columns of table alias `t`.
fn keys_of_t(cols: &[Col], key: &[usize]) -> String {
    key.iter()
        .map(|&i| format!("t.{}", ident(&cols[i].name)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `plain`, an `UPDATE` or `DELETE` of table alias `t` ending in its `WHERE` clause with `n`
/// parameters, as one statement committed by itself: with the origin setup (`$n+1`, `$n+2`:
/// end LSN, commit time), writing only rows last written by origin `$n+3`, and failing
/// (nothing written) unless it wrote `$n+4` rows.
fn presumed_sql(plain: &str, n: usize) -> String {
    let setup = origin_setup(n + 1, n + 2);
    let (origin, expected) = (n + 3, n + 4);
    format!(
        "WITH gsb_setup AS MATERIALIZED ({setup}), \
              w AS ({plain} \
                    AND (pg_xact_commit_timestamp_origin(t.xmin)).roident::int8 = ${origin}::int8 \
                    AND (SELECT true FROM gsb_setup) RETURNING 1) \
         SELECT CASE WHEN c.n = ${expected}::int8 THEN c.n \
                ELSE ('gsb: ' || c.n || ' of ' || ${expected}::int8 || ' rows were last written by this source')::int8 END \
         FROM (SELECT count(*) AS n FROM w) c"
    )
}

/// The writes `parts` (plain SQL as [`Table::plain_sql`] gives it, parameters numbered on
/// from the previous part's, their number, checked or not) as one statement committed by
/// itself, each a data-modifying CTE reading the origin setup (`$n+1`, `$n+2`: end LSN and
/// commit time, after the parts' `n` parameters). A checked part (an `UPDATE` or `DELETE`)
/// writes only rows last written by origin `$n+3`, and the statement fails (nothing written)
/// unless each checked part wrote its count (`$n+4`, ... in order). The parts must touch
/// disjoint keys: they run on one snapshot, in no set order.
fn combined_sql(parts: &[(String, usize, bool)]) -> String {
    let n: usize = parts.iter().map(|p| p.1).sum();
    let setup = origin_setup(n + 1, n + 2);
    let origin = n + 3;
    let mut ctes = vec![format!("gsb_setup AS MATERIALIZED ({setup})")];
    let (mut checks, mut counts) = (Vec::new(), Vec::new());
    for (i, (plain, _, checked)) in parts.iter().enumerate() {
        let cond = if *checked {
            checks.push(format!(
                "(SELECT count(*) FROM w{i}) = ${}::int8",
                origin + 1 + checks.len()
            ));
            counts.push(format!("(SELECT count(*) FROM w{i})"));
            format!(
                " AND (pg_xact_commit_timestamp_origin(t.xmin)).roident::int8 = ${origin}::int8 \
                  AND (SELECT true FROM gsb_setup)"
            )
        } else {
            " WHERE (SELECT true FROM gsb_setup)".to_owned()
        };
        ctes.push(format!("w{i} AS ({plain}{cond} RETURNING 1)"));
    }
    let ctes = ctes.join(", ");
    if checks.is_empty() {
        return format!("WITH {ctes} SELECT 0::int8");
    }
    // The message holds what was written, so the server cannot fold the failing cast into a
    // constant when it plans the statement with its parameters (a custom plan).
    format!(
        "WITH {ctes} SELECT CASE WHEN {} THEN 0::int8 \
         ELSE ('gsb: presumed writes wrote ' || concat_ws(', ', {}) \
               || ' rows: not every row they name was last written by this source')::int8 END",
        checks.join(" AND "),
        counts.join(", ")
    )
}

/// `SELECT u.c0::T0, ... FROM <rows>` for columns `which`, the rows as [`rows_from`] passes
/// them from parameter `$from` on.
fn select_rows(cols: &[Col], which: &[usize], from: usize, rows: Option<usize>) -> String {
    let casts = which
        .iter()
        .enumerate()
        .map(|(j, &i)| format!("u.c{j}::{}", cols[i].ty))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {casts} FROM {}", rows_from(which.len(), from, rows))
}

/// A `FROM` item of `width` text columns `u.c0, ...` from parameter `$from` on: one text
/// array per column through `unnest` (`rows` None), or a `VALUES` list of `rows` rows of
/// scalars, row by row.
fn rows_from(width: usize, from: usize, rows: Option<usize>) -> String {
    let names = (0..width)
        .map(|j| format!("c{j}"))
        .collect::<Vec<_>>()
        .join(", ");
    let Some(n) = rows else {
        let params = (0..width)
            .map(|j| format!("${}::text[]", from + j))
            .collect::<Vec<_>>()
            .join(", ");
        return format!("unnest({params}) AS u({names})");
    };
    let list = (0..n)
        .map(|r| {
            let row = (0..width)
                .map(|j| format!("${}::text", from + r * width + j))
                .collect::<Vec<_>>()
                .join(", ");
            format!("({row})")
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("(VALUES {list}) AS u({names})")
}

/// JSON and JSONB values are embedded as JSON; every other value as its text form.
fn json_value(type_oid: u32, v: &str) -> Json {
    const JSON: u32 = 114;
    const JSONB: u32 = 3802;
    if type_oid == JSON || type_oid == JSONB {
        if let Ok(j) = serde_json::from_str(v) {
            return j;
        }
    }
    Json::String(v.to_owned())
}

/// RFC 3339 in UTC with microseconds.
fn fmt_ts(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A `timestamptz` in its ISO text form (`2026-12-01 23:10:00.123456+00`) as Unix microseconds.
fn parse_ts_us(s: &str) -> Option<i64> {
    let fixed = if s.len() > 3 && (s.ends_with("+00") || s.ends_with("-00")) {
        format!("{s}:00")
    } else {
        s.to_owned()
    };
    chrono::DateTime::parse_from_str(&fixed, "%Y-%m-%d %H:%M:%S%.f%:z")
        .ok()
        .map(|d| d.timestamp_micros())
}

#[cfg(test)]
mod tests {
    //! The apply against a real PostgreSQL server: batches as a source's stream would carry
    //! them (commit times a source's clock could not be made to give in a test).

    use super::*;
    use crate::db::Site;
    use crate::schema::{install, table_info};
    use gsb_tests::pg::PgServer;

    /// A target with `users` set up, its origin session for the primary, and an applier.
    async fn target() -> (PgServer, Client, Applier, Arc<Shape>) {
        let srv = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
        let mut c = srv.client("site").await;
        c.batch_execute(
            "CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE, name text);
             SET TIME ZONE 'UTC';
             SELECT pg_replication_origin_create('gsb_from_primary');
             SELECT pg_replication_origin_session_setup('gsb_from_primary');",
        )
        .await
        .unwrap();
        let info = table_info(&c, Site::Backup, "public.users").await.unwrap();
        install(
            &mut c,
            Site::Backup,
            std::slice::from_ref(&info),
            std::slice::from_ref(&info),
            false,
        )
        .await
        .unwrap();
        let a = Applier::new(
            &c,
            "primary",
            "backup",
            true,
            "gsb_from_primary",
            10_000_000,
        )
        .await
        .unwrap();
        let col = |name: &str, key: bool, type_oid: u32| pgoutput::Column {
            name: name.into(),
            key,
            type_oid,
        };
        let shape = Arc::new(Shape {
            name: "public.users".into(),
            columns: vec![
                col("id", true, 23),
                col("email", false, 25),
                col("name", false, 25),
            ],
        });
        (srv, c, a, shape)
    }

    fn row(shape: &Arc<Shape>, op: Op, id: i32, email: Option<&str>, ts_us: i64) -> Change {
        let text = |s: &str| Value::Text(s.into());
        Change {
            shape: shape.clone(),
            op,
            vals: vec![
                text(&id.to_string()),
                email.map_or(Value::UnchangedToast, text),
                Value::Null,
            ],
            ts_us,
            initial: false,
        }
    }

    async fn ids_and_emails(c: &Client) -> Vec<(i32, String)> {
        c.query("SELECT id, email FROM users ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Runs `sql` as a write of this site (no replication origin), in its own transaction.
    async fn write_here(c: &Client, sql: &str) {
        c.batch_execute("SELECT pg_replication_origin_session_reset()")
            .await
            .unwrap();
        c.batch_execute(sql).await.unwrap();
        c.batch_execute("SELECT pg_replication_origin_session_setup('gsb_from_primary')")
            .await
            .unwrap();
    }

    /// The origin id and commit time (µs) of the last write of user `id`.
    async fn last_writer(c: &Client, id: i32) -> (i64, i64) {
        last_writer_in(c, "public.users", id).await
    }

    /// The origin id and commit time (µs) of the last write of row `id` of `table`.
    async fn last_writer_in(c: &Client, table: &str, id: i32) -> (i64, i64) {
        let r = c
            .query_one(
                &format!(
                    "SELECT (pg_xact_commit_timestamp_origin(xmin)).roident::int8, \
                            (extract(epoch FROM (pg_xact_commit_timestamp_origin(xmin)).\"timestamp\") * 1000000)::int8 \
                     FROM {table} WHERE id = $1"
                ),
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    }

    async fn progress(c: &Client) -> String {
        c.query_one(
            "SELECT pg_replication_origin_progress('gsb_from_primary', false)::text",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }

    async fn count(c: &Client, sql: &str) -> i64 {
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Applies `changes` as one batch ending at `end_lsn`; its outcome.
    async fn applied(a: &mut Applier, c: &Client, changes: Vec<Change>, end_lsn: u64) -> Outcome {
        a.apply(c, &batch(changes, end_lsn)).await.unwrap()
    }

    /// Users 1 to `n` (email `e<id>`), committed at `ts_us` by the source, applied as a batch
    /// ending at 0/100.
    async fn seeded(a: &mut Applier, c: &Client, users: &Arc<Shape>, n: i32, ts_us: i64) {
        let inserts = (1..=n)
            .map(|id| row(users, Op::Insert, id, Some(&format!("e{id}")), ts_us))
            .collect();
        applied(a, c, inserts, 0x100).await;
    }

    fn batch(changes: Vec<Change>, end_lsn: u64) -> Batch {
        let ts = changes.iter().map(|c| c.ts_us).max().unwrap_or_default();
        Batch {
            txns: 1,
            data_rows: changes.len(),
            data_txns: 1,
            changes,
            end_lsn,
            commit_ts_us: ts,
            fence: None,
        }
    }

    /// Values with COPY's special bytes (and an empty string, NULL) arrive as sent, whether
    /// the batch's inserts go by one INSERT or by COPY.
    #[tokio::test]
    async fn values_with_backslashes_tabs_and_newlines_arrive_unchanged_by_insert_and_by_copy() {
        let (_srv, c, mut a, users) = target().await;
        let t = chrono::Utc::now().timestamp_micros() - 1_000_000;
        let tricky = |id: i32| match id % 5 {
            0 => format!("a\\b\tc\nd\re\\N {id}"),
            1 => format!("\\\\{id}\r\n"),
            2 => format!("\t{id}\t"),
            3 => format!("ünï\u{1F600}{id}"),
            // `email` is unique: one empty string.
            _ if id == 4 => String::new(),
            _ => format!("\\.{id}"),
        };
        for (n, from, lsn) in [(10, 0, 0x100), (COPY_FROM as i32 + 10, 1000, 0x200)] {
            let changes: Vec<Change> = (from..from + n)
                .map(|id| {
                    let mut ch = row(&users, Op::Insert, id, Some(&tricky(id)), t);
                    if id % 7 == 0 {
                        ch.vals[1] = Value::Null;
                    }
                    ch
                })
                .collect();
            a.apply(&c, &batch(changes, lsn)).await.unwrap();
            let got: Vec<(i32, Option<String>)> = c
                .query(
                    "SELECT id, email FROM users WHERE id >= $1 AND id < $2 ORDER BY id",
                    &[&from, &(from + n)],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let want: Vec<(i32, Option<String>)> = (from..from + n)
                .map(|id| (id, (id % 7 != 0).then(|| tricky(id))))
                .collect();
            assert_eq!(got, want, "{n} inserts");
        }
    }

    #[tokio::test]
    async fn a_change_committed_beyond_the_clock_skew_is_rejected_logged_and_the_rest_applied() {
        let (_srv, c, mut a, users) = target().await;
        let now = chrono::Utc::now().timestamp_micros();
        let ahead = now + 3_600_000_000;
        let out = a
            .apply(
                &c,
                &batch(
                    vec![
                        row(&users, Op::Insert, 2, Some("skewed"), ahead),
                        row(&users, Op::Insert, 3, Some("ok"), now),
                    ],
                    0x100,
                ),
            )
            .await
            .unwrap();
        assert_eq!(out["skew_rejected"], 1, "{out}");
        assert_eq!(out["applied"]["public.users"], 1, "{out}");
        assert_eq!(
            count(&c, "SELECT count(*) FROM users WHERE email = 'skewed'").await,
            0
        );
        assert_eq!(
            count(&c, "SELECT count(*) FROM users WHERE email = 'ok'").await,
            1
        );
        assert_eq!(
            count(&c, "SELECT count(*) FROM gsb.conflicts WHERE reason = 'clock_skew' AND pk = '{\"id\": 2}' AND loser_origin = 'primary' AND loser_row->>'email' = 'skewed'").await,
            1
        );
        // The batch moved the origin progress in the same commit.
        let progress: String = c
            .query_one(
                "SELECT pg_replication_origin_progress('gsb_from_primary', false)::text",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(progress, "0/100");
    }

    #[tokio::test]
    async fn a_key_changed_several_times_in_a_batch_ends_as_the_source_left_it() {
        let (_srv, c, mut a, users) = target().await;
        let t = chrono::Utc::now().timestamp_micros() - 1_000_000;
        // Insert, update twice (the second leaving `email` unchanged: TOAST), delete another
        // key that was inserted in the same batch, and re-insert a deleted key.
        let changes = vec![
            row(&users, Op::Insert, 1, Some("a"), t),
            row(&users, Op::Update, 1, Some("b"), t + 1),
            row(&users, Op::Update, 1, None, t + 2),
            row(&users, Op::Insert, 2, Some("x"), t + 3),
            row(&users, Op::Delete, 2, None, t + 4),
            row(&users, Op::Insert, 2, Some("y"), t + 5),
            row(&users, Op::Insert, 3, Some("z"), t + 6),
            row(&users, Op::Delete, 3, None, t + 7),
        ];
        let out = a.apply(&c, &batch(changes, 0x200)).await.unwrap();
        assert_eq!(out["applied"]["public.users"], 8, "{out}");
        let rows = ids_and_emails(&c).await;
        assert_eq!(rows, vec![(1, "b".into()), (2, "y".into())]);
        assert_eq!(count(&c, "SELECT count(*) FROM gsb.conflicts").await, 0);
    }

    #[tokio::test]
    async fn unique_values_swapped_through_a_temporary_one_apply_in_commit_order() {
        let (_srv, c, mut a, users) = target().await;
        let t = chrono::Utc::now().timestamp_micros() - 1_000_000;
        a.apply(
            &c,
            &batch(
                vec![
                    row(&users, Op::Insert, 1, Some("u1"), t),
                    row(&users, Op::Insert, 2, Some("u2"), t),
                ],
                0x300,
            ),
        )
        .await
        .unwrap();
        // As set-based statements the net updates collide on the unique email; in the source's
        // order they do not.
        let out = a
            .apply(
                &c,
                &batch(
                    vec![
                        row(&users, Op::Update, 1, Some("tmp"), t + 1),
                        row(&users, Op::Update, 2, Some("u1"), t + 1),
                        row(&users, Op::Update, 1, Some("u2"), t + 1),
                    ],
                    0x400,
                ),
            )
            .await
            .unwrap();
        assert_eq!(out["applied"]["public.users"], 3, "{out}");
        let rows = ids_and_emails(&c).await;
        assert_eq!(rows, vec![(1, "u2".into()), (2, "u1".into())]);
    }

    #[tokio::test]
    async fn a_local_write_loses_to_a_later_change_and_beats_an_earlier_one_both_logged() {
        let (_srv, c, mut a, users) = target().await;
        // Two local rows written on this site (no origin) now.
        // (Each its own transaction: a commit records the session's origin at commit time.)
        write_here(
            &c,
            "INSERT INTO users VALUES (1, 'l1', 'local'), (2, 'l2', 'local'), (4, 'l4', 'local')",
        )
        .await;
        let now = chrono::Utc::now().timestamp_micros();
        let out = a
            .apply(
                &c,
                &batch(
                    vec![
                        row(&users, Op::Update, 1, Some("later"), now + 5_000_000),
                        row(&users, Op::Update, 2, Some("earlier"), now - 60_000_000),
                        row(&users, Op::Update, 9, Some("gone"), now),
                        // inserted on both sites: presumed absent, the INSERT fails, read again
                        row(&users, Op::Insert, 4, Some("both"), now + 5_000_000),
                    ],
                    0x500,
                ),
            )
            .await
            .unwrap();
        assert_eq!(out["applied"]["public.users"], 2, "{out}");
        assert_eq!(out["conflicts"]["public.users"], 4, "{out}");
        let emails: Vec<String> = c
            .query("SELECT email FROM users ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(emails, vec!["later", "l2", "both"]);
        assert_eq!(count(&c, "SELECT count(*) FROM gsb.conflicts WHERE winner_row->>'email' = 'both' AND loser_row->>'email' = 'l4'").await, 1);
        assert_eq!(count(&c, "SELECT count(*) FROM gsb.conflicts WHERE winner_row->>'email' = 'later' AND loser_row->>'email' = 'l1' AND loser_origin = 'backup'").await, 1);
        assert_eq!(count(&c, "SELECT count(*) FROM gsb.conflicts WHERE winner_row->>'email' = 'l2' AND loser_row->>'email' = 'earlier' AND loser_origin = 'primary'").await, 1);
        assert_eq!(count(&c, "SELECT count(*) FROM gsb.conflicts WHERE loser_row->>'email' = 'gone' AND winner_origin = 'backup' AND winner_row IS NULL").await, 1);
    }

    /// A batch of one insert goes as one statement committed by itself: its commit still
    /// records the origin (so the row is not shipped back), the source's commit time (the
    /// conflict rule's stamp) and the progress; and where the key exists here after all, it
    /// is decided like any other batch's.
    #[tokio::test]
    async fn a_batch_of_one_insert_commits_alone_with_the_origin_its_time_and_the_progress() {
        let (_srv, c, mut a, users) = target().await;
        let t = chrono::Utc::now().timestamp_micros() - 1_000_000;
        let out = a
            .apply(
                &c,
                &batch(vec![row(&users, Op::Insert, 1, Some("one"), t)], 0x300),
            )
            .await
            .unwrap();
        assert_eq!(out["attempts"], 1, "{out}");
        assert_eq!(
            last_writer(&c, 1).await,
            (a.origin_id, t),
            "the row's last writer"
        );
        assert_eq!(progress(&c).await, "0/300");
        let open = count(
            &c,
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'",
        )
        .await;
        assert_eq!(open, 0, "no transaction left open");
        // The same key written here since, later: the insert fails, the batch is read again
        // and the local row wins, logged.
        write_here(&c, "UPDATE users SET email = 'local' WHERE id = 1").await;
        let out = a
            .apply(
                &c,
                &batch(vec![row(&users, Op::Insert, 1, Some("late"), t + 1)], 0x400),
            )
            .await
            .unwrap();
        assert_eq!(out["conflicts"]["public.users"], 1, "{out}");
        assert_eq!(ids_and_emails(&c).await, vec![(1, "local".to_owned())]);
    }

    /// Updates and deletes of one table are tried as one statement presuming every row was
    /// last written by this source. Where one was written here since, or is gone, nothing of
    /// that statement stays: the batch is read and decided like any other.
    #[tokio::test]
    async fn updates_and_deletes_presume_the_source_wrote_the_rows_and_fall_back_where_it_did_not()
    {
        let (_srv, c, mut a, users) = target().await;
        let t = chrono::Utc::now().timestamp_micros() - 1_000_000;
        seeded(&mut a, &c, &users, 4, t).await;
        // Updates of (id, email), all at commit time `ts`.
        let updates = |rows: &[(i32, &str)], ts: i64| -> Vec<Change> {
            rows.iter()
                .map(|&(id, email)| row(&users, Op::Update, id, Some(email), ts))
                .collect()
        };
        // The source's own rows: updated and deleted as it says.
        let out = applied(&mut a, &c, updates(&[(1, "u1"), (4, "u4")], t + 1), 0x200).await;
        assert_eq!(out["applied"]["public.users"], 2, "{out}");
        assert_eq!(out["attempts"], 1, "one statement: {out}");
        assert_eq!(last_writer(&c, 4).await, (a.origin_id, t + 1));
        assert_eq!(progress(&c).await, "0/200");
        // Row 2 edited here since (later than the source's change): the update of 1 and 2
        // cannot go presumed; read, 1 takes it and 2 keeps the local edit, logged.
        write_here(&c, "UPDATE users SET email = 'here' WHERE id = 2").await;
        let out = applied(&mut a, &c, updates(&[(1, "v1"), (2, "v2")], t + 2), 0x300).await;
        assert_eq!(out["conflicts"]["public.users"], 1, "{out}");
        assert_eq!(out["attempts"], 2, "presumed, then read: {out}");
        assert_eq!(progress(&c).await, "0/300");
        // Deletes of the source's rows; then an update of one of them, gone: skipped, logged.
        let out = applied(
            &mut a,
            &c,
            vec![
                row(&users, Op::Delete, 3, None, t + 3),
                row(&users, Op::Delete, 4, None, t + 3),
            ],
            0x400,
        )
        .await;
        assert_eq!(out["attempts"], 1, "one statement: {out}");
        let out = applied(&mut a, &c, updates(&[(3, "late")], t + 4), 0x500).await;
        assert_eq!(out["conflicts"]["public.users"], 1, "{out}");
        assert_eq!(progress(&c).await, "0/500");
        assert_eq!(
            ids_and_emails(&c).await,
            vec![(1, "v1".to_owned()), (2, "here".to_owned())]
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM gsb.conflicts WHERE loser_row->>'email' IN ('v2', 'late')"
            )
            .await,
            2
        );
    }

    /// A batch that inserts new keys and updates and deletes the source's rows is one
    /// transaction with nothing read; where a row to update was written here, or a key to
    /// insert exists here, nothing of it stays and the batch is read and decided.
    #[tokio::test]
    async fn a_mixed_batch_presumes_inserted_keys_absent_and_the_rest_the_sources() {
        let (_srv, c, mut a, users) = target().await;
        let t = chrono::Utc::now().timestamp_micros() - 1_000_000;
        seeded(&mut a, &c, &users, 3, t).await;
        let mixed = |tag: &str, new: i32, ts: i64| {
            vec![
                row(&users, Op::Insert, new, Some(&format!("{tag}{new}")), ts),
                row(&users, Op::Update, 1, Some(&format!("{tag}1")), ts),
                row(&users, Op::Update, new, Some(&format!("{tag}{new}b")), ts),
                row(&users, Op::Delete, 3, None, ts),
            ]
        };
        let out = applied(&mut a, &c, mixed("m", 10, t + 1), 0x200).await;
        assert_eq!(out["attempts"], 1, "one round trip: {out}");
        assert_eq!(out["applied"]["public.users"], 4, "{out}");
        assert_eq!(
            ids_and_emails(&c).await,
            vec![(1, "m1".into()), (2, "e2".into()), (10, "m10b".into())]
        );
        assert_eq!(last_writer(&c, 10).await, (a.origin_id, t + 1));
        assert_eq!(progress(&c).await, "0/200");
        // Row 1 edited here later: the update loses (logged), the rest is applied.
        write_here(&c, "UPDATE users SET email = 'here' WHERE id = 1").await;
        let mut changes = mixed("n", 11, t + 2);
        changes.pop();
        let out = applied(&mut a, &c, changes, 0x300).await;
        assert_eq!(out["attempts"], 2, "presumed, then read: {out}");
        assert_eq!(out["conflicts"]["public.users"], 1, "{out}");
        // Key 12 inserted here first: the source's later insert wins, logged.
        write_here(&c, "INSERT INTO users VALUES (12, 'here12', NULL)").await;
        let changes = vec![
            row(
                &users,
                Op::Insert,
                12,
                Some("s12"),
                chrono::Utc::now().timestamp_micros(),
            ),
            row(&users, Op::Update, 2, Some("s2"), t + 3),
        ];
        let out = applied(&mut a, &c, changes, 0x400).await;
        assert!(out["attempts"].as_i64() > Some(1), "{out}");
        assert_eq!(progress(&c).await, "0/400");
        assert_eq!(
            ids_and_emails(&c).await,
            vec![
                (1, "here".into()),
                (2, "s2".into()),
                (10, "m10b".into()),
                (11, "n11b".into()),
                (12, "s12".into())
            ]
        );
    }

    /// A batch of several tables with nothing to read is one transaction whose first write
    /// sets up the origin: every row carries the source's origin and commit time, and the
    /// progress moves, whether the batch only inserts or also presumes an update.
    #[tokio::test]
    async fn a_batch_of_two_tables_commits_under_the_origin_set_up_by_its_first_write() {
        let (_srv, mut c, mut a, users) = target().await;
        c.batch_execute("CREATE TABLE public.meetings (id int PRIMARY KEY, title text)")
            .await
            .unwrap();
        let mut infos = Vec::new();
        for t in ["public.meetings", "public.users"] {
            infos.push(table_info(&c, Site::Backup, t).await.unwrap());
        }
        install(&mut c, Site::Backup, &infos, &infos, false)
            .await
            .unwrap();
        let meetings = Arc::new(Shape {
            name: "public.meetings".into(),
            columns: vec![
                pgoutput::Column {
                    name: "id".into(),
                    key: true,
                    type_oid: 23,
                },
                pgoutput::Column {
                    name: "title".into(),
                    key: false,
                    type_oid: 25,
                },
            ],
        });
        let meeting = |op: Op, id: i32, ts_us: i64| Change {
            shape: meetings.clone(),
            op,
            vals: vec![
                Value::Text(id.to_string().into()),
                Value::Text(format!("m{id}").into()),
            ],
            ts_us,
            initial: false,
        };
        let t = chrono::Utc::now().timestamp_micros() - 1_000_000;
        let inserts = vec![
            meeting(Op::Insert, 1, t),
            row(&users, Op::Insert, 1, Some("e1"), t),
        ];
        let out = applied(&mut a, &c, inserts, 0x100).await;
        assert_eq!(out["attempts"], 1, "{out}");
        assert_eq!(progress(&c).await, "0/100");
        assert_eq!(
            last_writer_in(&c, "public.meetings", 1).await,
            (a.origin_id, t)
        );
        assert_eq!(last_writer(&c, 1).await, (a.origin_id, t));
        let mixed = vec![
            meeting(Op::Insert, 2, t + 1),
            row(&users, Op::Update, 1, Some("e1b"), t + 1),
        ];
        let out = applied(&mut a, &c, mixed, 0x200).await;
        assert_eq!(out["attempts"], 1, "presumed, nothing read: {out}");
        assert_eq!(progress(&c).await, "0/200");
        assert_eq!(
            last_writer_in(&c, "public.meetings", 2).await,
            (a.origin_id, t + 1)
        );
        assert_eq!(last_writer(&c, 1).await, (a.origin_id, t + 1));
        assert_eq!(ids_and_emails(&c).await, vec![(1, "e1b".into())]);
    }

    /// Inserts, updates and deletes of a few rows go as a `VALUES` list of scalars, of many as
    /// text arrays; each way, alone, presumed or read, every row ends as the decision says,
    /// its values in the right row.
    #[tokio::test]
    async fn few_and_many_rows_of_each_write_land_alike_as_values_lists_and_as_arrays() {
        let (_srv, c, mut a, users) = target().await;
        let t = chrono::Utc::now().timestamp_micros() - 1_000_000;
        let mut lsn = 0x100;
        let mut next_lsn = || {
            lsn += 0x100;
            lsn
        };
        for n in [3, VALUES_MAX, VALUES_MAX + 5] {
            let n = n as i32;
            c.batch_execute("DELETE FROM users; DELETE FROM gsb.conflicts")
                .await
                .unwrap();
            let ids = 1..=n;
            let each = |op: Op, tag: &str, ts: i64| -> Vec<Change> {
                ids.clone()
                    .map(|id| row(&users, op, id, Some(&format!("{tag}{id}")), ts))
                    .collect()
            };
            applied(&mut a, &c, each(Op::Insert, "a", t), next_lsn()).await;
            let want: Vec<(i32, String)> = ids.clone().map(|id| (id, format!("a{id}"))).collect();
            assert_eq!(ids_and_emails(&c).await, want, "n={n}");
            // Presumed: every row is the source's.
            let out = applied(&mut a, &c, each(Op::Update, "b", t + 1), next_lsn()).await;
            assert_eq!(out["attempts"], 1, "n={n}: {out}");
            // Read: row 2 was edited here later, so it keeps its edit (logged).
            write_here(&c, "UPDATE users SET email = 'here' WHERE id = 2").await;
            let out = applied(&mut a, &c, each(Op::Update, "c", t + 2), next_lsn()).await;
            assert_eq!(out["attempts"], 2, "n={n}: {out}");
            assert_eq!(out["conflicts"]["public.users"], 1, "n={n}: {out}");
            let want: Vec<(i32, String)> = ids
                .clone()
                .map(|id| {
                    (
                        id,
                        if id == 2 {
                            "here".into()
                        } else {
                            format!("c{id}")
                        },
                    )
                })
                .collect();
            assert_eq!(ids_and_emails(&c).await, want, "n={n}");
            // Deletes: the odd rows presumed; then the even ones, row 2 read (a delete wins).
            let half = |op: Op, ts: i64, even: bool| -> Vec<Change> {
                ids.clone()
                    .filter(|id| (id % 2 == 0) == even)
                    .map(|id| row(&users, op, id, None, ts))
                    .collect()
            };
            let out = applied(&mut a, &c, half(Op::Delete, t + 3, false), next_lsn()).await;
            assert_eq!(out["attempts"], 1, "n={n}: {out}");
            let want: Vec<(i32, String)> = want.into_iter().filter(|(id, _)| id % 2 == 0).collect();
            assert_eq!(ids_and_emails(&c).await, want, "n={n}");
            let out = applied(&mut a, &c, half(Op::Delete, t + 4, true), next_lsn()).await;
            assert_eq!(out["attempts"], 2, "n={n}: {out}");
            assert_eq!(count(&c, "SELECT count(*) FROM users").await, 0, "n={n}");
        }
        assert_eq!(progress(&c).await, format!("0/{lsn:X}"));
    }

    #[tokio::test]
    async fn a_large_insert_goes_by_copy_with_every_value_intact() {
        let (_srv, c, mut a, users) = target().await;
        let t = chrono::Utc::now().timestamp_micros() - 1_000_000;
        let odd = "tab\there, new\nline, back\\slash, cr\r, \\N, quote' \"";
        let mut changes: Vec<Change> = (0..(COPY_FROM as i32 + 10))
            .map(|i| row(&users, Op::Insert, i, Some(&format!("{odd} {i}")), t))
            .collect();
        // and a NULL
        changes.push(Change {
            shape: users.clone(),
            op: Op::Insert,
            vals: vec![Value::Text("100000".into()), Value::Null, Value::Null],
            ts_us: t,
            initial: false,
        });
        let n = changes.len() as i64;
        a.apply(&c, &batch(changes, 0x600)).await.unwrap();
        assert_eq!(count(&c, "SELECT count(*) FROM users").await, n);
        let e: String = c
            .query_one("SELECT email FROM users WHERE id = 7", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(e, format!("{odd} 7"));
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM users WHERE id = 100000 AND email IS NULL"
            )
            .await,
            1
        );
    }
}
