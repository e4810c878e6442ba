//! emberd's children that nobody else reaps.
//!
//! emberd is a child subreaper ([`become_subreaper`]): workers are
//! re-parented to it when the fork path's intermediate process exits
//! (`module_runtime::host::fork`), and so is any process orphaned below it: a module's
//! own child whose worker died, an intermediate whose zygote was killed
//! mid-fork, a worker whose zygote died before answering. The owner of a
//! worker (its instance task or the pool, through its pidfd) and of a
//! zygote reaps it, for its exit status; each [`claim`]s the pid for as long
//! as it may do so. On every `SIGCHLD`, [`run`] reaps every other child that
//! has exited.
//!
//! A worker that dies before emberd has its pid (between the fork and the
//! zygote's answer) is reaped here; its owner's `waitid(P_PIDFD)` then finds
//! no child and reports the exit status as unknown. The pidfd keeps naming
//! that dead process, so nothing is signalled by a reused pid.

use std::collections::BTreeMap;
use std::sync::Mutex;

use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Pids claimed by their owners, with how many claims each (a pid reused
/// by a new worker while the claim on the dead one is still held).
static CLAIMS: Mutex<BTreeMap<i32, usize>> = Mutex::new(BTreeMap::new());

/// A pid whose owner reaps it itself; released on drop, after the reap.
#[derive(Debug)]
pub struct Claim(i32);

/// Claims `pid` (a child this process will reap through its own handle).
pub fn claim(pid: i32) -> Claim {
    *lock().entry(pid).or_default() += 1;
    Claim(pid)
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claims = lock();
        if let Some(n) = claims.get_mut(&self.0) {
            *n -= 1;
            if *n == 0 {
                claims.remove(&self.0);
            }
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<i32, usize>> {
    CLAIMS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes this process the reaper of its orphaned descendants
/// (`PR_SET_CHILD_SUBREAPER`). Call before the zygote starts.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// The children of every thread of this process, from
/// `/proc/self/task/*/children` (zombies included); `None` if the kernel
/// does not provide the file.
fn children() -> Option<Vec<i32>> {
    let mut found = false;
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        found = true;
        pids.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    found.then_some(pids)
}

/// Of `children`, those nobody claimed.
fn unclaimed(children: &[i32], claims: &BTreeMap<i32, usize>) -> Vec<i32> {
    children
        .iter()
        .copied()
        .filter(|p| !claims.contains_key(p))
        .collect()
}

/// Reaps `pid` if it has exited; whether it did.
fn reap_one(pid: i32) -> bool {
    match waitid(
        Id::Pid(Pid::from_raw(pid)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
    ) {
        Ok(WaitStatus::StillAlive) | Err(_) => false,
        Ok(status) => {
            tracing::debug!(pid, ?status, "reaped an orphaned descendant");
            true
        }
    }
}

/// Reaps every unclaimed child that has exited; returns their pids. Runs
/// without yielding, so no claim is taken meanwhile on this thread (where
/// emberd takes them).
pub fn reap_unclaimed() -> Vec<i32> {
    match children() {
        Some(children) => {
            let candidates = unclaimed(&children, &lock());
            candidates.into_iter().filter(|&p| reap_one(p)).collect()
        }
        None => reap_unclaimed_by_peeking(),
    }
}

/// Without `/proc/self/task/*/children`: looks at the first exited child
/// without reaping it and reaps it if unclaimed, until none is left or the
/// first is claimed (its owner reaps it; the next `SIGCHLD` looks again).
fn reap_unclaimed_by_peeking() -> Vec<i32> {
    let mut reaped = Vec::new();
    loop {
        let peek = waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        let Some(pid) = peek.ok().and_then(|s| s.pid()) else {
            return reaped;
        };
        if lock().contains_key(&pid.as_raw()) || !reap_one(pid.as_raw()) {
            return reaped;
        }
        reaped.push(pid.as_raw());
    }
}

/// Reaps unclaimed children now and after every `SIGCHLD`, for as long as
/// the runtime runs. Spawn it on the runtime thread that takes the claims.
pub async fn run() {
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "orphaned processes will not be reaped: no SIGCHLD handler");
            return;
        }
    };
    loop {
        reap_unclaimed();
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_count_and_release() {
        // Pids no test process has (above the kernel's pid_max).
        let (a, b) = (1 << 23, (1 << 23) + 1);
        let first = claim(a);
        let again = claim(a);
        let other = claim(b);
        let children = [a, b, (1 << 23) + 2];
        assert_eq!(unclaimed(&children, &lock()), [(1 << 23) + 2]);
        drop(first);
        assert_eq!(unclaimed(&children, &lock()), [(1 << 23) + 2]);
        drop(again);
        drop(other);
        assert_eq!(unclaimed(&children, &lock()), children);
    }

    #[test]
    fn lists_this_processs_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        let listed = children().expect("/proc/self/task/*/children");
        let _ = child.kill();
        let _ = child.wait();
        assert!(listed.contains(&pid), "{pid} not in {listed:?}");
    }
}
