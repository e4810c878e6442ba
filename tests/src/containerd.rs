//! A private containerd for the Kubernetes tests: its own config, root,
//! state and socket in a temp dir, the `ember` runtime handler pointing at
//! `containerd-shim-ember-v1` (found through containerd's `PATH`, whose
//! first entry is this build's `target/<profile>`), and `EMBER_SOCKET`
//! naming the test's emberd in the environment it hands its shims.
//!
//! Also the kubelet's side: [`Cri`] drives containerd's CRI endpoint through
//! `tests/cri/cri.py` (grpcio), one JSON line per call.
//!
//! Teardown leaves nothing behind: containerd stopped by its pid, every
//! shim it started (found by this containerd's unique address in their
//! command line) killed by pid with its socket under `/run/containerd/s`,
//! every mount under the temp dir lazily unmounted, the dir removed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{poll_until, profile_dir, workspace_root, ChildGuard, TempDir};

/// The containerd namespace CRI uses; the `ctr` tests use it too.
pub const NAMESPACE: &str = "k8s.io";

/// The runtime type of the ember handler (`ctr run --runtime`).
pub const RUNTIME: &str = "io.containerd.ember.v1";

/// The sandbox image every private containerd is configured with.
pub const PAUSE_IMAGE: &str = "ember.local/pause:1";

/// `containerd` on `PATH`, or a failure that says how to install it.
pub fn containerd_bin() -> PathBuf {
    which("containerd").unwrap_or_else(|| {
        panic!(
            "containerd is not installed (the Kubernetes tests start a private one): \
             apt-get install containerd (CI's .ci/run installs it)"
        )
    })
}

/// `ctr` on `PATH` (installed with containerd).
pub fn ctr_bin() -> PathBuf {
    which("ctr").unwrap_or_else(|| {
        panic!("ctr is not installed: apt-get install containerd (CI's .ci/run installs it)")
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The shim binary, built once per test binary from the separate
/// `supervisor/containerd-shim-ember/` workspace into this build's target dir (so a
/// fresh clone plus `cargo test` runs the current shim).
pub fn shim() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let manifest = workspace_root().join("supervisor/containerd-shim-ember/Cargo.toml");
        assert!(
            manifest.is_file(),
            "{} is missing: the shim's workspace is needed for these tests",
            manifest.display()
        );
        let profile = profile_dir();
        let target = profile.parent().expect("target dir").to_owned();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.arg("build")
            .arg("--quiet")
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target);
        if profile.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the shim");
        assert!(status.success(), "building containerd-shim-ember failed");
    });
    let bin = profile_dir().join("containerd-shim-ember-v1");
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

/// A running private containerd; stopped and cleaned up on drop.
pub struct Containerd {
    child: Option<Child>,
    /// Its config, root, state, socket and logs live here.
    pub dir: TempDir,
    /// The gRPC socket (CRI and `ctr`).
    pub socket: PathBuf,
    /// Shim groupings (sandbox ids, `ctr run` container ids) whose sockets
    /// teardown removes if their shim left them behind.
    groupings: Mutex<Vec<String>>,
}

impl Containerd {
    /// Starts containerd with the `ember` runtime handler; its shims talk to
    /// the emberd listening on `ember_socket`.
    pub fn start(ember_socket: &Path) -> Self {
        let bin = containerd_bin();
        let dir = TempDir::new("ctd");
        let t = dir.path();
        for sub in ["cni-bin", "cni-conf", "logs"] {
            std::fs::create_dir_all(t.join(sub)).unwrap();
        }
        install_test_cni(t);
        let socket = t.join("containerd.sock");
        let config = t.join("config.toml");
        std::fs::write(&config, config_toml(t)).unwrap();
        let path = std::env::join_paths(
            std::iter::once(profile_dir()).chain(
                std::env::var_os("PATH")
                    .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                    .unwrap_or_default(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(t.join("containerd.log")).unwrap();
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("EMBER_SOCKET", ember_socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let mut c = Containerd {
            child: Some(child),
            dir,
            socket,
            groupings: Mutex::new(Vec::new()),
        };
        let child = c.child.as_mut().unwrap();
        let log = c.dir.path().join("containerd.log");
        poll_until("containerd's socket", Duration::from_millis(20), || {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "containerd exited early ({st}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            UnixStream::connect(&c.socket)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        c
    }

    /// containerd's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// containerd's own log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// A directory for CRI pod logs.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// `ctr --address SOCKET -n k8s.io ARGS…`, not waited for.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(ctr_bin());
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("-n")
            .arg(NAMESPACE)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// `ctr ARGS…` run to completion.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().expect("run ctr")
    }

    /// `ctr ARGS…`, which must succeed; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Imports an OCI archive into the `k8s.io` namespace.
    pub fn import(&self, archive: &Path) {
        self.ctr_ok(&["images", "import", archive.to_str().unwrap()]);
    }

    /// `(pid, status)` of task `id` from `ctr tasks ls`, if listed.
    pub fn task(&self, id: &str) -> Option<(i32, String)> {
        let out = self.ctr_ok(&["tasks", "ls"]);
        out.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| (f[1].parse().unwrap_or(0), f[2].to_owned()))
        })
    }

    /// Notes a shim grouping (a pod's sandbox id, or the id of a container
    /// `ctr run` started) so that teardown removes its socket should the
    /// shim leave it: a shim unlinks its socket at exit only if it can
    /// still read its bundle's `address` file, which containerd may have
    /// deleted by then.
    pub fn track_shim(&self, grouping: &str) {
        self.groupings.lock().unwrap().push(grouping.to_owned());
    }

    /// The socket of the shim serving `grouping`: containerd-shim's
    /// `socket_address` — `/run/containerd/s/` and the sha-256 of
    /// `ADDRESS/NAMESPACE/GROUPING`.
    fn shim_socket(&self, grouping: &str) -> PathBuf {
        let key = format!("{}/{NAMESPACE}/{grouping}", self.socket.display());
        let hex = crate::oci::digest(key.as_bytes());
        Path::new("/run/containerd/s").join(hex.trim_start_matches("sha256:"))
    }

    /// Pids of the shims this containerd started: their command line names
    /// this containerd's socket after `-address`.
    pub fn shim_pids(&self) -> Vec<i32> {
        let me = self.socket.to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|p| {
                        let Ok(raw) = std::fs::read(format!("/proc/{p}/cmdline")) else {
                            return false;
                        };
                        let args: Vec<String> = raw
                            .split(|&b| b == 0)
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect();
                        args.first()
                            .is_some_and(|a| a.ends_with("containerd-shim-ember-v1"))
                            && args.windows(2).any(|w| w[0] == "-address" && w[1] == me)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        crate::stop_child(&mut c);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        for pid in self.shim_pids() {
            let sockets = listening_sockets(pid);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            crate::daemon::wait_dead(pid);
            for s in sockets {
                let _ = std::fs::remove_file(s);
            }
        }
        for g in self.groupings.lock().unwrap().iter() {
            let path = self.shim_socket(g);
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
        }
        unmount_under(self.dir.path());
    }
}

/// The config of a private containerd rooted at `t`: CRI with the `ember`
/// handler as the default, the hand-made pause image, the test CNI plugin,
/// pod network namespaces under the state dir, and the
/// handler's table taken verbatim from the deploy snippet (so the tests
/// prove the snippet an operator copies).
fn config_toml(t: &Path) -> String {
    let t = t.display();
    let snippet =
        std::fs::read_to_string(workspace_root().join("deploy/kubernetes/containerd-ember.toml"))
            .expect("read deploy/kubernetes/containerd-ember.toml");
    format!(
        r#"version = 2
root = "{t}/root"
state = "{t}/state"
[grpc]
  address = "{t}/containerd.sock"
[ttrpc]
  address = "{t}/containerd.sock.ttrpc"
[debug]
  address = "{t}/debug.sock"
  level = "info"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{t}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "ember"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{t}/cni-bin"
    conf_dir = "{t}/cni-conf"

# deploy/kubernetes/containerd-ember.toml, as an operator adds it:
{snippet}"#
    )
}

/// The CNI plugin of the private containerd, for pods with their own
/// network namespace, installed as `loopback` (CRI always runs that one,
/// for `lo`) and as `ember-test-cni` (the pod network's, for `eth0`): CRI
/// creates the namespace (under its state dir); the plugin only brings its
/// loopback up and reports 127.0.0.1 on `lo`, 127.0.0.2 on `eth0`. It
/// creates no interface, route or address on the host, so tests running in
/// parallel (and the machine) share nothing.
const TEST_CNI: &str = r#"#!/bin/sh
conf=$(cat)
version=$(printf '%s' "$conf" | sed -n 's/.*"cniVersion" *: *"\([^"]*\)".*/\1/p')
case "$CNI_COMMAND" in
ADD)
    nsenter --net="$CNI_NETNS" ip link set lo up >&2 || exit 1
    if [ "$CNI_IFNAME" = lo ]; then ip=127.0.0.1/8; else ip=127.0.0.2/8; fi
    printf '{"cniVersion":"%s","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{"version":"4","address":"%s","interface":0}],"dns":{}}' \
        "$version" "$CNI_IFNAME" "$CNI_NETNS" "$ip"
    ;;
VERSION)
    printf '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}'
    ;;
esac
"#;

fn install_test_cni(t: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for name in ["loopback", "ember-test-cni"] {
        let plugin = t.join("cni-bin").join(name);
        std::fs::write(&plugin, TEST_CNI).unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(
        t.join("cni-conf/10-ember-test.conflist"),
        r#"{"cniVersion":"0.4.0","name":"ember-test","plugins":[{"type":"ember-test-cni"}]}"#,
    )
    .unwrap();
}

/// Paths of the Unix sockets `pid` listens on under `/run/containerd/s`.
fn listening_sockets(pid: i32) -> Vec<PathBuf> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = l.split_whitespace().collect();
            let (inode, path) = (f.get(6)?, f.get(7)?);
            (inodes.iter().any(|i| i == inode) && path.starts_with("/run/containerd/s/"))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

/// Lazily unmounts every mount point at or under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(&p)
            .stderr(Stdio::null())
            .status();
    }
}

/// `/proc/self/mountinfo` escapes space, tab, newline and `\` as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kubelet's side of CRI: `tests/cri/cri.py ENDPOINT script`, one JSON
/// request and one JSON reply a line.
pub struct Cri {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: PathBuf,
}

impl Cri {
    /// Starts the driver against `containerd`'s CRI endpoint.
    pub fn start(containerd: &Containerd) -> Self {
        let script = workspace_root().join("tests/cri/cri.py");
        let stderr = containerd.dir.path().join("cri-driver.stderr");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(format!("unix://{}", containerd.socket.display()))
            .arg("script")
            .env("CRI_STUBS_DIR", containerd.dir.path().join("cri-stubs"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("run python3 tests/cri/cri.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Cri {
            child: ChildGuard(child),
            stdin: Some(stdin),
            stdout,
            stderr,
        }
    }

    /// One call: `{"op": op, ...params}` → the driver's reply (`ok` true, or
    /// false with the gRPC `code` and `details`).
    pub fn call(&mut self, op: &str, params: Value) -> Value {
        let mut req = params;
        req.as_object_mut()
            .expect("params are a JSON object")
            .insert("op".into(), json!(op));
        let mut line = serde_json::to_vec(&req).unwrap();
        line.push(b'\n');
        let stdin = self.stdin.as_mut().expect("driver's stdin open");
        let sent = stdin.write_all(&line).and_then(|()| stdin.flush());
        let mut reply = String::new();
        let read = sent.and_then(|()| self.stdout.read_line(&mut reply));
        if !matches!(read, Ok(n) if n > 0) {
            let _ = self.child.wait_timeout(Duration::from_secs(5));
            panic!(
                "the CRI driver (tests/cri/cri.py) is gone ({read:?}): {}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("driver reply {reply:?}: {e}"))
    }

    /// Like [`Cri::call`], but the call must succeed.
    pub fn ok(&mut self, op: &str, params: Value) -> Value {
        let r = self.call(op, params.clone());
        assert_eq!(r["ok"], json!(true), "CRI {op} {params}: {r}");
        r
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        // End of input ends the script loop; the guard kills it otherwise.
        drop(self.stdin.take());
        let _ = self.child.wait_timeout(Duration::from_secs(5));
    }
}
