//! The zygote's main loop (runs in the re-executed `emberd --zygote`).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use super::channel::{self, ChannelError};
use super::fork::{become_worker, fork_worker, Forked};
use super::{ForkMode, FromZygote, ToZygote};
use crate::error_chain;

/// Exit code when the zygote's arguments are wrong.
pub const EXIT_USAGE: i32 = 64;
/// Exit code when the supervisor is gone or the channel failed.
pub const EXIT_CHANNEL: i32 = 74;
/// Exit code when the plugins failed to load.
pub const EXIT_PLUGINS: i32 = 78;

/// Entry point of zygote mode: `emberd --zygote FD PARENT_PID`. Must be
/// called before any other thread exists; returns the exit code.
pub fn main(args: &[String]) -> i32 {
    let (fd, parent) = match args {
        [fd, parent] => match (fd.parse::<i32>(), parent.parse::<i32>()) {
            (Ok(fd), Ok(parent)) if fd > 2 => (fd, parent),
            _ => return EXIT_USAGE,
        },
        _ => return EXIT_USAGE,
    };
    // Die with the supervisor; if it is already gone, leave now.
    if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err()
        || nix::unistd::getppid().as_raw() != parent
    {
        return EXIT_CHANNEL;
    }
    let _ = nix::sys::prctl::set_name(c"ember-zygote");
    // Descriptors the daemon inherited without close-on-exec came along
    // through exec: close all but stdio and our channel.
    // SAFETY: this process was just exec'd; no Rust object owns any
    // descriptor above 2 except the channel `fd`, which is skipped.
    unsafe {
        if fd > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (fd - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (fd + 1) as u32, u32::MAX, 0u32);
    }
    // SAFETY: the supervisor passed us this descriptor (without
    // close-on-exec) for our exclusive use; nothing else in this fresh
    // process owns it.
    let chan = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(
        &chan,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    serve(chan, parent)
}

fn serve(chan: OwnedFd, parent: i32) -> i32 {
    let plugins = match channel::recv::<ToZygote>(&chan) {
        Ok((ToZygote::Hello { plugins }, _)) => plugins,
        _ => return EXIT_CHANNEL,
    };
    // Kept alive (mapped) for the zygote's whole life, so every worker
    // inherits them.
    let _plugins = match crate::plugins::preload(&plugins) {
        Ok(p) => {
            let ready = FromZygote::Ready {
                pid: std::process::id() as i32,
                plugins: p.len(),
            };
            if channel::send(&chan, &ready, &[]).is_err() {
                return EXIT_CHANNEL;
            }
            p
        }
        Err(e) => {
            let reason = error_chain(&e);
            let _ = channel::send(&chan, &FromZygote::HelloFailed { reason }, &[]);
            return EXIT_PLUGINS;
        }
    };
    let mut mode = ForkMode::Clone3Parent;
    loop {
        let id = match channel::recv::<ToZygote>(&chan) {
            Ok((ToZygote::Fork { id }, _)) => id,
            Ok((ToZygote::Hello { .. }, _)) => continue,
            // The supervisor closed the channel: its shutdown is ours.
            Err(ChannelError::Closed) => return 0,
            Err(_) => return EXIT_CHANNEL,
        };
        let reply = fork_one(id, &mut mode, parent);
        let sent = match reply {
            Ok((pid, pidfd, sup_end, used)) => channel::send(
                &chan,
                &FromZygote::Forked {
                    id,
                    pid,
                    mode: used,
                },
                &[pidfd.as_fd(), sup_end.as_fd()],
            ),
            Err(e) => channel::send(
                &chan,
                &FromZygote::ForkFailed {
                    id,
                    reason: e.to_string(),
                },
                &[],
            ),
        };
        if sent.is_err() {
            return EXIT_CHANNEL;
        }
    }
}

fn fork_one(
    _id: u64,
    mode: &mut ForkMode,
    supervisor: i32,
) -> Result<(i32, OwnedFd, OwnedFd, ForkMode), Errno> {
    let (sup_end, worker_end) = channel::pair().map_err(|_| Errno::EMFILE)?;
    let zygote = nix::unistd::getpid().as_raw();
    // SAFETY: the zygote never starts a thread (no runtime, plugins must not
    // leave threads), so it is single-threaded here.
    let forked = match unsafe { fork_worker(*mode) } {
        Err(Errno::ENOSYS | Errno::EPERM | Errno::EINVAL) if *mode == ForkMode::Clone3Parent => {
            // clone3 refused here (old kernel, seccomp): fall back for good.
            *mode = ForkMode::ForkPidfdOpen;
            // SIGCHLD ignored: the zygote's children are reaped by the kernel.
            // SAFETY: installing SIG_IGN runs no code of ours.
            let _ = unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGCHLD,
                    nix::sys::signal::SigHandler::SigIgn,
                )
            };
            // SAFETY: as above, single-threaded.
            unsafe { fork_worker(*mode) }?
        }
        other => other?,
    };
    match forked {
        Forked::Child => {
            drop(sup_end);
            let parent = match *mode {
                ForkMode::Clone3Parent => supervisor,
                ForkMode::ForkPidfdOpen => zygote,
            };
            become_worker(worker_end, parent)
        }
        Forked::Parent { pid, pidfd } => {
            drop(worker_end);
            Ok((pid, pidfd, sup_end, *mode))
        }
    }
}
