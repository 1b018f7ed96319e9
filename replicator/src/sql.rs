//! The SQL installed in each site database (schema `gsb`), and the statements the workers run.

/// Current schema version recorded in `gsb.schema_version`.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// The migrations, version 1 first: version N is `MIGRATIONS[N - 1]`.
pub const MIGRATIONS: [&str; 5] = [
    MIGRATION_1,
    MIGRATION_2,
    MIGRATION_3,
    MIGRATION_4,
    MIGRATION_5,
];

/// Moves a trigger capture cursor (direction, from done/part/part_id, to done/part/part_id):
/// see `gsb.advance_cursor`.
pub const ADVANCE_CURSOR: &str = "SELECT gsb.advance_cursor($1::text, $2::text, $3::text, $4::int8, $5::text, $6::text, $7::int8)";

/// Version 1 of the `gsb` schema (run once, inside the install transaction).
pub const MIGRATION_1: &str = r#"
CREATE TABLE gsb.site (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    site text NOT NULL,
    -- highest remote HLC stamp applied here: local stamps stay above it (the HLC receive rule)
    hlc_floor bigint NOT NULL DEFAULT 0
);
CREATE SEQUENCE gsb.hlc_seq CYCLE;
-- the change log, filled by row triggers; read by transaction visibility (xid < snapshot xmin)
CREATE TABLE gsb.changes (
    id bigserial PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    tbl text NOT NULL,
    op char(1) NOT NULL CHECK (op IN ('I', 'U', 'D')),
    pk jsonb NOT NULL,
    "row" jsonb,
    hlc bigint NOT NULL,
    origin text NOT NULL,
    -- the version this write replaced: tells a causal successor from a concurrent write
    prev_hlc bigint,
    prev_origin text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX changes_xid_id ON gsb.changes (xid, id);
-- per direction, the last source change applied here; advanced in the apply transaction
CREATE TABLE gsb.cursors (
    direction text PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT '0',
    id bigint NOT NULL DEFAULT 0,
    applied_at timestamptz
);
-- current version of every replicated row; deleted = tombstone
CREATE TABLE gsb.row_versions (
    tbl text NOT NULL,
    pk jsonb NOT NULL,
    hlc bigint NOT NULL,
    origin text NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tbl, pk)
);
CREATE TABLE gsb.conflicts (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    tbl text NOT NULL,
    pk jsonb NOT NULL,
    reason text NOT NULL,
    winner_origin text, winner_hlc bigint, winner_row jsonb,
    loser_origin text, loser_hlc bigint, loser_row jsonb
);
-- statements the apply function runs per table, generated from the catalog at install
CREATE TABLE gsb.tables (
    tbl text PRIMARY KEY,
    upsert_sql text NOT NULL,
    delete_sql text NOT NULL,
    select_sql text NOT NULL
);
-- each site writes its own row every second; replicated, it measures end-to-end lag
CREATE TABLE gsb.heartbeat (
    site text PRIMARY KEY,
    at timestamptz NOT NULL
);
"#;

/// Version 2: set-based apply (statements over a whole batch, the decoded change type) and an
/// index to prune old tombstones.
pub const MIGRATION_2: &str = r#"
ALTER TABLE gsb.tables ADD COLUMN upsert_many_sql text, ADD COLUMN delete_many_sql text;
-- one change as shipped in a batch; n is its position in source commit order
CREATE TYPE gsb.change AS (
    tbl text, op text, pk jsonb, "row" jsonb, hlc bigint, origin text,
    prev_hlc bigint, prev_origin text, created_at timestamptz, n bigint
);
CREATE INDEX row_versions_tombstones ON gsb.row_versions (hlc) WHERE deleted;
"#;

/// Version 3: cheaper capture. The change log has one index, (xid, id), the order every reader
/// uses, as its primary key; `row_versions` updates stay HOT (the tombstone index keys on a
/// column no write changes, and pages keep free space).
pub const MIGRATION_3: &str = r#"
ALTER TABLE gsb.changes DROP CONSTRAINT changes_pkey,
    ADD CONSTRAINT changes_pkey PRIMARY KEY (xid, id);
DROP INDEX gsb.changes_xid_id;
DROP INDEX gsb.row_versions_tombstones;
CREATE INDEX row_versions_tombstones ON gsb.row_versions (tbl) WHERE deleted;
ALTER TABLE gsb.row_versions SET (fillfactor = 80);
"#;

/// Version 4: the logical capture. Apply needs each table's key columns; conflicts carry the
/// commit timestamps the logical capture decides by.
pub const MIGRATION_4: &str = r#"
ALTER TABLE gsb.tables ADD COLUMN pk_cols text[];
ALTER TABLE gsb.conflicts ADD COLUMN winner_ts timestamptz, ADD COLUMN loser_ts timestamptz;
-- one change of the logical capture as shipped in a batch; n is its position in commit order
CREATE TYPE gsb.lchange AS (n int, tbl text, op text, key jsonb, r jsonb, ts timestamptz);
"#;

/// Version 5: the trigger capture shares the logical capture's apply. Its reader takes the
/// changes of every transaction committed between two snapshots (PgQ's batches), applied in id
/// order; the cursor is that pair of snapshots. The change log's stamps become optional (the
/// commit timestamp decides), `site.capture_format` 2 marks a site whose triggers no longer
/// stamp, and a cursor whose `done` is NULL was left by the first generation's apply.
pub const MIGRATION_5: &str = r#"
ALTER TABLE gsb.changes ALTER COLUMN hlc DROP NOT NULL, ALTER COLUMN origin DROP NOT NULL;
-- the apply order within a batch, and its continuation when a batch is cut
CREATE INDEX changes_id ON gsb.changes (id);
ALTER TABLE gsb.cursors ADD COLUMN done pg_snapshot, ADD COLUMN part pg_snapshot,
    ADD COLUMN part_id bigint;
ALTER TABLE gsb.cursors ALTER COLUMN done SET DEFAULT '1:1:';
ALTER TABLE gsb.site ADD COLUMN capture_format int NOT NULL DEFAULT 1;
ALTER TABLE gsb.site ALTER COLUMN capture_format SET DEFAULT 2;
"#;

/// One captured write, format 2 (`p_tbl`, `p_op`, `p_pk`, `p_row` in scope): appended to the
/// change log as it is; its version is its transaction's commit timestamp.
const RECORD: &str = r#"
    INSERT INTO gsb.changes (tbl, op, pk, "row") VALUES (p_tbl, p_op, p_pk, p_row);
    PERFORM pg_notify('gsb_changes', '');
"#;

/// One captured write, format 1 (`p_tbl`, `p_op`, `p_pk`, `p_row` in scope): stamp it above the
/// row's current version and the HLC floor, record the new version and append it to the change
/// log.
/// One statement (one executor run per captured row); the site name is baked in at install.
/// Kept for sites whose log the first generation's apply may still read (`capture_format` 1).
const RECORD_V1: &str = r#"
    WITH p AS (
        SELECT greatest(
                   (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint << 16)
                       | (nextval('gsb.hlc_seq') & 65535),
                   coalesce(r.hlc, 0) + 1,
                   (SELECT s.hlc_floor FROM gsb.site s) + 1) AS h,
               r.hlc AS prev_h, r.origin AS prev_o
        FROM (SELECT) one
        LEFT JOIN gsb.row_versions r ON r.tbl = p_tbl AND r.pk = p_pk
    ), v AS (
        INSERT INTO gsb.row_versions (tbl, pk, hlc, origin, deleted)
        SELECT p_tbl, p_pk, p.h, '{{site}}', p_op = 'D' FROM p
        ON CONFLICT (tbl, pk) DO UPDATE
        SET hlc = excluded.hlc, origin = excluded.origin, deleted = excluded.deleted
    )
    INSERT INTO gsb.changes (tbl, op, pk, "row", hlc, origin, prev_hlc, prev_origin)
    SELECT p_tbl, p_op, p_pk, p_row, p.h, '{{site}}', p.prev_h, p.prev_o FROM p;
    PERFORM pg_notify('gsb_changes', '');
"#;

/// Capture functions, `{{record}}` and `{{site}}` filled in by [`functions`].
const CAPTURE_FUNCTIONS: &str = r#"
CREATE OR REPLACE FUNCTION gsb.record(p_tbl text, p_op text, p_pk jsonb, p_row jsonb)
RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    {{record}}
END $f$;

CREATE OR REPLACE FUNCTION gsb.capture() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
    p_tbl text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    p_op text := left(TG_OP, 1);
    p_pk jsonb := '{}'; p_row jsonb; v_old jsonb; v_oldkey jsonb := '{}';
BEGIN
    -- the replicator's apply sessions set this: an applied change is never captured again
    IF current_setting('gsb.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    -- Keys built with plain expressions (no query per row); jsonb sorts the object's keys.
    IF TG_OP <> 'INSERT' THEN
        v_old := to_jsonb(OLD);
        FOR i IN 0 .. TG_NARGS - 1 LOOP
            v_oldkey := v_oldkey || jsonb_build_object(TG_ARGV[i], v_old -> TG_ARGV[i]);
        END LOOP;
    END IF;
    IF TG_OP = 'DELETE' THEN
        p_pk := v_oldkey;
    ELSE
        p_row := to_jsonb(NEW);
        FOR i IN 0 .. TG_NARGS - 1 LOOP
            p_pk := p_pk || jsonb_build_object(TG_ARGV[i], p_row -> TG_ARGV[i]);
        END LOOP;
        IF TG_OP = 'UPDATE' AND v_oldkey <> p_pk THEN
            -- a key change ships as a delete of the old key, then an insert of the new one
            PERFORM gsb.record(p_tbl, 'D', v_oldkey, NULL);
            p_op := 'I';
        END IF;
    END IF;
    {{record}}
    RETURN NULL;
END $f$;
"#;

/// The capture functions of `format` (1: stamped, for the first generation's apply; 2: the
/// change as it is) for `site` (`primary` or `backup`: a plain word, baked in as a literal so
/// no write reads `gsb.site` for it).
pub fn capture_functions(site: &str, format: i32) -> String {
    debug_assert!(site.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    let record = if format == 1 { RECORD_V1 } else { RECORD };
    CAPTURE_FUNCTIONS
        .replace("{{record}}", record.trim())
        .replace("{{site}}", site)
}

/// Functions (re)created on every install: the capture of `format` for `site`, the cursor
/// fence and the first generation's apply (still used to drain a change log it left).
pub fn functions(site: &str, format: i32) -> String {
    let capture = capture_functions(site, format);
    format!("{capture}\n{FUNCTIONS}\n{DROPPED}")
}

/// Functions (re)created on every install that do not depend on the site.
const FUNCTIONS: &str = r#"
-- Moves a trigger capture cursor from what the caller read to where its batch ends, in the
-- batch's transaction; fails if another replicator moved it meanwhile.
CREATE OR REPLACE FUNCTION gsb.advance_cursor(p_direction text, p_done text, p_part text,
    p_part_id bigint, p_to_done text, p_to_part text, p_to_part_id bigint)
RETURNS int LANGUAGE plpgsql AS $f$
BEGIN
    UPDATE gsb.cursors SET done = p_to_done::pg_snapshot, part = p_to_part::pg_snapshot,
        part_id = p_to_part_id, applied_at = now()
    WHERE direction = p_direction AND done::text = p_done
        AND part::text IS NOT DISTINCT FROM p_part AND part_id IS NOT DISTINCT FROM p_part_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'gsb: cursor % moved while a batch expected (%, %, %): another replicator applied it',
            p_direction, p_done, p_part, p_part_id;
    END IF;
    RETURN 1;
END $f$;

CREATE OR REPLACE FUNCTION gsb.apply_batch(
    p_direction text, p_from_xid xid8, p_from_id bigint, p_to_xid xid8, p_to_id bigint,
    p_changes jsonb, p_max_skew_ms bigint, p_primary text)
RETURNS jsonb LANGUAGE plpgsql AS $f$
DECLARE
    c record; v record; t record; cur record;
    v_applied jsonb := '{}'; v_conflicts jsonb := '{}';
    v_skew int := 0; v_max_h bigint; v_lag float8; v_hb float8; v_missing text;
    v_now_ms bigint := floor(extract(epoch FROM clock_timestamp()) * 1000);
    v_win boolean; v_clean boolean; v_local jsonb; v_found boolean;
    v_all gsb.change[]; v_fast gsb.change[]; v_slow gsb.change[]; v_fast_n int := 0;
BEGIN
    PERFORM set_config('gsb.applying', 'on', true);
    SELECT xid, id INTO cur FROM gsb.cursors WHERE direction = p_direction FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO gsb.cursors (direction) VALUES (p_direction);
        SELECT '0'::xid8 AS xid, 0::bigint AS id INTO cur;
    END IF;
    IF cur.xid <> p_from_xid OR cur.id <> p_from_id THEN
        RAISE EXCEPTION 'gsb: cursor % moved to (%, %) while this batch expected (%, %): another replicator applied it',
            p_direction, cur.xid, cur.id, p_from_xid, p_from_id USING ERRCODE = '40001';
    END IF;
    -- Decoded once; n is the change's position in source commit order.
    SELECT coalesce(array_agg(x ORDER BY x.n), '{}'), max(extract(epoch FROM clock_timestamp() - x.created_at))
        INTO v_all, v_lag
        FROM jsonb_populate_recordset(NULL::gsb.change, p_changes) x;
    -- Stamps beyond the maximum clock skew are rejected: logged, never applied.
    INSERT INTO gsb.conflicts (tbl, pk, reason, loser_origin, loser_hlc, loser_row)
        SELECT x.tbl, x.pk, 'clock_skew', x.origin, x.hlc, x."row" FROM unnest(v_all) x
        WHERE (x.hlc >> 16) > v_now_ms + p_max_skew_ms ORDER BY x.n;
    GET DIAGNOSTICS v_skew = ROW_COUNT;
    IF v_skew > 0 THEN
        v_all := ARRAY(SELECT x FROM unnest(v_all) x
            WHERE (x.hlc >> 16) <= v_now_ms + p_max_skew_ms ORDER BY x.n);
    END IF;
    SELECT max(x.hlc) INTO v_max_h FROM unnest(v_all) x;
    SELECT x.tbl INTO v_missing FROM unnest(v_all) x
        WHERE NOT EXISTS (SELECT 1 FROM gsb.tables g WHERE g.tbl = x.tbl) LIMIT 1;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'gsb: table % is not set up for replication on this site', v_missing;
    END IF;
    -- Lock the versions this batch may replace (in a stable order: no deadlock between
    -- batches), then sort the changes: a key changed once in the batch whose local version is
    -- absent, the change's predecessor, or older from the same writer is applied set-based;
    -- a version already here is skipped; the rest (concurrent writes, keys changed several
    -- times in the batch) go through the per-row path in commit order. Small batches (the
    -- steady state) skip the sorting: its fixed cost exceeds a few per-row statements.
    IF cardinality(v_all) < 32 THEN
        v_fast := '{}'; v_slow := v_all;
    ELSE
        PERFORM 1 FROM gsb.row_versions r
            WHERE (r.tbl, r.pk) IN (SELECT x.tbl, x.pk FROM unnest(v_all) x)
            ORDER BY r.tbl, r.pk FOR UPDATE;
        SELECT coalesce(array_agg(k.x ORDER BY (k.x).n) FILTER (WHERE k.cls = 'fast'), '{}'),
               coalesce(array_agg(k.x ORDER BY (k.x).n) FILTER (WHERE k.cls = 'slow'), '{}')
            INTO v_fast, v_slow
            FROM (SELECT x, CASE
                    WHEN count(*) OVER (PARTITION BY x.tbl, x.pk) > 1 THEN 'slow'
                    WHEN r.tbl IS NULL THEN 'fast'
                    WHEN r.hlc = x.hlc AND r.origin = x.origin THEN 'skip'
                    WHEN r.hlc = x.prev_hlc AND r.origin = x.prev_origin THEN 'fast'
                    WHEN r.origin = x.origin AND x.hlc > r.hlc THEN 'fast'
                    ELSE 'slow' END AS cls
                FROM unnest(v_all) x
                LEFT JOIN gsb.row_versions r ON r.tbl = x.tbl AND r.pk = x.pk) k;
    END IF;
    IF cardinality(v_fast) > 0 THEN
        BEGIN
            FOR t IN SELECT g.tbl, g.upsert_many_sql, g.delete_many_sql,
                    jsonb_agg(x."row" ORDER BY x.n) FILTER (WHERE x.op <> 'D') AS ups,
                    jsonb_agg(x.pk ORDER BY x.n) FILTER (WHERE x.op = 'D') AS dels
                FROM unnest(v_fast) x JOIN gsb.tables g ON g.tbl = x.tbl
                GROUP BY g.tbl, g.upsert_many_sql, g.delete_many_sql ORDER BY g.tbl
            LOOP
                IF t.dels IS NOT NULL THEN
                    EXECUTE t.delete_many_sql USING t.dels;
                END IF;
                IF t.ups IS NOT NULL THEN
                    EXECUTE t.upsert_many_sql USING t.ups;
                END IF;
            END LOOP;
            INSERT INTO gsb.row_versions (tbl, pk, hlc, origin, deleted)
                SELECT x.tbl, x.pk, x.hlc, x.origin, x.op = 'D' FROM unnest(v_fast) x
                ON CONFLICT (tbl, pk) DO UPDATE
                SET hlc = excluded.hlc, origin = excluded.origin, deleted = excluded.deleted;
            v_fast_n := cardinality(v_fast);
        EXCEPTION WHEN OTHERS THEN
            -- A set-based statement failed (e.g. a secondary unique key that only row order
            -- satisfies): its effects are rolled back; every change goes the per-row way.
            RAISE NOTICE 'gsb: set-based apply fell back to per-row: %', SQLERRM;
            v_slow := ARRAY(SELECT x FROM unnest(v_fast || v_slow) x ORDER BY x.n);
        END;
    END IF;
    IF v_fast_n > 0 THEN
        SELECT jsonb_object_agg(a.tbl, a.k) INTO v_applied
            FROM (SELECT x.tbl, count(*) AS k FROM unnest(v_fast) x GROUP BY x.tbl) a;
        SELECT extract(epoch FROM clock_timestamp() - (x."row" ->> 'at')::timestamptz) INTO v_hb
            FROM unnest(v_fast) x WHERE x.tbl = 'gsb.heartbeat' AND x.op <> 'D'
            ORDER BY x.n DESC LIMIT 1;
    END IF;
    FOR c IN SELECT * FROM unnest(v_slow) x ORDER BY x.n LOOP
        SELECT * INTO t FROM gsb.tables WHERE tbl = c.tbl;
        SELECT hlc, origin, deleted INTO v FROM gsb.row_versions
            WHERE tbl = c.tbl AND pk = c.pk FOR UPDATE;
        v_found := FOUND;
        IF NOT v_found THEN
            v_clean := true; v_win := true;
        ELSIF v.hlc = c.hlc AND v.origin = c.origin THEN
            CONTINUE; -- this very version is already here
        ELSIF v.hlc = c.prev_hlc AND v.origin = c.prev_origin THEN
            v_clean := true; v_win := true; -- a successor of what we hold
        ELSIF v.origin = c.origin THEN
            v_clean := true; v_win := c.hlc > v.hlc; -- same writer: newer replaces older
        ELSE
            v_clean := false;
            IF v.deleted <> (c.op = 'D') THEN
                v_win := c.op = 'D'; -- a delete beats a concurrent write: no resurrection
            ELSE
                v_win := c.hlc > v.hlc OR (c.hlc = v.hlc AND c.origin = p_primary);
            END IF;
        END IF;
        IF NOT v_clean THEN
            EXECUTE t.select_sql INTO v_local USING c.pk;
            IF v_local IS DISTINCT FROM c."row" THEN
                IF v_win THEN
                    INSERT INTO gsb.conflicts (tbl, pk, reason, winner_origin, winner_hlc, winner_row,
                        loser_origin, loser_hlc, loser_row)
                    VALUES (c.tbl, c.pk, 'concurrent_write', c.origin, c.hlc, c."row", v.origin, v.hlc, v_local);
                ELSE
                    INSERT INTO gsb.conflicts (tbl, pk, reason, winner_origin, winner_hlc, winner_row,
                        loser_origin, loser_hlc, loser_row)
                    VALUES (c.tbl, c.pk, 'concurrent_write', v.origin, v.hlc, v_local, c.origin, c.hlc, c."row");
                END IF;
                v_conflicts := jsonb_set(v_conflicts, ARRAY[c.tbl],
                    to_jsonb(coalesce((v_conflicts ->> c.tbl)::int, 0) + 1));
            END IF;
        END IF;
        IF v_win THEN
            IF c.op = 'D' THEN
                EXECUTE t.delete_sql USING c.pk;
            ELSE
                EXECUTE t.upsert_sql USING c."row";
            END IF;
            INSERT INTO gsb.row_versions (tbl, pk, hlc, origin, deleted)
                VALUES (c.tbl, c.pk, c.hlc, c.origin, c.op = 'D')
                ON CONFLICT (tbl, pk) DO UPDATE
                SET hlc = excluded.hlc, origin = excluded.origin, deleted = excluded.deleted;
            v_applied := jsonb_set(v_applied, ARRAY[c.tbl],
                to_jsonb(coalesce((v_applied ->> c.tbl)::int, 0) + 1));
            IF c.tbl = 'gsb.heartbeat' AND c.op <> 'D' THEN
                v_hb := extract(epoch FROM clock_timestamp() - (c."row" ->> 'at')::timestamptz);
            END IF;
        END IF;
    END LOOP;
    UPDATE gsb.site SET hlc_floor = v_max_h WHERE hlc_floor < v_max_h;
    UPDATE gsb.cursors SET xid = p_to_xid, id = p_to_id, applied_at = now()
        WHERE direction = p_direction;
    -- This transaction held an xid: readers of this site's change log may have been holding
    -- back later local commits behind it (they read below the snapshot's xmin); wake them.
    PERFORM pg_notify('gsb_changes', '');
    RETURN jsonb_build_object('applied', v_applied, 'conflicts', v_conflicts,
        'skew_rejected', v_skew, 'max_lag', v_lag, 'heartbeat_lag', v_hb);
END $f$;
"#;

/// The logical capture's apply moved out of the database (see `apply.rs`); an install
/// removes the function earlier versions applied with.
const DROPPED: &str = "DROP FUNCTION IF EXISTS gsb.apply_changes(text, text, text, pg_lsn, timestamptz, jsonb, bigint, text);";

/// The fetch of a batch from a source's change log after the cursor, in (xid, id) order, with
/// an extra condition. Returns count, last xid, last id, json.
macro_rules! fetch {
    ($cond:literal) => {
        concat!(
            r#"
WITH a AS (
    SELECT id, xid, tbl, op, pk, "row", hlc, origin, prev_hlc, prev_origin, created_at
    FROM gsb.changes
    WHERE (xid, id) > ($1::text::xid8, $2::int8)
      "#,
            $cond,
            r#"
      AND tbl = ANY($3::text[])
    ORDER BY xid, id
    LIMIT $4::int8
), b AS (
    SELECT a.*, row_number() OVER (ORDER BY xid, id) AS n FROM a
)
SELECT count(*)::int8,
       (SELECT xid::text FROM b ORDER BY xid DESC, id DESC LIMIT 1),
       (SELECT id FROM b ORDER BY xid DESC, id DESC LIMIT 1),
       coalesce(jsonb_agg(to_jsonb(b) - 'id' - 'xid' ORDER BY xid, id), '[]')::text
FROM b
"#
        )
    };
}

/// The first generation's fetch (kept to drain a change log its apply left): only changes of
/// finished transactions (xid below the snapshot's xmin), so a transaction still open with a
/// lower xid is never skipped.
pub const V1_FETCH: &str = fetch!("AND xid < pg_snapshot_xmin(pg_current_snapshot())");

/// The same with every committed change, for a source whose captured tables are locked
/// against writers (or no longer captured): no transaction still open can add one below.
pub const V1_FETCH_SETTLED: &str = fetch!("");

/// The first generation's apply of a batch on the target (see `gsb.apply_batch`).
pub const V1_APPLY: &str = "SELECT gsb.apply_batch($1::text, $2::text::xid8, $3::int8, $4::text::xid8, $5::int8, $6::text::jsonb, $7::int8, $8::text)::text";

/// Backlog on a source after a cursor (done, part, part_id): rows and age in seconds of the
/// oldest.
pub const PENDING: &str = r#"
SELECT count(*)::int8, extract(epoch FROM now() - min(created_at))::float8
FROM gsb.changes
WHERE xid >= pg_snapshot_xmin($1::text::pg_snapshot)
  AND NOT pg_visible_in_snapshot(xid, $1::text::pg_snapshot)
  AND NOT coalesce(pg_visible_in_snapshot(xid, $2::text::pg_snapshot) AND id <= $3::int8, false)
  AND tbl = ANY($4::text[])
"#;

/// Prunes the changes a cursor's `done` snapshot covers.
pub const PRUNE: &str = "DELETE FROM gsb.changes \
    WHERE xid < pg_snapshot_xmax($1::text::pg_snapshot) \
    AND pg_visible_in_snapshot(xid, $1::text::pg_snapshot) AND tbl = ANY($2::text[])";

/// Reads a cursor on the target: the trigger capture's (done, part, part_id; done NULL while
/// the first generation's is in force), then the first generation's (xid, id).
pub const CURSOR: &str =
    "SELECT done::text, part::text, part_id, xid::text, id FROM gsb.cursors WHERE direction = $1::text";

/// Writes this site's heartbeat row.
pub const HEARTBEAT: &str =
    "INSERT INTO gsb.heartbeat (site, at) VALUES ($1::text, clock_timestamp()) \
    ON CONFLICT (site) DO UPDATE SET at = excluded.at";
