//! The containerd task service: each container of the pod is an Ember
//! instance in emberd (RunContainer & co.); the pod sandbox runs nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics::{
    TASK_CREATE_EVENT_TOPIC, TASK_DELETE_EVENT_TOPIC, TASK_EXIT_EVENT_TOPIC, TASK_OOM_EVENT_TOPIC,
    TASK_START_EVENT_TOPIC,
};
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Context, ExitSignal, TtrpcContext, TtrpcResult};
use log::{debug, error, info, warn};

use crate::client::{Client, ClientError, Exited, RunParams};
use crate::spec::{self, Network};
use crate::time;

/// Where a container is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    /// RunContainer is in flight.
    Starting,
    Running,
    Stopped,
}

#[derive(Debug)]
enum Kind {
    /// The pod sandbox: no process; its network namespace (None: host).
    Sandbox { netns: Option<String> },
    /// An app container: what RunContainer gets; `rootfs` mounted by us.
    App { params: RunParams, rootfs: PathBuf },
}

#[derive(Debug)]
struct Ctr {
    bundle: String,
    kind: Kind,
    stdout: String,
    stderr: String,
    status: Status,
    pid: u32,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    /// emberd has (or had) an instance for it.
    in_emberd: bool,
    /// A signal that came while RunContainer was in flight.
    pending_signal: Option<u32>,
}

/// An event for containerd, with an optional "published" acknowledgement.
struct Outgoing {
    topic: &'static str,
    event: Box<dyn MessageDyn>,
    ack: Option<SyncSender<()>>,
}

struct Inner {
    socket: PathBuf,
    shim_pid: u32,
    containers: Mutex<HashMap<String, Ctr>>,
    changed: Condvar,
    events: Mutex<Sender<Outgoing>>,
    exit: Arc<ExitSignal>,
}

/// The task service of one shim (one pod).
#[derive(Clone)]
pub struct EmberTask {
    inner: Arc<Inner>,
}

fn status_err(code: Code, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, format!("ember: {msg}")))
}

fn emberd_err(what: &str, e: ClientError) -> ttrpc::Error {
    let code = match (&e, e.remote_name()) {
        (_, Some("ModuleNotFound")) => Code::NOT_FOUND,
        (_, Some("InvalidInput" | "InvalidManifest")) => Code::INVALID_ARGUMENT,
        (_, Some("Conflict")) => Code::ALREADY_EXISTS,
        (ClientError::Connect { .. }, _) => Code::UNAVAILABLE,
        _ => Code::INTERNAL,
    };
    status_err(code, format!("{what}: {e}"))
}

fn unimplemented(what: &str) -> ttrpc::Error {
    status_err(
        Code::UNIMPLEMENTED,
        format!(
            "{what} is not supported: an Ember module runs in a warm worker of emberd, not in a \
             container with its own processes or a shell"
        ),
    )
}

impl EmberTask {
    /// A task service publishing its events through `publisher`.
    pub fn new(
        namespace: &str,
        socket: PathBuf,
        exit: Arc<ExitSignal>,
        publisher: Option<RemotePublisher>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Outgoing>();
        let ns = namespace.to_string();
        thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                for o in rx {
                    if let Some(p) = &publisher {
                        if let Err(e) = p.publish(Context::default(), o.topic, &ns, o.event) {
                            error!("publishing {} failed: {e}", o.topic);
                        }
                    }
                    if let Some(ack) = o.ack {
                        let _ = ack.send(());
                    }
                }
            })
            .expect("spawn the event forwarder");
        Self {
            inner: Arc::new(Inner {
                socket,
                shim_pid: std::process::id(),
                containers: Mutex::new(HashMap::new()),
                changed: Condvar::new(),
                events: Mutex::new(tx),
                exit,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Ctr>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>, wait: bool) {
        let (ack, done) = if wait {
            let (a, d) = mpsc::sync_channel(1);
            (Some(a), Some(d))
        } else {
            (None, None)
        };
        let sent = self
            .inner
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Outgoing { topic, event, ack });
        if sent.is_ok() {
            if let Some(d) = done {
                let _ = d.recv();
            }
        }
    }

    fn client(&self) -> Result<Client, ClientError> {
        Client::connect(&self.inner.socket)
    }

    /// Watches a started container in emberd until its worker exits.
    fn watch(&self, id: String) {
        let this = self.clone();
        let spawned = thread::Builder::new()
            .name(format!("wait-{}", &id[..id.len().min(8)]))
            .spawn(move || {
                let exited = this.wait_in_emberd(&id);
                this.exited(&id, exited);
            });
        if let Err(e) = spawned {
            error!("cannot watch a container: {e}");
        }
    }

    fn wait_in_emberd(&self, id: &str) -> Exited {
        let mut broken_since: Option<std::time::Instant> = None;
        loop {
            let r = self.client().and_then(|mut c| c.wait_container(id));
            match r {
                Ok(e) => return e,
                Err(e @ (ClientError::Connect { .. } | ClientError::Io { .. })) => {
                    // emberd restarting: it forgets containers, and the
                    // next WaitContainer says so (ModuleNotFound).
                    let since = *broken_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > Duration::from_secs(30) {
                        error!(
                            "container {id}: emberd unreachable for 30 s, taking it as exited: {e}"
                        );
                        return lost(&e);
                    }
                    warn!("container {id}: waiting in emberd failed ({e}); retrying");
                    thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    error!("container {id}: emberd lost it: {e}");
                    return lost(&e);
                }
            }
        }
    }

    /// A container's worker exited: OOM event first (CRI's reason comes
    /// only from it), then the state Wait answers, then the exit event.
    fn exited(&self, id: &str, e: Exited) {
        info!(
            "container {id} exited: status {} ({}{})",
            e.exit_status,
            e.reason,
            e.signal
                .map(|s| format!(", signal {s}"))
                .unwrap_or_default()
        );
        if e.reason == "oom" {
            let ev = TaskOOM {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish(TASK_OOM_EVENT_TOPIC, Box::new(ev), true);
        }
        let exited_at = time::parse_rfc3339(&e.exited_at).unwrap_or_else(time::now);
        let exit_status = u32::try_from(e.exit_status).unwrap_or(255);
        let pid = {
            let mut map = self.lock();
            let Some(c) = map.get_mut(id) else { return };
            if c.status == Status::Stopped {
                return;
            }
            c.status = Status::Stopped;
            c.exit_status = exit_status;
            c.exited_at = Some(exited_at.clone());
            self.inner.changed.notify_all();
            c.pid
        };
        let ev = TaskExit {
            container_id: id.to_string(),
            id: id.to_string(),
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        };
        self.publish(TASK_EXIT_EVENT_TOPIC, Box::new(ev), false);
    }

    /// Stops a container that runs nothing here (a sandbox, or an app
    /// container not started): `status` and the exit event.
    fn stop_locally(&self, map: &mut HashMap<String, Ctr>, id: &str, exit_status: u32) {
        let Some(c) = map.get_mut(id) else { return };
        if c.status == Status::Stopped {
            return;
        }
        let now = time::now();
        c.status = Status::Stopped;
        c.exit_status = exit_status;
        c.exited_at = Some(now.clone());
        self.inner.changed.notify_all();
        let ev = TaskExit {
            container_id: id.to_string(),
            id: id.to_string(),
            pid: c.pid,
            exit_status,
            exited_at: MessageField::some(now),
            ..Default::default()
        };
        self.publish(TASK_EXIT_EVENT_TOPIC, Box::new(ev), false);
    }

    fn create_app(&self, req: &api::CreateTaskRequest, s: spec::BundleSpec) -> TtrpcResult<Ctr> {
        let netns = {
            let map = self.lock();
            let sandbox = s
                .sandbox_id
                .as_ref()
                .and_then(|sid| map.get(sid))
                .and_then(|c| match &c.kind {
                    Kind::Sandbox { netns } => Some(netns.as_deref()),
                    Kind::App { .. } => None,
                });
            spec::container_netns(&s.network, self.inner.shim_pid, sandbox)
                .map_err(|e| status_err(Code::INVALID_ARGUMENT, e))?
        };
        let rootfs = Path::new(&req.bundle).join("rootfs");
        mount_rootfs(&req.rootfs, &rootfs)?;
        if !rootfs.join("module.toml").is_file() {
            unmount(&rootfs);
            return Err(status_err(
                Code::INVALID_ARGUMENT,
                format!(
                    "the image of container {} has no module.toml at its root: the ember runtime \
                     runs Ember module images (made with `emberctl pack`)",
                    req.id
                ),
            ));
        }
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let params = RunParams {
            id: req.id.clone(),
            path: rootfs.display().to_string(),
            netns,
            memory_max: s.limits.memory_max,
            cpu: s.limits.cpu,
            stdout: some(&req.stdout),
            stderr: some(&req.stderr),
            labels: s.labels,
        };
        Ok(Ctr {
            bundle: req.bundle.clone(),
            kind: Kind::App { params, rootfs },
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            status: Status::Created,
            pid: 0,
            exit_status: 0,
            exited_at: None,
            in_emberd: false,
            pending_signal: None,
        })
    }
}

fn lost(e: &ClientError) -> Exited {
    Exited {
        exit_status: 255,
        signal: None,
        reason: format!("lost: {e}"),
        exited_at: String::new(),
    }
}

/// Mounts the image's root filesystem (containerd's snapshot mounts) at `target`.
fn mount_rootfs(mounts: &[containerd_shim::protos::api::Mount], target: &Path) -> TtrpcResult<()> {
    std::fs::create_dir_all(target).map_err(|e| {
        status_err(
            Code::INTERNAL,
            format!("cannot create {}: {e}", target.display()),
        )
    })?;
    for (i, m) in mounts.iter().enumerate() {
        let ty = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        if let Err(e) = containerd_shim::mount::mount_rootfs(ty, source, &m.options, target) {
            if i > 0 {
                unmount(target);
            }
            return Err(status_err(
                Code::INTERNAL,
                format!(
                    "cannot mount the image ({} {}) at {}: {e}",
                    m.type_,
                    m.source,
                    target.display()
                ),
            ));
        }
    }
    Ok(())
}

fn unmount(target: &Path) {
    let t = target.display().to_string();
    if let Err(e) = containerd_shim::mount::umount_recursive(Some(&t), libc::MNT_DETACH) {
        warn!("unmounting {t}: {e}");
    }
}

fn ts(t: &Option<Timestamp>) -> MessageField<Timestamp> {
    match t {
        Some(t) => MessageField::some(t.clone()),
        None => MessageField::none(),
    }
}

impl containerd_shim::Task for EmberTask {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        debug!("create {} bundle {}", req.id, req.bundle);
        if req.terminal {
            return Err(status_err(
                Code::INVALID_ARGUMENT,
                "a terminal (tty) is not supported: a module's output goes to its stdout/stderr",
            ));
        }
        if !req.stdin.is_empty() {
            // ctr gives every task a stdin FIFO; a module reads none.
            debug!("{}: stdin {} is not used", req.id, req.stdin);
        }
        if !req.checkpoint.is_empty() {
            return Err(unimplemented("restoring a checkpoint"));
        }
        if self.lock().contains_key(&req.id) {
            return Err(status_err(
                Code::ALREADY_EXISTS,
                format!("container {} exists in this shim", req.id),
            ));
        }
        let s = spec::read(Path::new(&req.bundle))
            .map_err(|e| status_err(Code::INVALID_ARGUMENT, e))?;
        let ctr = if s.sandbox {
            let netns = match &s.network {
                Network::Host => None,
                Network::Join(p) => Some(p.clone()),
                Network::New => return Err(status_err(
                    Code::INVALID_ARGUMENT,
                    "the pod sandbox asks for a new network namespace; CRI gives it one by path",
                )),
            };
            Ctr {
                bundle: req.bundle.clone(),
                kind: Kind::Sandbox { netns },
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                status: Status::Created,
                pid: self.inner.shim_pid,
                exit_status: 0,
                exited_at: None,
                in_emberd: false,
                pending_signal: None,
            }
        } else {
            self.create_app(&req, s)?
        };
        let pid = ctr.pid;
        {
            let mut map = self.lock();
            if map.contains_key(&req.id) {
                drop(map);
                if let Kind::App { rootfs, .. } = &ctr.kind {
                    unmount(rootfs);
                }
                return Err(status_err(
                    Code::ALREADY_EXISTS,
                    format!("container {} exists in this shim", req.id),
                ));
            }
            map.insert(req.id.clone(), ctr);
        }
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.publish(TASK_CREATE_EVENT_TOPIC, Box::new(ev), false);
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        if !req.exec_id.is_empty() {
            return Err(unimplemented("exec"));
        }
        let params = {
            let mut map = self.lock();
            let c = map
                .get_mut(&req.id)
                .ok_or_else(|| status_err(Code::NOT_FOUND, format!("no container {}", req.id)))?;
            if c.status != Status::Created {
                return Err(status_err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is {:?}, not created", req.id, c.status),
                ));
            }
            match &c.kind {
                Kind::Sandbox { .. } => {
                    c.status = Status::Running;
                    None
                }
                Kind::App { params, .. } => {
                    c.status = Status::Starting;
                    c.in_emberd = true;
                    Some(params.clone())
                }
            }
        };
        let pid = match params {
            None => self.inner.shim_pid,
            Some(params) => {
                let r = self.client().and_then(|mut c| c.run_container(&params));
                let mut map = self.lock();
                match r {
                    Ok(started) => {
                        info!(
                            "container {} runs as {} (pid {})",
                            req.id, started.name, started.pid
                        );
                        let pending = map.get_mut(&req.id).and_then(|c| {
                            c.status = Status::Running;
                            c.pid = started.pid;
                            c.pending_signal.take()
                        });
                        drop(map);
                        self.watch(req.id.clone());
                        if let Some(sig) = pending {
                            if let Err(e) = self
                                .client()
                                .and_then(|mut c| c.kill_container(&req.id, sig))
                            {
                                warn!("container {}: delivering signal {sig}: {e}", req.id);
                            }
                        }
                        started.pid
                    }
                    Err(e) => {
                        if let Some(c) = map.get_mut(&req.id) {
                            c.status = Status::Created;
                            c.in_emberd = matches!(e.remote_name(), Some("Conflict"));
                        }
                        return Err(emberd_err("starting the module", e));
                    }
                }
            }
        };
        let ev = TaskStart {
            container_id: req.id.clone(),
            pid,
            ..Default::default()
        };
        self.publish(TASK_START_EVENT_TOPIC, Box::new(ev), false);
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        if !req.exec_id.is_empty() {
            return Err(status_err(
                Code::NOT_FOUND,
                format!("no exec {}", req.exec_id),
            ));
        }
        let map = self.lock();
        let c = map
            .get(&req.id)
            .ok_or_else(|| status_err(Code::NOT_FOUND, format!("no container {}", req.id)))?;
        let status = match c.status {
            Status::Created | Status::Starting => api::Status::CREATED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: c.pid,
            status: status.into(),
            stdout: c.stdout.clone(),
            stderr: c.stderr.clone(),
            exit_status: c.exit_status,
            exited_at: ts(&c.exited_at),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        if !req.exec_id.is_empty() {
            return Err(status_err(
                Code::NOT_FOUND,
                format!("no exec {}", req.exec_id),
            ));
        }
        let mut map = self.lock();
        loop {
            let c = map
                .get(&req.id)
                .ok_or_else(|| status_err(Code::NOT_FOUND, format!("no container {}", req.id)))?;
            if c.status == Status::Stopped {
                return Ok(api::WaitResponse {
                    exit_status: c.exit_status,
                    exited_at: ts(&c.exited_at),
                    ..Default::default()
                });
            }
            map = self
                .inner
                .changed
                .wait(map)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        if !req.exec_id.is_empty() {
            return Err(status_err(
                Code::NOT_FOUND,
                format!("no exec {}", req.exec_id),
            ));
        }
        let mut map = self.lock();
        let c = map
            .get(&req.id)
            .ok_or_else(|| status_err(Code::NOT_FOUND, format!("no container {}", req.id)))?;
        match (&c.kind, c.status) {
            (_, Status::Stopped) => Ok(api::Empty::new()),
            // Runs nothing: a stop signal ends it as `pause` would end.
            (Kind::Sandbox { .. }, _) | (Kind::App { .. }, Status::Created) => {
                let status = match req.signal as i32 {
                    libc::SIGTERM | libc::SIGINT => 0,
                    s => 128 + s as u32,
                };
                self.stop_locally(&mut map, &req.id, status);
                Ok(api::Empty::new())
            }
            (Kind::App { .. }, Status::Starting) => {
                // Delivered once RunContainer has answered.
                if let Some(c) = map.get_mut(&req.id) {
                    c.pending_signal = Some(req.signal);
                }
                Ok(api::Empty::new())
            }
            (Kind::App { .. }, Status::Running) => {
                drop(map);
                match self
                    .client()
                    .and_then(|mut c| c.kill_container(&req.id, req.signal))
                {
                    Ok(()) => Ok(api::Empty::new()),
                    // Gone from emberd already: its watcher reports the exit.
                    Err(e) if e.remote_name() == Some("ModuleNotFound") => Ok(api::Empty::new()),
                    Err(e) => Err(emberd_err("signalling the module", e)),
                }
            }
        }
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            return Err(status_err(
                Code::NOT_FOUND,
                format!("no exec {}", req.exec_id),
            ));
        }
        let (in_emberd, rootfs) = {
            let map = self.lock();
            let c = map
                .get(&req.id)
                .ok_or_else(|| status_err(Code::NOT_FOUND, format!("no container {}", req.id)))?;
            let rootfs = match &c.kind {
                Kind::App { rootfs, .. } => Some(rootfs.clone()),
                Kind::Sandbox { .. } => None,
            };
            (c.in_emberd, rootfs)
        };
        if in_emberd {
            match self.client().and_then(|mut c| c.remove_container(&req.id)) {
                Ok(()) => {}
                Err(e) if e.remote_name() == Some("ModuleNotFound") => {}
                Err(e) => return Err(emberd_err("removing the module", e)),
            }
        }
        if let Some(rootfs) = rootfs {
            unmount(&rootfs);
        }
        let c = {
            let mut map = self.lock();
            let c = map
                .remove(&req.id)
                .ok_or_else(|| status_err(Code::NOT_FOUND, format!("no container {}", req.id)))?;
            // A Wait still blocked on it answers NotFound now.
            self.inner.changed.notify_all();
            c
        };
        let exited_at = c.exited_at.clone().unwrap_or_else(time::now);
        let ev = TaskDelete {
            container_id: req.id.clone(),
            id: req.id.clone(),
            pid: c.pid,
            exit_status: c.exit_status,
            exited_at: MessageField::some(exited_at.clone()),
            ..Default::default()
        };
        self.publish(TASK_DELETE_EVENT_TOPIC, Box::new(ev), false);
        Ok(api::DeleteResponse {
            pid: c.pid,
            exit_status: c.exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let map = self.lock();
        let c = map
            .get(&req.id)
            .ok_or_else(|| status_err(Code::NOT_FOUND, format!("no container {}", req.id)))?;
        let processes = match (&c.kind, c.status) {
            (Kind::App { .. }, Status::Running) => {
                vec![containerd_shim::protos::api::ProcessInfo {
                    pid: c.pid,
                    ..Default::default()
                }]
            }
            _ => Vec::new(),
        };
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let pid = {
            let map = self.lock();
            let c = map
                .get(&req.id)
                .ok_or_else(|| status_err(Code::NOT_FOUND, format!("no container {}", req.id)))?;
            if c.status != Status::Running {
                return Err(status_err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            c.pid
        };
        let metrics = containerd_shim::cgroup::get_cgroup(pid)
            .and_then(|cg| containerd_shim::cgroup::collect_metrics(&cg))
            .map_err(|e| status_err(Code::INTERNAL, format!("metrics of pid {pid}: {e}")))?;
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| status_err(Code::INTERNAL, e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let limits = match req.resources.as_ref() {
            Some(Any { value, .. }) if !value.is_empty() => {
                let v: serde_json::Value = serde_json::from_slice(value).map_err(|e| {
                    status_err(
                        Code::INVALID_ARGUMENT,
                        format!("resources are not JSON: {e}"),
                    )
                })?;
                spec::limits(&v).map_err(|e| status_err(Code::INVALID_ARGUMENT, e))?
            }
            _ => return Ok(api::Empty::new()),
        };
        {
            let mut map = self.lock();
            let c = map
                .get_mut(&req.id)
                .ok_or_else(|| status_err(Code::NOT_FOUND, format!("no container {}", req.id)))?;
            let running = c.status == Status::Running;
            match &mut c.kind {
                Kind::Sandbox { .. } => return Ok(api::Empty::new()),
                Kind::App { params, .. } if !running => {
                    // Not started yet: RunContainer takes the new limits.
                    params.memory_max = limits.memory_max.or(params.memory_max);
                    params.cpu = limits.cpu.or(params.cpu);
                    return Ok(api::Empty::new());
                }
                Kind::App { .. } => {}
            }
        }
        if limits.memory_max.is_none() && limits.cpu.is_none() {
            return Ok(api::Empty::new());
        }
        self.client()
            .and_then(|mut c| c.update_container(&req.id, limits.memory_max, limits.cpu))
            .map_err(|e| emberd_err("updating the limits", e))?;
        Ok(api::Empty::new())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.lock().get(&req.id).map(|c| c.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: self.inner.shim_pid,
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.lock().is_empty() {
            info!("no container left: shutting down");
            self.inner.exit.signal();
        }
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, _req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("exec"))
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("a terminal (resize)"))
    }

    fn close_io(&self, _ctx: &TtrpcContext, _req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // Only exec processes have stdin to close; containers take none.
        Ok(api::Empty::new())
    }

    fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("pause"))
    }

    fn resume(&self, _ctx: &TtrpcContext, _req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("resume"))
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("checkpoint"))
    }
}
