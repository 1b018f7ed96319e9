//! COPY's binary format for the apply's large inserts: values arrive in their text form
//! (pgoutput, the change log), and for the few column types whose text form is read here
//! exactly as PostgreSQL's input function reads it, the target is sent the binary form
//! instead (no text input function to run in the target's backend: for the common
//! uuid/timestamptz rows, most of COPY's work there). A value in any other form (e.g.
//! `infinity`, a BC date, a year past 9999, a DateStyle other than ISO) makes the caller use
//! the text format for that COPY: never a guess.

use bytes::{BufMut, Bytes};

use crate::pgoutput::Text;

/// A target column type whose binary form is written from its text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinType {
    /// `text`, `character varying`: the bytes themselves (the target checks the encoding
    /// and a varchar's length as text input does).
    Text,
    Uuid,
    Int2,
    Int4,
    Int8,
    Bool,
    /// `timestamp with time zone`, as ISO DateStyle prints it (`2026-12-02 15:07:45.5+00`).
    Timestamptz,
    /// `timestamp without time zone`, as ISO DateStyle prints it.
    Timestamp,
}

impl BinType {
    /// The type of a target column named as `format_type(atttypid, NULL)` names it.
    pub(crate) fn of(ty: &str) -> Option<BinType> {
        Some(match ty {
            "text" | "character varying" => BinType::Text,
            "uuid" => BinType::Uuid,
            "smallint" => BinType::Int2,
            "integer" => BinType::Int4,
            "bigint" => BinType::Int8,
            "boolean" => BinType::Bool,
            "timestamp with time zone" => BinType::Timestamptz,
            "timestamp without time zone" => BinType::Timestamp,
            _ => return None,
        })
    }

    /// Appends the binary form of the text `v` (its length first), or returns false.
    fn put(self, out: &mut Vec<u8>, v: &[u8]) -> bool {
        match self {
            BinType::Text => {
                out.put_i32(v.len() as i32);
                out.extend_from_slice(v);
            }
            BinType::Uuid => {
                let Some(u) = uuid(v) else { return false };
                out.put_i32(16);
                out.extend_from_slice(&u);
            }
            BinType::Int2 => {
                let Some(n) = int::<i16>(v) else { return false };
                out.put_i32(2);
                out.put_i16(n);
            }
            BinType::Int4 => {
                let Some(n) = int::<i32>(v) else { return false };
                out.put_i32(4);
                out.put_i32(n);
            }
            BinType::Int8 => {
                let Some(n) = int::<i64>(v) else { return false };
                out.put_i32(8);
                out.put_i64(n);
            }
            BinType::Bool => {
                let b = match v {
                    b"t" => 1,
                    b"f" => 0,
                    _ => return false,
                };
                out.put_i32(1);
                out.put_u8(b);
            }
            BinType::Timestamptz | BinType::Timestamp => {
                let Some(us) = timestamp(v, self == BinType::Timestamptz) else {
                    return false;
                };
                out.put_i32(8);
                out.put_i64(us);
            }
        }
        true
    }
}

/// Rows (one array per column, of the column types `types`) in COPY's binary format; None
/// when a value is not in a form read here (the caller then uses the text format).
pub(crate) fn encode(cols: &[Vec<Option<Text>>], types: &[BinType]) -> Option<Bytes> {
    debug_assert_eq!(cols.len(), types.len());
    let rows = cols.first().map_or(0, Vec::len);
    let size: usize = cols
        .iter()
        .flatten()
        .map(|v| v.as_ref().map_or(0, |t| t.as_bytes().len()) + 4)
        .sum();
    let mut out = Vec::with_capacity(19 + size + 2 * rows + 2);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.put_i32(0); // flags
    out.put_i32(0); // header extension length
    for r in 0..rows {
        out.put_i16(cols.len() as i16);
        for (col, ty) in cols.iter().zip(types) {
            match &col[r] {
                None => out.put_i32(-1),
                Some(v) => {
                    if !ty.put(&mut out, v.as_bytes()) {
                        return None;
                    }
                }
            }
        }
    }
    out.put_i16(-1);
    Some(out.into())
}

/// The canonical form `uuid_out` prints (8-4-4-4-12 hex digits, either case).
fn uuid(v: &[u8]) -> Option<[u8; 16]> {
    if v.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut i = 0;
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if v[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        out[n] = (hex(v[i])? << 4) | hex(v[i + 1])?;
        n += 1;
        i += 2;
    }
    Some(out)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A plain decimal integer (an optional `-`, digits), as the integer output functions print.
fn int<T: std::str::FromStr>(v: &[u8]) -> Option<T> {
    let digits = v.strip_prefix(b"-").unwrap_or(v);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` and, with `tz`, an offset `+HH[:MM[:SS]]` (ISO DateStyle's
/// output), as microseconds since 2000-01-01 (UTC with `tz`).
fn timestamp(v: &[u8], tz: bool) -> Option<i64> {
    let num = |s: &[u8]| -> Option<u32> {
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(s.iter().fold(0u32, |a, &d| a * 10 + u32::from(d - b'0')))
    };
    if v.len() < 19
        || v[4] != b'-'
        || v[7] != b'-'
        || v[10] != b' '
        || v[13] != b':'
        || v[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(&v[0..4])?, num(&v[5..7])?, num(&v[8..10])?);
    let (h, mi, s) = (num(&v[11..13])?, num(&v[14..16])?, num(&v[17..19])?);
    let mut rest = &v[19..];
    let mut frac = 0u32;
    if let Some(f) = rest.strip_prefix(b".") {
        let n = f.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 6 {
            return None;
        }
        frac = num(&f[..n])? * 10u32.pow(6 - n as u32);
        rest = &f[n..];
    }
    let offset_s: i64 = if tz {
        let (sign, o) = match rest.split_first() {
            Some((b'+', o)) => (1, o),
            Some((b'-', o)) => (-1, o),
            _ => return None,
        };
        let mut parts = o.split(|&c| c == b':');
        let oh = parts.next().filter(|p| p.len() == 2).and_then(num)?;
        let om = match parts.next() {
            Some(p) if p.len() == 2 => num(p)?,
            Some(_) => return None,
            None => 0,
        };
        let os = match parts.next() {
            Some(p) if p.len() == 2 => num(p)?,
            Some(_) => return None,
            None => 0,
        };
        if parts.next().is_some() || om > 59 || os > 59 {
            return None;
        }
        sign * i64::from(oh * 3600 + om * 60 + os)
    } else {
        if !rest.is_empty() {
            return None;
        }
        0
    };
    if y == 0 || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(y as i32, mo, d)?;
    let at = date.and_hms_micro_opt(h, mi, s, frac)?;
    let unix_us = at.and_utc().timestamp_micros();
    Some(unix_us - PG_EPOCH_OFFSET_US - offset_s * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_in_the_forms_read_here() {
        assert_eq!(
            timestamp(b"2000-01-01 00:00:00+00", true),
            Some(0),
            "PostgreSQL's epoch"
        );
        assert_eq!(
            timestamp(b"2000-01-01 01:30:00.25+01:30", true),
            Some(250_000)
        );
        assert_eq!(
            timestamp(b"1999-12-31 23:59:59.999999-00:00:01", true),
            Some(999_999)
        );
        assert_eq!(
            timestamp(b"2026-12-02 15:07:45.5", false),
            Some(
                chrono::NaiveDate::from_ymd_opt(2026, 12, 2)
                    .unwrap()
                    .and_hms_milli_opt(15, 7, 45, 500)
                    .unwrap()
                    .and_utc()
                    .timestamp_micros()
                    - PG_EPOCH_OFFSET_US
            )
        );
        assert_eq!(
            uuid(b"0123ABCD-4567-89ab-cdef-0123456789ab"),
            Some([
                0x01, 0x23, 0xab, 0xcd, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67,
                0x89, 0xab
            ])
        );
        assert_eq!(int::<i32>(b"-42"), Some(-42));
        assert_eq!(
            int::<i16>(b"40000"),
            None,
            "out of range: text input's error"
        );
    }

    #[test]
    fn any_other_form_is_left_to_text_input() {
        for (v, tz) in [
            (&b"infinity"[..], true),
            (b"2026-12-02 15:07:45+00 BC", true),
            (b"12026-12-02 15:07:45+00", true),
            (b"2026-02-30 15:07:45+00", true),
            (b"2026-12-02 15:07:45", true),
            (b"2026-12-02 15:07:45+00", false),
            (b"2026-12-02 15:07:45.1234567+00", true),
            (b"2026-12-02 15:07:60+00", true),
            (b"2026-12-02T15:07:45+00", true),
            (b"Wed Dec 02 15:07:45 2026 UTC", true),
            (b"2026-12-02 15:07:45+5", true),
        ] {
            assert_eq!(timestamp(v, tz), None, "{}", String::from_utf8_lossy(v));
        }
        assert_eq!(uuid(b"{0123abcd-4567-89ab-cdef-0123456789ab}"), None);
        assert_eq!(uuid(b"0123abcd456789abcdef0123456789ab"), None);
        assert_eq!(int::<i32>(b"+1"), None);
        assert_eq!(int::<i32>(b" 1"), None);
        let col = vec![Some(Text::from("true"))];
        assert!(encode(&[col], &[BinType::Bool]).is_none());
    }

    /// Every form read here gives in the binary format exactly what PostgreSQL's text input
    /// gives for the same text (the target's session in another time zone than the values').
    #[tokio::test]
    async fn binary_copy_stores_what_text_input_stores() {
        use futures_util::SinkExt;
        let srv = tokio::task::spawn_blocking(gsb_tests::pg::PgServer::start)
            .await
            .unwrap();
        let c = srv.client("site").await;
        c.batch_execute(
            "SET TIME ZONE 'America/Los_Angeles';
             CREATE TABLE a (u uuid, tz timestamptz, ts timestamp, i2 smallint, i4 int,
                             i8 bigint, b boolean, t text, v varchar(12));
             CREATE TABLE b (LIKE a);",
        )
        .await
        .unwrap();
        use BinType as B;
        let types = [
            B::Uuid,
            B::Timestamptz,
            B::Timestamp,
            B::Int2,
            B::Int4,
            B::Int8,
            B::Bool,
            B::Text,
            B::Text,
        ];
        let rows: [[Option<&str>; 9]; 5] = [
            [
                Some("0123abcd-4567-89ab-cdef-0123456789AB"),
                Some("2026-12-02 15:07:45.123456+00"),
                Some("2026-12-02 15:07:45.123456"),
                Some("-32768"),
                Some("-2147483648"),
                Some("9223372036854775807"),
                Some("t"),
                Some("tab\there\nnew\\line ünï \u{1F600}"),
                Some("short"),
            ],
            [
                Some("00000000-0000-0000-0000-000000000000"),
                Some("1900-03-01 12:00:00-07:52:58"),
                Some("0001-01-01 00:00:00"),
                Some("32767"),
                Some("0"),
                Some("-9223372036854775808"),
                Some("f"),
                Some(""),
                Some("exactly12chr"),
            ],
            [
                None,
                Some("2000-02-29 23:59:59.9+05:30"),
                Some("9999-12-31 23:59:59.999999"),
                None,
                Some("2147483647"),
                None,
                None,
                None,
                None,
            ],
            [
                Some("ffffffff-ffff-ffff-ffff-ffffffffffff"),
                Some("0001-01-01 00:00:00+00"),
                Some("1999-12-31 23:59:59.5"),
                Some("7"),
                Some("-7"),
                Some("70"),
                Some("t"),
                Some("\\t"),
                Some(""),
            ],
            [
                Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
                Some("9999-12-31 23:59:59.999999-12:00"),
                Some("1970-01-01 00:00:00"),
                Some("1"),
                Some("1"),
                Some("1"),
                Some("f"),
                Some("x"),
                Some("y"),
            ],
        ];
        let cols: Vec<Vec<Option<Text>>> = (0..types.len())
            .map(|j| rows.iter().map(|r| r[j].map(Text::from)).collect())
            .collect();
        let data = encode(&cols, &types).expect("every value in a form read here");
        let sink = c
            .copy_in::<_, Bytes>("COPY a FROM STDIN (FORMAT binary)")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        sink.send(data).await.unwrap();
        sink.finish().await.unwrap();
        for r in &rows {
            c.execute(
                "INSERT INTO b VALUES ($1::text::uuid, $2::text::timestamptz, $3::text::timestamp, \
                 $4::text::int2, $5::text::int4, $6::text::int8, $7::text::bool, $8, $9)",
                &[&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6], &r[7], &r[8]],
            )
            .await
            .unwrap();
        }
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM ((TABLE a EXCEPT ALL TABLE b) \
                 UNION ALL (TABLE b EXCEPT ALL TABLE a)) d",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "rows differ between binary COPY and text input");
        let all: i64 = c
            .query_one("SELECT count(*) FROM a", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(all, rows.len() as i64);
    }
}
