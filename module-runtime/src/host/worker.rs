//! The worker: a forked child of the zygote that waits warm for a launch
//! order, then becomes one instance of one module and reports every
//! lifecycle transition and failure to its parent. Stopping the module ends
//! the process; libraries are never unloaded.

use std::ffi::{c_int, c_void};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::time::TimeSpec;
use nix::sys::timer::Expiration;
use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::{loader, plugins, process, sandbox};
use crate::abi::{self, FfiGrant, FfiStr, GrantKind, HostApi, PluginRef};
use crate::manifest::Manifest;
use crate::protocol::{
    self, Failure, FailureKind, FromWorker, LaunchOrder, LogLevel, Message, Stage, State, ToWorker,
    WorkerChannel,
};

/// Exit codes of a worker process (also documented in `docs/abi.md`).
pub mod exit {
    /// The module stopped cleanly (or an idle worker was told to stop).
    pub const OK: i32 = 0;
    /// The launch order was malformed, or the control socket broke.
    pub const LAUNCH: i32 = 10;
    /// The artifact could not be loaded (ELF, dlopen, symbol, ABI, SDK).
    pub const LOAD: i32 = 11;
    /// `start` failed or panicked.
    pub const START: i32 = 12;
    /// `serve` failed or panicked.
    pub const SERVE: i32 = 13;
    /// `stop` failed or panicked.
    pub const STOP: i32 = 14;
    /// Not ready within the start deadline.
    pub const NEVER_READY: i32 = 15;
    /// Still running at the stop deadline.
    pub const STOP_DEADLINE: i32 = 16;
    /// Memory limit exceeded. No longer used by the worker itself: the
    /// host enforces `limits.memory` (a cgroup, or emberd's memory watch,
    /// which kills with `SIGKILL`); kept so the number is not reused.
    pub const MEMORY: i32 = 17;
}

/// Slack added to the address-space cap on top of `limits.memory`: thread
/// stacks and malloc arenas reserve far more address space than they use.
const ADDRESS_SPACE_SLACK: u64 = 4 << 30;

struct Shared {
    sock: OwnedFd,
    identity: String,
    /// The module said it is ready (reported once).
    ready: AtomicBool,
    shutdown_requested: AtomicBool,
    shutdown_deadline: Mutex<Option<Instant>>,
    shutdown_w: OwnedFd,
    shutdown_r: OwnedFd,
    last_error: Mutex<Option<String>>,
    /// Grants that arrived after launch, waiting for the module.
    attached: Mutex<Vec<FfiGrant>>,
    attach_w: OwnedFd,
    attach_r: OwnedFd,
    /// Bumped after each `Attach` is queued; the module reads it through
    /// `HostApi::attach_seq` to notice new grants without a callback.
    attach_seq: AtomicU64,
    /// The start deadline, armed by the control thread and disarmed by
    /// [`Shared::mark_ready`], so that a ready module's control thread is
    /// not woken by a deadline that no longer applies.
    ready_timer: Option<TimerFd>,
}

// SAFETY: `FfiGrant` holds a pointer to a leaked, immutable name string and
// plain descriptor numbers; moving or sharing it across threads is sound.
unsafe impl Send for Shared {}
// SAFETY: as above; all mutable state is behind mutexes or atomics.
unsafe impl Sync for Shared {}

static STAGE: AtomicU8 = AtomicU8::new(Stage::Launch as u8);
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

impl Shared {
    fn send(&self, msg: &FromWorker) {
        if protocol::send_frame(self.sock.as_fd(), &msg.encode(), &[]).is_err() {
            // The parent is gone or not listening: keep the record on stderr.
            eprintln!("[{}] {msg:?}", self.identity);
        }
    }

    fn transition(&self, state: State, detail: impl Into<String>) {
        self.send(&FromWorker::Transition {
            state,
            detail: detail.into(),
        });
    }

    fn log(&self, level: LogLevel, target: &str, message: impl Into<String>) {
        self.send(&FromWorker::Log {
            level,
            target: target.to_owned(),
            message: message.into(),
        });
    }

    /// Reports a failure and ends the process with `code`.
    fn fail(&self, stage: Stage, kind: FailureKind, message: impl Into<String>, code: i32) -> ! {
        self.send(&FromWorker::Failed(Failure {
            stage,
            kind,
            message: message.into(),
        }));
        // SAFETY: `_exit` ends the process immediately without running
        // destructors or atexit handlers of the (possibly broken) module.
        unsafe { libc::_exit(code) }
    }

    fn take_error(&self, fallback: &str) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| fallback.to_owned())
    }

    fn mark_ready(&self) {
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
    fn request_shutdown(&'static self, deadline: Duration, why: &str) {
        self.shutdown(deadline, why, false);
    }

    /// Requests shutdown unless it already was (the module's `serve`
    /// returned on its own).
    fn serve_returned(&'static self, deadline: Duration) {
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

static SHARED: OnceLock<Shared> = OnceLock::new();

fn shared_from(ctx: *const c_void) -> &'static Shared {
    let _ = ctx;
    SHARED
        .get()
        .expect("host callbacks are only reachable after SHARED is set")
}

unsafe extern "C" fn host_ready(ctx: *const c_void) {
    shared_from(ctx).mark_ready();
}

unsafe extern "C" fn host_log(ctx: *const c_void, level: u32, target: FfiStr, message: FfiStr) {
    // SAFETY: the module passes strings valid for the call.
    let (t, m) = unsafe { (target.to_string_lossy(), message.to_string_lossy()) };
    shared_from(ctx).log(LogLevel::from_u32(level), &t, m);
}

unsafe extern "C" fn host_error(ctx: *const c_void, message: FfiStr) {
    // SAFETY: as in `host_log`.
    let m = unsafe { message.to_string_lossy() };
    *shared_from(ctx)
        .last_error
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(m);
}

unsafe extern "C" fn host_shutdown_remaining_ms(ctx: *const c_void) -> i64 {
    let s = shared_from(ctx);
    if !s.shutdown_requested.load(Ordering::Acquire) {
        return -1;
    }
    let d = *s
        .shutdown_deadline
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    d.map_or(0, |d| {
        i64::try_from(d.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(i64::MAX)
    })
}

unsafe extern "C" fn host_plugin_lookup(
    _ctx: *const c_void,
    name: FfiStr,
    table_version: u32,
    out: *mut PluginRef,
) -> i32 {
    if out.is_null() {
        return abi::LOOKUP_NOT_FOUND;
    }
    // SAFETY: the module passes a name valid for the call.
    let name = unsafe { name.to_string_lossy() };
    // SAFETY: non-null out-pointer provided by the module for this call.
    let out = unsafe { &mut *out };
    plugins::lookup(&name, table_version, out)
}

/// Sends a report frame to the parent from a signal handler: one
/// non-blocking `send` (async-signal-safe) of bytes encoded before the
/// handler was installed; a failure is ignored (the exit status remains).
fn send_from_handler(frame: &[u8]) {
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

fn install_crash_handlers(sock: &OwnedFd) -> Result<(), process::ProcessError> {
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

fn statm_size_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().next()?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64);
    Some(pages * page)
}

/// The worker's part of `limits.memory` where the host enforces it by
/// sampling (no cgroup holds it): a backstop that costs nothing at run
/// time. The address space is capped at what is mapped now (the zygote's
/// mappings, a plugin's shared tables among them) plus the limit plus
/// [`ADDRESS_SPACE_SLACK`], so a module allocating faster than the host
/// samples cannot take the machine's memory. The limit itself is the
/// host's: it counts the module's private memory, which the worker does not
/// watch (a thread doing so would wake the idle module).
fn cap_address_space(limit: u64) {
    if let Some(vsz) = statm_size_bytes() {
        let cap = vsz
            .saturating_add(limit)
            .saturating_add(ADDRESS_SPACE_SLACK);
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, cap, cap);
    }
}

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
fn arm_load_deadline(shared: &Shared, launched: Instant, deadline: Duration) {
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
fn disarm_load_deadline() {
    set_real_timer(Duration::ZERO);
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: SIG_DFL runs no code of ours.
    let _ = unsafe { sigaction(Signal::SIGALRM, &dfl) };
}

/// The worker's one helper thread: reads the control socket (`Stop`,
/// `Attach`), turns SIGTERM/SIGINT into a graceful stop, and enforces the
/// start deadline, counted from `launched` (when the launch order arrived;
/// [`arm_load_deadline`] covers the load itself): a module not ready by then
/// is reported `NeverReady` and the process ends. One thread for all three:
/// a thread start is a noticeable part of a launch on a small VM.
fn start_control_thread(
    shared: &'static Shared,
    chan: WorkerChannel,
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
                match chan.recv() {
                    Ok((ToWorker::Stop { deadline }, _)) => {
                        shared.request_shutdown(deadline, "stop requested")
                    }
                    Ok((ToWorker::Attach(grants), fds)) => attach(shared, &manifest, grants, fds),
                    Ok((ToWorker::Launch(_), _)) => shared.log(
                        LogLevel::Warn,
                        "ember::worker",
                        "ignoring a second launch order",
                    ),
                    Err(protocol::ChannelError::Closed) => {
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

/// How long the start deadline still leaves, while the module is neither
/// ready nor stopping; fails the instance (`NeverReady`) once it has passed.
fn ready_wait(shared: &'static Shared, ready_by: Instant, deadline: Duration) -> Option<Duration> {
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

/// Takes the host's own grants out of a launch order: applies `Stdio` (the
/// descriptor becomes fds 1 and 2, so the module's raw output lands in its
/// log), keeps the `Artifact` descriptor to load from, and returns the other
/// grants with their descriptors, in order.
fn take_host_grants(
    grants: Vec<protocol::Grant>,
    fds: Vec<OwnedFd>,
) -> (Vec<protocol::Grant>, Vec<OwnedFd>, Option<OwnedFd>) {
    let mut fds = fds.into_iter();
    let mut kept = (Vec::new(), Vec::new(), None);
    for g in grants {
        let mut mine: Vec<OwnedFd> = fds.by_ref().take(g.kind.fd_count()).collect();
        if g.kind == GrantKind::Artifact {
            kept.2 = mine.pop();
            continue;
        }
        if g.kind == GrantKind::Stdio {
            if let Some(log) = mine.first() {
                for target in [1, 2] {
                    // SAFETY: `log` is open; dup2 replaces descriptors 1
                    // and 2, which no Rust object in the worker owns.
                    unsafe { libc::dup2(log.as_raw_fd(), target) };
                }
            }
            continue;
        }
        kept.0.push(g);
        kept.1.extend(mine);
    }
    kept
}

/// Socket activation for modules that expect it: the listeners also appear
/// as descriptors 3, 4, … with `LISTEN_FDS`, `LISTEN_FDNAMES` and
/// `LISTEN_PID` set, as systemd would pass them (the SDK's
/// `ModuleContext::tcp_listener` hands out the same descriptors by name: use
/// one or the other). Any `LISTEN_*` inherited from emberd is removed.
/// Runs before any thread exists, so changing the environment is sound.
fn socket_activation(
    chan: WorkerChannel,
    grants: &[protocol::Grant],
    mut fds: Vec<OwnedFd>,
) -> (WorkerChannel, Vec<OwnedFd>) {
    for var in ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"] {
        std::env::remove_var(var);
    }
    let mut at = 0;
    let mut listeners = Vec::new();
    let mut names = Vec::new();
    for g in grants {
        if g.kind == GrantKind::Listener {
            listeners.push(at);
            names.push(g.name.as_str());
        }
        at += g.kind.fd_count();
    }
    let mut control = chan.into_inner();
    let placed = process::place_listeners(&mut control, &mut fds, &listeners);
    let chan = WorkerChannel::new(control);
    match placed {
        Ok(0) => {}
        Ok(n) => {
            std::env::set_var("LISTEN_PID", std::process::id().to_string());
            std::env::set_var("LISTEN_FDS", n.to_string());
            std::env::set_var("LISTEN_FDNAMES", names.join(":"));
        }
        Err(e) => {
            let _ = chan.send(
                &FromWorker::Failed(Failure {
                    stage: Stage::Launch,
                    kind: FailureKind::BadLaunchOrder,
                    message: format!("placing listeners at descriptor 3: {e}"),
                }),
                &[],
            );
            idle_exit(exit::LAUNCH)
        }
    }
    (chan, fds)
}

/// Turns grants and their descriptors into FFI grants, leaking the names
/// and handing over the descriptors.
fn ffi_grants(grants: &[protocol::Grant], fds: Vec<OwnedFd>) -> Vec<FfiGrant> {
    let mut fds = fds.into_iter();
    let mut out = Vec::with_capacity(grants.len());
    for g in grants {
        let mut raw = [-1 as c_int; 2];
        for slot in raw.iter_mut().take(g.kind.fd_count()) {
            *slot = fds.next().map_or(-1, IntoRawFd::into_raw_fd);
        }
        let name: &'static str = Box::leak(g.name.clone().into_boxed_str());
        out.push(FfiGrant {
            kind: g.kind as u32,
            name: FfiStr::new(name),
            fds: raw,
            nfds: g.kind.fd_count() as u32,
        });
    }
    out
}

/// Validates an `Attach` and queues its grants for the module.
fn attach(shared: &Shared, manifest: &Manifest, grants: Vec<protocol::Grant>, fds: Vec<OwnedFd>) {
    if fds.len() != protocol::fd_count(&grants) {
        return shared.log(
            LogLevel::Warn,
            "ember::worker",
            format!(
                "ignoring attach: {} descriptors for {} expected",
                fds.len(),
                protocol::fd_count(&grants)
            ),
        );
    }
    if let Some(g) = grants.iter().find(|g| {
        matches!(g.kind, GrantKind::Stdio | GrantKind::Artifact)
            || !manifest.declares(g.kind, &g.name)
    }) {
        return shared.log(
            LogLevel::Warn,
            "ember::worker",
            format!(
                "ignoring attach: grant {:?} `{}` is not declared in the manifest",
                g.kind, g.name
            ),
        );
    }
    let n = grants.len();
    {
        // Queue, bump and ring under the queue's lock: a taker (which drains
        // the doorbell under the same lock once the queue is empty) can
        // never empty the queue between our push and our ring and leave a
        // stale byte that wakes waiters with nothing new.
        let mut q = shared.attached.lock().unwrap_or_else(|p| p.into_inner());
        q.extend(ffi_grants(&grants, fds));
        // Release: a module that reads the new value (Acquire) and then
        // takes the queue finds these grants (the mutex orders them too).
        shared.attach_seq.fetch_add(1, Ordering::Release);
        let _ = nix::unistd::write(shared.attach_w.as_fd(), b"a");
    }
    shared.log(
        LogLevel::Debug,
        "ember::worker",
        format!("attached {n} grants"),
    );
}

unsafe extern "C" fn host_take_attached(
    ctx: *const c_void,
    out: *mut FfiGrant,
    cap: usize,
) -> usize {
    let s = shared_from(ctx);
    if out.is_null() || cap == 0 {
        return 0;
    }
    let mut q = s.attached.lock().unwrap_or_else(|p| p.into_inner());
    let n = q.len().min(cap);
    for (i, g) in q.drain(..n).enumerate() {
        // SAFETY: the module passes room for `cap` grants at `out`, and i < n <= cap.
        unsafe { out.add(i).write(g) };
    }
    if q.is_empty() {
        // Drain the doorbell while holding the queue lock, so a concurrent
        // attach re-arms it after we emptied it.
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(s.attach_r.as_fd(), &mut buf), Ok(k) if k > 0) {}
    }
    n
}

fn idle_exit(code: i32) -> ! {
    // SAFETY: ends the process without running destructors of inherited
    // (zygote) state, which the worker does not own.
    unsafe { libc::_exit(code) }
}

/// Runs a worker on `control` (a `SOCK_SEQPACKET` socket to its parent).
/// Call right after `fork` in a single-threaded child, once the forking
/// process's own descriptors are closed (every other inherited descriptor is
/// a plugin's and stays open); never returns. With `parent`, the worker
/// waits until that process is its parent (see
/// [`process::die_with_parent`]) and dies with it.
pub fn run(control: OwnedFd, parent: Option<nix::unistd::Pid>) -> ! {
    // Reset inherited state before anything else.
    let _ = process::reset_signals();
    if !matches!(process::die_with_parent(parent), Ok(true)) {
        idle_exit(exit::LAUNCH);
    }
    process::set_process_name("ember: warm");
    let chan = WorkerChannel::new(control);
    let idle = FromWorker::Idle {
        pid: std::process::id(),
        abi_version: abi::ABI_VERSION,
        sdk_version: abi::SDK_VERSION.into(),
    };
    if chan.send(&idle, &[]).is_err() {
        idle_exit(exit::LAUNCH);
    }
    // Off the launch's clock: the default seccomp programs.
    sandbox::prepare();
    // Wait warm.
    let (order, fds) = loop {
        match chan.recv() {
            Ok((ToWorker::Launch(o), fds)) => break (o, fds),
            // Nothing to attach to yet: drop the descriptors.
            Ok((ToWorker::Attach(_), _)) => continue,
            Ok((ToWorker::Stop { .. }, _)) | Err(protocol::ChannelError::Closed) => {
                idle_exit(exit::OK)
            }
            Err(protocol::ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
                continue
            }
            // A launch order that did not arrive whole (descriptors cut
            // off, a garbled frame): said, not a silent exit.
            Err(e) => {
                let _ = chan.send(
                    &FromWorker::Failed(Failure {
                        stage: Stage::Launch,
                        kind: FailureKind::BadLaunchOrder,
                        message: format!(
                            "the launch order did not arrive whole: {}",
                            crate::sdk::error_chain(&e)
                        ),
                    }),
                    &[],
                );
                idle_exit(exit::LAUNCH)
            }
        }
    };
    launch(chan, order, fds)
}

fn launch(chan: WorkerChannel, order: LaunchOrder, fds: Vec<OwnedFd>) -> ! {
    // `limits.start_deadline` counts from here.
    let launched = Instant::now();
    let early_fail = |chan: &WorkerChannel, kind, msg: String| -> ! {
        let _ = chan.send(
            &FromWorker::Failed(Failure {
                stage: Stage::Launch,
                kind,
                message: msg,
            }),
            &[],
        );
        idle_exit(exit::LAUNCH)
    };
    let manifest = match Manifest::parse(&order.manifest) {
        Ok(m) => m,
        Err(e) => early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            crate::sdk::error_chain(&e),
        ),
    };
    if fds.len() != order.fd_count() {
        early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            format!(
                "launch order lists {} descriptors but {} arrived",
                order.fd_count(),
                fds.len()
            ),
        );
    }
    if let Some(g) = order
        .grants
        .iter()
        .find(|g| !manifest.declares(g.kind, &g.name))
    {
        early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            format!(
                "grant {:?} `{}` is not declared in the manifest",
                g.kind, g.name
            ),
        );
    }
    let (grants, fds, artifact_fd) = take_host_grants(order.grants, fds);
    let (chan, fds) = socket_activation(chan, &grants, fds);
    let order = LaunchOrder { grants, ..order };
    let identity = manifest.identity(order.replica);
    process::set_process_name(&format!("ember: {identity}"));

    // The sandbox, while this is the only thread and before any of the
    // module's code (its constructors included) is mapped.
    let report = match sandbox::apply(order.sandbox.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            let _ = chan.send(
                &FromWorker::Failed(Failure {
                    stage: Stage::Launch,
                    kind: FailureKind::Sandbox,
                    message: format!("sandbox: {}", crate::sdk::error_chain(&e)),
                }),
                &[],
            );
            idle_exit(exit::LAUNCH)
        }
    };
    let _ = chan.send(&FromWorker::Sandboxed(report), &[]);

    // SIGTERM/SIGINT are handled by the control thread through a signalfd;
    // block them before any thread exists so every thread inherits the mask.
    let sigs = process::block_signals(&[Signal::SIGTERM, Signal::SIGINT])
        .unwrap_or_else(|_| nix::sys::signal::SigSet::empty());
    let (shutdown_r, shutdown_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            format!("pipe2 failed: {e}"),
        ),
    };
    let (attach_r, attach_w) =
        match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK) {
            Ok(p) => p,
            Err(e) => early_fail(
                &chan,
                FailureKind::BadLaunchOrder,
                format!("pipe2 failed: {e}"),
            ),
        };
    let sock = match chan.fd().try_clone_to_owned() {
        Ok(s) => s,
        Err(e) => early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            format!("dup of control socket failed: {e}"),
        ),
    };
    let _ = SHARED.set(Shared {
        sock,
        identity: identity.clone(),
        ready: AtomicBool::new(false),
        shutdown_requested: AtomicBool::new(false),
        shutdown_deadline: Mutex::new(None),
        shutdown_w,
        shutdown_r,
        last_error: Mutex::new(None),
        attached: Mutex::new(Vec::new()),
        attach_w,
        attach_r,
        attach_seq: AtomicU64::new(0),
        ready_timer: TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
        )
        .ok(),
    });
    let Some(shared) = SHARED.get() else {
        idle_exit(exit::LAUNCH)
    };
    if let Err(e) = install_crash_handlers(&shared.sock) {
        shared.log(
            LogLevel::Warn,
            "ember::worker",
            format!("crash handlers not installed: {e}"),
        );
    }

    // Load.
    STAGE.store(Stage::Load as u8, Ordering::Relaxed);
    shared.transition(State::Loading, order.artifact.display().to_string());
    match manifest.limits.memory {
        Some(limit) if !order.memory_enforced => cap_address_space(limit),
        _ => {}
    }
    // The start deadline covers loading too. No thread can watch it while
    // the dynamic loader runs the library's constructors: it holds its lock
    // then, and a thread starting up (std registers thread-local
    // destructors through the loader) would wait on it. A timer signal
    // can.
    arm_load_deadline(shared, launched, manifest.limits.start_deadline);
    // From the descriptor when emberd sent one (the file behind the path may
    // be replaced meanwhile; the descriptor's content cannot change).
    let loaded = match &artifact_fd {
        Some(fd) => loader::load_module_as(
            std::path::Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())),
            &order.artifact,
        ),
        None => loader::load_module(&order.artifact),
    };
    // The mapping stays; the descriptor is not needed any more.
    drop(artifact_fd);
    disarm_load_deadline();
    let module = match loaded {
        Ok(m) => m,
        Err(e) => {
            let kind = match &e {
                loader::LoadError::Elf(_) => FailureKind::BadArtifact,
                loader::LoadError::Dlopen { .. } => FailureKind::DlopenFailed,
                loader::LoadError::MissingSymbol { .. }
                | loader::LoadError::NullDescriptor { .. } => FailureKind::MissingSymbol,
                _ => FailureKind::AbiMismatch,
            };
            shared.fail(Stage::Load, kind, crate::sdk::error_chain(&e), exit::LOAD)
        }
    };
    shared.transition(
        State::Loaded,
        format!(
            "{} (module-runtime {})",
            module.module_type(),
            module.sdk_version()
        ),
    );

    // Hand the grants over: names and descriptors leak into the module.
    let grants = ffi_grants(&order.grants, fds);
    let grants: &'static [FfiGrant] = Box::leak(grants.into_boxed_slice());
    let name: &'static str = Box::leak(manifest.name.clone().into_boxed_str());
    let version: &'static str = Box::leak(manifest.version.clone().into_boxed_str());
    let config: &'static str = Box::leak(manifest.config_toml().into_boxed_str());
    let host: &'static HostApi = Box::leak(Box::new(HostApi {
        abi_version: abi::ABI_VERSION,
        size: std::mem::size_of::<HostApi>() as u32,
        ctx: (shared as *const Shared).cast(),
        module_name: FfiStr::new(name),
        module_version: FfiStr::new(version),
        replica: order.replica,
        config_toml: FfiStr::new(config),
        grants: grants.as_ptr(),
        grants_len: grants.len(),
        shutdown_fd: shared.shutdown_r.as_raw_fd(),
        ready: host_ready,
        log: host_log,
        error: host_error,
        shutdown_remaining_ms: host_shutdown_remaining_ms,
        plugin_lookup: host_plugin_lookup,
        attach_fd: shared.attach_r.as_raw_fd(),
        take_attached: host_take_attached,
        attach_seq: shared.attach_seq.as_ptr().cast_const(),
    }));

    start_control_thread(
        shared,
        chan,
        sigs,
        manifest.limits.stop_deadline,
        (launched, manifest.limits.start_deadline),
        manifest.clone(),
    );

    // start
    STAGE.store(Stage::Start as u8, Ordering::Relaxed);
    shared.transition(State::Starting, "");
    let mut instance: *mut c_void = std::ptr::null_mut();
    // SAFETY: validated descriptor; `host` lives for the process; `instance`
    // is a valid out-pointer.
    let rc = unsafe { (module.descriptor.start)(host, &mut instance) };
    check(shared, rc, Stage::Start, exit::START);
    if instance.is_null() {
        shared.fail(
            Stage::Start,
            FailureKind::ModuleError,
            "start returned no instance",
            exit::START,
        );
    }

    // serve
    STAGE.store(Stage::Serve as u8, Ordering::Relaxed);
    shared.transition(State::Serving, "");
    // SAFETY: `instance` came from a successful `start`; main thread only.
    let rc = unsafe { (module.descriptor.serve)(instance) };
    check(shared, rc, Stage::Serve, exit::SERVE);

    // stop
    STAGE.store(Stage::Stop as u8, Ordering::Relaxed);
    // If the module finished on its own, `stop` gets the normal deadline.
    shared.serve_returned(manifest.limits.stop_deadline);
    // SAFETY: as for `serve`; the instance is consumed by `stop`.
    let rc = unsafe { (module.descriptor.stop)(instance) };
    check(shared, rc, Stage::Stop, exit::STOP);
    shared.transition(State::Stopped, "");
    idle_exit(exit::OK)
}

fn check(shared: &Shared, rc: i32, stage: Stage, code: i32) {
    match rc {
        abi::CALL_OK => {}
        abi::CALL_PANIC => shared.fail(
            stage,
            FailureKind::Panic,
            shared.take_error("panicked"),
            code,
        ),
        abi::CALL_ERROR => shared.fail(
            stage,
            FailureKind::ModuleError,
            shared.take_error("returned an error"),
            code,
        ),
        other => shared.fail(
            stage,
            FailureKind::ModuleError,
            format!("returned invalid status {other}"),
            code,
        ),
    }
}
