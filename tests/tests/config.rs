//! The daemon configuration as the real emberd applies it: `[limits]`
//! defaults for modules whose manifest leaves a limit unset (reported by
//! `Status` with their source, and enforced: cgroup or emberd's memory watch,
//! `RLIMIT_NOFILE`), `--socket` over the file's `socket`, the socket
//! file's owner, and a `[sandbox] uid_range` that would leave modules root
//! refused.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::{poll_until, TempDir};
use serde_json::Value;
use supervisor::cgroup::{detect, ROOT};

const DEFAULT_MEMORY: u64 = 96 << 20;
const MANIFEST_MEMORY: u64 = 48 << 20;
const OPEN_FILES: u64 = 200;

fn limits_config() -> String {
    format!("[limits]\nmemory_bytes = {DEFAULT_MEMORY}\nopen_files = {OPEN_FILES}\n{FAST}")
}

/// `pid`'s soft and hard limit from `/proc/PID/limits` (`Max open files`…).
fn proc_limit(pid: i32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in {text}"));
    let mut f = line[name.len()..].split_whitespace();
    (f.next().unwrap().into(), f.next().unwrap().into())
}

/// The memory limit written into the instance's own cgroup(s), if any.
fn cgroup_memory_limit(status: &Value) -> Option<u64> {
    status["replicas"][0]["cgroups"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|dir| {
            ["memory.max", "memory.limit_in_bytes"]
                .iter()
                .find_map(|f| std::fs::read_to_string(Path::new(dir).join(f)).ok())
                .and_then(|v| v.trim().parse().ok())
        })
}

#[test]
fn config_limits_apply_where_the_manifest_sets_none() {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let detected = detect(Path::new(ROOT), &own);
    let mechanism = detected.memory_mechanism();

    let d = Daemon::start(&limits_config());
    // No [limits] in this manifest: every limit is the configuration's.
    let plain = module_dir(d.dir.path(), "plain", "1.0.0");
    let own_limit = real_module(
        d.dir.path(),
        "own",
        "hello",
        &format!("[limits]\nmemory = {MANIFEST_MEMORY}\ncpu = 0.5\n"),
    );
    d.ctl_ok(&["install", plain.to_str().unwrap()]);
    d.ctl_ok(&["install", own_limit.to_str().unwrap()]);

    let s = d.wait_status("plain", "running", |s| s["state"] == "running");
    let l = &s["limits"];
    assert_eq!(l["memory_bytes"], DEFAULT_MEMORY, "{s}");
    assert_eq!(l["memory_source"], "config", "{s}");
    assert_eq!(l["memory_mechanism"], mechanism.as_str(), "{s}");
    assert_eq!(l["cpu_cores"], Value::Null, "{s}");
    assert_eq!(l["cpu_source"], "none", "{s}");
    assert_eq!(l["cpu_mechanism"], "none", "{s}");
    assert_eq!(l["open_files"], OPEN_FILES, "{s}");
    assert_eq!(l["open_files_source"], "config", "{s}");
    let pid = s["pid"].as_i64().unwrap() as i32;
    // Enforced, not only reported: the worker's descriptor cap…
    let n = OPEN_FILES.to_string();
    assert_eq!(proc_limit(pid, "Max open files"), (n.clone(), n.clone()));
    // …and its memory limit, by the kernel where a controller is usable.
    if detected.memory.is_some() {
        assert_eq!(cgroup_memory_limit(&s), Some(DEFAULT_MEMORY), "{s}");
    }

    // A manifest's limit wins; what it leaves unset is still the default.
    let s = d.wait_status("own", "running", |s| s["state"] == "running");
    let l = &s["limits"];
    assert_eq!(l["memory_bytes"], MANIFEST_MEMORY, "{s}");
    assert_eq!(l["memory_source"], "manifest", "{s}");
    assert_eq!(l["cpu_cores"], 0.5, "{s}");
    assert_eq!(l["cpu_source"], "manifest", "{s}");
    assert_eq!(l["open_files"], OPEN_FILES, "{s}");
    assert_eq!(l["open_files_source"], "config", "{s}");
    if detected.memory.is_some() {
        assert_eq!(cgroup_memory_limit(&s), Some(MANIFEST_MEMORY), "{s}");
    }
    let pid = s["pid"].as_i64().unwrap() as i32;
    assert_eq!(proc_limit(pid, "Max open files"), (n.clone(), n));

    // The human form names the source.
    let out = d.ctl_ok(&["status", "plain"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("96.0 MiB (config,") && text.contains("open files 200 (config"),
        "{text}"
    );
}

#[test]
fn without_limits_config_nothing_is_limited() {
    let d = Daemon::start(FAST);
    let plain = module_dir(d.dir.path(), "plain", "1.0.0");
    d.ctl_ok(&["install", plain.to_str().unwrap()]);
    let s = d.wait_status("plain", "running", |s| s["state"] == "running");
    let l = &s["limits"];
    for (k, v) in [
        ("memory_bytes", Value::Null),
        ("memory_source", "none".into()),
        ("memory_mechanism", "none".into()),
        ("open_files", Value::Null),
        ("open_files_source", "none".into()),
    ] {
        assert_eq!(l[k], v, "{k}: {s}");
    }
    let pid = s["pid"].as_i64().unwrap() as i32;
    let mine = proc_limit(std::process::id() as i32, "Max open files");
    assert_eq!(
        proc_limit(pid, "Max open files").1,
        mine.1,
        "hard limit inherited"
    );
}

#[test]
fn a_default_memory_limit_reaches_the_memory_watch_without_cgroups() {
    let d = Daemon::start_with(&limits_config(), &[("EMBER_CGROUP_ROOT", "none")]);
    let plain = module_dir(d.dir.path(), "plain", "1.0.0");
    d.ctl_ok(&["install", plain.to_str().unwrap()]);
    let s = d.wait_status("plain", "running", |s| s["state"] == "running");
    assert_eq!(s["limits"]["memory_bytes"], DEFAULT_MEMORY, "{s}");
    assert_eq!(s["limits"]["memory_source"], "config", "{s}");
    assert_eq!(s["limits"]["memory_mechanism"], "private-rss-watch", "{s}");
    // emberd watches the worker's memory; the worker learned the limit from
    // its launch order and capped its address space.
    let pid = s["pid"].as_i64().unwrap() as i32;
    let names = thread_names(d.pid());
    assert!(names.iter().any(|n| n == "ember-memwatch"), "{names:?}");
    assert_ne!(proc_limit(pid, "Max address space").0, "unlimited");
    // The stored manifest is the module's own, untouched.
    let desired = std::fs::read_to_string(d.state.join("desired.json")).unwrap();
    assert!(!desired.contains(&DEFAULT_MEMORY.to_string()), "{desired}");
}

/// An emberd started by hand (without the harness's `--socket`), stopped
/// with SIGTERM and reaped when dropped.
struct Emberd(Child);

impl Emberd {
    fn start(config: &Path, state: &Path, socket: Option<&Path>) -> Self {
        let mut cmd = Command::new(emberd());
        cmd.arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .env("EMBER_LOG", "error")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null());
        if let Some(s) = socket {
            cmd.arg("--socket").arg(s);
        }
        Emberd(cmd.spawn().unwrap())
    }

    fn wait_socket(&mut self, socket: &Path) {
        poll_until("emberd's socket", Duration::from_millis(20), || {
            if let Some(st) = self.0.try_wait().unwrap() {
                panic!("emberd exited early: {st}");
            }
            std::os::unix::net::UnixStream::connect(socket)
                .map(drop)
                .map_err(|e| format!("{}: {e}", socket.display()))
        });
    }
}

impl Drop for Emberd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn health_ok(socket: &Path) {
    let out = Command::new(emberctl())
        .arg("--socket")
        .arg(socket)
        .arg("health")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn socket_flag_beats_the_config_file() {
    let dir = TempDir::new("sockflag");
    let from_config: PathBuf = dir.path().join("from-config.sock");
    let from_flag: PathBuf = dir.path().join("from-flag.sock");
    let cfg = dir.path().join("emberd.toml");
    std::fs::write(
        &cfg,
        format!("socket = {:?}\n{FAST}", from_config.display().to_string()),
    )
    .unwrap();

    // The file alone decides…
    let mut d = Emberd::start(&cfg, &dir.path().join("state1"), None);
    d.wait_socket(&from_config);
    health_ok(&from_config);
    assert!(!from_flag.exists());
    drop(d);
    assert!(!from_config.exists(), "removed at shutdown");

    // …unless --socket is given.
    let mut d = Emberd::start(&cfg, &dir.path().join("state2"), Some(&from_flag));
    d.wait_socket(&from_flag);
    health_ok(&from_flag);
    assert!(
        !from_config.exists(),
        "the config's socket must not be bound when --socket is given"
    );
    drop(d);
    assert!(!from_flag.exists(), "removed at shutdown");
}

#[test]
fn socket_owner_and_group_come_from_the_config() {
    let mode = |d: &Daemon| std::fs::metadata(&d.socket).unwrap();
    let d = Daemon::start(&format!("socket_mode = \"0640\"\n{FAST}"));
    let m = mode(&d);
    assert_eq!(m.mode() & 0o777, 0o640);
    assert_eq!(m.uid(), nix::unistd::geteuid().as_raw(), "default: ours");
    assert_eq!(m.gid(), nix::unistd::getegid().as_raw(), "default: ours");
    drop(d);

    if !nix::unistd::geteuid().is_root() {
        return; // giving a file away needs root
    }
    let (uid, gid) = (65534, 65533);
    let d = Daemon::start(&format!(
        "socket_mode = \"0600\"\nsocket_uid = {uid}\nsocket_gid = {gid}\n{FAST}"
    ));
    let m = mode(&d);
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    assert_eq!(m.mode() & 0o777, 0o600);
    // Still served (root may connect to any socket file).
    health_ok(&d.socket);
    drop(d);

    // Only the group.
    let d = Daemon::start(&format!("socket_gid = {gid}\n{FAST}"));
    let m = mode(&d);
    assert_eq!((m.uid(), m.gid()), (0, gid));
}

#[test]
fn a_uid_range_reaching_2_pow_31_is_refused() {
    let dir = TempDir::new("uidrange");
    let cfg = dir.path().join("emberd.toml");
    // 4294967295 is -1 to setresuid ("leave unchanged"): a module given it
    // would stay root. 0 is root itself.
    for range in [
        "[1879048192, 4294967295]",
        "[2147483648, 2147483648]",
        "[0, 10]",
    ] {
        std::fs::write(&cfg, format!("[sandbox]\nuid_range = {range}\n")).unwrap();
        let check = Command::new(emberd())
            .arg("--config")
            .arg(&cfg)
            .arg("--check-config")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(78), "{range}: {err}");
        assert!(
            err.contains(&format!("{}:2:1: field `sandbox.uid_range`", cfg.display()))
                && err.contains("< 2147483648"),
            "{range}: {err}"
        );
        // And at start-up: emberd does not serve.
        let socket = dir.path().join("ctl.sock");
        let out = Command::new(emberd())
            .arg("--config")
            .arg(&cfg)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("EMBER_LOG", "error")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{range}");
        assert!(!socket.exists());
    }
    // The top of the allowed range is accepted.
    std::fs::write(&cfg, "[sandbox]\nuid_range = [2147483000, 2147483647]\n").unwrap();
    let ok = Command::new(emberd())
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
