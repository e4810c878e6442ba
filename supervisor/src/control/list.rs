//! `List()`: all installed modules.

use serde::{Deserialize, Serialize};

use crate::lifecycle::State;

/// Parameters of `List` (none).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct List {}

/// One module in `List` (and in `Install`'s reply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleSummary {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Lifecycle state.
    pub state: State,
    /// The first replica's worker pid while one runs.
    pub pid: Option<i32>,
    /// Every running replica's pid.
    pub pids: Vec<i32>,
    /// Replicas.
    pub replicas: u32,
    /// Restarts so far, all replicas.
    pub restarts: u64,
}

/// Reply of `List`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListReply {
    /// Modules, by name.
    pub modules: Vec<ModuleSummary>,
}
