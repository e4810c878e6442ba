//! `Health()`: is the daemon well.

use serde::{Deserialize, Serialize};

use crate::cgroup::Mechanism;

/// Parameters of `Health` (none).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {}

/// Reply of `Health`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReply {
    /// The zygote and pool are alive.
    pub healthy: bool,
    /// emberd version.
    pub version: String,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// The zygote's pid.
    pub zygote_pid: i32,
    /// Installed modules.
    pub modules: usize,
    /// Modules running.
    pub running: usize,
    /// Modules failed or in crash loop.
    pub failed: usize,
    /// What enforces modules' `limits.memory`: `cgroup-v2`, `cgroup-v1` or
    /// `private-rss-watch`.
    pub memory_limits: Mechanism,
    /// What enforces modules' `limits.cpu`: `cgroup-v2`, `cgroup-v1` or
    /// `none`.
    pub cpu_limits: Mechanism,
    /// Descriptors emberd has open.
    pub open_files: u64,
    /// emberd's `RLIMIT_NOFILE` soft limit (raised to the hard one at
    /// start-up): where installs would start failing.
    pub open_files_limit: u64,
    /// The shared runtime this emberd offers slim modules.
    pub runtime_libs: crate::runtime_libs::RuntimeStatus,
}
