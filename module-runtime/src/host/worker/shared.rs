//! The state a launched worker shares between its main thread, its control
//! thread and the host callbacks the module calls: the report socket, the
//! shutdown request and deadline, the ready flag, queued attachments.

use std::ffi::c_void;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::timerfd::TimerFd;

use super::exit;
use crate::abi::FfiGrant;
use crate::protocol::{Failure, FailureKind, FromWorker, LogLevel, Message, Stage, State};
use crate::transport::send_packet;

pub(super) struct Shared {
    pub(super) sock: OwnedFd,
    pub(super) identity: String,
    /// The module said it is ready (reported once).
    pub(super) ready: AtomicBool,
    pub(super) shutdown_requested: AtomicBool,
    pub(super) shutdown_deadline: Mutex<Option<Instant>>,
    pub(super) shutdown_w: OwnedFd,
    pub(super) shutdown_r: OwnedFd,
    pub(super) last_error: Mutex<Option<String>>,
    /// Grants that arrived after launch, waiting for the module.
    pub(super) attached: Mutex<Vec<FfiGrant>>,
    pub(super) attach_w: OwnedFd,
    pub(super) attach_r: OwnedFd,
    /// Bumped after each `Attach` is queued; the module reads it through
    /// `HostApi::attach_seq` to notice new grants without a callback.
    pub(super) attach_seq: AtomicU64,
    /// The start deadline, armed by the control thread and disarmed by
    /// [`Shared::mark_ready`], so that a ready module's control thread is
    /// not woken by a deadline that no longer applies.
    pub(super) ready_timer: Option<TimerFd>,
}

// SAFETY: `FfiGrant` holds a pointer to a leaked, immutable name string and
// plain descriptor numbers; moving or sharing it across threads is sound.
unsafe impl Send for Shared {}
// SAFETY: as above; all mutable state is behind mutexes or atomics.
unsafe impl Sync for Shared {}

impl Shared {
    pub(super) fn send(&self, msg: &FromWorker) {
        if send_packet(self.sock.as_fd(), &msg.encode(), &[]).is_err() {
            // The parent is gone or not listening: keep the record on stderr.
            eprintln!("[{}] {msg:?}", self.identity);
        }
    }

    pub(super) fn transition(&self, state: State, detail: impl Into<String>) {
        self.send(&FromWorker::Transition {
            state,
            detail: detail.into(),
        });
    }

    pub(super) fn log(&self, level: LogLevel, target: &str, message: impl Into<String>) {
        self.send(&FromWorker::Log {
            level,
            target: target.to_owned(),
            message: message.into(),
        });
    }

    /// Reports a failure and ends the process with `code`.
    pub(super) fn fail(
        &self,
        stage: Stage,
        kind: FailureKind,
        message: impl Into<String>,
        code: i32,
    ) -> ! {
        self.send(&FromWorker::Failed(Failure {
            stage,
            kind,
            message: message.into(),
        }));
        // SAFETY: `_exit` ends the process immediately without running
        // destructors or atexit handlers of the (possibly broken) module.
        unsafe { libc::_exit(code) }
    }

    pub(super) fn take_error(&self, fallback: &str) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| fallback.to_owned())
    }

    pub(super) fn mark_ready(&self) {
        // AcqRel: only the first call reports; the control thread's Acquire
        // load sees it.
        if !self.ready.swap(true, Ordering::AcqRel) {
            if let Some(t) = &self.ready_timer {
                // Armed before the module's code ran (start_control_thread).
                let _ = t.unset();
            }
            self.transition(State::Ready, "");
        }
    }

    /// Requests shutdown with `deadline` (or shortens an existing one).
    pub(super) fn request_shutdown(&'static self, deadline: Duration, why: &str) {
        self.shutdown(deadline, why, false);
    }

    /// Requests shutdown unless it already was (the module's `serve`
    /// returned on its own).
    pub(super) fn serve_returned(&'static self, deadline: Duration) {
        self.shutdown(deadline, "serve returned", true);
    }

    fn shutdown(&'static self, deadline: Duration, why: &str, only_first: bool) {
        let at = Instant::now() + deadline;
        {
            // The lock orders the `Stopping` report before anything the
            // module (or the main thread) does once it sees the request.
            let mut d = self
                .shutdown_deadline
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if d.is_some_and(|old| only_first || old <= at) {
                return;
            }
            *d = Some(at);
            if !self.shutdown_requested.load(Ordering::Acquire) {
                self.transition(State::Stopping, why);
                // Release: pairs with the Acquire in `host_shutdown_remaining_ms`.
                self.shutdown_requested.store(true, Ordering::Release);
                let _ = nix::unistd::write(self.shutdown_w.as_fd(), b"x");
            }
        }
        std::thread::spawn(move || {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let current = *self
                .shutdown_deadline
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if current.is_some_and(|c| c <= Instant::now()) {
                self.fail(
                    Stage::Stop,
                    FailureKind::StopDeadlineExceeded,
                    format!("still running {deadline:?} after the stop request"),
                    exit::STOP_DEADLINE,
                );
            }
        });
    }
}

pub(super) static SHARED: OnceLock<Shared> = OnceLock::new();

pub(super) fn shared_from(ctx: *const c_void) -> &'static Shared {
    let _ = ctx;
    SHARED
        .get()
        .expect("host callbacks are only reachable after SHARED is set")
}
