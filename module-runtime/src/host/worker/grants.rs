//! Descriptor grants: the host's own (stdio, artifact), socket activation
//! of listeners, the FFI grants handed to the module, and `Attach`.

use std::ffi::c_int;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use super::shared::Shared;
use super::{exit, idle_exit, process};
use crate::abi::{FfiGrant, FfiStr, GrantKind};
use crate::manifest::Manifest;
use crate::protocol::{self, Failure, FailureKind, FromWorker, LogLevel, Stage, WorkerChannel};

/// The host's own grants, taken out of a launch order.
pub(super) struct HostGrants {
    /// The other grants, in order.
    pub grants: Vec<protocol::Grant>,
    /// Their descriptors, in order.
    pub fds: Vec<OwnedFd>,
    /// The `Artifact` descriptor to load from.
    pub artifact: Option<OwnedFd>,
    /// A `Stdio` grant named `netns`: a network namespace file (a
    /// container's pod network) to join before the sandbox is applied.
    pub netns: Option<OwnedFd>,
}

/// Takes the host's own grants out of a launch order: applies `Stdio` (the
/// descriptor becomes fds 1 and 2, so the module's raw output lands in its
/// log; a later `Stdio` grant named `stderr` becomes fd 2 alone; one named
/// `netns` is kept to join), keeps the `Artifact` descriptor to load from,
/// and returns the other grants with their descriptors, in order.
pub(super) fn take_host_grants(grants: Vec<protocol::Grant>, fds: Vec<OwnedFd>) -> HostGrants {
    let mut fds = fds.into_iter();
    let mut kept = HostGrants {
        grants: Vec::new(),
        fds: Vec::new(),
        artifact: None,
        netns: None,
    };
    for g in grants {
        let mut mine: Vec<OwnedFd> = fds.by_ref().take(g.kind.fd_count()).collect();
        if g.kind == GrantKind::Artifact {
            kept.artifact = mine.pop();
            continue;
        }
        if g.kind == GrantKind::Stdio && g.name == "netns" {
            kept.netns = mine.pop();
            continue;
        }
        if g.kind == GrantKind::Stdio {
            // One named `stderr` (after the first) replaces descriptor 2
            // alone: the host then reads stdout and stderr apart.
            let targets: &[c_int] = if g.name == "stderr" { &[2] } else { &[1, 2] };
            if let Some(log) = mine.first() {
                for &target in targets {
                    // SAFETY: `log` is open; dup2 replaces descriptors 1
                    // and 2, which no Rust object in the worker owns.
                    unsafe { libc::dup2(log.as_raw_fd(), target) };
                }
            }
            continue;
        }
        kept.grants.push(g);
        kept.fds.extend(mine);
    }
    kept
}

/// Joins the network namespace behind `fd` (`setns(CLONE_NEWNET)`): while
/// this is the only thread and before the sandbox, which forbids it.
pub(super) fn join_netns(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: `fd` is an open descriptor; setns only reads it.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Socket activation for modules that expect it: the listeners also appear
/// as descriptors 3, 4, … with `LISTEN_FDS`, `LISTEN_FDNAMES` and
/// `LISTEN_PID` set, as systemd would pass them (the SDK's
/// `ModuleContext::tcp_listener` hands out the same descriptors by name: use
/// one or the other). Any `LISTEN_*` inherited from emberd is removed.
/// Runs before any thread exists, so changing the environment is sound.
pub(super) fn socket_activation(
    chan: WorkerChannel,
    grants: &[protocol::Grant],
    mut fds: Vec<OwnedFd>,
) -> (WorkerChannel, Vec<OwnedFd>) {
    for var in ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"] {
        std::env::remove_var(var);
    }
    let mut at = 0;
    let mut listeners = Vec::new();
    let mut names = Vec::new();
    for g in grants {
        if g.kind == GrantKind::Listener {
            listeners.push(at);
            names.push(g.name.as_str());
        }
        at += g.kind.fd_count();
    }
    let mut control = chan.into_inner();
    let placed = process::place_listeners(&mut control, &mut fds, &listeners);
    let chan = WorkerChannel::new(control);
    match placed {
        Ok(0) => {}
        Ok(n) => {
            std::env::set_var("LISTEN_PID", std::process::id().to_string());
            std::env::set_var("LISTEN_FDS", n.to_string());
            std::env::set_var("LISTEN_FDNAMES", names.join(":"));
        }
        Err(e) => {
            let _ = chan.send(
                &FromWorker::Failed(Failure {
                    stage: Stage::Launch,
                    kind: FailureKind::BadLaunchOrder,
                    message: format!("placing listeners at descriptor 3: {e}"),
                }),
                &[],
            );
            idle_exit(exit::LAUNCH)
        }
    }
    (chan, fds)
}

/// Turns grants and their descriptors into FFI grants, leaking the names
/// and handing over the descriptors.
pub(super) fn ffi_grants(grants: &[protocol::Grant], fds: Vec<OwnedFd>) -> Vec<FfiGrant> {
    let mut fds = fds.into_iter();
    let mut out = Vec::with_capacity(grants.len());
    for g in grants {
        let mut raw = [-1 as c_int; 2];
        for slot in raw.iter_mut().take(g.kind.fd_count()) {
            *slot = fds.next().map_or(-1, IntoRawFd::into_raw_fd);
        }
        let name: &'static str = Box::leak(g.name.clone().into_boxed_str());
        out.push(FfiGrant {
            kind: g.kind as u32,
            name: FfiStr::new(name),
            fds: raw,
            nfds: g.kind.fd_count() as u32,
        });
    }
    out
}

/// Validates an `Attach` and queues its grants for the module.
pub(super) fn attach(
    shared: &Shared,
    manifest: &Manifest,
    grants: Vec<protocol::Grant>,
    fds: Vec<OwnedFd>,
) {
    if fds.len() != protocol::fd_count(&grants) {
        return shared.log(
            LogLevel::Warn,
            "ember::worker",
            format!(
                "ignoring attach: {} descriptors for {} expected",
                fds.len(),
                protocol::fd_count(&grants)
            ),
        );
    }
    if let Some(g) = grants.iter().find(|g| {
        matches!(g.kind, GrantKind::Stdio | GrantKind::Artifact)
            || !manifest.declares(g.kind, &g.name)
    }) {
        return shared.log(
            LogLevel::Warn,
            "ember::worker",
            format!(
                "ignoring attach: grant {:?} `{}` is not declared in the manifest",
                g.kind, g.name
            ),
        );
    }
    let n = grants.len();
    {
        // Queue, bump and ring under the queue's lock: a taker (which drains
        // the doorbell under the same lock once the queue is empty) can
        // never empty the queue between our push and our ring and leave a
        // stale byte that wakes waiters with nothing new.
        let mut q = shared.attached.lock().unwrap_or_else(|p| p.into_inner());
        q.extend(ffi_grants(&grants, fds));
        // Release: a module that reads the new value (Acquire) and then
        // takes the queue finds these grants (the mutex orders them too).
        shared.attach_seq.fetch_add(1, Ordering::Release);
        let _ = nix::unistd::write(shared.attach_w.as_fd(), b"a");
    }
    shared.log(
        LogLevel::Debug,
        "ember::worker",
        format!("attached {n} grants"),
    );
}
