//! The container methods the containerd shim uses (`RunContainer`,
//! `WaitContainer`, `KillContainer`, `RemoveContainer`, `ContainerStatus`,
//! `UpdateContainer`), driven over a raw Varlink connection against the
//! real emberd: a module directory run as a container in a warm worker,
//! its output in a file and a FIFO made here, its exit codes after SIGTERM
//! and SIGKILL, an over-limit fixture ending `oom`, and a worker joining a
//! network namespace made here. Needs root (namespaces, cgroups), as CI
//! runs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ember_tests::containerd::Containerd;
use ember_tests::daemon::*;
use ember_tests::{artifact, poll_until};
use serde_json::{json, Value};

/// A module directory as an image holds it: `module.toml` and the library
/// beside it (relative `entry`), with `extra` manifest text.
fn image_dir(parent: &Path, name: &str, krate: &str, extra: &str) -> PathBuf {
    let d = parent.join(format!("rootfs-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    let file = format!("lib{}.so", krate.replace('-', "_"));
    std::fs::copy(artifact(krate), d.join(&file)).unwrap();
    std::fs::write(
        d.join("module.toml"),
        format!("name = \"{name}\"\nversion = \"1.0.0\"\nentry = \"{file}\"\n{extra}"),
    )
    .unwrap();
    d
}

/// The instance a container runs as: `k8s-` and 12 hex digits of the
/// SHA-256 of its id.
fn instance(id: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(id.as_bytes());
    let hex: String = h[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("k8s-{hex}")
}

fn call(d: &Daemon, method: &str, params: Value) -> Value {
    Raw::connect(&d.socket).call(&format!("io.ember.Supervisor.{method}"), params)
}

fn ok(v: Value) -> Value {
    assert!(v.get("error").is_none(), "error reply: {v}");
    v["parameters"].clone()
}

/// `WaitContainer` with `more`: the `{}` subscription, then the exit.
fn wait_exit(d: &Daemon, id: &str) -> Value {
    let mut r = Raw::connect(&d.socket);
    r.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    r.send(json!({
        "method": "io.ember.Supervisor.WaitContainer",
        "parameters": { "id": id },
        "more": true
    }));
    let first = r.recv().expect("subscription reply");
    assert_eq!(first["parameters"], json!({}), "{first}");
    assert_eq!(first["continues"], true, "{first}");
    let last = r.recv().expect("exit reply");
    assert!(last.get("continues").is_none() || last["continues"] == false);
    ok(last)
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success());
}

#[test]
fn a_container_runs_in_a_warm_worker_with_its_output_where_asked() {
    let d = Daemon::start(FAST);
    let dir = image_dir(
        d.dir.path(),
        "hello",
        "hello",
        "[config]\nprint = \"from the container\"\n",
    );
    let out = d.dir.path().join("stdout.log");
    let err = d.dir.path().join("stderr.fifo");
    mkfifo(&err);
    // The FIFO's reader, as containerd's is (opened read-write: it never
    // sees an end of file, and is open before emberd opens the FIFO).
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&err)
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let mut buf = [0u8; 256];
        while !s.contains('\n') {
            let n = f.read(&mut buf).unwrap();
            s.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        s
    });
    let id = "0123456789abcdef0123";
    let run = ok(call(
        &d,
        "RunContainer",
        json!({
            "id": id, "path": dir, "stdout": out, "stderr": err,
            "labels": { "io.kubernetes.pod.name": "hello-pod" }
        }),
    ));
    assert_eq!(run["name"], instance(id));
    let pid = run["pid"].as_i64().unwrap();
    // A worker forked by the zygote (handed to emberd, its subreaper), not
    // a process of its own.
    assert_eq!(ember_tests::procs::ppid(pid as i32), Some(d.pid()));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.starts_with(b"ember: hello@1.0.0#0"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    // Listed under its instance name, running.
    let list = d.ctl_json(&["list"]);
    let listed = list["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == instance(id).as_str())
        .cloned()
        .unwrap_or_else(|| panic!("not listed: {list}"));
    assert_eq!(listed["state"], "running");
    let status = ok(call(&d, "ContainerStatus", json!({ "id": id })));
    assert_eq!(status["state"], "running");
    assert_eq!(status["pid"], pid);
    assert_eq!(status["labels"]["io.kubernetes.pod.name"], "hello-pod");

    // stdout to the file, stderr to the FIFO.
    let text = poll_until("stdout in the file", Duration::from_millis(10), || {
        let t = std::fs::read_to_string(&out).unwrap_or_default();
        if t.contains("stdout: from the container") {
            Ok(t)
        } else {
            Err(t)
        }
    });
    assert!(!text.contains("stderr:"), "{text}");
    assert_eq!(reader.join().unwrap(), "stderr: from the container\n");

    // One id, one container.
    let again = call(&d, "RunContainer", json!({ "id": id, "path": dir }));
    assert_eq!(again["error"], "io.ember.Supervisor.Conflict", "{again}");
    // Not the installer's to remove.
    let e = d.ctl(&["uninstall", &instance(id)]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("container"));

    // SIGTERM: a graceful stop, exit 0.
    let waiter = {
        let socket = d.socket.clone();
        std::thread::spawn(move || {
            let mut r = Raw::connect(&socket);
            r.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            r.send(json!({
                "method": "io.ember.Supervisor.WaitContainer",
                "parameters": { "id": id },
                "more": true
            }));
            let first = r.recv().unwrap();
            let last = r.recv().unwrap();
            (first, last)
        })
    };
    ok(call(&d, "KillContainer", json!({ "id": id, "signal": 15 })));
    let (first, last) = waiter.join().unwrap();
    assert_eq!(first["parameters"], json!({}));
    let exit = ok(last);
    assert_eq!(exit["exit_status"], 0, "{exit}");
    assert_eq!(exit["reason"], "exited");
    assert!(exit["exited_at"].as_str().unwrap().ends_with('Z'));
    assert!(wait_reaped(pid as i32));
    // Exited, not restarted; a later wait answers at once.
    let status = ok(call(&d, "ContainerStatus", json!({ "id": id })));
    assert_eq!(status["state"], "exited", "{status}");
    assert_eq!(status["exit_status"], 0);
    assert!(status.get("pid").is_none());
    assert_eq!(wait_exit(&d, id)["exit_status"], 0);

    ok(call(&d, "RemoveContainer", json!({ "id": id })));
    let gone = call(&d, "ContainerStatus", json!({ "id": id }));
    assert_eq!(gone["error"], "io.ember.Supervisor.ModuleNotFound");
    let list = d.ctl_json(&["list"]);
    assert_eq!(list["modules"], json!([]), "{list}");
    // Nothing of it is recorded.
    let desired = std::fs::read_to_string(d.state.join("desired.json")).unwrap_or_default();
    assert!(!desired.contains("k8s-"), "{desired}");
}

#[test]
fn sigkill_is_137_and_no_restart() {
    let d = Daemon::start(FAST);
    let dir = image_dir(d.dir.path(), "hello", "hello", "");
    let id = "killme";
    let pid = ok(call(&d, "RunContainer", json!({ "id": id, "path": dir })))["pid"]
        .as_i64()
        .unwrap();
    ok(call(&d, "KillContainer", json!({ "id": id, "signal": 9 })));
    let exit = wait_exit(&d, id);
    assert_eq!(exit["exit_status"], 137, "{exit}");
    assert_eq!(exit["signal"], 9);
    assert_eq!(exit["reason"], "signaled");
    assert!(wait_reaped(pid as i32));
    // emberd did not restart it: the instance stays failed, with no worker.
    let s = d.wait_status(&instance(id), "the instance failed", |s| {
        s["state"] == "failed"
    });
    assert_eq!(s["restarts"], 0, "{s}");
    ok(call(&d, "RemoveContainer", json!({ "id": id })));

    // RemoveContainer of a running container kills it first.
    let pid = ok(call(&d, "RunContainer", json!({ "id": id, "path": dir })))["pid"]
        .as_i64()
        .unwrap();
    ok(call(&d, "RemoveContainer", json!({ "id": id })));
    assert!(wait_reaped(pid as i32));
    let gone = call(&d, "KillContainer", json!({ "id": id, "signal": 15 }));
    assert_eq!(gone["error"], "io.ember.Supervisor.ModuleNotFound");
}

#[test]
fn an_over_limit_container_ends_oom() {
    let d = Daemon::start(FAST);
    // The manifest asks for no limit; the container's 64 MiB holds.
    let dir = image_dir(
        d.dir.path(),
        "alloc",
        "fixture-unbounded-alloc",
        "[limits]\nstart_deadline = \"2s\"\nstop_deadline = \"1s\"\n",
    );
    let id = "oom-container";
    let r = call(
        &d,
        "RunContainer",
        json!({ "id": id, "path": dir, "memory_max": 64u64 << 20 }),
    );
    // It may be killed before or after it is ready.
    if r.get("error").is_some() {
        assert!(r.to_string().contains("MemoryLimitExceeded"), "{r}");
    }
    let exit = wait_exit(&d, id);
    assert_eq!(exit["reason"], "oom", "{exit}");
    assert_eq!(exit["exit_status"], 137, "{exit}");
    let s = d.wait_status(&instance(id), "the instance failed", |s| {
        s["state"] == "failed"
    });
    assert_eq!(s["limits"]["memory_bytes"], 64u64 << 20, "{s}");
    assert_eq!(s["limits"]["memory_source"], "container", "{s}");
}

/// A process holding a new network namespace, killed on drop.
struct NetNs(Child);

impl NetNs {
    fn new() -> Self {
        // Its loopback up, as a pod's is.
        let c = Command::new("unshare")
            .args(["--net", "sh", "-c", "ip link set lo up && exec sleep 600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let ns = NetNs(c);
        let me = std::fs::read_link("/proc/self/ns/net").unwrap();
        poll_until("unshare's namespace", Duration::from_millis(5), || {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", ns.0.id()));
            match std::fs::read_link(ns.path()) {
                Ok(l) if l != me && comm.as_deref().is_ok_and(|c| c.trim() == "sleep") => Ok(()),
                other => Err(format!("{other:?} {comm:?}")),
            }
        });
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.0.id()))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `f` on a thread that entered the network namespace at `path`.
fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(path).unwrap();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: an open namespace descriptor; only this thread moves.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn a_container_joins_its_network_namespace() {
    let d = Daemon::start(FAST);
    let ns = NetNs::new();
    let dir = image_dir(d.dir.path(), "hello", "hello", "");
    let pid = ok(call(
        &d,
        "RunContainer",
        json!({ "id": "netns", "path": dir, "netns": ns.path() }),
    ))["pid"]
        .as_i64()
        .unwrap();
    let worker = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_eq!(worker, std::fs::read_link(ns.path()).unwrap());
    assert_ne!(worker, std::fs::read_link("/proc/self/ns/net").unwrap());
    ok(call(&d, "RemoveContainer", json!({ "id": "netns" })));

    // A module's listener is bound in the pod's namespace: greeter answers
    // there, on the pod's loopback, and nothing listens on emberd's.
    let port = free_port();
    let greeter = image_dir(
        d.dir.path(),
        "greeter",
        "greeter",
        &format!("[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:{port}\"\n[config]\ngreeting = \"hi\"\n"),
    );
    ok(call(
        &d,
        "RunContainer",
        json!({ "id": "web", "path": greeter, "netns": ns.path() }),
    ));
    let (status, body) = in_netns(&ns.path(), move || http_get(port, "/hello/pod"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hi"), "{body}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    ok(call(&d, "RemoveContainer", json!({ "id": "web" })));

    // Without one: emberd's own network. One replica, whatever the
    // manifest asks.
    let three = image_dir(d.dir.path(), "three", "hello", "replicas = 3\n");
    let pid = ok(call(
        &d,
        "RunContainer",
        json!({ "id": "hostnet", "path": three }),
    ))["pid"]
        .as_i64()
        .unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap()
    );
    let s = d.ctl_json(&["status", &instance("hostnet")])["status"].clone();
    assert_eq!(s["replicas"].as_array().map(Vec::len), Some(1), "{s}");
    assert_eq!(s["replicas"][0]["pid"], pid, "{s}");
    ok(call(&d, "RemoveContainer", json!({ "id": "hostnet" })));
}

#[test]
fn bad_input_is_refused_clearly() {
    let d = Daemon::start(FAST);
    let dir = image_dir(d.dir.path(), "hello", "hello", "");
    let reason = |v: &Value| v["parameters"]["reason"].as_str().unwrap_or("").to_owned();

    let e = call(&d, "RunContainer", json!({ "id": "a/b", "path": dir }));
    assert_eq!(e["error"], "io.ember.Supervisor.InvalidInput", "{e}");
    let e = call(&d, "RunContainer", json!({ "id": "a", "path": "rel" }));
    assert_eq!(e["error"], "io.ember.Supervisor.InvalidInput", "{e}");
    // No manifest there.
    let e = call(
        &d,
        "RunContainer",
        json!({ "id": "a", "path": d.dir.path() }),
    );
    assert_eq!(e["error"], "io.ember.Supervisor.InvalidInput", "{e}");
    assert!(reason(&e).contains("module.toml"), "{e}");
    // A FIFO nobody reads fails at once instead of hanging.
    let fifo = d.dir.path().join("unread.fifo");
    mkfifo(&fifo);
    let e = call(
        &d,
        "RunContainer",
        json!({ "id": "a", "path": dir, "stdout": fifo }),
    );
    assert_eq!(e["error"], "io.ember.Supervisor.InvalidInput", "{e}");
    assert!(reason(&e).contains("FIFO nobody reads"), "{e}");
    // Not a namespace.
    let e = call(
        &d,
        "RunContainer",
        json!({ "id": "a", "path": dir, "netns": dir.join("module.toml") }),
    );
    assert_eq!(e["error"], "io.ember.Supervisor.InvalidInput", "{e}");
    assert!(reason(&e).contains("not a namespace file"), "{e}");
    // Unknown ids.
    for (m, p) in [
        ("WaitContainer", json!({ "id": "nope" })),
        ("KillContainer", json!({ "id": "nope", "signal": 9 })),
        ("RemoveContainer", json!({ "id": "nope" })),
        ("ContainerStatus", json!({ "id": "nope" })),
        ("UpdateContainer", json!({ "id": "nope", "cpu": 1.0 })),
    ] {
        let e = call(&d, m, p);
        assert_eq!(e["error"], "io.ember.Supervisor.ModuleNotFound", "{m}: {e}");
    }
    // Nothing was left behind by the refusals; the id is free.
    let ran = ok(call(&d, "RunContainer", json!({ "id": "a", "path": dir })));
    assert_eq!(ran["name"], instance("a"));
    ok(call(&d, "RemoveContainer", json!({ "id": "a" })));
}

#[test]
fn a_packed_module_imports_into_containerd_and_runs_from_its_unpacked_image() {
    let d = Daemon::start(FAST);
    let dir = image_dir(
        d.dir.path(),
        "hello",
        "hello",
        "[config]\nprint = \"from the image\"\n",
    );
    let archive = d.dir.path().join("hello.oci.tar");
    let packed = d.ctl_json(&[
        "pack",
        dir.to_str().unwrap(),
        "-o",
        archive.to_str().unwrap(),
        "--name",
        "ember.local/hello-test:1.0.0",
    ]);
    assert_eq!(packed["name"], "ember.local/hello-test:1.0.0");
    let digest = packed["digest"].as_str().unwrap().to_owned();
    let bytes = std::fs::read(&archive).unwrap();
    assert_eq!(packed["size"], bytes.len());
    // Deterministic: packing again gives the same bytes.
    let again = d.dir.path().join("again.oci.tar");
    d.ctl_ok(&[
        "pack",
        dir.to_str().unwrap(),
        "-o",
        again.to_str().unwrap(),
        "--name",
        "ember.local/hello-test:1.0.0",
    ]);
    assert_eq!(std::fs::read(&again).unwrap(), bytes);
    // The blob named by the digest is there, and hashes to it.
    use sha2::Digest;
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(&archive)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert!(
        listing.contains(&format!("blobs/sha256/{hex}")),
        "{listing}"
    );
    let blob = Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg(format!("blobs/sha256/{hex}"))
        .output()
        .unwrap()
        .stdout;
    let got: String = sha2::Sha256::digest(&blob)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, hex);

    let ctd = Containerd::start(&d.socket);
    ctd.import(&archive);
    let images = ctd.ctr_ok(&["images", "ls"]);
    let line = images
        .lines()
        .find(|l| l.starts_with("ember.local/hello-test:1.0.0 "))
        .unwrap_or_else(|| panic!("not imported by name: {images}"));
    assert!(line.contains(&digest), "{line}");
    // Unpacked by the overlayfs snapshotter: the image's files as the shim
    // mounts them; emberd runs the module from there.
    let snapshots = ctd
        .dir
        .path()
        .join("root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let fs = std::fs::read_dir(&snapshots)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs"))
        .find(|p| p.join("module.toml").exists())
        .expect("an unpacked layer with module.toml");
    let out = d.dir.path().join("out.log");
    let run = ok(call(
        &d,
        "RunContainer",
        json!({ "id": "from-image", "path": fs, "stdout": out }),
    ));
    assert_eq!(run["name"], instance("from-image"));
    poll_until("the module's output", Duration::from_millis(10), || {
        let t = std::fs::read_to_string(&out).unwrap_or_default();
        if t.contains("stdout: from the image") {
            Ok(())
        } else {
            Err(t)
        }
    });
    ok(call(&d, "RemoveContainer", json!({ "id": "from-image" })));
}

#[test]
fn update_container_rewrites_the_running_workers_cgroup() {
    use supervisor::cgroup::{detect, ROOT};
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let detected = detect(Path::new(ROOT), &own);
    let d = Daemon::start(FAST);
    let dir = image_dir(d.dir.path(), "hello", "hello", "");
    ok(call(
        &d,
        "RunContainer",
        json!({ "id": "upd", "path": dir, "memory_max": 96u64 << 20 }),
    ));
    let update = call(
        &d,
        "UpdateContainer",
        json!({ "id": "upd", "memory_max": 128u64 << 20 }),
    );
    if detected.memory.is_none() {
        // emberd's memory watch takes no new limit: said so.
        assert_eq!(
            update["error"], "io.ember.Supervisor.InvalidInput",
            "{update}"
        );
        assert!(
            update.to_string().contains("no memory cgroup controller"),
            "{update}"
        );
        return;
    }
    ok(update);
    let s = d.ctl_json(&["status", &instance("upd")])["status"].clone();
    assert_eq!(s["limits"]["memory_bytes"], 128u64 << 20, "{s}");
    assert_eq!(s["limits"]["memory_source"], "container", "{s}");
    let limit = s["replicas"][0]["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| {
            let c = Path::new(c.as_str().unwrap());
            ["memory.max", "memory.limit_in_bytes"]
                .iter()
                .find_map(|f| std::fs::read_to_string(c.join(f)).ok())
        })
        .next()
        .unwrap_or_else(|| panic!("no memory cgroup in {s}"));
    assert_eq!(limit.trim(), (128u64 << 20).to_string());
    let bad = call(&d, "UpdateContainer", json!({ "id": "upd", "cpu": -2.0 }));
    assert_eq!(bad["error"], "io.ember.Supervisor.InvalidInput", "{bad}");
    ok(call(&d, "RemoveContainer", json!({ "id": "upd" })));
}

/// One Varlink call over the control socket by a client running as user
/// `nobody` (a `python3` process, uid and gid 65534 set before its exec):
/// the reply.
fn call_as_nobody(d: &Daemon, method: &str, params: Value) -> Value {
    use std::os::unix::process::CommandExt;
    const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\0")
b = b""
while not b.endswith(b"\0"):
    c = s.recv(65536)
    if not c:
        break
    b += c
sys.stdout.write(b.rstrip(b"\0").decode())
"#;
    let msg = json!({ "method": format!("io.ember.Supervisor.{method}"), "parameters": params });
    let out = Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(&d.socket)
        .arg(msg.to_string())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn the_container_methods_are_refused_to_other_allowed_clients() {
    use std::os::unix::fs::PermissionsExt;
    // nobody may talk to emberd (allowed_uids, a socket anyone may open),
    // but is neither root nor emberd's uid.
    let d = Daemon::start(&format!(
        "socket_mode = \"0666\"\nallowed_uids = [65534]\n{FAST}"
    ));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = image_dir(d.dir.path(), "hello", "hello", "");
    // A directory only root may write to: what emberd's rights would
    // create a file in for nobody.
    let private = d.dir.path().join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let keys = private.join("authorized_keys");
    let e = call_as_nobody(
        &d,
        "RunContainer",
        json!({ "id": "sneaky", "path": dir, "stdout": keys, "netns": "/proc/1/ns/net" }),
    );
    assert_eq!(e["error"], "io.ember.Supervisor.PermissionDenied", "{e}");
    assert_eq!(e["parameters"]["uid"], 65534, "{e}");
    let why = e["parameters"]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("root and emberd's own uid"), "{e}");
    assert!(!keys.exists(), "emberd created {}", keys.display());
    let list = d.ctl_json(&["list"]);
    assert_eq!(list["modules"], json!([]), "{list}");

    // Every container method, also on a container root runs.
    ok(call(
        &d,
        "RunContainer",
        json!({ "id": "mine", "path": dir }),
    ));
    for (method, params) in [
        ("KillContainer", json!({ "id": "mine", "signal": 9 })),
        ("RemoveContainer", json!({ "id": "mine" })),
        ("UpdateContainer", json!({ "id": "mine", "cpu": 1.0 })),
        ("ContainerStatus", json!({ "id": "mine" })),
        ("WaitContainer", json!({ "id": "mine" })),
    ] {
        let e = call_as_nobody(&d, method, params);
        assert_eq!(
            e["error"], "io.ember.Supervisor.PermissionDenied",
            "{method}: {e}"
        );
    }
    let s = ok(call(&d, "ContainerStatus", json!({ "id": "mine" })));
    assert_eq!(s["state"], "running", "{s}");
    ok(call(&d, "RemoveContainer", json!({ "id": "mine" })));

    // An output path that is a symbolic link is not followed.
    let link = d.dir.path().join("out-link");
    std::os::unix::fs::symlink(&keys, &link).unwrap();
    let e = call(
        &d,
        "RunContainer",
        json!({ "id": "linked", "path": dir, "stdout": link }),
    );
    assert_eq!(e["error"], "io.ember.Supervisor.InvalidInput", "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert!(!keys.exists(), "emberd followed {}", link.display());
}

/// The uid `pid` runs as (its real uid).
fn uid_of(pid: i64) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_container_has_a_uid_of_its_own_whatever_its_manifest_is_named() {
    let d = Daemon::start(FAST);
    let installed = real_module(d.dir.path(), "victim", "hello", "");
    d.ctl_ok(&["install", installed.to_str().unwrap()]);
    let s = d.wait_status("victim", "victim running", |s| {
        s["state"] == "running" && s["pid"].is_i64()
    });
    let victim = uid_of(s["pid"].as_i64().unwrap());
    assert_ne!(victim, 0, "{s}");
    // A container whose manifest names itself victim.
    let dir = image_dir(d.dir.path(), "victim", "hello", "");
    let a = ok(call(
        &d,
        "RunContainer",
        json!({ "id": "my-greeter-pod-a", "path": dir }),
    ));
    let b = ok(call(
        &d,
        "RunContainer",
        json!({ "id": "my-greeter-pod-b", "path": dir }),
    ));
    let (ua, ub) = (
        uid_of(a["pid"].as_i64().unwrap()),
        uid_of(b["pid"].as_i64().unwrap()),
    );
    assert_ne!(ua, victim, "the container runs as the installed victim");
    assert_ne!(ub, victim, "the container runs as the installed victim");
    assert_ne!(ua, ub, "two containers of one module share a uid");
    assert_ne!(ua, 0);
    assert_ne!(ub, 0);
    ok(call(
        &d,
        "RemoveContainer",
        json!({ "id": "my-greeter-pod-a" }),
    ));
    ok(call(
        &d,
        "RemoveContainer",
        json!({ "id": "my-greeter-pod-b" }),
    ));
}

#[test]
fn a_modules_own_message_does_not_make_an_oom() {
    let d = Daemon::start(FAST);
    // Its start fails with an error quoting its config:
    // "unknown panic_in `MemoryLimitExceeded` ...".
    let dir = image_dir(
        d.dir.path(),
        "liar",
        "fixture-panic-start",
        "[config]\npanic_in = \"MemoryLimitExceeded\"\n",
    );
    let id = "liar";
    let r = call(&d, "RunContainer", json!({ "id": id, "path": dir }));
    assert!(r.to_string().contains("MemoryLimitExceeded"), "{r}");
    let exit = wait_exit(&d, id);
    assert_eq!(exit["reason"], "exited", "{exit}");
    ok(call(&d, "RemoveContainer", json!({ "id": id })));
}

#[test]
fn installs_and_containers_never_take_each_others_uids() {
    // Two uids in all: a container takes one, an install the other, and a
    // second container finds none.
    let d = Daemon::start(&format!(
        "{FAST}\n[sandbox]\nuid_range = [1879048192, 1879048193]\n"
    ));
    let dir = image_dir(d.dir.path(), "hello", "hello", "");
    let c = ok(call(
        &d,
        "RunContainer",
        json!({ "id": "first", "path": dir }),
    ));
    let container = uid_of(c["pid"].as_i64().unwrap());
    let installed = real_module(d.dir.path(), "victim", "hello", "");
    d.ctl_ok(&["install", installed.to_str().unwrap()]);
    let s = d.wait_status("victim", "victim running", |s| {
        s["state"] == "running" && s["pid"].is_i64()
    });
    assert_ne!(uid_of(s["pid"].as_i64().unwrap()), container, "{s}");
    let e = call(&d, "RunContainer", json!({ "id": "second", "path": dir }));
    assert!(e.get("error").is_some(), "{e}");
    assert!(e.to_string().contains("uid"), "{e}");
    ok(call(&d, "RemoveContainer", json!({ "id": "first" })));
}
