//! `Deploy(path, strategy?, max_surge?, max_unavailable?, pause_after?)`:
//! install a module, or roll an installed one out to a new revision; and
//! `Rollback(name, to?)`, the same path back to a revision from history.

use std::path::PathBuf;

use module_runtime::manifest::Strategy;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::errors;
use super::list::ModuleSummary;
use crate::daemon::release::Overrides;
use crate::varlink::ErrorReply;

/// Parameters of `Deploy`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// A module directory or manifest, as seen by the daemon.
    pub path: PathBuf,
    /// The library to load instead of the manifest's `entry` (as for
    /// `Install`).
    #[serde(default)]
    pub entry: Option<PathBuf>,
    /// `surge` or `rolling`.
    #[serde(default)]
    pub strategy: Option<String>,
    /// Replicas allowed above the module's count.
    #[serde(default)]
    pub max_surge: Option<u32>,
    /// Replicas allowed below the module's count.
    #[serde(default)]
    pub max_unavailable: Option<u32>,
    /// Pause once this many new replicas are ready.
    #[serde(default)]
    pub pause_after: Option<u32>,
}

impl Deploy {
    /// The caller's rollout parameters, checked.
    pub fn overrides(&self) -> Result<Overrides, ErrorReply> {
        let strategy = match self.strategy.as_deref() {
            None => None,
            Some("surge") => Some(Strategy::Surge),
            Some("rolling") => Some(Strategy::Rolling),
            Some(other) => {
                return Err(super::invalid_input(format!(
                    "strategy `{other}`: expected `surge` or `rolling`"
                )))
            }
        };
        Ok(Overrides {
            strategy,
            max_surge: self.max_surge,
            max_unavailable: self.max_unavailable,
            pause_after: self.pause_after,
        })
    }
}

/// Parameters of `Rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// Module name.
    pub name: String,
    /// The revision to go back to (default: the one before the active one).
    #[serde(default)]
    pub to: Option<u64>,
}

/// Reply of `Deploy` and `Rollback`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeployReply {
    /// The module now.
    pub module: ModuleSummary,
    /// The revision deployed (or already active).
    pub revision: u64,
    /// Whether anything changes.
    pub changed: bool,
    /// `installed`, `unchanged`, `started`, `completed`, `aborted` or
    /// `rolled-back`.
    pub outcome: &'static str,
    /// Why it was aborted or rolled back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A rollout is in progress.
pub fn rollout_in_progress(name: &str, revision: u64, phase: &str) -> ErrorReply {
    ErrorReply::new(
        errors::ROLLOUT_IN_PROGRESS,
        json!({ "name": name, "revision": revision, "phase": phase }),
    )
}

/// No such revision.
pub fn revision_not_found(name: &str, revision: u64) -> ErrorReply {
    ErrorReply::new(
        errors::REVISION_NOT_FOUND,
        json!({ "name": name, "revision": revision }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_are_checked() {
        let d = |s: &str| Deploy {
            path: "/m".into(),
            entry: None,
            strategy: Some(s.into()),
            max_surge: None,
            max_unavailable: None,
            pause_after: Some(2),
        };
        assert_eq!(
            d("rolling").overrides().unwrap().strategy,
            Some(Strategy::Rolling)
        );
        assert_eq!(d("surge").overrides().unwrap().pause_after, Some(2));
        let e = d("blue-green").overrides().unwrap_err();
        assert_eq!(e.name, errors::INVALID_INPUT);
        assert!(e.parameters["reason"]
            .as_str()
            .unwrap()
            .contains("blue-green"));
    }
}
