//! The shim under a real containerd (started here with its own root, state
//! and sockets), driven by `ctr`, talking to a stub emberd this test binds
//! (it speaks the container methods of `io.ember.Supervisor` and runs a
//! `sleep` as the "worker"). Needs root, `containerd` and `ctr`; without
//! them the test says so and passes, except under CI (`CI` set) where it fails.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-ember-v1");
const NS: &str = "ember-shim-test";

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether this machine can run the test; under CI it must.
fn runnable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && have("containerd") && have("ctr");
    if !ok {
        let why = format!(
            "needs root ({root}), containerd ({}) and ctr ({})",
            have("containerd"),
            have("ctr")
        );
        if std::env::var_os("CI").is_some() {
            panic!("ctr_run: {why}");
        }
        eprintln!("ctr_run: skipped: {why}");
    }
    ok
}

// ---- a tiny OCI image archive (uncompressed, deterministic) ----

fn ustar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let mut field = |at: usize, len: usize, v: String| {
            h[at..at + v.len()].copy_from_slice(v.as_bytes());
            assert!(v.len() < len);
        };
        field(100, 8, "0000644".into());
        field(108, 8, "0000000".into());
        field(116, 8, "0000000".into());
        field(124, 12, format!("{:011o}", data.len()));
        field(136, 12, format!("{:011o}", 0));
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// An OCI archive of one layer holding `files`, named `name`.
fn image(name: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    let layer = ustar(files);
    let ld = digest(&layer);
    let config = json!({"architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/ember-module"]},
        "rootfs": {"type": "layers", "diff_ids": [ld]}})
    .to_string();
    let cd = digest(config.as_bytes());
    let manifest = json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}]})
    .to_string();
    let md = digest(manifest.as_bytes());
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name}}]})
    .to_string();
    let blob = |d: &str| format!("blobs/sha256/{}", &d[7..]);
    let (lb, cb, mb) = (blob(&ld), blob(&cd), blob(&md));
    ustar(&[
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json", index.as_bytes()),
        (&lb, &layer),
        (&cb, config.as_bytes()),
        (&mb, manifest.as_bytes()),
    ])
}

// ---- a stub emberd ----

#[derive(Default)]
struct Stub {
    calls: Mutex<Vec<Value>>,
    workers: Mutex<HashMap<String, Arc<Mutex<Child>>>>,
    /// Containers whose worker "emberd's memory limit killed".
    oom: Mutex<Vec<String>>,
}

fn reply(s: &mut UnixStream, v: Value) {
    let mut f = v.to_string().into_bytes();
    f.push(0);
    s.write_all(&f).unwrap();
}

fn not_found(id: &str) -> Value {
    json!({"error": "io.ember.Supervisor.ModuleNotFound", "parameters": {"name": id}})
}

impl Stub {
    fn serve(self: &Arc<Self>, path: &Path) {
        let listener = UnixListener::bind(path).unwrap();
        let me = self.clone();
        thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { return };
                let me = me.clone();
                thread::spawn(move || me.connection(s));
            }
        });
    }

    fn connection(&self, s: UnixStream) {
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        loop {
            let mut frame = Vec::new();
            if r.read_until(0, &mut frame).unwrap_or(0) == 0 {
                return;
            }
            frame.pop();
            let call: Value = serde_json::from_slice(&frame).unwrap();
            let p = call["parameters"].clone();
            let id = p["id"].as_str().unwrap_or_default().to_string();
            let method = call["method"]
                .as_str()
                .unwrap()
                .rsplit('.')
                .next()
                .unwrap()
                .to_string();
            let mut seen = call.clone();
            if method == "RunContainer" {
                let path = Path::new(p["path"].as_str().unwrap());
                seen["module_toml_seen"] = json!(path.join("module.toml").is_file());
            }
            self.calls.lock().unwrap().push(seen);
            match method.as_str() {
                "RunContainer" => {
                    // A container named `oomer` is killed at once, as if by its memory limit.
                    let oomer = p["labels"]["io.kubernetes.container.name"] == "oomer";
                    let mut cmd = if oomer {
                        self.oom.lock().unwrap().push(id.clone());
                        let mut c = Command::new("sh");
                        c.args(["-c", "kill -9 $$"]);
                        c
                    } else {
                        let mut c = Command::new("sleep");
                        c.arg("1000");
                        c
                    };
                    if let Some(out) = p["stdout"].as_str() {
                        let mut f = std::fs::OpenOptions::new()
                            .write(true)
                            .custom_flags(libc::O_NONBLOCK)
                            .open(out)
                            .unwrap();
                        f.write_all(b"hello from the stub worker\n").unwrap();
                        cmd.stdout(f);
                    }
                    let child = cmd.spawn().unwrap();
                    let pid = child.id();
                    self.workers
                        .lock()
                        .unwrap()
                        .insert(id.clone(), Arc::new(Mutex::new(child)));
                    reply(
                        &mut w,
                        json!({"parameters": {"name": format!("k8s-{id}"), "pid": pid}}),
                    );
                }
                "WaitContainer" => {
                    let Some(child) = self.workers.lock().unwrap().get(&id).cloned() else {
                        reply(&mut w, not_found(&id));
                        continue;
                    };
                    reply(&mut w, json!({"parameters": {}, "continues": true}));
                    let status = loop {
                        if let Some(st) = child.lock().unwrap().try_wait().unwrap() {
                            break st;
                        }
                        thread::sleep(Duration::from_millis(20));
                    };
                    use std::os::unix::process::ExitStatusExt;
                    let (code, mut reason) = match status.signal() {
                        Some(sig) => (128 + sig, "signaled"),
                        None => (status.code().unwrap(), "exited"),
                    };
                    if self.oom.lock().unwrap().contains(&id) {
                        reason = "oom";
                    }
                    reply(
                        &mut w,
                        json!({"parameters": {"exit_status": code, "signal": status.signal(),
                        "reason": reason, "exited_at": "2026-12-05T22:00:00.25Z"}}),
                    );
                }
                "KillContainer" => {
                    let Some(child) = self.workers.lock().unwrap().get(&id).cloned() else {
                        reply(&mut w, not_found(&id));
                        continue;
                    };
                    let pid = child.lock().unwrap().id() as i32;
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(pid, p["signal"].as_i64().unwrap() as i32) };
                    reply(&mut w, json!({"parameters": {}}));
                }
                "RemoveContainer" => match self.workers.lock().unwrap().remove(&id) {
                    Some(child) => {
                        let mut c = child.lock().unwrap();
                        let _ = c.kill();
                        let _ = c.wait();
                        reply(&mut w, json!({"parameters": {}}));
                    }
                    None => reply(&mut w, not_found(&id)),
                },
                _ => reply(
                    &mut w,
                    json!({"error": "org.varlink.service.MethodNotFound",
                                          "parameters": {"method": method}}),
                ),
            }
        }
    }

    fn calls(&self, method: &str) -> Vec<Value> {
        let full = format!("io.ember.Supervisor.{method}");
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c["method"] == full)
            .cloned()
            .collect()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        for (_, c) in self.workers.lock().unwrap().drain() {
            let mut c = c.lock().unwrap();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- containerd ----

struct Containerd {
    dir: PathBuf,
    child: Child,
    stub: Arc<Stub>,
}

impl Containerd {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ember-shim-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let t = dir.display();
        let config = format!(
            r#"version = 2
root = "{t}/root"
state = "{t}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{t}/containerd.sock"
[ttrpc]
  address = "{t}/containerd.sock.ttrpc"
[debug]
  address = "{t}/debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{t}/opt"
"#
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let stub = Arc::new(Stub::default());
        stub.serve(&dir.join("ember.sock"));
        let shim_dir = Path::new(SHIM).parent().unwrap();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("EMBER_SOCKET", dir.join("ember.sock"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd { dir, child, stub };
        c.until("containerd's socket", || {
            c.ctr(&["version"]).status.success().then_some(())
        });
        c
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["--namespace", NS])
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn import(&self, name: &str, files: &[(&str, &[u8])]) {
        let tar = self.dir.join("image.tar");
        std::fs::write(&tar, image(name, files)).unwrap();
        self.ok(&["images", "import", tar.to_str().unwrap()]);
    }

    /// Waits (bounded, generously) for `f` to give something.
    fn until<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let log =
                    std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
                panic!("timed out waiting for {what}; containerd log:\n{log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ctr task ls` as id → (pid, status).
    fn tasks(&self) -> HashMap<String, (u32, String)> {
        self.ok(&["task", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<_> = l.split_whitespace().collect();
                (f.len() == 3).then(|| {
                    (
                        f[0].to_string(),
                        (f[1].parse().unwrap_or(0), f[2].to_string()),
                    )
                })
            })
            .collect()
    }

    fn mounted_under_dir(&self) -> Vec<String> {
        let d = self.dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&d))
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Nothing here may panic (a failed test is already unwinding).
        let list = |args: &[&str]| {
            let o = self.ctr(args);
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        for line in list(&["task", "ls"]).lines().skip(1) {
            if let Some(id) = line.split_whitespace().next() {
                let _ = self.ctr(&["task", "delete", "--force", id]);
            }
        }
        for c in list(&["containers", "ls", "-q"]).lines() {
            let _ = self.ctr(&["containers", "rm", c]);
        }
        // SAFETY: kill(2) on the containerd this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        for m in self.mounted_under_dir().iter().rev() {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn shim_alive_for(dir: &Path) -> bool {
    let d = dir.display().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("containerd-shim-ember-v1") && c.contains(&d)
            })
            .unwrap_or(false)
    })
}

#[test]
fn ctr_run_starts_stops_and_deletes_a_module_through_emberd() {
    if !runnable() {
        return;
    }
    let c = Containerd::start();
    c.import(
        "ember.local/hello:0.1.0",
        &[
            ("module.toml", b"name = \"hello\"\nversion = \"0.1.0\"\n"),
            ("lib/libhello.so", b"\x7fELF"),
        ],
    );
    let out = c.ok(&[
        "run",
        "-d",
        "--net-host",
        "--runtime",
        "io.containerd.ember.v1",
        "ember.local/hello:0.1.0",
        "c1",
    ]);
    assert!(
        out.contains("hello from the stub worker"),
        "the worker's stdout reaches ctr: {out:?}"
    );

    let run = c.stub.calls("RunContainer");
    assert_eq!(run.len(), 1, "{run:?}");
    let p = &run[0]["parameters"];
    assert_eq!(p["id"], "c1");
    assert!(
        p["path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/{NS}/c1/rootfs")),
        "{p}"
    );
    assert_eq!(
        run[0]["module_toml_seen"], true,
        "the image is mounted when emberd is asked"
    );
    assert!(p["stdout"].as_str().unwrap().ends_with("c1-stdout"), "{p}");
    assert!(
        p.get("netns").is_none(),
        "--net-host: no namespace to join: {p}"
    );

    let tasks = c.tasks();
    let worker = c.stub.workers.lock().unwrap()["c1"].lock().unwrap().id();
    assert_eq!(tasks["c1"], (worker, "RUNNING".to_string()), "{tasks:?}");
    assert_eq!(
        c.stub.calls("WaitContainer").len(),
        1,
        "the shim watches the worker"
    );

    let exec = c.ctr(&["task", "exec", "--exec-id", "x", "c1", "/bin/true"]);
    let err = String::from_utf8_lossy(&exec.stderr);
    assert!(
        !exec.status.success() && err.contains("ember: exec is not supported"),
        "{err}"
    );

    c.ok(&["task", "kill", "c1"]);
    c.until("c1 stopped", || {
        (c.tasks()["c1"].1 == "STOPPED").then_some(())
    });
    assert_eq!(c.stub.calls("KillContainer")[0]["parameters"]["signal"], 15);
    let del = c.ctr(&["task", "delete", "c1"]);
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    assert!(
        String::from_utf8_lossy(&del.stderr).contains("143"),
        "SIGTERM's exit status (128 + 15) reaches containerd: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    assert!(
        !c.stub.calls("RemoveContainer").is_empty(),
        "emberd forgets it"
    );
    assert!(
        c.mounted_under_dir().is_empty(),
        "the image is unmounted: {:?}",
        c.mounted_under_dir()
    );
    c.ok(&["containers", "rm", "c1"]);
    c.until("the shim to exit", || {
        (!shim_alive_for(&c.dir)).then_some(())
    });
}

#[test]
fn an_image_without_module_toml_is_refused_by_name_and_leaves_no_mount() {
    if !runnable() {
        return;
    }
    let c = Containerd::start();
    c.import("ember.local/notamodule:1", &[("etc/hostname", b"x\n")]);
    let o = c.ctr(&[
        "run",
        "-d",
        "--net-host",
        "--runtime",
        "io.containerd.ember.v1",
        "ember.local/notamodule:1",
        "bad",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("has no module.toml"), "{err}");
    assert!(
        c.stub.calls("RunContainer").is_empty(),
        "emberd is not asked"
    );
    assert!(
        c.mounted_under_dir().is_empty(),
        "{:?}",
        c.mounted_under_dir()
    );
}

#[test]
fn a_pod_shares_one_shim_joins_the_sandboxs_netns_and_reports_oom_before_exit() {
    if !runnable() {
        return;
    }
    let c = Containerd::start();
    c.import(
        "ember.local/hello:0.1.0",
        &[("module.toml", b"name = \"hello\"\nversion = \"0.1.0\"\n")],
    );
    let events_log = c.dir.join("events.log");
    let mut events = Command::new("ctr")
        .arg("--address")
        .arg(c.dir.join("containerd.sock"))
        .arg("events")
        .stdout(std::fs::File::create(&events_log).unwrap())
        .spawn()
        .unwrap();
    // What CRI's pod sandbox spec carries (the pod's network namespace).
    let pod_netns = format!("/proc/{}/ns/net", std::process::id());
    let run = |id: &str, extra: &[&str]| {
        let mut args = vec!["run", "-d", "--runtime", "io.containerd.ember.v1"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["ember.local/hello:0.1.0", id]);
        c.ok(&args)
    };
    let netns_arg = format!("network:{pod_netns}");
    run(
        "sb1",
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=sb1",
            "--with-ns",
            &netns_arg,
        ],
    );
    let (shim_pid, state) = c.tasks()["sb1"].clone();
    assert_eq!(state, "RUNNING");
    let cmdline = std::fs::read_to_string(format!("/proc/{shim_pid}/cmdline")).unwrap();
    assert!(
        cmdline.contains("containerd-shim-ember-v1"),
        "a sandbox's pid is its shim's: {cmdline:?}"
    );
    assert!(
        c.stub.calls("RunContainer").is_empty(),
        "a sandbox runs nothing in emberd"
    );

    // CRI gives app containers the sandbox pid's namespace: the shim's own.
    let shim_ns = format!("network:/proc/{shim_pid}/ns/net");
    let app = |name: &str| {
        vec![
            "--annotation".to_string(),
            "io.kubernetes.cri.container-type=container".into(),
            "--annotation".into(),
            "io.kubernetes.cri.sandbox-id=sb1".into(),
            "--annotation".into(),
            format!("io.kubernetes.cri.container-name={name}"),
            "--with-ns".into(),
            shim_ns.clone(),
        ]
    };
    let mut web = app("web");
    web.extend(
        [
            "--memory-limit",
            "67108864",
            "--cpu-quota",
            "50000",
            "--cpu-period",
            "100000",
        ]
        .map(String::from),
    );
    run("web1", &web.iter().map(String::as_str).collect::<Vec<_>>());
    let p = c.stub.calls("RunContainer")[0]["parameters"].clone();
    assert_eq!(p["id"], "web1");
    assert_eq!(
        p["netns"],
        pod_netns.as_str(),
        "the pod's namespace, not the shim's: {p}"
    );
    assert_eq!(p["memory_max"], 64 << 20);
    assert_eq!(p["cpu"], 0.5);
    assert_eq!(p["labels"]["io.kubernetes.container.name"], "web");
    assert_eq!(p["labels"]["io.kubernetes.pod.sandbox-id"], "sb1");
    let shims = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|b| {
                    let b = String::from_utf8_lossy(&b);
                    b.contains("containerd-shim-ember-v1")
                        && b.contains(&c.dir.display().to_string())
                })
                .unwrap_or(false)
        })
        .count();
    assert_eq!(shims, 1, "one shim serves the pod");

    let oomer = app("oomer");
    run(
        "oom1",
        &oomer.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    c.until("oom1 stopped", || {
        (c.tasks()["oom1"].1 == "STOPPED").then_some(())
    });
    let lines = c.until("the exit event", || {
        let log = std::fs::read_to_string(&events_log).unwrap();
        let lines: Vec<String> = log.lines().map(String::from).collect();
        lines
            .iter()
            .any(|l| l.contains("/tasks/exit") && l.contains("oom1"))
            .then_some(lines)
    });
    let at = |topic: &str| {
        lines
            .iter()
            .position(|l| l.contains(topic) && l.contains("oom1"))
            .unwrap_or_else(|| panic!("no {topic} event for oom1: {lines:#?}"))
    };
    assert!(
        at("/tasks/oom") < at("/tasks/exit"),
        "OOM before exit: {lines:#?}"
    );
    let del = c.ctr(&["task", "delete", "oom1"]);
    assert!(
        String::from_utf8_lossy(&del.stderr).contains("137"),
        "{del:?}"
    );

    // The sandbox stops on a stop signal like pause does.
    c.ok(&["task", "kill", "web1"]);
    c.ok(&["task", "kill", "sb1"]);
    c.until("the pod stopped", || {
        let t = c.tasks();
        (t["web1"].1 == "STOPPED" && t["sb1"].1 == "STOPPED").then_some(())
    });
    for id in ["web1", "sb1"] {
        c.ok(&["task", "delete", id]);
    }
    c.until("the shim to exit", || {
        (!shim_alive_for(&c.dir)).then_some(())
    });
    let _ = events.kill();
    let _ = events.wait();
}
