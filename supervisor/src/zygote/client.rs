//! The supervisor's side of the zygote: start it (before tokio), then ask
//! it for workers.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use module_runtime::transport::{self, Link};

use super::{FromZygote, ToZygote, ZYGOTE_ARG};
use crate::lifecycle::ExitStatus;
use crate::link::{AsyncLink, LinkError};
use crate::reaper::{self, Claim};

/// The zygote could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// The channel could not be made or used.
    #[error("zygote channel")]
    Channel(#[source] LinkError),
    /// `/proc/self/exe` could not be executed.
    #[error("cannot start the zygote")]
    Spawn(#[source] std::io::Error),
    /// The zygote refused its plugins.
    #[error("zygote could not load plugins: {0}")]
    Plugins(String),
    /// The zygote answered something unexpected.
    #[error("zygote protocol violation")]
    Protocol,
    /// The plugins did not initialize in time; the zygote was killed.
    #[error(
        "the zygote's plugins did not initialize within {} ms \
         (`pool.zygote_start_timeout_ms` in emberd's configuration); the zygote was killed",
        .0.as_millis()
    )]
    Timeout(std::time::Duration),
}

/// A started zygote, before the async runtime exists.
#[derive(Debug)]
pub struct ZygoteProcess {
    child: Child,
    channel: Link<ToZygote, FromZygote>,
    pid: i32,
    plugins: usize,
    // Declared last: released after `child` is reaped (or dropped).
    claim: Claim,
}

/// Starts the zygote by re-executing this binary and waits up to `timeout`
/// for its plugins to initialize. Call before any thread is started: the
/// zygote must be forked from a single-threaded process.
pub fn spawn(
    plugins: &[crate::plugins::PluginSpec],
    timeout: std::time::Duration,
) -> Result<ZygoteProcess, ZygoteError> {
    let (child, channel, claim) = exec_zygote()?;
    let mut z = ZygoteProcess {
        pid: child.id() as i32,
        child,
        channel: Link::new(channel),
        plugins: 0,
        claim,
    };
    let ready = z
        .channel
        .send(&hello(plugins), &[])
        .and_then(|()| z.channel.recv_timeout(Some(timeout)))
        .map(|(msg, _)| msg);
    let ready = match ready {
        Ok(msg) => Ok(msg),
        Err(LinkError::Timeout) => Err(ZygoteError::Timeout(timeout)),
        Err(e) => Err(ZygoteError::Channel(e)),
    };
    match check_ready(ready, z.pid) {
        Ok(n) => {
            z.plugins = n;
            Ok(z)
        }
        Err((e, kill)) => {
            // Still single-threaded: reaping here blocks nobody.
            if kill {
                let _ = z.child.kill();
            }
            let _ = z.child.wait();
            Err(e)
        }
    }
}

/// Runs `emberd --zygote` with the zygote's end of a new channel; returns
/// the child, our end and the claim on its pid (the orphan reaper leaves it
/// to `child.wait()`).
///
/// The zygote's parent-death signal follows the *thread* that ran this
/// (Linux sends it when that thread exits, not the process); workers,
/// re-parented to emberd, follow its main thread (see `fork.rs`). So it must run on a thread
/// that lives as long as emberd: the main thread (before the runtime, or
/// the runtime itself, whose current-thread scheduler is the main thread),
/// never a blocking-pool thread, which exits when idle.
fn exec_zygote() -> Result<(Child, OwnedFd, Claim), ZygoteError> {
    let (ours, theirs) = transport::socket_pair().map_err(ZygoteError::Channel)?;
    // The zygote's end must survive exec. emberd starts no other process,
    // so no concurrent spawn can inherit it by accident.
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| ZygoteError::Spawn(e.into()))?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("emberd-zygote")
        .arg(ZYGOTE_ARG)
        .arg(theirs.as_raw_fd().to_string())
        .arg(std::process::id().to_string())
        .envs(crate::runtime_libs::zygote_env())
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes two async-signal-safe system calls (no allocation, no lock).
    unsafe {
        // The zygote and its workers get the descriptor limit emberd
        // started with (emberd raised its own; see `crate::rlimit`).
        cmd.pre_exec(crate::rlimit::restore_in_child);
    }
    let child = cmd.spawn().map_err(ZygoteError::Spawn)?;
    // Before anything can yield to the orphan reaper (this runs on its
    // thread, or before it exists).
    let claim = reaper::claim(child.id() as i32);
    Ok((child, ours, claim))
}

fn hello(plugins: &[crate::plugins::PluginSpec]) -> ToZygote {
    ToZygote::Hello {
        plugins: plugins.to_vec(),
    }
}

/// The zygote's answer to `Hello`: the number of plugins it loaded, or why
/// not, and whether the child must be killed (it is then to be reaped by
/// the caller, which knows whether it may block).
fn check_ready(
    answer: Result<FromZygote, ZygoteError>,
    expected_pid: i32,
) -> Result<usize, (ZygoteError, bool)> {
    match answer {
        Ok(FromZygote::Ready { pid, plugins }) if pid == expected_pid => Ok(plugins as usize),
        Ok(FromZygote::HelloFailed { reason }) => Err((ZygoteError::Plugins(reason), false)),
        Ok(_) => Err((ZygoteError::Protocol, true)),
        Err(e) => Err((e, true)),
    }
}

/// Kills (if `kill`) and reaps a zygote child on the blocking pool, never on
/// the runtime's thread.
fn reap_off_thread(mut child: Child, kill: bool, claim: Claim) {
    if kill {
        let _ = child.kill();
    }
    drop(tokio::task::spawn_blocking(move || {
        let status = child.wait();
        drop(claim);
        status
    }));
}

impl ZygoteProcess {
    /// The zygote's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Plugins it loaded.
    pub fn plugins(&self) -> usize {
        self.plugins
    }

    /// Moves onto the async runtime; call inside it.
    pub fn into_async(self) -> Result<Zygote, ZygoteError> {
        let ZygoteProcess {
            child,
            channel,
            pid,
            claim,
            ..
        } = self;
        match AsyncLink::new(channel.into_inner()) {
            Ok(channel) => Ok(Zygote {
                channel,
                child,
                pid,
                next_id: 0,
                claim,
            }),
            Err(e) => {
                reap_off_thread(child, true, claim);
                Err(ZygoteError::Channel(e))
            }
        }
    }
}

/// A worker could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// The zygote is gone.
    #[error("zygote is gone")]
    ZygoteGone(#[source] LinkError),
    /// The zygote could not fork.
    #[error("zygote could not fork: {0}")]
    Fork(String),
    /// The answer was not what was asked for.
    #[error("zygote protocol violation")]
    Protocol,
}

/// The zygote, from inside the runtime. Owned by the warm pool.
#[derive(Debug)]
pub struct Zygote {
    channel: AsyncLink<ToZygote, FromZygote>,
    child: Child,
    pid: i32,
    next_id: u64,
    claim: Claim,
}

impl Zygote {
    /// Starts a new zygote from inside the runtime (the last one died).
    /// Must run on the runtime's own thread (see [`exec_zygote`]); the
    /// plugins' initialization in the new zygote is awaited, not blocked on.
    pub async fn restart(
        plugins: &[crate::plugins::PluginSpec],
        timeout: std::time::Duration,
    ) -> Result<Zygote, ZygoteError> {
        let (child, ours, claim) = exec_zygote()?;
        let pid = child.id() as i32;
        let mut channel = match AsyncLink::new(ours) {
            Ok(c) => c,
            Err(e) => {
                reap_off_thread(child, true, claim);
                return Err(ZygoteError::Channel(e));
            }
        };
        let answer = async {
            channel.send(&hello(plugins), &[]).await?;
            channel.recv().await.map(|(msg, _)| msg)
        };
        let answer = match tokio::time::timeout(timeout, answer).await {
            Ok(a) => a.map_err(ZygoteError::Channel),
            Err(_) => Err(ZygoteError::Timeout(timeout)),
        };
        if let Err((e, kill)) = check_ready(answer, pid) {
            reap_off_thread(child, kill, claim);
            return Err(e);
        }
        Ok(Zygote {
            channel,
            child,
            pid,
            next_id: 0,
            claim,
        })
    }

    /// The zygote's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Asks for one new worker.
    pub async fn fork(&mut self) -> Result<NewWorker, ForkError> {
        self.next_id += 1;
        let id = self.next_id;
        self.channel
            .send(&ToZygote::Fork { id }, &[])
            .await
            .map_err(ForkError::ZygoteGone)?;
        let (msg, fds) = self.channel.recv().await.map_err(ForkError::ZygoteGone)?;
        match msg {
            FromZygote::Forked { id: got, pid } if got == id && fds.len() == 2 => {
                // Before anything can yield to the orphan reaper: from here
                // on, this worker's exit is its owner's to reap.
                let claim = reaper::claim(pid);
                let mut fds = fds.into_iter();
                let pidfd = fds.next().expect("two descriptors");
                let channel = fds.next().expect("two descriptors");
                Ok(NewWorker {
                    pid,
                    pidfd,
                    channel,
                    claim,
                })
            }
            FromZygote::ForkFailed { id: got, reason } if got == id => Err(ForkError::Fork(reason)),
            _ => Err(ForkError::Protocol),
        }
    }

    /// Closes the channel (the zygote exits) and reaps it.
    pub async fn shutdown(self) {
        let Zygote {
            channel,
            mut child,
            claim,
            ..
        } = self;
        drop(channel);
        let _ = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            drop(claim);
            status
        })
        .await;
    }
}

/// A just-forked worker, before its handshake.
#[derive(Debug)]
pub struct NewWorker {
    /// Its pid.
    pub pid: i32,
    /// A pidfd: readable once it exited; used to signal it without pid
    /// reuse races.
    pub pidfd: OwnedFd,
    /// The supervisor's end of its channel.
    pub channel: OwnedFd,
    /// Its pid, claimed from the orphan reaper: whoever holds this reaps it
    /// through the pidfd.
    pub claim: Claim,
}

/// Whether the process behind `pidfd` has exited, without blocking.
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Sends `signal` through a pidfd.
pub fn pidfd_signal(pidfd: BorrowedFd<'_>, signal: i32) -> nix::Result<()> {
    // SAFETY: plain syscall; a null siginfo is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r < 0 {
        Err(nix::errno::Errno::last())
    } else {
        Ok(())
    }
}

/// Reaps an exited process through its pidfd and says how it ended:
/// [`ExitStatus::Unknown`] if it was reaped already (it died before emberd
/// claimed it, see [`crate::reaper`]).
pub fn pidfd_reap(pidfd: BorrowedFd<'_>) -> ExitStatus {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    loop {
        match waitid(Id::PIDFd(pidfd), WaitPidFlag::WEXITED) {
            Ok(WaitStatus::Exited(_, code)) => return ExitStatus::Code(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return ExitStatus::Signal(sig as i32),
            Ok(_) => return ExitStatus::Unknown,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return ExitStatus::Unknown,
        }
    }
}
