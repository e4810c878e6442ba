//! A minimal zygote for module-runtime's tests (the real one is emberd's):
//! it speaks the zygote protocol (`docs/abi.md` §4, `protocol::zygote`) on
//! the `SOCK_SEQPACKET` socket at descriptor 3 and forks through the one
//! fork path (`host::fork_worker`), as emberd's zygote does. Unlike that
//! one, it is its workers' reaper (a child subreaper), so it also reports
//! each worker's end.
//!
//! - parent → zygote: `Hello { plugins }` first; reply `Ready` once they
//!   are initialized, or `HelloFailed` (then it exits 1);
//! - parent → zygote: `Fork { id }`; reply `Forked { id, pid }` with the
//!   worker's pidfd and control socket attached, or `ForkFailed`;
//! - zygote → parent: `Reaped { pid, exit }` when a worker is reaped;
//! - parent closes the socket: the zygote kills its workers and exits.
//!
//! Like emberd's zygote it preloads the shared runtime of slim modules
//! (`module_runtime::host::runtime_libs`), found next to its executable.
//!
//! Before forking it ignores SIGHUP and blocks SIGUSR1 and SIGCHLD, so the
//! tests can check that workers do not inherit a zygote's signal state.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

use module_runtime::host;
use module_runtime::protocol::{FromZygote, ToZygote, WorkerExit};
use module_runtime::transport::{Link, LinkError};
use nix::sys::signal::{kill, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

type Parent = Link<FromZygote, ToZygote>;

fn reap(parent: &Parent, children: &mut Vec<Pid>) {
    loop {
        let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, WorkerExit::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, WorkerExit::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        children.retain(|c| *c != pid);
        let _ = parent.send(
            &FromZygote::Reaped {
                pid: pid.as_raw(),
                exit,
            },
            &[],
        );
    }
}

fn main() -> ExitCode {
    // Descriptors inherited through exec without close-on-exec (a test
    // harness's, cargo's jobserver) are not the plugins': workers keep every
    // descriptor but the zygote's own, so close them here, as emberd's
    // zygote does.
    // SAFETY: this process was just exec'd; nothing in it owns a descriptor
    // above 2 but the control socket, descriptor 3.
    unsafe { host::process::close_inherited_fds(3) };
    // SAFETY: the parent passes the control socket as descriptor 3 and
    // nothing else in this process owns it.
    let mut parent = Parent::new(unsafe { OwnedFd::from_raw_fd(3) });
    let plugins = match parent.recv() {
        Ok((ToZygote::Hello { plugins }, _)) => plugins,
        _ => return ExitCode::from(2),
    };
    // As emberd's zygote: small worker heaps, and the shared runtime of slim
    // modules when it is there (built with the examples).
    host::heap::keep_worker_heaps_small();
    match host::RuntimeLibs::locate(None).map(|r| r.preload()) {
        Ok(Ok(())) | Err(host::RuntimeLibsError::NotFound { .. }) => {}
        Ok(Err(e)) | Err(e) => {
            let reason = module_runtime::sdk::error_chain(&e);
            let _ = parent.send(&FromZygote::HelloFailed { reason }, &[]);
            return ExitCode::from(1);
        }
    }
    if let Err(e) = host::load_plugins(&plugins) {
        let reason = module_runtime::sdk::error_chain(&e);
        let _ = parent.send(&FromZygote::HelloFailed { reason }, &[]);
        return ExitCode::from(1);
    }
    // Workers are re-parented to this process when the fork path's
    // intermediate exits.
    if nix::sys::prctl::set_child_subreaper(true).is_err() {
        return ExitCode::from(1);
    }
    // Deliberate leftovers that no worker may pass on to its module (the
    // worker tests read each worker's /proc/PID/status): SIGHUP ignored, as
    // under nohup, and SIGUSR1 blocked, besides SIGCHLD, blocked for the
    // signalfd below.
    // SAFETY: SIG_IGN runs no code of ours in signal context.
    if unsafe { nix::sys::signal::signal(Signal::SIGHUP, nix::sys::signal::SigHandler::SigIgn) }
        .is_err()
    {
        return ExitCode::from(1);
    }
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(Signal::SIGCHLD);
    let mut blocked = mask;
    blocked.add(Signal::SIGUSR1);
    if blocked.thread_block().is_err() {
        return ExitCode::from(1);
    }
    let Ok(sfd) = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
    else {
        return ExitCode::from(1);
    };
    let ready = FromZygote::Ready {
        pid: std::process::id() as i32,
        plugins: plugins.len() as u32,
    };
    if parent.send(&ready, &[]).is_err() {
        return ExitCode::from(1);
    }
    let me = nix::unistd::getpid();
    let mut children: Vec<Pid> = Vec::new();
    loop {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [
            PollFd::new(parent.fd(), PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        let control_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let child_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        if child_ready {
            while let Ok(Some(_)) = sfd.read_signal() {}
            reap(&parent, &mut children);
        }
        if !control_ready {
            continue;
        }
        let id = match parent.try_recv() {
            Ok(Some((ToZygote::Fork { id }, _))) => id,
            Ok(Some((ToZygote::Hello { .. }, _))) | Ok(None) => continue,
            Err(LinkError::Closed) | Err(_) => break,
        };
        let reply = match host::fork_worker(&[parent.fd(), sfd.as_fd()], me) {
            Ok(w) => {
                children.push(w.pid);
                parent.send(
                    &FromZygote::Forked {
                        id,
                        pid: w.pid.as_raw(),
                    },
                    &[w.pidfd.as_fd(), w.channel.as_fd()],
                )
            }
            Err(e) => parent.send(
                &FromZygote::ForkFailed {
                    id,
                    reason: module_runtime::sdk::error_chain(&e),
                },
                &[],
            ),
        };
        if reply.is_err() {
            break;
        }
    }
    for c in &children {
        let _ = kill(*c, Signal::SIGKILL);
    }
    for c in children {
        let _ = waitpid(c, None);
    }
    ExitCode::SUCCESS
}
