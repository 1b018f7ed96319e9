//! Decoder of the `pgoutput` logical decoding messages (protocol version 1, text values):
//! Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate, Message. Pure:
//! bytes in, typed messages out; values are [`Text`], which the apply sends on as `text`.

use bytes::{Buf, Bytes, BytesMut};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A decoding error: the message and what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("pgoutput: {0}")]
pub struct DecodeError(pub String);

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value the server did not send: leave the column as it is.
    UnchangedToast,
    /// The value in its text form.
    Text(Text),
}

/// A value's text form: checked to be UTF-8 once, when it arrives, then shared without a copy
/// (a slice of the message it came in: a clone is a reference count). Sent to PostgreSQL as
/// `text` (its binary form is its bytes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Text(Bytes);

impl Text {
    /// `b` as text, if it is UTF-8.
    pub fn new(b: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&b)?;
        Ok(Text(b))
    }

    /// The text (checked again: for the rare paths that need a `str`, e.g. JSON).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text(Bytes::from(s))
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl ToSql for Text {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Text {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Text::new(Bytes::copy_from_slice(raw))?)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

/// A column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Part of the replica identity (the primary key by default).
    pub key: bool,
    /// Type OID on the source.
    pub type_oid: u32,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// A transaction starts; `commit_ts_us` is its commit time in Unix microseconds.
    Begin {
        /// LSN of the commit record.
        final_lsn: u64,
        /// Commit time, Unix microseconds.
        commit_ts_us: i64,
        /// Source transaction id.
        xid: u32,
    },
    /// The transaction ends; `end_lsn` is where the next one may start (the restart point).
    Commit {
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End of the commit record.
        end_lsn: u64,
        /// Commit time, Unix microseconds.
        commit_ts_us: i64,
    },
    /// The transaction was applied under replication origin `name` (PG15 sends it for each
    /// such transaction; gsb's apply sessions run under one: an echo).
    Origin {
        /// Origin's LSN of the commit.
        lsn: u64,
        /// Origin name.
        name: String,
    },
    /// Describes a relation before its first change in the stream (and after DDL).
    Relation {
        /// Relation OID on the source.
        oid: u32,
        /// Schema.
        namespace: String,
        /// Table name.
        name: String,
        /// Columns in order.
        columns: Vec<Column>,
    },
    /// A type description (ignored: values come as text).
    Type,
    /// An inserted row.
    Insert {
        /// Relation OID.
        oid: u32,
        /// The new row.
        new: Vec<Value>,
    },
    /// An updated row; `old_key` is sent only when the key changed (or REPLICA IDENTITY FULL).
    Update {
        /// Relation OID.
        oid: u32,
        /// The old key (or old row), when sent.
        old_key: Option<Vec<Value>>,
        /// The new row (unchanged TOAST columns as [`Value::UnchangedToast`]).
        new: Vec<Value>,
    },
    /// A deleted row: its key.
    Delete {
        /// Relation OID.
        oid: u32,
        /// The key columns (others Null).
        old_key: Vec<Value>,
    },
    /// TRUNCATE (the publication excludes it; kept so a stray one is reported).
    Truncate,
    /// A logical decoding message (not requested; ignored).
    Message,
}

struct Rd(Bytes);

impl Rd {
    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.0.remaining() < n {
            Err(DecodeError(format!("truncated {what}")))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }
    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        self.need(2, what)?;
        Ok(self.0.get_i16())
    }
    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.0.get_i32())
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.0.get_u64())
    }
    fn ts(&mut self, what: &str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.0.get_i64() + PG_EPOCH_OFFSET_US)
    }
    fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let pos = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError(format!("unterminated string in {what}")))?;
        let s = String::from_utf8(self.0.split_to(pos).to_vec())
            .map_err(|_| DecodeError(format!("invalid UTF-8 in {what}")))?;
        self.0.advance(1);
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.i16("tuple column count")?;
        let mut v = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            v.push(match self.u8("tuple column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.i32("text value length")?;
                    if len < 0 {
                        return Err(DecodeError(format!("negative value length {len}")));
                    }
                    self.need(len as usize, "text value")?;
                    let b = self.0.split_to(len as usize);
                    Value::Text(
                        Text::new(b)
                            .map_err(|_| DecodeError("invalid UTF-8 in a text value".into()))?,
                    )
                }
                b'b' => return Err(DecodeError("binary value, but text was requested".into())),
                k => return Err(DecodeError(format!("unknown tuple column kind {k:#x}"))),
            });
        }
        Ok(v)
    }
}

/// Whether the message is a row change (Insert, Update or Delete), by its tag alone.
pub fn is_row_change(data: &[u8]) -> bool {
    matches!(data.first(), Some(b'I' | b'U' | b'D'))
}

/// Decodes one pgoutput message.
pub fn decode(data: Bytes) -> Result<Msg, DecodeError> {
    let mut r = Rd(data);
    let tag = r.u8("message tag")?;
    Ok(match tag {
        b'B' => Msg::Begin {
            final_lsn: r.u64("Begin")?,
            commit_ts_us: r.ts("Begin")?,
            xid: r.u32("Begin")?,
        },
        b'C' => {
            let _flags = r.u8("Commit")?;
            Msg::Commit {
                commit_lsn: r.u64("Commit")?,
                end_lsn: r.u64("Commit")?,
                commit_ts_us: r.ts("Commit")?,
            }
        }
        b'O' => Msg::Origin {
            lsn: r.u64("Origin")?,
            name: r.cstr("Origin")?,
        },
        b'R' => {
            let oid = r.u32("Relation")?;
            let namespace = r.cstr("Relation")?;
            let name = r.cstr("Relation")?;
            let _replident = r.u8("Relation")?;
            let n = r.i16("Relation")?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8("Relation column")?;
                let cname = r.cstr("Relation column")?;
                let type_oid = r.u32("Relation column")?;
                let _typmod = r.i32("Relation column")?;
                columns.push(Column {
                    name: cname,
                    key: flags & 1 == 1,
                    type_oid,
                });
            }
            Msg::Relation {
                oid,
                namespace,
                name,
                columns,
            }
        }
        b'Y' => Msg::Type,
        b'I' => {
            let oid = r.u32("Insert")?;
            match r.u8("Insert")? {
                b'N' => {}
                k => return Err(DecodeError(format!("Insert: expected N, got {k:#x}"))),
            }
            Msg::Insert {
                oid,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let oid = r.u32("Update")?;
            let mut old_key = None;
            let mut k = r.u8("Update")?;
            if k == b'K' || k == b'O' {
                old_key = Some(r.tuple()?);
                k = r.u8("Update")?;
            }
            if k != b'N' {
                return Err(DecodeError(format!("Update: expected N, got {k:#x}")));
            }
            Msg::Update {
                oid,
                old_key,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let oid = r.u32("Delete")?;
            match r.u8("Delete")? {
                b'K' | b'O' => {}
                k => return Err(DecodeError(format!("Delete: expected K or O, got {k:#x}"))),
            }
            Msg::Delete {
                oid,
                old_key: r.tuple()?,
            }
        }
        b'T' => Msg::Truncate,
        b'M' => Msg::Message,
        t => return Err(DecodeError(format!("unknown message tag {t:#x}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn tuple(b: &mut Vec<u8>, vals: &[Option<&str>], toast_at: Option<usize>) {
        b.put_i16(vals.len() as i16);
        for (i, v) in vals.iter().enumerate() {
            if Some(i) == toast_at {
                b.put_u8(b'u');
            } else if let Some(s) = v {
                b.put_u8(b't');
                b.put_i32(s.len() as i32);
                b.put_slice(s.as_bytes());
            } else {
                b.put_u8(b'n');
            }
        }
    }

    #[test]
    fn begin_commit_origin() {
        let mut b = vec![b'B'];
        b.put_u64(0x10);
        b.put_i64(1_000_000); // one second after 2000-01-01
        b.put_u32(77);
        assert_eq!(
            decode(b.into()).unwrap(),
            Msg::Begin {
                final_lsn: 0x10,
                commit_ts_us: PG_EPOCH_OFFSET_US + 1_000_000,
                xid: 77
            }
        );
        let mut b = vec![b'C', 0];
        b.put_u64(0x10);
        b.put_u64(0x20);
        b.put_i64(0);
        assert_eq!(
            decode(b.into()).unwrap(),
            Msg::Commit {
                commit_lsn: 0x10,
                end_lsn: 0x20,
                commit_ts_us: PG_EPOCH_OFFSET_US
            }
        );
        let mut b = vec![b'O'];
        b.put_u64(5);
        b.put_slice(b"gsb_backup\0");
        assert_eq!(
            decode(b.into()).unwrap(),
            Msg::Origin {
                lsn: 5,
                name: "gsb_backup".into()
            }
        );
    }

    #[test]
    fn relation_and_changes_with_unchanged_toast() {
        let mut b = vec![b'R'];
        b.put_u32(16384);
        b.put_slice(b"public\0users\0d");
        b.put_i16(2);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(23);
        b.put_i32(-1);
        b.put_u8(0);
        b.put_slice(b"bio\0");
        b.put_u32(25);
        b.put_i32(-1);
        let Msg::Relation { columns, name, .. } = decode(b.into()).unwrap() else {
            panic!()
        };
        assert_eq!(name, "users");
        assert!(columns[0].key && !columns[1].key);
        let mut b = vec![b'U'];
        b.put_u32(16384);
        b.put_u8(b'N');
        tuple(&mut b, &[Some("1"), None], Some(1));
        assert_eq!(
            decode(b.into()).unwrap(),
            Msg::Update {
                oid: 16384,
                old_key: None,
                new: vec![Value::Text("1".into()), Value::UnchangedToast]
            }
        );
        let mut b = vec![b'U'];
        b.put_u32(16384);
        b.put_u8(b'K');
        tuple(&mut b, &[Some("1"), None], None);
        b.put_u8(b'N');
        tuple(&mut b, &[Some("2"), Some("x")], None);
        let Msg::Update { old_key, .. } = decode(b.into()).unwrap() else {
            panic!()
        };
        assert_eq!(old_key.unwrap()[0], Value::Text("1".into()));
        let mut b = vec![b'D'];
        b.put_u32(16384);
        b.put_u8(b'K');
        tuple(&mut b, &[Some("2"), None], None);
        assert!(matches!(decode(b.into()).unwrap(), Msg::Delete { .. }));
    }

    #[test]
    fn truncated_and_unknown_messages_are_errors() {
        assert!(decode(Bytes::from_static(b"B\0\0")).is_err());
        assert!(decode(Bytes::from_static(b"Z")).is_err());
        let mut b = vec![b'I'];
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(10);
        b.put_slice(b"abc");
        assert_eq!(
            decode(b.into()).unwrap_err(),
            DecodeError("truncated text value".into())
        );
    }
}
