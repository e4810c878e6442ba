//! The warm pool: idle workers forked ahead of time, refilled in the
//! background.
//!
//! Policy (after Android's USAP pool): when fewer than `min_idle` workers
//! are idle, refill up to `max_idle`, one fork at a time, always yielding
//! to launch requests. A launch takes an idle worker (a *hit*) or, if none
//! is left, forks on the spot (a *miss*).
//!
//! The pool owns the zygote. If the zygote dies, the pool starts a new one
//! (re-executing emberd in zygote mode, which loads the plugins again) and
//! goes on; running modules are not touched (their workers are emberd's
//! children, not the zygote's: see `module_runtime::host::fork`), launches meanwhile
//! wait for it, and a failed restart is retried with back-off.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::cgroup::Limiter;
use crate::config::PoolConfig;
use crate::daemon::events::{Event, EventHub};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::link::{HandshakeError, WorkerLink};
use crate::plugins::PluginSpec;
use crate::reaper::Claim;
use crate::zygote::client::{pidfd_exited, pidfd_reap, pidfd_signal};
use crate::zygote::{ForkError, Zygote, ZygoteError};

/// How long a new worker may take to report `Idle`.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A warm worker: forked, handshake done, waiting for a launch order.
#[derive(Debug)]
pub struct Worker {
    /// Its pid.
    pub pid: i32,
    /// Its pidfd (signal it, learn of its exit, reap it).
    pub pidfd: OwnedFd,
    /// Its channel.
    pub link: WorkerLink,
    /// Its pid, claimed: whoever holds the worker reaps it (through the
    /// pidfd), then drops this.
    pub claim: Claim,
}

impl Worker {
    /// Whether it has exited.
    pub fn has_exited(&self) -> bool {
        pidfd_exited(self.pidfd.as_fd())
    }

    /// Kills and reaps it.
    pub async fn discard(self) {
        let _ = pidfd_signal(self.pidfd.as_fd(), libc::SIGKILL);
        let (fd, claim) = (self.pidfd, self.claim);
        let _ = tokio::task::spawn_blocking(move || {
            pidfd_reap(fd.as_fd());
            drop(claim);
        })
        .await;
    }
}

/// No worker could be made.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The zygote could not fork.
    #[error("fork")]
    Fork(#[source] ForkError),
    /// The zygote died and a new one could not be started (yet); the
    /// start is retried with back-off.
    #[error("no zygote: starting a new one failed: {reason}")]
    NoZygote {
        /// Why the last start failed (its error chain).
        reason: String,
    },
    /// The new worker did not complete its handshake.
    #[error("worker {pid} handshake")]
    Handshake {
        /// Its pid.
        pid: i32,
        /// Why.
        #[source]
        source: HandshakeError,
    },
}

/// Forks a worker and waits for its `Idle`.
async fn make_worker(zygote: &mut Zygote) -> Result<Worker, WorkerError> {
    let new = zygote.fork().await.map_err(WorkerError::Fork)?;
    let handshake = async {
        let mut link = WorkerLink::new(new.channel).map_err(HandshakeError::Channel)?;
        link.wait_idle(IDLE_TIMEOUT).await?;
        Ok::<_, HandshakeError>(link)
    }
    .await;
    match handshake {
        Ok(link) => Ok(Worker {
            pid: new.pid,
            pidfd: new.pidfd,
            link,
            claim: new.claim,
        }),
        Err(source) => {
            let _ = pidfd_signal(new.pidfd.as_fd(), libc::SIGKILL);
            let (fd, claim) = (new.pidfd, new.claim);
            let _ = tokio::task::spawn_blocking(move || {
                pidfd_reap(fd.as_fd());
                drop(claim);
            })
            .await;
            Err(WorkerError::Handshake {
                pid: new.pid,
                source,
            })
        }
    }
}

/// Pool counters, as shown by `emberctl pool`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Policy: refill when fewer are idle.
    pub min_idle: usize,
    /// Policy: refill up to this many.
    pub max_idle: usize,
    /// Idle now.
    pub idle: usize,
    /// Launches served by an idle worker.
    pub hits: u64,
    /// Launches that forked on the critical path.
    pub misses: u64,
    /// Workers forked in the background.
    pub refills: u64,
    /// Forks that failed.
    pub fork_failures: u64,
    /// Background refills in the last minute.
    pub refills_last_minute: u64,
    /// Mean time to fork a worker and receive its `Idle`, in microseconds.
    pub fork_us_avg: u64,
    /// Pids of the idle workers.
    pub idle_pids: Vec<i32>,
    /// The zygote's pid.
    pub zygote_pid: i32,
    /// Times the zygote died and was started again.
    pub zygote_restarts: u64,
    /// Time to fork a worker and receive its `Idle`, per fork that gave a
    /// worker (for `/metrics`; `emberctl pool` shows the mean).
    #[serde(skip)]
    pub fork_latency: crate::prom::Latencies,
}

/// The pool is no longer running.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// The pool task ended (zygote gone or shutdown).
    #[error("warm pool is not running")]
    PoolGone,
    /// Forking a worker failed.
    #[error("no worker")]
    Fork(#[source] WorkerError),
}

enum Request {
    Take(oneshot::Sender<Result<Worker, WorkerError>>),
    Stats(oneshot::Sender<PoolStats>),
}

/// A handle on the pool task; cheap to clone.
#[derive(Debug, Clone)]
pub struct PoolHandle {
    tx: mpsc::Sender<Request>,
    zygote_pid: Arc<AtomicI32>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Take(_) => "Take",
            Request::Stats(_) => "Stats",
        })
    }
}

impl PoolHandle {
    /// A worker ready for a launch order.
    pub async fn take(&self) -> Result<Worker, TakeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Take(tx))
            .await
            .map_err(|_| TakeError::PoolGone)?;
        rx.await
            .map_err(|_| TakeError::PoolGone)?
            .map_err(TakeError::Fork)
    }

    /// Current counters.
    pub async fn stats(&self) -> Result<PoolStats, TakeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Stats(tx))
            .await
            .map_err(|_| TakeError::PoolGone)?;
        rx.await.map_err(|_| TakeError::PoolGone)
    }

    /// Whether the pool task still runs.
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// The current zygote's pid (the last one started, while a restart is
    /// under way).
    pub fn zygote_pid(&self) -> i32 {
        self.zygote_pid.load(Ordering::Relaxed)
    }
}

/// Starts the pool task; it owns the zygote, and starts a new one with
/// `plugins` if it dies. The task ends when every handle is dropped; then
/// it shuts the zygote down.
pub fn start(
    zygote: Zygote,
    plugins: Vec<PluginSpec>,
    policy: PoolConfig,
    limiter: Arc<Limiter>,
    events: EventHub,
) -> (PoolHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let zygote_pid = Arc::new(AtomicI32::new(zygote.pid()));
    let task = tokio::spawn(run(
        zygote,
        Respawner {
            plugins,
            start_timeout: policy.zygote_start_timeout(),
            pid: zygote_pid.clone(),
            delay: RESPAWN_DELAY_MIN,
            proven: true,
        },
        policy,
        limiter,
        rx,
        events,
    ));
    (PoolHandle { tx, zygote_pid }, task)
}

/// First wait before another attempt to start a zygote after a failed one;
/// doubled on each failure up to [`RESPAWN_DELAY_MAX`].
const RESPAWN_DELAY_MIN: Duration = Duration::from_millis(500);
const RESPAWN_DELAY_MAX: Duration = Duration::from_secs(30);

/// Starts new zygotes: what it needs, and the back-off between attempts.
struct Respawner {
    plugins: Vec<PluginSpec>,
    /// How long a new zygote may take to answer `Hello`.
    start_timeout: Duration,
    /// Shared with every [`PoolHandle`].
    pid: Arc<AtomicI32>,
    delay: Duration,
    /// The current zygote has forked a worker. One that dies before it
    /// ever did (a plugin that crashes it soon after start) is restarted
    /// only after `delay`, doubled each time, not in a tight loop.
    proven: bool,
}

/// A zygote start in progress.
type Respawn =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Zygote, ZygoteError>> + Send>>;

/// A pidfd of the zygote, registered with the runtime (`None` if the kernel
/// cannot give one: then its death is noticed at the next fork).
fn watch_exit(z: &Zygote) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    let fd = crate::zygote::fork_pidfd_open(z.pid()).ok()?;
    crate::link::register(fd).ok()
}

impl Respawner {
    /// The zygote died: reap it and start a new one (after the back-off
    /// delay if it never forked).
    fn replace(&mut self, dead: Option<Zygote>) -> Respawn {
        let wait = if self.proven {
            Duration::ZERO
        } else {
            let d = self.delay;
            self.delay = (self.delay * 2).min(RESPAWN_DELAY_MAX);
            d
        };
        tracing::error!(
            pid = dead.as_ref().map(Zygote::pid),
            wait_ms = wait.as_millis() as u64,
            "zygote died; starting a new one (running modules are not affected)"
        );
        let start = self.start(dead);
        Box::pin(async move {
            tokio::time::sleep(wait).await;
            start.await
        })
    }

    /// Reaps the dead zygote, if given, then starts a new one: fork + exec
    /// of emberd in zygote mode (exec leaves nothing of this multi-threaded
    /// process in the child), then its plugins' initialization, awaited.
    /// Runs in the pool task, on the runtime's thread, never on the
    /// blocking pool: the zygote's and its workers' parent-death signal
    /// follow the thread that started it (see `Zygote::restart`).
    fn start(&self, dead: Option<Zygote>) -> Respawn {
        let plugins = self.plugins.clone();
        let timeout = self.start_timeout;
        Box::pin(async move {
            if let Some(z) = dead {
                z.shutdown().await;
            }
            Zygote::restart(&plugins, timeout).await
        })
    }
}

/// How long the pool waits after handing out a worker before it forks
/// replacements. A fork of a zygote that carries hundreds of MiB costs
/// milliseconds of CPU; started at once it would compete with the launch
/// that just took a worker (on a 2-core host it doubled launch latency).
pub const REFILL_DELAY: Duration = Duration::from_millis(25);

/// The refill policy (hysteresis): start when fewer than `min_idle`
/// workers are idle, go on until `max_idle` are, then stop. `refilling` is
/// whether a refill is under way; the result is whether it goes on.
fn refill_wanted(idle: usize, min_idle: usize, max_idle: usize, refilling: bool) -> bool {
    if idle >= max_idle {
        false
    } else {
        refilling || idle < min_idle
    }
}

/// When recent background refills started, for `refills_last_minute`.
#[derive(Debug, Default)]
struct RecentRefills(VecDeque<Instant>);

impl RecentRefills {
    const WINDOW: Duration = Duration::from_secs(60);

    fn push(&mut self, at: Instant) {
        self.0.push_back(at);
    }

    /// Refills started within the minute before `now` (older ones are
    /// forgotten).
    fn count(&mut self, now: Instant) -> u64 {
        if let Some(since) = now.checked_sub(Self::WINDOW) {
            while self.0.front().is_some_and(|t| *t < since) {
                self.0.pop_front();
            }
        }
        self.0.len() as u64
    }
}

struct Pool {
    limiter: Arc<Limiter>,
    /// When a worker was last handed out; refills wait [`REFILL_DELAY`].
    last_take: Option<Instant>,
    refill_times: RecentRefills,
    fork_total: Duration,
    forks: u32,
    idle: VecDeque<Worker>,
    stats: PoolStats,
    refilling: bool,
    retry_at: Option<Instant>,
}

impl Pool {
    /// Drops idle workers that died while waiting.
    fn prune(&mut self) {
        self.idle.retain(|w| {
            if w.has_exited() {
                pidfd_reap(w.pidfd.as_fd());
                tracing::warn!(pid = w.pid, "idle worker died");
                // cgroupfs: off the runtime thread.
                let (limiter, pid) = (self.limiter.clone(), w.pid);
                drop(tokio::task::spawn_blocking(move || {
                    limiter.release_idle(pid)
                }));
                false
            } else {
                true
            }
        });
    }

    /// Whether the pool is below its policy (refill from under `min_idle`
    /// up to `max_idle`).
    fn wants_refill(&mut self) -> bool {
        self.refilling = refill_wanted(
            self.idle.len(),
            self.stats.min_idle,
            self.stats.max_idle,
            self.refilling,
        );
        self.refilling
    }

    fn needs_refill(&mut self) -> bool {
        self.wants_refill() && self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// When a deferred refill may start.
    fn refill_at(&self) -> Option<Instant> {
        self.last_take.map(|t| t + REFILL_DELAY)
    }

    /// Whether the last hand-out is long enough ago to fork replacements
    /// (an empty pool refills at once: the next launch would miss).
    fn refill_due(&self) -> bool {
        self.idle.is_empty() || self.refill_at().is_none_or(|t| Instant::now() >= t)
    }

    fn fork_failed(&mut self, e: &WorkerError) {
        self.stats.fork_failures += 1;
        tracing::warn!(error = %crate::error_chain(e), "fork failed");
        self.retry_at = Some(Instant::now() + Duration::from_millis(500));
    }

    fn forked(&mut self, started: Instant) {
        let took = started.elapsed();
        self.fork_total += took;
        self.forks = self.forks.saturating_add(1);
        self.stats.fork_latency.observe(took);
    }

    fn snapshot(&mut self) -> PoolStats {
        let mut s = self.stats.clone();
        s.refills_last_minute = self.refill_times.count(Instant::now());
        s.fork_us_avg = self
            .fork_total
            .checked_div(self.forks.max(1))
            .map_or(0, |d| d.as_micros() as u64);
        s.idle = self.idle.len();
        s.idle_pids = self.idle.iter().map(|w| w.pid).collect();
        s
    }
}

/// A fork in progress: it owns the zygote until it is done, then gives it
/// back with the new worker.
type Fork = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Zygote, Instant, Result<Worker, WorkerError>)> + Send>,
>;

/// Forks a worker; with `adopt`, puts it into a cgroup of its own while
/// nobody waits for it (a refill). A fork for a waiting launch skips that:
/// the launch's `Limiter::enter` makes its cgroup, one step instead of two
/// on the launch's path (each a hop through the blocking pool).
fn start_fork(mut zygote: Zygote, limiter: Arc<Limiter>, adopt: bool) -> Fork {
    Box::pin(async move {
        let t0 = Instant::now();
        let r = make_worker(&mut zygote).await;
        if let Some(w) = r.as_ref().ok().filter(|_| adopt) {
            // Into its own cgroup now, while nobody waits for it.
            let pid = w.pid;
            let adopted = tokio::task::spawn_blocking(move || limiter.adopt(pid)).await;
            match adopted {
                // It joins them itself before it reads a launch order.
                Ok(Ok(tasks)) if !tasks.is_empty() => {
                    let tasks: Vec<_> = tasks.iter().map(AsFd::as_fd).collect();
                    if let Err(e) = w.link.join_cgroups(&tasks).await {
                        tracing::warn!(pid, error = %crate::error_chain(&e), "cannot pre-assign a cgroup");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(pid, error = %crate::error_chain(&e), "cannot pre-assign a cgroup");
                }
                _ => {}
            }
        }
        (zygote, t0, r)
    })
}

async fn run(
    zygote: Zygote,
    mut respawner: Respawner,
    policy: PoolConfig,
    limiter: Arc<Limiter>,
    mut rx: mpsc::Receiver<Request>,
    events: EventHub,
) {
    let mut pool = Pool {
        limiter,
        last_take: None,
        idle: VecDeque::new(),
        stats: PoolStats {
            min_idle: policy.min_idle,
            max_idle: policy.max_idle,
            ..Default::default()
        },
        refilling: false,
        retry_at: None,
        refill_times: RecentRefills::default(),
        fork_total: Duration::ZERO,
        forks: 0,
    };
    // The zygote is here when no fork is in flight, else inside `in_flight`.
    // A fork is never cancelled (its answer would be left on the zygote
    // channel), but requests are served while it runs: a launch that finds
    // an idle worker never waits for a background refill.
    pool.stats.zygote_pid = zygote.pid();
    // Readable once the zygote has exited: noticed at once, not at the
    // next fork.
    let mut zygote_exit = watch_exit(&zygote);
    let mut zygote = Some(zygote);
    let mut in_flight: Option<Fork> = None;
    // A new zygote being started (the last one died), and when to try
    // again after a failed start.
    let mut respawning: Option<Respawn> = None;
    let mut respawn_at: Option<Instant> = None;
    // Launches that found no idle worker, served by the next forks in order.
    let mut waiting: VecDeque<oneshot::Sender<Result<Worker, WorkerError>>> = VecDeque::new();
    let mut closed = false;
    loop {
        if respawn_at.is_some_and(|t| Instant::now() >= t) {
            respawn_at = None;
            respawning = Some(respawner.start(None));
        }
        if in_flight.is_none() {
            if closed && (waiting.is_empty() || zygote.is_none()) {
                break;
            }
            if !waiting.is_empty() || (pool.needs_refill() && pool.refill_due()) {
                let adopt = waiting.is_empty();
                in_flight = zygote
                    .take()
                    .map(|z| start_fork(z, pool.limiter.clone(), adopt));
            }
        }
        // Wake up for a fork retry, when a deferred refill falls due, or to
        // try starting a zygote again.
        let retry_at = if in_flight.is_some() || zygote.is_none() {
            None
        } else if pool.wants_refill() {
            pool.retry_at.into_iter().chain(pool.refill_at()).max()
        } else {
            None
        };
        let retry_at = retry_at.into_iter().chain(respawn_at).min();
        tokio::select! {
            (z, t0, r) = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                in_flight = None;
                zygote = Some(z);
                let gone = matches!(r, Err(WorkerError::Fork(ForkError::ZygoteGone(_))));
                match r {
                    Ok(w) => {
                        pool.forked(t0);
                        // A zygote that forks is a working one: the next
                        // restart, if any, starts without delay again.
                        respawner.delay = RESPAWN_DELAY_MIN;
                        respawner.proven = true;
                        pool.retry_at = None;
                        match waiting.pop_front() {
                            // A requester that went away drops the worker,
                            // closing its channel: the worker retires.
                            Some(tx) => { let _ = tx.send(Ok(w)); }
                            None => {
                                events.emit(Event::Pool { what: "refill", pid: Some(w.pid) });
                                pool.refill_times.push(t0);
                                pool.stats.refills += 1;
                                pool.idle.push_back(w);
                            }
                        }
                    }
                    // The zygote died under this fork: the launch waiting
                    // for it waits for the new zygote instead (only a
                    // failed restart fails it).
                    Err(_) if gone => {}
                    Err(e) => {
                        pool.fork_failed(&e);
                        if let Some(tx) = waiting.pop_front() {
                            let _ = tx.send(Err(e));
                        }
                    }
                }
                if gone {
                    events.emit(Event::Zygote { what: "died", pid: zygote.as_ref().map(Zygote::pid) });
                    zygote_exit = None;
                    respawning = Some(respawner.replace(zygote.take()));
                }
            }
            _ = async { zygote_exit.as_ref().expect("guarded").readable().await.map(drop) },
                if zygote_exit.is_some() && zygote.is_some() =>
            {
                events.emit(Event::Zygote { what: "died", pid: zygote.as_ref().map(Zygote::pid) });
                zygote_exit = None;
                respawning = Some(respawner.replace(zygote.take()));
            }
            r = async { respawning.as_mut().expect("guarded").await }, if respawning.is_some() => {
                respawning = None;
                match r {
                    Ok(z) => {
                        tracing::info!(pid = z.pid(), "zygote restarted");
                        events.emit(Event::Zygote { what: "restarted", pid: Some(z.pid()) });
                        respawner.pid.store(z.pid(), Ordering::Relaxed);
                        respawner.proven = false;
                        pool.stats.zygote_pid = z.pid();
                        pool.stats.zygote_restarts += 1;
                        pool.retry_at = None;
                        zygote_exit = watch_exit(&z);
                        zygote = Some(z);
                    }
                    Err(e) => {
                        tracing::error!(
                            error = %crate::error_chain(&e),
                            retry_in_ms = respawner.delay.as_millis() as u64,
                            "cannot start a new zygote"
                        );
                        let reason = crate::error_chain(&e);
                        for tx in waiting.drain(..) {
                            let _ = tx.send(Err(WorkerError::NoZygote { reason: reason.clone() }));
                        }
                        respawn_at = Some(Instant::now() + respawner.delay);
                        respawner.delay = (respawner.delay * 2).min(RESPAWN_DELAY_MAX);
                    }
                }
            }
            req = rx.recv(), if !closed => match req {
                None => closed = true,
                Some(Request::Stats(tx)) => {
                    pool.prune();
                    let _ = tx.send(pool.snapshot());
                }
                Some(Request::Take(tx)) => {
                    pool.prune();
                    pool.last_take = Some(Instant::now());
                    match pool.idle.pop_front() {
                        Some(w) => {
                            pool.stats.hits += 1;
                            let _ = tx.send(Ok(w));
                        }
                        None => {
                            events.emit(Event::Pool { what: "miss", pid: None });
                            pool.stats.misses += 1;
                            waiting.push_back(tx);
                        }
                    }
                }
            },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                if pool.retry_at.is_some_and(|t| Instant::now() >= t) {
                    pool.retry_at = None;
                }
            }
        }
    }
    drop(in_flight);
    for w in pool.idle.drain(..) {
        let pid = w.pid;
        w.discard().await;
        let limiter = pool.limiter.clone();
        let _ = tokio::task::spawn_blocking(move || limiter.release_idle(pid)).await;
    }
    if let Some(z) = zygote {
        z.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the policy as the pool does: idle counts in, whether a fork
    /// starts out.
    fn forks(min: usize, max: usize, idle: &[usize]) -> Vec<bool> {
        let mut refilling = false;
        idle.iter()
            .map(|&n| {
                refilling = refill_wanted(n, min, max, refilling);
                refilling
            })
            .collect()
    }

    #[test]
    fn refill_starts_below_min_and_goes_on_up_to_max() {
        // Start-up: empty, fill to 4.
        assert_eq!(
            forks(2, 4, &[0, 1, 2, 3, 4]),
            [true, true, true, true, false]
        );
        // Launches take 4 → 3 → 2: still at or above min, no fork; 1: below
        // min, refill all the way back to 4.
        assert_eq!(
            forks(2, 4, &[4, 3, 2, 1, 2, 3, 4, 3]),
            [false, false, false, true, true, true, false, false]
        );
    }

    #[test]
    fn refill_never_goes_past_max_idle() {
        for min in 0..6 {
            for max in min..6 {
                for n in max..max + 3 {
                    assert!(!refill_wanted(n, min, max, true), "{min} {max} {n}");
                    assert!(!refill_wanted(n, min, max, false), "{min} {max} {n}");
                }
            }
        }
    }

    #[test]
    fn an_empty_policy_never_forks_ahead() {
        assert_eq!(forks(0, 0, &[0, 0, 0]), [false, false, false]);
        // min 0: nothing starts a refill, even with room below max.
        assert_eq!(forks(0, 3, &[0, 1, 2]), [false, false, false]);
    }

    #[test]
    fn refills_last_minute_counts_a_sliding_window() {
        let t0 = Instant::now();
        let mut r = RecentRefills::default();
        assert_eq!(r.count(t0), 0);
        r.push(t0);
        r.push(t0 + Duration::from_secs(10));
        r.push(t0 + Duration::from_secs(30));
        assert_eq!(r.count(t0 + Duration::from_secs(30)), 3);
        assert_eq!(r.count(t0 + Duration::from_secs(60)), 3);
        assert_eq!(r.count(t0 + Duration::from_secs(61)), 2);
        assert_eq!(r.count(t0 + Duration::from_secs(85)), 1);
        assert_eq!(r.count(t0 + Duration::from_secs(200)), 0);
    }
}
