//! The worker: a forked child of the zygote that waits warm for a launch
//! order, then becomes one instance of one module and reports every
//! lifecycle transition and failure to its parent. Stopping the module ends
//! the process; libraries are never unloaded.
//!
//! By concern: [`exit`] codes, `shared` state, the host `callbacks` a module
//! calls, `crash` handlers, `limits`, the start `deadline`, the `control`
//! thread, descriptor `grants`, and the `launch` itself; this file is the
//! warm wait before it.

use std::os::fd::OwnedFd;

use super::{loader, plugins, process, sandbox};
use crate::abi;
use crate::protocol::{Failure, FailureKind, FromWorker, Stage, ToWorker, WorkerChannel};
use crate::transport::LinkError;

mod callbacks;
mod control;
mod crash;
mod deadline;
pub mod exit;
mod grants;
mod launch;
mod limits;
mod shared;

pub(super) fn idle_exit(code: i32) -> ! {
    // SAFETY: ends the process without running destructors of inherited
    // (zygote) state, which the worker does not own.
    unsafe { libc::_exit(code) }
}

/// Runs a worker on `control` (a `SOCK_SEQPACKET` socket to its parent).
/// Call right after `fork` in a single-threaded child, once the forking
/// process's own descriptors are closed (every other inherited descriptor is
/// a plugin's and stays open); never returns. With `parent`, the worker
/// waits until that process is its parent (see
/// [`process::die_with_parent`]) and dies with it.
pub fn run(control: OwnedFd, parent: Option<nix::unistd::Pid>) -> ! {
    // Reset inherited state before anything else.
    let _ = process::reset_signals();
    if !matches!(process::die_with_parent(parent), Ok(true)) {
        idle_exit(exit::LAUNCH);
    }
    process::set_process_name("ember: warm");
    let mut chan = WorkerChannel::new(control);
    let idle = FromWorker::Idle {
        pid: std::process::id(),
        abi_version: abi::ABI_VERSION,
        sdk_version: abi::SDK_VERSION.into(),
    };
    if chan.send(&idle, &[]).is_err() {
        idle_exit(exit::LAUNCH);
    }
    // Off the launch's clock: the default seccomp programs.
    sandbox::prepare();
    // Wait warm.
    let (order, fds) = loop {
        match chan.recv() {
            Ok((ToWorker::Launch(o), fds)) => break (o, fds),
            // Nothing to attach to yet: drop the descriptors.
            Ok((ToWorker::Attach(_), _)) => continue,
            Ok((ToWorker::JoinCgroups { .. }, tasks)) => {
                if let Err(e) = process::join_cgroups(&tasks) {
                    let _ = chan.send(
                        &FromWorker::Failed(Failure {
                            stage: Stage::Launch,
                            kind: FailureKind::Cgroup,
                            message: format!(
                                "cannot join its cgroup: {}",
                                crate::sdk::error_chain(&e)
                            ),
                        }),
                        &[],
                    );
                    idle_exit(exit::LAUNCH)
                }
            }
            Ok((ToWorker::Stop { .. }, _)) | Err(LinkError::Closed) => idle_exit(exit::OK),
            // A launch order that did not arrive whole (descriptors cut
            // off, a garbled frame): said, not a silent exit.
            Err(e) => {
                let _ = chan.send(
                    &FromWorker::Failed(Failure {
                        stage: Stage::Launch,
                        kind: FailureKind::BadLaunchOrder,
                        message: format!(
                            "the launch order did not arrive whole: {}",
                            crate::sdk::error_chain(&e)
                        ),
                    }),
                    &[],
                );
                idle_exit(exit::LAUNCH)
            }
        }
    };
    launch::launch(chan, order, fds)
}
