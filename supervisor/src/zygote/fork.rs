//! The fork path: the only place a worker is created. Called in the
//! single-threaded zygote only.
//!
//! A double fork with the C library's own `fork()`:
//!
//! ```text
//! zygote ──fork()──▶ intermediate ──fork()──▶ worker
//!    ▲                   │ pid + pidfd of the worker, then _exit(0)
//!    └── reaps it ◀──────┘
//! worker: re-parented to emberd (PR_SET_CHILD_SUBREAPER) when the
//!         intermediate exits; waits for that, then PR_SET_PDEATHSIG
//! ```
//!
//! Why not one raw `clone3(CLONE_PARENT)`, which made emberd the parent
//! directly: it bypasses the C library, so `pthread_atfork` child handlers
//! (a plugin reseeding its RNG, resetting a lock) never ran, and glibc's
//! cached thread id stayed the zygote's (`pthread_kill(pthread_self(), …)`
//! failed with `ESRCH`; `raise`, `abort` and recursive mutexes depend on
//! it). `fork()` does both right but makes the zygote the parent, and a
//! worker must outlive a zygote restart; hence the intermediate.
//!
//! The pidfd is opened by the intermediate while the worker is its
//! unreaped child, so it names that process and no other. The zygote reaps
//! the intermediate before it answers emberd, so by then the worker is
//! emberd's child (the kernel re-parents before the intermediate can be
//! reaped). emberd's `waitid(P_PIDFD)` on it fails with `ECHILD` only if
//! the worker died before emberd claimed its pid and the orphan reaper
//! took it (`crate::reaper`); `pidfd_reap` reports that as an unknown
//! status.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use super::channel::{self, ChannelError};
use module_runtime::host::process;

/// Which side of the fork we are on.
pub(super) enum Forked {
    /// In the new worker: the caller drops every descriptor the zygote
    /// owns, then calls [`become_worker`].
    Worker,
    /// In the zygote.
    Parent {
        /// The worker's pid.
        pid: i32,
        /// A pidfd for it.
        pidfd: OwnedFd,
    },
}

/// No worker was forked.
#[derive(Debug, thiserror::Error)]
pub(super) enum ForkPathError {
    /// The socket to the intermediate process could not be made.
    #[error("cannot create the hand-off socket")]
    Socket(#[source] ChannelError),
    /// The zygote could not fork.
    #[error("cannot fork the intermediate process")]
    Intermediate(#[source] Errno),
    /// The intermediate process could not fork, or open a pidfd for, the
    /// worker.
    #[error("the intermediate process could not fork the worker: {call}")]
    Worker {
        /// `fork` or `pidfd_open`.
        call: String,
        /// Why.
        #[source]
        source: Errno,
    },
    /// The zygote is not single-threaded (a plugin started a thread):
    /// forking it would copy locks other threads hold.
    #[error(
        "the zygote has {0} threads (a plugin started one); it forks only while single-threaded"
    )]
    Threads(usize),
    /// The intermediate process died without handing the worker over.
    #[error("the intermediate process exited without handing over the worker")]
    Handoff(#[source] ChannelError),
}

/// Intermediate to zygote.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Handoff {
    /// The worker exists. Descriptor: its pidfd.
    Forked { pid: i32 },
    /// No worker: this call failed with this errno.
    Failed { call: String, errno: i32 },
}

/// Forks a worker through an intermediate process (see the module docs).
///
/// # Safety
/// The calling process must be single-threaded: the child gets a copy of
/// this thread only, and locks held by other threads would stay held.
pub(super) unsafe fn fork_worker() -> Result<Forked, ForkPathError> {
    // Defence in depth: plugins were checked for threads after `init`, but
    // a plugin call could have started one since.
    let threads = process::thread_count();
    if threads != 1 {
        return Err(ForkPathError::Threads(threads));
    }
    let (ours, theirs) = channel::pair().map_err(ForkPathError::Socket)?;
    // SAFETY: the caller guarantees we are single-threaded.
    match unsafe { fork() }.map_err(ForkPathError::Intermediate)? {
        ForkResult::Child => {
            drop(ours);
            // SAFETY: a fork of a single-threaded process is one too. Returns
            // only in the worker.
            unsafe { intermediate(theirs) };
            Ok(Forked::Worker)
        }
        ForkResult::Parent { child } => {
            drop(theirs);
            let handed = channel::recv::<Handoff>(&ours);
            reap(child);
            match handed {
                Ok((Handoff::Forked { pid }, fds)) if fds.len() == 1 => Ok(Forked::Parent {
                    pid,
                    pidfd: fds.into_iter().next().expect("one descriptor"),
                }),
                Ok((Handoff::Failed { call, errno }, _)) => Err(ForkPathError::Worker {
                    call,
                    source: Errno::from_raw(errno),
                }),
                Ok(_) => Err(ForkPathError::Handoff(ChannelError::Truncated)),
                Err(e) => Err(ForkPathError::Handoff(e)),
            }
        }
    }
}

/// In the intermediate process: forks the worker, hands its pid and pidfd
/// to the zygote over `to_zygote`, and exits. Returns only in the worker.
///
/// # Safety
/// The calling process must be single-threaded.
unsafe fn intermediate(to_zygote: OwnedFd) {
    let failed = |call: &str, e: Errno| Handoff::Failed {
        call: call.into(),
        errno: e as i32,
    };
    // SAFETY: the caller guarantees we are single-threaded.
    let sent = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(to_zygote);
            return;
        }
        Ok(ForkResult::Parent { child }) => match pidfd_open(child.as_raw()) {
            Ok(pidfd) => channel::send(
                &to_zygote,
                &Handoff::Forked {
                    pid: child.as_raw(),
                },
                &[pidfd.as_fd()],
            ),
            Err(e) => {
                // Our child, not reaped: its pid is still its own.
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                channel::send(&to_zygote, &failed("pidfd_open", e), &[])
            }
        },
        Err(e) => channel::send(&to_zygote, &failed("fork", e), &[]),
    };
    // SAFETY: _exit ends the process without running destructors or atexit
    // handlers of the zygote's state, which this process does not own.
    unsafe { libc::_exit(i32::from(sent.is_err())) }
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: pidfd_open returned a new descriptor (close-on-exec) that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits for the intermediate process to exit (it does at once).
fn reap(child: Pid) {
    loop {
        match nix::sys::wait::waitpid(child, None) {
            Err(Errno::EINTR) => continue,
            _ => return,
        }
    }
}

/// In the new worker, once the zygote's own descriptors are closed: give
/// the channel the lowest free number (3 unless a plugin holds it), name
/// the process, and run the worker body, which waits to be re-parented to
/// emberd and dies with it. Never returns.
pub(super) fn become_worker(channel: OwnedFd, emberd: i32) -> ! {
    let channel = process::lowest_free_number(channel);
    let _ = nix::sys::prctl::set_name(c"ember-worker");
    module_runtime::host::worker::run(channel, Some(Pid::from_raw(emberd)))
}
