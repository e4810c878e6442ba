//! The install, release and uninstall pipelines of the actor: each request
//! is checked and started on the actor's thread, its slow parts (artifact
//! copies and hashes, state writes) run elsewhere and come back as
//! [`Pending`] work, and a rollout is driven step by step by [`Actor::advance`]
//! after every event of its module.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::actor::{drop_run, finished_runs, to_value, unix_now, Actor, Progress, Reply, Response};
use super::model::{nobody, Kind, Module, Rollout, Run, Watch};
use super::os::{ImageRx, ImageTx};
use super::release::{self, Overrides, Params, Phase, Step};
use super::render;
use crate::config::{manifest_with_memory, InstallConfig, LimitSource};
use crate::control::deploy::{
    revision_not_found, rollout_in_progress, Deploy, DeployReply, Rollback,
};
use crate::control::install::{check_artifact, InstallError};
use crate::control::list::ModuleSummary;
use crate::control::rollout::{no_rollout, Action};
use crate::control::uninstall::{UninstallError, UninstallReply};
use crate::control::{invalid_input, module_not_found};
use crate::error_chain;
use crate::fscred::{with_rights, Credentials};
use crate::lifecycle::{Lifecycle, State};
use crate::listeners::{self, ListenError};
use crate::manifest::{self, ManifestSummary};
use crate::store::{
    self as store, ArtifactImage, ModuleRecord, NewArtifact, Outcome, RevisionRecord, Saved,
    StoreError,
};
use crate::varlink::ErrorReply;

/// How many revisions a module keeps besides its active one and a rollout's
/// target (their artifacts stay stored; older ones are collected).
pub const HISTORY: usize = 10;

/// How long an install's state write waits for its module to start.
const PERSIST_AFTER_AT_MOST: std::time::Duration = std::time::Duration::from_millis(50);

/// An install whose caller follows its progress.
pub(crate) struct InstallWatch {
    name: String,
    generation: u64,
    last: Option<State>,
    tx: Progress,
}

/// An install whose state write waits for its module to leave `starting`.
pub(crate) struct StartingInstall {
    install: InstallSaved,
    image: ArtifactImage,
    pub until: Instant,
}

/// Work on its way back to the actor.
pub(crate) enum Pending {
    /// An install's or a deploy's files are read (or refused).
    Read {
        input: Result<Input, InstallError>,
        then: Then,
    },
    /// An install's artifact copy is made (or failed).
    Copied {
        install: InstallSaved,
        image: Result<ArtifactImage, StoreError>,
    },
    /// The persister has finished with an install.
    Saved(InstallSaved),
    /// A restored module's stored artifact is copied and verified.
    Verified {
        name: String,
        generation: u64,
        image: ArtifactImage,
    },
    /// An uninstall's state write is done (or failed).
    Removed {
        name: String,
        generation: u64,
        record: Option<ModuleRecord>,
        result: Result<(), StoreError>,
    },
    /// A deploy's artifact is copied and hashed (or failed).
    Prepared(Box<Prepared>),
    /// The state naming a rollout (and its stored artifact) is on disk.
    Recorded {
        name: String,
        to_gen: u64,
        result: Saved,
    },
    /// A rollback's stored artifact is copied and verified (or refused).
    Loaded(Box<Loaded>),
    /// A rollout's commit is on disk.
    Committed {
        name: String,
        to_gen: u64,
        result: Saved,
    },
    /// A `RunContainer`'s files are read and its output and network
    /// namespace opened (or refused).
    Container(Box<super::containers::ContainerRead>),
}

/// An install the persister has finished with.
pub(crate) struct InstallSaved {
    name: String,
    generation: u64,
    placeholder: String,
    result: Saved,
    summary: ModuleSummary,
    reply: Reply,
    /// Called as `Deploy`: answer in its shape.
    deploy: bool,
}

/// A deploy whose artifact was copied and hashed off the actor.
pub(crate) struct Prepared {
    name: String,
    /// The module's active run when the deploy began: a module uninstalled
    /// and installed again meanwhile is another module.
    active: u64,
    text: String,
    manifest_path: PathBuf,
    artifact: PathBuf,
    overrides: Overrides,
    image: Result<(ArtifactImage, String), StoreError>,
    reply: Reply,
    progress: Option<Progress>,
}

/// A rollback whose target's stored artifact was loaded off the actor.
pub(crate) struct Loaded {
    name: String,
    /// The module's active run when the rollback began.
    active: u64,
    target: RevisionRecord,
    image: Result<ArtifactImage, String>,
    reply: Reply,
    progress: Option<Progress>,
}

/// Bound listeners for a run.
pub(super) struct Listeners {
    fds: Vec<(String, Arc<OwnedFd>)>,
    addrs: Vec<(String, String)>,
    unix_paths: Vec<(PathBuf, (u64, u64))>,
}

impl Listeners {
    pub(super) fn bound(bound: Vec<listeners::Bound>) -> Self {
        Self {
            addrs: bound
                .iter()
                .map(|b| (b.name.clone(), b.address.clone()))
                .collect(),
            unix_paths: bound.iter().filter_map(|b| b.unix_path.clone()).collect(),
            fds: bound
                .into_iter()
                .map(|b| (b.name, Arc::new(b.fd)))
                .collect(),
        }
    }
}

pub(super) fn bind_error(source: ListenError) -> InstallError {
    match source {
        ListenError::PortInUse { port, .. } => InstallError::PortInUse { port, source },
        source => InstallError::Listener { source },
    }
}

/// Installs and deploys that may read their files at once: each holds a
/// blocking-pool thread (tokio has 512) while it reads.
pub(super) const MAX_READS: usize = 64;

/// An install's or a deploy's files, read and checked on the blocking pool
/// (see [`read_input`]).
pub(crate) struct Input {
    pub(super) manifest_path: PathBuf,
    pub(super) text: String,
    pub(super) summary: ManifestSummary,
    /// The artifact's path, for messages and the run.
    pub(super) artifact: PathBuf,
    /// The image of the artifact as checked (a regular file, under its
    /// cap, an ELF shared object for this host, its runtime offered): the
    /// copy of that descriptor, not of whatever the path names by then,
    /// started on its own blocking thread as soon as the file was checked,
    /// so that it runs beside the uid lookups and the actor's work instead
    /// of after them (it was ~0.2 ms of a warm launch's critical path).
    pub(super) image: ImageCopy,
    /// Uids for the module should this be its install, free in passwd and
    /// group (see [`crate::sandbox::SandboxConfig::free_candidates`]).
    pub(super) uids: Vec<u32>,
}

/// An artifact copy in progress ([`Input::image`]).
pub(super) type ImageCopy = tokio::task::JoinHandle<Result<ArtifactImage, StoreError>>;

/// The copy of an [`ImageCopy`], or why there is none.
pub(super) async fn image_of(
    copy: ImageCopy,
    artifact: &Path,
) -> Result<ArtifactImage, StoreError> {
    copy.await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            op: "copy",
            path: artifact.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// Tells the launches waiting on `tx` how an artifact's copy came out:
/// its descriptor, or the error after `what` (the step that failed).
pub(super) fn publish_image(tx: &ImageTx, image: &Result<ArtifactImage, StoreError>, what: &str) {
    tx.send_replace(Some(
        image
            .as_ref()
            .map(|i| i.fd.clone())
            .map_err(|e| format!("{what}: {}", error_chain(e))),
    ));
}

/// [`publish_image`], then hands a made image to the run `name` of
/// `generation` through the actor.
pub(super) fn image_for_run(
    tx: &ImageTx,
    pending: &mpsc::UnboundedSender<Pending>,
    name: String,
    generation: u64,
    image: Result<ArtifactImage, StoreError>,
    what: &str,
) {
    publish_image(tx, &image, what);
    if let Ok(image) = image {
        let _ = pending.send(Pending::Verified {
            name,
            generation,
            image,
        });
    }
}

/// What an install's read phase needs from the actor's state when the
/// request came: to offer uids, the sandbox configuration and every
/// module's uid; to copy the artifact, the images in use (an identical one
/// is shared, not copied).
pub(crate) struct UidQuery {
    pub(super) sandbox: crate::sandbox::SandboxConfig,
    pub(super) recorded: Vec<(String, u32)>,
    pub(super) known: Vec<ArtifactImage>,
    /// The name the uid is derived from, when it is not the manifest's
    /// (a container's instance name: unique per container, whatever name
    /// its manifest gives).
    pub(super) uid_key: Option<String>,
}

/// Spare uid candidates beyond the first: installs that raced for the same
/// candidates while their files were read. Each candidate costs an NSS
/// lookup of the uid and the gid (~90 us here with `files systemd`) on the
/// install's path, and two installs in flight need the same first
/// candidate (about 1 in 65536 in the default range) for a spare to be used.
const SPARE_UIDS: usize = 1;

/// What to do with an [`Input`] once read.
pub(crate) enum Then {
    /// `Install`, or a `Deploy` of a module not installed (`deploy`).
    Install {
        reply: Reply,
        progress: Option<Progress>,
        deploy: bool,
    },
    /// `Deploy` of a module that may be installed.
    Deploy {
        overrides: Overrides,
        reply: Reply,
        progress: Option<Progress>,
    },
}

/// Reads, parses and checks the manifest at `path` (a directory or the
/// file) and the artifact it names. Both are opened with the rights of
/// `peer`, the client that named them ([`crate::fscred::with_rights`]): a
/// client never sees anything of a file it could not read itself, not even
/// a field quoted in an error. Blocking (a path may name anything: the
/// files are opened without blocking and only regular files under their
/// caps are read): run on the blocking pool, never on the actor.
pub(super) fn read_input(
    path: &Path,
    entry: Option<&Path>,
    peer: &Credentials,
    caps: &InstallConfig,
    q: &UidQuery,
) -> Result<Input, InstallError> {
    for p in [Some(path), entry].into_iter().flatten() {
        if !p.is_absolute() {
            return Err(InstallError::Relative { path: p.to_owned() });
        }
    }
    let as_peer = |source| InstallError::Rights {
        path: path.to_owned(),
        source,
    };
    let (manifest_path, text) = with_rights(peer, || {
        let manifest_path = manifest::locate(path);
        let text = crate::input::read_text(
            &manifest_path,
            caps.max_manifest_bytes,
            "install.max_manifest_bytes",
        );
        (manifest_path, text)
    })
    .map_err(as_peer)?;
    let text = text.map_err(|source| InstallError::Unreadable {
        path: manifest_path.clone(),
        source,
    })?;
    let summary = manifest::parse(&text).map_err(|source| InstallError::Manifest {
        path: manifest_path.clone(),
        source,
    })?;
    // A `[rollout]` that no deploy could use is refused now, not at the
    // first release.
    Params::resolve(summary.replicas, &summary.rollout, &Overrides::default()).map_err(
        |reason| InstallError::Manifest {
            path: manifest_path.clone(),
            source: manifest::ManifestError::Field {
                field: "rollout".into(),
                reason,
            },
        },
    )?;
    // Unix listener paths: emberd binds (and at uninstall unlinks) them
    // with its own rights; the client must be able to create them itself.
    if crate::fscred::needs_switch(peer.uid) {
        with_rights(peer, || {
            listeners::check_client_may_create(&summary.listeners, peer.uid)
        })
        .map_err(as_peer)?
        .map_err(bind_error)?;
    }
    let dir = manifest_path.parent().unwrap_or(Path::new("/"));
    // The client's pick of the library (`emberctl` looks for a bare
    // `entry` in cargo's target directory: crate::entry), else the
    // manifest's own.
    let artifact = entry.map_or_else(|| dir.join(&summary.entry), Path::to_owned);
    let file = with_rights(peer, || {
        check_artifact(&manifest_path, &artifact, caps.max_artifact_bytes)
    })
    .map_err(as_peer)??;
    let image = {
        let (src, known, cap) = (artifact.clone(), q.known.clone(), caps.max_artifact_bytes);
        tokio::runtime::Handle::current()
            .spawn_blocking(move || ArtifactImage::snapshot_file(file, &src, &known, cap))
    };
    // Here, not on the actor: NSS (LDAP, sssd) may take its time.
    let key = q.uid_key.as_deref().unwrap_or(&summary.name);
    let taken = q
        .recorded
        .iter()
        .filter(|(n, _)| n != key)
        .map(|(_, uid)| *uid)
        .collect();
    let uids = q
        .sandbox
        .free_candidates(key, &taken, crate::sandbox::id_in_use, 1 + SPARE_UIDS);
    Ok(Input {
        manifest_path,
        text,
        summary,
        artifact,
        image,
        uids,
    })
}

fn deploy_reply(
    m: &Module,
    revision: u64,
    changed: bool,
    outcome: &'static str,
    reason: Option<String>,
) -> Response {
    Response::Value(to_value(DeployReply {
        module: render::summary(m),
        revision,
        changed,
        outcome,
        reason,
    }))
}

impl Actor {
    /// A run of `record` (not started: its target is 0).
    pub(super) fn new_run(
        &mut self,
        record: ModuleRecord,
        (image, image_path): (ImageRx, PathBuf),
        listeners: Result<Listeners, String>,
    ) -> Run {
        self.next_generation += 1;
        let now = Instant::now();
        let summary = manifest::parse(&record.manifest).ok();
        let policy = self.policy_for(summary.as_ref());
        let replicas = summary.as_ref().map_or(1, |s| s.replicas).max(1);
        let image_failure = match &*image.borrow() {
            Some(Err(reason)) => Some(reason.clone()),
            _ => None,
        };
        let (listeners, mut failure) = match (listeners, image_failure) {
            (Ok(l), failure) => (l, failure),
            (Err(reason), _) => (
                Listeners {
                    fds: Vec::new(),
                    addrs: Vec::new(),
                    unix_paths: Vec::new(),
                },
                Some(reason),
            ),
        };
        let sandbox = module_runtime::manifest::Manifest::parse(&record.manifest)
            .map_err(|e| format!("stored manifest: {}", error_chain(&e)))
            .and_then(|m| {
                self.sandbox
                    .order(self.root, record.uid, &m, &self.protected)
                    .map_err(|e| format!("sandbox: {e}"))
            });
        let sandbox = match sandbox {
            Ok(s) => s,
            Err(reason) => {
                failure.get_or_insert(reason);
                None
            }
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
        let s = summary.unwrap_or_else(|| ManifestSummary {
            name: record.name.clone(),
            version: record.version.clone(),
            entry: PathBuf::new(),
            replicas: 1,
            listeners: Vec::new(),
            exports: Vec::new(),
            imports: Vec::new(),
            required_imports: Vec::new(),
            memory: None,
            cpu: None,
            start_deadline: None,
            stop_deadline: None,
            rollout: Default::default(),
        });
        Run {
            revision: record.revision,
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
                    Lifecycle::new(name, policy.clone(), now).observed(
                        self.events
                            .replica_observer(record.name.clone(), record.revision, r),
                    )
                })
                .collect(),
            wanted: vec![false; replicas as usize],
            record,
            generation: self.next_generation,
            listeners: listeners.fds,
            listener_addrs: listeners.addrs,
            unix_paths: listeners.unix_paths,
            exports: s.exports,
            imports: s.imports,
            required: s.required_imports,
            stop_deadline: policy.stop_timeout,
            start_deadline: policy.start_timeout,
            limits,
            limit_sources,
            launch_manifest,
            failure,
            sandbox,
            background: false,
            container: None,
        }
    }

    /// Adds a module with one run and starts every replica.
    pub(super) fn add_and_start(&mut self, mut run: Run) {
        let name = run.record.name.clone();
        run.set_target(run.replicas.len() as u32);
        let generation = run.generation;
        if let Some(reason) = &run.failure {
            tracing::warn!(module = %name, %reason, "cannot start");
        }
        self.modules.insert(name.clone(), Module::new(run));
        self.reconcile(&name, generation);
    }

    pub(super) fn restore(&mut self, record: ModuleRecord) {
        let bound = match manifest::parse(&record.manifest) {
            Ok(summary) => listeners::bind_all(&summary.listeners)
                .map(Listeners::bound)
                .map_err(|e| error_chain(&e)),
            Err(e) => Err(format!("stored manifest: {}", error_chain(&e))),
        };
        let path = self.store.artifact_path(&record.artifact_sha256);
        let sha256 = record.artifact_sha256.clone();
        let known = self.known_image(&sha256);
        let (tx, rx) = watch::channel(known.as_ref().map(|i| Ok(i.fd.clone())));
        let name = record.name.clone();
        let mut run = self.new_run(record, (rx, path), bound);
        let generation = run.generation;
        match known {
            Some(image) => run.artifact = Some(image),
            // Copied and verified off the actor; launches wait for it.
            None => {
                let (store, pending) = (self.store.clone(), self.pending_tx.clone());
                tokio::spawn(async move {
                    let image = tokio::task::spawn_blocking(move || store.load_verified(&sha256))
                        .await
                        .unwrap_or_else(|e| {
                            Err(StoreError::Io {
                                op: "verify",
                                path: PathBuf::new(),
                                source: std::io::Error::other(e.to_string()),
                            })
                        });
                    image_for_run(&tx, &pending, name, generation, image, "stored artifact");
                });
            }
        }
        self.add_and_start(run);
    }

    /// An image a run already uses for the artifact `sha256` (verified when
    /// it was made).
    fn known_image(&self, sha256: &str) -> Option<ArtifactImage> {
        self.modules
            .values()
            .flat_map(|m| m.runs.iter().filter_map(|r| r.artifact.clone()))
            .find(|i| i.sha256.get().is_some_and(|h| h == sha256))
    }

    /// Every image in use, once.
    pub(super) fn known_images(&self) -> Vec<ArtifactImage> {
        let mut known: Vec<ArtifactImage> = Vec::new();
        for i in self
            .modules
            .values()
            .flat_map(|m| m.runs.iter().filter_map(|r| r.artifact.as_ref()))
        {
            if !known.iter().any(|k| k.same(i)) {
                known.push(i.clone());
            }
        }
        known
    }

    pub(super) fn pending(&mut self, p: Pending) {
        match p {
            Pending::Read { input, then } => self.input_read(input, then),
            Pending::Copied { install, image } => self.install_copied(install, image),
            Pending::Saved(install) => self.install_saved(install),
            Pending::Verified {
                name,
                generation,
                image,
            } => {
                if let Some(run) = self
                    .modules
                    .get_mut(&name)
                    .and_then(|m| m.run_mut(generation))
                {
                    run.artifact = Some(image);
                }
            }
            Pending::Removed {
                name,
                generation,
                record,
                result,
            } => self.uninstall_saved(name, generation, record, result),
            Pending::Prepared(p) => self.deploy_prepared(*p),
            Pending::Loaded(l) => self.rollback_loaded(*l),
            Pending::Recorded {
                name,
                to_gen,
                result,
            } => self.rollout_recorded(&name, to_gen, result),
            Pending::Committed {
                name,
                to_gen,
                result,
            } => self.rollout_committed(&name, to_gen, result),
            Pending::Container(read) => self.container_read(*read),
        }
    }

    // ---- install ----

    /// Installs and launches a module, answering once its desired state is
    /// on disk. The launch waits for neither hashing nor the disk: the
    /// artifact is copied into a sealed memfd on a blocking thread while the
    /// instance takes its worker and is wired (the launch order waits for
    /// the copy), then the persister hashes the copy, stores it and writes
    /// the state that refers to it (milliseconds of SHA-256 and fsync). An
    /// install that was never acknowledged may be missing after a crash; an
    /// acknowledged one never is.
    pub(super) fn install(
        &mut self,
        input: Input,
        reply: Reply,
        progress: Option<Progress>,
        deploy: bool,
    ) {
        match self.install_and_launch(input) {
            Ok((summary, artifact, image, image_tx)) => {
                let name = summary.name.clone();
                let generation = self.modules[&name].active;
                if let Some(tx) = progress {
                    self.watches.push(InstallWatch {
                        name: name.clone(),
                        generation,
                        last: None,
                        tx,
                    });
                }
                let placeholder = self.modules[&name].active().record.artifact_sha256.clone();
                let pending = self.pending_tx.clone();
                tokio::spawn(async move {
                    let made = image_of(image, &artifact).await;
                    publish_image(&image_tx, &made, "artifact copy");
                    let _ = pending.send(Pending::Copied {
                        install: InstallSaved {
                            name,
                            generation,
                            placeholder,
                            result: Ok(None),
                            summary,
                            reply,
                            deploy,
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

    fn install_and_launch(
        &mut self,
        input: Input,
    ) -> Result<(ModuleSummary, PathBuf, ImageCopy, ImageTx), InstallError> {
        let Input {
            manifest_path,
            text,
            summary,
            artifact,
            image,
            uids,
        } = input;
        if let Some(m) = self.modules.get(&summary.name) {
            return Err(InstallError::AlreadyInstalled {
                name: summary.name,
                version: m.active().record.version.clone(),
            });
        }
        self.check_sandbox(&manifest_path, &text)?;
        let uid = self.allocate_uid(&summary.name, &uids)?;
        let bound = listeners::bind_all(&summary.listeners).map_err(bind_error)?;
        self.next_placeholder += 1;
        let placeholder = store::placeholder(self.next_placeholder);
        let mut record = ModuleRecord {
            name: summary.name.clone(),
            version: summary.version.clone(),
            artifact_sha256: placeholder,
            manifest: text,
            source: manifest_path,
            revision: 1,
            revisions: Vec::new(),
            uid: Some(uid),
        };
        record.revisions = vec![record.as_revision(unix_now(), Outcome::Active)];
        self.desired
            .modules
            .insert(record.name.clone(), record.clone());
        tracing::info!(module = %record.name, version = %record.version, "installed");
        let name = record.name.clone();
        let (image_tx, image_rx) = watch::channel(None);
        let run = self.new_run(
            record,
            (image_rx, artifact.clone()),
            Ok(Listeners::bound(bound)),
        );
        self.add_and_start(run);
        Ok((
            render::summary(&self.modules[&name]),
            artifact,
            image,
            image_tx,
        ))
    }

    /// Tells callers following an install each state change of the module,
    /// until the start settles: running, failed, crash-looping, its first
    /// back-off (the restart's outcome is another start), stopped or gone.
    /// Dropping a watch's sender tells the connection the progress is over.
    pub(super) fn report_progress(&mut self) {
        if self.watches.is_empty() {
            return;
        }
        let modules = &self.modules;
        self.watches.retain_mut(|w| {
            let Some(m) = modules
                .get(&w.name)
                .filter(|m| m.run(w.generation).is_some())
            else {
                return false;
            };
            let state = m.state();
            if w.last != Some(state) {
                w.last = Some(state);
                if w.tx.send(json!({ "module": render::summary(m) })).is_err() {
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
        if let Some(run) = self
            .modules
            .get_mut(&install.name)
            .and_then(|m| m.run_mut(install.generation))
        {
            run.artifact = Some(image.clone());
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
    pub(super) fn persist_started(&mut self) {
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
                        .and_then(|m| m.run(s.install.generation))
                        .is_none_or(|r| r.state() != State::Starting)
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

    /// Replaces a placeholder by the hash the persister computed, in the
    /// desired state and in the runs.
    fn resolve_hash(&mut self, name: &str, placeholder: &str, hash: &str) {
        if let Some(r) = self.desired.modules.get_mut(name) {
            if r.artifact_sha256 == placeholder {
                r.artifact_sha256 = hash.to_owned();
            }
            for v in r.revisions.iter_mut() {
                if v.artifact_sha256 == placeholder {
                    v.artifact_sha256 = hash.to_owned();
                }
            }
        }
        if let Some(m) = self.modules.get_mut(name) {
            for run in &mut m.runs {
                if run.record.artifact_sha256 == placeholder {
                    run.record.artifact_sha256 = hash.to_owned();
                }
            }
        }
    }

    /// The persister is done with an install: record the artifact's hash and
    /// answer, or undo the install (stop, remove, write the state without
    /// it) and say why.
    fn install_saved(&mut self, s: InstallSaved) {
        let source = match s.result {
            Ok(hash) => {
                if let Some(hash) = hash {
                    self.resolve_hash(&s.name, &s.placeholder, &hash);
                }
                // The module as it is now (it may be running already).
                let m = self
                    .modules
                    .get(&s.name)
                    .filter(|m| m.run(s.generation).is_some());
                let reply = match (m, s.deploy) {
                    (Some(m), true) => deploy_reply(m, 1, true, "installed", None),
                    (None, true) => Response::Value(json!({
                        "module": s.summary, "revision": 1, "changed": true, "outcome": "installed"
                    })),
                    (m, false) => {
                        Response::Value(json!({ "module": m.map_or(s.summary, render::summary) }))
                    }
                };
                let _ = s.reply.send(Ok(reply));
                self.emit_installed(&s.name, s.generation);
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
            .filter(|m| m.run(s.generation).is_some())
        {
            // Never acknowledged: it goes even if the state cannot be
            // written (the state without it is what is on disk).
            m.rolling_back = true;
            self.uninstall(s.name, nobody());
        }
    }

    /// Refuses a manifest whose `[sandbox] allow_syscalls` asks for a
    /// syscall the configuration does not grant, or whose `writable` names a
    /// path outside `sandbox.writable_roots` or over emberd's own
    /// directories (see [`crate::sandbox::SandboxConfig::check_writable`]).
    pub(super) fn check_sandbox(
        &self,
        manifest_path: &Path,
        text: &str,
    ) -> Result<(), InstallError> {
        let Ok(m) = module_runtime::manifest::Manifest::parse(text) else {
            return Ok(()); // refused by the parser already
        };
        if !self.sandbox.enabled {
            return Ok(());
        }
        let refuse = |field: String, reason: String| InstallError::Manifest {
            path: manifest_path.to_owned(),
            source: manifest::ManifestError::Field { field, reason },
        };
        if let Some(syscall) = self.sandbox.ungranted(&m.sandbox.allow_syscalls) {
            return Err(refuse(
                "sandbox.allow_syscalls".into(),
                crate::sandbox::not_granted(syscall),
            ));
        }
        self.sandbox
            .check_writable(&m.sandbox.writable, &self.protected)
            .map_err(|(i, why)| refuse(format!("sandbox.writable[{i}]"), why))
    }

    // ---- uninstall ----

    pub(super) fn uninstall(&mut self, name: String, reply: Reply) {
        let Some(m) = self.modules.get_mut(&name) else {
            let _ = reply.send(Err(UninstallError::NotFound(name).into()));
            return;
        };
        m.uninstall.push(reply);
        if m.rollout.is_some() {
            for run in &mut m.runs {
                run.set_target(0);
            }
            self.end_rollout(&name, "aborted", Some("the module was uninstalled".into()));
        }
        self.stop_module(&name);
    }

    /// Removes modules whose uninstall has finished stopping them.
    ///
    /// The state without the module is written on the persister; the
    /// module stays listed (stopped) until that write is done, so its name
    /// cannot be installed again meanwhile and a failed write can put it
    /// back.
    pub(super) fn settle_uninstalls(&mut self) {
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
            let generation = m.active;
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
            .is_some_and(|m| m.active == generation && m.removing)
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
        let killed = m
            .runs
            .iter()
            .any(|r| r.replicas.iter().any(Lifecycle::killed_at_stop));
        for run in &mut m.runs {
            // Listeners close when the last launch task lets go.
            run.listeners.clear();
            for (p, id) in run.unix_paths.drain(..) {
                listeners::unlink_own(&p, id);
            }
        }
        let _ = std::fs::remove_file(self.store.log_path(&name));
        tracing::info!(module = %name, "uninstalled");
        self.events.emit(super::events::Event::Uninstalled {
            module: name.clone(),
        });
        let reply = to_value(UninstallReply { killed });
        for w in m.uninstall.drain(..) {
            let _ = w.send(Ok(Response::Value(reply.clone())));
        }
    }

    // ---- deploy and rollback ----

    /// `Deploy`: an install for a module not installed; else the new
    /// revision's artifact is copied (or found among the images in use) and
    /// hashed off the actor, then [`Actor::deploy_prepared`] starts the
    /// rollout.
    pub(super) fn deploy(
        &mut self,
        req: Deploy,
        reply: Reply,
        progress: Option<Progress>,
        peer: Arc<Credentials>,
    ) {
        let overrides = match req.overrides() {
            Ok(o) => o,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        self.read_then(
            req.path,
            req.entry,
            peer,
            Then::Deploy {
                overrides,
                reply,
                progress,
            },
        );
    }

    /// Reads an install's or a deploy's files on the blocking pool, with
    /// the rights of `peer` (the client); the request goes on in
    /// [`Actor::input_read`].
    pub(super) fn read_then(
        &mut self,
        path: PathBuf,
        entry: Option<PathBuf>,
        peer: Arc<Credentials>,
        then: Then,
    ) {
        // A read that never ends (a FUSE file whose server never answers)
        // holds a blocking-pool thread; so many would starve every other
        // use of the pool (reaping, cgroups, hashing).
        if self.reads_in_flight >= MAX_READS {
            let reply = match then {
                Then::Install { reply, .. } | Then::Deploy { reply, .. } => reply,
            };
            let _ = reply.send(Err(ErrorReply::new(
                crate::control::errors::INVALID_INPUT,
                json!({ "reason": format!(
                    "{MAX_READS} installs or deploys are still reading their files; \
                     try again when one has finished"
                ) }),
            )));
            return;
        }
        self.reads_in_flight += 1;
        let caps = self.install_caps.clone();
        let q = UidQuery {
            sandbox: self.sandbox.clone(),
            recorded: self.recorded_uids(),
            known: self.known_images(),
            uid_key: None,
        };
        let pending = self.pending_tx.clone();
        tokio::spawn(async move {
            let p = path.clone();
            let input = tokio::task::spawn_blocking(move || {
                read_input(&p, entry.as_deref(), &peer, &caps, &q)
            })
            .await
            .unwrap_or_else(|e| {
                Err(InstallError::Unreadable {
                    path,
                    source: crate::input::FileError::Io {
                        path: PathBuf::new(),
                        source: std::io::Error::other(e.to_string()),
                    },
                })
            });
            let _ = pending.send(Pending::Read { input, then });
        });
    }

    fn input_read(&mut self, input: Result<Input, InstallError>, then: Then) {
        self.reads_in_flight = self.reads_in_flight.saturating_sub(1);
        let input = match input {
            Ok(i) => i,
            Err(e) => {
                let reply = match then {
                    Then::Install { reply, .. } | Then::Deploy { reply, .. } => reply,
                };
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        match then {
            Then::Install {
                reply,
                progress,
                deploy,
            } => self.install(input, reply, progress, deploy),
            Then::Deploy {
                overrides,
                reply,
                progress,
            } => self.deploy_read(input, overrides, reply, progress),
        }
    }

    /// A deploy's files are read: an install for a module not installed,
    /// else its artifact is copied and hashed off the actor.
    fn deploy_read(
        &mut self,
        input: Input,
        overrides: Overrides,
        reply: Reply,
        progress: Option<Progress>,
    ) {
        let name = input.summary.name.clone();
        let Some(m) = self.modules.get_mut(&name) else {
            // Not installed: a deploy is an install (revision 1).
            return self.install(input, reply, progress, true);
        };
        if let Err(e) = busy(&name, m) {
            let _ = reply.send(Err(e));
            return;
        }
        let Input {
            manifest_path,
            text,
            artifact,
            image,
            ..
        } = input;
        if let Err(e) = self.check_sandbox(&manifest_path, &text) {
            let _ = reply.send(Err(e.into()));
            return;
        }
        let Some(m) = self.modules.get_mut(&name) else {
            return;
        };
        m.preparing = true;
        let active = m.active;
        let pending = self.pending_tx.clone();
        let src = artifact.clone();
        tokio::spawn(async move {
            let image = match image_of(image, &src).await {
                Ok(image) => {
                    let s = src.clone();
                    tokio::task::spawn_blocking(move || {
                        let hash = image.hash().map_err(|source| StoreError::Io {
                            op: "hash",
                            path: s,
                            source,
                        })?;
                        Ok((image, hash))
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Err(StoreError::Io {
                            op: "hash",
                            path: src,
                            source: std::io::Error::other(e.to_string()),
                        })
                    })
                }
                Err(e) => Err(e),
            };
            let _ = pending.send(Pending::Prepared(Box::new(Prepared {
                name,
                active,
                text,
                manifest_path,
                artifact,
                overrides,
                image,
                reply,
                progress,
            })));
        });
    }

    /// A deploy's artifact is ready: nothing changes if it is the active
    /// revision; else its revision (a new number, or the number of an
    /// identical earlier one) is rolled out.
    fn deploy_prepared(&mut self, p: Prepared) {
        let shutting_down = self.shutting_down();
        let prepared = (p.name.as_str(), p.active, "its new revision");
        let m = match Self::prepared(&mut self.modules, shutting_down, prepared) {
            Ok(m) => m,
            Err(e) => {
                let _ = p.reply.send(Err(e));
                return;
            }
        };
        let (image, hash) = match p.image {
            Ok(v) => v,
            Err(source) => {
                let e: ErrorReply = InstallError::Store {
                    name: p.name.clone(),
                    source,
                }
                .into();
                let _ = p.reply.send(Err(e));
                return;
            }
        };
        let active = &m.active().record;
        if active.artifact_sha256 == hash && active.manifest == p.text {
            let rev = m.active().revision;
            let _ = p
                .reply
                .send(Ok(deploy_reply(m, rev, false, "unchanged", None)));
            return;
        }
        let revisions = self
            .desired
            .modules
            .get(&p.name)
            .map(|r| r.revisions.as_slice())
            .unwrap_or_default();
        let revision = revisions
            .iter()
            .find(|r| r.artifact_sha256 == hash && r.manifest == p.text)
            .map(|r| r.revision)
            .unwrap_or_else(|| revisions.iter().map(|r| r.revision).max().unwrap_or(0) + 1);
        let summary = match manifest::parse(&p.text) {
            Ok(s) => s,
            Err(source) => {
                let e: ErrorReply = InstallError::Manifest {
                    path: p.manifest_path,
                    source,
                }
                .into();
                let _ = p.reply.send(Err(e));
                return;
            }
        };
        let record = ModuleRecord {
            name: p.name.clone(),
            version: summary.version.clone(),
            artifact_sha256: hash,
            manifest: p.text,
            source: p.manifest_path,
            revision,
            revisions: Vec::new(),
            uid: m.active().record.uid,
        };
        self.next_placeholder += 1;
        let stored = NewArtifact {
            placeholder: store::placeholder(self.next_placeholder),
            image: image.clone(),
        };
        let spec = Spec {
            record,
            image,
            image_path: p.artifact,
            kind: Kind::Deploy,
            overrides: p.overrides,
            store: Some(stored),
            reason: None,
        };
        if let Err(e) = self.start_rollout(spec, p.reply, p.progress) {
            tracing::info!(module = %p.name, reason = %e.name, "deploy refused");
        }
    }

    /// `Rollback`: the revision before the active one (or `to`), from the
    /// stored artifact.
    pub(super) fn rollback(&mut self, req: Rollback, reply: Reply, progress: Option<Progress>) {
        let Some(m) = self.modules.get(&req.name) else {
            let _ = reply.send(Err(module_not_found(&req.name)));
            return;
        };
        if let Err(e) = busy(&req.name, m) {
            let _ = reply.send(Err(e));
            return;
        }
        let active = m.active().revision;
        let revisions = self
            .desired
            .modules
            .get(&req.name)
            .map(|r| r.revisions.clone())
            .unwrap_or_default();
        let target = match req.to {
            Some(n) => revisions.iter().find(|r| r.revision == n),
            // The newest revision that was active before this one.
            None => revisions
                .iter()
                .find(|r| r.outcome == Outcome::Superseded && r.revision != active),
        };
        let Some(target) = target.cloned() else {
            let e = match req.to {
                Some(n) => revision_not_found(&req.name, n),
                None => invalid_input(format!(
                    "{} has no earlier revision to roll back to (see `emberctl history {}`)",
                    req.name, req.name
                )),
            };
            let _ = reply.send(Err(e));
            return;
        };
        if target.revision == active {
            let _ = reply.send(Ok(deploy_reply(m, active, false, "unchanged", None)));
            return;
        }
        let generation = m.active;
        let loaded = |image| Loaded {
            name: req.name.clone(),
            active: generation,
            target: target.clone(),
            image,
            reply,
            progress,
        };
        // An image a run already uses (verified when it was made), else
        // the stored file, read, copied and hashed off the actor.
        if let Some(image) = self.known_image(&target.artifact_sha256) {
            return self.rollback_loaded(loaded(Ok(image)));
        }
        let mut l = loaded(Err(String::new()));
        if let Some(m) = self.modules.get_mut(&req.name) {
            m.preparing = true;
        }
        let (store, pending) = (self.store.clone(), self.pending_tx.clone());
        tokio::spawn(async move {
            let sha256 = l.target.artifact_sha256.clone();
            l.image = tokio::task::spawn_blocking(move || store.load_verified(&sha256))
                .await
                .unwrap_or_else(|e| {
                    Err(StoreError::Io {
                        op: "verify",
                        path: PathBuf::new(),
                        source: std::io::Error::other(e.to_string()),
                    })
                })
                .map_err(|e| format!("stored artifact: {}", error_chain(&e)));
            let _ = pending.send(Pending::Loaded(Box::new(l)));
        });
    }

    /// A deploy's or rollback's preparation off the actor is over: the
    /// module, marked no longer preparing, if `what` may still go on (it
    /// was not uninstalled meanwhile, emberd is not shutting down, and no
    /// uninstall is under way); else the error to reply.
    fn prepared<'a>(
        modules: &'a mut std::collections::BTreeMap<String, Module>,
        shutting_down: bool,
        (name, active, what): (&str, u64, &str),
    ) -> Result<&'a mut Module, ErrorReply> {
        let Some(m) = modules.get_mut(name).filter(|m| m.run(active).is_some()) else {
            return Err(invalid_input(format!(
                "{name} was uninstalled while {what} was being prepared"
            )));
        };
        m.preparing = false;
        if shutting_down {
            return Err(ErrorReply::new(
                crate::control::errors::SHUTTING_DOWN,
                json!({}),
            ));
        }
        if !m.uninstall.is_empty() {
            return Err(invalid_input(format!("{name} is being uninstalled")));
        }
        Ok(m)
    }

    /// A rollback's image is ready (or refused): its rollout starts, unless
    /// the module was uninstalled or emberd began shutting down meanwhile.
    fn rollback_loaded(&mut self, l: Loaded) {
        let shutting_down = self.shutting_down();
        let prepared = (l.name.as_str(), l.active, "its rollback");
        let m = match Self::prepared(&mut self.modules, shutting_down, prepared) {
            Ok(m) => m,
            Err(e) => {
                let _ = l.reply.send(Err(e));
                return;
            }
        };
        let target = l.target;
        let image = match l.image {
            Ok(i) => i,
            Err(reason) => {
                let _ = l.reply.send(Err(invalid_input(format!(
                    "revision {} of {}: {reason}",
                    target.revision, l.name
                ))));
                return;
            }
        };
        let record = ModuleRecord {
            name: l.name.clone(),
            version: target.version,
            artifact_sha256: target.artifact_sha256.clone(),
            manifest: target.manifest,
            source: target.source,
            revision: target.revision,
            revisions: Vec::new(),
            uid: m.active().record.uid,
        };
        let spec = Spec {
            image_path: self.store.artifact_path(&target.artifact_sha256),
            record,
            image,
            kind: Kind::Rollback,
            overrides: Overrides::default(),
            store: None,
            reason: None,
        };
        let _ = self.start_rollout(spec, l.reply, l.progress);
    }

    /// Starts a rollout of `spec` on the module: its run is made (its
    /// listeners are the active run's where the address is the same, so
    /// both revisions accept from one queue), the state naming the rollout
    /// is written (after storing the artifact), and the planner takes over.
    fn start_rollout(
        &mut self,
        spec: Spec,
        reply: Reply,
        progress: Option<Progress>,
    ) -> Result<(), ErrorReply> {
        let name = spec.record.name.clone();
        let refuse = |reply: Reply, e: ErrorReply| {
            let _ = reply.send(Err(e.clone()));
            Err(e)
        };
        let summary = match manifest::parse(&spec.record.manifest) {
            Ok(s) => s,
            Err(e) => return refuse(reply, invalid_input(error_chain(&e))),
        };
        let params = match Params::resolve(summary.replicas, &summary.rollout, &spec.overrides) {
            Ok(p) => p,
            Err(reason) => return refuse(reply, invalid_input(reason)),
        };
        let Some(m) = self.modules.get(&name) else {
            return refuse(reply, module_not_found(&name));
        };
        let from = m.serving();
        let (from_gen, from_revision) = (from.generation, from.revision);
        // Listeners: the same socket for the same name and address as asked
        // for (not as bound: port 0 binds any port once).
        let asked_before = manifest::parse(&from.record.manifest)
            .map(|s| s.listeners)
            .unwrap_or_default();
        let mut fds = Vec::new();
        let mut addrs = Vec::new();
        let mut unix_paths = Vec::new();
        let mut fresh = Vec::new();
        for spec_l in &summary.listeners {
            let same = asked_before
                .iter()
                .any(|b| b.name == spec_l.name && b.address == spec_l.address);
            let i = from.listeners.iter().position(|(n, _)| *n == spec_l.name);
            let a = from.listener_addrs.iter().find(|(n, _)| *n == spec_l.name);
            match (same, i, a) {
                (true, Some(i), Some(a)) => {
                    fds.push((spec_l.name.clone(), from.listeners[i].1.clone()));
                    addrs.push(a.clone());
                    if let crate::manifest::ListenAddress::Unix(p) = &spec_l.address {
                        unix_paths.extend(from.unix_paths.iter().filter(|(q, _)| q == p).cloned());
                    }
                }
                _ => fresh.push(spec_l.clone()),
            }
        }
        if !fresh.is_empty() {
            match listeners::bind_all(&fresh) {
                Ok(bound) => {
                    let l = Listeners::bound(bound);
                    fds.extend(l.fds);
                    addrs.extend(l.addrs);
                    unix_paths.extend(l.unix_paths);
                }
                Err(e) => return refuse(reply, bind_error(e).into()),
            }
        }
        let (_, rx) = watch::channel(Some(Ok(spec.image.fd.clone())));
        let mut run = self.new_run(
            spec.record.clone(),
            (rx, spec.image_path),
            Ok(Listeners {
                fds,
                addrs,
                unix_paths,
            }),
        );
        run.artifact = Some(spec.image);
        run.background = true;
        let to_gen = run.generation;
        let to_revision = run.revision;
        let version = run.record.version.clone();
        tracing::info!(module = %name, from = from_revision, to = to_revision, %version, strategy = params.strategy.as_str(), "rollout");
        let m = self.modules.get_mut(&name).expect("checked above");
        m.runs.push(run);
        let mut rollout = Rollout {
            kind: spec.kind,
            from_gen,
            to_gen,
            from_revision,
            to_revision,
            version,
            params,
            phase: Phase::Progressing,
            paused: false,
            started: Instant::now(),
            took_over: None,
            watches: Vec::new(),
            finals: Vec::new(),
            started_replies: Vec::new(),
            reason: spec.reason,
            recorded: false,
            committing: false,
            final_outcome: "completed",
        };
        match progress {
            Some(tx) => {
                rollout.watches.push(Watch { tx, last: None });
                rollout.finals.push(reply);
            }
            // Acknowledged once the revision is on disk.
            None => rollout.started_replies.push(reply),
        }
        m.rollout = Some(rollout);
        self.emit_rollout(&name, "started", None);
        self.record_rollout(&name, spec.store, spec.kind)
    }

    /// Writes the state naming the rollout's revision (`rolling-out`),
    /// storing its artifact first; then drives it.
    fn record_rollout(
        &mut self,
        name: &str,
        artifact: Option<NewArtifact>,
        kind: Kind,
    ) -> Result<(), ErrorReply> {
        let Some(m) = self.modules.get(name) else {
            return Ok(());
        };
        let Some(ro) = m.rollout.as_ref() else {
            return Ok(());
        };
        let to_gen = ro.to_gen;
        if kind != Kind::AutoRollback {
            let run = m.run(to_gen).expect("the rollout's run");
            let mut entry = run.record.as_revision(unix_now(), Outcome::RollingOut);
            entry.reason = None;
            self.put_revision(name, entry);
        }
        let done = self.persister.save(self.desired.clone(), artifact);
        let pending = self.pending_tx.clone();
        let name = name.to_owned();
        let n = name.clone();
        tokio::spawn(async move {
            let result = done.await.unwrap_or(Err(StoreError::WriterGone));
            let _ = pending.send(Pending::Recorded {
                name: n,
                to_gen,
                result,
            });
        });
        self.advance(&name);
        Ok(())
    }

    /// Puts `entry` first in the module's history (replacing an entry of the
    /// same number) and keeps the active revision, a rolling-out one and
    /// the [`HISTORY`] newest others.
    fn put_revision(&mut self, name: &str, entry: RevisionRecord) {
        let Some(r) = self.desired.modules.get_mut(name) else {
            return;
        };
        r.revisions.retain(|v| v.revision != entry.revision);
        r.revisions.insert(0, entry);
        trim_history(&mut r.revisions);
    }

    /// Sets the outcome of one revision in the module's history.
    fn set_outcome(&mut self, name: &str, revision: u64, outcome: Outcome, reason: Option<String>) {
        if let Some(v) = self
            .desired
            .modules
            .get_mut(name)
            .and_then(|r| r.revisions.iter_mut().find(|v| v.revision == revision))
        {
            v.outcome = outcome;
            v.reason = reason;
        }
    }

    fn rollout_recorded(&mut self, name: &str, to_gen: u64, result: Saved) {
        let Some(ro) = self
            .modules
            .get_mut(name)
            .and_then(|m| m.rollout.as_mut())
            .filter(|r| r.to_gen == to_gen)
        else {
            return;
        };
        match result {
            Ok(_) => {
                ro.recorded = true;
                let started = std::mem::take(&mut ro.started_replies);
                let revision = ro.to_revision;
                if let Some(m) = self.modules.get(name) {
                    for r in started {
                        let _ = r.send(Ok(deploy_reply(m, revision, true, "started", None)));
                    }
                }
                self.advance(name);
            }
            Err(e) => {
                let reason = format!("cannot store the new revision: {}", error_chain(&e));
                let revision = ro.to_revision;
                self.abort(name, reason.clone());
                self.set_outcome(name, revision, Outcome::Failed, Some(reason));
                self.persist_quietly();
            }
        }
    }

    /// Writes the desired state; nobody waits for it (a failure is logged).
    fn persist_quietly(&mut self) {
        let done = self.persister.save_and_collect(self.desired.clone());
        tokio::spawn(async move {
            if let Ok(Err(e)) = done.await {
                tracing::warn!(error = %error_chain(&e), "cannot write the desired state");
            }
        });
    }

    /// Drives a module's rollout: asks the planner what should run, applies
    /// it, and handles the takeover, the commit after `stable_after`, an
    /// abort, or a rollback of a revision that failed after taking over.
    pub(super) fn advance(&mut self, name: &str) {
        for _ in 0..8 {
            let Some(m) = self.modules.get_mut(name) else {
                return;
            };
            for g in finished_runs(m) {
                drop_run(m, g);
            }
            let Some(ro) = m.rollout.as_ref() else {
                // Replicas told to run again while they were stopping (an
                // abort during draining) start once they have exited.
                self.reconcile_module(name);
                return;
            };
            if ro.took_over.is_some() {
                let new = m.run(ro.to_gen).expect("the rollout's run");
                if let Some(why) = new.failure() {
                    self.auto_rollback(name, why);
                    return;
                }
                let due = ro
                    .took_over
                    .is_some_and(|t| t + ro.params.stable_after <= Instant::now());
                if due && ro.recorded && !ro.committing {
                    self.commit(name);
                }
                break;
            }
            let Some(mut counts) = m.counts() else {
                return;
            };
            let ro = m.rollout.as_ref().expect("checked above");
            if ro.kind == Kind::AutoRollback {
                // Back to the known-good revision: its replicas restart with
                // back-off until they are ready, unless it is broken too
                // (crash-looping, failed, waiting for a service): then the
                // way back is given up, and the module stays on it.
                let broken = m.run(ro.to_gen).and_then(|r| {
                    r.replicas
                        .iter()
                        .enumerate()
                        .find(|(_, l)| {
                            matches!(l.state(), State::CrashLoop | State::Failed | State::Waiting)
                        })
                        .map(|(i, l)| {
                            format!(
                                "replica {i}: {}",
                                l.reason().or(l.last_error()).unwrap_or("not starting")
                            )
                        })
                });
                if let Some(b) = broken {
                    let told = ro.final_outcome;
                    let reason = format!(
                        "{}; revision {} does not start either: {b}",
                        ro.reason.clone().unwrap_or_default(),
                        ro.to_revision
                    );
                    self.end_rollout(name, told, Some(reason));
                    return;
                }
                counts.new_failure = false;
            }
            let ro = m.rollout.as_mut().expect("checked above");
            if !ro.paused && release::canary_done(&ro.params, &counts) {
                tracing::info!(
                    module = name,
                    ready = counts.new_ready,
                    "canary ready; rollout paused"
                );
                ro.paused = true;
                self.emit_rollout(name, "paused", None);
            }
            let m = self.modules.get_mut(name).expect("checked above");
            let ro = m.rollout.as_mut().expect("checked above");
            let to_gen = ro.to_gen;
            match release::plan(&ro.params, &counts, ro.paused) {
                Step::Abort => {
                    let why = m
                        .run(to_gen)
                        .and_then(Run::failure)
                        .unwrap_or_else(|| "a new replica failed".into());
                    self.abort(name, why);
                    return;
                }
                Step::TookOver => {
                    let ro = m.rollout.as_mut().expect("checked above");
                    ro.took_over = Some(Instant::now());
                    ro.phase = Phase::Stabilizing;
                    tracing::info!(
                        module = name,
                        revision = ro.to_revision,
                        "new revision took over"
                    );
                    if let Some(run) = m.run_mut(to_gen) {
                        // It serves now: its restarts are urgent.
                        run.background = false;
                    }
                    self.emit_rollout(name, Phase::Stabilizing.as_str(), None);
                    let m = self.modules.get_mut(name).expect("checked above");
                    let ro = m.rollout.as_mut().expect("checked above");
                    if ro.kind == Kind::AutoRollback {
                        let (told, reason) = (ro.final_outcome, ro.reason.clone());
                        self.end_rollout(name, told, reason);
                        return;
                    }
                }
                Step::Scale { old, new, phase } => {
                    let auto = ro.kind == Kind::AutoRollback;
                    let phase = if auto && phase == Phase::Progressing {
                        Phase::RollingBack
                    } else {
                        phase
                    };
                    let (from_gen, to_gen) = (ro.from_gen, ro.to_gen);
                    let moved = ro.phase != phase;
                    ro.phase = phase;
                    let mut changed = moved;
                    for (g, t) in [(to_gen, new), (from_gen, old)] {
                        if let Some(run) = m.run_mut(g) {
                            changed |= run.target() != t;
                            run.set_target(t);
                        }
                    }
                    self.reconcile(name, to_gen);
                    self.reconcile(name, from_gen);
                    if moved {
                        self.emit_rollout(name, phase.as_str(), None);
                    }
                    if !changed {
                        break;
                    }
                }
            }
        }
        self.report_rollout(name);
    }

    /// Tells callers following the rollout each change of its phase or
    /// replica counts.
    fn report_rollout(&mut self, name: &str) {
        let Some(m) = self.modules.get(name) else {
            return;
        };
        let Some(ro) = m.rollout.as_ref() else {
            return;
        };
        if ro.watches.is_empty() {
            return;
        }
        let summary = render::summary(m);
        let key = summary.rollout.as_ref().map(|r| {
            json!([
                r.phase,
                r.old_replicas,
                r.new_replicas,
                r.new_ready,
                summary.state
            ])
        });
        let value = json!({ "module": summary });
        let m = self.modules.get_mut(name).expect("checked above");
        let ro = m.rollout.as_mut().expect("checked above");
        ro.watches.retain_mut(|w| {
            if w.last == key {
                return true;
            }
            w.last = key.clone();
            w.tx.send(value.clone()).is_ok()
        });
    }

    /// A new replica failed before the new revision took over: its replicas
    /// stop, every old replica runs again (a rolling rollout had stopped
    /// some), and the module stays on the old revision.
    fn abort(&mut self, name: &str, reason: String) {
        tracing::warn!(module = name, %reason, "rollout aborted");
        let draining = self
            .modules
            .get(name)
            .and_then(|m| m.rollout.as_ref())
            .is_some_and(|r| r.phase == Phase::Draining);
        if draining {
            // The old replicas are already stopping: the new ones serve
            // until the old ones are back.
            let told = reason.clone();
            return self.back_to_committed(name, reason, told, Outcome::Aborted, "aborted");
        }
        self.end_rollout(name, "aborted", Some(reason));
    }

    /// Ends the rollout with `outcome` (`aborted`, `rolled-back`: the old
    /// run serves again; `completed`: the new one is committed).
    fn end_rollout(&mut self, name: &str, outcome: &'static str, reason: Option<String>) {
        self.report_rollout(name);
        self.emit_rollout(name, outcome, reason.as_deref());
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Some(ro) = m.rollout.take() else {
            return;
        };
        // A way back to the committed run keeps it, whatever happened; a
        // release keeps its new run only if it completed.
        let keep = if outcome == "completed" || ro.kind == Kind::AutoRollback {
            ro.to_gen
        } else {
            ro.from_gen
        };
        let drop_gen = if keep == ro.to_gen {
            ro.from_gen
        } else {
            ro.to_gen
        };
        m.active = keep;
        if let Some(run) = m.run_mut(keep) {
            // It serves now: its restarts are urgent.
            run.background = false;
        }
        if let Some(run) = m.run_mut(drop_gen) {
            run.set_target(0);
        }
        if m.uninstall.is_empty() {
            if let Some(run) = m.run_mut(keep) {
                run.set_target(run.replicas.len() as u32);
            }
        }
        let revision = m.active().revision;
        // The caller's view of the outcome: its own revision's number.
        let (reply_revision, changed) = match ro.kind {
            Kind::AutoRollback => (ro.from_revision, false),
            _ => (ro.to_revision, outcome == "completed"),
        };
        let mut finals = ro.finals;
        finals.extend(ro.started_replies);
        let record_outcome = match outcome {
            "aborted" => Some(Outcome::Aborted),
            _ => None,
        };
        if let Some(o) = record_outcome {
            if ro.kind != Kind::AutoRollback {
                self.set_outcome(name, ro.to_revision, o, reason.clone());
                self.persist_quietly();
            }
        }
        self.reconcile(name, drop_gen);
        self.reconcile(name, keep);
        let Some(m) = self.modules.get(name) else {
            return;
        };
        tracing::info!(module = name, outcome, revision, "rollout ended");
        for f in finals {
            let _ = f.send(Ok(deploy_reply(
                m,
                reply_revision,
                changed,
                outcome,
                reason.clone(),
            )));
        }
        self.advance(name);
    }

    /// The new revision failed within `stable_after` of taking over: it is
    /// recorded as rolled back and the committed revision is started again
    /// the same way (the callers following the first rollout follow this
    /// one and are told `rolled-back`).
    fn auto_rollback(&mut self, name: &str, why: String) {
        let revision = self
            .modules
            .get(name)
            .and_then(|m| m.rollout.as_ref())
            .map_or(0, |r| r.to_revision);
        tracing::warn!(module = name, revision, reason = %why, "new revision failed after taking over; rolling back");
        let reason = format!("revision {revision} failed after taking over: {why}");
        self.back_to_committed(name, why, reason, Outcome::RolledBack, "rolled-back");
    }

    /// Ends the rollout by bringing the committed run back: its replicas
    /// (stopped, or stopping while a release drained) start again, its image
    /// and listeners are still held, nothing is bound or copied; the new run
    /// keeps serving until they are ready (a surge back), so nothing is
    /// left without a replica. The new revision's history entry gets
    /// `outcome` with `why`; the callers are told `told` at the end.
    fn back_to_committed(
        &mut self,
        name: &str,
        why: String,
        reason: String,
        outcome: Outcome,
        told: &'static str,
    ) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Some((committed_gen, committing)) =
            m.rollout.as_ref().map(|ro| (ro.from_gen, ro.committing))
        else {
            return;
        };
        let Some(committed) = m.run(committed_gen) else {
            // Cannot happen (the committed run is the active one, never
            // dropped during a rollout); end it plainly if it does.
            return self.end_rollout(name, told, Some(reason));
        };
        let record = committed.record.clone();
        let replicas = committed.replicas.len() as u32;
        let ro = m.rollout.take().expect("checked above");
        if committing {
            // The commit's write may be on its way: the desired state names
            // the committed revision again (written after it, in order).
            if let Some(r) = self.desired.modules.get_mut(name) {
                r.version = record.version.clone();
                r.artifact_sha256 = record.artifact_sha256.clone();
                r.manifest = record.manifest.clone();
                r.source = record.source.clone();
                r.revision = record.revision;
            }
            self.set_outcome(name, record.revision, Outcome::Active, None);
        }
        self.set_outcome(name, ro.to_revision, outcome, Some(why));
        self.persist_quietly();
        let mut finals = ro.finals;
        finals.extend(ro.started_replies);
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        m.rollout = Some(Rollout {
            kind: Kind::AutoRollback,
            from_gen: ro.to_gen,
            to_gen: committed_gen,
            from_revision: ro.to_revision,
            to_revision: record.revision,
            version: record.version,
            params: Params {
                replicas,
                strategy: module_runtime::manifest::Strategy::Surge,
                max_surge: replicas,
                max_unavailable: 0,
                pause_after: None,
                stable_after: std::time::Duration::ZERO,
            },
            phase: Phase::RollingBack,
            paused: false,
            started: Instant::now(),
            took_over: None,
            watches: ro.watches,
            finals,
            started_replies: Vec::new(),
            reason: Some(reason),
            recorded: true,
            committing: false,
            final_outcome: told,
        });
        self.advance(name);
    }

    /// The new revision ran `stable_after` without a crash: it becomes the
    /// committed one on disk.
    fn commit(&mut self, name: &str) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Some(ro) = m.rollout.as_mut() else {
            return;
        };
        ro.committing = true;
        let (to_gen, to_revision, from_revision) = (ro.to_gen, ro.to_revision, ro.from_revision);
        let record = m.run(to_gen).expect("the rollout's run").record.clone();
        if let Some(r) = self.desired.modules.get_mut(name) {
            r.version = record.version.clone();
            r.artifact_sha256 = record.artifact_sha256.clone();
            r.manifest = record.manifest.clone();
            r.source = record.source.clone();
            r.revision = to_revision;
        }
        if from_revision != to_revision {
            self.set_outcome(name, from_revision, Outcome::Superseded, None);
        }
        self.set_outcome(name, to_revision, Outcome::Active, None);
        // Any other `active` entry (an earlier revision) is superseded too.
        if let Some(r) = self.desired.modules.get_mut(name) {
            for v in &mut r.revisions {
                if v.revision != to_revision && v.outcome == Outcome::Active {
                    v.outcome = Outcome::Superseded;
                }
            }
        }
        let done = self.persister.save_and_collect(self.desired.clone());
        let pending = self.pending_tx.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let result = done.await.unwrap_or(Err(StoreError::WriterGone));
            let _ = pending.send(Pending::Committed {
                name,
                to_gen,
                result,
            });
        });
    }

    fn rollout_committed(&mut self, name: &str, to_gen: u64, result: Saved) {
        let ours = self
            .modules
            .get(name)
            .and_then(|m| m.rollout.as_ref())
            .is_some_and(|r| r.to_gen == to_gen);
        if !ours {
            return;
        }
        let reason = result.err().map(|e| {
            format!(
                "committed, but the state was not written: {}",
                error_chain(&e)
            )
        });
        self.end_rollout(name, "completed", reason);
    }

    /// `Rollout(name, action)`.
    pub(super) fn rollout_action(
        &mut self,
        req: crate::control::rollout::Rollout,
    ) -> Result<serde_json::Value, ErrorReply> {
        let name = req.name.as_str();
        let m = self
            .modules
            .get_mut(name)
            .ok_or_else(|| module_not_found(name))?;
        let action = req.action()?;
        let ro = m.rollout.as_mut().ok_or_else(|| no_rollout(name))?;
        let before_takeover = ro.took_over.is_none() && ro.kind != Kind::AutoRollback;
        let draining = ro.phase == Phase::Draining;
        if ro.kind == Kind::AutoRollback && action == Action::Abort {
            // Give up the way back: the committed run stays the module's,
            // the failed one stops.
            let (told, reason) = (ro.final_outcome, ro.reason.clone());
            let reason = Some(format!(
                "{}; the way back to revision {} was abandoned by request",
                reason.unwrap_or_default(),
                ro.to_revision
            ));
            self.end_rollout(name, told, reason);
            let m = self
                .modules
                .get(name)
                .ok_or_else(|| module_not_found(name))?;
            return Ok(json!({ "module": render::summary(m) }));
        }
        match action {
            Action::Pause if draining => {
                return Err(invalid_input(format!(
                    "the rollout of {name} to revision {} is draining: every new replica is \
                     ready and the old ones are stopping; `emberctl rollout abort {name}` \
                     brings them back",
                    ro.to_revision
                )))
            }
            Action::Pause | Action::Abort if !before_takeover => {
                return Err(invalid_input(format!(
                    "the rollout of {name} to revision {} is past its takeover ({}); \
                     use `emberctl rollback {name}` to go back",
                    ro.to_revision,
                    ro.phase.as_str()
                )))
            }
            Action::Pause => {
                ro.paused = true;
                tracing::info!(module = name, "rollout paused");
            }
            Action::Resume => {
                ro.paused = false;
                ro.params.pause_after = None;
                tracing::info!(module = name, "rollout resumed");
            }
            Action::Abort => {
                self.abort(name, "aborted by request".into());
                let m = self
                    .modules
                    .get(name)
                    .ok_or_else(|| module_not_found(name))?;
                return Ok(json!({ "module": render::summary(m) }));
            }
        }
        self.advance(name);
        let m = self
            .modules
            .get(name)
            .ok_or_else(|| module_not_found(name))?;
        Ok(json!({ "module": render::summary(m) }))
    }
}

/// Keeps the active revision, a rolling-out one, the [`HISTORY`] newest
/// that ran (superseded, rolled back: rollback targets) and the
/// [`HISTORY`]` / 2` newest that never took over (aborted, failed), so
/// failed attempts do not push the rollback targets out.
fn trim_history(revisions: &mut Vec<RevisionRecord>) {
    let (mut ran, mut never) = (0, 0);
    revisions.retain(|v| match v.outcome {
        Outcome::Active | Outcome::RollingOut => true,
        Outcome::Superseded | Outcome::RolledBack => {
            ran += 1;
            ran <= HISTORY
        }
        Outcome::Aborted | Outcome::Failed => {
            never += 1;
            never <= HISTORY / 2
        }
    });
}

/// What a rollout starts from.
struct Spec {
    record: ModuleRecord,
    image: ArtifactImage,
    image_path: PathBuf,
    kind: Kind,
    overrides: Overrides,
    /// The artifact to store before the rollout is recorded (a deploy's).
    store: Option<NewArtifact>,
    reason: Option<String>,
}

/// Refuses a release while another is in progress or the module goes.
fn busy(name: &str, m: &Module) -> Result<(), ErrorReply> {
    if let Some(r) = &m.rollout {
        return Err(rollout_in_progress(name, r.to_revision, r.phase.as_str()));
    }
    if m.preparing {
        return Err(rollout_in_progress(name, 0, "preparing"));
    }
    if m.active().record.artifact_sha256.starts_with("pending-") {
        // Its install is not on disk yet: a rollout recorded before it
        // would be written without the module.
        return Err(rollout_in_progress(name, m.active().revision, "installing"));
    }
    if !m.uninstall.is_empty() {
        return Err(invalid_input(format!("{name} is being uninstalled")));
    }
    Ok(())
}
