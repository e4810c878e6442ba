//! The memory watch: `limits.memory` where no cgroup memory controller
//! holds it. One emberd thread (`ember-memwatch`, started on first use)
//! samples every watched worker's private resident memory each
//! [`EVERY`] and reports a worker whose private memory grew past its limit
//! since its launch; the instance's task then records the failure
//! (`MemoryLimitExceeded`) and kills the worker. Nothing of it runs in the
//! worker, so an idle module is never woken for it, and the thread sleeps
//! without a timeout while nothing is watched.
//!
//! # What counts
//!
//! A worker's *private* resident memory: its anonymous pages, what
//! `/proc/PID/status` shows as `RssAnon`. It is read from
//! `/proc/PID/statm` as `resident − shared`: the kernel (`task_statm`)
//! counts file, shmem and anonymous pages in `resident` and file and shmem
//! pages in `shared`, so the difference is the same `MM_ANONPAGES` counter
//! as `RssAnon` (one short line, no walk of the mappings, no mmap lock). It
//! holds the heap, stacks, private anonymous mappings, and every private
//! copy a write makes of a `MAP_PRIVATE` page (copy-on-write of a page
//! inherited from the zygote, of a library's data, of a private file
//! mapping). It leaves out pages of files (code, files mapped read-only)
//! and of shmem (memfds and `MAP_SHARED` anonymous memory): a plugin's
//! sealed shared table is a memfd mapped shared, so a module that reads all
//! of it is charged nothing for it. Counting the whole resident set
//! (`statm` resident, the old in-worker watchdog) charged it in full.
//!
//! The baseline is taken before the launch order is sent: what the worker
//! inherited from the zygote (shared with it copy-on-write) is not the
//! module's. Not counted either: shmem a module creates itself (a memfd it
//! fills). This fallback catches a module that leaks or overgrows; a
//! cgroup, which charges shmem to whoever created it, is what bounds a
//! hostile one. The worker also caps its address space (`RLIMIT_AS`, the
//! limit plus 4 GiB above what it had mapped at launch), which bounds even
//! that, and what a module allocates between two samples.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How often each watched worker is sampled: a module overshoots its limit
/// by at most what it allocates in this time (a sample costs a few
/// microseconds of emberd's time per worker).
pub const EVERY: Duration = Duration::from_millis(100);

/// A worker's private memory grew past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// Bytes of private memory it gained since its launch.
    pub grown: u64,
    /// `limits.memory`, bytes.
    pub limit: u64,
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "private resident memory grew by {} MiB, limit is {} MiB (limits.memory)",
            self.grown >> 20,
            self.limit >> 20
        )
    }
}

/// Why a worker cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The watch thread could not be started.
    #[error("cannot start the memory watch thread")]
    Thread(#[source] std::io::Error),
    /// The watch thread is gone.
    #[error("the memory watch thread is gone")]
    Gone,
    /// The worker's `statm` could not be opened or read.
    #[error("cannot read /proc/{pid}/statm")]
    Statm {
        /// The worker.
        pid: i32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The worker exited before its baseline was taken.
    #[error("worker {pid} exited before its memory could be watched")]
    Exited {
        /// The worker.
        pid: i32,
    },
}

/// A watch in place: [`Watching::started`] resolves once the baseline was
/// taken (launch the module after that), [`Watching::over`] if the worker
/// grows past its limit. Dropping `over` ends the watch.
#[derive(Debug)]
pub struct Watching {
    /// The baseline was taken, or why the worker cannot be watched.
    pub started: oneshot::Receiver<Result<(), WatchError>>,
    /// Sent once, when the worker is over its limit (the watch ends then).
    pub over: oneshot::Receiver<Exceeded>,
}

struct Request {
    pid: i32,
    pidfd: OwnedFd,
    limit: u64,
    started: oneshot::Sender<Result<(), WatchError>>,
    over: oneshot::Sender<Exceeded>,
}

/// The handle of the watch thread; started on the first [`MemoryWatch::watch`].
#[derive(Debug, Default)]
pub struct MemoryWatch {
    tx: OnceLock<mpsc::Sender<Request>>,
}

impl MemoryWatch {
    /// A watch whose thread is not started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the watch thread was started.
    pub fn started(&self) -> bool {
        self.tx.get().is_some()
    }

    /// Watches worker `pid` (`pidfd` refers to it) against `limit` bytes of
    /// private memory grown from now on. Call while the worker runs no
    /// module code yet, and await [`Watching::started`] before it does.
    pub fn watch(
        &self,
        pid: i32,
        pidfd: BorrowedFd<'_>,
        limit: u64,
    ) -> Result<Watching, WatchError> {
        let tx = match self.tx.get() {
            Some(tx) => tx,
            None => {
                let (tx, rx) = mpsc::channel();
                std::thread::Builder::new()
                    .name("ember-memwatch".into())
                    .spawn(move || run(rx))
                    .map_err(WatchError::Thread)?;
                // Another caller may have started one meanwhile: then ours
                // sees its channel closed and ends.
                let _ = self.tx.set(tx);
                self.tx.get().ok_or(WatchError::Gone)?
            }
        };
        let pidfd = pidfd
            .try_clone_to_owned()
            .map_err(|source| WatchError::Statm { pid, source })?;
        let (started_tx, started) = oneshot::channel();
        let (over_tx, over) = oneshot::channel();
        tx.send(Request {
            pid,
            pidfd,
            limit,
            started: started_tx,
            over: over_tx,
        })
        .map_err(|_| WatchError::Gone)?;
        Ok(Watching { started, over })
    }
}

/// One watched worker.
struct Watched {
    /// Its `/proc/PID/statm`, opened while it ran: it stays this process's
    /// (a later process with the same pid has another `/proc` entry), and
    /// reads fail once it is reaped.
    statm: std::fs::File,
    baseline: u64,
    limit: u64,
    over: oneshot::Sender<Exceeded>,
}

/// Opens worker `pid`'s `statm` and takes its baseline.
fn open(pid: i32, pidfd: BorrowedFd<'_>) -> Result<(std::fs::File, u64), WatchError> {
    let statm_err = |source| WatchError::Statm { pid, source };
    let statm = std::fs::File::open(format!("/proc/{pid}/statm")).map_err(statm_err)?;
    // The pid named our worker when the file was opened if the worker is
    // still alive now (its pid cannot have been reused meanwhile).
    if exited(pidfd) {
        return Err(WatchError::Exited { pid });
    }
    let baseline = private_bytes(&statm).map_err(statm_err)?;
    Ok((statm, baseline))
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable).
fn exited(pidfd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// The private (anonymous) resident bytes in a `/proc/PID/statm`.
fn private_bytes(statm: &std::fs::File) -> std::io::Result<u64> {
    let mut buf = [0u8; 160];
    let n = statm.read_at(&mut buf, 0)?;
    let text = std::str::from_utf8(&buf[..n]).unwrap_or_default();
    parse_private_pages(text)
        .map(|pages| pages * page_size())
        .ok_or_else(|| std::io::Error::other(format!("unexpected statm: {text:?}")))
}

/// `resident − shared` of a `statm` line (`size resident shared text lib
/// data dt`, in pages): the anonymous pages.
fn parse_private_pages(statm: &str) -> Option<u64> {
    let mut fields = statm.split_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    Some(resident.saturating_sub(shared))
}

fn page_size() -> u64 {
    static SIZE: OnceLock<u64> = OnceLock::new();
    *SIZE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |v| v as u64)
    })
}

/// The watch thread: blocks while nothing is watched, else samples every
/// worker each [`EVERY`] and takes new workers in between.
fn run(rx: mpsc::Receiver<Request>) {
    let mut watched: Vec<Watched> = Vec::new();
    let mut next = Instant::now() + EVERY;
    loop {
        let req = if watched.is_empty() {
            match rx.recv() {
                Ok(r) => Some(r),
                Err(mpsc::RecvError) => return,
            }
        } else {
            match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        if let Some(r) = req {
            match open(r.pid, r.pidfd.as_fd()) {
                Ok((statm, baseline)) => {
                    if watched.is_empty() {
                        next = Instant::now() + EVERY;
                    }
                    watched.push(Watched {
                        statm,
                        baseline,
                        limit: r.limit,
                        over: r.over,
                    });
                    let _ = r.started.send(Ok(()));
                }
                Err(e) => {
                    let _ = r.started.send(Err(e));
                }
            }
            continue;
        }
        next = Instant::now() + EVERY;
        let mut i = 0;
        while i < watched.len() {
            let w = &watched[i];
            // Nobody waits for a report any more: the instance is over.
            if w.over.is_closed() {
                watched.swap_remove(i);
                continue;
            }
            match private_bytes(&w.statm) {
                Ok(now) if now.saturating_sub(w.baseline) > w.limit => {
                    let w = watched.swap_remove(i);
                    let _ = w.over.send(Exceeded {
                        grown: now.saturating_sub(w.baseline),
                        limit: w.limit,
                    });
                }
                Ok(_) => i += 1,
                // Reaped: nothing left to watch.
                Err(_) => {
                    watched.swap_remove(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};

    fn read_all(path: &str) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn statm_private_pages_are_resident_minus_shared() {
        assert_eq!(parse_private_pages("1000 300 120 5 0 400 0\n"), Some(180));
        assert_eq!(parse_private_pages("1000 3"), None);
        assert_eq!(parse_private_pages(""), None);
    }

    /// A forked child that maps `bytes` of anonymous memory, private or
    /// shared (shmem), touches it when told through a pipe, says so, and
    /// then waits to be killed. Killed and reaped when dropped.
    struct Toucher {
        pid: i32,
        pidfd: OwnedFd,
        go: OwnedFd,
        done: OwnedFd,
    }

    impl Toucher {
        fn spawn(bytes: usize, shared: bool) -> Self {
            let (go_r, go_w) = nix::unistd::pipe().unwrap();
            let (done_r, done_w) = nix::unistd::pipe().unwrap();
            let flags = libc::MAP_ANONYMOUS
                | if shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
            // SAFETY: the child only makes system calls (read, mmap, write,
            // pause, _exit) and writes into its own fresh mapping: nothing
            // that could take a lock another thread of this test process
            // held at the fork.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let mut b = [0u8; 1];
                // SAFETY: see above; every pointer is to this child's own
                // stack or to the mapping it just made, of `bytes` bytes.
                unsafe {
                    libc::read(go_r.as_raw_fd(), b.as_mut_ptr().cast(), 1);
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        bytes,
                        libc::PROT_READ | libc::PROT_WRITE,
                        flags,
                        -1,
                        0,
                    );
                    if p == libc::MAP_FAILED {
                        libc::_exit(1);
                    }
                    let mut i = 0;
                    while i < bytes {
                        *p.cast::<u8>().add(i) = 1;
                        i += 4096;
                    }
                    libc::write(done_w.as_raw_fd(), b.as_ptr().cast(), 1);
                    loop {
                        libc::pause();
                    }
                }
            }
            // SAFETY: pidfd_open returns a new descriptor (or -1) for our child.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
            assert!(fd >= 0, "pidfd_open failed");
            // SAFETY: `fd` was just opened and is owned by nothing else.
            let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
            Toucher {
                pid,
                pidfd,
                go: go_w,
                done: done_r,
            }
        }

        /// Tells it to touch its memory and waits until it has.
        fn touch(&self) {
            nix::unistd::write(&self.go, b"g").unwrap();
            let mut b = [0u8; 1];
            assert_eq!(nix::unistd::read(self.done.as_fd(), &mut b).unwrap(), 1);
        }
    }

    impl Drop for Toucher {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn private_growth_is_reported_and_shared_memory_is_not_counted() {
        const LIMIT: u64 = 16 << 20;
        const SIZE: usize = 64 << 20;
        let shared = Toucher::spawn(SIZE, true);
        let private = Toucher::spawn(SIZE, false);
        let watch = MemoryWatch::new();
        let mut shared_w = watch
            .watch(shared.pid, shared.pidfd.as_fd(), LIMIT)
            .unwrap();
        let private_w = watch
            .watch(private.pid, private.pidfd.as_fd(), LIMIT)
            .unwrap();
        shared_w.started.await.unwrap().unwrap();
        private_w.started.await.unwrap().unwrap();
        assert!(watch.started());

        // The shared mapping first: the private one is touched only after,
        // so the sample that finds it over its limit also saw the shared
        // one fully touched.
        shared.touch();
        let status = read_all(&format!("/proc/{}/status", shared.pid));
        assert!(
            status.lines().any(|l| l.starts_with("RssShmem:")
                && l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
                    >= (SIZE as u64 >> 10)),
            "the shared mapping is resident: {status}"
        );
        private.touch();
        let over = tokio::time::timeout(Duration::from_secs(60), private_w.over)
            .await
            .expect("the private toucher is reported")
            .unwrap();
        assert_eq!(over.limit, LIMIT);
        // Reported by the first sample over the limit, maybe mid-touch.
        assert!(over.grown > LIMIT, "{over:?}");
        assert!(
            over.to_string()
                .starts_with("private resident memory grew by "),
            "{over}"
        );
        assert!(
            matches!(
                shared_w.over.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ),
            "shared memory was counted"
        );
    }

    #[test]
    fn statm_private_bytes_match_rss_anon() {
        // An idle process: its counters do not move while we read.
        let t = Toucher::spawn(8 << 20, false);
        t.touch();
        let statm = std::fs::File::open(format!("/proc/{}/statm", t.pid)).unwrap();
        let private = private_bytes(&statm).unwrap();
        let status = read_all(&format!("/proc/{}/status", t.pid));
        let rss_anon_kib: u64 = status
            .lines()
            .find(|l| l.starts_with("RssAnon:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap();
        assert_eq!(private, rss_anon_kib << 10, "{status}");
        assert!(private >= 8 << 20);
    }

    #[test]
    fn a_worker_gone_before_its_baseline_cannot_be_watched() {
        let t = Toucher::spawn(4096, false);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(t.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        // Wait until it is dead (its pidfd turns readable), not reaped.
        let mut fds = [nix::poll::PollFd::new(
            t.pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE).unwrap();
        let watch = MemoryWatch::new();
        let w = watch.watch(t.pid, t.pidfd.as_fd(), 1 << 20).unwrap();
        let started = w.started.blocking_recv().unwrap();
        assert!(
            matches!(started, Err(WatchError::Exited { pid }) if pid == t.pid),
            "{started:?}"
        );
    }
}
