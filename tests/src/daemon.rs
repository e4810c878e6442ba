//! A real `emberd` in its own temp dir, driven by the real `emberctl` or a
//! raw Varlink connection: the harness of the end-to-end tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{artifact, build_examples, poll, poll_until, profile_dir, TempDir};

/// Path of the built `emberd` (built with the examples on first use).
pub fn emberd() -> PathBuf {
    build_examples();
    profile_dir().join("emberd")
}

/// Path of the built `emberctl` (built with the examples on first use).
pub fn emberctl() -> PathBuf {
    build_examples();
    profile_dir().join("emberctl")
}

/// Fast lifecycle settings for tests: short back-off and deadlines.
pub const FAST: &str = "[lifecycle]\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\nstop_timeout_ms = 1000\nstart_timeout_ms = 5000\n";

/// A running emberd; SIGTERM and reaped on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
}

impl Daemon {
    pub fn start(config: &str) -> Self {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Self {
        let mut d = Self::in_dir(TempDir::new("d"), config);
        d.spawn(env);
        d
    }

    /// An emberd not started yet, its files in `dir`: `config` written to
    /// `emberd.toml`, the socket `ctl.sock`, the state dir `state`.
    pub fn in_dir(dir: TempDir, config: &str) -> Self {
        let cfg = dir.path().join("emberd.toml");
        std::fs::write(&cfg, config).unwrap();
        Daemon {
            child: None,
            socket: dir.path().join("ctl.sock"),
            state: dir.path().join("state"),
            config: cfg,
            dir,
        }
    }

    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        self.spawn_nowait(env);
        let child = self.child.as_mut().unwrap();
        poll_until("emberd's socket", Duration::from_millis(20), || {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("emberd exited early: {st}");
            }
            UnixStream::connect(&self.socket)
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }

    /// Starts emberd on this directory's state and socket without waiting
    /// for it to serve (to kill it while it starts).
    pub fn spawn_nowait(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(emberd());
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .env("EMBER_LOG", "error")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(emberctl())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// `emberctl ARGS`, which must succeed (its stderr is the message if not).
    pub fn ctl_ok(&self, args: &[&str]) -> Output {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "emberctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ctl(&a);
        assert!(
            out.status.success(),
            "emberctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY-free: plain kill(2) on our own child.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t0 = Instant::now();
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Waits until `f` holds for the module's status.
    pub fn wait_status(&self, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        poll_until(what, Duration::from_millis(30), || {
            let out = self.ctl(&["status", name, "--json"]);
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            if f(&v["status"]) {
                Ok(v["status"].clone())
            } else {
                Err(v.to_string())
            }
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A module directory running the real `hello` example under `name`.
pub fn module_dir(parent: &Path, name: &str, version: &str) -> PathBuf {
    let d = real_module(parent, name, "hello", "");
    let m = d.join("module.toml");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("version = \"1.0.0\"", &format!("version = {version:?}"));
    std::fs::write(m, text).unwrap();
    d
}

/// A raw Varlink connection.
pub struct Raw {
    pub s: UnixStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s, buf: Vec::new() }
    }

    pub fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    pub fn send(&mut self, v: Value) {
        let mut b = serde_json::to_vec(&v).unwrap();
        b.push(0);
        self.send_bytes(&b).unwrap();
    }

    /// Next reply, or None at EOF.
    pub fn recv(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == 0) {
                let frame: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&frame[..frame.len() - 1]).unwrap());
            }
            let mut tmp = [0u8; 8192];
            match self.s.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(serde_json::json!({ "method": method, "parameters": params }));
        self.recv().expect("a reply")
    }
}

/// Whether `pid` is gone or a zombie (dead, waiting to be reaped).
pub fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
    }
}

/// Waits until `pid` is dead (a zombie counts; see [`wait_reaped`]).
pub fn wait_dead(pid: i32) -> bool {
    poll(Duration::from_millis(20), || {
        if dead(pid) {
            Ok(())
        } else {
            Err(format!("{pid} alive"))
        }
    })
    .is_ok()
}

/// Waits until `pid` is gone from the process table: dead *and* reaped by
/// its parent. For workers, whose parent is emberd (re-parented to it), this
/// proves emberd collected the exit.
pub fn wait_reaped(pid: i32) -> bool {
    poll(Duration::from_millis(20), || {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            Err(format!("{pid} still in the process table"))
        } else {
            Ok(())
        }
    })
    .is_ok()
}

/// Names of `pid`'s threads (`/proc/PID/task/*/comm`).
pub fn thread_names(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Inodes of the shm-ipc channel segments `pid` holds, as open descriptors
/// or as mappings (a worker may map a segment and close its descriptor).
pub fn channel_segments(pid: i32) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    const NAME: &str = "memfd:ember-channel";
    let mut inodes = std::collections::BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let is_channel =
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains(NAME));
            if let (true, Ok(m)) = (is_channel, std::fs::metadata(e.path())) {
                inodes.insert(m.ino());
            }
        }
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    for line in maps.lines().filter(|l| l.contains(NAME)) {
        // address perms offset dev inode path
        if let Some(ino) = line.split_whitespace().nth(4).and_then(|i| i.parse().ok()) {
            inodes.insert(ino);
        }
    }
    inodes
}

/// What `pid`'s descriptors are, counted by kind: a file's path, a memfd's
/// name, `socket`, `pipe`, `anon_inode:[pidfd]`… (inode numbers dropped, so
/// two snapshots compare by what is open, not by which instance).
pub fn fd_kinds(pid: i32) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else {
                continue;
            };
            let link = link.to_string_lossy().into_owned();
            let kind = match link.split_once(":[") {
                Some((k, rest)) if rest.trim_end_matches(']').parse::<u64>().is_ok() => {
                    k.to_owned()
                }
                _ => link,
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    kinds
}

/// A module directory named `name` whose manifest runs the example crate
/// `krate` (entry: the built cdylib, absolute), with `extra` manifest text
/// appended (tables such as `[limits]` or `[[listeners]]`).
pub fn real_module(parent: &Path, name: &str, krate: &str, extra: &str) -> PathBuf {
    let d = parent.join(format!("mod-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("module.toml"),
        format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\nentry = {:?}\n{extra}",
            artifact(krate).display().to_string()
        ),
    )
    .unwrap();
    d
}

/// A module directory holding its own copy of `krate`'s cdylib (entry
/// `lib<krate>.so`, relative), for tests that change or compare the file.
pub fn copied_module(parent: &Path, name: &str, krate: &str) -> PathBuf {
    let d = parent.join(format!("mod-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    let file = format!("lib{}.so", krate.replace('-', "_"));
    std::fs::copy(artifact(krate), d.join(&file)).unwrap();
    std::fs::write(
        d.join("module.toml"),
        format!("name = \"{name}\"\nversion = \"1.0.0\"\nentry = \"{file}\"\n"),
    )
    .unwrap();
    d
}

/// Installs `krate` as module `name` with `extra` manifest lines plus an
/// `http` listener on a free 127.0.0.1 port, tried again on another port
/// if one was taken meanwhile (exit code 5); returns the port.
pub fn install_on_free_port(d: &Daemon, name: &str, krate: &str, extra: &str) -> u16 {
    crate::poll_until("a free port", Duration::ZERO, || {
        let port = free_port();
        let listener = format!("[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:{port}\"\n");
        let dir = real_module(d.dir.path(), name, krate, &format!("{extra}{listener}"));
        let out = d.ctl(&["install", dir.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            Some(0) => Ok(port),
            Some(5) => Err(stderr),
            _ => panic!("install {name}: {stderr}"),
        }
    })
}

/// A free TCP port on 127.0.0.1 (bound and released; races are retried by
/// callers that install with it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 GET to 127.0.0.1:`port`: status and body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    crate::http_get_at(("127.0.0.1", port), path)
}

/// Descriptors of `pid` that are memfds (shared-memory segments).
/// Shared-memory segments (channels, shared data) `pid` holds: every memfd
/// but the artifact images emberd keeps for the modules it runs.
pub fn segment_memfds(pid: i32) -> Vec<String> {
    memfds(pid)
        .into_iter()
        .filter(|l| !l.contains("memfd:ember-artifact"))
        .collect()
}

pub fn memfds(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.display().to_string())
                .filter(|l| l.contains("memfd:"))
                .collect()
        })
        .unwrap_or_default()
}
