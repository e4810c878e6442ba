//! The control thread: the worker's one helper thread once a module runs.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timer::Expiration;
use nix::sys::timerfd::{TimerFd, TimerSetTimeFlags};

use super::deadline::ready_wait;
use super::grants::attach;
use super::shared::Shared;
use crate::manifest::Manifest;
use crate::protocol::{LogLevel, ToWorker, WorkerChannel};
use crate::transport::LinkError;

/// The worker's one helper thread: reads the control socket (`Stop`,
/// `Attach`), turns SIGTERM/SIGINT into a graceful stop, and enforces the
/// start deadline, counted from `launched` (when the launch order arrived;
/// [`arm_load_deadline`] covers the load itself): a module not ready by then
/// is reported `NeverReady` and the process ends. One thread for all three:
/// a thread start is a noticeable part of a launch on a small VM.
pub(super) fn start_control_thread(
    shared: &'static Shared,
    mut chan: WorkerChannel,
    sigs: nix::sys::signal::SigSet,
    stop_deadline: Duration,
    (launched, start_deadline): (Instant, Duration),
    manifest: Manifest,
) {
    let sfd =
        nix::sys::signalfd::SignalFd::with_flags(&sigs, nix::sys::signalfd::SfdFlags::SFD_CLOEXEC)
            .ok();
    let ready_by = launched + start_deadline;
    // The start deadline as a timer that `ready` disarms, armed here, before
    // any module code runs (so it cannot be armed after `ready`). Without
    // a timer descriptor, the poll's timeout counts it down instead.
    let arm = |t: &TimerFd, left: Duration| {
        t.set(
            Expiration::OneShot(TimeSpec::from_duration(left.max(Duration::from_micros(1)))),
            TimerSetTimeFlags::empty(),
        )
        .is_ok()
    };
    let timer = shared
        .ready_timer
        .as_ref()
        .filter(|t| ready_wait(shared, ready_by, start_deadline).is_none_or(|left| arm(t, left)));
    let _ = std::thread::Builder::new()
        .name("ember-control".into())
        .spawn(move || loop {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let mut fds = vec![PollFd::new(chan.fd(), PollFlags::POLLIN)];
            if let Some(s) = &sfd {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
            }
            if let Some(t) = timer {
                fds.push(PollFd::new(t.as_fd(), PollFlags::POLLIN));
            }
            let left = ready_wait(shared, ready_by, start_deadline);
            let timeout = match (timer, left) {
                (None, Some(left)) => {
                    // Round up: waking before the deadline would only loop.
                    PollTimeout::try_from(left.as_millis().saturating_add(1))
                        .unwrap_or(PollTimeout::MAX)
                }
                _ => PollTimeout::NONE,
            };
            match poll(&mut fds, timeout) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
                Ok(_) => {}
            }
            let readable = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| !r.is_empty())
            };
            let sock_ready = readable(0);
            let sig_ready = sfd.is_some() && readable(1);
            if let Some(t) = timer.filter(|_| readable(fds.len() - 1)) {
                // Expired: clear it; the next look at the deadline fails
                // the instance unless it became ready meanwhile (or the
                // timer fired early: then it is armed again).
                let _ = t.wait();
                if let Some(left) = ready_wait(shared, ready_by, start_deadline) {
                    arm(t, left);
                }
            }
            if sig_ready {
                if let Some(Ok(Some(info))) = sfd.as_ref().map(|s| s.read_signal()) {
                    shared.request_shutdown(stop_deadline, &format!("signal {}", info.ssi_signo));
                }
            }
            if sock_ready {
                match chan.try_recv() {
                    Ok(Some((ToWorker::Stop { deadline }, _))) => {
                        shared.request_shutdown(deadline, "stop requested")
                    }
                    Ok(Some((ToWorker::Attach(grants), fds))) => {
                        attach(shared, &manifest, grants, fds)
                    }
                    Ok(Some((ToWorker::Launch(_), _))) => shared.log(
                        LogLevel::Warn,
                        "ember::worker",
                        "ignoring a second launch order",
                    ),
                    Ok(Some((ToWorker::JoinCgroups { .. }, _))) => shared.log(
                        LogLevel::Warn,
                        "ember::worker",
                        "ignoring a cgroup join after launch",
                    ),
                    // Part of a message; the rest follows.
                    Ok(None) => {}
                    Err(LinkError::Closed) => {
                        shared.request_shutdown(stop_deadline, "control socket closed");
                        return;
                    }
                    Err(e) => shared.log(
                        LogLevel::Warn,
                        "ember::worker",
                        format!("bad control message: {e}"),
                    ),
                }
            }
        });
}
