//! `Events(name)`: follow what happens in emberd (needs `more`).

use serde::Deserialize;

/// Parameters of `Events`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Events {
    /// Only events about this module (pool and zygote events are about
    /// none and left out too); all events if not given.
    pub name: Option<String>,
}

impl Events {
    /// Whether an event about `module` (`None`: about no module) passes
    /// the filter.
    pub fn wants(&self, module: Option<&str>) -> bool {
        self.name.as_deref().is_none_or(|n| module == Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_filter() {
        let all = Events { name: None };
        assert!(all.wants(Some("a")) && all.wants(None));
        let a = Events {
            name: Some("a".into()),
        };
        assert!(a.wants(Some("a")));
        assert!(!a.wants(Some("b")) && !a.wants(None));
    }
}
