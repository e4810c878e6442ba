//! The worker control protocol as the supervisor speaks it, and the
//! stand-in worker body that runs until module-runtime's worker is wired in.
//!
//! The messages mirror module-runtime's `protocol` (docs/abi.md §4) one for
//! one — `Idle`, `Launch` with descriptor grants, `Transition`, `Failed`,
//! `Log`, `Stop` — so that wiring the real worker changes the encoding (this
//! crate's JSON packets → module-runtime's `EMBW` frames) in one place
//! ([`crate::daemon::os::WorkerLink`] and [`run`]) and nothing else.
//!
//! A worker is forked by the zygote with exactly four descriptors: stdin
//! (`/dev/null`), stdout and stderr (the daemon's until a [`GrantKind::Stdio`]
//! grant redirects them) and its channel to the supervisor at fd 3.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::zygote::channel::{self, ChannelError};

/// The descriptor number of the worker's channel after the fork.
pub const CHANNEL_FD: i32 = 3;

/// What a grant's descriptors are (module-runtime `abi::GrantKind`, plus
/// `Stdio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    /// A bound listening socket (1 fd).
    Listener,
    /// Client end of an imported service (2 fds: memfd, socket).
    Import,
    /// Server end of an exported service (2 fds).
    Export,
    /// Sealed shared data (1 memfd).
    SharedData,
    /// The module's log file (1 fd), to become its stdout and stderr.
    /// Supervisor extension: module-runtime's protocol has no such kind yet.
    Stdio,
}

impl GrantKind {
    /// Descriptors a grant of this kind carries.
    pub fn fd_count(self) -> usize {
        match self {
            GrantKind::Import | GrantKind::Export => 2,
            _ => 1,
        }
    }
}

/// One descriptor grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// What it is.
    pub kind: GrantKind,
    /// Its name from the manifest.
    pub name: String,
}

/// Everything a warm worker needs to become an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchOrder {
    /// The module's `cdylib`, inside the state directory.
    pub artifact: PathBuf,
    /// The manifest text.
    pub manifest: String,
    /// Which replica this is.
    pub replica: u32,
    /// Descriptor grants, in the order of the attached descriptors.
    pub grants: Vec<Grant>,
}

/// Supervisor to worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToWorker {
    /// Run a module; the grants' descriptors are attached.
    Launch(LaunchOrder),
    /// Stop within the deadline.
    Stop {
        /// Milliseconds the module gets to wind down.
        deadline_ms: u64,
    },
}

/// Where a launched worker is (module-runtime `protocol::State`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Reading the artifact.
    Loading,
    /// Loaded and checked.
    Loaded,
    /// `start` running.
    Starting,
    /// The module said it is ready.
    Ready,
    /// `serve` running.
    Serving,
    /// Winding down.
    Stopping,
    /// Done; the process exits next.
    Stopped,
}

/// Where a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Reading the launch order.
    Launch,
    /// Loading the artifact.
    Load,
    /// `start`.
    Start,
    /// `serve`.
    Serve,
    /// `stop`.
    Stop,
}

/// What failed (module-runtime `protocol::FailureKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The order could not be read.
    BadLaunchOrder,
    /// Not a loadable artifact for this host.
    BadArtifact,
    /// The dynamic loader refused it.
    DlopenFailed,
    /// No module descriptor symbol.
    MissingSymbol,
    /// Built for another ABI or SDK.
    AbiMismatch,
    /// The module returned an error.
    ModuleError,
    /// The module panicked.
    Panic,
    /// Not ready within the start deadline.
    NeverReady,
    /// Did not stop within the deadline.
    StopDeadlineExceeded,
    /// Grew past its memory limit.
    MemoryLimitExceeded,
    /// Killed by a fatal signal.
    Crashed,
}

impl FailureKind {
    /// Whether restarting cannot help: the artifact itself is unusable.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            FailureKind::BadLaunchOrder
                | FailureKind::BadArtifact
                | FailureKind::DlopenFailed
                | FailureKind::MissingSymbol
                | FailureKind::AbiMismatch
        )
    }
}

/// Worker to supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromWorker {
    /// Warm and waiting; sent once, first.
    Idle {
        /// The worker's pid.
        pid: u32,
        /// Module ABI version it speaks.
        abi_version: u32,
        /// Its SDK version.
        sdk_version: String,
    },
    /// Progress of the launched module.
    Transition {
        /// New state.
        state: WorkerState,
        /// Details.
        detail: String,
    },
    /// The instance failed; the worker exits next.
    Failed {
        /// Where.
        stage: Stage,
        /// What.
        kind: FailureKind,
        /// Why.
        message: String,
    },
    /// A log record of the module.
    Log {
        /// 1 error … 5 trace.
        level: u8,
        /// Its target.
        target: String,
        /// The message.
        message: String,
    },
}

/// Exit code for a worker whose order or channel failed.
pub const EXIT_LAUNCH: i32 = 10;
/// Exit code after a load failure.
pub const EXIT_LOAD: i32 = 11;
/// Exit code when the module was never ready.
pub const EXIT_NEVER_READY: i32 = 15;

/// The body of a worker, called in the forked child with its channel at
/// [`CHANNEL_FD`]; returns its exit code.
///
/// Seam: when module-runtime is wired, the zygote's fork path calls
/// `module_runtime::host::worker::run(channel, Some(supervisor_pid))`
/// (which never returns) instead of this function.
pub fn run(channel: OwnedFd) -> i32 {
    let idle = FromWorker::Idle {
        pid: std::process::id(),
        abi_version: 0,
        sdk_version: format!("placeholder-{}", env!("CARGO_PKG_VERSION")),
    };
    if channel::send(&channel, &idle, &[]).is_err() {
        return EXIT_LAUNCH;
    }
    let (order, fds) = match channel::recv::<ToWorker>(&channel) {
        Ok((ToWorker::Launch(o), fds)) => (o, fds),
        // Retired while idle.
        Ok((ToWorker::Stop { .. }, _)) | Err(ChannelError::Closed) => return 0,
        Err(_) => return EXIT_LAUNCH,
    };
    let send = |m: FromWorker| {
        // If the supervisor is gone, PR_SET_PDEATHSIG ends us anyway.
        let _ = channel::send(&channel, &m, &[]);
    };
    let mut fds = fds.into_iter();
    for g in &order.grants {
        let mine: Vec<OwnedFd> = fds.by_ref().take(g.kind.fd_count()).collect();
        if g.kind == GrantKind::Stdio {
            if let Some(log) = mine.first() {
                redirect_output(log);
            }
            continue;
        }
        // Other grants would be handed to the module; the stand-in keeps
        // them open for the instance's life (a listener stays shared).
        std::mem::forget(mine);
    }
    let code = placeholder_module(&order, &send);
    if code != 0 {
        return code;
    }
    // Serve until told to stop (SIGTERM's default action also ends us).
    loop {
        match channel::recv::<ToWorker>(&channel) {
            Ok((ToWorker::Stop { .. }, _)) | Err(_) => {
                send(FromWorker::Transition {
                    state: WorkerState::Stopped,
                    detail: "stop requested".into(),
                });
                return 0;
            }
            Ok((ToWorker::Launch(_), _)) => continue,
        }
    }
}

fn redirect_output(log: &OwnedFd) {
    for target in [1, 2] {
        // SAFETY: `log` is a valid open descriptor we own; dup2 onto 1 and 2
        // replaces our stdout/stderr, which no Rust object owns as OwnedFd.
        unsafe {
            libc::dup2(log.as_raw_fd(), target);
        }
    }
}

/// Stand-in for module-runtime's loader: the artifact is not loaded. Test
/// artifacts whose text starts with `placeholder:` pick a behaviour, so the
/// supervisor's failure handling can be exercised end to end before real
/// modules exist: `placeholder: never-ready`, `placeholder: fail`,
/// `placeholder: exit N`, `placeholder: ignores-stop` (SIGTERM ignored).
pub fn placeholder_module(order: &LaunchOrder, send: &dyn Fn(FromWorker)) -> i32 {
    let transition = |state, detail: &str| {
        send(FromWorker::Transition {
            state,
            detail: detail.into(),
        })
    };
    transition(WorkerState::Loading, &order.artifact.display().to_string());
    let head = match std::fs::read(&order.artifact) {
        Ok(b) => String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned(),
        Err(e) => {
            send(FromWorker::Failed {
                stage: Stage::Load,
                kind: FailureKind::BadArtifact,
                message: format!("cannot read {}: {e}", order.artifact.display()),
            });
            return EXIT_LOAD;
        }
    };
    let behaviour = head
        .strip_prefix("placeholder:")
        .and_then(|r| r.lines().next())
        .map(str::trim)
        .unwrap_or("");
    match behaviour {
        "fail" => {
            send(FromWorker::Failed {
                stage: Stage::Load,
                kind: FailureKind::AbiMismatch,
                message: "placeholder artifact asks to fail".into(),
            });
            return EXIT_LOAD;
        }
        "never-ready" => {
            transition(WorkerState::Starting, "");
            // Wait to be killed by the start deadline.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        "ignores-stop" => {
            // SAFETY: installing SIG_IGN runs no code of ours.
            let _ = unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGTERM,
                    nix::sys::signal::SigHandler::SigIgn,
                )
            };
        }
        b if b.starts_with("exit ") => {
            return b[5..].trim().parse().unwrap_or(1);
        }
        _ => {}
    }
    transition(
        WorkerState::Loaded,
        "placeholder (module-runtime not wired)",
    );
    transition(WorkerState::Starting, "");
    println!(
        "ember-worker[{}]: replica {} running {} (module-runtime not wired: artifact not loaded)",
        std::process::id(),
        order.replica,
        order.artifact.display()
    );
    send(FromWorker::Log {
        level: 3,
        target: "ember::placeholder".into(),
        message: "ready".into(),
    });
    transition(WorkerState::Ready, "");
    transition(WorkerState::Serving, "");
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let msgs = [
            FromWorker::Idle {
                pid: 7,
                abi_version: 1,
                sdk_version: "0.1.0".into(),
            },
            FromWorker::Transition {
                state: WorkerState::Ready,
                detail: String::new(),
            },
            FromWorker::Failed {
                stage: Stage::Load,
                kind: FailureKind::AbiMismatch,
                message: "x".into(),
            },
            FromWorker::Log {
                level: 3,
                target: "t".into(),
                message: "m".into(),
            },
        ];
        for m in msgs {
            let b = serde_json::to_vec(&m).unwrap();
            assert_eq!(serde_json::from_slice::<FromWorker>(&b).unwrap(), m);
        }
        assert!(FailureKind::AbiMismatch.is_permanent());
        assert!(!FailureKind::Panic.is_permanent());
        assert_eq!(GrantKind::Import.fd_count(), 2);
    }

    proptest! {
        // Worker reports are written by module code: any bytes must decode
        // to a message or an error, never a panic.
        #[test]
        fn worker_reports_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<FromWorker>(&bytes);
        }

        #[test]
        fn near_valid_reports_never_panic(
            tag in "(idle|transition|failed|log|[a-z]{0,8})",
            body in "\\PC{0,60}",
        ) {
            let text = format!("{{\"{tag}\":{body}}}");
            let _ = serde_json::from_str::<FromWorker>(&text);
        }
    }
}
