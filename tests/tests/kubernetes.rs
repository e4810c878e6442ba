//! Kubernetes: module images run by a real containerd (started by the test
//! with its own config, root and socket) through the real
//! `containerd-shim-ember-v1` in warm workers of a real emberd — driven by
//! `ctr`, and over CRI gRPC exactly as the kubelet does (tests/cri/cri.py).
//! Also: the deploy/kubernetes manifests validate against the Kubernetes
//! schemas, and a broken copy does not.
//!
//! Needs root (containerd, mounts, network namespaces), `apt-get install
//! containerd iproute2`, `pip install grpcio grpcio-tools
//! kubernetes-validate` (CI's .ci/run does both) and the shim's workspace
//! `supervisor/containerd-shim-ember/`, which the harness builds into this target dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ember_tests::containerd::{shim, Containerd, Cri, PAUSE_IMAGE, RUNTIME};
use ember_tests::daemon::{wait_dead, Daemon, FAST};
use ember_tests::oci::{self, Image};
use ember_tests::{artifact, poll_until, procs, workspace_root, ChildGuard, TempDir};
use serde_json::json;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.30.0";

/// A node: containerd (dropped first: its shims go before emberd) and
/// emberd.
struct Node {
    ctd: Containerd,
    ember: Daemon,
}

impl Node {
    fn start() -> Self {
        shim();
        let ember = Daemon::start(FAST);
        let ctd = Containerd::start(&ember.socket);
        Node { ctd, ember }
    }

    /// Packs and imports the pause image and a module image of `krate`.
    fn images(&self, name: &str, krate: &str, extra: &str) -> Image {
        let pause = oci::pause(PAUSE_IMAGE, &self.ctd.dir.path().join("pause.tar"));
        self.ctd.import(&pause.archive);
        let img = module_image(self.ctd.dir.path(), name, krate, extra);
        self.ctd.import(&img.archive);
        img
    }

    /// Whether `emberctl list` shows `instance`.
    fn lists(&self, instance: &str) -> bool {
        let out = self.ember.ctl_ok(&["list"]);
        String::from_utf8_lossy(&out.stdout).contains(instance)
    }
}

/// The emberd instance a container runs as: `k8s-` and 12 hex digits of
/// the SHA-256 of its id.
fn instance(id: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(id.as_bytes());
    let hex: String = h[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("k8s-{hex}")
}

/// A module directory (manifest + its own copy of `krate`'s cdylib, entry
/// relative) packed as `ember.local/NAME:0.1.0`.
fn module_image(parent: &Path, name: &str, krate: &str, extra: &str) -> Image {
    let dir = parent.join(format!("img-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let lib = format!("lib{}.so", krate.replace('-', "_"));
    std::fs::copy(artifact(krate), dir.join(&lib)).unwrap();
    std::fs::write(
        dir.join("module.toml"),
        format!("name = \"{name}\"\nversion = \"0.1.0\"\nentry = \"{lib}\"\n{extra}"),
    )
    .unwrap();
    oci::pack(
        &dir,
        &format!("ember.local/{name}:0.1.0"),
        &parent.join(format!("{name}.tar")),
    )
}

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy/kubernetes")
}

/// `python3 -m kubernetes_validate --strict -k VERSION FILES…`.
fn validate(files: &[PathBuf]) -> std::process::Output {
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .args(files)
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("No module named kubernetes_validate"),
        "the YAML check needs kubernetes-validate: python3 -m pip install kubernetes-validate"
    );
    out
}

#[test]
fn deploy_manifests_validate() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "daemonset.yaml",
            "greeter-deployment.yaml",
            "runtimeclass.yaml"
        ]
    );
    let out = validate(&files);
    assert!(
        out.status.success(),
        "deploy/kubernetes does not validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What the manifests promise, beyond being well-formed.
    let read = |f: &str| std::fs::read_to_string(deploy_dir().join(f)).unwrap();
    let rc = read("runtimeclass.yaml");
    assert!(rc.contains("kind: RuntimeClass") && rc.contains("handler: ember"));
    let greeter = read("greeter-deployment.yaml");
    for must in [
        "runtimeClassName: ember",
        "maxSurge: 1",
        "readinessProbe:",
        "httpGet:",
        "image: ember.local/greeter:0.1.0",
    ] {
        assert!(
            greeter.contains(must),
            "greeter-deployment.yaml lacks {must}"
        );
    }
    let ds = read("daemonset.yaml");
    for must in [
        "kind: DaemonSet",
        "path: /run/ember",
        "containerd-shim-ember-v1",
        // The pods' network namespaces CRI pins, which emberd opens.
        "path: /var/run/netns",
        "mountPropagation: HostToContainer",
    ] {
        assert!(ds.contains(must), "daemonset.yaml lacks {must}");
    }

    // A broken copy of each kind of mistake fails, naming it.
    let tmp = TempDir::new("k8s-yaml");
    for (file, from, to, named) in [
        (
            "greeter-deployment.yaml",
            "runtimeClassName: ember",
            "runtimeClasName: ember",
            "runtimeClasName",
        ),
        (
            "greeter-deployment.yaml",
            "replicas: 2",
            "replicas: two",
            "'two'",
        ),
        (
            "runtimeclass.yaml",
            "handler: ember",
            "handlr: ember",
            "'handler' is a required",
        ),
        (
            "daemonset.yaml",
            "hostPID: true",
            "hostPID: \"yes\"",
            "'yes'",
        ),
    ] {
        let text = read(file);
        assert!(text.contains(from), "{file} no longer has {from:?}");
        let broken = tmp.path().join(file);
        std::fs::write(&broken, text.replace(from, to)).unwrap();
        let out = validate(&[broken]);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "{file} with {to:?} validated: {said}"
        );
        assert!(said.contains(named), "{file} with {to:?}: {said}");
    }
}

#[test]
fn module_images_import_and_cri_finds_them() {
    // No shim involved: containerd, its image store and its CRI endpoint.
    let ctd = Containerd::start(Path::new("/nonexistent/ember.sock"));
    let dir = ctd.dir.path();
    let pause = oci::pause(PAUSE_IMAGE, &dir.join("pause.tar"));
    let hello = module_image(dir, "hello", "hello", "");
    let again = module_image(&dir.join("again"), "hello", "hello", "");
    assert_eq!(
        (hello.manifest.as_str(), hello.config.as_str()),
        (again.manifest.as_str(), again.config.as_str()),
        "packing is deterministic"
    );
    ctd.import(&pause.archive);
    ctd.import(&hello.archive);
    let listed = ctd.ctr_ok(&["images", "ls"]);
    for img in [&pause, &hello] {
        let line = listed
            .lines()
            .find(|l| l.starts_with(&img.reference))
            .unwrap_or_else(|| panic!("{} not imported: {listed}", img.reference));
        assert!(line.contains(&img.manifest), "{line}");
    }

    let mut cri = Cri::start(&ctd);
    let v = cri.ok("version", json!({}));
    assert_eq!(v["runtime_api_version"], "v1", "{v}");
    for img in [&pause, &hello] {
        let st = cri.ok("image_status", json!({ "image": img.reference }));
        assert_eq!(st["id"], json!(img.config), "{st}");
    }
    let missing = cri.ok("image_status", json!({ "image": "ember.local/nope:1" }));
    assert_eq!(missing["id"], "", "{missing}");
}

#[test]
fn ctr_run_starts_a_module_in_a_warm_worker() {
    let node = Node::start();
    let img = node.images("hello", "hello", "[config]\nprint = \"from-ctr\"\n");
    let emberd = node.ember.pid();

    for (n, signal, code) in [(0, "SIGTERM", 0), (1, "SIGKILL", 137)] {
        let id = format!("ctr{n}-{}", std::process::id());
        node.ctd.track_shim(&id);
        let out = node.ctd.dir.path().join(format!("{id}.out"));
        let mut run = node.ctd.ctr_command(&[
            "run",
            "--runtime",
            RUNTIME,
            "--net-host",
            "--rm",
            &img.reference,
            &id,
        ]);
        run.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("err")).unwrap());
        let mut run = ChildGuard(run.spawn().expect("spawn ctr run"));

        let pid = poll_until("the task running", Duration::from_millis(50), || {
            if let Some(st) = run.0.try_wait().unwrap() {
                panic!(
                    "ctr run exited ({st}): {}\ncontainerd: {}",
                    std::fs::read_to_string(out.with_extension("err")).unwrap_or_default(),
                    node.ctd.log()
                );
            }
            match node.ctd.task(&id) {
                Some((pid, st)) if st == "RUNNING" && pid > 0 => Ok(pid),
                other => Err(format!("{other:?}")),
            }
        });
        // The task is an emberd worker (re-parented to emberd), listed as
        // the container's instance.
        assert_eq!(procs::ppid(pid), Some(emberd), "task pid {pid}");
        assert!(node.lists(&instance(&id)));
        // Its stdout reached ctr through the container's I/O.
        poll_until("the module's output", Duration::from_millis(50), || {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.contains("stdout: from-ctr") {
                Ok(())
            } else {
                Err(text)
            }
        });

        node.ctd.ctr_ok(&["tasks", "kill", "-s", signal, &id]);
        let st = run
            .wait_timeout(Duration::from_secs(30))
            .expect("ctr run returns once the task exits");
        assert_eq!(st.code(), Some(code), "exit after {signal}");
        assert!(wait_dead(pid), "worker {pid} still alive after {signal}");
        assert!(node.ctd.task(&id).is_none(), "--rm removed the task");
    }
}

/// Runs a pod with the `ember` handler on the host's network (`network`
/// "node") or in its own namespace ("pod"), and one container of `image`
/// created (not started); returns the sandbox id, the container id
/// and the path of its CRI log file.
fn run_pod(
    cri: &mut Cri,
    node: &Node,
    name: &str,
    image: &Image,
    network: &str,
    resources: serde_json::Value,
) -> (String, String, PathBuf) {
    let logs = node.ctd.log_dir().join(name);
    std::fs::create_dir_all(&logs).unwrap();
    let sb = cri.ok(
        "run_sandbox",
        json!({ "name": name, "log_dir": logs, "handler": "ember", "network": network }),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    node.ctd.track_shim(&sb);
    let st = cri.ok("sandbox_status", json!({ "sandbox": sb }));
    assert_eq!(st["state"], "READY", "{st}");
    let mut req = json!({
        "sandbox": sb,
        "name": name,
        "image": image.reference,
        "log_path": format!("{name}.log"),
    });
    req.as_object_mut()
        .unwrap()
        .extend(resources.as_object().unwrap().clone());
    let cid = cri.ok("create", req)["id"].as_str().unwrap().to_owned();
    (sb, cid, logs.join(format!("{name}.log")))
}

fn remove_pod(cri: &mut Cri, sb: &str) {
    cri.ok("stop_sandbox", json!({ "sandbox": sb }));
    cri.ok("remove_sandbox", json!({ "sandbox": sb }));
    let left = cri.ok("list_containers", json!({}));
    assert_eq!(left["containers"], json!([]), "{left}");
}

#[test]
fn cri_runs_a_pod_like_the_kubelet() {
    let node = Node::start();
    let img = node.images("hello", "hello", "[config]\nprint = \"from-cri\"\n");
    let mut cri = Cri::start(&node.ctd);

    let (sb, cid, log) = run_pod(&mut cri, &node, "hello", &img, "node", json!({}));
    let st = cri.ok("status", json!({ "container": cid }));
    assert_eq!(st["state"], "CREATED", "{st}");
    cri.ok("start", json!({ "container": cid }));
    let st = cri.ok("status", json!({ "container": cid }));
    assert_eq!(st["state"], "RUNNING", "{st}");
    let pid = st["pid"].as_i64().expect("a pid") as i32;
    assert_eq!(
        procs::ppid(pid),
        Some(node.ember.pid()),
        "container pid {pid}"
    );
    assert!(node.lists(&instance(&cid)));

    // The CRI log file (what `kubectl logs` reads) has the module's output.
    let text = poll_until("the CRI log", Duration::from_millis(50), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("stdout F stdout: from-cri") && text.contains("stderr F stderr: from-cri")
        {
            Ok(text)
        } else {
            Err(text)
        }
    });
    // Every line is in the CRI log format: `TIMESTAMP STREAM P|F TEXT`.
    for line in text.lines() {
        let mut f = line.splitn(4, ' ');
        let ts = f.next().unwrap_or_default();
        assert!(ts.len() > 19 && ts.as_bytes()[10] == b'T', "{line}");
        assert!(matches!(f.next(), Some("stdout" | "stderr")), "{line}");
        assert!(matches!(f.next(), Some("F" | "P")), "{line}");
    }

    cri.ok("stop", json!({ "container": cid, "timeout": 10 }));
    let st = cri.ok("status", json!({ "container": cid }));
    assert_eq!(
        (st["state"].as_str(), st["exit_code"].as_i64()),
        (Some("EXITED"), Some(0)),
        "{st}"
    );
    assert!(wait_dead(pid), "worker {pid} outlived StopContainer");
    cri.ok("remove", json!({ "container": cid }));
    remove_pod(&mut cri, &sb);
    poll_until("the instance gone", Duration::from_millis(50), || {
        if node.lists(&instance(&cid)) {
            Err("still listed".to_owned())
        } else {
            Ok(())
        }
    });
}

#[test]
fn cri_memory_limit_ends_oom_killed() {
    let node = Node::start();
    let img = node.images("hog", "fixture-unbounded-alloc", "");
    let mut cri = Cri::start(&node.ctd);
    let (sb, cid, _) = run_pod(
        &mut cri,
        &node,
        "hog",
        &img,
        "node",
        json!({ "memory_limit": 64u64 << 20 }),
    );
    cri.ok("start", json!({ "container": cid }));
    let st = poll_until("the container exited", Duration::from_millis(50), || {
        let st = cri.ok("status", json!({ "container": cid }));
        if st["state"] == "EXITED" {
            Ok(st)
        } else {
            Err(st.to_string())
        }
    });
    assert_eq!(st["reason"], "OOMKilled", "{st}");
    assert_eq!(st["exit_code"], 137, "{st}");
    cri.ok("remove", json!({ "container": cid }));
    remove_pod(&mut cri, &sb);
}

#[test]
fn cri_exec_sync_gets_a_clear_error() {
    let node = Node::start();
    let img = node.images("hello", "hello", "");
    let mut cri = Cri::start(&node.ctd);
    let (sb, cid, _) = run_pod(&mut cri, &node, "hello", &img, "node", json!({}));
    cri.ok("start", json!({ "container": cid }));

    let r = cri.call(
        "exec_sync",
        json!({ "container": cid, "cmd": ["/bin/sh", "-c", "true"] }),
    );
    assert_eq!(r["ok"], false, "{r}");
    let details = r["details"].as_str().unwrap_or_default();
    assert!(details.contains("exec is not supported"), "{r}");
    // The container is unharmed.
    let st = cri.ok("status", json!({ "container": cid }));
    assert_eq!(st["state"], "RUNNING", "{st}");

    cri.ok("stop", json!({ "container": cid, "timeout": 10 }));
    cri.ok("remove", json!({ "container": cid }));
    remove_pod(&mut cri, &sb);
}

/// `(device, inode)` of a namespace file (`/proc/PID/ns/net`, a bind mount).
fn ns_id(path: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    (m.dev(), m.ino())
}

#[test]
fn cri_pod_network_namespace_is_joined() {
    let node = Node::start();
    let img = node.images("hello", "hello", "");
    let mut cri = Cri::start(&node.ctd);
    let (sb, cid, _) = run_pod(&mut cri, &node, "netpod", &img, "pod", json!({}));
    let st = cri.ok("sandbox_status", json!({ "sandbox": sb }));
    let netns = st["netns"]
        .as_str()
        .expect("the pod's netns path")
        .to_owned();
    assert_eq!(st["ip"], "127.0.0.2", "{st}");
    assert_ne!(
        ns_id(&netns),
        ns_id("/proc/self/ns/net"),
        "a namespace of its own"
    );

    cri.ok("start", json!({ "container": cid }));
    let st = cri.ok("status", json!({ "container": cid }));
    assert_eq!(st["state"], "RUNNING", "{st}");
    let pid = st["pid"].as_i64().expect("a pid");
    assert_eq!(procs::ppid(pid as i32), Some(node.ember.pid()));
    // The worker is in the pod's network namespace, not emberd's.
    assert_eq!(ns_id(&format!("/proc/{pid}/ns/net")), ns_id(&netns));

    cri.ok("stop", json!({ "container": cid, "timeout": 10 }));
    cri.ok("remove", json!({ "container": cid }));
    remove_pod(&mut cri, &sb);
}

/// The shim's own tests (spec parsing, its emberd client, `ctr run` against
/// a stub emberd) live in its separate workspace, which `cargo test
/// --workspace` does not reach: run them from here, so the README's one
/// test command runs them too. `CI` is passed on: there they fail instead of
/// skipping when containerd is missing.
#[test]
fn the_shims_own_tests_pass() {
    let manifest = workspace_root().join("supervisor/containerd-shim-ember/Cargo.toml");
    let target = ember_tests::profile_dir()
        .parent()
        .expect("target dir")
        .to_owned();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.arg("test")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target);
    if ember_tests::profile_dir()
        .file_name()
        .is_some_and(|n| n == "release")
    {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("run cargo test for the shim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the shim's tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its test binaries ran, the containerd one among them (a filter or an
    // empty crate would pass too).
    let passed: u32 = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| {
            l.split_once(" passed")
                .and_then(|(n, _)| n.parse::<u32>().ok())
        })
        .sum();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        passed > 0 && stderr.contains("tests/ctr_run.rs"),
        "no shim test ran:\n{stdout}\n{stderr}"
    );
}
