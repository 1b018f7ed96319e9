//! `gsb verify`: chunked checksums of the replicated tables on both sites, differing keys listed.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::qualify;
use crate::db::{connect, Conn, Site};
use crate::schema::{ident, qident, table_info};
use crate::{Config, Error};

/// Number of hash buckets a table is split into; only differing buckets are listed row by row.
const BUCKETS: i32 = 64;
/// Most differing keys listed per table.
const MAX_KEYS: usize = 50;

/// Comparison of one table.
#[derive(Debug, Clone)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// `two_way` (must be equal) or `usage` (backup rows must be on the primary).
    pub mode: &'static str,
    /// Rows on the primary.
    pub primary_rows: i64,
    /// Rows on the backup.
    pub backup_rows: i64,
    /// Keys (as JSON) that differ or are missing on one side (at most 50 listed).
    pub differing_keys: Vec<String>,
    /// Total number of differing keys.
    pub differing: usize,
}

/// Result of `verify`.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Per table.
    pub tables: Vec<TableReport>,
}

impl VerifyReport {
    /// True when every table matches.
    pub fn is_equal(&self) -> bool {
        self.tables.iter().all(|t| t.differing == 0)
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tables {
            if t.differing == 0 {
                writeln!(
                    f,
                    "{} ({}): equal (primary {} rows, backup {} rows)",
                    t.table, t.mode, t.primary_rows, t.backup_rows
                )?;
            } else {
                writeln!(
                    f,
                    "{} ({}): DIFFERENT: {} keys differ (primary {} rows, backup {} rows)",
                    t.table, t.mode, t.differing, t.primary_rows, t.backup_rows
                )?;
                for k in &t.differing_keys {
                    writeln!(f, "  {k}")?;
                }
                if t.differing > t.differing_keys.len() {
                    writeln!(f, "  ... and {} more", t.differing - t.differing_keys.len())?;
                }
            }
        }
        write!(
            f,
            "{}",
            if self.is_equal() {
                "sites are equal"
            } else {
                "sites DIFFER"
            }
        )
    }
}

fn pk_expr(pk: &[String]) -> String {
    let parts = pk
        .iter()
        .map(|c| format!("'{}', x.{}", c.replace('\'', "''"), ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("jsonb_build_object({parts})::text")
}

async fn buckets(
    c: &Conn,
    site: Site,
    table: &str,
    pk: &[String],
) -> Result<BTreeMap<i32, (i64, String)>, Error> {
    let k = pk_expr(pk);
    let q = format!(
        "SELECT (abs(hashtext({k})) % {BUCKETS})::int4, count(*)::int8, md5(string_agg(md5(to_jsonb(x)::text), '' ORDER BY {k})) \
         FROM {} x GROUP BY 1",
        qident(table)
    );
    Ok(c.query(&q, &[])
        .await
        .map_err(|e| Error::db(site.as_str(), format!("checksumming {table}"), e))?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

async fn rows_in(
    c: &Conn,
    site: Site,
    table: &str,
    pk: &[String],
    which: &[i32],
) -> Result<BTreeMap<String, String>, Error> {
    let k = pk_expr(pk);
    let q = format!(
        "SELECT {k}, md5(to_jsonb(x)::text) FROM {} x WHERE (abs(hashtext({k})) % {BUCKETS})::int4 = ANY($1)",
        qident(table)
    );
    Ok(c.query(&q, &[&which])
        .await
        .map_err(|e| Error::db(site.as_str(), format!("listing rows of {table}"), e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Compares the `two_way` tables (equal) and `usage_tables` (backup rows present on the primary).
pub async fn verify(config: &Config) -> Result<VerifyReport, Error> {
    let p = connect(&config.link(Site::Primary)?).await?;
    let b = connect(&config.link(Site::Backup)?).await?;
    let mut tables = Vec::new();
    let all = config
        .two_way
        .iter()
        .map(|t| (t, "two_way"))
        .chain(config.usage_tables.iter().map(|t| (t, "usage")));
    for (t, mode) in all {
        let name = qualify(t);
        let info = table_info(&p, Site::Primary, &name).await?;
        table_info(&b, Site::Backup, &name).await?;
        let pb = buckets(&p, Site::Primary, &name, &info.pk).await?;
        let bb = buckets(&b, Site::Backup, &name, &info.pk).await?;
        let primary_rows = pb.values().map(|v| v.0).sum();
        let backup_rows = bb.values().map(|v| v.0).sum();
        let differ: Vec<i32> = (0..BUCKETS).filter(|i| pb.get(i) != bb.get(i)).collect();
        let mut keys = Vec::new();
        if !differ.is_empty() {
            let pr = rows_in(&p, Site::Primary, &name, &info.pk, &differ).await?;
            let br = rows_in(&b, Site::Backup, &name, &info.pk, &differ).await?;
            for (k, h) in &br {
                if pr.get(k) != Some(h) {
                    keys.push(k.clone());
                }
            }
            if mode == "two_way" {
                keys.extend(pr.keys().filter(|k| !br.contains_key(*k)).cloned());
            }
            keys.sort();
        }
        let differing = keys.len();
        keys.truncate(MAX_KEYS);
        tables.push(TableReport {
            table: name,
            mode,
            primary_rows,
            backup_rows,
            differing_keys: keys,
            differing,
        });
    }
    Ok(VerifyReport { tables })
}
