//! Crash reports: handlers for fatal signals that send a pre-encoded
//! `Failed(Crashed)` frame to the parent, then let the signal kill the
//! process.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::OnceLock;

use nix::sys::signal::Signal;

use super::process;
use crate::protocol::{Failure, FailureKind, FromWorker, Message, Stage};

pub(super) static STAGE: AtomicU8 = AtomicU8::new(Stage::Launch as u8);
static CRASH_FD: AtomicI32 = AtomicI32::new(-1);
static CRASH_FRAMES: OnceLock<Vec<(c_int, u8, Vec<u8>)>> = OnceLock::new();

const FATAL: [Signal; 6] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGABRT,
    Signal::SIGSYS,
];
const STAGES: [Stage; 5] = [
    Stage::Launch,
    Stage::Load,
    Stage::Start,
    Stage::Serve,
    Stage::Stop,
];

fn signal_description(s: Signal) -> &'static str {
    match s {
        Signal::SIGSEGV => "segmentation fault",
        Signal::SIGBUS => "bus error",
        Signal::SIGILL => "illegal instruction",
        Signal::SIGFPE => "arithmetic exception",
        Signal::SIGABRT => "aborted",
        Signal::SIGSYS => "bad system call",
        _ => "fatal signal",
    }
}

/// Sends a report frame to the parent from a signal handler: one
/// non-blocking `send` (async-signal-safe) of bytes encoded before the
/// handler was installed; a failure is ignored (the exit status remains).
pub(super) fn send_from_handler(frame: &[u8]) {
    let fd = CRASH_FD.load(Ordering::Relaxed);
    // SAFETY: `send` is async-signal-safe; `frame` is immutable data that
    // lives for the process (a `OnceLock` set before the handler was
    // installed) and `send` reads at most `frame.len()` bytes of it.
    unsafe {
        libc::send(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
}

extern "C" fn on_fatal_signal(sig: c_int) {
    let stage = STAGE.load(Ordering::Relaxed);
    if let Some(frames) = CRASH_FRAMES.get() {
        if let Some((_, _, f)) = frames.iter().find(|(s, st, _)| *s == sig && *st == stage) {
            send_from_handler(f);
        }
    }
    // The handler was installed with SA_RESETHAND, so the disposition is the
    // default again: re-raise so the process dies of this very signal and
    // the parent sees it in the wait status.
    // SAFETY: `raise` is async-signal-safe.
    unsafe { libc::raise(sig) };
}

pub(super) fn install_crash_handlers(sock: &OwnedFd) -> Result<(), process::ProcessError> {
    let mut frames = Vec::new();
    for sig in FATAL {
        for stage in STAGES {
            let msg = FromWorker::Failed(Failure {
                stage,
                kind: FailureKind::Crashed,
                message: format!("killed by {sig} ({})", signal_description(sig)),
            });
            frames.push((sig as c_int, stage as u8, msg.encode()));
        }
    }
    let _ = CRASH_FRAMES.set(frames);
    CRASH_FD.store(sock.as_raw_fd(), Ordering::Relaxed);
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let act = SigAction::new(
        SigHandler::Handler(on_fatal_signal),
        SaFlags::SA_RESETHAND | SaFlags::SA_ONSTACK,
        SigSet::empty(),
    );
    for sig in FATAL {
        // SAFETY: the handler only calls async-signal-safe functions (send,
        // raise) and reads data initialized before installation.
        unsafe { sigaction(sig, &act) }.map_err(|source| process::ProcessError::Sys {
            call: "sigaction",
            source,
        })?;
    }
    Ok(())
}
