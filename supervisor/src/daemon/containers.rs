//! Containers: the instances the containerd shim asks for
//! (`RunContainer` and its siblings, see `control/container.rs`). A
//! container's instance goes through the install pipeline's read and
//! checks (manifest, artifact, sandbox, uid, listeners), but it is not
//! recorded in the desired state (lost when emberd restarts: the shim sees
//! it exit), runs exactly one replica, is never restarted by emberd, writes
//! its output where the shim said and joins the pod's network namespace.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::sync::watch;

use super::actor::{to_value, Actor, Progress, Reply, Response};
use super::os::ContainerIo;
use super::pipeline::{
    bind_error, image_for_run, image_of, read_input, Input, Listeners, Pending, UidQuery,
};
use crate::config::{manifest_with_memory, LimitSource};
use crate::control::container::{
    conflict, instance_name, not_found, rfc3339_now, ContainerExit, ContainerStatusReply,
    KillContainer, RunContainer, RunContainerReply, UpdateContainer,
};
use crate::control::install::InstallError;
use crate::control::invalid_input;
use crate::error_chain;
use crate::fscred::Credentials;
use crate::lifecycle::{ExitStatus, Lifecycle, State};
use crate::store::{self as store, ModuleRecord};
use crate::varlink::ErrorReply;
use crate::zygote::client::pidfd_signal;

/// The containers emberd runs, by containerd id.
pub(super) type Containers = HashMap<String, Container>;

/// One container.
pub(super) struct Container {
    /// Its instance's name (the module's key).
    pub name: String,
    /// Its run's generation; 0 while its files are read.
    pub generation: u64,
    /// The `RunContainer` caller, until the instance is ready or failed.
    pub started: Option<Reply>,
    /// How its worker ended, once it did.
    pub exit: Option<ContainerExit>,
    /// The last worker exit seen.
    pub status: Option<ExitStatus>,
    /// A memory limit killed it.
    pub oom: bool,
    /// `WaitContainer` callers.
    pub waiters: Vec<Reply>,
    /// `RemoveContainer` callers: it goes once stopped.
    pub removing: Vec<Reply>,
    /// Labels from `RunContainer`.
    pub labels: BTreeMap<String, String>,
    /// The uid its worker runs as, once allocated (from its instance
    /// name: no two containers, and no container and installed module,
    /// share one).
    pub uid: Option<u32>,
}

/// A `RunContainer` whose files were read on the blocking pool.
pub(crate) struct ContainerRead {
    req: RunContainer,
    input: Result<Input, InstallError>,
    io: Result<ContainerIo, ErrorReply>,
    /// With a network namespace: the manifest's listeners, bound in it.
    bound: Option<Result<Vec<crate::listeners::Bound>, ErrorReply>>,
}

/// Binds `specs` in the network namespace behind `netns`, on a thread of
/// its own (`setns` moves only the calling thread), so the module's
/// listeners are on the pod's addresses, as its code will be.
fn bind_in_netns(
    netns: &OwnedFd,
    specs: &[crate::manifest::ListenerSpec],
) -> Result<Vec<crate::listeners::Bound>, ErrorReply> {
    let fd = netns
        .try_clone()
        .map_err(|e| invalid_input(format!("netns: {e}")))?;
    let specs = specs.to_vec();
    std::thread::spawn(move || {
        // SAFETY: `fd` is an open namespace descriptor; this thread is ours
        // and ends right after.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(invalid_input(format!(
                "cannot enter the network namespace to bind the listeners: {}",
                std::io::Error::last_os_error()
            )));
        }
        crate::listeners::bind_all(&specs).map_err(|e| bind_error(e).into())
    })
    .join()
    .unwrap_or_else(|_| Err(invalid_input("binding the listeners panicked")))
}

/// Whether a control client of uid `uid` may call the container methods:
/// only root and emberd's own uid (the containerd shim runs as root). They
/// name files emberd opens (the output paths, the network namespace) and
/// make instances that no desired state records, so the allow list's other
/// clients (`allowed_uids`, `allowed_gids`) are refused them.
pub(super) fn may_drive_containers(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// `PermissionDenied` for a client refused the container methods.
pub(super) fn containers_denied(uid: u32) -> ErrorReply {
    ErrorReply::new(
        crate::control::errors::PERMISSION_DENIED,
        json!({
            "uid": uid,
            "reason": "the container methods are only for root and emberd's own uid \
                       (the containerd shim)",
        }),
    )
}

/// NSFS_MAGIC: the filesystem of `/proc/PID/ns/*` and bind mounts of them.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Opens a container's output path for writing: a FIFO without a reader
/// fails at once (`O_NONBLOCK`, cleared after), a missing file is created.
fn open_output(field: &str, path: &Path) -> Result<OwnedFd, ErrorReply> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::ENXIO) {
                "it is a FIFO nobody reads".to_owned()
            } else if e.raw_os_error() == Some(libc::ELOOP) {
                "it is a symbolic link (not followed)".to_owned()
            } else {
                e.to_string()
            };
            invalid_input(format!("cannot open {field} {}: {why}", path.display()))
        })?;
    let fd: OwnedFd = f.into();
    // SAFETY: fcntl on a descriptor we own, with plain flag arguments.
    let cleared = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(invalid_input(format!(
            "cannot use {field} {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(fd)
}

/// Opens a network namespace file and checks it is one. With another
/// client's rights (see [`open_io`]) an open that fails says only that it
/// failed, never whether the file exists.
fn open_netns(path: &Path) -> Result<OwnedFd, ErrorReply> {
    let refuse = |why: String| invalid_input(format!("netns {}: {why}", path.display()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match crate::fscred::acting_for() {
            Some(uid) => refuse(format!("cannot be opened with the rights of uid {uid}")),
            None => refuse(e.to_string()),
        })?;
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into the statfs we own, for an open descriptor.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } != 0 {
        return Err(refuse(std::io::Error::last_os_error().to_string()));
    }
    if st.f_type as i64 != NSFS_MAGIC {
        return Err(refuse(
            "not a namespace file (/proc/PID/ns/net or /var/run/netns/NAME)".into(),
        ));
    }
    Ok(f.into())
}

/// Opens a container's output files and network namespace with the rights
/// of `peer`, the client that named them (as `Install` reads its files):
/// emberd's own rights never create or join what the client could not.
/// The output files are opened without following a symbolic link.
fn open_io(req: &RunContainer, peer: &Credentials) -> Result<ContainerIo, ErrorReply> {
    let rights = |e: crate::fscred::SwitchError| invalid_input(e.to_string());
    crate::fscred::with_rights(peer, || {
        Ok(ContainerIo {
            stdout: req
                .stdout
                .as_deref()
                .map(|p| open_output("stdout", p))
                .transpose()?,
            stderr: req
                .stderr
                .as_deref()
                .map(|p| open_output("stderr", p))
                .transpose()?,
            netns: req.netns.as_deref().map(open_netns).transpose()?,
        })
    })
    .map_err(rights)?
}

/// How an exit is reported: status, signal, reason.
fn exit_of(status: Option<ExitStatus>, oom: bool) -> ContainerExit {
    let (exit_status, signal, reason) = match status {
        Some(ExitStatus::Code(c)) => (c, None, "exited"),
        Some(ExitStatus::Signal(s)) => (128 + s, Some(s), "signaled"),
        Some(ExitStatus::Unknown) | None => (255, None, "exited"),
    };
    ContainerExit {
        exit_status,
        signal,
        reason: if oom { "oom" } else { reason },
        exited_at: rfc3339_now(),
    }
}

impl Actor {
    /// Whether `name` is a container's instance.
    pub(super) fn is_container(&self, name: &str) -> bool {
        self.containers.values().any(|c| c.name == name)
    }

    fn container_id(&self, name: &str, generation: u64) -> Option<String> {
        self.containers
            .iter()
            .find(|(_, c)| c.name == name && c.generation == generation)
            .map(|(id, _)| id.clone())
    }

    /// `RunContainer`: reserves the id, then reads the files off the actor.
    pub(super) fn run_container(
        &mut self,
        req: RunContainer,
        reply: Reply,
        peer: Arc<Credentials>,
    ) {
        let name = instance_name(&req.id);
        if self.containers.contains_key(&req.id) {
            let _ = reply.send(Err(conflict(&req.id, "a container of that id exists")));
            return;
        }
        // As installs: a read that never ends holds a blocking thread.
        if self.reads_in_flight >= super::pipeline::MAX_READS {
            let _ = reply.send(Err(invalid_input(format!(
                "{} installs, deploys or containers are still reading their files; \
                 try again when one has finished",
                super::pipeline::MAX_READS
            ))));
            return;
        }
        if self.modules.contains_key(&name) || self.is_container(&name) {
            let _ = reply.send(Err(conflict(
                &req.id,
                format!("an instance named {name} exists"),
            )));
            return;
        }
        self.containers.insert(
            req.id.clone(),
            Container {
                name,
                generation: 0,
                started: Some(reply),
                exit: None,
                status: None,
                oom: false,
                waiters: Vec::new(),
                removing: Vec::new(),
                labels: req.labels.clone().unwrap_or_default(),
                uid: None,
            },
        );
        self.reads_in_flight += 1;
        let caps = self.install_caps.clone();
        let q = UidQuery {
            sandbox: self.sandbox.clone(),
            recorded: self.recorded_uids(),
            known: self.known_images(),
            uid_key: Some(instance_name(&req.id)),
        };
        let pending = self.pending_tx.clone();
        tokio::spawn(async move {
            let r = req.clone();
            let read = tokio::task::spawn_blocking(move || {
                let io = open_io(&r, &peer);
                let input = read_input(&r.path, None, &peer, &caps, &q);
                let bound = match (&input, &io) {
                    (
                        Ok(i),
                        Ok(ContainerIo {
                            netns: Some(ns), ..
                        }),
                    ) if !i.summary.listeners.is_empty() => {
                        Some(bind_in_netns(ns, &i.summary.listeners))
                    }
                    _ => None,
                };
                (input, io, bound)
            })
            .await;
            let (input, io, bound) = match read {
                Ok(v) => v,
                Err(e) => (
                    Err(InstallError::Relative {
                        path: req.path.clone(),
                    }),
                    Err(invalid_input(e.to_string())),
                    None,
                ),
            };
            let _ = pending.send(Pending::Container(Box::new(ContainerRead {
                req,
                input,
                io,
                bound,
            })));
        });
    }

    /// A `RunContainer`'s files are read: start its instance, or answer why
    /// not.
    pub(super) fn container_read(&mut self, read: ContainerRead) {
        let ContainerRead {
            req,
            input,
            io,
            bound,
        } = read;
        self.reads_in_flight = self.reads_in_flight.saturating_sub(1);
        let id = req.id.clone();
        let Some(c) = self.containers.get_mut(&id) else {
            return;
        };
        let Some(reply) = c.started.take() else {
            return;
        };
        let fail = |me: &mut Self, reply: Reply, e: ErrorReply| {
            me.containers.remove(&id);
            let _ = reply.send(Err(e));
        };
        if self.shutting_down() {
            return fail(
                self,
                reply,
                ErrorReply::new(crate::control::errors::SHUTTING_DOWN, json!({})),
            );
        }
        let (input, io, bound) = match (input, io, bound.transpose()) {
            (Ok(i), Ok(io), Ok(b)) => (i, io, b),
            (Err(e), _, _) => return fail(self, reply, e.into()),
            (_, Err(e), _) | (_, _, Err(e)) => return fail(self, reply, e),
        };
        match self.start_container(&req, input, io, bound) {
            Ok(generation) => {
                if let Some(c) = self.containers.get_mut(&id) {
                    c.generation = generation;
                    c.started = Some(reply);
                }
                self.settle_containers();
            }
            Err(e) => fail(self, reply, e.into()),
        }
    }

    fn start_container(
        &mut self,
        req: &RunContainer,
        input: Input,
        io: ContainerIo,
        bound: Option<Vec<crate::listeners::Bound>>,
    ) -> Result<u64, InstallError> {
        let name = instance_name(&req.id);
        let Input {
            manifest_path,
            text,
            summary,
            artifact,
            image,
            uids,
        } = input;
        if self.modules.contains_key(&name) {
            return Err(InstallError::AlreadyInstalled {
                name,
                version: summary.version,
            });
        }
        self.check_sandbox(&manifest_path, &text)?;
        // From the instance name, not the manifest's: a manifest naming
        // an installed module must not get its uid, nor two containers of
        // one module share one.
        let uid = self.allocate_uid(&name, &uids)?;
        if let Some(c) = self.containers.get_mut(&req.id) {
            c.uid = Some(uid);
        }
        // In the pod's network namespace when there is one (bound while
        // the files were read), else in emberd's.
        let bound = match bound {
            Some(b) => b,
            None => crate::listeners::bind_all(&summary.listeners).map_err(bind_error)?,
        };
        self.next_placeholder += 1;
        let record = ModuleRecord {
            name: name.clone(),
            version: summary.version.clone(),
            artifact_sha256: store::placeholder(self.next_placeholder),
            manifest: text.clone(),
            source: manifest_path,
            revision: 1,
            revisions: Vec::new(),
            uid: Some(uid),
        };
        let (image_tx, image_rx) = watch::channel(None);
        let mut run = self.new_run(
            record,
            (image_rx, artifact.clone()),
            Ok(Listeners::bound(bound)),
        );
        let generation = run.generation;
        // One replica, never restarted by emberd.
        let policy = self.policy_for(Some(&summary));
        run.replicas = vec![Lifecycle::new(name.clone(), policy, Instant::now())
            .observed(self.events.replica_observer(name.clone(), 1, 0))
            .without_restart()];
        run.wanted = vec![false];
        if let Some(bytes) = req.memory_max {
            run.limits.memory = Some(bytes);
            run.limit_sources.memory = LimitSource::Container;
            run.launch_manifest = manifest_with_memory(&text, bytes).unwrap_or(text);
        }
        if let Some(cores) = req.cpu {
            run.limits.cpu = Some(cores);
            run.limit_sources.cpu = LimitSource::Container;
        }
        run.container = Some(Arc::new(io));
        tracing::info!(container = %req.id, module = %summary.name, instance = %name, "container");
        let pending = self.pending_tx.clone();
        tokio::spawn(async move {
            let made = image_of(image, &artifact).await;
            image_for_run(&image_tx, &pending, name, generation, made, "artifact copy");
        });
        self.add_and_start(run);
        Ok(generation)
    }

    /// Notes what happened to a container's worker (called with every
    /// instance event, before the lifecycle sees it).
    pub(super) fn container_event(
        &mut self,
        module: &str,
        generation: u64,
        event: &crate::lifecycle::Event,
    ) {
        use crate::lifecycle::Event;
        let Some(id) = self.container_id(module, generation) else {
            return;
        };
        let Some(c) = self.containers.get_mut(&id) else {
            return;
        };
        match event {
            Event::Exited { status, .. } => c.status = Some(*status),
            Event::Failed { oom: true, .. } => c.oom = true,
            _ => {}
        }
    }

    /// Answers the callers waiting on containers whose instance is ready or
    /// gone, and removes those asked to go once they are stopped. Called
    /// after every message the actor handles.
    pub(super) fn settle_containers(&mut self) {
        if self.containers.is_empty() {
            return;
        }
        let ids: Vec<String> = self.containers.keys().cloned().collect();
        for id in ids {
            let Some(c) = self.containers.get(&id) else {
                continue;
            };
            if c.generation == 0 {
                continue; // its files are being read
            }
            let l = self
                .modules
                .get(&c.name)
                .and_then(|m| m.run(c.generation))
                .and_then(|r| r.replicas.first());
            let (state, pid, reason) = match l {
                Some(l) => (
                    l.state(),
                    l.pid(),
                    l.reason().or(l.last_error()).map(str::to_owned),
                ),
                None => (State::Stopped, None, None),
            };
            let over = matches!(state, State::Stopped | State::Failed);
            let Some(c) = self.containers.get_mut(&id) else {
                continue;
            };
            if over && c.exit.is_none() {
                c.exit = Some(exit_of(c.status, c.oom));
            }
            if let Some(reply) = c.started.take() {
                match (state, pid) {
                    (State::Running, Some(pid)) => {
                        let _ = reply.send(Ok(Response::Value(to_value(RunContainerReply {
                            name: c.name.clone(),
                            pid,
                        }))));
                    }
                    _ if over => {
                        let why = reason.unwrap_or_else(|| "stopped before it was ready".into());
                        let _ = reply.send(Err(invalid_input(format!(
                            "container {id} did not start: {why}"
                        ))));
                    }
                    _ => c.started = Some(reply),
                }
            }
            if let Some(exit) = c.exit.clone() {
                for w in c.waiters.drain(..) {
                    let _ = w.send(Ok(Response::Value(to_value(exit.clone()))));
                }
            }
            if over && !c.removing.is_empty() {
                self.remove_container_now(&id);
            }
        }
    }

    fn remove_container_now(&mut self, id: &str) {
        let Some(mut c) = self.containers.remove(id) else {
            return;
        };
        if let Some(mut m) = self.modules.remove(&c.name) {
            for run in &mut m.runs {
                // Listeners close when the last launch task lets go.
                run.listeners.clear();
                for (p, id) in run.unix_paths.drain(..) {
                    crate::listeners::unlink_own(&p, id);
                }
            }
        }
        let _ = std::fs::remove_file(self.store.log_path(&c.name));
        tracing::info!(container = %id, instance = %c.name, "container removed");
        self.events.emit(super::events::Event::Uninstalled {
            module: c.name.clone(),
        });
        for r in c.removing.drain(..) {
            let _ = r.send(Ok(Response::Value(json!({}))));
        }
        for w in c.waiters.drain(..) {
            let _ = w.send(Err(not_found(id)));
        }
    }

    fn live_pid(&self, c: &Container) -> Option<i32> {
        self.modules
            .get(&c.name)
            .and_then(|m| m.run(c.generation))
            .and_then(|r| r.replicas.first())
            .and_then(Lifecycle::pid)
    }

    /// `WaitContainer`.
    pub(super) fn wait_container(&mut self, id: String, reply: Reply, progress: Option<Progress>) {
        let Some(c) = self.containers.get_mut(&id) else {
            let _ = reply.send(Err(not_found(&id)));
            return;
        };
        if let Some(p) = progress {
            // Subscribed; the final reply comes with the exit.
            let _ = p.send(json!({}));
        }
        c.waiters.push(reply);
        self.settle_containers();
    }

    /// `KillContainer`.
    pub(super) fn kill_container(&mut self, req: KillContainer) -> Result<(), ErrorReply> {
        let KillContainer { id, signal } = req;
        let c = self.containers.get(&id).ok_or_else(|| not_found(&id))?;
        if !(1..=64).contains(&signal) {
            return Err(invalid_input(format!(
                "signal {signal} is not a signal number"
            )));
        }
        if c.exit.is_some() {
            return Ok(());
        }
        let name = c.name.clone();
        let pid = self.live_pid(c);
        match (signal, pid) {
            (libc::SIGTERM | libc::SIGINT, _) | (libc::SIGKILL, None) => {
                // Graceful: the module's stop deadline, then SIGKILL.
                self.stop_module(&name);
            }
            (_, Some(pid)) => {
                let fd = self.os.pidfds.get(&pid).ok_or_else(|| {
                    invalid_input(format!("container {id} has no worker to signal"))
                })?;
                pidfd_signal(fd.as_fd(), signal)
                    .map_err(|e| invalid_input(format!("signal {signal}: {e}")))?;
            }
            (_, None) => {
                return Err(invalid_input(format!(
                    "container {id} has no worker to signal yet"
                )))
            }
        }
        Ok(())
    }

    /// `RemoveContainer`: kills it if it still runs, then forgets it.
    pub(super) fn remove_container(&mut self, id: String, reply: Reply) {
        let Some(c) = self.containers.get_mut(&id) else {
            let _ = reply.send(Err(not_found(&id)));
            return;
        };
        if c.generation == 0 {
            let _ = reply.send(Err(invalid_input(format!(
                "container {id} is still starting"
            ))));
            return;
        }
        c.removing.push(reply);
        let name = c.name.clone();
        if let Some(pid) = self.live_pid(&self.containers[&id]) {
            if let Some(fd) = self.os.pidfds.get(&pid) {
                let _ = pidfd_signal(fd.as_fd(), libc::SIGKILL);
            }
        }
        self.stop_module(&name);
        self.settle_containers();
    }

    /// `ContainerStatus`.
    pub(super) fn container_status(&self, id: &str) -> Result<ContainerStatusReply, ErrorReply> {
        let c = self.containers.get(id).ok_or_else(|| not_found(id))?;
        let state = self
            .modules
            .get(&c.name)
            .and_then(|m| m.run(c.generation))
            .map_or(State::Starting, |r| r.state());
        let state = match (&c.exit, state) {
            (Some(_), _) => "exited",
            (None, State::Running) => "running",
            (None, State::Stopping) => "stopping",
            (None, _) => "starting",
        };
        Ok(ContainerStatusReply {
            name: c.name.clone(),
            state,
            pid: self.live_pid(c),
            exit_status: c.exit.as_ref().map(|e| e.exit_status),
            reason: c.exit.as_ref().map(|e| e.reason),
            labels: c.labels.clone(),
        })
    }

    /// `UpdateContainer`: the run's limits for its next launch, and the
    /// running worker's cgroup.
    pub(super) fn update_container(&mut self, req: UpdateContainer, reply: Reply) {
        let Some(c) = self.containers.get(&req.id) else {
            let _ = reply.send(Err(not_found(&req.id)));
            return;
        };
        let (name, generation) = (c.name.clone(), c.generation);
        let pid = self.live_pid(c);
        let Some(run) = self
            .modules
            .get_mut(&name)
            .and_then(|m| m.run_mut(generation))
        else {
            let _ = reply.send(Err(invalid_input(format!(
                "container {} is still starting",
                req.id
            ))));
            return;
        };
        if let Some(bytes) = req.memory_max {
            run.limits.memory = Some(bytes);
            run.limit_sources.memory = LimitSource::Container;
        }
        if let Some(cores) = req.cpu {
            run.limits.cpu = Some(cores);
            run.limit_sources.cpu = LimitSource::Container;
        }
        let limits = crate::cgroup::Limits {
            memory: req.memory_max,
            cpu: req.cpu,
            open_files: None,
        };
        let limiter = self.os.limiter.clone();
        tokio::spawn(async move {
            let r = match pid {
                Some(pid) => {
                    tokio::task::spawn_blocking(move || limiter.update(&name, 0, pid, &limits))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| error_chain(&e)))
                }
                None => Ok(()),
            };
            let _ = reply.send(
                r.map(|()| Response::Value(json!({})))
                    .map_err(|e| invalid_input(format!("cannot apply the limits: {e}"))),
            );
        });
    }

    /// `Uninstall` and `Deploy` leave a container's instance to its runtime.
    pub(super) fn refuse_container(&self, name: &str) -> Result<(), ErrorReply> {
        if self.is_container(name) {
            return Err(invalid_input(format!(
                "{name} is a container's instance; its container runtime removes it"
            )));
        }
        Ok(())
    }
}
