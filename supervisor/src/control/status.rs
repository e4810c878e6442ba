//! `Status(name)`: one module in detail.

use serde::{Deserialize, Serialize};

use crate::cgroup::{Detection, Limits, Mechanism};
use crate::config::{LimitSource, LimitSources};
use crate::lifecycle::State;
use crate::metrics::Memory;

/// Parameters of `Status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Module name.
    pub name: String,
}

/// One module in detail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleStatus {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Lifecycle state.
    pub state: State,
    /// Why it (the first replica in trouble) is failed or backing off.
    pub reason: Option<String>,
    /// The first replica's worker pid while one runs.
    pub pid: Option<i32>,
    /// Restarts so far, all replicas.
    pub restarts: u64,
    /// Last failure seen (first replica that has one).
    pub last_error: Option<String>,
    /// Artifact hash.
    pub artifact_sha256: String,
    /// Bound listeners.
    pub listeners: Vec<ListenerStatus>,
    /// Seconds since the last replica state change.
    pub state_seconds: f64,
    /// Worker memory, summed over replicas.
    pub memory: Option<Memory>,
    /// Worker CPU seconds, summed over replicas.
    pub cpu_seconds: Option<f64>,
    /// Imported services and whether every running replica has a channel
    /// to a running exporter of the same version (`wired`) or not
    /// (`waiting`, with why).
    pub imports: Vec<ImportStatus>,
    /// Its limits and what enforces them.
    pub limits: LimitsStatus,
    /// Each replica.
    pub replicas: Vec<ReplicaStatus>,
    /// The active (committed) revision.
    pub revision: u64,
    /// A rollout in progress.
    pub rollout: Option<super::list::RolloutSummary>,
}

/// A module's effective limits, where each comes from and what enforces
/// it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitsStatus {
    /// `limits.memory`, in bytes.
    pub memory_bytes: Option<u64>,
    /// Where it comes from: `manifest`, `config` (the daemon's default) or
    /// `none`.
    pub memory_source: LimitSource,
    /// What enforces it (`none` without a limit).
    pub memory_mechanism: Mechanism,
    /// `limits.cpu`, in cores.
    pub cpu_cores: Option<f64>,
    /// Where it comes from.
    pub cpu_source: LimitSource,
    /// What enforces it (`none` without a limit or a usable controller).
    pub cpu_mechanism: Mechanism,
    /// The workers' descriptor cap (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
    /// Where it comes from (`config` or `none`).
    pub open_files_source: LimitSource,
}

impl LimitsStatus {
    /// A module's effective limits and their sources under what was
    /// detected.
    pub fn new(limits: Limits, sources: LimitSources, detected: &Detection) -> Self {
        Self {
            memory_bytes: limits.memory,
            memory_source: sources.memory,
            memory_mechanism: if limits.memory.is_some() {
                detected.memory_mechanism()
            } else {
                Mechanism::None
            },
            cpu_cores: limits.cpu,
            cpu_source: sources.cpu,
            cpu_mechanism: if limits.cpu.is_some() {
                detected.cpu_mechanism()
            } else {
                Mechanism::None
            },
            open_files: limits.open_files,
            open_files_source: sources.open_files,
        }
    }
}

/// One replica of a module.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaStatus {
    /// Replica number.
    pub replica: u32,
    /// The revision it runs.
    pub revision: u64,
    /// Lifecycle state.
    pub state: State,
    /// Why it is failed or backing off.
    pub reason: Option<String>,
    /// Worker pid while one runs.
    pub pid: Option<i32>,
    /// Restarts so far.
    pub restarts: u64,
    /// Last failure seen.
    pub last_error: Option<String>,
    /// Seconds in the current state.
    pub state_seconds: f64,
    /// Worker memory.
    pub memory: Option<Memory>,
    /// Worker CPU seconds.
    pub cpu_seconds: Option<f64>,
    /// The worker's cgroup directories (emberd's own), while it runs in one.
    pub cgroups: Vec<String>,
    /// Its sandbox as the worker reported it (once it applied it).
    pub sandbox: Option<SandboxStatus>,
}

/// One worker's sandbox, each layer with what enforces it, as the worker
/// read it back after applying it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxStatus {
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// `own-uid` (the module's own uid and gid), `emberd-uid` (emberd is
    /// not root: the module runs as emberd) or `none` (sandbox off).
    pub uid_mechanism: &'static str,
    /// `PR_SET_NO_NEW_PRIVS` is set.
    pub no_new_privs: bool,
    /// The process is dumpable (ptrace-able by its uid, core dumps).
    pub dumpable: bool,
    /// The seccomp filter in force (`seccomp-bpf: …`), or `none …`.
    pub seccomp: String,
    /// The Landlock ABI in force (`landlock ABI 7`), or `none (why)`.
    pub filesystem: String,
    /// The paths the module may write (its manifest's `[sandbox]
    /// writable`, as the worker opened them), besides `/dev/null`,
    /// `/dev/zero` and `/dev/full`.
    pub writable: Vec<String>,
}

impl SandboxStatus {
    /// From a worker's report; `enabled`: the sandbox is on.
    pub fn new(r: &crate::worker::SandboxReport, enabled: bool) -> Self {
        Self {
            uid: r.uid,
            gid: r.gid,
            uid_mechanism: match (enabled, r.own_ids) {
                (false, _) => "none",
                (true, true) => "own-uid",
                (true, false) => "emberd-uid",
            },
            no_new_privs: r.no_new_privs,
            dumpable: r.dumpable,
            seccomp: r.seccomp.clone(),
            filesystem: r.landlock.clone(),
            writable: r.writable.iter().map(|p| p.display().to_string()).collect(),
        }
    }
}

/// Reply of `Status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReply {
    /// The module.
    pub status: ModuleStatus,
}

/// A bound listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerStatus {
    /// Its name in the manifest.
    pub name: String,
    /// The address bound (`host:port` or `unix:/path`).
    pub address: String,
}

/// One imported service of a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportStatus {
    /// Service name.
    pub name: String,
    /// The schema version imported; only an export of this version is
    /// wired to it.
    pub version: u32,
    /// `wired` or `waiting`.
    pub state: String,
    /// The installed module exporting it at that version, if any.
    pub exporter: Option<String>,
    /// Why it is `waiting` (no exporter, another version exported, not
    /// every replica wired yet).
    pub reason: Option<String>,
}
