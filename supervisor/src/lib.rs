//! The Ember supervisor: the library behind `emberd` and `emberctl`.
//!
//! `emberd` keeps a base warm (a single-threaded [`zygote`] that has loaded
//! the plugins and forks workers into a warm [`pool`]), runs modules in
//! those workers under a [`lifecycle`] with restart back-off, keeps the
//! [`store`]d desired state across restarts, and answers the Varlink
//! [`control`] socket. `emberctl` ([`ctl`]) drives it.
//!
//! ```no_run
//! // emberd's main, in short:
//! let opts = supervisor::daemon::Options::default();
//! supervisor::daemon::run(opts).expect("emberd");
//! ```
#![warn(missing_docs)]

pub mod activation;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod entry;
pub mod fscred;
pub mod input;
pub mod journal;
pub mod lifecycle;
pub mod link;
pub mod listeners;
pub mod manifest;
pub mod memwatch;
pub mod metrics;
pub mod notify;
pub mod oci;
pub mod paths;
pub mod plugins;
pub mod pool;
pub mod prom;
pub mod reaper;
pub mod rlimit;
pub mod runtime_libs;
pub mod sandbox;
pub mod store;
pub mod varlink;
pub mod worker;
pub mod zygote;

/// An error and its sources, joined by `": "`, for the one place an error
/// is finally shown (a reply, a log line, stderr).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
