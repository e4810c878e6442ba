//! `emberd`: boot order, the runtime, shutdown.
//!
//! 1. not dumpable (see [`run`]), configuration and state directory (no
//!    threads yet);
//! 2. the zygote, re-executed from this binary while the process is still
//!    single-threaded (emberd is a child subreaper first: workers come to
//!    it from the zygote's intermediate processes, see [`crate::reaper`]);
//! 3. the tokio runtime: warm pool, state owner ([`actor`]), control socket
//!    ([`server`]), systemd notifications;
//! 4. on SIGTERM/SIGINT: stop modules (graceful, then kill), stop the
//!    zygote, remove the socket (not one systemd passed: see
//!    [`crate::activation`]).

pub mod actor;
mod containers;
pub mod events;
pub mod logs;
mod model;
pub mod os;
mod pipeline;
mod registry;
pub mod release;
mod render;
pub mod scrape;
pub mod server;
mod slots;
pub mod status_line;

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, ConfigError};
use crate::notify::Notifier;
use crate::store::{Store, StoreError};
use crate::zygote::{self, ZygoteError, ZygoteProcess};

/// Command-line choices that override the configuration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--socket PATH`.
    pub socket: Option<PathBuf>,
    /// `--state-dir DIR`.
    pub state_dir: Option<PathBuf>,
    /// `--metrics ADDR`.
    pub metrics: Option<String>,
}

/// The daemon could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration.
    #[error("configuration")]
    Config(#[source] ConfigError),
    /// The state directory is unusable.
    #[error("state directory")]
    Store(#[source] StoreError),
    /// The zygote could not be started.
    #[error("zygote")]
    Zygote(#[source] ZygoteError),
    /// The control socket could not be bound.
    #[error("control socket")]
    Bind(#[source] server::BindError),
    /// The metrics address could not be bound.
    #[error("metrics listener: cannot bind {addr}")]
    MetricsBind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why (in use, not a local address...).
        #[source]
        source: std::io::Error,
    },
    /// The socket passed by the service manager is unusable.
    #[error("socket activation")]
    Activation(#[source] crate::activation::ActivationError),
    /// The runtime could not be built.
    #[error("runtime")]
    Runtime(#[source] std::io::Error),
    /// emberd could not make itself not dumpable.
    #[error("cannot make emberd not dumpable (PR_SET_DUMPABLE)")]
    Dumpable(#[source] nix::Error),
    /// `[runtime_libs] dir` holds no usable shared runtime.
    #[error("shared runtime of slim modules")]
    RuntimeLibs(#[source] crate::runtime_libs::InitError),
    /// emberd could not become its workers' parent.
    #[error("cannot become a child subreaper (PR_SET_CHILD_SUBREAPER)")]
    Subreaper(#[source] nix::Error),
}

/// Loads the configuration with the command-line overrides.
pub fn load_config(opts: &Options) -> Result<Config, ConfigError> {
    let mut cfg = match &opts.config {
        Some(p) => Config::load(p)?,
        None => Config::embedded(),
    };
    if let Some(s) = &opts.socket {
        cfg.socket = Some(std::path::absolute(s).unwrap_or_else(|_| s.clone()));
    }
    if let Some(d) = &opts.state_dir {
        cfg.state_dir = Some(std::path::absolute(d).unwrap_or_else(|_| d.clone()));
    }
    if let Some(a) = &opts.metrics {
        cfg.set_metrics_address(a)?;
    }
    Ok(cfg)
}

/// Runs the daemon until SIGTERM/SIGINT. Must be called from `main` before
/// any thread is started.
pub fn run(opts: Options) -> Result<(), DaemonError> {
    let cfg = load_config(&opts).map_err(DaemonError::Config)?;
    run_with_config(opts, cfg)
}

/// [`run`] with the configuration already loaded (`emberd` loads it first
/// to set up its logging).
pub fn run_with_config(opts: Options, cfg: Config) -> Result<(), DaemonError> {
    // Before anything uses descriptors 3 and up or the environment is read
    // by a child: the control socket systemd may have passed.
    let activated = crate::activation::take_control_socket().map_err(DaemonError::Activation)?;
    // Module lines to the journal too, when emberd logs there.
    if cfg.logging.journal_mode() {
        if let Err(e) = crate::journal::install(&cfg.logging.journal_socket) {
            tracing::warn!(error = %e, "module lines will not reach the journal");
        }
    }
    // The rest of what systemd passed, read and removed while still
    // single-threaded: the zygote and the workers inherit none of it.
    let systemd_env = crate::notify::take_env();
    // Not dumpable: a module that keeps emberd's uid (emberd is not root)
    // can then neither read nor write emberd's memory through
    // `/proc/PID/mem` nor trace it; emberd's `/proc` files belong to root.
    nix::sys::prctl::set_dumpable(false).map_err(DaemonError::Dumpable)?;
    // Large receive buffers in their own mappings, not zeroed heap blocks
    // (`module_runtime::host::heap`).
    module_runtime::host::heap::keep_worker_heaps_small();
    // Descriptors: a few per running module (see `crate::rlimit`).
    let nofile = crate::rlimit::raise();
    let state_dir = cfg.state_path();
    let (store, mut desired) = Store::open(&state_dir).map_err(DaemonError::Store)?;
    // Artifacts and logs of an install cut short by a crash are not
    // referenced.
    store.collect_garbage(&desired);
    store.remove_stale_logs(&desired);
    // The socket first: a daemon that cannot serve starts no process. A
    // socket passed by systemd is systemd's: never unlinked here.
    let (listener, socket_path, own_socket) = match activated {
        Some(a) => {
            let path = a.path.unwrap_or_else(|| cfg.socket_path());
            if path != cfg.socket_path() {
                tracing::info!(
                    configured = %cfg.socket_path().display(),
                    "the socket passed by the service manager replaces the configured one"
                );
            }
            tracing::info!(fd = a.fd, socket = %path.display(), "control socket passed by the service manager");
            (a.listener, path, false)
        }
        None => {
            let socket_path = cfg.socket_path();
            let mode = cfg.mode().expect("validated");
            let listener = server::bind(&socket_path, mode, cfg.socket_uid, cfg.socket_gid)
                .map_err(DaemonError::Bind)?;
            (listener, socket_path, true)
        }
    };
    // The socket file it bound, by device and inode: at exit it is
    // removed only if the path still names that file. A newer emberd that
    // found this one not answering (stopping) and bound the same path
    // keeps its socket.
    let bound = own_socket
        .then(|| std::fs::symlink_metadata(&socket_path).ok())
        .flatten()
        .map(|m| (m.dev(), m.ino()));
    let remove_socket = || {
        let Some((dev, ino)) = bound else { return };
        match std::fs::symlink_metadata(&socket_path) {
            Ok(m) if m.dev() == dev && m.ino() == ino => {
                let _ = std::fs::remove_file(&socket_path);
            }
            Ok(_) => tracing::info!(
                socket = %socket_path.display(),
                "the socket path now names another socket; left in place"
            ),
            Err(_) => {}
        }
    };
    let metrics = match bind_metrics(&cfg) {
        Ok(m) => m,
        Err(e) => {
            remove_socket();
            return Err(e);
        }
    };
    // Workers are forked by an intermediate process that exits at once:
    // they are re-parented to emberd, which reaps them, only as a subreaper.
    if let Err(e) = crate::reaper::become_subreaper() {
        remove_socket();
        return Err(DaemonError::Subreaper(e));
    }
    // The shared runtime the zygote preloads for slim modules (read before
    // the zygote starts: it inherits the paths).
    if let Err(e) = crate::runtime_libs::init(cfg.runtime_libs.dir.as_deref()) {
        remove_socket();
        return Err(DaemonError::RuntimeLibs(e));
    }
    // Still single-threaded here: the only safe moment to start the zygote.
    let zygote = match zygote::spawn(&cfg.plugin_specs(), cfg.pool.zygote_start_timeout()) {
        Ok(z) => z,
        Err(e) => {
            remove_socket();
            return Err(DaemonError::Zygote(e));
        }
    };
    match nofile {
        Ok((from, to)) => tracing::info!(from, to, "descriptor limit (RLIMIT_NOFILE) raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit (RLIMIT_NOFILE)"),
    }
    tracing::info!(
        pid = zygote.pid(),
        plugins = zygote.plugins(),
        "zygote ready"
    );
    // State written before the sandbox existed has no uids: given here,
    // where the passwd and group lookups (NSS: LDAP, sssd…) block nobody,
    // and after the zygote started (nothing NSS opens reaches it).
    if cfg.sandbox.assign_missing_uids(&mut desired) {
        if let Err(e) = store.save(&desired) {
            tracing::warn!(error = %crate::error_chain(&e), "cannot record the uids given to modules");
        }
    }
    // The recorded modules' listeners may still be held by the workers of
    // an emberd that was just killed, while they die: wait a little for
    // them (no client is served yet) rather than fail their restore.
    let specs: Vec<_> = desired
        .modules
        .values()
        .filter_map(|r| crate::manifest::parse(&r.manifest).ok())
        .flat_map(|s| s.listeners)
        .collect();
    let busy = crate::listeners::wait_free(&specs, std::time::Duration::from_secs(5));
    if !busy.is_empty() {
        tracing::warn!(?busy, "listeners of recorded modules are still in use");
    }
    let mut files: Vec<PathBuf> = cfg.plugins.iter().map(|p| p.spec().path).collect();
    files.extend(opts.config.clone());
    let protected = actor::protected_dirs(&state_dir, &socket_path, &files);
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name("emberd")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let result = rt.block_on(serve(
        cfg,
        store,
        desired,
        zygote,
        Sockets {
            control: listener,
            control_path: socket_path.clone(),
            metrics,
            systemd: systemd_env,
        },
        protected,
    ));
    remove_socket();
    result
}

/// The listening sockets `serve` answers on, bound before any process
/// starts.
struct Sockets {
    /// The control socket (bound here or passed by the service manager).
    control: std::os::unix::net::UnixListener,
    /// Its path, for messages.
    control_path: PathBuf,
    /// `/metrics`, when configured.
    metrics: Option<std::net::TcpListener>,
    /// What systemd passed in the environment (read and removed).
    systemd: crate::notify::SystemdEnv,
}

async fn serve(
    cfg: Config,
    store: Store,
    desired: crate::store::DesiredState,
    zygote: ZygoteProcess,
    sockets: Sockets,
    protected: Vec<PathBuf>,
) -> Result<(), DaemonError> {
    let Sockets {
        control: listener,
        control_path: socket_path,
        metrics,
        systemd: systemd_env,
    } = sockets;
    let started = (std::time::Instant::now(), std::time::SystemTime::now());
    let zygote = zygote.into_async().map_err(DaemonError::Zygote)?;
    // Orphans re-parented to emberd; on this thread, where claims are taken.
    let reaper_task = tokio::spawn(crate::reaper::run());
    let limiter = Arc::new(start_limiter());
    let events = events::EventHub::new(cfg.events.buffer);
    let (pool, pool_task) = crate::pool::start(
        zygote,
        cfg.plugin_specs(),
        cfg.pool.clone(),
        limiter.clone(),
        events.clone(),
    );

    let access = Arc::new(server::Access {
        uids: cfg.allowed_uids.clone(),
        gids: cfg.allowed_gids.clone(),
        own_uid: nix::unistd::geteuid().as_raw(),
    });

    let status_pool = pool.clone();
    // What the `STATUS=` line follows (dropped when not under systemd).
    let status_events = events.subscribe();
    let (actor_tx, actor_rx) = mpsc::channel(256);
    // Only the scrape task keeps it (dropped with the closure when there is
    // no metrics listener): the pool ends, its idle workers with it, once
    // every handle is gone, so one kept here would hold the shutdown up.
    let pool_handle = pool.clone();
    let a = actor::Actor::new(
        store,
        desired,
        pool,
        limiter.clone(),
        actor::Settings {
            policy: cfg.lifecycle.policy(),
            limit_defaults: cfg.limits.clone(),
            install_caps: cfg.install.clone(),
            sandbox: cfg.sandbox.clone(),
            protected,
            events,
        },
    );
    let actor_task = tokio::spawn(a.run(actor_rx));
    let calls = Arc::new(crate::prom::ControlCalls::default());
    let server_task = tokio::spawn(server::serve(
        listener,
        access,
        actor_tx.clone(),
        calls.clone(),
    ));
    let metrics_task = metrics.map(|l| {
        let sources = scrape::Sources {
            actor: actor_tx.clone(),
            pool: pool_handle,
            calls,
            started: started.0,
            start_time: started.1,
            memory: Default::default(),
            cpu_floor: Default::default(),
        };
        tokio::spawn(scrape::serve(l, Arc::new(sources)))
    });
    tracing::info!(socket = %socket_path.display(), "emberd ready");

    let notifier = match Notifier::from_env(&systemd_env) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "systemd notification disabled");
            None
        }
    };
    let notifier = notifier.map(Arc::new);
    if let Some(n) = &notifier {
        let _ = n.notify(&format!(
            "READY=1\nMAINPID={}\nSTATUS=serving on {}",
            std::process::id(),
            socket_path.display()
        ));
    }
    // Then the summary line, kept current.
    let status = notifier.as_ref().map(|n| {
        tokio::spawn(status_line::keep_current(
            n.clone(),
            actor_tx.clone(),
            status_pool,
            status_events,
        ))
    });
    let watchdog = match (&notifier, crate::notify::watchdog_interval(&systemd_env)) {
        (Some(n), Some(every)) => Some(tokio::spawn(watchdog(n.clone(), every, actor_tx.clone()))),
        _ => None,
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Runtime)?;
    // A dead zygote is the pool's business (it starts a new one).
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    };
    tracing::info!("shutting down");
    if let Some(n) = &notifier {
        let _ = n.notify("STOPPING=1\nSTATUS=stopping modules");
    }
    if let Some(s) = status {
        s.abort();
    }
    server_task.abort();
    if let Some(m) = metrics_task {
        m.abort();
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    let (tx, rx) = oneshot::channel();
    if actor_tx.send(actor::ActorMsg::Shutdown(tx)).await.is_ok() {
        let _ = rx.await;
    }
    drop(actor_tx);
    let _ = actor_task.await;
    let _ = tokio::time::timeout(Duration::from_secs(5), pool_task).await;
    reaper_task.abort();
    limiter.shutdown();
    Ok(())
}

/// Detects and sets up per-module cgroups (`EMBER_CGROUP_ROOT` overrides
/// `/sys/fs/cgroup`, for tests; `none` disables them) and logs what
/// enforces limits.
fn start_limiter() -> crate::cgroup::Limiter {
    use crate::cgroup::{Limiter, ROOT};
    let root = std::env::var_os("EMBER_CGROUP_ROOT").unwrap_or_else(|| ROOT.into());
    let limiter = if root == "none" {
        Limiter::disabled()
    } else {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Limiter::start(std::path::Path::new(&root), &own, std::process::id())
    };
    let stale = limiter.stale().to_vec();
    if !stale.is_empty() {
        tokio::spawn(sweep_stale_cgroups(stale));
    }
    let d = limiter.detection();
    tracing::info!(
        memory = %d.memory_mechanism(),
        memory_cgroup = ?d.memory.as_ref().map(|h| h.base.display().to_string()),
        cpu = %d.cpu_mechanism(),
        cpu_cgroup = ?d.cpu.as_ref().map(|h| h.base.display().to_string()),
        "resource limits"
    );
    limiter
}

/// Retries removing the cgroups of a dead emberd whose workers were still
/// exiting at start-up (each try takes a few directory operations).
async fn sweep_stale_cgroups(mut dirs: Vec<PathBuf>) {
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        dirs.retain(|d| !crate::cgroup::remove_stale_parent(d));
        if dirs.is_empty() {
            return;
        }
    }
    tracing::warn!(cgroups = ?dirs, "cannot remove the cgroups of a dead emberd");
}

/// Pings the systemd watchdog while the state owner answers.
async fn watchdog(n: Arc<Notifier>, every: Duration, actor: mpsc::Sender<actor::ActorMsg>) {
    let half = every / 2;
    loop {
        tokio::time::sleep(half).await;
        let (tx, rx) = oneshot::channel();
        let alive = actor.send(actor::ActorMsg::Ping(tx)).await.is_ok()
            && tokio::time::timeout(half, rx)
                .await
                .is_ok_and(|r| r.is_ok());
        if alive {
            let _ = n.notify("WATCHDOG=1");
        }
    }
}

/// Binds `metrics_address`, if set: before any process starts, so a port in
/// use stops emberd at once with the address in the error.
fn bind_metrics(cfg: &Config) -> Result<Option<std::net::TcpListener>, DaemonError> {
    let Some(addr) = cfg.metrics_addr() else {
        return Ok(None);
    };
    let bound = std::net::TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    });
    match bound {
        Ok(l) => {
            tracing::info!(%addr, "metrics served at http://{addr}/metrics");
            Ok(Some(l))
        }
        Err(source) => Err(DaemonError::MetricsBind { addr, source }),
    }
}
