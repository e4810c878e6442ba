//! A minimal zygote for module-runtime's tests (the real one lives in the
//! supervisor): loads plugins, then forks workers on request.
//!
//! `ember-test-zygote [--plugin PATH[=CONFIG.toml]]...` with a
//! `SOCK_SEQPACKET` socket on descriptor 3. Text messages on that socket:
//! - zygote → parent: `ready` once plugins are initialized, or `error: ...`;
//! - parent → zygote: `fork`; reply `forked PID` with the worker's control
//!   socket attached;
//! - zygote → parent: `exit PID CODE` or `signal PID NAME` when a worker is reaped;
//! - parent closes the socket: the zygote kills its workers and exits.
//!
//! Like emberd's zygote it preloads the shared runtime of slim modules
//! (`module_runtime::host::runtime_libs`), found next to its executable.
//!
//! Before forking it ignores SIGHUP and blocks SIGUSR1 and SIGCHLD, so the
//! tests can check that workers do not inherit a zygote's signal state.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

use module_runtime::host::{self, plugins};
use nix::sys::signal::{kill, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

fn send(sock: BorrowedFd<'_>, text: &str, fds: &[BorrowedFd<'_>]) -> bool {
    shm_ipc::fdpass::send_with_fds(sock, text.as_bytes(), fds).is_ok()
}

fn reap(sock: BorrowedFd<'_>, children: &mut Vec<Pid>) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                children.retain(|c| *c != pid);
                send(sock, &format!("exit {pid} {code}"), &[]);
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                children.retain(|c| *c != pid);
                send(sock, &format!("signal {pid} {sig}"), &[]);
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn main() -> ExitCode {
    // Descriptors inherited through exec without close-on-exec (a test
    // harness's, cargo's jobserver) are not the plugins': workers keep every
    // descriptor but the zygote's own, so close them here, as emberd's
    // zygote does.
    // SAFETY: this process was just exec'd; nothing in it owns a descriptor
    // above 3.
    unsafe { libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) };
    // SAFETY: the parent passes the control socket as descriptor 3 and
    // nothing else in this process owns it.
    let control = unsafe { OwnedFd::from_raw_fd(3) };
    let mut specs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--plugin", Some(p)) => match plugins::parse_spec(&p) {
                Ok(s) => specs.push(s),
                Err(e) => {
                    send(control.as_fd(), &format!("error: {e}"), &[]);
                    return ExitCode::from(2);
                }
            },
            _ => {
                send(
                    control.as_fd(),
                    &format!("error: unknown argument {a}"),
                    &[],
                );
                return ExitCode::from(2);
            }
        }
    }
    // As emberd's zygote: small worker heaps, and the shared runtime of slim
    // modules when it is there (built with the examples).
    host::heap::keep_worker_heaps_small();
    match host::RuntimeLibs::locate(None).map(|r| r.preload()) {
        Ok(Ok(())) | Err(host::RuntimeLibsError::NotFound { .. }) => {}
        Ok(Err(e)) | Err(e) => {
            send(
                control.as_fd(),
                &format!("error: {}", module_runtime::sdk::error_chain(&e)),
                &[],
            );
            return ExitCode::from(1);
        }
    }
    if let Err(e) = host::load_plugins(&specs) {
        send(
            control.as_fd(),
            &format!("error: {}", module_runtime::sdk::error_chain(&e)),
            &[],
        );
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
    if !send(control.as_fd(), "ready", &[]) {
        return ExitCode::from(1);
    }
    let mut children: Vec<Pid> = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [
            PollFd::new(control.as_fd(), PollFlags::POLLIN),
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
            reap(control.as_fd(), &mut children);
        }
        if control_ready {
            let n = match shm_ipc::fdpass::recv_with_fds(control.as_fd(), &mut buf) {
                Ok((n, _)) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if n == 0 {
                break;
            }
            if &buf[..n] == b"fork" {
                match host::fork_worker(&[control.as_fd(), sfd.as_fd()]) {
                    Ok((pid, chan)) => {
                        children.push(pid);
                        send(control.as_fd(), &format!("forked {pid}"), &[chan.fd()]);
                    }
                    Err(e) => {
                        send(control.as_fd(), &format!("error: {e}"), &[]);
                    }
                }
            }
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
