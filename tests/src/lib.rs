//! Shared helpers for the end-to-end tests: unique temp dirs, child
//! processes that are killed (by pid) and reaped when a test ends, passing
//! channel ends to a peer process, the example cdylibs and daemon binaries
//! built from the workspace, ([`daemon`]) a real `emberd` to drive, and
//! ([`containerd`], [`oci`]) a private containerd with module images.

pub mod chaos;
pub mod containerd;
pub mod daemon;
pub mod load;
pub mod oci;
pub mod procs;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A directory removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory named after the test and this process.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ember-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends SIGKILL to the child (by pid) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Waits up to `limit` for the child to exit on its own.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.0.try_wait() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `program args…` and waits for it to connect to a fresh Unix
/// socket (its path is the last argument), returning the child and the
/// connection used to pass it descriptors.
pub fn spawn_peer(dir: &TempDir, program: &str, args: &[&str]) -> (ChildGuard, UnixStream) {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = dir
        .path()
        .join(format!("peer-{}.sock", N.fetch_add(1, Ordering::Relaxed)));
    let listener = UnixListener::bind(&path).expect("bind peer socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let child = ChildGuard(
        Command::new(program)
            .args(args)
            .arg(&path)
            .spawn()
            .expect("spawn peer"),
    );
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                return (child, stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("peer never connected: {e}"),
        }
    }
}

/// Sends descriptors with a one-byte tag.
pub fn send_fds(sock: &UnixStream, tag: u8, fds: &[BorrowedFd<'_>]) {
    shm_ipc::fdpass::send_with_fds(sock.as_fd(), &[tag], fds).expect("send fds");
}

/// Receives one tagged message with its descriptors.
pub fn recv_fds(sock: &UnixStream) -> (Option<u8>, Vec<OwnedFd>) {
    let mut buf = [0u8; 1];
    let (n, fds) = shm_ipc::fdpass::recv_with_fds(sock.as_fd(), &mut buf).expect("recv fds");
    ((n == 1).then_some(buf[0]), fds)
}

/// The message of the typed shm-ipc tests (`ipc-peer typed-echo-server`
/// answers each with itself).
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Echo {
    /// A number the server returns unchanged.
    pub n: u64,
    /// Bytes the server returns unchanged.
    pub bytes: Vec<u8>,
}

/// Every example and fixture crate the tests load.
pub const EXAMPLES: &[&str] = &[
    "hello",
    "kv",
    "greeter",
    "catalog",
    "fixture-panic-start",
    "fixture-segfault",
    "fixture-abort",
    "fixture-never-ready",
    "fixture-unbounded-alloc",
    "fixture-wrong-abi",
    "fixture-ignores-stop",
    "fixture-wrong-sdk",
    "fixture-panic-plugin",
    "fixture-hangs-in-load",
    "fixture-hostile",
    "fixture-fork-probe",
    "fixture-fork-probe-plugin",
    "fixture-scribbler",
];

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_owned()
}

/// `target/<profile>` of the running test binary
/// (`target/<profile>/deps/<test>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_owned()
}

/// Builds the example cdylibs and the `emberd`/`emberctl` binaries once per
/// test binary, with the same cargo, target directory and profile as the
/// tests themselves, so that a fresh clone plus `cargo test --workspace`
/// works and no test runs a stale daemon.
pub fn build_examples() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile = profile_dir();
        let target = profile.parent().expect("target dir").to_owned();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(workspace_root())
            .arg("build")
            .arg("--quiet")
            .arg("--target-dir")
            .arg(&target);
        if profile.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        cmd.arg("-p").arg("supervisor");
        for e in EXAMPLES {
            cmd.arg("-p").arg(e);
        }
        let status = cmd.status().expect("run cargo build for the examples");
        assert!(
            status.success(),
            "building the examples and binaries failed"
        );
    });
}

/// Path of the cdylib built for crate `name` (built on first use).
pub fn artifact(name: &str) -> PathBuf {
    build_examples();
    profile_dir().join(format!("lib{}.so", name.replace('-', "_")))
}

/// One HTTP/1.1 GET over a fresh connection (`Connection: close`): status
/// and body.
pub fn http_get_at(addr: impl std::net::ToSocketAddrs, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect for GET");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send GET");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read reply");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    (status, body)
}

/// How long a test waits for something to happen before it fails. A guard
/// against hangs, not a speed target: the events waited for take
/// milliseconds, and speed is measured in `benches/`.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Calls `f` every `every` until it returns `Ok`, or until [`PATIENCE`] has
/// passed; then `Err` with what was last seen.
pub fn poll<T>(every: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let give_up = Instant::now() + PATIENCE;
    loop {
        let last = match f() {
            Ok(v) => return Ok(v),
            Err(last) => last,
        };
        if Instant::now() >= give_up {
            return Err(last);
        }
        std::thread::sleep(every);
    }
}

/// Stops a child: SIGTERM by its pid, then waits for its exit (SIGKILL if
/// it has not exited after [`PATIENCE`]); its status.
pub fn stop_child(c: &mut Child) -> Option<std::process::ExitStatus> {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    match poll(Duration::from_millis(20), || match c.try_wait() {
        Ok(Some(st)) => Ok(st),
        Ok(None) => Err("running".into()),
        Err(e) => Err(e.to_string()),
    }) {
        Ok(st) => Some(st),
        Err(_) => {
            let _ = c.kill();
            c.wait().ok()
        }
    }
}

/// Waits for a child to exit on its own (within [`PATIENCE`]), without
/// reaping it.
pub fn exited_by_itself(c: &mut Child) -> bool {
    poll(Duration::from_millis(20), || match c.try_wait() {
        Ok(Some(_)) => Ok(()),
        _ => Err("running".into()),
    })
    .is_ok()
}

/// Like [`poll`], but fails the test, naming `what` and what was last seen.
pub fn poll_until<T>(what: &str, every: Duration, f: impl FnMut() -> Result<T, String>) -> T {
    poll(every, f).unwrap_or_else(|last| panic!("gave up waiting for {what}: {last}"))
}
