//! emberd's descriptor limit: raised at start-up from the soft limit to the
//! hard one, as systemd advises daemons (`systemd.exec(5)`,
//! `LimitNOFILE=`): emberd holds a few descriptors per running module
//! (the worker's pidfd, its control socket, the module's log file) and
//! would run out at a few hundred modules under the default soft limit of
//! 1024. The zygote, and so every worker, gets the original soft limit
//! back (processes that use `select(2)` must not see more than 1024), and
//! a module's `limits.open_files` still applies on top.

use std::sync::OnceLock;

/// The soft limit emberd started with, once [`raise`] ran.
static ORIGINAL_SOFT: OnceLock<libc::rlim_t> = OnceLock::new();

/// The current `RLIMIT_NOFILE` (soft, hard).
// `rlim_t` is `u64` on 64-bit Linux, not on every target.
#[allow(clippy::unnecessary_cast)]
pub fn get() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes a valid, exclusively borrowed rlimit on our
    // stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur as u64, r.rlim_max as u64))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one and remembers the
/// original soft limit for [`restore_in_child`]. Returns (from, to).
pub fn raise() -> std::io::Result<(u64, u64)> {
    let (soft, hard) = get()?;
    let _ = ORIGINAL_SOFT.set(soft as libc::rlim_t);
    if soft < hard {
        let r = libc::rlimit {
            rlim_cur: hard as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit only reads a valid rlimit on our stack.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((soft, hard.max(soft)))
}

/// Puts the original soft limit back, in a child between fork and exec
/// (async-signal-safe: one `getrlimit` and one `setrlimit`, no
/// allocation). Does nothing if [`raise`] never ran.
pub fn restore_in_child() -> std::io::Result<()> {
    let Some(&soft) = ORIGINAL_SOFT.get() else {
        return Ok(());
    };
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as in `get`; both calls are async-signal-safe.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    r.rlim_cur = soft.min(r.rlim_max);
    // SAFETY: setrlimit only reads a valid rlimit on our stack.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// How many descriptors this process has open (`/proc/self/fd`, less the
/// one reading it). Blocking: call on the blocking pool.
pub fn open_count() -> std::io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1) as u64)
}
