//! Idempotent, versioned install of the `gsb` schema and the capture triggers in a site database.

use tokio_postgres::{Client, GenericClient};

use crate::db::Site;
use crate::sql;
use crate::Error;

/// Serialises concurrent installs on one database (two replicators starting at once).
const INSTALL_LOCK: i64 = 0x6773_625f_696e_7374; // "gsb_inst"

/// What the replicator needs to know about a replicated table.
#[derive(Debug, Clone)]
pub(crate) struct TableInfo {
    /// `schema.table`.
    pub name: String,
    /// Primary key columns, in key order.
    pub pk: Vec<String>,
}

/// Quotes an identifier for SQL.
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a `schema.table` name.
pub(crate) fn qident(name: &str) -> String {
    match name.split_once('.') {
        Some((s, t)) => format!("{}.{}", ident(s), ident(t)),
        None => ident(name),
    }
}

/// Looks a table up in the catalog: exists, has a primary key.
pub(crate) async fn table_info(
    client: &Client,
    site: Site,
    name: &str,
) -> Result<TableInfo, Error> {
    let s = site.as_str();
    let row = client
        .query_one("SELECT to_regclass($1::text)::oid", &[&qident(name)])
        .await
        .map_err(|e| Error::db(s, format!("looking up table {name}"), e))?;
    let oid: Option<u32> = row.get(0);
    let Some(oid) = oid else {
        return Err(Error::MissingTable {
            site: s,
            table: name.to_owned(),
        });
    };
    let pk: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await
        .map_err(|e| Error::db(s, format!("reading the primary key of {name}"), e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if pk.is_empty() {
        return Err(Error::NoPrimaryKey {
            site: s,
            table: name.to_owned(),
        });
    }
    let _ = oid;
    Ok(TableInfo {
        name: name.to_owned(),
        pk,
    })
}

/// Columns of a table in order (for the upsert's SET list).
async fn columns(
    client: &impl GenericClient,
    site: Site,
    name: &str,
) -> Result<Vec<String>, Error> {
    Ok(client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1::text) \
             AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[&qident(name)],
        )
        .await
        .map_err(|e| Error::db(site.as_str(), format!("reading the columns of {name}"), e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Installs or upgrades the schema in one transaction: tables, functions, this site's name,
/// apply statements for `apply` tables and capture triggers (with an initial snapshot of the
/// existing rows, for the initial sync) on `capture` tables when `triggers` (the trigger
/// capture; the logical capture installs no trigger).
pub(crate) async fn install(
    client: &mut Client,
    site: Site,
    capture: &[TableInfo],
    apply: &[TableInfo],
    triggers: bool,
) -> Result<(), Error> {
    let s = site.as_str();
    let db = |ctx: &'static str| move |e| Error::db(s, ctx, e);
    let tx = client
        .transaction()
        .await
        .map_err(db("starting the schema install"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INSTALL_LOCK])
        .await
        .map_err(db("taking the install lock"))?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS gsb; \
         CREATE TABLE IF NOT EXISTS gsb.schema_version (version int NOT NULL, installed_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(db("creating schema gsb"))?;
    let version: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM gsb.schema_version",
            &[],
        )
        .await
        .map_err(db("reading gsb.schema_version"))?
        .get(0);
    if version > sql::SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            site: s,
            found: version,
            supported: sql::SCHEMA_VERSION,
        });
    }
    // Each migration once, in order, each recorded in the same transaction.
    for (v, migration) in sql::MIGRATIONS.iter().enumerate() {
        let v = v as i32 + 1;
        if version >= v {
            continue;
        }
        tx.batch_execute(migration)
            .await
            .map_err(|e| Error::db(s, format!("upgrading the gsb schema to version {v}"), e))?;
        tx.execute(
            "INSERT INTO gsb.schema_version (version) VALUES ($1)",
            &[&v],
        )
        .await
        .map_err(db("recording the schema version"))?;
        tracing::info!(site = s, version = v, "gsb schema at version");
    }
    // A site registered before version 5 keeps stamping its captured changes until the first
    // generation's apply no longer reads its log (`upgrade::adopt`).
    let format: i32 = tx
        .query_opt("SELECT capture_format FROM gsb.site", &[])
        .await
        .map_err(db("reading gsb.site"))?
        .map_or(2, |r| r.get(0));
    tx.batch_execute(&sql::functions(s, format))
        .await
        .map_err(db("creating the gsb functions"))?;
    let found: Option<String> = tx
        .query_opt("SELECT site FROM gsb.site", &[])
        .await
        .map_err(db("reading gsb.site"))?
        .map(|r| r.get(0));
    match found {
        Some(f) if f != s => return Err(Error::WrongSite { site: s, found: f }),
        Some(_) => {}
        None => {
            tx.execute("INSERT INTO gsb.site (site) VALUES ($1)", &[&s])
                .await
                .map_err(db("registering the site"))?;
        }
    }
    tx.execute(
        "INSERT INTO gsb.cursors (direction) VALUES ('primary_to_backup'), ('backup_to_primary') \
         ON CONFLICT DO NOTHING",
        &[],
    )
    .await
    .map_err(db("creating cursors"))?;
    let heartbeat = TableInfo {
        name: "gsb.heartbeat".into(),
        pk: vec!["site".into()],
    };
    for t in apply.iter().chain(std::iter::once(&heartbeat)) {
        let cols = columns(&tx, site, &t.name).await?;
        let q = qident(&t.name);
        let pk_list = t.pk.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
        let r_list =
            t.pk.iter()
                .map(|c| format!("r.{}", ident(c)))
                .collect::<Vec<_>>()
                .join(", ");
        let t_list =
            t.pk.iter()
                .map(|c| format!("t.{}", ident(c)))
                .collect::<Vec<_>>()
                .join(", ");
        let set: Vec<String> = cols
            .iter()
            .filter(|c| !t.pk.contains(c))
            .map(|c| format!("{0} = EXCLUDED.{0}", ident(c)))
            .collect();
        let on_conflict = if set.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!("DO UPDATE SET {}", set.join(", "))
        };
        let upsert = format!(
            "INSERT INTO {q} SELECT * FROM jsonb_populate_record(NULL::{q}, $1) ON CONFLICT ({pk_list}) {on_conflict}"
        );
        let delete = format!(
            "DELETE FROM {q} t WHERE ({t_list}) = (SELECT {r_list} FROM jsonb_populate_record(NULL::{q}, $1) r)"
        );
        // Whole-batch forms used by the set-based apply (keys are distinct within one call).
        let upsert_many = format!(
            "INSERT INTO {q} SELECT * FROM jsonb_populate_recordset(NULL::{q}, $1) ON CONFLICT ({pk_list}) {on_conflict}"
        );
        let delete_many = format!(
            "DELETE FROM {q} t USING jsonb_populate_recordset(NULL::{q}, $1) r WHERE ({t_list}) = ({r_list})"
        );
        let select = format!(
            "SELECT to_jsonb(t) FROM {q} t WHERE ({t_list}) = (SELECT {r_list} FROM jsonb_populate_record(NULL::{q}, $1) r)"
        );
        tx.execute(
            "INSERT INTO gsb.tables (tbl, upsert_sql, delete_sql, select_sql, upsert_many_sql, delete_many_sql, pk_cols) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (tbl) DO UPDATE SET upsert_sql = EXCLUDED.upsert_sql, \
             delete_sql = EXCLUDED.delete_sql, select_sql = EXCLUDED.select_sql, \
             upsert_many_sql = EXCLUDED.upsert_many_sql, delete_many_sql = EXCLUDED.delete_many_sql, \
             pk_cols = EXCLUDED.pk_cols",
            &[&t.name, &upsert, &delete, &select, &upsert_many, &delete_many, &t.pk],
        )
        .await
        .map_err(db("registering apply statements"))?;
    }
    let capture = if triggers { capture } else { &[] };
    for t in capture
        .iter()
        .chain(std::iter::once(&heartbeat).filter(|_| triggers))
    {
        let has: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1::text) AND tgname = 'gsb_capture')",
                &[&qident(&t.name)],
            )
            .await
            .map_err(db("looking for the capture trigger"))?
            .get(0);
        if has {
            continue;
        }
        let q = qident(&t.name);
        // No write may slip between the snapshot of existing rows and the trigger.
        tx.batch_execute(&format!("LOCK TABLE {q} IN SHARE ROW EXCLUSIVE MODE"))
            .await
            .map_err(|e| Error::db(s, format!("locking {}", t.name), e))?;
        let pk_obj =
            t.pk.iter()
                .map(|c| {
                    format!(
                        "'{}', r -> '{}'",
                        c.replace('\'', "''"),
                        c.replace('\'', "''")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
        // Existing rows become changes stamped 0, "initial" (against a different row on the
        // other site the primary's wins): initial sync = union.
        let snapshot = if format == 1 {
            format!(
                "WITH k AS (SELECT r, jsonb_build_object({pk_obj}) AS pk FROM (SELECT to_jsonb(x) AS r FROM {q} x) s), \
                 v AS (INSERT INTO gsb.row_versions (tbl, pk, hlc, origin) SELECT $1, pk, 0, $2 FROM k \
                       ON CONFLICT DO NOTHING RETURNING pk) \
                 INSERT INTO gsb.changes (tbl, op, pk, \"row\", hlc, origin) \
                 SELECT $1, 'I', k.pk, k.r, 0, $2 FROM k JOIN v ON v.pk = k.pk"
            )
        } else {
            format!(
                "INSERT INTO gsb.changes (tbl, op, pk, \"row\", hlc, origin) \
                 SELECT $1, 'I', jsonb_build_object({pk_obj}), r, 0, $2 \
                 FROM (SELECT to_jsonb(x) AS r FROM {q} x) s"
            )
        };
        let n = tx
            .execute(&snapshot, &[&t.name, &s])
            .await
            .map_err(|e| Error::db(s, format!("snapshotting existing rows of {}", t.name), e))?;
        let args =
            t.pk.iter()
                .map(|c| format!("'{}'", c.replace('\'', "''")))
                .collect::<Vec<_>>()
                .join(", ");
        tx.batch_execute(&format!(
            "CREATE TRIGGER gsb_capture AFTER INSERT OR UPDATE OR DELETE ON {q} \
             FOR EACH ROW EXECUTE FUNCTION gsb.capture({args})"
        ))
        .await
        .map_err(|e| Error::db(s, format!("creating the capture trigger on {}", t.name), e))?;
        tracing::info!(site = s, table = %t.name, existing_rows = n, "capture trigger installed");
    }
    tx.commit()
        .await
        .map_err(db("committing the schema install"))?;
    Ok(())
}
