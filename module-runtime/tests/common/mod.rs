//! Test harness: builds the example cdylibs, starts the real test zygote
//! (`ember-test-zygote`) as a process, and drives forked workers over their
//! real control sockets.

#![allow(dead_code)]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use module_runtime::abi::GrantKind;
use module_runtime::host::PluginSpec;
use module_runtime::protocol::{
    Failure, FromWorker, FromZygote, Grant, LaunchOrder, ParentChannel, State, ToWorker, ToZygote,
    WorkerExit,
};
use module_runtime::transport::{self, Link};

#[allow(unused_imports)]
pub use ember_tests::{artifact, workspace_root};

/// Text of `examples/<dir>/module.toml`.
pub fn manifest(dir: &str) -> String {
    std::fs::read_to_string(
        workspace_root()
            .join("examples")
            .join(dir)
            .join("module.toml"),
    )
    .unwrap()
}

/// A unique temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ember-mr-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test zygote process and its control socket.
pub struct Zygote {
    child: Child,
    link: Option<Link<ToZygote, FromZygote>>,
    next_id: u64,
    /// Workers' ends reported but not asked for yet.
    pending: Vec<(i32, WorkerExit)>,
}

/// A worker's end as the tests compare it: `exit PID CODE` or
/// `signal PID NAME`.
fn describe(pid: i32, exit: WorkerExit) -> String {
    match exit {
        WorkerExit::Code(c) => format!("exit {pid} {c}"),
        WorkerExit::Signal(s) => match nix::sys::signal::Signal::try_from(s) {
            Ok(sig) => format!("signal {pid} {sig}"),
            Err(_) => format!("signal {pid} {s}"),
        },
    }
}

impl Zygote {
    /// Starts a zygote that loads `plugins` (cdylib, TOML config) first.
    pub fn start(plugins: &[(PathBuf, &str)]) -> Self {
        let (z, msg) = Self::spawn(plugins);
        assert_eq!(msg, "ready", "zygote failed to start: {msg}");
        z
    }

    /// Starts a zygote that must refuse to start (a plugin fails to
    /// initialize): returns its `error: …` message and how it exited.
    pub fn start_failing(plugins: &[(PathBuf, &str)]) -> (String, std::process::ExitStatus) {
        let (mut z, msg) = Self::spawn(plugins);
        assert!(msg.starts_with("error: "), "zygote should fail: {msg}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = z.child.try_wait().unwrap() {
                return (msg, st);
            }
            assert!(Instant::now() < deadline, "failed zygote did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the zygote and says hello: `ready`, or `error: REASON`.
    fn spawn(plugins: &[(PathBuf, &str)]) -> (Self, String) {
        let (ours, theirs) = transport::socket_pair().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember-test-zygote"));
        let raw = theirs.as_raw_fd();
        cmd.stdin(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only
        // calls dup2, which is async-signal-safe; dup2 also clears
        // close-on-exec on descriptor 3.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn ember-test-zygote");
        drop(theirs);
        let mut link = Link::new(ours);
        let plugins = plugins
            .iter()
            .map(|(path, config)| PluginSpec {
                path: path.clone(),
                config: toml::from_str(config).expect("plugin config is TOML"),
            })
            .collect();
        link.send(&ToZygote::Hello { plugins }, &[]).unwrap();
        let msg = match link.recv_timeout(Some(Duration::from_secs(60))) {
            Ok((FromZygote::Ready { pid, .. }, _)) => {
                assert_eq!(pid as u32, child.id());
                "ready".to_owned()
            }
            Ok((FromZygote::HelloFailed { reason }, _)) => format!("error: {reason}"),
            other => panic!("zygote did not answer hello: {other:?}"),
        };
        let z = Self {
            child,
            link: Some(link),
            next_id: 0,
            pending: Vec::new(),
        };
        (z, msg)
    }

    fn link(&mut self) -> &mut Link<ToZygote, FromZygote> {
        self.link.as_mut().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the zygote process is still running.
    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Forks a worker and checks it reports `Idle`.
    pub fn fork(&mut self) -> Worker {
        self.next_id += 1;
        let id = self.next_id;
        self.link().send(&ToZygote::Fork { id }, &[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .link()
                .recv_timeout(Some(left))
                .expect("no reply to fork")
            {
                (FromZygote::Forked { id: got, pid }, mut fds) if got == id => {
                    let chan = ParentChannel::new(fds.pop().expect("worker socket attached"));
                    let mut w = Worker {
                        pid,
                        chan,
                        events: Vec::new(),
                    };
                    match w.next(Duration::from_secs(10)) {
                        FromWorker::Idle { pid, .. } => assert_eq!(pid as i32, w.pid),
                        other => panic!("expected Idle, got {other:?}"),
                    }
                    return w;
                }
                (FromZygote::Reaped { pid, exit }, _) => self.pending.push((pid, exit)),
                other => panic!("unexpected answer to fork: {other:?}"),
            }
        }
    }

    /// Waits for the zygote to report worker `pid`'s end: `exit PID CODE` or
    /// `signal PID NAME`.
    pub fn wait_exit(&mut self, pid: i32, timeout: Duration) -> String {
        if let Some(i) = self.pending.iter().position(|(p, _)| *p == pid) {
            let (p, exit) = self.pending.remove(i);
            return describe(p, exit);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.link().recv_timeout(Some(left)) {
                Ok((FromZygote::Reaped { pid: p, exit }, _)) if p == pid => {
                    return describe(p, exit)
                }
                Ok((FromZygote::Reaped { pid: p, exit }, _)) => self.pending.push((p, exit)),
                Ok(other) => panic!("unexpected zygote message: {other:?}"),
                Err(e) => panic!("worker {pid} did not exit in time: {e}"),
            }
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Closing the socket makes the zygote kill its workers and exit.
        drop(self.link.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A forked worker seen from its parent.
pub struct Worker {
    pub pid: i32,
    pub chan: ParentChannel,
    /// Every message received so far.
    pub events: Vec<FromWorker>,
}

impl Worker {
    fn next(&mut self, timeout: Duration) -> FromWorker {
        let (m, _) = self.chan.recv_timeout(Some(timeout)).unwrap_or_else(|e| {
            panic!(
                "worker {}: no message ({e}); so far: {:#?}",
                self.pid, self.events
            )
        });
        self.events.push(m.clone());
        m
    }

    /// Sends a launch order with `grants` and their descriptors.
    pub fn launch(
        &mut self,
        artifact: &Path,
        manifest: &str,
        replica: u32,
        grants: Vec<(GrantKind, &str, Vec<OwnedFd>)>,
    ) {
        let mut fds = Vec::new();
        let mut gs = Vec::new();
        for (kind, name, f) in grants {
            assert_eq!(f.len(), kind.fd_count());
            gs.push(Grant {
                kind,
                name: name.into(),
            });
            fds.extend(f);
        }
        let order = LaunchOrder {
            artifact: artifact.to_owned(),
            manifest: manifest.to_owned(),
            replica,
            memory_enforced: false,
            grants: gs,
            sandbox: None,
        };
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        self.chan.send(&ToWorker::Launch(order), &borrowed).unwrap();
    }

    /// Waits for a message matching `pred`, failing on a `Failed` report.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&FromWorker) -> bool,
    ) -> FromWorker {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.next(deadline.saturating_duration_since(Instant::now()));
            if pred(&m) {
                return m;
            }
            if let FromWorker::Failed(f) = &m {
                panic!(
                    "worker {} failed: {f}; events: {:#?}",
                    self.pid, self.events
                );
            }
        }
    }

    pub fn wait_state(&mut self, state: State, timeout: Duration) {
        self.wait_for(
            timeout,
            |m| matches!(m, FromWorker::Transition { state: s, .. } if *s == state),
        );
    }

    /// Waits for the failure report.
    pub fn wait_failure(&mut self, timeout: Duration) -> Failure {
        let deadline = Instant::now() + timeout;
        loop {
            if let FromWorker::Failed(f) =
                self.next(deadline.saturating_duration_since(Instant::now()))
            {
                return f;
            }
        }
    }

    pub fn stop(&mut self, deadline: Duration) {
        self.chan.send(&ToWorker::Stop { deadline }, &[]).unwrap();
    }

    pub fn logs(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                FromWorker::Log {
                    target, message, ..
                } => Some(format!("{target}: {message}")),
                _ => None,
            })
            .collect()
    }
}

/// One HTTP GET over a fresh connection; returns (status, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    ember_tests::http_get_at(addr, path)
}

/// `(rss, pss, private)` in KiB from `/proc/PID/smaps_rollup`.
pub fn smaps_rollup(pid: i32) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        field("Rss:"),
        field("Pss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
    )
}

/// `Rss` and `Pss` in KiB of the one mapping in `/proc/PID/smaps` whose
/// line names `needle`.
pub fn smaps_mapping(pid: u32, needle: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut lines = text.lines().skip_while(|l| !l.contains(needle));
    assert!(lines.next().is_some(), "no mapping {needle} in {pid}");
    // Fields follow until the next mapping's header line (which has an
    // address range, hence a '-' before the first space).
    let fields: Vec<&str> = lines
        .take_while(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|f| f.ends_with(':'))
        })
        .collect();
    let field = |name: &str| -> u64 {
        fields
            .iter()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} for {needle} in {pid}"))
    };
    (field("Rss:"), field("Pss:"))
}

/// The signal masks of one task from its `status` file: `(SigBlk, SigIgn,
/// SigCgt)`, each as the set of signal numbers.
pub fn signal_masks(status_path: &Path) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let text = std::fs::read_to_string(status_path).unwrap();
    let set = |name: &str| -> Vec<i32> {
        let hex = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {}", status_path.display()))
            .trim();
        let bits = u64::from_str_radix(hex, 16).unwrap();
        (1..=64).filter(|s| bits & (1u64 << (s - 1)) != 0).collect()
    };
    (set("SigBlk:"), set("SigIgn:"), set("SigCgt:"))
}
