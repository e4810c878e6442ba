//! `emberctl` as a user meets it, against the real `emberd`: output into a
//! closed pipe, error messages, install-time checks of the artifact, the
//! socket from the environment, what `status` shows of imports.

use std::process::{Command, Output, Stdio};

use ember_tests::daemon::*;
use ember_tests::{artifact, TempDir};
use serde_json::Value;

/// `emberctl ARGS` with stdout a pipe whose read end is already closed, so
/// its first write fails with `EPIPE`.
fn into_closed_pipe(d: &Daemon, args: &[&str]) -> Output {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    Command::new(emberctl())
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_closed_stdout_ends_every_verb_quietly() {
    let d = Daemon::start(FAST);
    for name in ["alpha", "beta", "gamma", "delta"] {
        let m = module_dir(d.dir.path(), name, "1.0.0");
        d.ctl_ok(&["install", m.to_str().unwrap()]);
    }
    d.wait_status("alpha", "running", |s| s["state"] == "running");
    let late = module_dir(d.dir.path(), "late", "1.0.0");
    let waited = module_dir(d.dir.path(), "waited", "1.0.0");
    for args in [
        vec!["list"],
        vec!["list", "--json"],
        vec!["status", "alpha"],
        vec!["status", "alpha", "--json"],
        vec!["logs", "alpha"],
        // Following stops once nobody reads.
        vec!["logs", "alpha", "-f"],
        vec!["pool"],
        vec!["health"],
        vec!["completions", "bash"],
        vec!["install", late.to_str().unwrap()],
        vec!["install", "--wait", waited.to_str().unwrap()],
        vec!["uninstall", "delta"],
    ] {
        let out = into_closed_pipe(&d, &args);
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "emberctl {args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "emberctl {args:?}: {err}");
        assert_eq!(err, "", "emberctl {args:?}");
    }
    // The verbs did their work all the same.
    let names: Vec<Value> = d.ctl_json(&["list"])["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].clone())
        .collect();
    assert_eq!(
        names,
        ["alpha", "beta", "gamma", "late", "waited"].map(Value::from)
    );
    assert_eq!(
        d.ctl_json(&["status", "waited"])["status"]["state"],
        "running"
    );
}

#[test]
fn a_manifest_error_is_said_once_with_file_line_and_field() {
    let d = Daemon::start(FAST);
    let m = real_module(d.dir.path(), "typo", "hello", "replicaz = 2\n");
    let manifest = m.join("module.toml");
    let out = d.ctl(&["install", m.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let err = stderr(&out);
    assert_eq!(err.matches("unknown field `replicaz`").count(), 1, "{err}");
    assert_eq!(err.matches("invalid manifest").count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "emberctl: invalid manifest {}: line 4, column 1: unknown field `replicaz`",
            manifest.display()
        )),
        "{err}"
    );
    // A value refused after parsing: once too, with the field.
    std::fs::write(
        &manifest,
        "name = \"typo\"\nversion = \"1.0.0\"\nentry = \"x.so\"\nreplicas = 0\n",
    )
    .unwrap();
    let err = stderr(&d.ctl(&["install", m.to_str().unwrap()]));
    assert_eq!(
        err.trim_end(),
        format!(
            "emberctl: invalid manifest {}: field `replicas`: must be at least 1",
            manifest.display()
        )
    );
}

/// A module directory whose entry is a copy of `bytes`.
fn module_with_entry(parent: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let d = parent.join(format!("mod-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("libentry.so"), bytes).unwrap();
    std::fs::write(
        d.join("module.toml"),
        format!("name = \"{name}\"\nversion = \"1.0.0\"\nentry = \"libentry.so\"\n"),
    )
    .unwrap();
    d
}

#[test]
fn an_entry_that_is_no_loadable_shared_object_is_refused_at_install() {
    let d = Daemon::start(FAST);
    let text = module_with_entry(d.dir.path(), "text", b"#!/bin/sh\necho not a library\n");
    let out = d.ctl(&["install", text.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let err = stderr(&out);
    assert_eq!(
        err.trim_end(),
        format!(
            "emberctl: invalid manifest {}: field `entry`: {} is not an ELF file",
            text.join("module.toml").display(),
            text.join("libentry.so").display()
        )
    );

    // A real module, its ELF header claiming another machine.
    let mut elf = std::fs::read(artifact("hello")).unwrap();
    let other: u16 = if cfg!(target_arch = "aarch64") {
        62
    } else {
        183
    };
    elf[18..20].copy_from_slice(&other.to_le_bytes());
    let foreign = module_with_entry(d.dir.path(), "foreign", &elf);
    let out = d.ctl(&["install", foreign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("field `entry`"), "{err}");
    assert!(err.contains("is built for"), "{err}");

    // Through the protocol too, with the manifest's path.
    let mut raw = Raw::connect(&d.socket);
    let r = raw.call(
        "io.ember.Supervisor.Install",
        serde_json::json!({ "path": text }),
    );
    assert_eq!(r["error"], "io.ember.Supervisor.InvalidManifest", "{r}");
    assert_eq!(
        r["parameters"]["path"],
        text.join("module.toml").display().to_string()
    );
    // Nothing was installed.
    assert_eq!(d.ctl_json(&["list"])["modules"], serde_json::json!([]));
}

#[test]
fn an_empty_ember_socket_means_unset() {
    let d = Daemon::start(FAST);
    // The default socket under a runtime directory of ours leads to the
    // daemon (for root the default is /run/ember/control.sock, which this
    // test leaves alone).
    let xdg = TempDir::new("xdg");
    std::fs::create_dir_all(xdg.path().join("ember")).unwrap();
    std::os::unix::fs::symlink(&d.socket, xdg.path().join("ember/control.sock")).unwrap();
    let run = |socket: Option<&str>| {
        let mut cmd = Command::new(emberctl());
        cmd.env("XDG_RUNTIME_DIR", xdg.path())
            .env_remove("EMBER_SOCKET")
            .args(["list", "--json"]);
        if let Some(s) = socket {
            cmd.env("EMBER_SOCKET", s);
        }
        cmd.output().unwrap()
    };
    let empty = run(Some(""));
    let unset = run(None);
    let err = stderr(&empty);
    assert!(
        !err.contains("emberd at :"),
        "an empty path was tried: {err}"
    );
    assert_eq!(empty.status.code(), unset.status.code(), "{err}");
    assert_eq!(empty.stdout, unset.stdout);
    assert_eq!(err, stderr(&unset));
    if !nix::unistd::geteuid().is_root() {
        assert!(empty.status.success(), "{err}");
    }
    // Set and not empty, it is used.
    let set = run(Some(d.socket.to_str().unwrap()));
    assert!(set.status.success(), "{}", stderr(&set));
}

#[test]
fn status_shows_imports_and_an_exporter_without_a_process_leaves_them_waiting() {
    // A back-off far longer than the test: kv stays without a process.
    let d = Daemon::start(
        "[lifecycle]\nbackoff_initial_ms = 600000\nbackoff_max_ms = 600000\nstop_timeout_ms = 1000\n",
    );
    let kv = real_module(d.dir.path(), "kv", "kv", "[[exports]]\nname = \"kv\"\n");
    d.ctl_ok(&["install", "--wait", kv.to_str().unwrap()]);
    let importer = real_module(
        d.dir.path(),
        "needs-kv",
        "hello",
        "[[imports]]\nname = \"kv\"\n",
    );
    d.ctl_ok(&["install", importer.to_str().unwrap()]);
    d.wait_status("needs-kv", "running and wired", |s| {
        s["state"] == "running" && s["imports"][0]["state"] == "wired"
    });
    let human = |name: &str| {
        let out = d.ctl_ok(&["status", name]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = human("needs-kv");
    assert!(
        text.lines()
            .any(|l| l.trim_start() == "imports: kv v1 wired (exporter kv)"),
        "{text}"
    );
    assert!(
        human("kv").lines().any(|l| l.trim_start() == "imports: -"),
        "kv imports nothing"
    );

    let kv_pid = d.ctl_json(&["status", "kv"])["status"]["pid"]
        .as_i64()
        .unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(kv_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let kv_status = d.wait_status("kv", "backoff", |s| s["state"] == "backoff");
    assert_eq!(kv_status["pid"], Value::Null, "{kv_status}");
    // kv's exit was handled with its back-off: no exporter runs now.
    let s = d.ctl_json(&["status", "needs-kv"])["status"].clone();
    assert_eq!(
        s["imports"],
        serde_json::json!([{"name": "kv", "version": 1, "state": "waiting", "exporter": "kv", "reason": "no running module exports it"}]),
        "{s}"
    );
    assert_eq!(s["state"], "running", "the importer keeps running: {s}");
    let text = human("needs-kv");
    assert!(
        text.lines()
            .any(|l| l.trim_start() == "imports: kv v1 waiting: no running module exports it"),
        "{text}"
    );
}

#[test]
fn an_import_is_wired_only_to_a_running_exporter() {
    let d = Daemon::start(FAST);
    let importer = real_module(
        d.dir.path(),
        "importer",
        "hello",
        "[[imports]]\nname = \"kv\"\noptional = true\n",
    );
    d.ctl_ok(&["install", importer.to_str().unwrap()]);
    d.wait_status("importer", "running", |s| s["state"] == "running");
    // An exporter that is launched (and handed the importer's channel) but
    // never becomes ready.
    let slow = real_module(
        d.dir.path(),
        "slow-kv",
        "fixture-never-ready",
        "[[exports]]\nname = \"kv\"\n[limits]\nstart_deadline = \"600s\"\n",
    );
    d.ctl_ok(&["install", slow.to_str().unwrap()]);
    let s = d.wait_status("slow-kv", "launched", |s| s["pid"].is_i64());
    assert_eq!(s["state"], "starting", "{s}");
    let s = d.ctl_json(&["status", "importer"])["status"].clone();
    assert_eq!(
        s["imports"],
        serde_json::json!([{"name": "kv", "version": 1, "state": "waiting", "exporter": "slow-kv", "reason": "no running module exports it"}]),
        "{s}"
    );
}
