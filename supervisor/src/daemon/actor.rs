//! The single owner of the daemon's state: desired state, modules and their
//! runs (one per revision running), live workers. Control requests and
//! instance events arrive on channels and are handled one at a time; this
//! file is the loop and the dispatch. The model is in `model.rs`, the
//! service registry in `registry.rs`, the rollout planner in `release.rs`,
//! replies in `render.rs`; the install and release pipelines are in
//! `pipeline.rs`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::model::{drive, Module, Run};
use super::os::{InstanceEvent, OsMsg, Registration};
use super::registry::{Directory, Live, Registry, Serving};
use super::render;
use crate::cgroup::Limiter;
use crate::config::LimitsConfig;
use crate::control::health::HealthReply;
use crate::control::install::InstallError;
use crate::control::list::ListReply;
use crate::control::pool::PoolReply;
use crate::control::status::StatusReply;
use crate::control::{module_not_found, Request};
use crate::fscred::Credentials;
use crate::lifecycle::{Event, Lifecycle, Policy, State};
use crate::manifest::{self, ServiceRef};
use crate::pool::PoolHandle;
use crate::sandbox::SandboxConfig;
use crate::store::{DesiredState, ModuleRecord, Persister, Store};
use crate::varlink::ErrorReply;
use crate::worker::SandboxReport;
use crate::zygote::client::pidfd_signal;

pub(super) use super::pipeline::{InstallWatch, Pending, StartingInstall};

/// What the actor answers.
#[derive(Debug)]
pub enum Response {
    /// A reply's parameters.
    Value(Value),
    /// The log file to serve (the connection streams it).
    Logs(PathBuf),
    /// A subscription to the event hub (the connection streams it).
    Events(super::events::Subscription),
}

/// Where the answer to one call goes.
pub(super) type Reply = oneshot::Sender<Result<Response, ErrorReply>>;

/// Where progress of a call with `more` goes.
pub type Progress = mpsc::UnboundedSender<Value>;

/// A message to the actor.
#[derive(Debug)]
pub enum ActorMsg {
    /// A control request and where to answer.
    Control {
        /// The request.
        request: Request,
        /// The answer.
        reply: Reply,
        /// For calls with `more` that report progress (`Install`, `Deploy`,
        /// `Rollback`): the module's summary each time it changes, until it
        /// settles.
        progress: Option<Progress>,
        /// The client's credentials: `Install` and `Deploy` open the files
        /// they name with its rights (see [`crate::fscred`]).
        peer: Arc<Credentials>,
    },
    /// Liveness probe (watchdog).
    Ping(oneshot::Sender<()>),
    /// Stop every module, then end.
    Shutdown(oneshot::Sender<()>),
    /// A copy of the facts `/metrics` shows (see [`super::scrape`]).
    Metrics(oneshot::Sender<super::scrape::ActorSnapshot>),
    /// The module counts of systemd's `STATUS=` line.
    StatusCounts(oneshot::Sender<super::status_line::Counts>),
}

/// The OS-facing handles [`drive`] needs, kept apart from the modules so a
/// module can be borrowed mutably while they are borrowed shared.
pub(super) struct OsHandles {
    pub pool: PoolHandle,
    pub events: mpsc::UnboundedSender<OsMsg>,
    /// Live workers' pidfds by pid.
    pub pidfds: HashMap<i32, Arc<OwnedFd>>,
    /// Command senders by pid (a copy of the registry's, for `RealOs`).
    pub commands: HashMap<i32, super::os::CommandTx>,
    pub limiter: Arc<Limiter>,
}

/// The state owner.
pub struct Actor {
    pub(super) store: Store,
    /// The only writer of `desired.json`, in order, off the actor's thread.
    pub(super) persister: Persister,
    /// Installs whose callers follow their progress.
    pub(super) watches: Vec<InstallWatch>,
    /// Installs with their artifact copied, waiting for the module to start
    /// before their state is written.
    pub(super) starting: Vec<StartingInstall>,
    /// Work on its way back from other threads (artifact copies, state
    /// writes).
    pub(super) pending_tx: mpsc::UnboundedSender<Pending>,
    pending_rx: mpsc::UnboundedReceiver<Pending>,
    /// Numbers artifact placeholders.
    pub(super) next_placeholder: u64,
    /// Installs and deploys whose files are being read on the blocking
    /// pool (at most [`super::pipeline::MAX_READS`]).
    pub(super) reads_in_flight: usize,
    pub(super) desired: DesiredState,
    /// Memory readings for Status, reused for a second (read off the
    /// actor).
    memory: Arc<crate::metrics::MemoryCache>,
    pub(super) modules: BTreeMap<String, Module>,
    pub(super) os: OsHandles,
    /// Registered workers and wired imports.
    pub(super) registry: Registry,
    events_rx: mpsc::UnboundedReceiver<OsMsg>,
    pub(super) policy: Policy,
    /// Limits for modules whose manifest leaves them unset.
    pub(super) limit_defaults: LimitsConfig,
    /// Caps on the files an install reads.
    pub(super) install_caps: crate::config::InstallConfig,
    /// The module sandbox.
    pub(super) sandbox: SandboxConfig,
    /// emberd's state and control socket directories, never writable to a
    /// module (see [`SandboxConfig::check_writable`]).
    pub(super) protected: Vec<PathBuf>,
    /// emberd is root: modules get their own uid (else they keep emberd's).
    pub(super) root: bool,
    /// What each live worker said its sandbox is, by pid.
    pub(super) sandboxes: HashMap<i32, SandboxReport>,
    started: Instant,
    pub(super) next_generation: u64,
    shutdown: Option<(oneshot::Sender<()>, Instant)>,
    /// The event hub (see `events.rs`).
    pub(super) events: super::events::EventHub,
    /// Containers run for the containerd shim (see `containers.rs`).
    pub(super) containers: super::containers::Containers,
}

/// The registry's view of the modules.
pub(super) struct Dir<'a>(pub &'a BTreeMap<String, Module>);

impl Directory for Dir<'_> {
    fn services(&self, module: &str, generation: u64) -> Option<(&[ServiceRef], &[ServiceRef])> {
        let run = self.0.get(module)?.run(generation)?;
        Some((run.exports.as_slice(), run.imports.as_slice()))
    }

    fn serving(&self, pid: i32, live: &Live) -> Serving {
        let Some(run) = self
            .0
            .get(&live.module)
            .and_then(|m| m.run(live.generation))
        else {
            return Serving::No;
        };
        if !run.is_wanted(live.replica as usize) {
            return Serving::No;
        }
        match run.replicas.get(live.replica as usize) {
            Some(l) if l.state() == State::Running && l.pid() == Some(pid) => Serving::Ready,
            Some(l) if l.state() == State::Starting && l.pid().is_none_or(|p| p == pid) => {
                Serving::Starting
            }
            _ => Serving::No,
        }
    }
}

/// The parts of emberd's configuration the actor applies.
pub struct Settings {
    /// Restart policy.
    pub policy: Policy,
    /// Limits for modules whose manifest leaves one unset.
    pub limit_defaults: LimitsConfig,
    /// Caps on the files an install reads.
    pub install_caps: crate::config::InstallConfig,
    /// The module sandbox.
    pub sandbox: SandboxConfig,
    /// emberd's own directories (see [`protected_dirs`]).
    pub protected: Vec<PathBuf>,
    /// Where state changes, installs and rollouts are published.
    pub events: super::events::EventHub,
}

impl Actor {
    /// An actor over loaded desired state; [`Actor::run`] starts the
    /// recorded modules.
    pub fn new(
        store: Store,
        desired: DesiredState,
        pool: PoolHandle,
        limiter: Arc<Limiter>,
        settings: Settings,
    ) -> Self {
        let Settings {
            policy,
            limit_defaults,
            install_caps,
            sandbox,
            protected,
            events,
        } = settings;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (pending_tx, pending_rx) = mpsc::unbounded_channel();
        Self {
            persister: Persister::start(store.clone()),
            watches: Vec::new(),
            starting: Vec::new(),
            pending_tx,
            pending_rx,
            next_placeholder: 0,
            reads_in_flight: 0,
            store,
            desired,
            memory: Default::default(),
            modules: BTreeMap::new(),
            os: OsHandles {
                pool,
                events: events_tx,
                pidfds: HashMap::new(),
                commands: HashMap::new(),
                limiter,
            },
            registry: Registry::default(),
            events_rx,
            policy,
            limit_defaults,
            install_caps,
            sandbox,
            protected,
            root: nix::unistd::geteuid().is_root(),
            sandboxes: HashMap::new(),
            started: Instant::now(),
            next_generation: 0,
            shutdown: None,
            events,
            containers: HashMap::new(),
        }
    }

    /// Runs until shut down or every sender is dropped.
    pub async fn run(mut self, mut rx: mpsc::Receiver<ActorMsg>) {
        self.restore_all();
        loop {
            let deadline = self
                .modules
                .values()
                .flat_map(|m| {
                    m.runs
                        .iter()
                        .flat_map(|r| r.replicas.iter().filter_map(Lifecycle::deadline))
                })
                .chain(self.modules.values().filter_map(|m| {
                    let r = m.rollout.as_ref()?;
                    Some(r.took_over? + r.params.stable_after)
                }))
                .chain(self.shutdown.as_ref().map(|s| s.1))
                .chain(self.starting.iter().map(|s| s.until))
                .min();
            tokio::select! {
                msg = rx.recv(), if self.shutdown.is_none() => match msg {
                    None => break,
                    Some(ActorMsg::Control { request, reply, progress, peer }) => {
                        self.control(request, reply, progress, peer)
                    }
                    Some(ActorMsg::Ping(tx)) => { let _ = tx.send(()); }
                    Some(ActorMsg::Shutdown(tx)) => self.begin_shutdown(tx),
                    Some(ActorMsg::Metrics(tx)) => { let _ = tx.send(self.metrics_snapshot()); }
                    Some(ActorMsg::StatusCounts(tx)) => { let _ = tx.send(self.status_counts()); }
                },
                Some(ev) = self.events_rx.recv() => match ev {
                    OsMsg::Instance(ev) => self.instance_event(ev),
                    OsMsg::Register(r) => self.register(r),
                    OsMsg::Sandboxed { pid, report } => {
                        self.sandboxes.insert(pid, report);
                    }
                },
                Some(p) = self.pending_rx.recv() => self.pending(p),
                _ = sleep_until(deadline), if deadline.is_some() => self.tick(),
            }
            self.settle_uninstalls();
            self.report_progress();
            self.persist_started();
            self.settle_containers();
            if self.shutdown_done() {
                break;
            }
        }
    }

    /// The policy for one module: the daemon's, with the manifest's
    /// deadlines.
    pub(super) fn policy_for(&self, summary: Option<&manifest::ManifestSummary>) -> Policy {
        let mut p = self.policy.clone();
        if let Some(m) = summary {
            if let Some(d) = m.start_deadline {
                p.start_timeout = d;
            }
            if let Some(d) = m.stop_deadline {
                p.stop_timeout = d;
            }
        }
        p
    }

    /// Why the first of `required` that no running module exports (at
    /// its version) is unmet.
    fn unmet_import(&self, required: &[ServiceRef]) -> Option<String> {
        required.iter().find_map(|want| {
            render::unmet_import(want, self.modules.values())
                .map(|cause| format!("waiting for service {want}: {cause}"))
        })
    }

    /// Makes one run's lifecycles match its target: replicas below it that
    /// are not running are started (or held while a service they require
    /// has no running exporter, or failed if the run cannot be launched),
    /// the others are stopped — importers wired to them are moved first.
    pub(super) fn reconcile(&mut self, name: &str, generation: u64) {
        let now = Instant::now();
        let Some(run) = self.modules.get(name).and_then(|m| m.run(generation)) else {
            return;
        };
        let stopping: Vec<i32> = run
            .replicas
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                !run.is_wanted(*i) && !matches!(l.state(), State::Stopped | State::Stopping)
            })
            .filter_map(|(_, l)| l.pid())
            .collect();
        let unmet = self.unmet_import(&run.required);
        if !stopping.is_empty() {
            self.registry
                .exporters_stopping(&stopping, &Dir(&self.modules));
        }
        let Some(run) = self
            .modules
            .get_mut(name)
            .and_then(|m| m.run_mut(generation))
        else {
            return;
        };
        for r in 0..run.replicas.len() {
            let state = run.replicas[r].state();
            if run.is_wanted(r) {
                if !matches!(state, State::Installing | State::Stopped | State::Waiting) {
                    continue;
                }
                match (&run.failure, &unmet) {
                    (Some(reason), _) => run.replicas[r].fail(reason.clone(), now),
                    (None, Some(reason)) => run.replicas[r].hold(reason.clone(), now),
                    (None, None) => drive(&self.store, &self.os, run, r, |l, os| l.start(now, os)),
                }
            } else if !matches!(state, State::Stopped | State::Stopping) {
                drive(&self.store, &self.os, run, r, |l, os| l.stop(now, os));
            }
        }
    }

    /// Reconciles every run of a module.
    pub(super) fn reconcile_module(&mut self, name: &str) {
        let gens: Vec<u64> = self
            .modules
            .get(name)
            .map(|m| m.runs.iter().map(|r| r.generation).collect())
            .unwrap_or_default();
        for g in gens {
            self.reconcile(name, g);
        }
    }

    /// Launches the replicas held in `waiting` whose required services now
    /// have a running exporter (called when a replica becomes ready).
    fn release_waiting(&mut self) {
        let names: Vec<String> = self
            .modules
            .iter()
            .filter(|(_, m)| {
                m.runs
                    .iter()
                    .any(|r| r.replicas.iter().any(|l| l.state() == State::Waiting))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.reconcile_module(&name);
        }
    }

    fn control(
        &mut self,
        request: Request,
        reply: Reply,
        progress: Option<Progress>,
        peer: Arc<Credentials>,
    ) {
        let value = |v: Result<Value, ErrorReply>| v.map(Response::Value);
        let result = match request {
            Request::Install(req) => {
                // The files are read on the blocking pool (a path may name
                // a FIFO, a device, a huge file), with the client's rights.
                return self.read_then(
                    req.path,
                    req.entry,
                    peer,
                    super::pipeline::Then::Install {
                        reply,
                        progress,
                        deploy: false,
                    },
                );
            }
            Request::Deploy(req) => return self.deploy(req, reply, progress, peer),
            Request::RunContainer(_)
            | Request::WaitContainer(_)
            | Request::KillContainer(_)
            | Request::RemoveContainer(_)
            | Request::ContainerStatus(_)
            | Request::UpdateContainer(_)
                if !super::containers::may_drive_containers(peer.uid) =>
            {
                Err(super::containers::containers_denied(peer.uid))
            }
            Request::RunContainer(req) => return self.run_container(req, reply, peer),
            Request::WaitContainer(req) => return self.wait_container(req.id, reply, progress),
            Request::KillContainer(req) => self
                .kill_container(req)
                .map(|()| Response::Value(serde_json::json!({}))),
            Request::RemoveContainer(req) => return self.remove_container(req.id, reply),
            Request::ContainerStatus(req) => self
                .container_status(&req.id)
                .map(|r| Response::Value(to_value(r))),
            Request::UpdateContainer(req) => return self.update_container(req, reply),
            Request::Rollback(req) => return self.rollback(req, reply, progress),
            Request::Rollout(req) => value(self.rollout_action(req)),
            Request::History(req) => value(self.history(&req.name)),
            Request::Uninstall(req) => {
                if let Err(e) = self.refuse_container(&req.name) {
                    let _ = reply.send(Err(e));
                    return;
                }
                return self.uninstall(req.name, reply);
            }
            Request::List(_) => value(Ok(to_value(ListReply {
                modules: self.modules.values().map(render::summary).collect(),
            }))),
            Request::Status(req) => match self.modules.get(&req.name) {
                Some(m) => {
                    // The model is rendered here; /proc and the cgroups are
                    // read on the blocking pool, never on the actor.
                    let imports = render::imports_status(m, self.modules.values(), &self.registry);
                    let status = render::status(m, imports, &self.os.limiter, &self.sandboxes);
                    let (limiter, memory) = (self.os.limiter.clone(), self.memory.clone());
                    tokio::spawn(async move {
                        let done = tokio::task::spawn_blocking(move || {
                            let readings = render::read(&status, &limiter, &memory);
                            render::apply(status, &readings)
                        })
                        .await;
                        let r = done
                            .map(|status| Response::Value(to_value(StatusReply { status })))
                            .map_err(|e| crate::control::invalid_input(e.to_string()));
                        let _ = reply.send(r);
                    });
                    return;
                }
                None => Err(module_not_found(&req.name)),
            },
            Request::Health(_) => {
                // /proc/self/fd is read on the blocking pool.
                let mut health = self.health();
                tokio::spawn(async move {
                    let (open, limit) = tokio::task::spawn_blocking(|| {
                        (
                            crate::rlimit::open_count().unwrap_or(0),
                            crate::rlimit::get().map_or(0, |(soft, _)| soft),
                        )
                    })
                    .await
                    .unwrap_or((0, 0));
                    health.open_files = open;
                    health.open_files_limit = limit;
                    let _ = reply.send(Ok(Response::Value(to_value(health))));
                });
                return;
            }
            Request::Pool(_) => {
                let pool = self.os.pool.clone();
                tokio::spawn(async move {
                    let r = match pool.stats().await {
                        Ok(s) => Ok(Response::Value(to_value(PoolReply { pool: s }))),
                        Err(e) => Err(crate::control::invalid_input(e.to_string())),
                    };
                    let _ = reply.send(r);
                });
                return;
            }
            Request::Events(_) => Ok(Response::Events(self.events.follow())),
            Request::Logs(req) => match self.modules.get(&req.name) {
                Some(_) => Ok(Response::Logs(self.store.log_path(&req.name))),
                None => Err(module_not_found(&req.name)),
            },
        };
        let _ = reply.send(result);
    }

    fn history(&self, name: &str) -> Result<Value, ErrorReply> {
        let record = self
            .desired
            .modules
            .get(name)
            .filter(|_| self.modules.contains_key(name))
            .ok_or_else(|| module_not_found(name))?;
        Ok(to_value(crate::control::history::HistoryReply {
            revisions: render::history(&record.revisions),
        }))
    }

    pub(super) fn stop_module(&mut self, name: &str) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        for run in &mut m.runs {
            run.set_target(0);
        }
        self.reconcile_module(name);
    }

    fn instance_event(&mut self, ev: InstanceEvent) {
        let InstanceEvent {
            module,
            generation,
            replica,
            pid,
            event,
            pidfd,
            cpu_seconds,
        } = ev;
        if let (Some(cpu), Some(m)) = (cpu_seconds, self.modules.get_mut(&module)) {
            if let Some(revision) = m.run(generation).map(|r| r.revision) {
                m.counted.exited_cpu(revision, replica, cpu);
            }
        }
        if let (Some(pid), Some(fd)) = (pid, pidfd) {
            self.os.pidfds.insert(pid, fd);
        }
        self.container_event(&module, generation, &event);
        // A worker that exited, or one registered whose launch order then
        // failed (it is discarded), is forgotten.
        let exited = matches!(event, Event::Exited { .. } | Event::LaunchFailed { .. });
        let ready = matches!(event, Event::Ready { .. });
        let run = self
            .modules
            .get_mut(&module)
            .and_then(|m| m.run_mut(generation))
            .filter(|r| (replica as usize) < r.replicas.len());
        match run {
            Some(run) => {
                drive(&self.store, &self.os, run, replica as usize, |l, os| {
                    l.on_event(event, Instant::now(), os)
                });
            }
            None => {
                if let (Event::Launched { .. }, Some(pid)) = (&event, pid) {
                    // A worker for a run that is gone (uninstalled,
                    // aborted) meanwhile.
                    if let Some(fd) = self.os.pidfds.get(&pid) {
                        let _ = pidfd_signal(fd.as_fd(), libc::SIGKILL);
                    }
                }
            }
        }
        if exited {
            if let Some(pid) = pid {
                self.os.pidfds.remove(&pid);
                self.os.commands.remove(&pid);
                self.sandboxes.remove(&pid);
                self.registry.unregister(pid, &Dir(&self.modules));
            }
        }
        if ready {
            if let Some(pid) = pid {
                self.registry.exporter_ready(pid, &Dir(&self.modules));
            }
            self.release_waiting();
        }
        self.advance(&module);
    }

    /// Wires a worker about to be launched (see [`Registry::register`]);
    /// the ends go to the two workers only and no copy stays here.
    fn register(&mut self, r: Registration) {
        let Registration {
            module,
            generation,
            replica,
            pid,
            commands,
            reply,
        } = r;
        if self
            .modules
            .get(&module)
            .and_then(|m| m.run(generation))
            .is_none()
        {
            // Stale: its Launched event will have the worker killed.
            let _ = reply.send(Vec::new());
            return;
        }
        self.os.commands.insert(pid, commands.clone());
        let live = Live {
            module,
            generation,
            replica,
            commands,
        };
        let grants = self.registry.register(pid, live, &Dir(&self.modules));
        let _ = reply.send(grants);
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self.modules.keys().cloned().collect();
        for name in names {
            let Some(m) = self.modules.get_mut(&name) else {
                continue;
            };
            for run in &mut m.runs {
                for r in 0..run.replicas.len() {
                    if run.replicas[r].deadline().is_some_and(|d| d <= now) {
                        drive(&self.store, &self.os, run, r, |l, os| l.on_tick(now, os));
                    }
                }
            }
            self.advance(&name);
        }
    }

    fn health(&self) -> HealthReply {
        let count = |f: fn(State) -> bool| self.modules.values().filter(|m| f(m.state())).count();
        HealthReply {
            healthy: self.os.pool.is_alive(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            zygote_pid: self.os.pool.zygote_pid(),
            modules: self.modules.len(),
            running: count(|s| s == State::Running),
            failed: count(|s| matches!(s, State::Failed | State::CrashLoop)),
            memory_limits: self.os.limiter.detection().memory_mechanism(),
            cpu_limits: self.os.limiter.detection().cpu_mechanism(),
            open_files: 0,
            open_files_limit: 0,
            runtime_libs: crate::runtime_libs::status(),
        }
    }

    fn begin_shutdown(&mut self, tx: oneshot::Sender<()>) {
        let names: Vec<String> = self.modules.keys().cloned().collect();
        for n in &names {
            // A rollout in progress stops where it is (its revision is
            // recorded as rolling out, so the next start calls it aborted);
            // its callers are told, and nothing is started any more.
            if let Some(ro) = self.modules.get_mut(n).and_then(|m| m.rollout.take()) {
                for f in ro.finals.into_iter().chain(ro.started_replies) {
                    let _ = f.send(Err(ErrorReply::new(
                        crate::control::errors::SHUTTING_DOWN,
                        serde_json::json!({}),
                    )));
                }
            }
            self.stop_module(n);
        }
        // Stop deadlines SIGKILL stragglers; give them a moment to exit.
        let longest = self
            .modules
            .values()
            .flat_map(|m| m.runs.iter().map(|r| r.stop_deadline))
            .max()
            .unwrap_or_default()
            .max(self.policy.stop_timeout);
        let limit = Instant::now() + longest + std::time::Duration::from_secs(1);
        self.shutdown = Some((tx, limit));
    }

    /// Every module's uid, by name, as recorded now: what an install's
    /// read phase skips (see [`SandboxConfig::free_candidates`]).
    /// Containers' uids count too (they are in no desired state).
    pub(super) fn recorded_uids(&self) -> Vec<(String, u32)> {
        self.desired
            .modules
            .values()
            .filter_map(|r| Some((r.name.clone(), r.uid?)))
            .chain(
                self.containers
                    .values()
                    .filter_map(|c| Some((c.name.clone(), c.uid?))),
            )
            .collect()
    }

    /// A uid for the module `name`: the first of `candidates` (free in
    /// passwd and group, checked off this thread) that no other module has;
    /// [`InstallError::NoUid`] when there is none.
    pub(super) fn allocate_uid(&self, name: &str, candidates: &[u32]) -> Result<u32, InstallError> {
        let taken: std::collections::HashSet<u32> = self
            .desired
            .modules
            .values()
            .filter(|r| r.name != name)
            .filter_map(|r| r.uid)
            .chain(
                self.containers
                    .values()
                    .filter(|c| c.name != name)
                    .filter_map(|c| c.uid),
            )
            .collect();
        candidates
            .iter()
            .copied()
            .find(|id| !taken.contains(id))
            .ok_or_else(|| InstallError::NoUid {
                name: name.to_owned(),
                range: self.sandbox.uid_range,
            })
    }

    /// Whether a `Shutdown` began.
    pub(super) fn shutting_down(&self) -> bool {
        self.shutdown.is_some()
    }

    fn shutdown_done(&mut self) -> bool {
        let Some((_, limit)) = &self.shutdown else {
            return false;
        };
        if self.modules.values().all(Module::all_stopped) || Instant::now() >= *limit {
            if let Some((tx, _)) = self.shutdown.take() {
                let _ = tx.send(());
            }
            return true;
        }
        false
    }

    /// Restores every recorded module on its committed revision. A rollout
    /// that was in progress when emberd stopped is recorded as aborted:
    /// its revision never took over for good.
    fn restore_all(&mut self) {
        let now = unix_now();
        let mut changed = false;
        for r in self.desired.modules.values_mut() {
            if r.revisions.is_empty() {
                r.revisions
                    .push(r.as_revision(now, crate::store::Outcome::Active));
                changed = true;
            }
            for v in &mut r.revisions {
                if v.outcome == crate::store::Outcome::RollingOut {
                    v.outcome = crate::store::Outcome::Aborted;
                    v.reason = Some("emberd restarted during its rollout".into());
                    changed = true;
                }
            }
        }
        // State written before the sandbox existed got its uids at
        // start-up, before the runtime (`SandboxConfig::assign_missing_uids`:
        // NSS lookups, which may block).
        let records: Vec<ModuleRecord> = self.desired.modules.values().cloned().collect();
        for r in records {
            tracing::info!(module = %r.name, version = %r.version, revision = r.revision, "restoring");
            self.restore(r);
        }
        if changed {
            // Written in the background; nothing waits for it.
            drop(self.persister.save(self.desired.clone(), None));
        }
    }
}

/// The paths no module may write, whatever its manifest and the
/// configuration say: emberd's state directory and its control socket's,
/// and the files emberd runs unsandboxed — its binary, its configuration
/// file and the base's plugins (a writable directory holding one is
/// refused too) — as configured and as resolved (a symlink in the
/// configured path names the same place under another name). Resolving
/// touches the filesystem: called once at start-up, before the actor runs.
pub fn protected_dirs(state_dir: &Path, socket: &Path, files: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let dirs = [Some(state_dir), socket.parent()].into_iter().flatten();
    let files = files.iter().map(PathBuf::as_path).chain(exe.as_deref());
    for d in dirs.chain(files) {
        let resolved = std::fs::canonicalize(d).ok();
        for p in [Some(d.to_owned()), resolved].into_iter().flatten() {
            if let Ok(p) = crate::sandbox::normalize(&p) {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d.into()).await;
    }
}

pub(super) fn to_value<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).expect("replies always serialize")
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The runs of a module that nobody needs any more: not the active one,
/// not a rollout's, all replicas stopped.
pub(super) fn finished_runs(m: &Module) -> Vec<u64> {
    m.runs
        .iter()
        .filter(|r| r.generation != m.active)
        .filter(|r| {
            m.rollout
                .as_ref()
                .is_none_or(|ro| ro.from_gen != r.generation && ro.to_gen != r.generation)
        })
        .filter(|r| r.all_stopped())
        .map(|r| r.generation)
        .collect()
}

/// Drops a finished run, unlinking the Unix listener paths only it bound.
pub(super) fn drop_run(m: &mut Module, generation: u64) {
    let Some(i) = m.runs.iter().position(|r| r.generation == generation) else {
        return;
    };
    let run: Run = m.runs.remove(i);
    m.counted.retire(&run);
    for (p, id) in &run.unix_paths {
        if !m
            .runs
            .iter()
            .any(|r| r.unix_paths.iter().any(|(q, _)| q == p))
        {
            crate::listeners::unlink_own(p, *id);
        }
    }
}
