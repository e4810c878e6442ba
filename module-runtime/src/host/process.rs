//! Process state a forked worker resets before it loads a module: signal
//! dispositions and mask, descriptor numbers, process name, parent-death
//! signal; and a zygote's own descriptors (inherited ones closed after
//! `exec`, the placeholders where workers put listeners). This is the one
//! place in the host that makes raw process-level calls; the fork itself is
//! `super::fork`'s.
//!
//! Descriptors: a worker closes exactly the descriptors its zygote owns (it
//! names them to [`super::fork::fork_worker`]), never by sweeping: every
//! other inherited descriptor belongs to a plugin (a log file, an epoll)
//! and stays open at its number.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Why a process-level step failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The caller has more than one thread (forking, or joining a cgroup
    /// thread by thread, is not safe then).
    #[error("process has {0} threads; this is done only single-threaded")]
    MultiThreaded(usize),
    /// Socket activation needs a descriptor number that something else
    /// (a plugin) holds.
    #[error("descriptor {fd} is held by a plugin: {listeners} listeners need descriptors 3 to {}", 2 + listeners)]
    DescriptorTaken {
        /// The number.
        fd: RawFd,
        /// Listeners to place.
        listeners: usize,
    },
    /// The expected parent did not become this process's parent in time.
    #[error("parent is {found}, not the supervisor {expected}, after {waited:?}")]
    NotReparented {
        /// The supervisor's pid.
        expected: i32,
        /// The parent at the deadline.
        found: i32,
        /// How long it waited.
        waited: Duration,
    },
    /// A system call failed.
    #[error("{call} failed")]
    Sys {
        /// The call.
        call: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
}

fn sys(call: &'static str) -> impl FnOnce(nix::Error) -> ProcessError {
    move |source| ProcessError::Sys { call, source }
}

/// The first descriptor of socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// How many descriptors from [`LISTEN_FDS_START`] a zygote reserves before
/// its plugins load ([`reserve_listener_fds`]), so that no plugin descriptor
/// sits where socket activation puts a module's listeners.
pub const RESERVED_FDS: RawFd = 16;

/// Descriptors [`LISTEN_FDS_START`]`..`[`LISTEN_FDS_START`]` + `[`RESERVED_FDS`]
/// held by a zygote (`/dev/null`, close-on-exec), dropped in each worker.
#[derive(Debug)]
pub struct ReservedFds(Vec<OwnedFd>);

impl ReservedFds {
    /// The placeholders (for the fork path to close in each worker).
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.0.iter().map(AsFd::as_fd)
    }
}

/// Fills every free descriptor number in the reserved block with a
/// placeholder. Call in the zygote before any plugin loads: a plugin's
/// descriptors then get numbers above the block, the block is the zygote's
/// own, and the worker (which drops the placeholders) can place listeners
/// there without closing anything of a plugin's.
pub fn reserve_listener_fds() -> Result<ReservedFds, ProcessError> {
    let end = LISTEN_FDS_START + RESERVED_FDS;
    let mut held = Vec::new();
    loop {
        // open(2) returns the lowest free number: the holes below `end` are
        // filled in order, and the first number at or past it ends the loop.
        let fd = nix::fcntl::open(
            c"/dev/null",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(sys("open(/dev/null)"))?;
        if fd.as_raw_fd() >= end {
            return Ok(ReservedFds(held));
        }
        held.push(fd);
    }
}

/// Closes every descriptor above stderr but `keep`: what a freshly
/// exec'd zygote inherited without close-on-exec (a test harness's, a
/// jobserver's) is not its plugins' and must not reach its workers. Call
/// once, first thing after `exec`.
///
/// # Safety
/// No object in this process may own a descriptor above 2 other than
/// `keep` (it would be closed under it).
pub unsafe fn close_inherited_fds(keep: RawFd) {
    let close = |from: RawFd, to: u32| {
        // SAFETY: close_range takes plain integers; the caller guarantees
        // nothing owns the descriptors it closes.
        let r = unsafe { libc::syscall(libc::SYS_close_range, from as u32, to, 0u32) };
        if r != 0 {
            // close_range is Linux 5.9+: on an older kernel, close what
            // /proc/self/fd lists in the range, one by one.
            close_listed(from, to);
        }
    };
    if keep > LISTEN_FDS_START {
        close(LISTEN_FDS_START, (keep - 1) as u32);
    }
    close(keep.max(LISTEN_FDS_START - 1) + 1, u32::MAX);
}

/// Closes the open descriptors in `from..=to` that `/proc/self/fd` lists
/// (the fallback of [`close_inherited_fds`]). The listing's own descriptor
/// is read to the end before anything is closed.
fn close_listed(from: RawFd, to: u32) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd: &RawFd| fd >= from && fd as u32 <= to)
        .collect();
    for fd in fds {
        // SAFETY: as in `close_inherited_fds`: nothing in this process owns
        // these descriptors (the listing's own is closed already, and a
        // close of it would fail with EBADF, harmlessly).
        unsafe { libc::close(fd) };
    }
}

/// Moves `fd` to the lowest free descriptor number from 3 (close-on-exec),
/// if that is lower than its own; otherwise gives it back as it is.
pub fn lowest_free_number(fd: OwnedFd) -> OwnedFd {
    match nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(LISTEN_FDS_START)) {
        Ok(new) if new < fd.as_raw_fd() => {
            // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor;
            // nothing else owns it. The old one is closed when `fd` drops.
            unsafe { OwnedFd::from_raw_fd(new) }
        }
        Ok(higher) => {
            // SAFETY: as above; the copy is not wanted and closed at once.
            drop(unsafe { OwnedFd::from_raw_fd(higher) });
            fd
        }
        Err(_) => fd,
    }
}

/// Lays out descriptors the way systemd's socket activation does, for
/// modules written against that convention: the `listeners` (given as
/// indices into `fds`, in order) become descriptors 3, 4, … and `fds` is
/// updated to the new numbers; `control` and every other descriptor are
/// first moved above that block. Returns how many listeners were placed.
/// A number in the block held by anything else (a plugin's descriptor, past
/// the zygote's [`RESERVED_FDS`]) is an error, never closed.
/// Must run while the process is single-threaded (it renumbers descriptors).
pub fn place_listeners(
    control: &mut OwnedFd,
    fds: &mut [OwnedFd],
    listeners: &[usize],
) -> Result<usize, ProcessError> {
    let n = listeners.len() as RawFd;
    if n == 0 {
        return Ok(0);
    }
    let floor = LISTEN_FDS_START + n;
    // Move everything out of [3, 3 + n) first, so the block is free.
    for fd in std::iter::once(&mut *control).chain(fds.iter_mut()) {
        let moved = nix::fcntl::fcntl(&*fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))
            .map_err(sys("fcntl(F_DUPFD_CLOEXEC)"))?;
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing
        // else owns it. Assigning drops (closes) the old number.
        *fd = unsafe { OwnedFd::from_raw_fd(moved) };
    }
    if let Some(taken) = (LISTEN_FDS_START..floor).find(|&fd| {
        // SAFETY: F_GETFD on a raw number only queries it (a free number
        // yields EBADF); no `BorrowedFd` is made for a number that may be
        // closed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags >= 0
    }) {
        return Err(ProcessError::DescriptorTaken {
            fd: taken,
            listeners: listeners.len(),
        });
    }
    for (i, &at) in listeners.iter().enumerate() {
        let target = LISTEN_FDS_START + i as RawFd;
        // SAFETY: `target` is below `floor`, where no descriptor is open
        // (ours were moved above it, and none other is, checked above), so
        // dup3 creates a descriptor nothing else owns; it is wrapped at once.
        let placed = unsafe {
            let r = libc::dup3(fds[at].as_raw_fd(), target, libc::O_CLOEXEC);
            if r < 0 {
                return Err(ProcessError::Sys {
                    call: "dup3",
                    source: nix::Error::last(),
                });
            }
            OwnedFd::from_raw_fd(r)
        };
        fds[at] = placed;
    }
    Ok(listeners.len())
}

/// Moves this process into the cgroups whose `tasks` files (cgroup v1,
/// opened for writing by the parent) are given, by writing `0` (the calling
/// thread) to each. The process must be single-threaded, so its one thread
/// is all of it: moving one's own single thread is the one migration for
/// which the kernel takes neither its global threadgroup lock nor the RCU
/// grace period that lock waits for (Linux 5.19 and later), ~0.1 ms instead
/// of 5–15 ms for a parent writing the pid to `cgroup.procs`.
pub fn join_cgroups(tasks: &[OwnedFd]) -> Result<(), ProcessError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ProcessError::MultiThreaded(threads));
    }
    for fd in tasks {
        nix::unistd::write(fd, b"0").map_err(sys("write(cgroup tasks)"))?;
    }
    Ok(())
}

/// Empties the signal mask and puts every catchable signal, real-time
/// signals included, back to its default disposition, except `SIGPIPE`,
/// which stays ignored as in any Rust program (a write to a closed socket is
/// an error, not a death). A zygote may have been started with signals
/// ignored (`nohup`, a shell, a service manager): `SIG_IGN` survives both
/// `exec` and `fork`, so nothing here trusts what was inherited.
pub fn reset_signals() -> Result<(), ProcessError> {
    let mut first_error =
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
            .map_err(sys("sigprocmask"))
            .err();
    // Every signal is attempted; the first failure is returned.
    for sig in 1..=libc::SIGRTMAX() {
        if let Err(e) = reset_one(sig) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn reset_one(sig: libc::c_int) -> Result<(), ProcessError> {
    if sig == libc::SIGKILL || sig == libc::SIGSTOP {
        return Ok(());
    }
    if (libc::SIGSYS + 1..libc::SIGRTMIN()).contains(&sig) {
        return reset_reserved_if_ignored(sig);
    }
    // SAFETY: `sigaction` is plain data; all-zero is a valid value
    // (empty mask, no flags) that the fields below complete.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = if sig == libc::SIGPIPE {
        libc::SIG_IGN
    } else {
        libc::SIG_DFL
    };
    // SAFETY: installing SIG_DFL/SIG_IGN runs no code of ours in signal
    // context; `act` is a valid, initialized struct.
    if unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) } != 0 {
        return Err(ProcessError::Sys {
            call: "sigaction",
            source: nix::Error::last(),
        });
    }
    Ok(())
}

/// The signals between `SIGSYS` and `SIGRTMIN` (32 and 33 with glibc:
/// NPTL's `SIGCANCEL` and `SIGSETXID`) belong to the C library, whose
/// `sigaction` refuses them. The C library only ever installs handlers on
/// them, so an ignored one was inherited through `exec` from whoever
/// started the zygote; that is put back to the default with the raw system
/// call. A handler (the C library's) is left alone.
fn reset_reserved_if_ignored(sig: libc::c_int) -> Result<(), ProcessError> {
    // The kernel's `struct sigaction`: on every Linux architecture Ember
    // builds for (x86_64, aarch64, riscv64, arm, x86) the handler comes
    // first, and an all-zero struct is SIG_DFL with no flags and an empty
    // mask, whether or not the architecture has `sa_restorer`. 32 bytes
    // cover handler, flags, restorer and the 8-byte mask.
    const SIGSET_SIZE: usize = 8;
    let mut old = [0u64; 4];
    // SAFETY: with a null new action, rt_sigaction only writes the current
    // action into `old`, which is large enough for the kernel's struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            std::ptr::null::<u64>(),
            old.as_mut_ptr(),
            SIGSET_SIZE,
        )
    };
    if r != 0 {
        return Err(ProcessError::Sys {
            call: "rt_sigaction",
            source: nix::Error::last(),
        });
    }
    if old[0] as libc::sighandler_t != libc::SIG_IGN {
        return Ok(());
    }
    let dfl = [0u64; 4];
    // SAFETY: installs SIG_DFL (all-zero action, see above), which runs no
    // code of ours and is the state the C library expects before it
    // installs its own handler.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            dfl.as_ptr(),
            std::ptr::null_mut::<u64>(),
            SIGSET_SIZE,
        )
    };
    if r != 0 {
        return Err(ProcessError::Sys {
            call: "rt_sigaction",
            source: nix::Error::last(),
        });
    }
    Ok(())
}

/// Blocks `sigs` in the calling thread (and threads it spawns later).
pub fn block_signals(sigs: &[Signal]) -> Result<SigSet, ProcessError> {
    let mut set = SigSet::empty();
    for s in sigs {
        set.add(*s);
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(sys("sigprocmask"))?;
    Ok(set)
}

/// How long a worker waits to be re-parented to its supervisor
/// ([`die_with_parent`]); the intermediate process exits right after the
/// fork, so this only bounds a wait on one that was stopped or killed.
pub const REPARENT_WAIT: Duration = Duration::from_secs(10);

/// Asks the kernel to `SIGKILL` this process when `parent` dies. A worker
/// forked through an intermediate process (the supervisor's zygote) is
/// re-parented to the supervisor, a child subreaper, when the intermediate
/// exits: first this waits, at most [`REPARENT_WAIT`], until `parent` is
/// this process's parent, since the parent-death signal follows whichever
/// process is the parent when it is set. Returns `false` if the expected
/// parent is gone (this process was re-parented elsewhere).
pub fn die_with_parent(parent: Option<nix::unistd::Pid>) -> Result<bool, ProcessError> {
    if let Some(p) = parent {
        if !await_parent(p, REPARENT_WAIT)? {
            return Ok(false);
        }
    }
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys("prctl(PR_SET_PDEATHSIG)"))?;
    // The parent may have died between the check and the flag.
    Ok(parent.is_none_or(|p| nix::unistd::getppid() == p))
}

/// Waits until `expected` is this process's parent: `Ok(true)`; `Ok(false)`
/// when the parent changed to another process (the expected one died) or
/// did not change within `limit`. Waits on a pidfd of the current parent,
/// which is readable once it has exited, and the kernel re-parents its
/// children before that.
fn await_parent(expected: nix::unistd::Pid, limit: Duration) -> Result<bool, ProcessError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + limit;
    let mut waited_on = None;
    loop {
        let now = nix::unistd::getppid();
        if now == expected {
            return Ok(true);
        }
        if waited_on.is_some_and(|w| w != now) || now.as_raw() == 1 {
            // Re-parented, but not to `expected`: it is gone.
            return Ok(false);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProcessError::NotReparented {
                expected: expected.as_raw(),
                found: now.as_raw(),
                waited: limit,
            });
        }
        let Ok(fd) = pidfd_open(now.as_raw()) else {
            // Gone already (and reaped): look again shortly.
            waited_on = Some(now);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        // The pidfd names whoever had that pid when it was opened: the
        // parent, unless it exited and its pid was reused meanwhile, which
        // the next getppid() shows (the parent changed).
        if nix::unistd::getppid() != now {
            continue;
        }
        waited_on = Some(now);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(sys("poll(pidfd)")(e)),
        }
    }
}

/// `pidfd_open(pid, 0)`.
fn pidfd_open(pid: i32) -> Result<OwnedFd, ProcessError> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(ProcessError::Sys {
            call: "pidfd_open",
            source: nix::Error::last(),
        });
    }
    // SAFETY: pidfd_open returned a new descriptor (close-on-exec) that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sets the process name: the kernel `comm` (first 15 bytes, shown by `ps -o
/// comm`, `top`) and, where the original command line is long enough, the
/// command line itself (`ps`, `/proc/PID/cmdline`).
pub fn set_process_name(name: &str) {
    if let Ok(c) = std::ffi::CString::new(
        name.as_bytes()
            .iter()
            .copied()
            .take(15)
            .collect::<Vec<u8>>(),
    ) {
        let _ = nix::sys::prctl::set_name(&c);
    }
    overwrite_cmdline(name);
}

/// Rewrites the initial argv area in place (the classic `setproctitle`).
/// The area is found once per process (a warm worker finds it while idle,
/// so the launch does not read `/proc` again).
fn overwrite_cmdline(name: &str) {
    static AREA: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    let Some((start, end)) = *AREA.get_or_init(argv_area) else {
        return;
    };
    let len = end - start;
    let bytes = name.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: [arg_start, arg_end) is this process's own initial argument
    // area on the main stack, mapped read-write for the process lifetime.
    // We write within it only, ending with NUL padding. The worker is
    // single-threaded here, and std::env::args() reading it later merely
    // sees the new name.
    unsafe {
        let p = start as *mut u8;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n);
        std::ptr::write_bytes(p.add(n), 0, len - n);
    }
}

/// `arg_start` and `arg_end` of this process, from `/proc/self/stat`.
fn argv_area() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the `comm` field, which may contain spaces: start at ')'.
    let rest = stat.rfind(')').map(|i| &stat[i + 2..])?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // arg_start and arg_end are fields 48 and 49 (1-based) of the whole
    // line, i.e. indices 45 and 46 after `pid (comm)`.
    let start = fields.get(45)?.parse::<usize>().ok()?;
    let end = fields.get(46)?.parse::<usize>().ok()?;
    if end <= start + 1 || start == 0 {
        return None;
    }
    Some((start, end))
}

/// Number of threads of this process.
pub fn thread_count() -> usize {
    super::plugins::thread_count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_a_cgroup_thread_by_thread_is_refused_with_several_threads() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let t = std::thread::spawn(move || nix::unistd::read(&r, &mut [0u8; 1]));
        let e = join_cgroups(&[w.try_clone().unwrap()]).unwrap_err();
        assert!(matches!(e, ProcessError::MultiThreaded(n) if n > 1), "{e}");
        nix::unistd::write(&w, b"x").unwrap();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_process_waits_for_no_one_when_its_parent_is_the_expected_one() {
        assert!(await_parent(nix::unistd::getppid(), Duration::ZERO).unwrap());
    }

    #[test]
    fn waiting_for_a_parent_that_never_comes_ends_at_the_deadline() {
        // Our parent (cargo) outlives the test: the wait runs out.
        let nobody = nix::unistd::Pid::from_raw(i32::MAX);
        let e = await_parent(nobody, Duration::from_millis(20)).unwrap_err();
        assert!(
            matches!(e, ProcessError::NotReparented { expected, .. } if expected == i32::MAX),
            "{e}"
        );
    }
}
