//! The zygote: a single-threaded process, started by re-executing `emberd`
//! before any runtime thread exists, that loads the plugins and then only
//! forks workers on request.
//!
//! ```text
//! emberd (main thread, before tokio; PR_SET_CHILD_SUBREAPER)
//!   └─ spawn("/proc/self/exe --zygote FD PPID")  ── SOCK_SEQPACKET ──┐
//!        zygote: PR_SET_PDEATHSIG, load plugins, loop { Fork → fork_worker }
//!          └─ intermediate ─ fork() ─▶ worker, then exits
//!   └─ worker (re-parented to emberd; pidfd to emberd)
//! ```
//!
//! The link to the zygote is module-runtime's control transport with the
//! zygote's messages (`module_runtime::protocol::zygote`, docs/abi.md §4);
//! each `Forked` answer carries the worker's pid and two descriptors: its
//! pidfd and the supervisor's end of the worker's channel. The fork path
//! and why it is a double fork: `module_runtime::host::fork`.

pub mod client;
pub mod process;

pub use client::{spawn, ForkError, NewWorker, Zygote, ZygoteError, ZygoteProcess};
pub use module_runtime::host::fork::pidfd_open as fork_pidfd_open;
pub use module_runtime::protocol::{FromZygote, ToZygote};

/// The argument that puts `emberd` in zygote mode.
pub const ZYGOTE_ARG: &str = "--zygote";
