//! The zygote: a single-threaded process, started by re-executing `emberd`
//! before any runtime thread exists, that loads the plugins and then only
//! forks workers on request.
//!
//! ```text
//! emberd (main thread, before tokio; PR_SET_CHILD_SUBREAPER)
//!   └─ spawn("/proc/self/exe --zygote FD PPID")  ── SOCK_SEQPACKET ──┐
//!        zygote: PR_SET_PDEATHSIG, load plugins, loop { Fork → fork() }
//!          └─ intermediate ─ fork() ─▶ worker, then exits
//!   └─ worker (re-parented to emberd; pidfd to emberd)
//! ```
//!
//! Each `Fork` answer carries the worker's pid and two descriptors: its
//! pidfd and the supervisor's end of the worker's channel. The fork path
//! and why it is a double fork: `fork.rs`.

pub mod channel;
pub mod client;
mod fork;
pub mod process;

use serde::{Deserialize, Serialize};

pub use client::{spawn, ForkError, NewWorker, Zygote, ZygoteError, ZygoteProcess};
pub use fork::pidfd_open as fork_pidfd_open;

/// The argument that puts `emberd` in zygote mode.
pub const ZYGOTE_ARG: &str = "--zygote";

/// Supervisor to zygote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToZygote {
    /// First message: load these plugins.
    Hello {
        /// Plugins, in load order.
        plugins: Vec<crate::plugins::PluginSpec>,
    },
    /// Fork one worker.
    Fork {
        /// Echoed in the answer.
        id: u64,
    },
}

/// Zygote to supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromZygote {
    /// Plugins loaded; ready to fork.
    Ready {
        /// The zygote's pid.
        pid: i32,
        /// Plugins loaded.
        plugins: usize,
    },
    /// Plugins failed to load; the zygote exits.
    HelloFailed {
        /// Why.
        reason: String,
    },
    /// A worker exists. Descriptors: `[pidfd, channel]`.
    Forked {
        /// The request's id.
        id: u64,
        /// The worker's pid.
        pid: i32,
    },
    /// No worker could be forked.
    ForkFailed {
        /// The request's id.
        id: u64,
        /// Why.
        reason: String,
    },
}
