//! The zygote's main loop (runs in the re-executed `emberd --zygote`).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use module_runtime::host::{fork_worker, process::close_inherited_fds};
use module_runtime::transport::{Link, LinkError};
use nix::unistd::Pid;

use super::{FromZygote, ToZygote};
use crate::error_chain;

/// The zygote's end of its link to emberd.
type Supervisor = Link<FromZygote, ToZygote>;

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
    // descriptor above 2 except the channel `fd`, which is kept.
    unsafe { close_inherited_fds(fd) };
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
    let mut chan = Supervisor::new(chan);
    let plugins = match chan.recv() {
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
                plugins: p.len() as u32,
            };
            if chan.send(&ready, &[]).is_err() {
                return EXIT_CHANNEL;
            }
            p
        }
        Err(e) => {
            let reason = error_chain(&e);
            let _ = chan.send(&FromZygote::HelloFailed { reason }, &[]);
            return EXIT_PLUGINS;
        }
    };
    let emberd = Pid::from_raw(parent);
    loop {
        let id = match chan.recv() {
            Ok((ToZygote::Fork { id }, _)) => id,
            Ok((ToZygote::Hello { .. }, _)) => continue,
            // The supervisor closed the channel: its shutdown is ours.
            Err(LinkError::Closed) => return 0,
            Err(_) => return EXIT_CHANNEL,
        };
        // In the worker, the fork path closes exactly what the zygote owns
        // (its channel to emberd, the placeholders); every other descriptor
        // is a plugin's and keeps its number.
        let own: Vec<_> = std::iter::once(chan.fd()).chain(reserved.fds()).collect();
        let sent = match fork_worker(&own, emberd) {
            Ok(w) => chan.send(
                &FromZygote::Forked {
                    id,
                    pid: w.pid.as_raw(),
                },
                &[w.pidfd.as_fd(), w.channel.as_fd()],
            ),
            Err(e) => chan.send(
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
