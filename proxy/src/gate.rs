//! The failback gate's reading of the replicator: a pure parser of the replicator's `GET /status`
//! answer into "N rows pending backup -> primary" or "unknown, because ...".
//!
//! Only an *active* replicator's counts are trusted: a standby (waiting on the advisory lock)
//! answers `"active": false` and has no current counts, and a missing, malformed or unreachable
//! answer says nothing about the backlog either. Anything but a trusted count keeps failback
//! blocked (until `failback_max_wait`), so users never return to a primary that may lack what they
//! wrote on the backup.

use serde_json::Value;

/// What the gate knows about the backup -> primary backlog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backlog {
    /// The active replicator reported this many rows waiting to go backup -> primary.
    Pending(u64),
    /// No answer the gate can trust; the text says why (status page, logs).
    Unknown(String),
}

impl Backlog {
    /// The state before the first poll.
    pub fn not_asked() -> Backlog {
        Backlog::Unknown("the replicator has not been asked yet".into())
    }

    /// True only for a trusted count of zero.
    pub fn is_drained(&self) -> bool {
        *self == Backlog::Pending(0)
    }

    /// The trusted count, if any.
    pub fn pending(&self) -> Option<u64> {
        match self {
            Backlog::Pending(n) => Some(*n),
            Backlog::Unknown(_) => None,
        }
    }

    /// Same reason to block (a count changing from 7 to 6 is not a new reason; a standby
    /// replacing a count is).
    pub fn same_cause(&self, other: &Backlog) -> bool {
        match (self, other) {
            (Backlog::Pending(a), Backlog::Pending(b)) => (*a == 0) == (*b == 0),
            (Backlog::Unknown(a), Backlog::Unknown(b)) => a == b,
            _ => false,
        }
    }
}

impl std::fmt::Display for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backlog::Pending(0) => {
                f.write_str("replication backup->primary drained (0 rows pending)")
            }
            Backlog::Pending(n) => write!(f, "{n} rows pending backup->primary"),
            Backlog::Unknown(why) => write!(f, "replication backlog unknown: {why}"),
        }
    }
}

/// Reads a replicator `/status` document (see `gsb-replicator`): trusts
/// `directions.backup_to_primary.pending_rows` only when `active` is `true`.
pub fn parse_status(v: &Value) -> Backlog {
    let unknown = |why: &str| Backlog::Unknown(why.to_owned());
    let Some(obj) = v.as_object() else {
        return unknown("the replicator's answer is not a JSON object");
    };
    match obj.get("active") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            return unknown(
                "the replicator answering is a standby (active=false): it has no current \
                 backlog; check that the active replicator runs",
            )
        }
        None => return unknown(
            "the replicator's answer has no `active` field; is replicator_status a gsb replicator?",
        ),
        Some(other) => {
            return Backlog::Unknown(format!(
                "the replicator's `active` is {other}, expected true or false"
            ))
        }
    }
    match v.pointer("/directions/backup_to_primary/pending_rows") {
        Some(p) => match p.as_u64() {
            Some(n) => Backlog::Pending(n),
            None if p.is_null() => unknown(
                "the active replicator has not counted directions.backup_to_primary.pending_rows yet",
            ),
            None => Backlog::Unknown(format!(
                "directions.backup_to_primary.pending_rows is {p}, expected a count >= 0"
            )),
        },
        None => unknown("the active replicator's answer has no directions.backup_to_primary.pending_rows"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(active: Value, pending: Value) -> Value {
        json!({"active": active, "directions": {
            "backup_to_primary": {"pending_rows": pending},
            "primary_to_backup": {"pending_rows": 0}}})
    }

    #[test]
    fn an_active_replicator_is_trusted() {
        assert_eq!(
            parse_status(&status(json!(true), json!(7))),
            Backlog::Pending(7)
        );
        let drained = parse_status(&status(json!(true), json!(0)));
        assert!(drained.is_drained());
    }

    #[test]
    fn a_standby_is_never_trusted_even_with_zero() {
        let b = parse_status(&status(json!(false), json!(0)));
        assert!(!b.is_drained());
        assert!(
            matches!(&b, Backlog::Unknown(why) if why.contains("standby")),
            "{b:?}"
        );
        // The replicator's standby shape: no counts at all.
        let b = parse_status(&json!({"active": false, "directions": {
            "backup_to_primary": {"pending_rows": null}}}));
        assert!(
            matches!(&b, Backlog::Unknown(why) if why.contains("standby")),
            "{b:?}"
        );
    }

    #[test]
    fn malformed_answers_are_unknown_and_say_why() {
        let cases = [
            (json!([1, 2]), "not a JSON object"),
            (
                json!({"directions": {"backup_to_primary": {"pending_rows": 0}}}),
                "no `active`",
            ),
            (status(json!("yes"), json!(0)), "`active` is \"yes\""),
            (status(json!(true), json!(null)), "not counted"),
            (status(json!(true), json!(-3)), "is -3"),
            (status(json!(true), json!("0")), "is \"0\""),
            (json!({"active": true}), "no directions"),
        ];
        for (doc, want) in cases {
            match parse_status(&doc) {
                Backlog::Unknown(why) => assert!(why.contains(want), "{doc}: {why}"),
                other => panic!("{doc}: trusted {other:?}"),
            }
        }
    }

    #[test]
    fn causes() {
        let p = Backlog::Pending;
        assert!(p(7).same_cause(&p(6)));
        assert!(!p(7).same_cause(&p(0)));
        assert!(!p(7).same_cause(&Backlog::not_asked()));
        assert!(Backlog::not_asked().same_cause(&Backlog::not_asked()));
    }
}
