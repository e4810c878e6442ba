//! The start deadline: a `SIGALRM` timer while the module loads, then the
//! control thread's timer until the module is ready.

use std::ffi::c_int;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::crash::send_from_handler;
use super::exit;
use super::shared::Shared;
use crate::protocol::{Failure, FailureKind, FromWorker, Message, Stage};

/// Frame sent by [`on_load_deadline`]: `Failed(Load, NeverReady)`.
static LOAD_DEADLINE_FRAME: OnceLock<Vec<u8>> = OnceLock::new();

extern "C" fn on_load_deadline(_sig: c_int) {
    if let Some(f) = LOAD_DEADLINE_FRAME.get() {
        send_from_handler(f);
    }
    // SAFETY: `_exit` is async-signal-safe.
    unsafe { libc::_exit(exit::NEVER_READY) }
}

/// Arms `ITIMER_REAL` to fire once after `after` (zero disarms it; a
/// non-zero wait shorter than the timer's resolution fires after 1 us).
fn set_real_timer(after: Duration) {
    let after = if after.is_zero() {
        after
    } else {
        after.max(Duration::from_micros(1))
    };
    let value = libc::timeval {
        tv_sec: after.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        // Below 1_000_000: fits every `suseconds_t`.
        tv_usec: after.subsec_micros() as libc::suseconds_t,
    };
    let t = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: value,
    };
    // SAFETY: `t` is a valid itimerval; the old value is not asked for.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut()) };
}

/// Arms `SIGALRM` for what is left of the start deadline while the module
/// loads: if the loader has not returned by then (a library constructor
/// that never does), the handler reports `NeverReady` (stage `Load`) and
/// ends the process.
pub(super) fn arm_load_deadline(shared: &Shared, launched: Instant, deadline: Duration) {
    let left = (launched + deadline).saturating_duration_since(Instant::now());
    if left.is_zero() {
        shared.fail(
            Stage::Load,
            FailureKind::NeverReady,
            format!("not ready within {deadline:?} (limits.start_deadline)"),
            exit::NEVER_READY,
        );
    }
    let frame = FromWorker::Failed(Failure {
        stage: Stage::Load,
        kind: FailureKind::NeverReady,
        message: format!("not ready within {deadline:?} (limits.start_deadline): still loading"),
    });
    let _ = LOAD_DEADLINE_FRAME.set(frame.encode());
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let act = SigAction::new(
        SigHandler::Handler(on_load_deadline),
        SaFlags::SA_RESETHAND,
        SigSet::empty(),
    );
    // SAFETY: the handler only calls async-signal-safe functions (send,
    // _exit) and reads data initialized before installation.
    if unsafe { sigaction(Signal::SIGALRM, &act) }.is_ok() {
        set_real_timer(left);
    }
}

/// Stops the load timer and gives `SIGALRM` back its default disposition,
/// as the module must find it.
pub(super) fn disarm_load_deadline() {
    set_real_timer(Duration::ZERO);
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: SIG_DFL runs no code of ours.
    let _ = unsafe { sigaction(Signal::SIGALRM, &dfl) };
}

/// How long the start deadline still leaves, while the module is neither
/// ready nor stopping; fails the instance (`NeverReady`) once it has passed.
pub(super) fn ready_wait(
    shared: &'static Shared,
    ready_by: Instant,
    deadline: Duration,
) -> Option<Duration> {
    if shared.ready.load(Ordering::Acquire) || shared.shutdown_requested.load(Ordering::Acquire) {
        return None;
    }
    let left = ready_by.saturating_duration_since(Instant::now());
    if left.is_zero() {
        shared.fail(
            Stage::Start,
            FailureKind::NeverReady,
            format!("not ready within {deadline:?} (limits.start_deadline)"),
            exit::NEVER_READY,
        );
    }
    Some(left)
}
