//! The real emberd over its real socket: Varlink framing, introspection,
//! errors, hostile input, access control, systemd notifications, config.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::{poll_until, TempDir};
use serde_json::json;

#[test]
fn introspection_and_errors() {
    let d = Daemon::start(FAST);
    let mut r = Raw::connect(&d.socket);

    let info = r.call("org.varlink.service.GetInfo", json!({}));
    assert_eq!(info["parameters"]["product"], "emberd");
    assert_eq!(
        info["parameters"]["interfaces"],
        json!(["org.varlink.service", "io.ember.Supervisor"])
    );
    let desc = r.call(
        "org.varlink.service.GetInterfaceDescription",
        json!({ "interface": "io.ember.Supervisor" }),
    );
    assert_eq!(
        desc["parameters"]["description"].as_str().unwrap(),
        include_str!("../../supervisor/io.ember.Supervisor.varlink")
    );

    let e = r.call("io.ember.Supervisor.Status", json!({ "name": "nope" }));
    assert_eq!(e["error"], "io.ember.Supervisor.ModuleNotFound");
    assert_eq!(e["parameters"]["name"], "nope");
    let e = r.call("io.ember.Supervisor.Status", json!({}));
    assert_eq!(e["error"], "org.varlink.service.InvalidParameter");
    assert_eq!(e["parameters"]["parameter"], "name");
    let e = r.call("io.ember.Supervisor.Frob", json!({}));
    assert_eq!(e["error"], "org.varlink.service.MethodNotFound");
    let e = r.call("com.example.Other.Frob", json!({}));
    assert_eq!(e["error"], "org.varlink.service.InterfaceNotFound");
    let e = r.call(
        "io.ember.Supervisor.Install",
        json!({ "path": "relative/dir" }),
    );
    assert_eq!(e["error"], "io.ember.Supervisor.InvalidInput");

    // Pipelined calls are answered in order; a oneway call gets no reply.
    r.send(json!({ "method": "io.ember.Supervisor.Health", "oneway": true }));
    r.send(json!({ "method": "io.ember.Supervisor.List" }));
    r.send(json!({ "method": "io.ember.Supervisor.Pool" }));
    assert_eq!(r.recv().unwrap()["parameters"]["modules"], json!([]));
    assert!(r.recv().unwrap()["parameters"]["pool"]["min_idle"].is_number());
}

#[test]
fn hostile_input_closes_only_that_connection() {
    let d = Daemon::start(FAST);

    // Oversized: one byte over the limit, without a terminator.
    let mut r = Raw::connect(&d.socket);
    let big = vec![b'x'; supervisor::varlink::MAX_MESSAGE + 1];
    let _ = r.send_bytes(&big);
    let e = r.recv().expect("an error before closing");
    assert_eq!(e["error"], "io.ember.Supervisor.ProtocolError");
    assert!(e["parameters"]["reason"]
        .as_str()
        .unwrap()
        .contains("larger than"));
    assert!(r.recv().is_none(), "connection closed");

    // Not JSON.
    let mut r = Raw::connect(&d.socket);
    r.send_bytes(b"\xff\xfe garbage\0").unwrap();
    assert_eq!(
        r.recv().unwrap()["error"],
        "io.ember.Supervisor.ProtocolError"
    );
    assert!(r.recv().is_none());

    // JSON, but not a call.
    let mut r = Raw::connect(&d.socket);
    r.send_bytes(b"[1,2,3]\0").unwrap();
    assert_eq!(
        r.recv().unwrap()["error"],
        "io.ember.Supervisor.ProtocolError"
    );

    // Half a message, then hang up.
    let mut r = Raw::connect(&d.socket);
    r.send_bytes(b"{\"method\":\"io.ember").unwrap();
    drop(r);

    // The daemon is unharmed.
    let mut r = Raw::connect(&d.socket);
    let h = r.call("io.ember.Supervisor.Health", json!({}));
    assert_eq!(h["parameters"]["healthy"], true);
}

#[test]
fn socket_mode_and_peer_credentials() {
    let d = Daemon::start(FAST);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    drop(d);

    if !nix::unistd::geteuid().is_root() {
        return; // needs a second uid
    }
    use std::os::unix::process::CommandExt;
    let nobody = 65534;
    let run_as_nobody = |d: &Daemon| {
        std::process::Command::new(emberctl())
            .arg("--socket")
            .arg(&d.socket)
            .arg("health")
            .uid(nobody)
            .gid(nobody)
            .output()
            .unwrap()
    };
    // The socket lets anyone connect, but nobody is not on the allow list.
    let d = Daemon::start(&format!("socket_mode = \"0666\"\n{FAST}"));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_as_nobody(&d);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d);
    // Allowed by uid.
    let d = Daemon::start(&format!(
        "socket_mode = \"0666\"\nallowed_uids = [{nobody}]\n{FAST}"
    ));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_as_nobody(&d);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d);
    // Allowed by a supplementary group (SO_PEERGROUPS), the usual way a
    // user is given access: nobody, primary group nogroup, also in 4242.
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("setpriv not installed; supplementary-group case skipped");
        return;
    }
    let as_nobody_in = |d: &Daemon, groups: &str| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                &format!("--groups={groups}"),
            ])
            .arg(emberctl())
            .arg("--socket")
            .arg(&d.socket)
            .arg("health")
            .output()
            .unwrap()
    };
    let d = Daemon::start(&format!(
        "socket_mode = \"0666\"\nallowed_gids = [4242]\n{FAST}"
    ));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_nobody_in(&d, "4242");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_nobody_in(&d, "4243");
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_ready_and_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new("notify");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let d = Daemon::start_with(
        FAST,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains(&format!("MAINPID={}", d.pid())), "{msg}");
    // Pings, between the STATUS= summaries (tests/tests/systemd.rs).
    let mut pings = 0;
    while pings < 2 {
        let n = sock.recv(&mut buf).unwrap();
        match &buf[..n] {
            b"WATCHDOG=1" => pings += 1,
            other => assert!(other.starts_with(b"STATUS="), "{other:?}"),
        }
    }
    drop(d);
}

/// `emberd --check-config FILE` with `text` in FILE: exit code and stderr.
fn check_config(file: &std::path::Path, text: &str) -> (Option<i32>, String) {
    std::fs::write(file, text).unwrap();
    let out = std::process::Command::new(emberd())
        .arg("--config")
        .arg(file)
        .arg("--check-config")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_names_file_line_and_field() {
    let dir = TempDir::new("badcfg");
    let cfg = dir.path().join("bad.toml");
    let at = |pos: &str| format!("{}:{pos}: ", cfg.display());

    // A type error, refused at start-up (not only by --check-config).
    std::fs::write(
        &cfg,
        "socket_mode = \"0660\"\n\n[pool]\nmin_idle = \"lots\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(emberd())
        .arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(dir.path().join("ctl.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("s"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}field `pool.min_idle`: invalid type",
            at("4:12")
        )),
        "{err}"
    );
    assert!(!dir.path().join("ctl.sock").exists());

    // An unknown field, named with its table.
    let (code, err) = check_config(&cfg, "[pool]\nmin_idel = 1\n");
    assert_eq!(code, Some(78));
    assert!(
        err.contains(&format!(
            "{}field `pool.min_idel`: unknown field",
            at("2:1")
        )),
        "{err}"
    );

    // A value out of range (validation), at the line of its key.
    let (code, err) = check_config(&cfg, "# pool\n[pool]\nmax_idle = 1\nmin_idle = 3\n");
    assert_eq!(code, Some(78));
    assert!(
        err.contains(&format!(
            "{}field `pool.min_idle`: min_idle (3) is larger than max_idle (1)",
            at("4:1")
        )),
        "{err}"
    );
    let (code, err) = check_config(&cfg, "[limits]\nmemory_bytes = 1\nopen_files = 2\n");
    assert_eq!(code, Some(78));
    assert!(
        err.contains(&format!("{}field `limits.open_files`: ", at("3:1"))),
        "{err}"
    );

    // A good file passes.
    let (code, err) = check_config(
        &cfg,
        "[pool]\nmin_idle = 1\nmax_idle = 2\n[limits]\nmemory_bytes = 1048576\nopen_files = 64\ncpu_cores = 0.5\n",
    );
    assert_eq!(code, Some(0), "{err}");

    let out = std::process::Command::new(emberd())
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

/// emberctl as user nobody against `socket`.
fn ctl_as_nobody(socket: &std::path::Path) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(emberctl())
        .arg("--socket")
        .arg(socket)
        .arg("health")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

#[test]
fn socket_file_permissions_are_a_permission_error_not_unreachable() {
    if !nix::unistd::geteuid().is_root() {
        return; // needs a second uid
    }
    // The daemon listens, but the socket file's mode lets nobody in.
    let d = Daemon::start(&format!("socket_mode = \"0000\"\n{FAST}"));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = ctl_as_nobody(&d.socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains(&d.socket.display().to_string()), "{err}");

    // A directory on the way without search permission: the same.
    let d = Daemon::start(&format!(
        "socket_mode = \"0666\"\nallowed_uids = [65534]\n{FAST}"
    ));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = ctl_as_nobody(&d.socket);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Once the directory may be searched, the same user gets in.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = ctl_as_nobody(&d.socket);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn emberctl_exit_codes_and_help() {
    let dir = TempDir::new("ctl");
    let out = std::process::Command::new(emberctl())
        .arg("--socket")
        .arg(dir.path().join("nothing.sock"))
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "unreachable");
    let out = std::process::Command::new(emberctl())
        .env("EMBER_SOCKET", dir.path().join("nothing.sock"))
        .arg("health")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    // The error and its cause.
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("nothing.sock: No such file or directory"),
        "{err}"
    );

    for verb in [
        "install",
        "uninstall",
        "list",
        "status",
        "logs",
        "pool",
        "health",
        "completions",
    ] {
        let out = std::process::Command::new(emberctl())
            .args([verb, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{verb} --help");
        assert!(!out.stdout.is_empty());
    }
    let out = std::process::Command::new(emberctl())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("emberctl"));
    let out = std::process::Command::new(emberctl())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_plugin_fails_start_with_its_name() {
    let dir = TempDir::new("plugin");
    let cfg = dir.path().join("emberd.toml");
    std::fs::write(
        &cfg,
        "plugins = [{ path = \"/nonexistent/libcatalog.so\", config = { size_mb = 1 } }]\n",
    )
    .unwrap();
    let out = std::process::Command::new(emberd())
        .arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(dir.path().join("ctl.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("EMBER_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/libcatalog.so"), "{err}");
    assert!(!dir.path().join("ctl.sock").exists());
}

#[test]
fn unprivileged_defaults_use_xdg_dirs() {
    if !nix::unistd::geteuid().is_root() {
        return; // needs to switch to another uid
    }
    use std::os::unix::process::CommandExt;
    let nobody = 65534;
    let dir = TempDir::new("xdg");
    std::os::unix::fs::chown(dir.path(), Some(nobody), Some(nobody)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let env = |c: &mut std::process::Command| {
        c.env_clear()
            .env("XDG_RUNTIME_DIR", dir.path().join("run"))
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .env("HOME", dir.path())
            .env("EMBER_LOG", "error")
            .uid(nobody)
            .gid(nobody);
    };
    std::fs::create_dir(dir.path().join("run")).unwrap();
    std::os::unix::fs::chown(dir.path().join("run"), Some(nobody), Some(nobody)).unwrap();
    let mut cmd = std::process::Command::new(emberd());
    env(&mut cmd);
    let mut daemon = cmd.spawn().unwrap();
    let socket = dir.path().join("run/ember/control.sock");
    poll_until("emberd's socket", Duration::from_millis(20), || {
        assert!(daemon.try_wait().unwrap().is_none(), "emberd exited");
        std::os::unix::net::UnixStream::connect(&socket)
            .map(drop)
            .map_err(|e| format!("{}: {e}", socket.display()))
    });
    let mut ctl = std::process::Command::new(emberctl());
    env(&mut ctl);
    let out = ctl.args(["health", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dir.path().join("state/ember/desired.json").exists()
            || dir.path().join("state/ember").is_dir()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(daemon.wait().unwrap().success());
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[test]
fn a_stopping_emberd_leaves_a_newer_emberds_socket_on_the_same_path() {
    let mut old = Daemon::start(FAST);
    // The path is taken over (here: the old socket file removed, a second
    // emberd started on the same path, as one would that found the old one
    // no longer answering while it stops).
    let mut new = Daemon::start(FAST);
    new.stop();
    new.socket = old.socket.clone();
    std::fs::remove_file(&old.socket).unwrap();
    new.spawn(&[]);
    // The old one stops: the path still names the new one's socket.
    old.stop();
    let mut raw = Raw::connect(&new.socket);
    let r = raw.call("io.ember.Supervisor.List", json!({}));
    assert!(r["parameters"]["modules"].is_array(), "{r}");
    drop(raw);
    // The new one removes its own socket when it stops.
    new.stop();
    assert!(!new.socket.exists(), "{}", new.socket.display());
}
