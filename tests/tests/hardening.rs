//! emberd under hostile input and at scale: its one runtime thread never
//! blocks on a file a client names, the zygote's start is bounded in time,
//! any number of service ends reach a worker, and descriptors are not what
//! limits the number of modules.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::{artifact, poll_until, ChildGuard};
use serde_json::{json, Value};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `Health` over a raw connection; the connection's read timeout (10 s) is
/// the guard against a daemon that does not answer.
fn health(d: &Daemon) -> Value {
    let mut raw = Raw::connect(&d.socket);
    let h = raw.call("io.ember.Supervisor.Health", json!({}));
    assert!(h["parameters"]["version"].is_string(), "{h}");
    let l = raw.call("io.ember.Supervisor.List", json!({}));
    assert!(l["parameters"]["modules"].is_array(), "{l}");
    h["parameters"].clone()
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// A module directory whose `entry` is `entry` (absolute).
fn module_with_entry(parent: &Path, name: &str, entry: &Path) -> std::path::PathBuf {
    let d = parent.join(format!("mod-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("module.toml"),
        format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\nentry = {:?}\n",
            entry.display().to_string()
        ),
    )
    .unwrap();
    d
}

#[test]
fn a_fifo_named_module_toml_is_refused_and_other_clients_are_answered() {
    let d = Daemon::start(FAST);
    let m = d.dir.path().join("fifo-mod");
    std::fs::create_dir_all(&m).unwrap();
    mkfifo(&m.join("module.toml"));
    // The install in the background: on a daemon that opens the FIFO on its
    // runtime thread it never returns (nobody writes to the FIFO)…
    let mut install = ChildGuard(
        Command::new(emberctl())
            .arg("--socket")
            .arg(&d.socket)
            .arg("install")
            .arg(&m)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // …and neither does anyone else's call.
    health(&d);
    let status = install
        .wait_timeout(Duration::from_secs(10))
        .expect("the install of a FIFO returns");
    let mut err = String::new();
    std::io::Read::read_to_string(install.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "cannot read manifest {}: {} is a FIFO, not a regular file",
            m.join("module.toml").display(),
            m.join("module.toml").display()
        )),
        "{err}"
    );
    // Nothing was installed, nothing else was harmed.
    assert_eq!(health(&d)["modules"], 0);
}

#[test]
fn artifacts_that_are_not_regular_files_are_refused_by_what_they_are() {
    let d = Daemon::start(FAST);
    let fifo = d.dir.path().join("libfifo.so");
    mkfifo(&fifo);
    // emberd's stdin is /dev/null: its magic link leads to a device.
    for (name, entry, says) in [
        ("fifo", fifo.as_path(), "is a FIFO, not a regular file"),
        (
            "zero",
            Path::new("/dev/zero"),
            "is a character device, not a regular file",
        ),
        (
            "stdin",
            Path::new("/proc/self/fd/0"),
            "goes through a /proc magic link",
        ),
    ] {
        let m = module_with_entry(d.dir.path(), name, entry);
        let out = d.ctl(&["install", m.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        let err = stderr(&out);
        assert!(
            err.contains("field `entry`") && err.contains(says),
            "{name}: {err}"
        );
        health(&d);
    }
    assert_eq!(health(&d)["modules"], 0);
}

#[test]
fn files_over_their_cap_are_refused_naming_the_cap() {
    let d = Daemon::start(&format!(
        "[install]\nmax_manifest_bytes = 4096\nmax_artifact_bytes = 65536\n{FAST}"
    ));
    let big = real_module(
        d.dir.path(),
        "big",
        "hello",
        &format!("# {}\n", "x".repeat(5000)),
    );
    let err = stderr(&d.ctl(&["install", big.to_str().unwrap()]));
    assert!(
        err.contains("over the 4096-byte cap (`install.max_manifest_bytes`"),
        "{err}"
    );
    // The hello cdylib is far larger than 64 KiB.
    let size = std::fs::metadata(artifact("hello")).unwrap().len();
    assert!(size > 65536);
    let m = real_module(d.dir.path(), "hello", "hello", "");
    let err = stderr(&d.ctl(&["install", m.to_str().unwrap()]));
    assert!(
        err.contains(&format!(
            "is {size} bytes, over the 65536-byte cap (`install.max_artifact_bytes`"
        )),
        "{err}"
    );
    assert_eq!(health(&d)["modules"], 0);
}

/// A client only ever sees content of files it can read itself: emberd
/// opens what a client names with the client's rights (see
/// `install_and_deploy_open_the_files_with_the_clients_rights`). Root may
/// read these files anyway; what is shown of a file that is not a manifest
/// is still only where the syntax broke, never its text.
#[test]
fn a_file_that_is_not_a_manifest_is_not_echoed_back() {
    let d = Daemon::start(FAST);
    let secrets = [
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET\n",
        "root:$6$Zm9vYmFyYmF6SECRET$hash:19000:0:99999:7:::\n",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUSECRET\n",
        "token = \"ghp_0123456789abcdefSECRET\"\nname = 5\n",
    ];
    for (i, text) in secrets.iter().enumerate() {
        let f = d.dir.path().join(format!("secret-{i}"));
        std::fs::write(&f, text).unwrap();
        let out = d.ctl(&["install", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        let err = stderr(&out);
        assert!(!err.contains("SECRET"), "{text:?} echoed: {err}");
        assert!(!err.contains("BEGIN"), "{err}");
        // It says where and what, by line and column.
        assert!(
            err.starts_with(&format!(
                "emberctl: invalid manifest {}: line ",
                f.display()
            )) && err.contains(", column "),
            "{err}"
        );
    }
}

/// A config with the panic-plugin fixture, which hangs in `init` while
/// `marker` exists, and a short zygote start timeout.
fn hanging_plugin_config(marker: &Path) -> String {
    format!(
        "plugins = [{{ path = {:?}, config = {{ hang_in_init_when_exists = {:?} }} }}]\n\
         [pool]\nmin_idle = 0\nmax_idle = 0\nzygote_start_timeout_ms = 1000\n{FAST}",
        artifact("fixture-panic-plugin").display().to_string(),
        marker.display().to_string(),
    )
}

#[test]
fn a_zygote_whose_plugin_hangs_is_given_up_and_restarted() {
    let tmp = ember_tests::TempDir::new("hang");
    let marker = tmp.path().join("hang");
    let d = Daemon::start(&hanging_plugin_config(&marker));
    let zygote = health(&d)["zygote_pid"].as_i64().unwrap() as i32;
    // The next zygote's plugin hangs; this one dies.
    std::fs::write(&marker, "").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(zygote),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let m = module_dir(d.dir.path(), "waits", "1.0.0");
    let out = d.ctl(&["install", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The launch fails with the reason, naming the timeout and its key;
    // the daemon answers meanwhile.
    let s = d.wait_status("waits", "the launch to fail on the timeout", |s| {
        let text = s.to_string();
        text.contains("did not initialize within 1000 ms")
            && text.contains("pool.zygote_start_timeout_ms")
    });
    assert_ne!(s["state"], "running", "{s}");
    health(&d);
    // The plugin recovers: the back-off brings a zygote back, and the
    // module starts.
    std::fs::remove_file(&marker).unwrap();
    d.wait_status("waits", "running", |s| s["state"] == "running");
    let h = health(&d);
    assert_ne!(h["zygote_pid"], zygote, "{h}");
    assert_eq!(h["healthy"], true, "{h}");
}

#[test]
fn a_zygote_that_hangs_at_start_up_makes_emberd_exit_with_the_reason() {
    let tmp = ember_tests::TempDir::new("hang0");
    let marker = tmp.path().join("hang");
    std::fs::write(&marker, "").unwrap();
    let cfg = tmp.path().join("emberd.toml");
    std::fs::write(&cfg, hanging_plugin_config(&marker)).unwrap();
    let mut emberd = ChildGuard(
        Command::new(emberd())
            .arg("--config")
            .arg(&cfg)
            .arg("--socket")
            .arg(tmp.path().join("ctl.sock"))
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .env("EMBER_LOG", "error")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = emberd
        .wait_timeout(ember_tests::PATIENCE)
        .expect("emberd gives up on the zygote");
    let mut err = String::new();
    std::io::Read::read_to_string(emberd.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("did not initialize within 1000 ms")
            && err.contains("pool.zygote_start_timeout_ms"),
        "{err}"
    );
}

#[test]
fn an_exporter_is_wired_to_more_importers_than_one_message_carries() {
    const REPLICAS: usize = 20;
    let plugin = artifact("catalog");
    let d = Daemon::start(&format!(
        "plugins = [{{ path = {:?}, config = {{ size_mb = 1, extra_init_ms = 0 }} }}]\n{FAST}",
        plugin.display().to_string()
    ));
    let port = install_on_free_port(
        &d,
        "greeter",
        "greeter",
        &format!(
            "replicas = {REPLICAS}\n[[imports]]\nname = \"kv\"\noptional = true\n\
             [[plugins]]\nname = \"catalog\"\ntable_version = 1\n\
             [limits]\nstart_deadline = \"20s\"\n"
        ),
    );
    d.wait_status("greeter", "running", |s| s["state"] == "running");
    // The exporter comes after its importers: its launch order carries
    // an end for each of them (two descriptors each).
    let kv = real_module(
        d.dir.path(),
        "kv",
        "kv",
        "[[exports]]\nname = \"kv\"\n[limits]\nstart_deadline = \"10s\"\n",
    );
    d.ctl_ok(&["install", kv.to_str().unwrap()]);
    let check = |what: &str| {
        let kv = d.wait_status("kv", what, |s| s["state"] == "running");
        let g = d.wait_status("greeter", "wired", |s| {
            s["state"] == "running" && s["imports"][0]["state"] == "wired"
        });
        // Every importer replica shares a channel segment with the exporter.
        let kv_pid = kv["pid"].as_i64().unwrap() as i32;
        let ends = poll_until("every replica wired", Duration::from_millis(50), || {
            let theirs = ember_tests::daemon::channel_segments(kv_pid);
            let unwired: Vec<i32> = g["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["pid"].as_i64().unwrap() as i32)
                .filter(|p| {
                    ember_tests::daemon::channel_segments(*p)
                        .intersection(&theirs)
                        .next()
                        .is_none()
                })
                .collect();
            if unwired.is_empty() {
                Ok(theirs.len())
            } else {
                Err(format!("not wired to kv: {unwired:?}"))
            }
        });
        assert!(ends >= REPLICAS, "{ends}");
        // And it serves them (connections spread over the replicas).
        for i in 0..2 * REPLICAS {
            assert_eq!(
                ember_tests::daemon::http_get(port, &format!("/kv/put/k{i}/v{i}")),
                (200, "ok".into())
            );
        }
        kv_pid
    };
    let first = check("running");
    // Restarted (killed): wired again, the same way.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    poll_until("a new kv worker", Duration::from_millis(50), || {
        let s = d.ctl_json(&["status", "kv"])["status"].clone();
        match s["pid"].as_i64() {
            Some(p) if p as i32 != first && s["state"] == "running" => Ok(()),
            _ => Err(s.to_string()),
        }
    });
    check("running again");
}

/// `RLIMIT_NOFILE` (soft, hard) of `pid`, from `/proc/PID/limits`.
fn nofile(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut f = line["Max open files".len()..].split_whitespace();
    (
        f.next().unwrap().parse().unwrap(),
        f.next().unwrap().parse().unwrap(),
    )
}

#[test]
fn hundreds_of_modules_fit_under_a_1024_soft_descriptor_limit() {
    const MODULES: usize = 260;
    const HARD: u64 = 8192;
    let dir = ember_tests::TempDir::new("nofile");
    let socket = dir.path().join("ctl.sock");
    let state = dir.path().join("state");
    let config = dir.path().join("emberd.toml");
    std::fs::write(
        &config,
        format!("[pool]\nmin_idle = 1\nmax_idle = 2\n{FAST}"),
    )
    .unwrap();
    let mut cmd = Command::new(emberd());
    cmd.arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .env("EMBER_LOG", "error")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null());
    // SAFETY: between fork and exec, one async-signal-safe setrlimit: the
    // limits systemd gives a service by default (soft 1024), with room
    // above it.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: HARD,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let mut d = Daemon {
        child: Some(child),
        dir,
        socket,
        state,
        config,
    };
    poll_until("emberd's socket", Duration::from_millis(20), || {
        if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("emberd exited early: {st}");
        }
        std::os::unix::net::UnixStream::connect(&d.socket)
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let h = health(&d);
    assert_eq!(h["open_files_limit"], HARD, "{h}");
    assert_eq!(nofile(d.pid()), (HARD, HARD));
    // The zygote (and so every worker) has the conventional soft limit.
    let zygote = h["zygote_pid"].as_i64().unwrap() as i32;
    assert_eq!(nofile(zygote), (1024, HARD));

    let mut raw = Raw::connect(&d.socket);
    for i in 0..MODULES {
        let m = real_module(d.dir.path(), &format!("h{i}"), "hello", "");
        let r = raw.call(
            "io.ember.Supervisor.Install",
            json!({ "path": m.to_str().unwrap() }),
        );
        assert!(r.get("error").is_none(), "install {i}: {r}");
    }
    poll_until("every module running", Duration::from_millis(200), || {
        let h = health(&d);
        if h["running"] == MODULES {
            Ok(())
        } else {
            Err(h.to_string())
        }
    });
    let h = health(&d);
    let open = h["open_files"].as_u64().unwrap();
    assert!(open > MODULES as u64, "{h}");
    assert!(open < HARD, "{h}");
    // The human form shows the headroom.
    let out = d.ctl_ok(&["health"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("of {HARD}")), "{text}");
    let worker = d.ctl_json(&["status", "h0"])["status"]["pid"]
        .as_i64()
        .unwrap() as i32;
    assert_eq!(nofile(worker).0, 1024);
    d.stop();
}

#[test]
fn files_of_pseudo_filesystems_are_refused_by_their_filesystem() {
    let d = Daemon::start(FAST);
    // /proc/kmsg is a regular file of size 0 whose read blocks until the
    // kernel logs (and, as root, takes the message from the log). The
    // install runs in the background: on a daemon that reads it, it never
    // returns.
    let mut install = ChildGuard(
        Command::new(emberctl())
            .arg("--socket")
            .arg(&d.socket)
            .arg("install")
            .arg("/proc/kmsg")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    health(&d);
    let status = install
        .wait_timeout(Duration::from_secs(10))
        .expect("the install of /proc/kmsg returns");
    let mut err = String::new();
    std::io::Read::read_to_string(install.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(
            "cannot read manifest /proc/kmsg: /proc/kmsg is on a pseudo filesystem (proc), \
             not a regular file"
        ),
        "{err}"
    );
    // A sysfs file as the artifact: a regular file by its mode, refused by
    // its filesystem.
    let m = module_with_entry(d.dir.path(), "sysfs", Path::new("/sys/kernel/notes"));
    let out = d.ctl(&["install", m.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains("field `entry`")
            && err.contains("/sys/kernel/notes is on a pseudo filesystem (sysfs)"),
        "{err}"
    );
    assert_eq!(health(&d)["modules"], 0);
}

#[test]
fn a_rollback_reads_its_stored_artifact_off_the_runtime_thread() {
    let mut d = Daemon::start(FAST);
    let work = d.dir.path().join("rb");
    let v1 = copied_module(&work, "rb", "hello");
    d.ctl_ok(&["install", v1.to_str().unwrap()]);
    let sha1 = d.wait_status("rb", "revision 1 running", |s| s["state"] == "running")
        ["artifact_sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    // Revision 2: the same cdylib with bytes appended (another hash).
    let lib = v1.join("libhello.so");
    let mut bytes = std::fs::read(&lib).unwrap();
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&lib, &bytes).unwrap();
    d.ctl_ok(&["deploy", v1.to_str().unwrap(), "--wait"]);
    // After a restart only revision 2 has an image: a rollback to 1 loads
    // the stored file. Made a FIFO, that load waits for a writer.
    d.stop();
    d.spawn(&[]);
    d.wait_status("rb", "revision 2 running", |s| {
        s["state"] == "running" && s["revision"] == 2
    });
    let stored = d.state.join("artifacts").join(format!("{sha1}.so"));
    std::fs::remove_file(&stored).unwrap();
    mkfifo(&stored);
    let rollback = ChildGuard(
        Command::new(emberctl())
            .arg("--socket")
            .arg(&d.socket)
            .args(["rollback", "rb"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The load is waiting in the FIFO's open (a non-blocking writer gets
    // in only while a reader is there); holding it open without writing
    // keeps the load in its read.
    let writer = poll_until("the rollback's load", Duration::from_millis(10), || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&stored)
            .map_err(|e| e.to_string())
    });
    // Meanwhile everyone else is answered (the read timeout is the guard).
    health(&d);
    // The file it reads is not what was stored (not even its size):
    // refused, with the revision and the file.
    std::io::Write::write_all(&mut &writer, b"not the artifact").unwrap();
    drop(writer);
    let mut rollback = rollback;
    let status = rollback
        .wait_timeout(Duration::from_secs(10))
        .expect("the rollback returns");
    let mut err = String::new();
    std::io::Read::read_to_string(rollback.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("revision 1 of rb: stored artifact:")
            && err.contains(&stored.display().to_string()),
        "{err}"
    );
    // Revision 2 serves on, and the module takes the next release.
    let s = d.ctl_json(&["status", "rb"]);
    assert_eq!(s["status"]["revision"], 2, "{s}");
    assert_eq!(s["status"]["state"], "running", "{s}");
    let out = d.ctl_ok(&["rollback", "rb", "--to", "2"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unchanged"),
        "{out:?}"
    );
}

/// The unprivileged client of the tests below.
const CLIENT_UID: u32 = 65534;

/// `emberctl ARGS` run as uid [`CLIENT_UID`] (fork, setgid/setuid, exec).
fn ctl_as_client(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(emberctl())
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .uid(CLIENT_UID)
        .gid(CLIENT_UID)
        .output()
        .unwrap()
}

/// emberd as root, with [`CLIENT_UID`] on its allow list and its socket
/// reachable by it; `None` when the tests do not run as root.
fn daemon_allowing_the_client() -> Option<Daemon> {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        return None; // needs a second uid
    }
    let d = Daemon::start(&format!(
        "socket_mode = \"0666\"\nallowed_uids = [{CLIENT_UID}]\n{FAST}"
    ));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(d)
}

fn root_only(p: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn install_and_deploy_open_the_files_with_the_clients_rights() {
    let Some(d) = daemon_allowing_the_client() else {
        return;
    };
    // Root's 0600 files: as root emberd would quote the unknown key, the
    // name that does not match its pattern, the listener address.
    let secrets = [
        "ghp_SECRETTOKEN123 = 1\n",
        "name = \"ghp_SECRET\"\nversion = \"1.0.0\"\nentry = \"x.so\"\n",
        "name = \"ok\"\nversion = \"1.0.0\"\nentry = \"x.so\"\n\
         [[listeners]]\nname = \"l\"\naddress = \"SECRET-host:80\"\n",
    ];
    let denied = |p: &Path| {
        format!(
            "permission denied: {} (opened with the rights of uid {CLIENT_UID})",
            p.display()
        )
    };
    for (i, text) in secrets.iter().enumerate() {
        let f = d.dir.path().join(format!("secret-{i}.toml"));
        root_only(&f, text);
        for verb in ["install", "deploy"] {
            let out = ctl_as_client(&d, &[verb, f.to_str().unwrap()]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(4), "{verb} {text:?}: {err}");
            assert!(!err.contains("SECRET"), "{verb} {text:?} echoed: {err}");
            assert!(err.contains(&denied(&f)), "{verb}: {err}");
        }
    }
    // A manifest it may read, naming an artifact it may not (root's 0600
    // copy of a real cdylib): refused by the same rule, at `entry`.
    let m = copied_module(d.dir.path(), "theirs", "hello");
    let lib = m.join("libhello.so");
    std::fs::set_permissions(&lib, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = ctl_as_client(&d, &["install", m.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("field `entry`") && err.contains(&denied(&lib)),
        "{err}"
    );
    assert_eq!(health(&d)["modules"], 0);
    // Root is unaffected: the same module installs.
    d.ctl_ok(&["install", m.to_str().unwrap()]);
    assert_eq!(health(&d)["modules"], 1);
}

#[test]
fn a_client_installs_its_own_readable_module() {
    let Some(d) = daemon_allowing_the_client() else {
        return;
    };
    // The client's own files, readable by it alone (0600, in its 0700
    // directory): emberd opens them with its rights.
    let m = copied_module(d.dir.path(), "mine", "hello");
    for p in [m.join("module.toml"), m.join("libhello.so")] {
        std::os::unix::fs::chown(&p, Some(CLIENT_UID), Some(CLIENT_UID)).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    std::os::unix::fs::chown(&m, Some(CLIENT_UID), Some(CLIENT_UID)).unwrap();
    std::fs::set_permissions(&m, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = ctl_as_client(&d, &["install", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_status("mine", "running", |s| s["state"] == "running");
    // And deploys it again (the same files: unchanged).
    let out = ctl_as_client(&d, &["deploy", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unchanged"),
        "{out:?}"
    );
}

#[test]
fn a_client_cannot_make_emberd_replace_a_file_with_a_socket() {
    let Some(d) = daemon_allowing_the_client() else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    // Root's file in root's 0700 directory: as root emberd once unlinked
    // whatever was at a listener's path and bound its socket there.
    let secret = d.dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim = secret.join("victim");
    root_only(&victim, "keep me");
    // The client's own module (readable files in its own directory).
    let m = copied_module(d.dir.path(), "evil", "hello");
    let manifest = m.join("module.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        format!(
            "{text}[[listeners]]\nname = \"l\"\naddress = \"unix:{}\"\n",
            victim.display()
        ),
    )
    .unwrap();
    for p in [&manifest, &m.join("libhello.so"), &m] {
        std::os::unix::fs::chown(p, Some(CLIENT_UID), Some(CLIENT_UID)).unwrap();
    }
    for verb in ["install", "deploy"] {
        let out = ctl_as_client(&d, &[verb, m.to_str().unwrap()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{verb}: {err}");
        assert!(
            err.contains(&format!(
                "uid {CLIENT_UID} may not create {}",
                victim.display()
            )),
            "{verb}: {err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert_eq!(health(&d)["modules"], 0);
    // Root may; still, a file is never replaced, only a stale socket.
    let out = d.ctl(&["install", m.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
}

#[test]
fn a_restore_waits_for_a_listener_a_dying_worker_still_holds() {
    // After `kill -9` of emberd, its workers hold the modules' listeners
    // until their parent-death SIGKILL has ended them; a new emberd that
    // came up faster failed the restore ("… is in use") for good. Here the
    // test holds the port across the restart, as such a worker would, and
    // lets it go a moment later.
    let mut d = Daemon::start(FAST);
    let port = free_port();
    let m = copied_module(d.dir.path(), "held", "hello");
    let manifest = m.join("module.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        format!("{text}[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    d.ctl_ok(&["install", m.to_str().unwrap()]);
    d.wait_status("held", "running", |s| s["state"] == "running");
    d.stop();
    let holder = ember_tests::poll_until("the port, free", Duration::from_millis(20), || {
        std::net::TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())
    });
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        drop(holder);
    });
    d.spawn(&[]);
    release.join().unwrap();
    d.wait_status("held", "running", |s| s["state"] == "running");
}
