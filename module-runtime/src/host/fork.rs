//! The fork path: the only place a worker is created.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::process::{lowest_free_number, thread_count, ProcessError};

fn sys(call: &'static str) -> impl FnOnce(nix::Error) -> ProcessError {
    move |source| ProcessError::Sys { call, source }
}

/// Forks a worker: creates its control socket, forks, and in the child
/// closes `own` (the caller's own descriptors: its control socket, a
/// signalfd…) and runs [`super::worker::run`], which never returns. Every
/// other descriptor stays open in the worker at its number: it belongs to a
/// plugin. The parent gets the child's pid and its end of the control
/// socket.
///
/// Refuses unless the process is single-threaded: fork copies only the
/// calling thread, and a lock held by another thread would stay locked in the
/// child forever. glibc's `fork()` is used, so `pthread_atfork` handlers run
/// and the child's C library knows its own thread id.
pub fn fork_worker(
    own: &[BorrowedFd<'_>],
) -> Result<(nix::unistd::Pid, crate::protocol::ParentChannel), ProcessError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ProcessError::MultiThreaded(threads));
    }
    let (parent_end, child_end) =
        crate::protocol::socket_pair().map_err(|_| ProcessError::Sys {
            call: "socketpair",
            source: nix::Error::last(),
        })?;
    let me = nix::unistd::getpid();
    // SAFETY: the process is single-threaded (checked above), so the child
    // starts with consistent memory and no lock held by a vanished thread.
    match unsafe { nix::unistd::fork() }.map_err(sys("fork"))? {
        nix::unistd::ForkResult::Child => {
            drop(parent_end);
            for fd in own {
                // SAFETY: in the child, the caller's objects that own these
                // descriptors are never dropped (`run` never returns), so
                // closing our copy here cannot be a double close.
                drop(unsafe { OwnedFd::from_raw_fd(fd.as_raw_fd()) });
            }
            super::worker::run(lowest_free_number(child_end), Some(me))
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(child_end);
            Ok((child, crate::protocol::ParentChannel::new(parent_end)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_refuses_in_a_multithreaded_process() {
        let _t = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(200)));
        assert!(matches!(fork_worker(&[]), Err(ProcessError::MultiThreaded(n)) if n > 1));
    }
}
