//! The fault switch: marks one component broken for partial-failure drills.

use std::sync::atomic::{AtomicBool, Ordering};

/// A part of the site that health checks probe separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Component {
    /// HTML pages and the process itself.
    Web,
    /// Meeting routes (API and pages).
    Meetings,
    /// The JSON API under `/api/`.
    Api,
    /// The database health check.
    Db,
}

impl Component {
    pub(crate) const ALL: [Component; 4] = [
        Component::Web,
        Component::Meetings,
        Component::Api,
        Component::Db,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Component::Web => "web",
            Component::Meetings => "meetings",
            Component::Api => "api",
            Component::Db => "db",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Component::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// Which components are marked broken; read on every request, so lock-free.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    broken: [AtomicBool; 4],
}

impl Faults {
    pub(crate) fn set(&self, c: Component, broken: bool) {
        self.broken[c as usize].store(broken, Ordering::Relaxed);
    }

    pub(crate) fn is_broken(&self, c: Component) -> bool {
        self.broken[c as usize].load(Ordering::Relaxed)
    }

    /// `{"broken": [...], "components": {"web": false, ...}}`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let broken: Vec<&str> = Component::ALL
            .into_iter()
            .filter(|c| self.is_broken(*c))
            .map(Component::name)
            .collect();
        let components: serde_json::Map<String, serde_json::Value> = Component::ALL
            .into_iter()
            .map(|c| (c.name().to_owned(), self.is_broken(c).into()))
            .collect();
        serde_json::json!({ "broken": broken, "components": components })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_exactly_one_component() {
        let f = Faults::default();
        f.set(Component::Meetings, true);
        for c in Component::ALL {
            assert_eq!(f.is_broken(c), c == Component::Meetings, "{c:?}");
        }
        assert_eq!(f.to_json()["broken"], serde_json::json!(["meetings"]));
        f.set(Component::Meetings, false);
        assert_eq!(f.to_json()["broken"], serde_json::json!([]));
    }

    #[test]
    fn names_round_trip() {
        for c in Component::ALL {
            assert_eq!(Component::parse(c.name()), Some(c));
        }
        assert_eq!(Component::parse("disk"), None);
    }
}
