//! `containerd-shim-ember-v1`: the containerd runtime v2 shim of the
//! `io.containerd.ember.v1` runtime. It runs each container of a pod as an
//! Ember module instance in emberd (over emberd's control socket,
//! `$EMBER_SOCKET` or `/run/ember/control.sock`); the pod sandbox runs no
//! process. One shim process serves a whole pod.

use std::env;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};
use log::warn;

mod client;
mod spec;
mod task;
mod time;

use task::EmberTask;

/// The runtime name containerd knows this shim by.
const RUNTIME: &str = "io.containerd.ember.v1";

struct Service {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    bundle: String,
    socket: PathBuf,
}

impl containerd_shim::Shim for Service {
    type T = EmberTask;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle: args.bundle.clone(),
            socket: client::socket_from_env(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // One shim per pod: every container of a pod names its sandbox, so
        // they all reach the shim that saw the sandbox (and its netns).
        let cwd = env::current_dir().map_err(|e| io_err("the bundle directory", e))?;
        let grouping = spec::sandbox_id_of(&cwd).unwrap_or_else(|| opts.id.clone());
        let address = spawn(&opts, &grouping)?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // containerd cleans up after a shim that died: forget the instance
        // in emberd and unmount the image.
        match client::Client::connect(&self.socket).and_then(|mut c| c.remove_container(&self.id)) {
            Ok(()) => {}
            Err(e) if e.remote_name() == Some("ModuleNotFound") => {}
            Err(e) => warn!("removing {} from emberd: {e}", self.id),
        }
        let bundle = if self.bundle.is_empty() {
            env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&self.bundle)
        };
        let rootfs = bundle.join("rootfs").display().to_string();
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(&rootfs), libc::MNT_DETACH) {
            warn!("unmounting {rootfs}: {e}");
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 137,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(time::now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> EmberTask {
        EmberTask::new(
            &self.namespace,
            self.socket.clone(),
            self.exit.clone(),
            Some(publisher),
        )
    }
}

fn io_err(context: &str, err: io::Error) -> containerd_shim::Error {
    containerd_shim::Error::IoError {
        context: context.to_string(),
        err,
    }
}

/// Starts the shim daemon (containerd-shim's `spawn`, plus `setsid` so the
/// daemon outlives containerd's process group) and returns its address.
/// The daemon writes nothing on its stdout; it closes it once its server
/// listens (or once it found the pod's shim already listening).
fn spawn(opts: &StartOpts, grouping: &str) -> containerd_shim::Result<String> {
    let exe = env::current_exe().map_err(|e| io_err("finding the shim binary", e))?;
    let address = containerd_shim::socket_address(&opts.address, &opts.namespace, grouping);
    let mut cmd = Command::new(exe);
    cmd.current_dir(env::current_dir().map_err(|e| io_err("the bundle directory", e))?)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .args([
            "-namespace",
            &opts.namespace,
            "-id",
            &opts.id,
            "-address",
            &opts.address,
            "-socket",
            &address,
        ]);
    if opts.debug {
        cmd.arg("-debug");
    }
    // SAFETY: setsid is async-signal-safe and touches no memory of the
    // parent; it is the only thing done between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| io_err("spawning the shim", e))?;
    let mut out = child.stdout.take().expect("piped");
    io::copy(&mut out, &mut io::stderr()).map_err(|e| io_err("waiting for the shim", e))?;
    let _ = io::stderr().flush();
    Ok(address)
}

fn main() {
    if matches!(
        env::args().nth(1).as_deref(),
        Some("-v" | "-version" | "--version")
    ) {
        println!(
            "containerd-shim-ember-v1 {} ({RUNTIME}, task API v2)",
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    containerd_shim::run::<Service>(RUNTIME, None)
}
