//! The zygote's main loop (runs in the re-executed `emberd --zygote`).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use super::channel::{self, ChannelError};
use super::fork::{become_worker, fork_worker, ForkPathError, Forked};
use super::{FromZygote, ToZygote};
use crate::error_chain;

/// Exit code when the zygote's arguments are wrong.
pub const EXIT_USAGE: i32 = 64;
/// Exit code when the supervisor is gone or the channel failed.
pub const EXIT_CHANNEL: i32 = 74;
/// Exit code when the plugins failed to load.
pub const EXIT_PLUGINS: i32 = 78;
/// Exit code when the zygote cannot make itself not dumpable.
pub const EXIT_OSERR: i32 = 71;

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
    // exec made this process dumpable again; like emberd, it is not (a
    // module that keeps emberd's uid cannot read the zygote's memory, nor a
    // warm worker's, which inherits this before it becomes another module).
    if nix::sys::prctl::set_dumpable(false).is_err() {
        return EXIT_OSERR;
    }
    // An ignored SIGCHLD (it survives exec) would have the kernel reap the
    // intermediate processes of the fork path by itself.
    // SAFETY: installing SIG_DFL runs no code of ours.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGCHLD,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
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
    // Workers' heaps stay small (see `heap.rs`); the shared runtime of slim
    // modules is loaded and relocated once here so that every worker
    // shares it (its paths, from emberd's environment, are removed from
    // ours). Without it slim modules fail to load in their worker, with
    // the loader's message; fat ones are unaffected.
    module_runtime::host::heap::keep_worker_heaps_small();
    if let Err(e) = module_runtime::host::runtime_libs::preload_from_env() {
        eprintln!("ember-zygote: {}", error_chain(&e));
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
    // Before any plugin opens a descriptor: the numbers where a worker puts
    // its module's listeners are the zygote's own, so no plugin's is there.
    let Ok(reserved) = module_runtime::host::process::reserve_listener_fds() else {
        return EXIT_CHANNEL;
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
    loop {
        let id = match channel::recv::<ToZygote>(&chan) {
            Ok((ToZygote::Fork { id }, _)) => id,
            Ok((ToZygote::Hello { .. }, _)) => continue,
            // The supervisor closed the channel: its shutdown is ours.
            Err(ChannelError::Closed) => return 0,
            Err(_) => return EXIT_CHANNEL,
        };
        let sent = match fork_one() {
            Ok(Outcome::Worker(worker_end)) => {
                // In the new worker: close exactly what the zygote owns (its
                // channel to emberd, the placeholders); every other
                // descriptor is a plugin's and keeps its number.
                drop(chan);
                drop(reserved);
                become_worker(worker_end, parent)
            }
            Ok(Outcome::Forked {
                pid,
                pidfd,
                sup_end,
            }) => channel::send(
                &chan,
                &FromZygote::Forked { id, pid },
                &[pidfd.as_fd(), sup_end.as_fd()],
            ),
            Err(e) => channel::send(
                &chan,
                &FromZygote::ForkFailed {
                    id,
                    reason: error_chain(&e),
                },
                &[],
            ),
        };
        if sent.is_err() {
            return EXIT_CHANNEL;
        }
    }
}

/// What [`fork_one`] returns on each side of the fork.
enum Outcome {
    /// In the new worker: its end of the channel.
    Worker(OwnedFd),
    /// In the zygote: the worker's pid, pidfd and emberd's end of its
    /// channel.
    Forked {
        pid: i32,
        pidfd: OwnedFd,
        sup_end: OwnedFd,
    },
}

fn fork_one() -> Result<Outcome, ForkPathError> {
    let (sup_end, worker_end) = channel::pair().map_err(ForkPathError::Socket)?;
    // SAFETY: the zygote never starts a thread (no runtime, plugins must not
    // leave threads), so it is single-threaded here.
    match unsafe { fork_worker() }? {
        Forked::Worker => {
            drop(sup_end);
            Ok(Outcome::Worker(worker_end))
        }
        Forked::Parent { pid, pidfd } => {
            drop(worker_end);
            Ok(Outcome::Forked {
                pid,
                pidfd,
                sup_end,
            })
        }
    }
}
