//! `List()`: all installed modules.

use serde::{Deserialize, Serialize};

use crate::lifecycle::State;

/// Parameters of `List` (none).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct List {}

/// One module in `List` (and in `Install`'s reply).
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// The active (committed) revision.
    pub revision: u64,
    /// A rollout in progress.
    pub rollout: Option<RolloutSummary>,
}

/// A rollout in progress (`RolloutStatus` in the interface).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutSummary {
    /// The revision being rolled out.
    pub revision: u64,
    /// The revision it replaces.
    pub from_revision: u64,
    /// Its version.
    pub version: String,
    /// `surge` or `rolling`.
    pub strategy: &'static str,
    /// Replicas allowed above the count.
    pub max_surge: u32,
    /// Replicas allowed below the count.
    pub max_unavailable: u32,
    /// The canary size.
    pub pause_after: Option<u32>,
    /// `progressing`, `paused`, `draining`, `stabilizing`, `rolling-back`.
    pub phase: &'static str,
    /// Old replicas not exited.
    pub old_replicas: u32,
    /// New replicas launched.
    pub new_replicas: u32,
    /// New replicas ready.
    pub new_ready: u32,
    /// Why it rolls back.
    pub reason: Option<String>,
    /// Seconds since it began.
    pub seconds: f64,
}

/// Reply of `List`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListReply {
    /// Modules, by name.
    pub modules: Vec<ModuleSummary>,
}
