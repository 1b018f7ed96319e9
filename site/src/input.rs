//! Reading request input: bodies (JSON or HTML forms) into named fields, query strings, paths.
//! Every rejection names the field, so a client knows what to fix.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use http::header;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::ApiError;

/// Largest request body accepted; larger ones get 413.
pub(crate) const MAX_BODY: usize = 1024 * 1024;

/// Reads the whole body, refusing more than `MAX_BODY` bytes.
pub(crate) async fn read_body(
    req: http::Request<Incoming>,
) -> Result<(http::request::Parts, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ApiError::PayloadTooLarge(MAX_BODY));
    }
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok((parts, collected.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge(MAX_BODY))
        }
        Err(e) => Err(ApiError::bad(format!("cannot read request body: {e}"))),
    }
}

/// Named input fields from a JSON object or an `application/x-www-form-urlencoded` form.
#[derive(Debug, Default)]
pub(crate) struct Fields {
    map: Map<String, Value>,
    /// Form values are all strings and an empty input means "not given"; JSON is typed.
    from_form: bool,
}

impl Fields {
    /// Parses a body by its content type (JSON unless it says form).
    pub(crate) fn parse(parts: &http::request::Parts, body: &[u8]) -> Result<Self, ApiError> {
        let is_form = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        // `curl -d '{...}'` labels JSON as a form; a real form never starts with `{`.
        let looks_json = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if is_form && !looks_json {
            let text =
                std::str::from_utf8(body).map_err(|_| ApiError::bad("form body is not UTF-8"))?;
            let map = parse_pairs(text)
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            return Ok(Fields {
                map,
                from_form: true,
            });
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad(
                "request body is empty: expected a JSON object",
            ));
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(Fields {
                map,
                from_form: false,
            }),
            Ok(_) => Err(ApiError::bad("request body must be a JSON object")),
            Err(e) => Err(ApiError::bad(format!("invalid JSON: {e}"))),
        }
    }

    fn value(&self, name: &str) -> Option<&Value> {
        match self.map.get(name) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if self.from_form && s.trim().is_empty() => None,
            Some(v) => Some(v),
        }
    }

    /// A string that must be present and not blank, at most `max` characters.
    pub(crate) fn required_str(&self, name: &str, max: usize) -> Result<String, ApiError> {
        self.optional_str(name, max)?
            .ok_or_else(|| ApiError::field(name, "is required"))
    }

    /// A string that may be absent; when given it must not be blank.
    pub(crate) fn optional_str(&self, name: &str, max: usize) -> Result<Option<String>, ApiError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::String(s)) => {
                let s = s.trim();
                if s.is_empty() {
                    Err(ApiError::field(name, "must not be empty"))
                } else if s.chars().count() > max {
                    Err(ApiError::field(
                        name,
                        format!("must be at most {max} characters"),
                    ))
                } else {
                    Ok(Some(s.to_owned()))
                }
            }
            Some(_) => Err(ApiError::field(name, "must be a string")),
        }
    }

    /// A string stored as given (may be empty, whitespace kept), e.g. a config value.
    pub(crate) fn required_text(&self, name: &str, max: usize) -> Result<String, ApiError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Err(ApiError::field(name, "is required")),
            Some(Value::String(s)) if s.chars().count() > max => Err(ApiError::field(
                name,
                format!("must be at most {max} characters"),
            )),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(ApiError::field(name, "must be a string")),
        }
    }

    pub(crate) fn required_uuid(&self, name: &str) -> Result<Uuid, ApiError> {
        self.optional_uuid(name)?
            .ok_or_else(|| ApiError::field(name, "is required"))
    }

    pub(crate) fn optional_uuid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::String(s)) => parse_uuid(name, s.trim()).map(Some),
            Some(_) => Err(ApiError::field(name, "must be a UUID string")),
        }
    }

    /// An integer in `range`; forms send it as text.
    pub(crate) fn optional_int(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>, ApiError> {
        let n = match self.value(name) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) if self.from_form => s.trim().parse().ok(),
            Some(_) => None,
        };
        match n {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::field(
                name,
                format!(
                    "must be an integer from {} to {}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    pub(crate) fn required_bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.value(name) {
            None => Err(ApiError::field(name, "is required")),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) if self.from_form && (s == "true" || s == "false") => {
                Ok(s == "true")
            }
            Some(_) => Err(ApiError::field(name, "must be true or false")),
        }
    }

    /// An RFC 3339 time; forms may send a `datetime-local` value (`2024-05-01T10:00`), read as UTC.
    pub(crate) fn optional_time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::String(s)) => parse_time(s.trim()).map(Some).ok_or_else(|| {
                ApiError::field(
                    name,
                    "must be an RFC 3339 time such as 2024-05-01T10:00:00Z",
                )
            }),
            Some(_) => Err(ApiError::field(name, "must be an RFC 3339 time string")),
        }
    }
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .map(|t| t.and_utc())
}

/// Parses a UUID from a path segment or field, naming `field` when it is not one.
pub(crate) fn parse_uuid(field: &str, s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::field(field, format!("{s:?} is not a valid UUID")))
}

/// Query string parameters (last one wins).
pub(crate) fn query_params(query: Option<&str>) -> HashMap<String, String> {
    query
        .map(parse_pairs)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// `?limit=` with a default and an upper bound.
pub(crate) fn limit_param(
    params: &HashMap<String, String>,
    default: i64,
    max: i64,
) -> Result<i64, ApiError> {
    match params.get("limit") {
        None => Ok(default),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::field(
                "limit",
                format!("must be an integer from 1 to {max}"),
            )),
        },
    }
}

fn parse_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as space in forms); invalid escapes are kept literally.
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: Option<&u8>) -> Option<u8> {
    (*b? as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c", true), "a b c");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("100%", true), "100%");
        assert_eq!(percent_decode("%zz%4", true), "%zz%4");
        assert_eq!(percent_decode("caf%C3%A9", false), "café");
    }

    #[test]
    fn query_and_limit() {
        let p = query_params(Some("limit=5&status=in_progress"));
        assert_eq!(limit_param(&p, 50, 500).unwrap(), 5);
        assert_eq!(p["status"], "in_progress");
        let bad = query_params(Some("limit=x"));
        let err = limit_param(&bad, 50, 500).unwrap_err();
        assert!(err.to_string().contains("`limit`"), "{err}");
    }

    #[test]
    fn times_accept_rfc3339_and_form_values() {
        assert!(parse_time("2024-05-01T10:00:00Z").is_some());
        assert!(parse_time("2024-05-01T10:00:00+02:00").is_some());
        assert!(parse_time("2024-05-01T10:00").is_some());
        assert!(parse_time("tomorrow").is_none());
    }
}
