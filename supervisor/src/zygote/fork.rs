//! The fork path: the only place a process is cloned. Called in the
//! single-threaded zygote only.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use super::ForkMode;

/// `struct clone_args` up to `tls` (CLONE_ARGS_SIZE_VER0).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// Which side of the fork we are on.
pub(super) enum Forked {
    /// In the new worker.
    Child,
    /// In the zygote.
    Parent {
        /// The worker's pid.
        pid: i32,
        /// A pidfd for it.
        pidfd: OwnedFd,
    },
}

/// Clones the calling process as a worker.
///
/// # Safety
/// The calling process must be single-threaded: the child gets a copy of
/// this thread only, and locks held by other threads would stay held.
pub(super) unsafe fn fork_worker(mode: ForkMode) -> Result<Forked, Errno> {
    match mode {
        ForkMode::Clone3Parent => {
            let mut pidfd: libc::c_int = -1;
            let mut args = CloneArgs {
                flags: (libc::CLONE_PARENT | libc::CLONE_PIDFD) as u64,
                pidfd: &mut pidfd as *mut libc::c_int as u64,
                // clone3 refuses an exit signal with CLONE_PARENT (EINVAL):
                // the child inherits the zygote's own, SIGCHLD.
                exit_signal: 0,
                ..Default::default()
            };
            // SAFETY: `args` is a valid clone_args of the size passed; no
            // stack is given, so the child continues on a copy of ours like
            // fork(); the caller guarantees we are single-threaded.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    &mut args as *mut CloneArgs,
                    std::mem::size_of::<CloneArgs>(),
                )
            };
            match ret {
                -1 => Err(Errno::last()),
                0 => Ok(Forked::Child),
                pid => Ok(Forked::Parent {
                    pid: pid as i32,
                    // SAFETY: with CLONE_PIDFD the kernel stored a new
                    // descriptor (close-on-exec) in `pidfd`; we own it.
                    pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
                }),
            }
        }
        ForkMode::ForkPidfdOpen => {
            // SAFETY: the caller guarantees we are single-threaded.
            match unsafe { nix::unistd::fork() }? {
                nix::unistd::ForkResult::Child => Ok(Forked::Child),
                nix::unistd::ForkResult::Parent { child } => {
                    let pidfd = pidfd_open(child.as_raw())?;
                    Ok(Forked::Parent {
                        pid: child.as_raw(),
                        pidfd,
                    })
                }
            }
        }
    }
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: pidfd_open returned a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// In the new worker: make it die with its parent, give it only the
/// channel (as fd 3) plus stdio, reset signals, name it, run the body,
/// exit. Never returns.
pub(super) fn become_worker(channel: OwnedFd, expected_parent: i32) -> ! {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err()
        || nix::unistd::getppid().as_raw() != expected_parent
    {
        // The parent is already gone (or the flag failed): do not linger.
        // SAFETY: _exit ends the process without running destructors.
        unsafe { libc::_exit(1) }
    }
    // Reset dispositions and the mask inherited from the zygote. SIGPIPE
    // stays ignored, as in any Rust program.
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        let handler = if sig == Signal::SIGPIPE {
            SigHandler::SigIgn
        } else {
            SigHandler::SigDfl
        };
        // SAFETY: installing SIG_DFL/SIG_IGN runs no code of ours.
        let _ = unsafe {
            sigaction(
                sig,
                &SigAction::new(handler, SaFlags::empty(), SigSet::empty()),
            )
        };
    }
    let _ = SigSet::empty().thread_set_mask();

    let raw = channel.as_raw_fd();
    std::mem::forget(channel);
    // SAFETY: we are the only thread. `raw` is our channel; after dup2 it is
    // also fd 3 (without close-on-exec), every other descriptor above 3 is
    // closed, and stdin is replaced by /dev/null. No Rust object owns fds
    // 0-2 or those above 3 in this freshly forked child except `raw`, whose
    // ownership we just released with forget.
    let channel = unsafe {
        if raw != crate::worker::CHANNEL_FD {
            libc::dup2(raw, crate::worker::CHANNEL_FD);
        }
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null > 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        OwnedFd::from_raw_fd(crate::worker::CHANNEL_FD)
    };
    let _ = nix::sys::prctl::set_name(c"ember-worker");
    module_runtime::host::worker::run(channel, Some(nix::unistd::Pid::from_raw(expected_parent)))
}
