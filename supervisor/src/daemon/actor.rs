//! The single owner of the daemon's state: desired state, module
//! lifecycles (one per replica), live workers. Control requests and
//! instance events arrive on channels and are handled one at a time.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use super::os::{
    Command, CommandTx, ImageRx, ImageTx, InstanceEvent, LaunchPlan, OsMsg, RealOs, Registration,
    ServiceGrant,
};
use crate::cgroup::{Limiter, Limits};
use crate::config::{manifest_with_memory, LimitSource, LimitSources, LimitsConfig};
use crate::control::health::HealthReply;
use crate::control::install::{check_artifact, Install, InstallError};
use crate::control::list::{ListReply, ModuleSummary};
use crate::control::pool::PoolReply;
use crate::control::status::{
    ImportStatus, LimitsStatus, ListenerStatus, ModuleStatus, ReplicaStatus, StatusReply,
};
use crate::control::uninstall::{UninstallError, UninstallReply};
use crate::control::{module_not_found, Request};
use crate::error_chain;
use crate::lifecycle::{Event, Lifecycle, Policy, State};
use crate::listeners::{self, Bound, ListenError};
use crate::manifest::{self, ManifestSummary};
use crate::metrics::Memory;
use crate::pool::PoolHandle;
use crate::store::{
    self as store, ArtifactImage, DesiredState, ModuleRecord, NewArtifact, Persister, Saved, Store,
    StoreError,
};
use crate::varlink::ErrorReply;
use crate::worker::{Grant, GrantKind, LaunchOrder, ToWorker};
use crate::zygote::client::pidfd_signal;

/// What the actor answers.
#[derive(Debug)]
pub enum Response {
    /// A reply's parameters.
    Value(Value),
    /// The log file to serve (the connection streams it).
    Logs(PathBuf),
}

type Reply = oneshot::Sender<Result<Response, ErrorReply>>;

/// Where progress of a call with `more` goes.
pub type Progress = mpsc::UnboundedSender<Value>;

/// An install whose caller follows its progress.
struct InstallWatch {
    name: String,
    generation: u64,
    last: Option<State>,
    tx: Progress,
}

/// A message to the actor.
#[derive(Debug)]
pub enum ActorMsg {
    /// A control request and where to answer.
    Control {
        /// The request.
        request: Request,
        /// The answer.
        reply: Reply,
        /// For calls with `more` that report progress (`Install`): the
        /// module's summary each time its state changes, until it settles.
        progress: Option<Progress>,
    },
    /// Liveness probe (watchdog).
    Ping(oneshot::Sender<()>),
    /// Stop every module, then end.
    Shutdown(oneshot::Sender<()>),
}

struct Module {
    record: ModuleRecord,
    /// What workers load, or why there is nothing to load; `None` while an
    /// install's copy is still being made.
    image: ImageRx,
    /// The file the image is of, for messages.
    image_path: PathBuf,
    /// The image itself once made (installs compare against it, so
    /// identical artifacts share one image).
    artifact: Option<ArtifactImage>,
    /// One lifecycle per replica; index = replica number.
    replicas: Vec<Lifecycle>,
    generation: u64,
    /// Bound listeners shared by every replica: name and socket.
    listeners: Vec<(String, Arc<OwnedFd>)>,
    /// Listener names and bound addresses, for status.
    listener_addrs: Vec<(String, String)>,
    /// Unix listener paths to unlink on uninstall.
    unix_paths: Vec<PathBuf>,
    /// Services it exports and imports (manifest).
    exports: Vec<String>,
    imports: Vec<String>,
    /// The imports it is not launched without (not `optional`).
    required: Vec<String>,
    stop_deadline: std::time::Duration,
    /// Its effective limits: the manifest's, else the configuration's
    /// defaults.
    limits: Limits,
    /// Where each limit comes from.
    limit_sources: LimitSources,
    /// The manifest text sent to its workers (the record's, with a default
    /// memory limit filled in).
    launch_manifest: String,
    uninstall: Vec<Reply>,
    /// Stopped for an uninstall whose state write is under way.
    removing: bool,
    /// An install being undone: removed even if its state write fails.
    rolling_back: bool,
}

/// How long an install's state write waits for its module to start.
const PERSIST_AFTER_AT_MOST: std::time::Duration = std::time::Duration::from_millis(50);

/// An install whose state write waits for its module to leave `starting`.
struct StartingInstall {
    install: InstallSaved,
    image: ArtifactImage,
    until: Instant,
}

/// An install on its way to disk.
enum Pending {
    /// Its artifact copy is made (or failed).
    Copied {
        install: InstallSaved,
        image: Result<ArtifactImage, StoreError>,
    },
    /// The persister has finished with it.
    Saved(InstallSaved),
    /// An uninstall's state write is done (or failed).
    Removed {
        name: String,
        generation: u64,
        record: Option<ModuleRecord>,
        result: Result<(), StoreError>,
    },
}

/// An install the persister has finished with.
struct InstallSaved {
    name: String,
    generation: u64,
    placeholder: String,
    result: Saved,
    summary: ModuleSummary,
    reply: Reply,
}

/// A worker that got (or is about to get) its launch order.
struct Live {
    module: String,
    generation: u64,
    replica: u32,
    commands: CommandTx,
}

/// The OS-facing handles [`drive`] needs, kept apart from the modules so a
/// module can be borrowed mutably while they are borrowed shared.
struct OsHandles {
    pool: PoolHandle,
    events: mpsc::UnboundedSender<OsMsg>,
    /// Live workers' pidfds by pid.
    pidfds: HashMap<i32, OwnedFd>,
    /// Command senders by pid (a copy of `live`'s, for [`RealOs`]).
    commands: HashMap<i32, CommandTx>,
    limiter: Arc<Limiter>,
}

impl Module {
    fn state(&self) -> State {
        State::aggregate(self.replicas.iter().map(Lifecycle::state))
    }

    fn all_stopped(&self) -> bool {
        self.replicas.iter().all(|l| l.state() == State::Stopped)
    }

    fn plan(&self, store: &Store, replica: u32, limiter: &Arc<Limiter>) -> LaunchPlan {
        LaunchPlan {
            module: self.record.name.clone(),
            identity: format!("{}@{}#{replica}", self.record.name, self.record.version),
            artifact: self.image.clone(),
            order: LaunchOrder {
                artifact: self.image_path.clone(),
                manifest: self.launch_manifest.clone(),
                replica,
                // Set at launch, once the instance's cgroup is known.
                memory_enforced: false,
                grants: Vec::new(),
            },
            log: store.log_path(&self.record.name),
            listeners: self.listeners.clone(),
            generation: self.generation,
            stop_deadline: self.stop_deadline,
            limits: self.limits,
            limiter: limiter.clone(),
        }
    }
}

/// The state owner.
pub struct Actor {
    store: Store,
    /// The only writer of `desired.json`, in order, off the actor's thread.
    persister: Persister,
    /// Installs whose callers follow their progress.
    watches: Vec<InstallWatch>,
    /// Installs with their artifact copied, waiting for the module to start
    /// before their state is written.
    starting: Vec<StartingInstall>,
    /// Installs on their way to disk: artifact copied, state written.
    pending_tx: mpsc::UnboundedSender<Pending>,
    pending_rx: mpsc::UnboundedReceiver<Pending>,
    /// Numbers artifact placeholders.
    next_placeholder: u64,
    desired: DesiredState,
    /// Memory readings for Status, reused for a second.
    memory: crate::metrics::MemoryCache,
    modules: BTreeMap<String, Module>,
    os: OsHandles,
    /// Registered workers by pid (the registry's view).
    live: HashMap<i32, Live>,
    /// Wired imports: (importer, replica, service) → exporter's pid.
    wired: HashMap<(String, u32, String), i32>,
    events_rx: mpsc::UnboundedReceiver<OsMsg>,
    policy: Policy,
    /// Limits for modules whose manifest leaves them unset.
    limit_defaults: LimitsConfig,
    started: Instant,
    next_generation: u64,
    shutdown: Option<(oneshot::Sender<()>, Instant)>,
}

/// Runs `f` on one replica's lifecycle with a [`RealOs`] able to launch it,
/// logging any state change.
fn drive(
    store: &Store,
    parts: &OsHandles,
    m: &mut Module,
    replica: usize,
    f: impl FnOnce(&mut Lifecycle, &mut RealOs<'_>),
) {
    let plan = m.plan(store, replica as u32, &parts.limiter);
    let mut os = RealOs {
        pool: &parts.pool,
        events: &parts.events,
        pidfds: &parts.pidfds,
        commands: &parts.commands,
        plan: Some(plan),
    };
    let Some(l) = m.replicas.get_mut(replica) else {
        return;
    };
    let before = l.state();
    f(l, &mut os);
    if l.state() != before {
        log_transition(l, before);
    }
}

impl Actor {
    /// An actor over loaded desired state; [`Actor::run`] starts the
    /// recorded modules.
    pub fn new(
        store: Store,
        desired: DesiredState,
        pool: PoolHandle,
        policy: Policy,
        limiter: Arc<Limiter>,
        limit_defaults: LimitsConfig,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (pending_tx, pending_rx) = mpsc::unbounded_channel();
        Self {
            persister: Persister::start(store.clone()),
            watches: Vec::new(),
            starting: Vec::new(),
            pending_tx,
            pending_rx,
            next_placeholder: 0,
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
            live: HashMap::new(),
            wired: HashMap::new(),
            events_rx,
            policy,
            limit_defaults,
            started: Instant::now(),
            next_generation: 0,
            shutdown: None,
        }
    }

    /// Runs until shut down or every sender is dropped.
    pub async fn run(mut self, mut rx: mpsc::Receiver<ActorMsg>) {
        let records: Vec<ModuleRecord> = self.desired.modules.values().cloned().collect();
        for r in records {
            tracing::info!(module = %r.name, version = %r.version, "restoring");
            self.restore(r);
        }
        loop {
            let deadline = self
                .modules
                .values()
                .flat_map(|m| m.replicas.iter().filter_map(Lifecycle::deadline))
                .chain(self.shutdown.as_ref().map(|s| s.1))
                .chain(self.starting.iter().map(|s| s.until))
                .min();
            tokio::select! {
                msg = rx.recv(), if self.shutdown.is_none() => match msg {
                    None => break,
                    Some(ActorMsg::Control { request, reply, progress }) => {
                        self.control(request, reply, progress)
                    }
                    Some(ActorMsg::Ping(tx)) => { let _ = tx.send(()); }
                    Some(ActorMsg::Shutdown(tx)) => self.begin_shutdown(tx),
                },
                Some(ev) = self.events_rx.recv() => match ev {
                    OsMsg::Instance(ev) => self.instance_event(ev),
                    OsMsg::Register(r) => self.register(r),
                },
                Some(p) = self.pending_rx.recv() => match p {
                    Pending::Copied { install, image } => self.install_copied(install, image),
                    Pending::Saved(install) => self.install_saved(install),
                    Pending::Removed { name, generation, record, result } => {
                        self.uninstall_saved(name, generation, record, result)
                    }
                },
                _ = sleep_until(deadline), if deadline.is_some() => self.tick(),
            }
            self.settle_uninstalls();
            self.report_progress();
            self.persist_started();
            if self.shutdown_done() {
                break;
            }
        }
    }

    /// The policy for one module: the daemon's, with the manifest's
    /// deadlines.
    fn policy_for(&self, summary: Option<&ManifestSummary>) -> Policy {
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

    /// Registers a module and starts its replicas, or marks them failed if
    /// its listeners could not be bound.
    fn add_and_start(
        &mut self,
        record: ModuleRecord,
        (image, image_path): (ImageRx, PathBuf),
        bound: Result<Vec<Bound>, String>,
    ) {
        self.next_generation += 1;
        let now = Instant::now();
        let summary = manifest::parse(&record.manifest).ok();
        let policy = self.policy_for(summary.as_ref());
        let replicas = summary.as_ref().map_or(1, |s| s.replicas).max(1);
        let image_failure = match &*image.borrow() {
            Some(Err(reason)) => Some(reason.clone()),
            _ => None,
        };
        let (bound, failure) = match (bound, image_failure) {
            (Ok(b), None) => (b, None),
            (Ok(b), Some(reason)) => (b, Some(reason)),
            (Err(reason), _) => (Vec::new(), Some(reason)),
        };
        let (limits, limit_sources) = self.limit_defaults.resolve(
            summary.as_ref().and_then(|s| s.memory),
            summary.as_ref().and_then(|s| s.cpu),
        );
        let launch_manifest = match (limit_sources.memory, limits.memory) {
            (LimitSource::Config, Some(bytes)) => {
                manifest_with_memory(&record.manifest, bytes).unwrap_or(record.manifest.clone())
            }
            _ => record.manifest.clone(),
        };
        let mut m = Module {
            image,
            image_path,
            artifact: None,
            replicas: (0..replicas)
                .map(|r| {
                    let name = if replicas == 1 {
                        record.name.clone()
                    } else {
                        format!("{}#{r}", record.name)
                    };
                    Lifecycle::new(name, policy.clone(), now)
                })
                .collect(),
            record,
            generation: self.next_generation,
            listener_addrs: bound
                .iter()
                .map(|b| (b.name.clone(), b.address.clone()))
                .collect(),
            unix_paths: bound.iter().filter_map(|b| b.unix_path.clone()).collect(),
            exports: summary
                .as_ref()
                .map_or_else(Vec::new, |s| s.exports.clone()),
            imports: summary
                .as_ref()
                .map_or_else(Vec::new, |s| s.imports.clone()),
            required: summary
                .as_ref()
                .map_or_else(Vec::new, |s| s.required_imports.clone()),
            stop_deadline: policy.stop_timeout,
            limits,
            limit_sources,
            launch_manifest,
            listeners: bound
                .into_iter()
                .map(|b| (b.name, Arc::new(b.fd)))
                .collect(),
            uninstall: Vec::new(),
            removing: false,
            rolling_back: false,
        };
        let unmet = self.unmet_import(&m.required);
        for r in 0..m.replicas.len() {
            match (&failure, &unmet) {
                (Some(reason), _) => m.replicas[r].fail(reason.clone(), now),
                (None, Some(service)) => m.replicas[r].hold(waiting_for(service), now),
                (None, None) => drive(&self.store, &self.os, &mut m, r, |l, os| l.start(now, os)),
            }
        }
        if let (None, Some(service)) = (&failure, &unmet) {
            tracing::info!(module = %m.record.name, service, "waits for a running exporter");
        }
        if let Some(reason) = failure {
            tracing::warn!(module = %m.record.name, %reason, "cannot start");
        }
        self.modules.insert(m.record.name.clone(), m);
    }

    /// The first of `required` that no running module exports.
    fn unmet_import(&self, required: &[String]) -> Option<String> {
        required
            .iter()
            .find(|service| {
                !self.modules.values().any(|e| {
                    e.exports.contains(service)
                        && e.replicas.iter().any(|l| l.state() == State::Running)
                })
            })
            .cloned()
    }

    /// Launches the replicas held in `waiting` whose required services now
    /// have a running exporter (called when a replica becomes ready).
    fn release_waiting(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self
            .modules
            .values()
            .filter(|m| m.replicas.iter().any(|l| l.state() == State::Waiting))
            .map(|m| m.record.name.clone())
            .collect();
        for name in names {
            let unmet = self.unmet_import(&self.modules[&name].required);
            let Some(m) = self.modules.get_mut(&name) else {
                continue;
            };
            for r in 0..m.replicas.len() {
                match &unmet {
                    Some(service) if m.replicas[r].state() == State::Waiting => {
                        // Another service is still missing: say which.
                        m.replicas[r].hold(waiting_for(service), now);
                    }
                    None if m.replicas[r].state() == State::Waiting => {
                        drive(&self.store, &self.os, m, r, |l, os| l.start(now, os));
                    }
                    _ => {}
                }
            }
        }
    }

    fn restore(&mut self, record: ModuleRecord) {
        let bound = match manifest::parse(&record.manifest) {
            Ok(summary) => listeners::bind_all(&summary.listeners).map_err(|e| error_chain(&e)),
            Err(e) => Err(format!("stored manifest: {}", error_chain(&e))),
        };
        let path = self.store.artifact_path(&record.artifact_sha256);
        // Modules restored from the same stored artifact share its image.
        let known = self
            .modules
            .values()
            .filter_map(|m| m.artifact.clone())
            .find(|i| i.sha256.get() == Some(&record.artifact_sha256));
        let image = match known {
            Some(i) => Ok(i),
            None => self
                .store
                .open_artifact(&record.artifact_sha256)
                .map_err(|e| format!("stored artifact: {}", error_chain(&e))),
        };
        let (_, rx) = watch::channel(Some(
            image.as_ref().map(|i| i.fd.clone()).map_err(Clone::clone),
        ));
        let name = record.name.clone();
        self.add_and_start(record, (rx, path), bound);
        if let (Some(m), Ok(i)) = (self.modules.get_mut(&name), image) {
            m.artifact = Some(i);
        }
    }

    fn control(&mut self, request: Request, reply: Reply, progress: Option<Progress>) {
        let value = |v: Result<Value, ErrorReply>| v.map(Response::Value);
        let result = match request {
            Request::Install(req) => return self.install(req, reply, progress),
            Request::Uninstall(req) => return self.uninstall(req.name, reply),
            Request::List(_) => value(Ok(to_value(ListReply {
                modules: self.modules.values().map(summary).collect(),
            }))),
            Request::Status(req) => value(
                self.modules
                    .get(&req.name)
                    .map(|m| {
                        let imports = imports_status(m, &self.modules, &self.live, &self.wired);
                        to_value(StatusReply {
                            status: status(m, imports, &self.os.limiter, &self.memory),
                        })
                    })
                    .ok_or_else(|| module_not_found(&req.name)),
            ),
            Request::Health(_) => value(Ok(to_value(self.health()))),
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
            Request::Logs(req) => match self.modules.get(&req.name) {
                Some(_) => Ok(Response::Logs(self.store.log_path(&req.name))),
                None => Err(module_not_found(&req.name)),
            },
        };
        let _ = reply.send(result);
    }

    /// Installs and launches a module, answering once its desired state is
    /// on disk. The launch waits for neither hashing nor the disk: the
    /// artifact is copied into a sealed memfd on a blocking thread while the
    /// instance takes its worker and is wired (the launch order waits for
    /// the copy), then the persister hashes the copy, stores it and writes
    /// the state that refers to it (milliseconds of SHA-256 and fsync). An
    /// install that was never acknowledged may be missing after a crash; an
    /// acknowledged one never is.
    fn install(&mut self, req: Install, reply: Reply, progress: Option<Progress>) {
        match self.install_and_launch(req) {
            Ok((summary, artifact, image_tx)) => {
                let name = summary.name.clone();
                let generation = self.modules[&name].generation;
                if let Some(tx) = progress {
                    self.watches.push(InstallWatch {
                        name: name.clone(),
                        generation,
                        last: None,
                        tx,
                    });
                }
                let placeholder = self.modules[&name].record.artifact_sha256.clone();
                let pending = self.pending_tx.clone();
                let mut known: Vec<ArtifactImage> = Vec::new();
                for i in self.modules.values().filter_map(|m| m.artifact.as_ref()) {
                    if !known.iter().any(|k| k.same(i)) {
                        known.push(i.clone());
                    }
                }
                tokio::spawn(async move {
                    let src = artifact.clone();
                    let made =
                        tokio::task::spawn_blocking(move || ArtifactImage::snapshot(&src, &known))
                            .await
                            .unwrap_or_else(|e| {
                                Err(StoreError::Io {
                                    op: "copy",
                                    path: artifact,
                                    source: std::io::Error::other(e.to_string()),
                                })
                            });
                    image_tx.send_replace(Some(
                        made.as_ref()
                            .map(|i| i.fd.clone())
                            .map_err(|e| format!("artifact copy: {}", error_chain(e))),
                    ));
                    let _ = pending.send(Pending::Copied {
                        install: InstallSaved {
                            name,
                            generation,
                            placeholder,
                            result: Ok(None),
                            summary,
                            reply,
                        },
                        image: made,
                    });
                });
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// Tells callers following an install each state change of the module,
    /// until the start settles: running, failed, crash-looping, its first
    /// back-off (the restart's outcome is another start), stopped or gone.
    /// Dropping a watch's sender tells the connection the progress is over.
    fn report_progress(&mut self) {
        if self.watches.is_empty() {
            return;
        }
        let modules = &self.modules;
        self.watches.retain_mut(|w| {
            let Some(m) = modules
                .get(&w.name)
                .filter(|m| m.generation == w.generation)
            else {
                return false;
            };
            let state = m.state();
            if w.last != Some(state) {
                w.last = Some(state);
                if w.tx
                    .send(serde_json::json!({ "module": summary(m) }))
                    .is_err()
                {
                    return false;
                }
            }
            !matches!(
                state,
                State::Running | State::Failed | State::BackOff | State::CrashLoop | State::Stopped
            )
        });
    }

    /// An install's artifact copy is made: hand it to the persister with the
    /// state as it is now (so every acknowledged install is in it), or undo
    /// the install if the copy failed.
    fn install_copied(
        &mut self,
        mut install: InstallSaved,
        image: Result<ArtifactImage, StoreError>,
    ) {
        let image = match image {
            Ok(i) => i,
            Err(e) => {
                install.result = Err(e);
                return self.install_saved(install);
            }
        };
        if let Some(m) = self
            .modules
            .get_mut(&install.name)
            .filter(|m| m.generation == install.generation)
        {
            m.artifact = Some(image.clone());
        }
        // Durability waits for the start (see `persist_started`).
        self.starting.push(StartingInstall {
            install,
            image,
            until: Instant::now() + PERSIST_AFTER_AT_MOST,
        });
    }

    /// Hands installs whose modules have left `starting` (or waited
    /// [`PERSIST_AFTER_AT_MOST`]) to the persister. Hashing, writing and
    /// fsync (and the journal commit behind it) take a core for
    /// milliseconds; on a small machine, doing that while the worker starts
    /// slowed the launch (warm p50 3.0 -> 2.6 ms and p99 5-6 -> 4 ms here
    /// with it deferred). The install's reply still waits for the disk.
    fn persist_started(&mut self) {
        if self.starting.is_empty() {
            return;
        }
        let now = Instant::now();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.starting)
            .into_iter()
            .partition(|s| {
                now >= s.until
                    || self
                        .modules
                        .get(&s.install.name)
                        .filter(|m| m.generation == s.install.generation)
                        .is_none_or(|m| m.state() != State::Starting)
            });
        self.starting = waiting;
        for s in ready {
            self.persist_install(s.install, s.image);
        }
    }

    fn persist_install(&mut self, mut install: InstallSaved, image: ArtifactImage) {
        let done = self.persister.save(
            self.desired.clone(),
            Some(NewArtifact {
                placeholder: install.placeholder.clone(),
                image,
            }),
        );
        let pending = self.pending_tx.clone();
        tokio::spawn(async move {
            install.result = done.await.unwrap_or(Err(StoreError::WriterGone));
            let _ = pending.send(Pending::Saved(install));
        });
    }

    /// The persister is done with an install: record the artifact's hash and
    /// answer, or undo the install (stop, remove, write the state without
    /// it) and say why.
    fn install_saved(&mut self, s: InstallSaved) {
        let source = match s.result {
            Ok(hash) => {
                if let Some(hash) = hash {
                    let records = self.desired.modules.get_mut(&s.name).into_iter().chain(
                        self.modules
                            .get_mut(&s.name)
                            .filter(|m| m.generation == s.generation)
                            .map(|m| &mut m.record),
                    );
                    for r in records.filter(|r| r.artifact_sha256 == s.placeholder) {
                        r.artifact_sha256 = hash.clone();
                    }
                }
                // The module as it is now (it may be running already).
                let now = self
                    .modules
                    .get(&s.name)
                    .filter(|m| m.generation == s.generation)
                    .map_or(s.summary, summary);
                let m = serde_json::json!({ "module": now });
                let _ = s.reply.send(Ok(Response::Value(m)));
                return;
            }
            Err(source) => source,
        };
        let e: ErrorReply = InstallError::Store {
            name: s.name.clone(),
            source,
        }
        .into();
        let _ = s.reply.send(Err(e));
        if let Some(m) = self
            .modules
            .get_mut(&s.name)
            .filter(|m| m.generation == s.generation)
        {
            // Never acknowledged: it goes even if the state cannot be
            // written (the state without it is what is on disk).
            m.rolling_back = true;
            let (ignored, _) = oneshot::channel();
            self.uninstall(s.name, ignored);
        }
    }

    fn install_and_launch(
        &mut self,
        req: Install,
    ) -> Result<(ModuleSummary, PathBuf, ImageTx), InstallError> {
        if !req.path.is_absolute() {
            return Err(InstallError::Relative { path: req.path });
        }
        let manifest_path = manifest::locate(&req.path);
        let text =
            std::fs::read_to_string(&manifest_path).map_err(|source| InstallError::Unreadable {
                path: manifest_path.clone(),
                source,
            })?;
        let summary = manifest::parse(&text).map_err(|source| InstallError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
        if let Some(m) = self.modules.get(&summary.name) {
            return Err(InstallError::AlreadyInstalled {
                name: summary.name,
                version: m.record.version.clone(),
            });
        }
        let dir = manifest_path.parent().unwrap_or(std::path::Path::new("/"));
        let artifact = dir.join(&summary.entry);
        check_artifact(&manifest_path, &artifact)?;
        let bound = listeners::bind_all(&summary.listeners).map_err(|source| match source {
            ListenError::PortInUse { port, .. } => InstallError::PortInUse { port, source },
            source => InstallError::Listener { source },
        })?;
        self.next_placeholder += 1;
        let placeholder = store::placeholder(self.next_placeholder);
        let record = ModuleRecord {
            name: summary.name.clone(),
            version: summary.version.clone(),
            artifact_sha256: placeholder,
            manifest: text,
            source: manifest_path,
        };
        self.desired
            .modules
            .insert(record.name.clone(), record.clone());
        tracing::info!(module = %record.name, version = %record.version, "installed");
        let name = record.name.clone();
        let (image_tx, image_rx) = watch::channel(None);
        self.add_and_start(record, (image_rx, artifact.clone()), Ok(bound));
        Ok((self::summary(&self.modules[&name]), artifact, image_tx))
    }

    fn stop_module(&mut self, name: &str) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let now = Instant::now();
        for r in 0..m.replicas.len() {
            drive(&self.store, &self.os, m, r, |l, os| l.stop(now, os));
        }
    }

    fn uninstall(&mut self, name: String, reply: Reply) {
        let Some(m) = self.modules.get_mut(&name) else {
            let _ = reply.send(Err(UninstallError::NotFound(name).into()));
            return;
        };
        m.uninstall.push(reply);
        self.stop_module(&name);
    }

    /// Removes modules whose uninstall has finished stopping them.
    ///
    /// The state without the module is written on the persister; the
    /// module stays listed (stopped) until that write is done, so its name
    /// cannot be installed again meanwhile and a failed write can put it
    /// back.
    fn settle_uninstalls(&mut self) {
        let done: Vec<String> = self
            .modules
            .iter()
            .filter(|(_, m)| !m.uninstall.is_empty() && m.all_stopped() && !m.removing)
            .map(|(n, _)| n.clone())
            .collect();
        for name in done {
            let Some(m) = self.modules.get_mut(&name) else {
                continue;
            };
            m.removing = true;
            let generation = m.generation;
            let record = self.desired.modules.remove(&name);
            let done = self.persister.save_and_collect(self.desired.clone());
            let pending = self.pending_tx.clone();
            tokio::spawn(async move {
                let result = done.await.unwrap_or(Err(StoreError::WriterGone));
                let _ = pending.send(Pending::Removed {
                    name,
                    generation,
                    record,
                    result: result.map(drop),
                });
            });
        }
    }

    /// An uninstall's state write is done: finish removing the module, or
    /// put it back and say why.
    fn uninstall_saved(
        &mut self,
        name: String,
        generation: u64,
        record: Option<ModuleRecord>,
        result: Result<(), StoreError>,
    ) {
        if !self
            .modules
            .get(&name)
            .is_some_and(|m| m.generation == generation && m.removing)
        {
            return;
        }
        let rolling_back = self.modules.get(&name).is_some_and(|m| m.rolling_back);
        if let Err(source) = result {
            if rolling_back {
                tracing::warn!(
                    module = %name,
                    error = %error_chain(&source),
                    "state not written; the undone install is removed anyway"
                );
            } else {
                if let Some(r) = record {
                    self.desired.modules.insert(name.clone(), r);
                }
                let e: ErrorReply = UninstallError::Store {
                    name: name.clone(),
                    source,
                }
                .into();
                if let Some(m) = self.modules.get_mut(&name) {
                    m.removing = false;
                    for w in m.uninstall.drain(..) {
                        let _ = w.send(Err(e.clone()));
                    }
                }
                return;
            }
        }
        let Some(mut m) = self.modules.remove(&name) else {
            return;
        };
        // Listeners close when the last launch task lets go.
        m.listeners.clear();
        for p in m.unix_paths.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(self.store.log_path(&name));
        tracing::info!(module = %name, "uninstalled");
        let reply = to_value(UninstallReply {
            killed: m.replicas.iter().any(Lifecycle::killed_at_stop),
        });
        for w in m.uninstall.drain(..) {
            let _ = w.send(Ok(Response::Value(reply.clone())));
        }
    }

    fn instance_event(&mut self, ev: InstanceEvent) {
        let InstanceEvent {
            module,
            generation,
            replica,
            pid,
            event,
            pidfd,
        } = ev;
        if let (Some(pid), Some(fd)) = (pid, pidfd) {
            self.os.pidfds.insert(pid, fd);
        }
        // A worker that exited, or one registered whose launch order then
        // failed (it is discarded), is forgotten.
        let exited = matches!(event, Event::Exited { .. } | Event::LaunchFailed { .. });
        let ready = matches!(event, Event::Ready { .. });
        match self.modules.get_mut(&module) {
            Some(m) if m.generation == generation && (replica as usize) < m.replicas.len() => {
                drive(&self.store, &self.os, m, replica as usize, |l, os| {
                    l.on_event(event, Instant::now(), os)
                });
            }
            _ => {
                if let (Event::Launched { .. }, Some(pid)) = (&event, pid) {
                    // A worker for a module uninstalled (or reinstalled)
                    // meanwhile.
                    if let Some(fd) = self.os.pidfds.get(&pid) {
                        let _ = pidfd_signal(fd.as_fd(), libc::SIGKILL);
                    }
                }
            }
        }
        if exited {
            if let Some(pid) = pid {
                self.os.pidfds.remove(&pid);
                self.unregister(pid);
            }
        }
        if ready {
            self.release_waiting();
        }
    }

    /// Wires a worker about to be launched: for each service it imports,
    /// a channel to one running exporter instance (server end attached to
    /// the exporter); for each service it exports, a channel to every
    /// running importer instance (client end attached to the importer, a
    /// replacement if that importer had one). One `channel_pair` per
    /// (importer instance, exporter instance, service); the ends go to
    /// those two workers only and no copy stays here.
    fn register(&mut self, r: Registration) {
        let Registration {
            module,
            generation,
            replica,
            pid,
            commands,
            reply,
        } = r;
        let Some(m) = self
            .modules
            .get(&module)
            .filter(|m| m.generation == generation)
        else {
            // Stale: its Launched event will have the worker killed.
            let _ = reply.send(Vec::new());
            return;
        };
        let (imports, exports) = (m.imports.clone(), m.exports.clone());
        let mut grants = Vec::new();
        for service in &imports {
            let exporter = self.live.iter().find(|(_, l)| {
                self.modules
                    .get(&l.module)
                    .is_some_and(|e| e.generation == l.generation && e.exports.contains(service))
            });
            let Some((&epid, e)) = exporter else {
                tracing::info!(module, replica, service, "import waits for its exporter");
                continue;
            };
            match wire(service, &e.commands, GrantKind::Export) {
                Ok(client) => {
                    grants.push(client);
                    self.wired
                        .insert((module.clone(), replica, service.clone()), epid);
                }
                Err(reason) => tracing::warn!(module, service, %reason, "cannot wire import"),
            }
        }
        for service in &exports {
            let importers: Vec<(String, u32, CommandTx)> = self
                .live
                .values()
                .filter(|l| {
                    self.modules.get(&l.module).is_some_and(|i| {
                        i.generation == l.generation && i.imports.contains(service)
                    })
                })
                .map(|l| (l.module.clone(), l.replica, l.commands.clone()))
                .collect();
            for (importer, ireplica, tx) in importers {
                match wire(service, &tx, GrantKind::Import) {
                    Ok(server) => {
                        grants.push(server);
                        tracing::info!(importer, replica = ireplica, service, exporter = %module, "import wired");
                        self.wired
                            .insert((importer, ireplica, service.clone()), pid);
                    }
                    Err(reason) => {
                        tracing::warn!(importer, service, %reason, "cannot wire import")
                    }
                }
            }
        }
        self.os.commands.insert(pid, commands.clone());
        self.live.insert(
            pid,
            Live {
                module,
                generation,
                replica,
                commands,
            },
        );
        let _ = reply.send(grants);
    }

    /// Forgets an exited worker: its commands, the imports it had wired and
    /// the imports wired to it (they wait until the exporter is back).
    fn unregister(&mut self, pid: i32) {
        self.os.commands.remove(&pid);
        if let Some(l) = self.live.remove(&pid) {
            self.wired
                .retain(|(m, r, _), _| !(*m == l.module && *r == l.replica));
        }
        self.wired.retain(|_, exporter| *exporter != pid);
    }

    fn tick(&mut self) {
        let now = Instant::now();
        for m in self.modules.values_mut() {
            for r in 0..m.replicas.len() {
                if m.replicas[r].deadline().is_some_and(|d| d <= now) {
                    drive(&self.store, &self.os, m, r, |l, os| l.on_tick(now, os));
                }
            }
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
        }
    }

    fn begin_shutdown(&mut self, tx: oneshot::Sender<()>) {
        let names: Vec<String> = self.modules.keys().cloned().collect();
        for n in &names {
            self.stop_module(n);
        }
        // Stop deadlines SIGKILL stragglers; give them a moment to exit.
        let longest = self
            .modules
            .values()
            .filter_map(|m| manifest::parse(&m.record.manifest).ok())
            .filter_map(|s| s.stop_deadline)
            .max()
            .unwrap_or_default()
            .max(self.policy.stop_timeout);
        let limit = Instant::now() + longest + std::time::Duration::from_secs(1);
        self.shutdown = Some((tx, limit));
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
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d.into()).await;
    }
}

fn log_transition(l: &Lifecycle, before: State) {
    let after = l.state();
    match after {
        State::Failed | State::CrashLoop | State::BackOff => tracing::warn!(
            module = l.name(),
            from = before.as_str(),
            to = after.as_str(),
            reason = l.reason().unwrap_or(""),
            "module state"
        ),
        _ => tracing::info!(
            module = l.name(),
            from = before.as_str(),
            to = after.as_str(),
            pid = l.pid(),
            "module state"
        ),
    }
}

/// Makes one channel for `service`: the end of kind `peer_kind` is attached
/// to the running worker behind `peer`, the other end is returned as a
/// grant for the worker being launched.
fn wire(service: &str, peer: &CommandTx, peer_kind: GrantKind) -> Result<ServiceGrant, String> {
    let (client, server) =
        shm_ipc::channel::channel_pair(&shm_ipc::channel::ChannelConfig::default())
            .map_err(|e| error_chain(&e))?;
    let (client, server) = (client.into_fds(), server.into_fds());
    let (theirs, mine, my_kind) = match peer_kind {
        GrantKind::Export => (server, client, GrantKind::Import),
        _ => (client, server, GrantKind::Export),
    };
    peer.send(Command {
        msg: ToWorker::Attach(vec![Grant {
            kind: peer_kind,
            name: service.to_owned(),
        }]),
        fds: vec![theirs.0, theirs.1],
    })
    .map_err(|_| "the peer worker is gone".to_owned())?;
    Ok(ServiceGrant {
        grant: Grant {
            kind: my_kind,
            name: service.to_owned(),
        },
        fds: vec![mine.0, mine.1],
    })
}

fn waiting_for(service: &str) -> String {
    format!("waiting for service {service}: no running module exports it")
}

fn to_value<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).expect("replies always serialize")
}

fn summary(m: &Module) -> ModuleSummary {
    ModuleSummary {
        name: m.record.name.clone(),
        version: m.record.version.clone(),
        state: m.state(),
        pid: m.replicas.iter().find_map(Lifecycle::pid),
        pids: m.replicas.iter().filter_map(Lifecycle::pid).collect(),
        replicas: m.replicas.len() as u32,
        restarts: m.replicas.iter().map(Lifecycle::restarts).sum(),
    }
}

fn replica_status(
    m: &Module,
    r: usize,
    l: &Lifecycle,
    limiter: &Limiter,
    memory: &crate::metrics::MemoryCache,
) -> ReplicaStatus {
    let pid = l.pid();
    let cgroups = pid.map_or_else(Vec::new, |p| {
        limiter
            .instance_dirs(&m.record.name, r as u32, p)
            .into_iter()
            .filter(|d| d.is_dir())
            .map(|d| d.display().to_string())
            .collect()
    });
    ReplicaStatus {
        replica: r as u32,
        state: l.state(),
        reason: l.reason().map(str::to_owned),
        pid,
        restarts: l.restarts(),
        last_error: l.last_error().map(str::to_owned),
        state_seconds: l.since().elapsed().as_secs_f64(),
        // smaps_rollup walks the process's page tables under its mmap lock,
        // which would stall a module that is still loading (dlopen, thread
        // stacks) for milliseconds: only running replicas are measured.
        memory: pid
            .filter(|_| l.state() == State::Running)
            .and_then(|p| memory.memory(p)),
        cpu_seconds: pid.and_then(|p| crate::metrics::cpu_seconds(p).ok()),
        cgroups,
    }
}

fn imports_status(
    m: &Module,
    modules: &BTreeMap<String, Module>,
    live: &HashMap<i32, Live>,
    wired: &HashMap<(String, u32, String), i32>,
) -> Vec<ImportStatus> {
    let running: Vec<u32> = live
        .values()
        .filter(|l| l.module == m.record.name && l.generation == m.generation)
        .map(|l| l.replica)
        .collect();
    // A channel counts once its exporter instance runs: `pid` is the
    // current worker of a running replica. A worker is wired as soon as it
    // registers, before it is ready (it may never be), and an entry can
    // outlive its worker if the launch fails after registering.
    let exporter_runs = |pid: i32| {
        live.get(&pid).is_some_and(|l| {
            modules
                .get(&l.module)
                .filter(|e| e.generation == l.generation)
                .and_then(|e| e.replicas.get(l.replica as usize))
                .is_some_and(|r| r.pid() == Some(pid) && r.state() == State::Running)
        })
    };
    m.imports
        .iter()
        .map(|service| {
            let exporter = modules
                .values()
                .find(|e| e.exports.contains(service))
                .map(|e| e.record.name.clone());
            let all_wired = !running.is_empty()
                && running.iter().all(|r| {
                    wired
                        .get(&(m.record.name.clone(), *r, service.clone()))
                        .is_some_and(|&pid| exporter_runs(pid))
                });
            ImportStatus {
                name: service.clone(),
                state: if all_wired { "wired" } else { "waiting" }.into(),
                exporter,
            }
        })
        .collect()
}

fn status(
    m: &Module,
    imports: Vec<ImportStatus>,
    limiter: &Limiter,
    memory: &crate::metrics::MemoryCache,
) -> ModuleStatus {
    let replicas: Vec<ReplicaStatus> = m
        .replicas
        .iter()
        .enumerate()
        .map(|(r, l)| replica_status(m, r, l, limiter, memory))
        .collect();
    let many = replicas.len() > 1;
    // Module-level fields: the first replica that has one (prefixed with its
    // number when there are several), sums for counters.
    let first = |f: fn(&ReplicaStatus) -> Option<&String>| {
        replicas.iter().find_map(|r| {
            f(r).map(|s| {
                if many {
                    format!("replica {}: {s}", r.replica)
                } else {
                    s.clone()
                }
            })
        })
    };
    let memory = replicas
        .iter()
        .filter_map(|r| r.memory)
        .reduce(|a, b| Memory {
            rss: a.rss + b.rss,
            pss: a.pss + b.pss,
            uss: a.uss + b.uss,
        });
    let cpu: Vec<f64> = replicas.iter().filter_map(|r| r.cpu_seconds).collect();
    ModuleStatus {
        name: m.record.name.clone(),
        version: m.record.version.clone(),
        state: m.state(),
        reason: first(|r| r.reason.as_ref()),
        pid: replicas.iter().find_map(|r| r.pid),
        restarts: replicas.iter().map(|r| r.restarts).sum(),
        last_error: first(|r| r.last_error.as_ref()),
        artifact_sha256: m.record.artifact_sha256.clone(),
        listeners: m
            .listener_addrs
            .iter()
            .map(|(name, address)| ListenerStatus {
                name: name.clone(),
                address: address.clone(),
            })
            .collect(),
        state_seconds: replicas
            .iter()
            .map(|r| r.state_seconds)
            .fold(f64::INFINITY, f64::min)
            .min(f64::MAX),
        memory,
        cpu_seconds: (!cpu.is_empty()).then(|| cpu.iter().sum()),
        imports,
        limits: LimitsStatus::new(m.limits, m.limit_sources, limiter.detection()),
        replicas,
    }
}
