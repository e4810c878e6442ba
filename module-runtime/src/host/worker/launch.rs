//! A launch: from the order to the module's exit (sandbox, load, `start`,
//! `serve`, `stop`).

use std::ffi::c_void;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};

use super::callbacks::{
    host_error, host_log, host_plugin_lookup, host_ready, host_shutdown_remaining_ms,
    host_take_attached,
};
use super::control::start_control_thread;
use super::crash::{install_crash_handlers, STAGE};
use super::deadline::{arm_load_deadline, disarm_load_deadline};
use super::grants::{ffi_grants, join_netns, socket_activation, take_host_grants};
use super::limits::cap_address_space;
use super::shared::{Shared, SHARED};
use super::{exit, idle_exit, loader, process, sandbox};
use crate::abi::{self, FfiGrant, FfiStr, HostApi};
use crate::manifest::Manifest;
use crate::protocol::{
    Failure, FailureKind, FromWorker, LaunchOrder, LogLevel, Stage, State, WorkerChannel,
};

pub(super) fn launch(chan: WorkerChannel, order: LaunchOrder, fds: Vec<OwnedFd>) -> ! {
    // `limits.start_deadline` counts from here.
    let launched = Instant::now();
    let early_fail = |chan: &WorkerChannel, kind, msg: String| -> ! {
        let _ = chan.send(
            &FromWorker::Failed(Failure {
                stage: Stage::Launch,
                kind,
                message: msg,
            }),
            &[],
        );
        idle_exit(exit::LAUNCH)
    };
    let manifest = match Manifest::parse(&order.manifest) {
        Ok(m) => m,
        Err(e) => early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            crate::sdk::error_chain(&e),
        ),
    };
    if fds.len() != order.fd_count() {
        early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            format!(
                "launch order lists {} descriptors but {} arrived",
                order.fd_count(),
                fds.len()
            ),
        );
    }
    if let Some(g) = order
        .grants
        .iter()
        .find(|g| !manifest.declares(g.kind, &g.name))
    {
        early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            format!(
                "grant {:?} `{}` is not declared in the manifest",
                g.kind, g.name
            ),
        );
    }
    let host = take_host_grants(order.grants, fds);
    let (grants, fds, artifact_fd) = (host.grants, host.fds, host.artifact);
    // A container's pod network: joined before the sandbox (which forbids
    // setns) and before any of the module's code.
    if let Some(ns) = host.netns {
        if let Err(e) = join_netns(&ns) {
            early_fail(
                &chan,
                FailureKind::BadLaunchOrder,
                format!("joining the network namespace: {e}"),
            );
        }
    }
    let (chan, fds) = socket_activation(chan, &grants, fds);
    let order = LaunchOrder { grants, ..order };
    let identity = manifest.identity(order.replica);
    process::set_process_name(&format!("ember: {identity}"));

    // The sandbox, while this is the only thread and before any of the
    // module's code (its constructors included) is mapped.
    let report = match sandbox::apply(order.sandbox.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            let _ = chan.send(
                &FromWorker::Failed(Failure {
                    stage: Stage::Launch,
                    kind: FailureKind::Sandbox,
                    message: format!("sandbox: {}", crate::sdk::error_chain(&e)),
                }),
                &[],
            );
            idle_exit(exit::LAUNCH)
        }
    };
    let _ = chan.send(&FromWorker::Sandboxed(report), &[]);

    // SIGTERM/SIGINT are handled by the control thread through a signalfd;
    // block them before any thread exists so every thread inherits the mask.
    let sigs = process::block_signals(&[Signal::SIGTERM, Signal::SIGINT])
        .unwrap_or_else(|_| nix::sys::signal::SigSet::empty());
    let (shutdown_r, shutdown_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            format!("pipe2 failed: {e}"),
        ),
    };
    let (attach_r, attach_w) =
        match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK) {
            Ok(p) => p,
            Err(e) => early_fail(
                &chan,
                FailureKind::BadLaunchOrder,
                format!("pipe2 failed: {e}"),
            ),
        };
    let sock = match chan.fd().try_clone_to_owned() {
        Ok(s) => s,
        Err(e) => early_fail(
            &chan,
            FailureKind::BadLaunchOrder,
            format!("dup of control socket failed: {e}"),
        ),
    };
    let _ = SHARED.set(Shared {
        sock,
        identity: identity.clone(),
        ready: AtomicBool::new(false),
        shutdown_requested: AtomicBool::new(false),
        shutdown_deadline: Mutex::new(None),
        shutdown_w,
        shutdown_r,
        last_error: Mutex::new(None),
        attached: Mutex::new(Vec::new()),
        attach_w,
        attach_r,
        attach_seq: AtomicU64::new(0),
        ready_timer: TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
        )
        .ok(),
    });
    let Some(shared) = SHARED.get() else {
        idle_exit(exit::LAUNCH)
    };
    if let Err(e) = install_crash_handlers(&shared.sock) {
        shared.log(
            LogLevel::Warn,
            "ember::worker",
            format!("crash handlers not installed: {e}"),
        );
    }

    // Load.
    STAGE.store(Stage::Load as u8, Ordering::Relaxed);
    shared.transition(State::Loading, order.artifact.display().to_string());
    match manifest.limits.memory {
        Some(limit) if !order.memory_enforced => cap_address_space(limit),
        _ => {}
    }
    // The start deadline covers loading too. No thread can watch it while
    // the dynamic loader runs the library's constructors: it holds its lock
    // then, and a thread starting up (std registers thread-local
    // destructors through the loader) would wait on it. A timer signal
    // can.
    arm_load_deadline(shared, launched, manifest.limits.start_deadline);
    // From the descriptor when emberd sent one (the file behind the path may
    // be replaced meanwhile; the descriptor's content cannot change).
    let loaded = match &artifact_fd {
        Some(fd) => loader::load_module_as(
            std::path::Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())),
            &order.artifact,
        ),
        None => loader::load_module(&order.artifact),
    };
    // The mapping stays; the descriptor is not needed any more.
    drop(artifact_fd);
    disarm_load_deadline();
    let module = match loaded {
        Ok(m) => m,
        Err(e) => {
            let kind = match &e {
                loader::LoadError::Elf(_) => FailureKind::BadArtifact,
                loader::LoadError::Dlopen { .. } => FailureKind::DlopenFailed,
                loader::LoadError::MissingSymbol { .. }
                | loader::LoadError::NullDescriptor { .. } => FailureKind::MissingSymbol,
                _ => FailureKind::AbiMismatch,
            };
            shared.fail(Stage::Load, kind, crate::sdk::error_chain(&e), exit::LOAD)
        }
    };
    shared.transition(
        State::Loaded,
        format!(
            "{} (module-runtime {})",
            module.module_type(),
            module.sdk_version()
        ),
    );

    // Hand the grants over: names and descriptors leak into the module.
    let grants = ffi_grants(&order.grants, fds);
    let grants: &'static [FfiGrant] = Box::leak(grants.into_boxed_slice());
    let name: &'static str = Box::leak(manifest.name.clone().into_boxed_str());
    let version: &'static str = Box::leak(manifest.version.clone().into_boxed_str());
    let config: &'static str = Box::leak(manifest.config_toml().into_boxed_str());
    let host: &'static HostApi = Box::leak(Box::new(HostApi {
        abi_version: abi::ABI_VERSION,
        size: std::mem::size_of::<HostApi>() as u32,
        ctx: (shared as *const Shared).cast(),
        module_name: FfiStr::new(name),
        module_version: FfiStr::new(version),
        replica: order.replica,
        config_toml: FfiStr::new(config),
        grants: grants.as_ptr(),
        grants_len: grants.len(),
        shutdown_fd: shared.shutdown_r.as_raw_fd(),
        ready: host_ready,
        log: host_log,
        error: host_error,
        shutdown_remaining_ms: host_shutdown_remaining_ms,
        plugin_lookup: host_plugin_lookup,
        attach_fd: shared.attach_r.as_raw_fd(),
        take_attached: host_take_attached,
        attach_seq: shared.attach_seq.as_ptr().cast_const(),
    }));

    start_control_thread(
        shared,
        chan,
        sigs,
        manifest.limits.stop_deadline,
        (launched, manifest.limits.start_deadline),
        manifest.clone(),
    );

    // start
    STAGE.store(Stage::Start as u8, Ordering::Relaxed);
    shared.transition(State::Starting, "");
    let mut instance: *mut c_void = std::ptr::null_mut();
    // SAFETY: validated descriptor; `host` lives for the process; `instance`
    // is a valid out-pointer.
    let rc = unsafe { (module.descriptor.start)(host, &mut instance) };
    check(shared, rc, Stage::Start, exit::START);
    if instance.is_null() {
        shared.fail(
            Stage::Start,
            FailureKind::ModuleError,
            "start returned no instance",
            exit::START,
        );
    }

    // serve
    STAGE.store(Stage::Serve as u8, Ordering::Relaxed);
    shared.transition(State::Serving, "");
    // SAFETY: `instance` came from a successful `start`; main thread only.
    let rc = unsafe { (module.descriptor.serve)(instance) };
    check(shared, rc, Stage::Serve, exit::SERVE);

    // stop
    STAGE.store(Stage::Stop as u8, Ordering::Relaxed);
    // If the module finished on its own, `stop` gets the normal deadline.
    shared.serve_returned(manifest.limits.stop_deadline);
    // SAFETY: as for `serve`; the instance is consumed by `stop`.
    let rc = unsafe { (module.descriptor.stop)(instance) };
    check(shared, rc, Stage::Stop, exit::STOP);
    shared.transition(State::Stopped, "");
    idle_exit(exit::OK)
}

fn check(shared: &Shared, rc: i32, stage: Stage, code: i32) {
    match rc {
        abi::CALL_OK => {}
        abi::CALL_PANIC => shared.fail(
            stage,
            FailureKind::Panic,
            shared.take_error("panicked"),
            code,
        ),
        abi::CALL_ERROR => shared.fail(
            stage,
            FailureKind::ModuleError,
            shared.take_error("returned an error"),
            code,
        ),
        other => shared.fail(
            stage,
            FailureKind::ModuleError,
            format!("returned invalid status {other}"),
            code,
        ),
    }
}
