//! `Rollout(name, action)`: pause, resume or abort a rollout in progress.

use serde::Deserialize;
use serde_json::json;

use super::errors;
use crate::varlink::ErrorReply;

/// Parameters of `Rollout`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Module name.
    pub name: String,
    /// What to do: `pause`, `resume` or `abort`.
    pub action: String,
}

impl Rollout {
    /// The action, checked.
    pub fn action(&self) -> Result<Action, ErrorReply> {
        match self.action.as_str() {
            "pause" => Ok(Action::Pause),
            "resume" => Ok(Action::Resume),
            "abort" => Ok(Action::Abort),
            other => Err(super::invalid_input(format!(
                "action `{other}`: expected `pause`, `resume` or `abort`"
            ))),
        }
    }
}

/// What `Rollout` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hold: no replica is started or stopped until resumed.
    Pause,
    /// Go on (after `pause_after`, or a pause).
    Resume,
    /// Stop the new revision's replicas; the old ones keep serving.
    Abort,
}

/// The module has no rollout in progress.
pub fn no_rollout(name: &str) -> ErrorReply {
    ErrorReply::new(errors::NO_ROLLOUT, json!({ "name": name }))
}
