//! The real [`WorkerOs`]: launches go through the warm pool and a task per
//! instance that hands the worker its launch order and watches it.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use tokio::sync::mpsc;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use crate::error_chain;
use crate::lifecycle::{Event, ExitStatus, WorkerOs};
use crate::pool::PoolHandle;
use crate::worker::{
    Failure, FailureKind, FromWorker, Grant, GrantKind, LaunchOrder, LogLevel, SandboxReport,
    Stage, ToWorker, WorkerState,
};
use crate::zygote::client::{pidfd_reap, pidfd_signal};

/// Something that happened to one instance, addressed to the actor.
#[derive(Debug)]
pub struct InstanceEvent {
    /// Module name.
    pub module: String,
    /// The module's install generation; events of older generations are
    /// stale.
    pub generation: u64,
    /// Which replica.
    pub replica: u32,
    /// The worker's pid, when known.
    pub pid: Option<i32>,
    /// What happened.
    pub event: Event,
    /// With [`Event::Launched`]: the worker's pidfd, for signalling it
    /// (shared with the task that watches it: one descriptor a worker).
    pub pidfd: Option<Arc<OwnedFd>>,
    /// With [`Event::Exited`]: the worker's user and system CPU time, read
    /// from its `/proc` entry before it was reaped (for the metrics'
    /// per-replica total).
    pub cpu_seconds: Option<f64>,
}

/// What an instance task tells the actor.
#[derive(Debug)]
pub enum OsMsg {
    /// Something happened to an instance.
    Instance(InstanceEvent),
    /// A worker was taken for an instance and is about to get its launch
    /// order: the actor registers it (for Stop and Attach) and answers with
    /// the service ends it gets at launch.
    Register(Registration),
    /// A worker applied its sandbox and says what is in force.
    Sandboxed {
        /// The worker.
        pid: i32,
        /// What it read back.
        report: SandboxReport,
    },
}

/// A message (with descriptors) for one running worker.
#[derive(Debug)]
pub struct Command {
    /// The message.
    pub msg: ToWorker,
    /// Its descriptors, closed here once sent.
    pub fds: Vec<OwnedFd>,
}

/// Sends [`Command`]s to one instance's task.
pub type CommandTx = mpsc::UnboundedSender<Command>;

/// A service end given at launch: its grant and descriptors.
#[derive(Debug)]
pub struct ServiceGrant {
    /// Import or export, and the service name.
    pub grant: Grant,
    /// The end's two descriptors.
    pub fds: Vec<OwnedFd>,
}

/// See [`OsMsg::Register`].
#[derive(Debug)]
pub struct Registration {
    /// Module name.
    pub module: String,
    /// Install generation.
    pub generation: u64,
    /// Replica.
    pub replica: u32,
    /// The worker's pid.
    pub pid: i32,
    /// Where to send commands for it.
    pub commands: CommandTx,
    /// The service ends for the launch order.
    pub reply: tokio::sync::oneshot::Sender<Vec<ServiceGrant>>,
}

/// What a launch needs besides the module name.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    /// The module's name (the lifecycle's name may carry a replica suffix).
    pub module: String,
    /// `name@version#replica`: what every line emberd writes to the
    /// module's log is tagged with.
    pub identity: String,
    /// The artifact image the worker loads (sent as the `Artifact` grant),
    /// once there is one.
    pub artifact: ImageRx,
    /// The order for the worker (grants are added at launch).
    pub order: LaunchOrder,
    /// The module's log file.
    pub log: PathBuf,
    /// Bound listeners, shared by every replica: name and socket.
    pub listeners: Vec<(String, Arc<OwnedFd>)>,
    /// Install generation.
    pub generation: u64,
    /// How long a graceful stop may take (sent with `Stop`).
    pub stop_deadline: Duration,
    /// The manifest's limits, applied through `limiter`.
    pub limits: crate::cgroup::Limits,
    /// emberd's cgroups.
    pub limiter: Arc<crate::cgroup::Limiter>,
    /// Start at background priority until ready (a release's new replica,
    /// while the old revision serves).
    pub background: bool,
    /// How long it may take to be ready (`limits.start_deadline`).
    pub start_deadline: Duration,
    /// A container's output and network namespace.
    pub container: Option<Arc<ContainerIo>>,
}

/// What a container's instance gets instead of the module's log file as
/// stdout and stderr, and the network namespace its worker joins before
/// the module's code runs (sent as `Stdio` grants named `log`, `stderr`
/// and `netns`).
#[derive(Debug, Default)]
pub struct ContainerIo {
    /// The module's stdout (and stderr when `stderr` is absent).
    pub stdout: Option<OwnedFd>,
    /// The module's stderr.
    pub stderr: Option<OwnedFd>,
    /// The network namespace file, opened read-only.
    pub netns: Option<OwnedFd>,
}

// A release's new replicas start in the idle scheduling class, until they
// are ready: on a small machine, eight workers loading at once beside the
// revision that serves would otherwise take the CPU its requests need.

/// Whether emberd can move a worker back from the idle scheduling class.
/// The kernel allows SCHED_IDLE → SCHED_OTHER with CAP_SYS_NICE, or within
/// the thread's RLIMIT_NICE (workers inherit emberd's): tried once, on a
/// thread of emberd's own, rather than guessed from the uid (root without
/// CAP_SYS_NICE, in a container or under a capability bounding set, cannot).
fn can_restore_priority() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        let probe = std::thread::Builder::new()
            .name("ember-sched-probe".into())
            .spawn(|| {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: this thread's own scheduling policy (tid 0 = the
                // caller), valid sched_param for both policies.
                unsafe {
                    libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0
                        && libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) == 0
                }
            });
        let can = probe.ok().and_then(|t| t.join().ok()).unwrap_or(false);
        if !can {
            tracing::info!(
                "new replicas of a release start at normal priority: emberd cannot move a \
                 thread back from the idle scheduling class (no CAP_SYS_NICE, RLIMIT_NICE)"
            );
        }
        can
    })
}

/// Moves every thread of `pid` to the idle scheduling class (`background`)
/// or back to the normal one. Linux schedules threads, not processes, and
/// threads started later inherit their creator's class.
fn set_background(pid: i32, background: bool) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    let policy = if background {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    for t in tasks.flatten() {
        let Some(tid) = t
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: a thread id of a worker we own and a valid sched_param
        // (priority 0, as SCHED_IDLE and SCHED_OTHER require).
        let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            // A thread that exited meanwhile is no matter; a worker left in
            // the idle class is.
            if background || error.raw_os_error() == Some(libc::ESRCH) {
                tracing::debug!(pid, tid, background, %error, "sched_setscheduler");
            } else {
                tracing::warn!(pid, tid, %error, "cannot move a worker thread back from the idle scheduling class");
            }
        }
    }
}

/// An artifact image as launches wait for it: `None` while an install's copy
/// is being made, then the descriptor or why there is none.
pub type ImageRx = tokio::sync::watch::Receiver<Option<Result<Arc<OwnedFd>, String>>>;
/// The sending side of [`ImageRx`].
pub type ImageTx = tokio::sync::watch::Sender<Option<Result<Arc<OwnedFd>, String>>>;

/// [`WorkerOs`] over the pool; built by the actor for one call.
pub struct RealOs<'a> {
    /// The pool.
    pub pool: &'a PoolHandle,
    /// Where instance tasks report.
    pub events: &'a mpsc::UnboundedSender<OsMsg>,
    /// Live workers' pidfds by pid.
    pub pidfds: &'a HashMap<i32, Arc<OwnedFd>>,
    /// Live workers' command senders by pid.
    pub commands: &'a HashMap<i32, CommandTx>,
    /// For `launch`.
    pub plan: Option<LaunchPlan>,
}

impl WorkerOs for RealOs<'_> {
    fn launch(&mut self, module: &str, attempt: u64) {
        let Some(plan) = self.plan.clone() else {
            let _ = self.events.send(OsMsg::Instance(InstanceEvent {
                module: module.to_owned(),
                generation: 0,
                replica: 0,
                pid: None,
                event: Event::LaunchFailed {
                    attempt,
                    reason: "module has no launch plan".into(),
                    permanent: true,
                },
                pidfd: None,
                cpu_seconds: None,
            }));
            return;
        };
        tokio::spawn(instance(
            self.pool.clone(),
            plan.module.clone(),
            attempt,
            plan,
            self.events.clone(),
        ));
    }

    fn terminate(&mut self, pid: i32) {
        // The protocol's Stop carries the deadline; the lifecycle SIGKILLs
        // at that deadline. SIGTERM only when the channel is gone.
        let deadline = self
            .plan
            .as_ref()
            .map_or(Duration::from_secs(5), |p| p.stop_deadline);
        let sent = self.commands.get(&pid).is_some_and(|tx| {
            tx.send(Command {
                msg: ToWorker::Stop { deadline },
                fds: Vec::new(),
            })
            .is_ok()
        });
        if !sent {
            if let Some(fd) = self.pidfds.get(&pid) {
                let _ = pidfd_signal(fd.as_fd(), libc::SIGTERM);
            }
        }
    }

    fn kill(&mut self, pid: i32) {
        if let Some(fd) = self.pidfds.get(&pid) {
            let _ = pidfd_signal(fd.as_fd(), libc::SIGKILL);
        }
    }
}

fn open_log(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// The instance's side of its module's log file: every line emberd writes
/// (tracing records from the worker, emberd's own notes) starts with a UTC
/// timestamp and the instance's identity, so replicas and versions sharing
/// one file can be told apart. The module's raw stdout/stderr go to the same
/// file untouched.
struct InstanceLog {
    file: std::fs::File,
    identity: String,
    /// In journal mode (`crate::journal`): every line also goes there.
    journal: Option<crate::journal::ModuleJournal>,
}

impl InstanceLog {
    /// A line at syslog `priority` (for the journal).
    fn line(&mut self, priority: u8, level: Option<&str>, target: &str, message: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let line = format_line(now, &self.identity, level, target, message);
        // One write per line: the file is opened O_APPEND, so lines from
        // several instances never interleave within a line.
        let _ = self.file.write_all(line.as_bytes());
        if let Some(j) = &self.journal {
            j.send(priority, &format!("{target}: {message}"));
        }
    }

    /// A note from emberd about this instance (launch, exit).
    fn note(&mut self, message: &str) {
        self.line(6, None, "ember", message);
    }

    /// A note from emberd about this instance's failure.
    fn failure(&mut self, message: &str) {
        self.line(3, None, "ember", message);
    }
}

/// `2026-11-28T01:02:03.456Z hello@1.0.0#0 INFO hello: message\n`, or
/// without a level for emberd's notes (`… hello@1.0.0#0 ember: launched…`).
pub(super) fn format_line(
    since_epoch: Duration,
    identity: &str,
    level: Option<&str>,
    target: &str,
    message: &str,
) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let sep = if level.is_some() { " " } else { "" };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z {identity} {}{sep}{target}: {message}\n",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since_epoch.subsec_millis(),
        level.unwrap_or_default(),
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The syslog priority of a worker's record.
fn log_priority(level: LogLevel) -> u8 {
    match level {
        LogLevel::Error => 3,
        LogLevel::Warn => 4,
        LogLevel::Info => 6,
        LogLevel::Debug | LogLevel::Trace => 7,
    }
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "ERROR",
        LogLevel::Warn => "WARN",
        LogLevel::Info => "INFO",
        LogLevel::Debug => "DEBUG",
        LogLevel::Trace => "TRACE",
    }
}

/// One instance: get a worker, give it the order, report what it says and
/// when it exits.
async fn instance(
    pool: PoolHandle,
    module: String,
    attempt: u64,
    plan: LaunchPlan,
    events: mpsc::UnboundedSender<OsMsg>,
) {
    let send = |pid: Option<i32>, event: Event, pidfd: Option<Arc<OwnedFd>>| {
        let _ = events.send(OsMsg::Instance(InstanceEvent {
            module: module.clone(),
            generation: plan.generation,
            replica: plan.order.replica,
            pid,
            event,
            pidfd,
            cpu_seconds: None,
        }));
    };
    let failed = |reason: String| Event::LaunchFailed {
        attempt,
        reason,
        permanent: false,
    };
    let worker = match pool.take().await {
        Ok(w) => w,
        Err(e) => return send(None, failed(error_chain(&e)), None),
    };
    let pid = worker.pid;
    let mut log = match open_log(&plan.log) {
        Ok(file) => InstanceLog {
            file,
            identity: plan.identity.clone(),
            journal: crate::journal::get().map(|j| {
                crate::journal::ModuleJournal::new(
                    j,
                    &plan.module,
                    &plan.identity,
                    plan.order.replica,
                    pid,
                )
            }),
        },
        Err(e) => {
            worker.discard().await;
            return send(
                None,
                failed(format!("cannot open log {}: {e}", plan.log.display())),
                None,
            );
        }
    };
    // The worker is idle in the pool: move it into its own cgroup before it
    // runs any module code. Without one, emberd's memory watch holds
    // `limits.memory`.
    // On the blocking pool (cgroupfs). A worker not adopted while idle (one
    // forked for this launch) joins its v1 cgroup by itself, just below,
    // or is attached to a v2 cgroup here, which waits for an RCU grace
    // period (see `Limiter::adopt`).
    let entered = {
        let (limiter, module, replica, limits) = (
            plan.limiter.clone(),
            module.clone(),
            plan.order.replica,
            plan.limits,
        );
        tokio::task::spawn_blocking(move || limiter.enter(&module, replica, pid, &limits)).await
    };
    let mut cgroup = match entered {
        Ok(Ok(mut c)) => {
            let tasks = c.take_join();
            if !tasks.is_empty() {
                let tasks: Vec<_> = tasks.iter().map(|f| f.as_fd()).collect();
                // Before the launch order, which it reads after this; if
                // the worker is gone, the launch order fails too.
                if let Err(e) = worker.link.join_cgroups(&tasks).await {
                    tracing::debug!(module, pid, error = %error_chain(&e), "cannot send the cgroup join");
                }
            }
            Some(c)
        }
        Err(e) => {
            tracing::warn!(module, pid, error = %e, "no cgroup for this instance");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(module, pid, error = %error_chain(&e), "no cgroup for this instance");
            None
        }
    };
    // Grants: the log as stdout/stderr, every listener, the service ends,
    // then the artifact.
    let mut order = plan.order.clone();
    order.memory_enforced = cgroup.as_ref().is_some_and(|c| c.enforces_memory());
    // Its baseline is taken now, while the worker is idle; awaited before
    // the launch order goes out.
    let watching = match plan.limits.memory {
        Some(limit) if !order.memory_enforced => {
            match plan
                .limiter
                .memory_watch()
                .watch(pid, worker.pidfd.as_fd(), limit)
            {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(module, pid, error = %error_chain(&e), "memory limit not watched");
                    None
                }
            }
        }
        _ => None,
    };
    let mut fds = Vec::new();
    // In journal mode stdout and stderr are pipes emberd forwards (to the
    // log file and the journal); else the log file itself.
    let pipes = match &log.journal {
        Some(j) => match j.stdio_pipes(&log.file) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(module, pid, error = %e, "no journal pipes: output goes to the log file only");
                None
            }
        },
        None => None,
    };
    let io = plan.container.as_deref();
    let stdout = io.and_then(|c| c.stdout.as_ref());
    let stderr = io.and_then(|c| c.stderr.as_ref());
    order.grants.push(Grant {
        kind: GrantKind::Stdio,
        name: "log".into(),
    });
    let stderr_grant = Grant {
        kind: GrantKind::Stdio,
        name: "stderr".into(),
    };
    // A container's output goes where the shim said (its CRI log).
    match (stdout, stderr, &pipes) {
        (Some(out), err, _) => {
            fds.push(out.as_fd());
            if let Some(err) = err {
                order.grants.push(stderr_grant);
                fds.push(err.as_fd());
            }
        }
        (None, Some(err), _) => {
            fds.push(log.file.as_fd());
            order.grants.push(stderr_grant);
            fds.push(err.as_fd());
        }
        (None, None, Some((out, err))) => {
            fds.push(out.as_fd());
            order.grants.push(stderr_grant);
            fds.push(err.as_fd());
        }
        (None, None, None) => fds.push(log.file.as_fd()),
    }
    if let Some(ns) = io.and_then(|c| c.netns.as_ref()) {
        order.grants.push(Grant {
            kind: GrantKind::Stdio,
            name: "netns".into(),
        });
        fds.push(ns.as_fd());
    }
    for (name, fd) in &plan.listeners {
        order.grants.push(Grant {
            kind: GrantKind::Listener,
            name: name.clone(),
        });
        fds.push(fd.as_fd());
    }
    // The artifact image: an install copies it while this task takes the
    // worker and is wired; wait for the copy to be done.
    let mut image_rx = plan.artifact.clone();
    let image = match image_rx.wait_for(Option::is_some).await.map(|v| v.clone()) {
        Ok(Some(Ok(fd))) => fd,
        Ok(Some(Err(reason))) => {
            worker.discard().await;
            remove_cgroup(cgroup.take(), &module, pid).await;
            return send(
                None,
                Event::LaunchFailed {
                    attempt,
                    reason,
                    permanent: true,
                },
                None,
            );
        }
        Ok(None) | Err(_) => {
            worker.discard().await;
            remove_cgroup(cgroup.take(), &module, pid).await;
            return send(None, failed("artifact copy abandoned".into()), None);
        }
    };
    // Service ends: the registry (the actor) wires this instance.
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Command>();
    let (wire_tx, wire_rx) = tokio::sync::oneshot::channel();
    let _ = events.send(OsMsg::Register(Registration {
        module: module.clone(),
        generation: plan.generation,
        replica: plan.order.replica,
        pid,
        commands: cmd_tx,
        reply: wire_tx,
    }));
    let services = wire_rx.await.unwrap_or_default();
    for s in &services {
        order.grants.push(s.grant.clone());
        fds.extend(s.fds.iter().map(|f| f.as_fd()));
    }
    order.grants.push(Grant {
        kind: GrantKind::Artifact,
        name: "artifact".into(),
    });
    fds.push(image.as_fd());
    let mut over = match watching {
        Some(w) => match w.started.await {
            Ok(Ok(())) => Some(w.over),
            Ok(Err(e)) => {
                tracing::warn!(module, pid, error = %error_chain(&e), "memory limit not watched");
                None
            }
            Err(_) => None,
        },
        None => None,
    };
    // Idle, single-threaded: every thread it starts inherits this.
    let mut background = plan.background && can_restore_priority();
    if background {
        set_background(pid, true);
    }
    // Starved of CPU by a busy old revision, it would miss its start
    // deadline (wall time): at half of it, it gets its full share.
    let full_priority_at = tokio::time::Instant::now() + plan.start_deadline / 2;
    if let Err(e) = worker.link.launch(&order, &fds).await {
        drop(fds);
        worker.discard().await;
        remove_cgroup(cgroup.take(), &module, pid).await;
        // With its pid: the worker was registered (wired), and the actor
        // forgets it on this report.
        return send(
            Some(pid),
            failed(format!("launch order: {}", error_chain(&e))),
            None,
        );
    }
    drop(fds);
    // The worker has its ends of the pipes: the forwarders see the end of
    // its output when it (and what it started) is gone.
    drop(pipes);
    // The worker has its service ends; the supervisor keeps no copy.
    drop(services);
    log.note(&format!("launched in pid {pid}"));
    // One pidfd per worker: the actor signals through it, this task learns
    // of the exit and reaps through it.
    let crate::pool::Worker {
        pidfd, mut link, ..
    } = worker;
    let pidfd = Arc::new(pidfd);
    send(
        Some(pid),
        Event::Launched { attempt, pid },
        Some(pidfd.clone()),
    );
    // SAFETY: the AsyncFd owns one clone of the Arc, so the pidfd stays
    // open for its whole life; no other holder (the actor's clone) can close
    // or replace the descriptor: an OwnedFd behind an Arc closes only when
    // the last clone is dropped.
    let exit = match unsafe { tokio::io::unix::AsyncFd::register(pidfd) } {
        Ok(a) => a,
        Err(err) => {
            let (pidfd, e) = err.into_parts();
            tracing::warn!(pid, error = %e, "cannot watch worker; killing it");
            let status = ExitStatus::Unknown;
            let _ = pidfd_signal(pidfd.as_fd(), libc::SIGKILL);
            let _ = tokio::task::spawn_blocking(move || pidfd_reap(pidfd.as_fd())).await;
            remove_cgroup(cgroup.take(), &module, pid).await;
            return send(Some(pid), Event::Exited { attempt, status }, None);
        }
    };
    let mut channel_open = true;
    // Where the worker is, for a failure emberd reports on its behalf.
    let mut stage = Stage::Launch;
    let mut sandbox_gate = SandboxGate::default();
    loop {
        tokio::select! {
            // Reports first: a worker's last words (Failed) must be seen
            // before its exit.
            biased;
            msg = link.next(), if channel_open => match msg {
                Ok(m) => {
                    let ready = matches!(
                        m,
                        FromWorker::Transition { state: WorkerState::Ready, .. }
                    );
                    match sandbox_gate.admit(&m) {
                        Some(Ok(report)) => {
                            log.note(&sandbox_note(report));
                            let _ = events.send(OsMsg::Sandboxed {
                                pid,
                                report: report.clone(),
                            });
                        }
                        Some(Err(true)) => {
                            tracing::warn!(module, pid, "sandbox report after the module's code was loaded: ignored");
                        }
                        Some(Err(false)) | None => {}
                    }
                    if ready && background {
                        // Full priority before it counts as ready (and the
                        // old replicas are asked to go).
                        set_background(pid, false);
                        background = false;
                    }
                    if let FromWorker::Transition { state, .. } = &m {
                        stage = stage_after(stage, *state);
                    }
                    report(m, &module, pid, attempt, &mut log, &send)
                }
                Err(_) => channel_open = false,
            },
            r = async { over.as_mut().expect("guarded").await }, if over.is_some() => {
                // Done either way (a receiver is polled to completion once):
                // an error means the watch ended, the worker being gone.
                over = None;
                let Ok(exceeded) = r else { continue };
                // Reported as the worker would report a failure, then
                // killed: it may not be listening.
                let reason = Failure {
                    stage,
                    kind: FailureKind::MemoryLimitExceeded,
                    message: exceeded.to_string(),
                }
                .to_string();
                log.failure(&reason);
                send(
                    Some(pid),
                    Event::Failed {
                        attempt,
                        reason,
                        permanent: false,
                        oom: true,
                    },
                    None,
                );
                if let Err(e) = pidfd_signal(exit.get_ref().as_fd(), libc::SIGKILL) {
                    tracing::warn!(module, pid, error = %e, "cannot kill a worker over its memory limit");
                }
            }
            _ = tokio::time::sleep_until(full_priority_at), if background => {
                set_background(pid, false);
                background = false;
            }
            Some(cmd) = cmd_rx.recv(), if channel_open => {
                if background && matches!(cmd.msg, ToWorker::Stop { .. }) {
                    // It drains and exits at full priority (its stop
                    // deadline is wall time too).
                    set_background(pid, false);
                    background = false;
                }
                let fds: Vec<_> = cmd.fds.iter().map(|f| f.as_fd()).collect();
                if let Err(e) = link.send(&cmd.msg, &fds).await {
                    tracing::debug!(module, pid, error = %e, "cannot send to worker");
                }
                // Dropping `cmd` closes our copies of the descriptors.
            }
            r = exit.readable() => {
                // Drain what it said before dying.
                while channel_open {
                    match tokio::time::timeout(Duration::from_millis(20), link.next()).await {
                        Ok(Ok(m)) => report(m, &module, pid, attempt, &mut log, &send),
                        _ => channel_open = false,
                    }
                }
                // Its CPU time while it is a zombie: after the reap the
                // pid may name another process.
                let cpu_seconds = crate::metrics::cpu_seconds(pid).ok();
                let status = match r {
                    Ok(_) => pidfd_reap(exit.get_ref().as_fd()),
                    Err(_) => ExitStatus::Unknown,
                };
                drop(link);
                let oom = match cgroup.take() {
                    Some(c) => tokio::task::spawn_blocking(move || {
                        let reason = c.oom_reason();
                        (Some(c), reason)
                    })
                    .await
                    .unwrap_or((None, None)),
                    None => (None, None),
                };
                cgroup = oom.0;
                {
                    if let Some(reason) = oom.1 {
                        log.failure(&reason);
                        send(
                            Some(pid),
                            Event::Failed {
                                attempt,
                                reason,
                                permanent: false,
                                oom: true,
                            },
                            None,
                        );
                    }
                }
                remove_cgroup(cgroup.take(), &module, pid).await;
                let exit = format!("pid {pid} {status}");
                if matches!(status, ExitStatus::Code(0)) {
                    log.note(&exit);
                } else {
                    log.failure(&exit);
                }
                let _ = events.send(OsMsg::Instance(InstanceEvent {
                    module: module.clone(),
                    generation: plan.generation,
                    replica: plan.order.replica,
                    pid: Some(pid),
                    event: Event::Exited { attempt, status },
                    pidfd: None,
                    cpu_seconds,
                }));
                return;
            }
        }
    }
}

/// Which of a worker's sandbox reports emberd believes: the first, if it
/// comes before any transition. The worker sends it before it reports
/// `Loading` and maps the module, so anything later was written by the
/// module's code on the control socket (which it can reach) and says
/// nothing of the sandbox.
#[derive(Debug, Default)]
struct SandboxGate {
    /// A report was taken or a transition seen: no report is believed.
    closed: bool,
    /// Reports refused so far.
    refused: u64,
}

impl SandboxGate {
    /// For a sandbox report: `Ok` with it if it is believed, else
    /// `Err(true)` for the first refused one (logged) and `Err(false)` for
    /// later ones. `None` for any other message.
    fn admit<'m>(&mut self, msg: &'m FromWorker) -> Option<Result<&'m SandboxReport, bool>> {
        match msg {
            FromWorker::Sandboxed(report) if !self.closed => {
                self.closed = true;
                Some(Ok(report))
            }
            FromWorker::Sandboxed(_) => {
                self.refused += 1;
                Some(Err(self.refused == 1))
            }
            FromWorker::Transition { .. } => {
                self.closed = true;
                None
            }
            _ => None,
        }
    }
}

/// The stage a worker is in after it reported `state`: what a failure
/// emberd reports for it (the memory watch's) names.
fn stage_after(stage: Stage, state: WorkerState) -> Stage {
    match state {
        WorkerState::Loading | WorkerState::Loaded => Stage::Load,
        WorkerState::Starting => Stage::Start,
        WorkerState::Serving => Stage::Serve,
        WorkerState::Stopping | WorkerState::Stopped => Stage::Stop,
        // Ready may come from `start` or from `serve`.
        WorkerState::Ready => stage,
    }
}

/// Removes an instance's cgroup once its worker is gone (retried briefly:
/// the kernel empties a cgroup shortly after the reap).
async fn remove_cgroup(cgroup: Option<crate::cgroup::Instance>, module: &str, pid: i32) {
    let Some(mut c) = cgroup else {
        return;
    };
    for _ in 0..100 {
        // rmdir on the cgroup file system, off the runtime's thread.
        let Ok((gone, back)) = tokio::task::spawn_blocking(move || (c.remove(), c)).await else {
            return;
        };
        if gone {
            return;
        }
        c = back;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(module, pid, "instance cgroup still busy; left for shutdown");
}

fn report(
    msg: FromWorker,
    module: &str,
    pid: i32,
    attempt: u64,
    log: &mut InstanceLog,
    send: &dyn Fn(Option<i32>, Event, Option<Arc<OwnedFd>>),
) {
    match msg {
        FromWorker::Transition {
            state: WorkerState::Ready,
            ..
        } => send(Some(pid), Event::Ready { attempt }, None),
        FromWorker::Transition { state, detail } => {
            tracing::debug!(module, pid, ?state, %detail, "worker transition");
        }
        FromWorker::Failed(failure) => {
            let reason = failure.to_string();
            log.failure(&reason);
            let permanent = crate::worker::is_permanent(failure.kind);
            send(
                Some(pid),
                Event::Failed {
                    attempt,
                    reason,
                    permanent,
                    oom: false,
                },
                None,
            )
        }
        FromWorker::Log {
            level,
            target,
            message,
        } => {
            log.line(
                log_priority(level),
                Some(level_name(level)),
                &target,
                &message,
            );
        }
        FromWorker::Idle { .. } | FromWorker::Sandboxed(_) => {}
    }
}

/// `sandbox: uid 1879048192 gid 1879048192 (own), no-new-privs, not
/// dumpable, seccomp-bpf: …, landlock ABI 7; writable: /var/lib/m`: the
/// note in the module's log.
fn sandbox_note(r: &SandboxReport) -> String {
    let mut note = format!(
        "sandbox: uid {} gid {} ({}), {}, {}, {}, {}",
        r.uid,
        r.gid,
        if r.own_ids { "own" } else { "emberd's" },
        if r.no_new_privs {
            "no-new-privs"
        } else {
            "new privileges allowed"
        },
        if r.dumpable {
            "dumpable"
        } else {
            "not dumpable"
        },
        r.seccomp,
        r.landlock
    );
    if !r.writable.is_empty() {
        let paths: Vec<String> = r.writable.iter().map(|p| p.display().to_string()).collect();
        note.push_str(&format!("; writable: {}", paths.join(", ")));
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(uid: u32) -> FromWorker {
        FromWorker::Sandboxed(SandboxReport {
            uid,
            gid: uid,
            own_ids: true,
            no_new_privs: true,
            dumpable: false,
            seccomp: "seccomp-bpf".into(),
            landlock: "none".into(),
            writable: Vec::new(),
        })
    }

    fn transition(state: WorkerState) -> FromWorker {
        FromWorker::Transition {
            state,
            detail: String::new(),
        }
    }

    #[test]
    fn only_the_first_sandbox_report_before_loading_is_believed() {
        let uid = |r: Option<Result<&SandboxReport, bool>>| r.map(|r| r.map(|r| r.uid));
        let mut g = SandboxGate::default();
        assert_eq!(uid(g.admit(&report(7))), Some(Ok(7)));
        assert_eq!(uid(g.admit(&report(0))), Some(Err(true)));
        assert_eq!(uid(g.admit(&transition(WorkerState::Loading))), None);
        assert_eq!(uid(g.admit(&report(0))), Some(Err(false)));
        // None before loading: a report after it is the module's.
        let mut g = SandboxGate::default();
        assert_eq!(uid(g.admit(&transition(WorkerState::Loading))), None);
        assert_eq!(uid(g.admit(&report(0))), Some(Err(true)));
    }

    #[test]
    fn log_lines_carry_utc_time_and_identity() {
        let line = |secs, millis| {
            format_line(
                Duration::from_secs(secs) + Duration::from_millis(millis),
                "kv@1.2.0#1",
                Some("INFO"),
                "kv",
                "ready",
            )
        };
        assert_eq!(
            line(0, 0),
            "1970-01-01T00:00:00.000Z kv@1.2.0#1 INFO kv: ready\n"
        );
        assert_eq!(
            line(1_795_826_986, 7),
            "2026-11-28T00:49:46.007Z kv@1.2.0#1 INFO kv: ready\n"
        );
        // A leap day and the day after a century's February.
        assert!(line(1_709_251_199, 999).starts_with("2024-02-29T23:59:59.999Z "));
        assert!(line(951_868_800, 0).starts_with("2000-03-01T00:00:00.000Z "));
        assert_eq!(
            format_line(
                Duration::ZERO,
                "kv@1.2.0#0",
                None,
                "ember",
                "launched in pid 7"
            ),
            "1970-01-01T00:00:00.000Z kv@1.2.0#0 ember: launched in pid 7\n"
        );
    }
}
