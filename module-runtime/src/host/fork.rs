//! The fork path: the only place a worker is created. emberd's zygote,
//! module-runtime's test zygote and the start-up benchmark's in-process
//! zygote all call [`fork_worker`].
//!
//! A double fork with the C library's own `fork()`:
//!
//! ```text
//! zygote ──fork()──▶ intermediate ──fork()──▶ worker
//!    ▲                   │ pid + pidfd of the worker, then _exit(0)
//!    └── reaps it ◀──────┘
//! worker: re-parented to the reaper (a child subreaper: emberd, or a
//!         zygote that is its own workers' reaper) when the intermediate
//!         exits; waits for that, then PR_SET_PDEATHSIG
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
//! the intermediate before it answers, so by then the worker is the
//! reaper's child (the kernel re-parents before the intermediate can be
//! reaped).
//!
//! What the worker inherits: the zygote's own descriptors (`own`, its
//! channel to the supervisor, the sockets of this fork) are closed in it,
//! and nothing else: every other descriptor is a plugin's and keeps its
//! number. Its control socket takes the lowest free number. Signal
//! dispositions and the mask are reset once, by [`super::worker::run`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::unistd::{fork, ForkResult, Pid};

use super::process::{lowest_free_number, thread_count};
use crate::protocol::zygote::Handoff;
use crate::transport::{socket_pair, Link, LinkError};

/// No worker was forked.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// The forking process is not single-threaded (a plugin started a
    /// thread): forking it would copy locks other threads hold.
    #[error(
        "the process has {0} threads (a plugin started one); workers are forked only from a single-threaded process"
    )]
    Threads(usize),
    /// The reaper named is this process, but it is no child subreaper:
    /// the worker would be re-parented elsewhere.
    #[error(
        "this process is to reap its workers but is not a child subreaper (PR_SET_CHILD_SUBREAPER)"
    )]
    NotSubreaper,
    /// A socket for the worker or the hand-off could not be made.
    #[error("cannot create the worker's sockets")]
    Socket(#[source] LinkError),
    /// The zygote could not fork.
    #[error("cannot fork the intermediate process")]
    Intermediate(#[source] Errno),
    /// The intermediate process could not fork, or open a pidfd for, the
    /// worker.
    #[error("the intermediate process could not fork the worker: {call} failed")]
    Worker {
        /// `fork` or `pidfd_open`.
        call: String,
        /// Why.
        #[source]
        source: Errno,
    },
    /// The intermediate process died without handing the worker over.
    #[error("the intermediate process exited without handing over the worker")]
    Handoff(#[source] LinkError),
}

/// A worker, seen from the zygote that forked it.
#[derive(Debug)]
pub struct NewWorker {
    /// Its pid.
    pub pid: Pid,
    /// A pidfd for it (opened by its first parent, so it names this
    /// process even once its pid is reused).
    pub pidfd: OwnedFd,
    /// The other end of the worker's control socket.
    pub channel: OwnedFd,
}

/// Forks a worker (see the module docs): checks that this process is
/// single-threaded, forks an intermediate process that forks the worker,
/// and returns the worker's pid, pidfd and the other end of its control
/// socket. In the worker it closes `own` (the caller's own descriptors:
/// its channel to the supervisor, placeholders, a signalfd…) and runs
/// [`super::worker::run`], which never returns; every other descriptor
/// stays open there, at its number: it belongs to a plugin.
///
/// `reaper` is the process the worker is re-parented to and dies with: a
/// child subreaper above this one (emberd), or this process itself if it
/// is one.
pub fn fork_worker(own: &[BorrowedFd<'_>], reaper: Pid) -> Result<NewWorker, ForkError> {
    // Defence in depth: plugins were checked for threads after `init`, but
    // a plugin call could have started one since.
    let threads = thread_count();
    if threads != 1 {
        return Err(ForkError::Threads(threads));
    }
    if reaper == nix::unistd::getpid()
        && !matches!(nix::sys::prctl::get_child_subreaper(), Ok(true))
    {
        return Err(ForkError::NotSubreaper);
    }
    let (channel, worker_end) = socket_pair().map_err(ForkError::Socket)?;
    let (ours, theirs) = socket_pair().map_err(ForkError::Socket)?;
    // SAFETY: single-threaded (checked above): the child starts with
    // consistent memory and no lock held by a vanished thread.
    match unsafe { fork() }.map_err(ForkError::Intermediate)? {
        ForkResult::Child => {
            drop(ours);
            // In the intermediate; returns only in the worker.
            intermediate(theirs);
            drop(channel);
            for fd in own {
                // SAFETY: in the worker, the caller's objects that own these
                // descriptors are never dropped (`run` never returns), so
                // closing our copy here cannot be a double close.
                drop(unsafe { OwnedFd::from_raw_fd(fd.as_raw_fd()) });
            }
            let control = lowest_free_number(worker_end);
            super::worker::run(control, Some(reaper))
        }
        ForkResult::Parent { child } => {
            drop(theirs);
            drop(worker_end);
            let mut link = Link::<(), Handoff>::new(ours);
            let handed = link.recv();
            reap(child);
            match handed {
                Ok((Handoff::HandedOver { pid }, mut fds)) => Ok(NewWorker {
                    pid: Pid::from_raw(pid),
                    pidfd: fds.pop().expect("the link checked the count"),
                    channel,
                }),
                Ok((Handoff::Failed { call, errno }, _)) => Err(ForkError::Worker {
                    call,
                    source: Errno::from_raw(errno),
                }),
                Err(e) => Err(ForkError::Handoff(e)),
            }
        }
    }
}

/// In the intermediate process: forks the worker, hands its pid and pidfd
/// to the zygote over `to_zygote`, and exits. Returns only in the worker,
/// with `to_zygote` closed.
fn intermediate(to_zygote: OwnedFd) {
    let link = Link::<Handoff, ()>::new(to_zygote);
    let failed = |call: &str, e: Errno| Handoff::Failed {
        call: call.into(),
        errno: e as i32,
    };
    // SAFETY: a fork of a single-threaded process is single-threaded too.
    let sent = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(link);
            return;
        }
        Ok(ForkResult::Parent { child }) => match pidfd_open(child.as_raw()) {
            Ok(pidfd) => link.send(
                &Handoff::HandedOver {
                    pid: child.as_raw(),
                },
                &[pidfd.as_fd()],
            ),
            Err(e) => {
                // Our child, not reaped: its pid is still its own.
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                link.send(&failed("pidfd_open", e), &[])
            }
        },
        Err(e) => link.send(&failed("fork", e), &[]),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_refuses_in_a_multithreaded_process() {
        // A second thread that lives until the check is done.
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = wait.recv();
        });
        let r = fork_worker(&[], nix::unistd::getpid());
        drop(done);
        t.join().unwrap();
        assert!(matches!(r, Err(ForkError::Threads(n)) if n > 1), "{r:?}");
    }
}
