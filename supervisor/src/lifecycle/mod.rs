//! The life of one module instance: a state machine driven by events and
//! the clock, acting on the OS only through [`WorkerOs`].
//!
//! ```text
//! Installing ─start─▶ Starting ─ready─▶ Running ─stop─▶ Stopping ─exit─▶ Stopped
//!                        │  ▲              │
//!            crash/timeout│  │back-off      │crash
//!                        ▼  │              ▼
//!                    BackOff / CrashLoop ◀─┘        fatal ─▶ Failed{reason}
//! ```
//!
//! Launching is asynchronous: [`WorkerOs::launch`] only asks, and the
//! outcome comes back as [`Event::Launched`] or [`Event::LaunchFailed`]
//! tagged with the attempt number, so late answers from an abandoned attempt
//! are recognized and their worker killed.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::prom::Latencies;

/// Restart and deadline policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Launch to ready must take at most this long.
    pub start_timeout: Duration,
    /// Graceful stop to exit must take at most this long before SIGKILL.
    pub stop_timeout: Duration,
    /// Delay before the first restart.
    pub backoff_initial: Duration,
    /// Largest restart delay.
    pub backoff_max: Duration,
    /// Consecutive failed runs after which the state is `CrashLoop`.
    pub crash_loop_after: u32,
    /// Running this long resets the consecutive-failure count.
    pub stable_after: Duration,
    /// A worker that exits (or fails to start) is started again after its
    /// back-off. `false` for a container's instance: its worker's exit is
    /// final (`Failed`), the kubelet decides about a restart.
    pub restart: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            start_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            crash_loop_after: 5,
            stable_after: Duration::from_secs(10),
            restart: true,
        }
    }
}

impl Policy {
    /// Delay before restart number `failures` (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(20);
        self.backoff_initial
            .saturating_mul(1u32 << shift)
            .min(self.backoff_max)
    }
}

/// Where a module is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Artifact being copied, not started yet.
    Installing,
    /// Not launched: a service it requires (a non-optional import) has no
    /// running exporter yet. Launched when one runs.
    Waiting,
    /// Launch asked for, not ready yet.
    Starting,
    /// Ready.
    Running,
    /// Asked to stop, not exited yet.
    Stopping,
    /// Not running, by request.
    Stopped,
    /// Crashed; waiting to restart.
    #[serde(rename = "backoff")]
    BackOff,
    /// Crashed repeatedly; waiting (longer) to restart.
    #[serde(rename = "crashloop")]
    CrashLoop,
    /// Will not be restarted.
    Failed,
}

impl State {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Installing => "installing",
            State::Waiting => "waiting",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::BackOff => "backoff",
            State::CrashLoop => "crashloop",
            State::Failed => "failed",
        }
    }
}

impl State {
    /// One state for several replicas: their common state, else the most
    /// pressing one (failures first, then transitions, then steady states).
    pub fn aggregate(states: impl IntoIterator<Item = State>) -> State {
        let rank = |s: State| match s {
            State::Failed => 0,
            State::CrashLoop => 1,
            State::BackOff => 2,
            State::Stopping => 3,
            State::Starting => 4,
            State::Installing => 5,
            State::Waiting => 6,
            State::Running => 7,
            State::Stopped => 8,
        };
        states
            .into_iter()
            .min_by_key(|s| rank(*s))
            .unwrap_or(State::Stopped)
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
    /// The status could not be collected.
    Unknown,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
            ExitStatus::Unknown => write!(f, "exited"),
        }
    }
}

/// Something that happened to the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A worker now runs attempt `attempt`.
    Launched {
        /// Attempt number given to [`WorkerOs::launch`].
        attempt: u64,
        /// The worker's pid.
        pid: i32,
    },
    /// No worker could be had or the launch order was refused.
    LaunchFailed {
        /// Attempt number.
        attempt: u64,
        /// Why.
        reason: String,
        /// Retrying cannot help (bad artifact, ABI mismatch).
        permanent: bool,
    },
    /// The worker reported the module ready.
    Ready {
        /// Attempt number.
        attempt: u64,
    },
    /// The worker reported a failure; it exits next.
    Failed {
        /// Attempt number.
        attempt: u64,
        /// Why.
        reason: String,
        /// Restarting cannot help (bad artifact, ABI mismatch).
        permanent: bool,
        /// emberd's memory limit detection (its watch or the cgroup's OOM
        /// kill count) reported it, not the worker: the one source of a
        /// container's `oom` (a module's own message may say anything).
        oom: bool,
    },
    /// The worker exited.
    Exited {
        /// Attempt number.
        attempt: u64,
        /// How.
        status: ExitStatus,
    },
}

/// The OS side of the lifecycle. Every call only asks; results arrive as
/// [`Event`]s.
pub trait WorkerOs {
    /// Launch `module` into a worker, as attempt `attempt`.
    fn launch(&mut self, module: &str, attempt: u64);
    /// Ask the worker to stop (SIGTERM).
    fn terminate(&mut self, pid: i32);
    /// Kill the worker (SIGKILL).
    fn kill(&mut self, pid: i32);
}

/// A state change, as a [`Lifecycle`] reports it to its [`Observer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition<'a> {
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// Why (a crash, a failure, a wait), when the new state has a reason.
    pub reason: Option<&'a str>,
    /// The worker concerned: the running one, or the one that just exited.
    pub pid: Option<i32>,
    /// Restarts so far.
    pub restarts: u64,
}

/// Told of every state change of one lifecycle, as it happens (emberd's
/// event hub: `daemon/events.rs`).
pub struct Observer(Box<dyn Fn(&Transition<'_>) + Send + Sync>);

impl Observer {
    /// An observer calling `f` on each transition.
    pub fn new(f: impl Fn(&Transition<'_>) + Send + Sync + 'static) -> Self {
        Self(Box::new(f))
    }

    /// Reports one transition.
    pub fn notify(&self, t: &Transition<'_>) {
        (self.0)(t)
    }
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// One module instance's lifecycle.
#[derive(Debug)]
pub struct Lifecycle {
    name: String,
    policy: Policy,
    state: State,
    since: Instant,
    attempt: u64,
    pid: Option<i32>,
    /// When the current state times out (start, stop, back-off).
    deadline: Option<Instant>,
    /// Consecutive failed runs.
    failures: u32,
    /// Total restarts.
    restarts: u64,
    reason: Option<String>,
    last_error: Option<String>,
    /// Why the current worker is being killed or failing, reported when it
    /// exits.
    pending_reason: Option<(String, bool)>,
    ran_since: Option<Instant>,
    /// The last stop overran the stop deadline: the worker was killed
    /// (by our SIGKILL, or by its own fence at the deadline).
    killed_at_stop: bool,
    /// Launches asked for (first start and every restart).
    launches: u64,
    /// Launch-to-ready latencies of the launches that became ready.
    startups: Latencies,
    /// The current attempt's worker, kept after it exited (transitions
    /// name it).
    last_pid: Option<i32>,
    observer: Option<Observer>,
}

impl Lifecycle {
    /// Turns restarts off (see [`Policy::restart`]).
    pub fn without_restart(mut self) -> Self {
        self.policy.restart = false;
        self
    }

    /// A module that is being installed.
    pub fn new(name: impl Into<String>, policy: Policy, now: Instant) -> Self {
        Self {
            name: name.into(),
            policy,
            state: State::Installing,
            since: now,
            attempt: 0,
            pid: None,
            deadline: None,
            failures: 0,
            restarts: 0,
            reason: None,
            last_error: None,
            pending_reason: None,
            ran_since: None,
            killed_at_stop: false,
            launches: 0,
            startups: Latencies::default(),
            last_pid: None,
            observer: None,
        }
    }

    /// This lifecycle with `observer` told of each of its state changes.
    pub fn observed(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }
    /// When the current state was entered.
    pub fn since(&self) -> Instant {
        self.since
    }
    /// The worker's pid, while one runs.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }
    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }
    /// Why the module is failed / backing off.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }
    /// The last failure seen.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    /// When [`Lifecycle::on_tick`] must next be called.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
    /// The module name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Whether the last stop overran the stop deadline: the worker had
    /// not exited by then and was killed (our SIGKILL, or its own fence
    /// ending it with `StopDeadlineExceeded`).
    pub fn killed_at_stop(&self) -> bool {
        self.killed_at_stop
    }
    /// Launches asked for so far (the first start and every restart).
    pub fn launches(&self) -> u64 {
        self.launches
    }
    /// How long each launch that became ready took, launch to ready.
    pub fn startups(&self) -> &Latencies {
        &self.startups
    }

    fn enter(&mut self, state: State, now: Instant) {
        let from = self.state;
        self.state = state;
        self.since = now;
        if let (Some(o), true) = (&self.observer, from != state) {
            let reason = match state {
                State::Waiting | State::BackOff | State::CrashLoop | State::Failed => {
                    self.reason.as_deref()
                }
                _ => None,
            };
            o.notify(&Transition {
                from,
                to: state,
                reason,
                pid: self.pid.or(self.last_pid.filter(|_| {
                    matches!(from, State::Starting | State::Running | State::Stopping)
                })),
                restarts: self.restarts,
            });
        }
    }

    /// Starts (or restarts) the module.
    pub fn start(&mut self, now: Instant, os: &mut impl WorkerOs) {
        match self.state {
            State::Installing
            | State::Waiting
            | State::Stopped
            | State::Failed
            | State::BackOff
            | State::CrashLoop => self.launch(now, os),
            State::Starting | State::Running | State::Stopping => {}
        }
    }

    fn launch(&mut self, now: Instant, os: &mut impl WorkerOs) {
        self.attempt += 1;
        self.launches += 1;
        self.pid = None;
        self.last_pid = None;
        self.pending_reason = None;
        self.reason = None;
        self.ran_since = None;
        self.deadline = Some(now + self.policy.start_timeout);
        self.enter(State::Starting, now);
        os.launch(&self.name, self.attempt);
    }

    /// Holds a module that has not been launched (or is not running) until
    /// `start`: it waits, visibly and with `reason`, for something it needs.
    pub fn hold(&mut self, reason: String, now: Instant) {
        if self.pid.is_none() && self.state != State::Starting && self.state != State::Stopping {
            self.deadline = None;
            self.reason = Some(reason);
            self.enter(State::Waiting, now);
        }
    }

    /// Marks the module failed without launching it (its prerequisites,
    /// such as a listener, could not be set up).
    pub fn fail(&mut self, reason: String, now: Instant) {
        if self.pid.is_none() {
            self.attempt += 1;
            self.deadline = None;
            self.last_error = Some(reason.clone());
            self.reason = Some(reason);
            self.enter(State::Failed, now);
        }
    }

    /// Asks the module to stop; it is `Stopped` once its worker exited.
    pub fn stop(&mut self, now: Instant, os: &mut impl WorkerOs) {
        match (self.state, self.pid) {
            (State::Stopping, _) | (State::Stopped, _) => {}
            (_, Some(pid)) => {
                os.terminate(pid);
                self.deadline = Some(now + self.policy.stop_timeout);
                self.pending_reason = None;
                self.killed_at_stop = false;
                self.enter(State::Stopping, now);
            }
            (State::Starting, None) => {
                // The launch is in flight: wait for it to report (`Launched`:
                // stop that worker; `LaunchFailed`: done), so no worker or
                // cgroup of this replica outlives the stop.
                self.deadline = Some(now + self.policy.stop_timeout);
                self.pending_reason = None;
                self.killed_at_stop = false;
                self.enter(State::Stopping, now);
            }
            (_, None) => {
                // Nothing runs.
                self.attempt += 1;
                self.deadline = None;
                self.reason = None;
                self.killed_at_stop = false;
                self.enter(State::Stopped, now);
            }
        }
    }

    /// Feeds an event.
    pub fn on_event(&mut self, event: Event, now: Instant, os: &mut impl WorkerOs) {
        let current = self.attempt;
        match event {
            // Stopped while its launch was in flight: stop it now.
            Event::Launched { attempt, pid }
                if attempt == current && self.state == State::Stopping && self.pid.is_none() =>
            {
                self.pid = Some(pid);
                self.last_pid = Some(pid);
                os.terminate(pid);
            }
            Event::Launched { attempt, pid }
                if attempt != current || self.state != State::Starting =>
            {
                os.kill(pid);
            }
            Event::Launched { pid, .. } => {
                self.pid = Some(pid);
                self.last_pid = Some(pid);
            }
            Event::LaunchFailed { attempt, .. } if attempt != current => {}
            Event::LaunchFailed { .. } if self.state == State::Stopping && self.pid.is_none() => {
                self.deadline = None;
                self.enter(State::Stopped, now);
            }
            Event::LaunchFailed {
                reason, permanent, ..
            } => {
                if self.state == State::Starting {
                    self.failed_run(format!("launch failed: {reason}"), permanent, now, os);
                }
            }
            Event::Ready { attempt } if attempt != current => {}
            Event::Ready { .. } => {
                if self.state == State::Starting && self.pid.is_some() {
                    // `since`: when this launch was asked for.
                    self.startups
                        .observe(now.saturating_duration_since(self.since));
                    self.deadline = None;
                    self.ran_since = Some(now);
                    self.enter(State::Running, now);
                }
            }
            Event::Failed { attempt, .. } if attempt != current => {}
            Event::Failed {
                reason, permanent, ..
            } => {
                if self.pending_reason.is_none() {
                    self.pending_reason = Some((reason, permanent));
                }
            }
            Event::Exited { attempt, .. } if attempt != current => {}
            Event::Exited { status, .. } => self.exited(status, now, os),
        }
    }

    fn exited(&mut self, status: ExitStatus, now: Instant, os: &mut impl WorkerOs) {
        self.pid = None;
        match self.state {
            State::Stopping => {
                // A worker still running at its stop deadline is also ended
                // by its own fence (counted from the Stop it received, a
                // little after ours), racing our SIGKILL: either way the
                // deadline was overrun.
                if self.deadline.is_some_and(|d| now >= d) {
                    self.killed_at_stop = true;
                }
                self.deadline = None;
                self.enter(State::Stopped, now);
            }
            State::Starting | State::Running => {
                if let Some(ran) = self.ran_since {
                    if now.duration_since(ran) >= self.policy.stable_after {
                        self.failures = 0;
                    }
                }
                let (reason, permanent) = match self.pending_reason.take() {
                    Some((r, p)) => (r, p),
                    None => (format!("worker {status}"), false),
                };
                self.failed_run(reason, permanent, now, os);
            }
            _ => {}
        }
    }

    fn failed_run(
        &mut self,
        reason: String,
        permanent: bool,
        now: Instant,
        os: &mut impl WorkerOs,
    ) {
        if let Some(pid) = self.pid.take() {
            os.kill(pid);
        }
        self.last_error = Some(reason.clone());
        self.reason = Some(reason);
        self.ran_since = None;
        if permanent || !self.policy.restart {
            self.deadline = None;
            self.enter(State::Failed, now);
            return;
        }
        self.failures += 1;
        let delay = self.policy.backoff(self.failures);
        self.deadline = Some(now + delay);
        let state = if self.failures >= self.policy.crash_loop_after {
            State::CrashLoop
        } else {
            State::BackOff
        };
        self.enter(state, now);
    }

    /// Acts on a deadline that has passed.
    pub fn on_tick(&mut self, now: Instant, os: &mut impl WorkerOs) {
        let Some(deadline) = self.deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        self.deadline = None;
        match self.state {
            State::Starting => {
                let reason = format!(
                    "not ready within {} ms",
                    self.policy.start_timeout.as_millis()
                );
                match self.pid {
                    // The kill is confirmed by `Exited`, which reports the reason.
                    Some(pid) => {
                        os.kill(pid);
                        self.pending_reason = Some((reason, false));
                    }
                    None => {
                        // Abandon the attempt; a late `Launched` is killed.
                        self.attempt += 1;
                        self.failed_run(reason, false, now, os);
                    }
                }
            }
            State::Stopping => match self.pid {
                Some(pid) => {
                    os.kill(pid);
                    self.killed_at_stop = true;
                }
                None => {
                    // The launch never reported: give up on it (a late
                    // `Launched` is stale and gets killed).
                    self.attempt += 1;
                    self.enter(State::Stopped, now);
                }
            },
            State::BackOff | State::CrashLoop => {
                self.restarts += 1;
                self.launch(now, os);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct FakeOs {
        launches: Vec<(String, u64)>,
        terms: Vec<i32>,
        kills: Vec<i32>,
    }

    impl WorkerOs for FakeOs {
        fn launch(&mut self, module: &str, attempt: u64) {
            self.launches.push((module.into(), attempt));
        }
        fn terminate(&mut self, pid: i32) {
            self.terms.push(pid);
        }
        fn kill(&mut self, pid: i32) {
            self.kills.push(pid);
        }
    }

    fn policy() -> Policy {
        Policy {
            start_timeout: Duration::from_secs(2),
            stop_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            crash_loop_after: 3,
            stable_after: Duration::from_secs(10),
            restart: true,
        }
    }

    fn running(os: &mut FakeOs, t0: Instant) -> Lifecycle {
        let mut l = Lifecycle::new("m", policy(), t0);
        l.start(t0, os);
        let attempt = os.launches.last().unwrap().1;
        l.on_event(Event::Launched { attempt, pid: 10 }, t0, os);
        l.on_event(Event::Ready { attempt }, t0, os);
        assert_eq!(l.state(), State::Running);
        l
    }

    #[test]
    fn an_observer_sees_each_transition_with_the_crashed_pid() {
        use std::sync::{Arc, Mutex};
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        type Seen = (State, State, Option<String>, Option<i32>, u64);
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let mut l = Lifecycle::new("m", policy(), t0).observed(Observer::new(move |t| {
            log.lock()
                .unwrap()
                .push((t.from, t.to, t.reason.map(str::to_owned), t.pid, t.restarts))
        }));
        l.start(t0, &mut os);
        l.on_event(
            Event::Launched {
                attempt: 1,
                pid: 10,
            },
            t0,
            &mut os,
        );
        l.on_event(Event::Ready { attempt: 1 }, t0, &mut os);
        let exit = Event::Exited {
            attempt: 1,
            status: ExitStatus::Signal(9),
        };
        l.on_event(exit, t0, &mut os);
        l.on_tick(t0 + Duration::from_secs(1), &mut os);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                (State::Installing, State::Starting, None, None, 0),
                (State::Starting, State::Running, None, Some(10), 0),
                (
                    State::Running,
                    State::BackOff,
                    Some("worker killed by signal 9".into()),
                    Some(10),
                    0
                ),
                (State::BackOff, State::Starting, None, None, 1),
            ]
        );
    }

    #[test]
    fn starts_and_stops_gracefully() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = running(&mut os, t0);
        assert_eq!(l.pid(), Some(10));
        l.stop(t0, &mut os);
        assert_eq!(l.state(), State::Stopping);
        assert_eq!(os.terms, vec![10]);
        l.on_event(
            Event::Exited {
                attempt: 1,
                status: ExitStatus::Code(0),
            },
            t0,
            &mut os,
        );
        assert_eq!(l.state(), State::Stopped);
        assert!(os.kills.is_empty());
        assert!(!l.killed_at_stop());
        assert_eq!(l.deadline(), None);
    }

    #[test]
    fn stop_deadline_kills() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = running(&mut os, t0);
        l.stop(t0, &mut os);
        l.on_tick(t0 + Duration::from_millis(500), &mut os);
        assert!(os.kills.is_empty());
        l.on_tick(t0 + Duration::from_secs(1), &mut os);
        assert_eq!(os.kills, vec![10]);
        l.on_event(
            Event::Exited {
                attempt: 1,
                status: ExitStatus::Signal(9),
            },
            t0,
            &mut os,
        );
        assert_eq!(l.state(), State::Stopped);
        assert!(l.killed_at_stop());
        // A later stop that is obeyed says so.
        l.start(t0, &mut os);
        let attempt = os.launches.last().unwrap().1;
        l.on_event(Event::Launched { attempt, pid: 11 }, t0, &mut os);
        l.on_event(Event::Ready { attempt }, t0, &mut os);
        l.stop(t0, &mut os);
        l.on_event(
            Event::Exited {
                attempt,
                status: ExitStatus::Code(0),
            },
            t0,
            &mut os,
        );
        assert_eq!(l.state(), State::Stopped);
        assert!(!l.killed_at_stop());
        // Ended by its own fence at the deadline, before our tick: overrun
        // all the same.
        l.start(t0, &mut os);
        let attempt = os.launches.last().unwrap().1;
        l.on_event(Event::Launched { attempt, pid: 12 }, t0, &mut os);
        l.on_event(Event::Ready { attempt }, t0, &mut os);
        l.stop(t0, &mut os);
        l.on_event(
            Event::Exited {
                attempt,
                status: ExitStatus::Code(16),
            },
            t0 + Duration::from_secs(1),
            &mut os,
        );
        assert_eq!(l.state(), State::Stopped);
        assert!(l.killed_at_stop());
        assert_eq!(os.kills, vec![10]);
    }

    #[test]
    fn a_held_module_waits_without_a_deadline_until_started() {
        let (mut os, t0) = (FakeOs::default(), Instant::now());
        let mut l = Lifecycle::new("m", policy(), t0);
        l.hold("waiting for service kv".into(), t0);
        assert_eq!(l.state(), State::Waiting);
        assert_eq!(l.reason(), Some("waiting for service kv"));
        assert_eq!(l.deadline(), None);
        l.on_tick(t0 + Duration::from_secs(60), &mut os);
        assert!(os.launches.is_empty());
        l.start(t0, &mut os);
        assert_eq!(l.state(), State::Starting);
        assert_eq!(os.launches.len(), 1);
        // Never held once it runs; stopping a waiting module is immediate.
        let mut r = running(&mut os, t0);
        r.hold("x".into(), t0);
        assert_eq!(r.state(), State::Running);
        let mut w = Lifecycle::new("w", policy(), t0);
        w.hold("y".into(), t0);
        w.stop(t0, &mut os);
        assert_eq!(w.state(), State::Stopped);
    }

    #[test]
    fn crash_restarts_with_exponential_backoff_then_crash_loop() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = running(&mut os, t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for round in 1..=4u64 {
            let attempt = os.launches.last().unwrap().1;
            l.on_event(
                Event::Exited {
                    attempt,
                    status: ExitStatus::Signal(11),
                },
                now,
                &mut os,
            );
            assert!(l.reason().unwrap().contains("signal 11"));
            let d = l.deadline().unwrap() - now;
            delays.push(d);
            let expect = if round >= 3 {
                State::CrashLoop
            } else {
                State::BackOff
            };
            assert_eq!(l.state(), expect, "round {round}");
            // Nothing happens before the delay.
            l.on_tick(now + d - Duration::from_millis(1), &mut os);
            assert_eq!(os.launches.len() as u64, round);
            now += d;
            l.on_tick(now, &mut os);
            assert_eq!(l.state(), State::Starting);
            let attempt = os.launches.last().unwrap().1;
            l.on_event(
                Event::Launched {
                    attempt,
                    pid: 20 + round as i32,
                },
                now,
                &mut os,
            );
            l.on_event(Event::Ready { attempt }, now, &mut os);
        }
        assert_eq!(
            delays,
            [100, 200, 400, 800].map(Duration::from_millis).to_vec()
        );
        assert_eq!(l.restarts(), 4);
        assert_eq!(l.state(), State::Running);
        assert!(l.reason().is_none());
        assert!(l.last_error().unwrap().contains("signal 11"));
        assert_eq!(policy().backoff(10), Duration::from_millis(1000));
        // Every launch counted, and each one ready at once (zero latency).
        assert_eq!(l.launches(), 5);
        assert_eq!(l.startups().count(), 5);
        assert_eq!(l.startups().sum_seconds(), 0.0);
    }

    #[test]
    fn startup_latency_runs_from_launch_to_ready() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = Lifecycle::new("m", policy(), t0);
        l.start(t0, &mut os);
        let attempt = os.launches.last().unwrap().1;
        let t1 = t0 + Duration::from_millis(3);
        l.on_event(Event::Launched { attempt, pid: 10 }, t1, &mut os);
        l.on_event(Event::Ready { attempt }, t1, &mut os);
        assert_eq!(l.launches(), 1);
        assert_eq!(l.startups().count(), 1);
        assert!((l.startups().sum_seconds() - 0.003).abs() < 1e-9);
        // A stale or repeated Ready is not another start-up.
        l.on_event(Event::Ready { attempt }, t1, &mut os);
        assert_eq!(l.startups().count(), 1);
    }

    #[test]
    fn stable_run_resets_backoff() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = running(&mut os, t0);
        l.on_event(
            Event::Exited {
                attempt: 1,
                status: ExitStatus::Code(1),
            },
            t0,
            &mut os,
        );
        let t1 = l.deadline().unwrap();
        l.on_tick(t1, &mut os);
        l.on_event(
            Event::Launched {
                attempt: 2,
                pid: 11,
            },
            t1,
            &mut os,
        );
        l.on_event(Event::Ready { attempt: 2 }, t1, &mut os);
        let t2 = t1 + Duration::from_secs(11);
        l.on_event(
            Event::Exited {
                attempt: 2,
                status: ExitStatus::Code(1),
            },
            t2,
            &mut os,
        );
        assert_eq!(l.deadline().unwrap() - t2, Duration::from_millis(100));
    }

    #[test]
    fn start_deadline_kills_and_reports() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = Lifecycle::new("slow", policy(), t0);
        l.start(t0, &mut os);
        l.on_event(Event::Launched { attempt: 1, pid: 7 }, t0, &mut os);
        let t1 = t0 + Duration::from_secs(2);
        l.on_tick(t1, &mut os);
        assert_eq!(os.kills, vec![7]);
        assert_eq!(l.state(), State::Starting);
        l.on_event(
            Event::Exited {
                attempt: 1,
                status: ExitStatus::Signal(9),
            },
            t1,
            &mut os,
        );
        assert_eq!(l.state(), State::BackOff);
        assert_eq!(l.reason(), Some("not ready within 2000 ms"));
    }

    #[test]
    fn start_deadline_without_worker_abandons_attempt() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = Lifecycle::new("m", policy(), t0);
        l.start(t0, &mut os);
        l.on_tick(t0 + Duration::from_secs(3), &mut os);
        assert_eq!(l.state(), State::BackOff);
        // The late worker of the abandoned attempt is killed.
        l.on_event(
            Event::Launched {
                attempt: 1,
                pid: 99,
            },
            t0,
            &mut os,
        );
        assert_eq!(os.kills, vec![99]);
        assert_eq!(l.pid(), None);
    }

    #[test]
    fn reported_failure_is_the_reason_and_restarts() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = running(&mut os, t0);
        l.on_event(
            Event::Failed {
                attempt: 1,
                reason: "serve failed (panic): boom".into(),
                permanent: false,
                oom: false,
            },
            t0,
            &mut os,
        );
        l.on_event(
            Event::Exited {
                attempt: 1,
                status: ExitStatus::Code(13),
            },
            t0,
            &mut os,
        );
        assert_eq!(l.state(), State::BackOff);
        assert_eq!(l.reason(), Some("serve failed (panic): boom"));
        l.on_tick(l.deadline().unwrap(), &mut os);
        assert_eq!(l.state(), State::Starting);
    }

    #[test]
    fn fail_before_launch() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = Lifecycle::new("m", policy(), t0);
        l.fail("listener http: address in use".into(), t0);
        assert_eq!(l.state(), State::Failed);
        assert!(os.launches.is_empty());
        l.start(t0, &mut os);
        assert_eq!(l.state(), State::Starting);
    }

    #[test]
    fn fatal_failure_is_not_restarted() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = Lifecycle::new("bad", policy(), t0);
        l.start(t0, &mut os);
        l.on_event(Event::Launched { attempt: 1, pid: 5 }, t0, &mut os);
        l.on_event(
            Event::Failed {
                attempt: 1,
                reason: "abi version 3, expected 1".into(),
                permanent: true,
                oom: false,
            },
            t0,
            &mut os,
        );
        l.on_event(
            Event::Exited {
                attempt: 1,
                status: ExitStatus::Code(70),
            },
            t0,
            &mut os,
        );
        assert_eq!(l.state(), State::Failed);
        assert_eq!(l.reason(), Some("abi version 3, expected 1"));
        assert_eq!(l.deadline(), None);

        let mut l = Lifecycle::new("gone", policy(), t0);
        l.start(t0, &mut os);
        l.on_event(
            Event::LaunchFailed {
                attempt: 1,
                reason: "artifact missing".into(),
                permanent: true,
            },
            t0,
            &mut os,
        );
        assert_eq!(l.state(), State::Failed);
        assert!(l.reason().unwrap().contains("artifact missing"));
    }

    /// A replica told to stop while its launch is in flight, and that
    /// launch's attempt.
    fn stopped_in_flight(os: &mut FakeOs, t0: Instant) -> (Lifecycle, u64) {
        let mut l = Lifecycle::new("m", policy(), t0);
        l.start(t0, os);
        l.stop(t0, os);
        assert_eq!(l.state(), State::Stopping);
        (l, os.launches.last().unwrap().1)
    }

    #[test]
    fn stop_during_backoff_or_pending_launch() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = running(&mut os, t0);
        l.on_event(
            Event::Exited {
                attempt: 1,
                status: ExitStatus::Code(1),
            },
            t0,
            &mut os,
        );
        l.stop(t0, &mut os);
        assert_eq!(l.state(), State::Stopped);
        l.on_tick(t0 + Duration::from_secs(100), &mut os);
        assert_eq!(os.launches.len(), 1);

        // Stopped while the launch is in flight: the stop waits for it and
        // stops the worker it reports.
        let (mut l, attempt) = stopped_in_flight(&mut os, t0);
        l.on_event(Event::Launched { attempt, pid: 42 }, t0, &mut os);
        assert_eq!(os.terms, [42]);
        assert_eq!(l.state(), State::Stopping);
        l.on_event(
            Event::Exited {
                attempt,
                status: ExitStatus::Code(0),
            },
            t0,
            &mut os,
        );
        assert_eq!(l.state(), State::Stopped);

        // ... or for its failure.
        let (mut l, attempt) = stopped_in_flight(&mut os, t0);
        l.on_event(
            Event::LaunchFailed {
                attempt,
                reason: "no worker".into(),
                permanent: false,
            },
            t0,
            &mut os,
        );
        assert_eq!(l.state(), State::Stopped);

        // A launch that never reports is given up at the stop deadline; its
        // late `Launched` is killed.
        let (mut l, attempt) = stopped_in_flight(&mut os, t0);
        l.on_tick(t0 + Duration::from_secs(2), &mut os);
        assert_eq!(l.state(), State::Stopped);
        l.on_event(Event::Launched { attempt, pid: 43 }, t0, &mut os);
        assert!(os.kills.contains(&43));
    }

    #[test]
    fn aggregate_prefers_trouble() {
        use State::*;
        assert_eq!(State::aggregate([Running, Running]), Running);
        assert_eq!(State::aggregate([Running, BackOff, Starting]), BackOff);
        assert_eq!(State::aggregate([Stopped, Running]), Running);
        assert_eq!(State::aggregate([Running, Failed]), Failed);
        assert_eq!(State::aggregate([]), Stopped);
    }

    #[test]
    fn stale_events_are_ignored() {
        let t0 = Instant::now();
        let mut os = FakeOs::default();
        let mut l = running(&mut os, t0);
        l.on_event(
            Event::Exited {
                attempt: 0,
                status: ExitStatus::Code(1),
            },
            t0,
            &mut os,
        );
        l.on_event(Event::Ready { attempt: 7 }, t0, &mut os);
        assert_eq!(l.state(), State::Running);
    }
}
