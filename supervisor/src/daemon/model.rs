//! The module/revision model the actor owns: a module is one or more
//! **runs** (the replicas of one revision, with what launching them needs),
//! the active one and, during a release, the rollout's target; and the
//! rollout in progress.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::oneshot;

use super::actor::{Progress, Reply};
use super::os::{ImageRx, LaunchPlan, RealOs};
use super::release::{Counts, Params, Phase};
use crate::cgroup::{Limiter, Limits};
use crate::config::LimitSources;
use crate::lifecycle::{Lifecycle, State};
use crate::manifest::ServiceRef;
use crate::store::{ArtifactImage, ModuleRecord, Store};
use crate::worker::{LaunchOrder, SandboxOrder};

/// The replicas of one revision of a module.
pub(super) struct Run {
    /// The revision's record (name, version, artifact, manifest, source).
    pub record: ModuleRecord,
    /// Its revision number.
    pub revision: u64,
    /// What workers load, or why there is nothing to load; `None` while an
    /// install's copy is still being made.
    pub image: ImageRx,
    /// The file the image is of, for messages.
    pub image_path: PathBuf,
    /// The image itself once made (installs compare against it, so
    /// identical artifacts share one image).
    pub artifact: Option<ArtifactImage>,
    /// One lifecycle per replica; index = replica number.
    pub replicas: Vec<Lifecycle>,
    /// Which replicas should run (the others stop); see
    /// [`Run::set_target`].
    pub wanted: Vec<bool>,
    /// Names this run in instance events: unique per daemon.
    pub generation: u64,
    /// Bound listeners shared by every replica (and by the other run of a
    /// release, when the address is the same): name and socket.
    pub listeners: Vec<(String, Arc<OwnedFd>)>,
    /// Listener names and bound addresses, for status.
    pub listener_addrs: Vec<(String, String)>,
    /// Unix listener paths this run bound, with the device and inode of
    /// the socket there (unlinked when the module goes, if still that
    /// socket).
    pub unix_paths: Vec<(PathBuf, (u64, u64))>,
    /// Services it exports and imports (manifest).
    pub exports: Vec<ServiceRef>,
    pub imports: Vec<ServiceRef>,
    /// The imports it is not launched without (not `optional`).
    pub required: Vec<ServiceRef>,
    pub stop_deadline: Duration,
    pub start_deadline: Duration,
    /// Its effective limits: the manifest's, else the configuration's
    /// defaults.
    pub limits: Limits,
    /// Where each limit comes from.
    pub limit_sources: LimitSources,
    /// The manifest text sent to its workers (the record's, with a default
    /// memory limit filled in).
    pub launch_manifest: String,
    /// Why it cannot be launched (listener, artifact or sandbox failure).
    pub failure: Option<String>,
    /// The sandbox its workers apply (`None`: off by configuration).
    pub sandbox: Option<SandboxOrder>,
    /// Its replicas start at background priority until ready: a release's
    /// new revision while the old one serves.
    pub background: bool,
    /// A container's instance: where its output goes and the network
    /// namespace it joins (see `containers.rs`).
    pub container: Option<Arc<super::os::ContainerIo>>,
}

impl Run {
    /// The replicas' common state, else the most pressing one.
    pub fn state(&self) -> State {
        State::aggregate(self.replicas.iter().map(Lifecycle::state))
    }

    pub fn all_stopped(&self) -> bool {
        self.replicas.iter().all(|l| l.state() == State::Stopped)
    }

    /// How many replicas should run.
    pub fn target(&self) -> u32 {
        self.wanted.iter().filter(|w| **w).count() as u32
    }

    /// Whether replica `r` should run.
    pub fn is_wanted(&self, r: usize) -> bool {
        self.wanted.get(r).copied().unwrap_or(false)
    }

    /// Wants `n` replicas running. Going down, replicas that are not ready
    /// stop first (a crash-looping or never-ready replica costs nothing to
    /// stop), then the highest numbers; going up, the lowest numbers start.
    pub fn set_target(&mut self, n: u32) {
        let mut on = self.target();
        while on > n {
            let victim = (0..self.replicas.len())
                .rev()
                .filter(|&r| self.wanted[r])
                .min_by_key(|&r| self.replicas[r].state() == State::Running)
                .expect("a wanted replica");
            self.wanted[victim] = false;
            on -= 1;
        }
        for r in 0..self.replicas.len() {
            if on >= n {
                break;
            }
            if !self.wanted[r] {
                self.wanted[r] = true;
                on += 1;
            }
        }
    }

    /// Replicas that are not stopped.
    pub fn alive(&self) -> u32 {
        self.replicas
            .iter()
            .filter(|l| !matches!(l.state(), State::Stopped | State::Failed))
            .count() as u32
    }

    /// Replicas ready.
    pub fn ready(&self) -> u32 {
        self.replicas
            .iter()
            .filter(|l| l.state() == State::Running)
            .count() as u32
    }

    /// Why a replica of this run failed (crashed, missed its start
    /// deadline, cannot start, or waits for a service), if one did.
    pub fn failure(&self) -> Option<String> {
        self.replicas.iter().enumerate().find_map(|(i, l)| {
            let failed = matches!(
                l.state(),
                State::BackOff | State::CrashLoop | State::Failed | State::Waiting
            ) || l.restarts() > 0;
            failed.then(|| {
                let why = l
                    .reason()
                    .or(l.last_error())
                    .unwrap_or("the worker exited")
                    .to_owned();
                format!("replica {i}: {why}")
            })
        })
    }

    pub fn plan(&self, store: &Store, replica: u32, limiter: &Arc<Limiter>) -> LaunchPlan {
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
                sandbox: self.sandbox.clone(),
            },
            log: store.log_path(&self.record.name),
            listeners: self.listeners.clone(),
            generation: self.generation,
            stop_deadline: self.stop_deadline,
            limits: self.limits,
            limiter: limiter.clone(),
            background: self.background,
            start_deadline: self.start_deadline,
            container: self.container.clone(),
        }
    }
}

/// Why a rollout was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `Deploy` of a new revision.
    Deploy,
    /// `Rollback` to a revision from the history.
    Rollback,
    /// The new revision crashed after taking over: back to the committed
    /// one (nothing to commit at the end).
    AutoRollback,
}

/// A caller following a rollout (`Deploy`/`Rollback` with `more`).
pub(super) struct Watch {
    pub tx: Progress,
    pub last: Option<Value>,
}

/// A rollout in progress.
pub(super) struct Rollout {
    pub kind: Kind,
    /// The run being replaced and the one replacing it.
    pub from_gen: u64,
    pub to_gen: u64,
    pub from_revision: u64,
    pub to_revision: u64,
    pub version: String,
    pub params: Params,
    pub phase: Phase,
    /// Held by `Rollout(pause)`, or at the canary until resumed.
    pub paused: bool,
    pub started: Instant,
    /// When the new revision took over (only it runs, all ready).
    pub took_over: Option<Instant>,
    /// Callers following it, and callers waiting for its outcome.
    pub watches: Vec<Watch>,
    pub finals: Vec<Reply>,
    /// Callers without `more`: answered `started` once the rollout is on
    /// disk (or with its outcome if it ends first).
    pub started_replies: Vec<Reply>,
    /// Why it is rolling back (for `AutoRollback`: why the revision it
    /// replaces failed).
    pub reason: Option<String>,
    /// The desired state naming this rollout is on disk (its artifact is
    /// stored); a commit waits for it.
    pub recorded: bool,
    /// A commit write is under way.
    pub committing: bool,
    /// For `AutoRollback`: what its callers are told at the end
    /// (`rolled-back`, or `aborted` for an abort while draining).
    pub final_outcome: &'static str,
}

/// One installed module.
pub(super) struct Module {
    /// Runs by generation: the active one, a rollout's target, and old runs
    /// still stopping.
    pub runs: Vec<Run>,
    /// The generation of the run that is the module (until a rollout takes
    /// over, the committed revision's).
    pub active: u64,
    pub rollout: Option<Rollout>,
    /// A `Deploy` is preparing its artifact (copy and hash).
    pub preparing: bool,
    /// Uninstall callers.
    pub uninstall: Vec<Reply>,
    /// Stopped for an uninstall whose state write is under way.
    pub removing: bool,
    /// An install being undone: removed even if its state write fails.
    pub rolling_back: bool,
    /// What finished runs and exited workers added to each (revision,
    /// replica)'s counters, so `/metrics` counters never go back while the
    /// module is installed.
    pub counted: super::scrape::Counted,
}

impl Module {
    pub fn new(run: Run) -> Self {
        Self {
            active: run.generation,
            runs: vec![run],
            rollout: None,
            preparing: false,
            uninstall: Vec::new(),
            removing: false,
            rolling_back: false,
            counted: Default::default(),
        }
    }

    /// The active run.
    pub fn active(&self) -> &Run {
        self.run(self.active)
            .or(self.runs.first())
            .expect("a module has a run")
    }

    pub fn run(&self, generation: u64) -> Option<&Run> {
        self.runs.iter().find(|r| r.generation == generation)
    }

    pub fn run_mut(&mut self, generation: u64) -> Option<&mut Run> {
        self.runs.iter_mut().find(|r| r.generation == generation)
    }

    /// The run that serves: a rollout's target once it took over, else the
    /// active one.
    pub fn serving(&self) -> &Run {
        self.rollout
            .as_ref()
            .filter(|r| r.took_over.is_some())
            .and_then(|r| self.run(r.to_gen))
            .unwrap_or_else(|| self.active())
    }

    pub fn state(&self) -> State {
        self.serving().state()
    }

    pub fn all_stopped(&self) -> bool {
        self.runs.iter().all(Run::all_stopped)
    }

    /// The counts the planner needs.
    pub fn counts(&self) -> Option<Counts> {
        let r = self.rollout.as_ref()?;
        let old = self.run(r.from_gen)?;
        let new = self.run(r.to_gen)?;
        Some(Counts {
            old_alive: old.alive(),
            old_ready: old.ready(),
            old_target: old.target(),
            new_target: new.target(),
            new_ready: new.ready(),
            new_failure: new.failure().is_some(),
        })
    }
}

/// Runs `f` on one replica's lifecycle with a [`RealOs`] able to launch it,
/// logging any state change.
pub(super) fn drive(
    store: &Store,
    parts: &super::actor::OsHandles,
    run: &mut Run,
    replica: usize,
    f: impl FnOnce(&mut Lifecycle, &mut RealOs<'_>),
) {
    let plan = run.plan(store, replica as u32, &parts.limiter);
    let mut os = RealOs {
        pool: &parts.pool,
        events: &parts.events,
        pidfds: &parts.pidfds,
        commands: &parts.commands,
        plan: Some(plan),
    };
    let Some(l) = run.replicas.get_mut(replica) else {
        return;
    };
    let before = l.state();
    f(l, &mut os);
    if l.state() != before {
        log_transition(l, before);
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

/// A reply that never reaches anyone (for internal uninstalls).
pub(super) fn nobody() -> Reply {
    oneshot::channel().0
}
