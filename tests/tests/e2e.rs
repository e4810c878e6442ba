//! End to end with the real module runtime: the real `emberd` and
//! `emberctl` (and raw Varlink) run the example modules — `hello`, `kv`,
//! `greeter` — and the failure fixtures, in workers forked by the zygote.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ember_tests::daemon::*;
use ember_tests::{artifact, poll_until};
use serde_json::{json, Value};

fn pid_of(v: &Value) -> Option<i32> {
    v["pid"].as_i64().map(|p| p as i32)
}

fn running(s: &Value) -> bool {
    s["state"] == "running"
}

/// A daemon with the catalog plugin preloaded in its zygote.
fn daemon() -> Daemon {
    let plugin = artifact("catalog");
    Daemon::start(&format!(
        "plugins = [{{ path = {:?}, config = {{ size_mb = 1, extra_init_ms = 0 }} }}]\n{FAST}",
        plugin.display().to_string()
    ))
}

/// Installs `greeter` on a free port (retried if another test grabbed it).
fn install_greeter(d: &Daemon, name: &str, replicas: u32) -> u16 {
    install_on_free_port(
        d,
        name,
        "greeter",
        &format!(
            "replicas = {replicas}\n[[imports]]\nname = \"kv\"\noptional = true\n[[plugins]]\nname = \"catalog\"\ntable_version = 1\n[limits]\nstart_deadline = \"3s\"\nstop_deadline = \"2s\"\n[config]\ngreeting = \"hi\"\n"
        ),
    )
}

fn kv_module(d: &Daemon) -> std::path::PathBuf {
    real_module(
        d.dir.path(),
        "kv",
        "kv",
        "[[exports]]\nname = \"kv\"\n[limits]\nstart_deadline = \"2s\"\nstop_deadline = \"2s\"\n",
    )
}

/// GETs `path` until `want(status, body)` holds.
fn http_until(port: u16, path: &str, want: impl Fn(u16, &str) -> bool) -> (u16, String) {
    poll_until(&format!("GET {path}"), Duration::from_millis(50), || {
        let (st, body) = http_get(port, path);
        if want(st, &body) {
            Ok((st, body))
        } else {
            Err(format!("{st} {body}"))
        }
    })
}

#[test]
fn greeter_calls_kv_over_shm_and_survives_restarts() {
    let d = daemon();
    let emberd = d.pid();
    // hello and kv through emberctl, greeter too; then a raw Varlink look.
    let hello = module_dir(d.dir.path(), "hello", "0.1.0");
    assert!(d
        .ctl(&["install", hello.to_str().unwrap()])
        .status
        .success());
    let kv = kv_module(&d);
    d.ctl_ok(&["install", kv.to_str().unwrap()]);
    let port = install_greeter(&d, "greeter", 2);
    let hello_pid = pid_of(&d.wait_status("hello", "running", running)).unwrap();
    let kv_pid = pid_of(&d.wait_status("kv", "running", running)).unwrap();
    let g = d.wait_status("greeter", "wired", |s| {
        running(s) && s["imports"] == json!([{"name": "kv", "version": 1, "state": "wired", "exporter": "kv", "reason": null}])
    });
    let greeter_pids: Vec<Value> = g["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].clone())
        .collect();

    let mut raw = Raw::connect(&d.socket);
    let st = raw.call("io.ember.Supervisor.Status", json!({"name": "greeter"}));
    assert_eq!(
        st["parameters"]["status"]["imports"][0]["state"], "wired",
        "{st}"
    );

    // A request that goes greeter → kv over shm-ipc and back, on each
    // replica (the shared listener spreads connections; try several).
    let (st, body) = http_get(port, "/hello/ember");
    assert_eq!(st, 200, "{body}");
    assert!(
        body.starts_with("hi, ember! (from greeter@1.0.0#"),
        "{body}"
    );
    for i in 0..6 {
        assert_eq!(
            http_get(port, &format!("/kv/put/k{i}/v{i}")),
            (200, "ok".into())
        );
    }
    for i in 0..6 {
        assert_eq!(
            http_get(port, &format!("/kv/get/k{i}")),
            (200, format!("v{i}"))
        );
    }
    // The catalog plugin was loaded by the zygote, before the fork.
    let (st, body) = http_get(port, "/stats");
    assert_eq!(st, 200);
    assert!(!body.contains("catalog_entries=0"), "{body}");
    // Socket activation conventions: both replicas hold the one listener at
    // descriptor 3, named by LISTEN_FDNAMES.
    let (st, body) = http_get(port, "/listen-fds");
    assert_eq!(st, 200);
    assert_eq!(
        body, "LISTEN_FDS=1 LISTEN_FDNAMES=http LISTEN_PID_is_self=true",
        "{body}"
    );
    let fd3 = |pid: &Value| std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
    assert_eq!(fd3(&greeter_pids[0]), fd3(&greeter_pids[1]));
    assert!(fd3(&greeter_pids[0])
        .to_string_lossy()
        .starts_with("socket:"));

    // The supervisor kept no end of any channel; each greeter replica
    // shares one with kv; hello, which imports nothing, maps none.
    assert_eq!(segment_memfds(emberd), Vec::<String>::new());
    let kv_segments = channel_segments(kv_pid);
    for p in &greeter_pids {
        let mine = channel_segments(p.as_i64().unwrap() as i32);
        assert!(!mine.is_empty() && mine.is_subset(&kv_segments), "{p}");
    }
    assert_eq!(channel_segments(hello_pid), Default::default());
    // Both replicas write to greeter's one log; every line emberd writes
    // names the instance (name@version#replica) it came from.
    let logs =
        String::from_utf8_lossy(&d.ctl(&["logs", "greeter", "-n", "200"]).stdout).into_owned();
    for (replica, pid) in greeter_pids.iter().enumerate() {
        assert!(
            logs.contains(&format!(
                "greeter@1.0.0#{replica} ember: launched in pid {pid}"
            )),
            "{logs}"
        );
        assert!(
            logs.contains(&format!("greeter@1.0.0#{replica} INFO ")),
            "{logs}"
        );
    }

    // Kill kv's worker: it is restarted, greeter is re-wired, nothing else
    // is disturbed.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(kv_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = d.wait_status("kv", "restart", |s| {
        running(s) && s["restarts"] == 1 && pid_of(s) != Some(kv_pid)
    });
    assert_eq!(s["last_error"], "worker killed by signal 9");
    d.wait_status("greeter", "re-wired", |s| {
        s["imports"][0]["state"] == "wired"
    });
    // The new kv is empty: a 404 from it proves the new channel answers.
    for _ in 0..4 {
        http_until(port, "/kv/get/k1", |st, _| st == 404);
    }
    assert_eq!(http_get(port, "/kv/put/a/b"), (200, "ok".into()));
    for _ in 0..4 {
        assert_eq!(http_get(port, "/kv/get/a"), (200, "b".into()));
    }
    let g = d.ctl_json(&["status", "greeter"])["status"].clone();
    let now: Vec<Value> = g["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].clone())
        .collect();
    assert_eq!(now, greeter_pids, "greeter replicas untouched");
    assert_eq!(g["restarts"], 0);
    assert_eq!(
        pid_of(&d.ctl_json(&["status", "hello"])["status"]),
        Some(hello_pid)
    );
    assert_eq!(segment_memfds(emberd), Vec::<String>::new());
}

#[test]
fn an_import_waits_for_its_exporter() {
    let d = daemon();
    let port = install_greeter(&d, "greeter", 1);
    let s = d.wait_status("greeter", "waiting", |s| {
        running(s) && s["imports"][0]["state"] == "waiting"
    });
    assert_eq!(s["imports"][0]["exporter"], Value::Null);
    assert_eq!(http_get(port, "/kv/get/x"), (503, "kv not imported".into()));
    let kv = kv_module(&d);
    assert!(d.ctl(&["install", kv.to_str().unwrap()]).status.success());
    d.wait_status("greeter", "wired", |s| {
        s["imports"] == json!([{"name": "kv", "version": 1, "state": "wired", "exporter": "kv", "reason": null}])
    });
    http_until(port, "/kv/put/x/y", |st, _| st == 200);
    assert_eq!(http_get(port, "/kv/get/x"), (200, "y".into()));
    // Uninstalling the exporter puts the import back to waiting.
    assert!(d.ctl(&["uninstall", "kv"]).status.success());
    d.wait_status("greeter", "waiting again", |s| {
        s["imports"][0]["state"] == "waiting"
    });
    let (st, _) = http_get(port, "/kv/get/x");
    assert_ne!(st, 200);
}

#[test]
fn a_required_import_holds_the_launch_until_its_exporter_runs() {
    let d = daemon();
    // `hello` importing kv, not optional: no worker until kv runs.
    let dir = real_module(
        d.dir.path(),
        "needs-kv",
        "hello",
        "[[imports]]\nname = \"kv\"\n",
    );
    let out = d.ctl_ok(&["install", dir.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("waiting"),
        "{out:?}"
    );
    let s = d.ctl_json(&["status", "needs-kv"])["status"].clone();
    assert_eq!(s["state"], "waiting", "{s}");
    assert_eq!(s["pid"], Value::Null, "{s}");
    assert!(
        s["replicas"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("service kv"),
        "{s}"
    );
    d.ctl_ok(&["install", kv_module(&d).to_str().unwrap()]);
    let s = d.wait_status("needs-kv", "launched once kv runs", |s| {
        running(s) && s["imports"][0]["state"] == "wired"
    });
    assert_eq!(s["restarts"], 0, "{s}");
}

#[test]
fn an_exporter_lets_go_of_an_uninstalled_importer() {
    let d = daemon();
    let kv = kv_module(&d);
    d.ctl_ok(&["install", kv.to_str().unwrap()]);
    let kv_pid = pid_of(&d.wait_status("kv", "running", running)).unwrap();
    let port = install_greeter(&d, "greeter", 1);
    d.wait_status("greeter", "wired", |s| s["imports"][0]["state"] == "wired");
    http_until(port, "/kv/put/a/b", |st, _| st == 200);
    let greeter_pid = pid_of(&d.ctl_json(&["status", "greeter"])["status"]).unwrap();
    let shared = channel_segments(greeter_pid);
    assert!(!shared.is_empty() && shared.is_subset(&channel_segments(kv_pid)));

    d.ctl_ok(&["uninstall", "greeter"]);
    assert!(wait_reaped(greeter_pid));
    // The exporter, still running in the same process, no longer holds
    // (maps or keeps open) the segment it shared with the importer.
    poll_until(
        "kv to release greeter's channel",
        Duration::from_millis(20),
        || {
            let left: Vec<_> = channel_segments(kv_pid)
                .intersection(&shared)
                .copied()
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("kv still holds {left:?}"))
            }
        },
    );
    assert_eq!(
        pid_of(&d.ctl_json(&["status", "kv"])["status"]),
        Some(kv_pid)
    );
}

/// emberd's descriptors by kind, less the pidfd and channel socket each
/// idle worker in the pool has (their number varies with refills).
fn fds_beyond_the_pool(d: &Daemon) -> BTreeMap<String, usize> {
    let idle_pids = || d.ctl_json(&["pool"])["pool"]["idle_pids"].clone();
    poll_until("a steady pool", Duration::from_millis(20), || {
        let before = idle_pids();
        let mut kinds = fd_kinds(d.pid());
        if idle_pids() != before {
            return Err(format!("pool changed while reading: {before}"));
        }
        let idle = before.as_array().unwrap().len();
        for kind in ["anon_inode:[pidfd]", "socket"] {
            if let Some(n) = kinds.get_mut(kind) {
                *n = n.saturating_sub(idle);
            }
        }
        kinds.retain(|_, n| *n > 0);
        Ok(kinds)
    })
}

#[test]
fn failure_fixtures_fail_clearly_while_the_rest_serve() {
    let d = daemon();
    let emberd = d.pid();
    // Once the pool is full nothing is being forked: a steady baseline.
    poll_until("a full pool", Duration::from_millis(20), || {
        let p = d.ctl_json(&["pool"])["pool"].clone();
        (p["idle"] == p["max_idle"])
            .then_some(())
            .ok_or(p.to_string())
    });
    let fds_before = fds_beyond_the_pool(&d);
    let kv = kv_module(&d);
    assert!(d.ctl(&["install", kv.to_str().unwrap()]).status.success());
    let port = install_greeter(&d, "greeter", 1);
    d.wait_status("greeter", "wired", |s| {
        running(s) && s["imports"][0]["state"] == "wired"
    });
    http_until(port, "/kv/put/keep/me", |st, _| st == 200);
    let greeter_pid = pid_of(&d.ctl_json(&["status", "greeter"])["status"]).unwrap();
    let kv_pid = pid_of(&d.ctl_json(&["status", "kv"])["status"]).unwrap();

    let cases: &[(&str, &str, &str)] = &[
        ("fixture-panic-start", "", "Start failed (Panic)"),
        (
            "fixture-segfault",
            "",
            "Serve failed (Crashed): killed by SIGSEGV",
        ),
        (
            "fixture-abort",
            "",
            "Serve failed (Crashed): killed by SIGABRT",
        ),
        (
            "fixture-never-ready",
            "[limits]\nstart_deadline = \"300ms\"\n",
            "not ready within 300",
        ),
        (
            "fixture-unbounded-alloc",
            "[limits]\nmemory = \"32MiB\"\n",
            "MemoryLimitExceeded",
        ),
        ("fixture-wrong-abi", "", "Load failed (AbiMismatch)"),
    ];
    for (krate, extra, _) in cases {
        let name = krate.trim_start_matches("fixture-");
        let dir = real_module(d.dir.path(), name, krate, extra);
        d.ctl_ok(&["install", dir.to_str().unwrap()]);
    }
    for (krate, _, reason) in cases {
        let name = krate.trim_start_matches("fixture-");
        let s = d.wait_status(name, "a clear failure", |s| {
            [s["reason"].as_str(), s["last_error"].as_str()]
                .iter()
                .flatten()
                .any(|r| r.contains(reason))
        });
        // A fixture that fails after becoming ready may be caught in its
        // next run (restarted, running again until it fails again); what
        // must never happen is a failure that leaves the replica running
        // as if nothing had happened.
        assert!(
            s["state"] != "running" || s["restarts"].as_u64() >= Some(1),
            "{name}: {s}"
        );
    }
    let s = d.ctl_json(&["status", "wrong-abi"])["status"].clone();
    assert_eq!(s["state"], "failed", "a bad artifact is not restarted: {s}");
    assert_eq!(s["restarts"], 0);
    // The others kept serving, in the same processes.
    assert_eq!(http_get(port, "/kv/get/keep"), (200, "me".into()));
    assert_eq!(
        pid_of(&d.ctl_json(&["status", "greeter"])["status"]),
        Some(greeter_pid)
    );
    assert_eq!(
        pid_of(&d.ctl_json(&["status", "kv"])["status"]),
        Some(kv_pid)
    );
    assert!(d.ctl(&["health"]).status.success());

    // Uninstall everything: no process, no descriptor, no file left.
    let mut pids = vec![greeter_pid, kv_pid];
    for m in d.ctl_json(&["list"])["modules"].as_array().unwrap() {
        pids.extend(
            m["pids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_i64().unwrap() as i32),
        );
    }
    for m in d.ctl_json(&["list"])["modules"].as_array().unwrap().clone() {
        let name = m["name"].as_str().unwrap();
        let out = d.ctl(&["uninstall", name]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for p in pids {
        assert!(
            wait_reaped(p),
            "worker {p} survived uninstall (or was never reaped)"
        );
    }
    assert_eq!(d.ctl_json(&["list"])["modules"], json!([]));
    // Not even the artifact images are left, nor any other descriptor
    // (logs, listeners, pidfds, channels) emberd opened for a module.
    assert_eq!(memfds(emberd), Vec::<String>::new());
    poll_until(
        "emberd's descriptors to be what they were before any install",
        Duration::from_millis(20),
        || {
            let now = fds_beyond_the_pool(&d);
            if now == fds_before {
                Ok(())
            } else {
                Err(format!("before {fds_before:?}, now {now:?}"))
            }
        },
    );
    let left = |sub: &str| {
        std::fs::read_dir(d.state.join(sub))
            .map(|r| r.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(left("artifacts"), Vec::<std::path::PathBuf>::new());
    assert_eq!(left("logs"), Vec::<std::path::PathBuf>::new());
    let desired: Value =
        serde_json::from_str(&std::fs::read_to_string(d.state.join("desired.json")).unwrap())
            .unwrap();
    assert!(
        desired["modules"].as_object().is_none_or(|m| m.is_empty()),
        "{desired}"
    );
    // The port is free again.
    poll_until("the port to be free", Duration::from_millis(20), || {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .map(drop)
            .map_err(|e| e.to_string())
    });
}

#[test]
fn stop_is_graceful_through_the_protocol() {
    let d = daemon();
    // Not a speed check: the stop deadline is the dividing line. A module
    // that stops when asked (protocol Stop) lets uninstall return before
    // it; one that is only killed at the deadline makes uninstall wait the
    // whole deadline (the `ignores-stop` fixture tests that path).
    const STOP_DEADLINE: Duration = Duration::from_secs(20);
    let dir = real_module(
        d.dir.path(),
        "polite",
        "hello",
        &format!(
            "[limits]\nstop_deadline = \"{}s\"\n",
            STOP_DEADLINE.as_secs()
        ),
    );
    assert!(d.ctl(&["install", dir.to_str().unwrap()]).status.success());
    let pid = pid_of(&d.wait_status("polite", "running", running)).unwrap();
    let asked = Instant::now();
    assert!(d.ctl(&["uninstall", "polite"]).status.success());
    let stopped_after = asked.elapsed();
    assert!(
        stopped_after < STOP_DEADLINE,
        "uninstall waited out the stop deadline ({stopped_after:?}): the module was killed, not stopped"
    );
    assert!(wait_dead(pid));
}

#[test]
fn kill_9_of_emberd_brings_the_same_modules_back() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut d = daemon();
    let kv = kv_module(&d);
    assert!(d.ctl(&["install", kv.to_str().unwrap()]).status.success());
    let port = install_greeter(&d, "greeter", 1);
    d.wait_status("greeter", "wired", |s| {
        running(s) && s["imports"][0]["state"] == "wired"
    });
    http_until(port, "/kv/put/a/1", |st, _| st == 200);
    let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;
    let mut old: Vec<i32> = d.ctl_json(&["pool"])["pool"]["idle_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap() as i32)
        .collect();
    for m in ["kv", "greeter"] {
        old.push(pid_of(&d.ctl_json(&["status", m])["status"]).unwrap());
    }
    old.push(zygote);

    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    for &p in &old {
        assert!(wait_dead(p), "process {p} survived kill -9 of emberd");
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(p),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
    d.spawn(&[]);
    d.wait_status("kv", "running", running);
    let g = d.wait_status("greeter", "wired", |s| {
        running(s) && s["imports"][0]["state"] == "wired"
    });
    assert!(!old.contains(&pid_of(&g).unwrap()));
    // Same modules, same port, working service (kv's data was in memory).
    let list = d.ctl_json(&["list"]);
    let names: Vec<&str> = list["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["greeter", "kv"]);
    http_until(port, "/kv/get/a", |st, _| st == 404);
    assert_eq!(http_get(port, "/kv/put/a/2"), (200, "ok".into()));
    assert_eq!(http_get(port, "/kv/get/a"), (200, "2".into()));
}

#[test]
fn an_install_keeps_the_artifact_it_was_given() {
    use sha2::{Digest, Sha256};
    let d = daemon();
    let dir = copied_module(d.dir.path(), "snap", "hello");
    let so = dir.join("libhello.so");
    let expected: String = Sha256::digest(std::fs::read(&so).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    d.ctl_ok(&["install", dir.to_str().unwrap()]);
    // Acknowledged means stored: the hash is known and the copy is on disk.
    let s = d.ctl_json(&["status", "snap"])["status"].clone();
    assert_eq!(s["artifact_sha256"], expected.as_str(), "{s}");
    assert!(d.state.join(format!("artifacts/{expected}.so")).is_file());
    let first = pid_of(&d.wait_status("snap", "running", running)).unwrap();

    // Overwrite the installed file in place, then crash the module: the
    // restart loads what was installed, not what the file says now.
    std::fs::write(&so, b"not a shared object any more").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = d.wait_status("snap", "restarted and running", |s| {
        running(s) && s["restarts"].as_u64() >= Some(1)
    });
    assert_ne!(pid_of(&s), Some(first));
    assert_eq!(s["artifact_sha256"], expected.as_str());
}

#[test]
fn install_wait_follows_the_start() {
    let d = daemon();
    // Each state it goes through, once, then the install's result.
    let hello = real_module(d.dir.path(), "hello", "hello", "");
    let out = d.ctl(&["install", "--wait", hello.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = pid_of(&d.ctl_json(&["status", "hello"])["status"]).unwrap();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "hello: starting".to_owned(),
            format!("hello: running pid {pid}"),
            "installed hello 1.0.0 (running)".to_owned(),
        ],
        "{text}"
    );
    // It was running when the command returned.
    assert!(running(&d.ctl_json(&["status", "hello"])["status"]));

    // A module that cannot start: installed, but the command fails and says
    // why.
    let bad = real_module(d.dir.path(), "bad", "fixture-wrong-abi", "");
    let out = d.ctl(&["install", "--wait", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "bad: starting\nbad: failed\n"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad is installed but failed: "), "{err}");
    assert!(err.contains("AbiMismatch"), "{err}");

    // One that crashes before it is ready: the first back-off settles the
    // start (its restarts are further starts), every time.
    for n in 0..3 {
        let name = format!("panics{n}");
        let m = real_module(d.dir.path(), &name, "fixture-panic-start", "");
        let out = d.ctl(&["install", "--wait", m.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{name}: starting\n{name}: backoff\n")
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with(&format!(
                "emberctl: {name} is installed but in backoff: Start failed (Panic)"
            )),
            "{err}"
        );
        assert!(err.contains("(a restart is pending)"), "{err}");
    }

    // With `crash_loop_after = 1` the first failure is a crash loop.
    let d = Daemon::start(&format!("{FAST}crash_loop_after = 1\n"));
    let m = real_module(d.dir.path(), "loops", "fixture-panic-start", "");
    let out = d.ctl(&["install", "--wait", m.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "loops: starting\nloops: crashloop\n"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("emberctl: loops is installed but in crashloop: Start failed (Panic)"),
        "{err}"
    );
}

/// The inode of the `memfd:ember-artifact` mapping of `pid`.
fn image_inode(pid: i32) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .find(|l| l.contains("/memfd:ember-artifact"))
        .and_then(|l| l.split_whitespace().nth(4))
        .map(str::to_owned)
}

#[test]
fn identical_artifacts_share_one_image() {
    let d = daemon();
    let emberd = d.pid();
    let mut pids = Vec::new();
    for name in ["one", "two"] {
        // Two files, two module directories, the same bytes.
        let dir = copied_module(d.dir.path(), name, "hello");
        d.ctl_ok(&["install", "--wait", dir.to_str().unwrap()]);
        pids.push(pid_of(&d.ctl_json(&["status", name])["status"]).unwrap());
    }
    // One image in emberd, mapped by both workers: their code pages are
    // shared, not duplicated per module.
    let images: Vec<String> = memfds(emberd)
        .into_iter()
        .filter(|m| m.contains("ember-artifact"))
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    let inode = image_inode(pids[0]).expect("first worker maps the image");
    assert_eq!(image_inode(pids[1]).as_deref(), Some(inode.as_str()));

    // A different artifact gets its own image.
    let kv = kv_module(&d);
    assert!(d
        .ctl(&["install", "--wait", kv.to_str().unwrap()])
        .status
        .success());
    let images = memfds(emberd)
        .into_iter()
        .filter(|m| m.contains("ember-artifact"))
        .count();
    assert_eq!(images, 2);
}

#[test]
fn a_state_write_that_fails_undoes_the_change() {
    let d = daemon();
    let hello = real_module(d.dir.path(), "hello", "hello", "");
    assert!(d
        .ctl(&["install", "--wait", hello.to_str().unwrap()])
        .status
        .success());
    // Make every later write of the desired state fail: a directory where
    // the file is renamed to.
    let desired = d.state.join("desired.json");
    std::fs::remove_file(&desired).unwrap();
    std::fs::create_dir(&desired).unwrap();

    // An install that cannot be recorded is rolled back: error, not listed.
    let kv = kv_module(&d);
    let out = d.ctl(&["install", kv.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("desired.json"), "{err}");
    d.wait_status("hello", "hello untouched", running);
    let names = |d: &Daemon| -> Vec<String> {
        d.ctl_json(&["list"])["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    };
    poll_until("kv rolled back", Duration::from_millis(20), || {
        if names(&d) == ["hello"] {
            Ok(())
        } else {
            Err(format!("{:?}", names(&d)))
        }
    });

    // An uninstall that cannot be recorded says so and keeps the module.
    let out = d.ctl(&["uninstall", "hello"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot record the uninstall of hello"),
        "{err}"
    );
    assert_eq!(names(&d), ["hello"]);

    // Once the state can be written again, the uninstall goes through.
    std::fs::remove_dir(&desired).unwrap();
    d.ctl_ok(&["uninstall", "hello"]);
    assert!(names(&d).is_empty());
    let state: Value = serde_json::from_str(&std::fs::read_to_string(&desired).unwrap()).unwrap();
    assert_eq!(state["modules"], json!({}));
}
