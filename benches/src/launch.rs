//! Driving module-runtime workers directly, without the supervisor, over
//! their real control sockets (`docs/abi.md` §4):
//!
//! - [`cold_start`]: the old way — a fresh process (this executable,
//!   re-executed with [`COLD_FLAG`]) initializes the plugin, then loads the
//!   module, until the module reports `Ready`;
//! - [`zygote_load`] + [`zygote_fork`]: this process as the single-threaded
//!   zygote (the floor for a launch: fork → dlopen → module init → reply).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use module_runtime::abi::GrantKind;
use module_runtime::host::{self, PluginSpec};
use module_runtime::protocol::{
    FromWorker, Grant, LaunchOrder, ParentChannel, SandboxOrder, State, ToWorker,
};
use module_runtime::transport::{self, LinkError};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The argument that turns this executable into a cold-start process:
/// `EXE --ember-cold-start PLUGIN CONFIG_TOML` with the control socket on
/// descriptor 3.
pub const COLD_FLAG: &str = "--ember-cold-start";

/// Starting or driving a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The process could not be started.
    #[error("cannot start the cold-start process")]
    Spawn(#[source] std::io::Error),
    /// The control socket failed.
    #[error("worker {pid}: {what}")]
    Channel {
        /// The worker.
        pid: u32,
        /// What we were waiting for.
        what: &'static str,
        /// Why.
        #[source]
        source: LinkError,
    },
    /// The worker reported a failure.
    #[error("worker {pid} failed: {message}")]
    Failed {
        /// The worker.
        pid: u32,
        /// Its report.
        message: String,
    },
    /// A grant could not be prepared.
    #[error("cannot prepare grants")]
    Grants(#[source] std::io::Error),
    /// Loading the plugins into this process failed.
    #[error("cannot load the base plugins")]
    Plugins(#[from] host::PluginError),
    /// The shared runtime of slim modules could not be loaded.
    #[error("cannot load the shared runtime of slim modules")]
    Runtime(#[source] host::RuntimeLibsError),
    /// Forking failed.
    #[error("cannot fork a worker")]
    Fork(#[from] host::ForkError),
    /// This process could not become its workers' reaper.
    #[error("cannot become a child subreaper")]
    Subreaper(#[source] nix::Error),
}

/// The base: the plugin every worker inherits, initialized.
#[derive(Debug, Clone)]
pub struct Base {
    /// Its `cdylib`.
    pub plugin: PathBuf,
    /// Its config.
    pub config: toml::Table,
}

impl Base {
    /// The catalog plugin with a `size_mb` table (and its default init work).
    pub fn catalog(profile: &Path, size_mb: u64) -> Self {
        let mut config = toml::Table::new();
        config.insert("size_mb".into(), (size_mb as i64).into());
        Self {
            plugin: crate::artifacts::cdylib(profile, "catalog"),
            config,
        }
    }
}

/// What to launch: the module and the grants to hand it.
#[derive(Debug, Clone)]
pub struct Order {
    /// The module `cdylib`.
    pub artifact: PathBuf,
    /// Its manifest text.
    pub manifest: String,
    /// Listener grants to bind on `127.0.0.1:0`.
    pub listeners: Vec<String>,
}

impl Order {
    fn grants(&self) -> std::io::Result<(Vec<Grant>, Vec<OwnedFd>)> {
        let mut grants = Vec::new();
        let mut fds = Vec::new();
        for name in &self.listeners {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            grants.push(Grant {
                kind: GrantKind::Listener,
                name: name.clone(),
            });
            fds.push(OwnedFd::from(l));
        }
        Ok((grants, fds))
    }
}

/// A worker process, a child of this process, driven over its control socket.
#[derive(Debug)]
pub struct Worker {
    pid: u32,
    chan: ParentChannel,
    reaped: bool,
}

impl Worker {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn channel(&self, what: &'static str) -> impl FnOnce(LinkError) -> LaunchError {
        let pid = self.pid;
        move |source| LaunchError::Channel { pid, what, source }
    }

    fn wait_idle(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .chan
                .recv_timeout(Some(left))
                .map_err(self.channel("Idle"))?
            {
                (FromWorker::Idle { .. }, _) => return Ok(()),
                (FromWorker::Failed(f), _) => {
                    return Err(LaunchError::Failed {
                        pid: self.pid,
                        message: f.to_string(),
                    })
                }
                _ => {}
            }
        }
    }

    /// Sends the launch order and waits for `Ready`.
    pub fn launch(&mut self, order: &Order, timeout: Duration) -> Result<(), LaunchError> {
        self.launch_sandboxed(order, None, timeout)
    }

    /// [`Worker::launch`] with the worker applying `sandbox` before it
    /// loads the module, as a worker of emberd's does
    /// ([`sandbox_like_emberd`]).
    pub fn launch_sandboxed(
        &mut self,
        order: &Order,
        sandbox: Option<SandboxOrder>,
        timeout: Duration,
    ) -> Result<(), LaunchError> {
        let (grants, fds) = order.grants().map_err(LaunchError::Grants)?;
        self.launch_granting(order, grants, fds, sandbox, timeout)
    }

    /// [`Worker::launch`], handing the worker copies of `listeners`
    /// (`(name, socket)`, e.g. one socket bound once and shared by several
    /// workers) instead of binding the order's listeners.
    pub fn launch_sharing(
        &mut self,
        order: &Order,
        listeners: &[(&str, BorrowedFd<'_>)],
        timeout: Duration,
    ) -> Result<(), LaunchError> {
        let mut grants = Vec::new();
        let mut fds = Vec::new();
        for (name, fd) in listeners {
            grants.push(Grant {
                kind: GrantKind::Listener,
                name: (*name).to_owned(),
            });
            fds.push(fd.try_clone_to_owned().map_err(LaunchError::Grants)?);
        }
        self.launch_granting(order, grants, fds, None, timeout)
    }

    fn launch_granting(
        &mut self,
        order: &Order,
        grants: Vec<Grant>,
        fds: Vec<OwnedFd>,
        sandbox: Option<SandboxOrder>,
        timeout: Duration,
    ) -> Result<(), LaunchError> {
        let launch = ToWorker::Launch(LaunchOrder {
            artifact: order.artifact.clone(),
            manifest: order.manifest.clone(),
            replica: 0,
            // No cgroup here (and no emberd to watch the memory): the worker
            // caps its address space, as without cgroups.
            memory_enforced: false,
            grants,
            sandbox,
        });
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        self.chan
            .send(&launch, &borrowed)
            .map_err(self.channel("sending Launch"))?;
        drop(fds);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .chan
                .recv_timeout(Some(left))
                .map_err(self.channel("Ready"))?
            {
                (
                    FromWorker::Transition {
                        state: State::Ready,
                        ..
                    },
                    _,
                ) => return Ok(()),
                (FromWorker::Failed(f), _) => {
                    return Err(LaunchError::Failed {
                        pid: self.pid,
                        message: f.to_string(),
                    })
                }
                _ => {}
            }
        }
    }

    /// Asks the worker to stop and reaps it (killing it after `deadline`).
    pub fn stop(mut self, deadline: Duration) {
        let _ = self.chan.send(&ToWorker::Stop { deadline }, &[]);
        self.reap(deadline + Duration::from_secs(1));
    }

    fn reap(&mut self, within: Duration) {
        if self.reaped {
            return;
        }
        let pid = Pid::from_raw(self.pid as i32);
        let end = Instant::now() + within;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Ok(WaitStatus::StillAlive) => {
                    let _ = kill(pid, Signal::SIGKILL);
                    let _ = waitpid(pid, None);
                    break;
                }
                _ => break,
            }
        }
        self.reaped = true;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            self.reap(Duration::from_secs(5));
        }
    }
}

/// Times of one cold start, from before `spawn`.
#[derive(Debug, Clone, Copy)]
pub struct ColdTimes {
    /// Until the process reported `Idle` (exec + plugin init).
    pub idle: Duration,
    /// Until the module reported `Ready`.
    pub ready: Duration,
}

/// Starts `exe` (an executable that calls [`run_cold_child_if_requested`]
/// first thing) as a fresh process that initializes `base`, then launches
/// `order` in it, and returns the running instance once it is `Ready`.
pub fn cold_start(
    exe: &Path,
    base: &Base,
    order: &Order,
    timeout: Duration,
) -> Result<(Worker, ColdTimes), LaunchError> {
    cold_start_with(exe, base, order, None, timeout)
}

/// [`cold_start`], handing the module copies of `listeners` (see
/// [`Worker::launch_sharing`]): several cold processes can serve one
/// socket, as a fleet of standalone replicas behind one port would.
pub fn cold_start_sharing(
    exe: &Path,
    base: &Base,
    order: &Order,
    listeners: &[(&str, BorrowedFd<'_>)],
    timeout: Duration,
) -> Result<(Worker, ColdTimes), LaunchError> {
    cold_start_with(exe, base, order, Some(listeners), timeout)
}

fn cold_start_with(
    exe: &Path,
    base: &Base,
    order: &Order,
    listeners: Option<&[(&str, BorrowedFd<'_>)]>,
    timeout: Duration,
) -> Result<(Worker, ColdTimes), LaunchError> {
    let pending = cold_spawn(exe, base)?;
    match listeners {
        Some(l) => pending.finish_sharing(order, l, timeout),
        None => pending.finish(order, timeout),
    }
}

/// A cold-start process spawned by [`cold_spawn`], still initializing.
///
/// The worker dies with the *thread* that spawned it (`PR_SET_PDEATHSIG`
/// follows the thread), so spawn from a thread that outlives it (e.g. the
/// main thread) and finish in any thread: that is how several cold starts
/// run at once.
#[derive(Debug)]
pub struct ColdPending {
    w: Worker,
    t0: Instant,
}

/// Spawns `exe` (see [`cold_start`]) to initialize `base`; finish the cold
/// start with [`ColdPending::finish`] or [`ColdPending::finish_sharing`].
pub fn cold_spawn(exe: &Path, base: &Base) -> Result<ColdPending, LaunchError> {
    let (ours, theirs) =
        transport::socket_pair().map_err(|e| LaunchError::Spawn(std::io::Error::other(e)))?;
    let raw = theirs.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg(COLD_FLAG)
        .arg(&base.plugin)
        .arg(toml::to_string(&base.config).expect("a TOML table serializes"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls dup2/fcntl, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                // dup2 onto itself would keep close-on-exec.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t0 = Instant::now();
    let child = cmd.spawn().map_err(LaunchError::Spawn)?;
    drop(theirs);
    Ok(ColdPending {
        w: Worker {
            pid: child.id(),
            chan: ParentChannel::new(ours),
            reaped: false,
        },
        t0,
    })
}

impl ColdPending {
    /// Waits for the plugin's init, then launches `order` and waits for
    /// `Ready`.
    pub fn finish(
        self,
        order: &Order,
        timeout: Duration,
    ) -> Result<(Worker, ColdTimes), LaunchError> {
        self.finish_with(order, None, timeout)
    }

    /// [`ColdPending::finish`], handing the module copies of `listeners`
    /// (see [`Worker::launch_sharing`]).
    pub fn finish_sharing(
        self,
        order: &Order,
        listeners: &[(&str, BorrowedFd<'_>)],
        timeout: Duration,
    ) -> Result<(Worker, ColdTimes), LaunchError> {
        self.finish_with(order, Some(listeners), timeout)
    }

    fn finish_with(
        self,
        order: &Order,
        listeners: Option<&[(&str, BorrowedFd<'_>)]>,
        timeout: Duration,
    ) -> Result<(Worker, ColdTimes), LaunchError> {
        let ColdPending { mut w, t0 } = self;
        w.wait_idle(timeout)?;
        let idle = t0.elapsed();
        match listeners {
            Some(l) => w.launch_sharing(order, l, timeout)?,
            None => w.launch(order, timeout)?,
        }
        let ready = t0.elapsed();
        Ok((w, ColdTimes { idle, ready }))
    }
}

/// If this process was started by [`cold_start`], initializes the plugin and
/// runs the worker (never returns); otherwise returns at once. Call it first
/// thing in `main`, before any thread exists.
pub fn run_cold_child_if_requested() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(COLD_FLAG) || args.len() != 4 {
        return;
    }
    let config: toml::Table = match toml::from_str(&args[3]) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cold start: bad plugin config: {e}");
            std::process::exit(2);
        }
    };
    let spec = PluginSpec {
        path: PathBuf::from(&args[2]),
        config,
    };
    if let Err(e) = preload_runtime() {
        eprintln!("cold start: {}", module_runtime::sdk::error_chain(&e));
        std::process::exit(1);
    }
    if let Err(e) = host::load_plugins(&[spec]) {
        eprintln!("cold start: {}", module_runtime::sdk::error_chain(&e));
        std::process::exit(1);
    }
    // SAFETY: `cold_start` put the control socket on descriptor 3 and
    // nothing else in this process owns it.
    let control = unsafe { OwnedFd::from_raw_fd(3) };
    host::worker::run(control, Some(nix::unistd::getppid()))
}

/// Loads and initializes `base` into this process, which becomes the
/// zygote, and the reaper of the workers it forks (a child subreaper: the
/// fork path's intermediate process exits and leaves each worker to it, as
/// emberd's zygote leaves them to emberd). Call once, while the process is
/// single-threaded.
pub fn zygote_load(base: &Base) -> Result<(), LaunchError> {
    preload_runtime()?;
    host::load_plugins(&[PluginSpec {
        path: base.plugin.clone(),
        config: base.config.clone(),
    }])?;
    nix::sys::prctl::set_child_subreaper(true).map_err(LaunchError::Subreaper)?;
    Ok(())
}

/// The sandbox a worker of emberd's default configuration applies before
/// it loads a module (`[sandbox] enabled = true`: its own uid and gid when
/// emberd is root, no new privileges, the seccomp deny list, Landlock),
/// or `None` when `EMBER_BENCH_SANDBOX=off` turns it off for the bench's
/// emberds too. The uid is one of emberd's default range that the system
/// does not know, as emberd would pick.
pub fn sandbox_like_emberd() -> Option<SandboxOrder> {
    use nix::unistd::{Gid, Group, Uid, User};
    if std::env::var("EMBER_BENCH_SANDBOX").is_ok_and(|v| v == "off") {
        return None;
    }
    // emberd's default `[sandbox] uid_range`, from its top.
    let ids = nix::unistd::geteuid()
        .is_root()
        .then(|| {
            (0..64u32).map(|i| 1_879_113_727 - i).find(|&id| {
                matches!(User::from_uid(Uid::from_raw(id)), Ok(None))
                    && matches!(Group::from_gid(Gid::from_raw(id)), Ok(None))
            })
        })
        .flatten()
        .map(|id| (id, id));
    Some(SandboxOrder {
        ids,
        allow_syscalls: Vec::new(),
        writable: Vec::new(),
    })
}

/// Prepares this process as emberd's zygote does before it forks: fixes
/// malloc's mmap threshold (`module_runtime::host::heap`) and loads the
/// shared runtime of slim modules (std and the SDK, found as emberd finds
/// them by default: in this executable's target directory and the
/// toolchain), without which a slim module cannot be loaded.
pub fn preload_runtime() -> Result<(), LaunchError> {
    host::heap::keep_worker_heaps_small();
    host::RuntimeLibs::locate(None)
        .and_then(|r| r.preload())
        .map_err(LaunchError::Runtime)
}

/// Forks a warm worker from this (zygote) process through the fork path
/// emberd's zygote uses, and waits for its `Idle`.
pub fn zygote_fork(timeout: Duration) -> Result<Worker, LaunchError> {
    let new = host::fork_worker(&[], nix::unistd::getpid())?;
    let mut w = Worker {
        pid: new.pid.as_raw() as u32,
        chan: ParentChannel::new(new.channel),
        reaped: false,
    };
    w.wait_idle(timeout)?;
    Ok(w)
}
