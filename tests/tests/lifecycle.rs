//! Modules through the real daemon: install, crash and restart, logs,
//! uninstall without residue, kill -9 of emberd without orphans.

use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::{artifact, poll_until, TempDir};
use serde_json::json;

fn pid_of(v: &serde_json::Value) -> Option<i32> {
    v["pid"].as_i64().map(|p| p as i32)
}

#[test]
fn install_status_crash_restart_uninstall() {
    let d = Daemon::start(FAST);
    let m = module_dir(d.dir.path(), "hello", "0.1.0");
    let other = module_dir(d.dir.path(), "other", "2.0.0");

    d.ctl_ok(&["install", m.to_str().unwrap()]);
    let out = d.ctl(&["install", other.join("module.toml").to_str().unwrap()]);
    assert!(out.status.success());
    let s = d.wait_status("hello", "running", |s| s["state"] == "running");
    let pid = pid_of(&s).unwrap();
    d.wait_status("other", "running", |s| s["state"] == "running");
    let other_pid = pid_of(&d.ctl_json(&["status", "other"])["status"]).unwrap();
    // Workers are the daemon's children (re-parented to it, a subreaper).
    let ppid = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(ppid.contains(&format!("PPid:\t{}\n", d.pid())), "{ppid}");
    assert!(s["memory"]["rss"].as_u64().unwrap() > 0);
    assert!(s["cpu_seconds"].is_number());

    // Second install of the same name: conflict; bad paths: invalid input.
    assert_eq!(
        d.ctl(&["install", m.to_str().unwrap()]).status.code(),
        Some(5)
    );
    assert_eq!(d.ctl(&["status", "nope"]).status.code(), Some(3));
    assert_eq!(d.ctl(&["uninstall", "nope"]).status.code(), Some(3));
    let bad = d.dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("module.toml"),
        "name = \"Bad Name\"\nversion = \"1\"\nentry = \"x.so\"\n",
    )
    .unwrap();
    let out = d.ctl(&["install", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("name"));
    std::fs::write(
        bad.join("module.toml"),
        "name = \"bad\"\nversion = \"1.0.0\"\nentry = \"missing.so\"\n",
    )
    .unwrap();
    assert_eq!(
        d.ctl(&["install", bad.to_str().unwrap()]).status.code(),
        Some(4)
    );

    // The module's log has its tracing records, tagged with the instance.
    let out = d.ctl(&["logs", "hello"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hello@0.1.0#0 INFO hello: hello, world"),
        "{text}"
    );

    // Crash: restarted with back-off, the other module untouched.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = d.wait_status("hello", "restart", |s| {
        s["state"] == "running" && s["restarts"] == 1 && pid_of(s) != Some(pid)
    });
    assert_eq!(s["last_error"], "worker killed by signal 9");
    assert!(wait_dead(pid));
    let o = d.ctl_json(&["status", "other"]);
    assert_eq!(pid_of(&o["status"]), Some(other_pid));
    assert_eq!(o["status"]["restarts"], 0);

    // Uninstall: the worker exits, nothing left in the state dir.
    let new_pid = pid_of(&s).unwrap();
    d.ctl_ok(&["uninstall", "hello"]);
    assert!(wait_dead(new_pid));
    let list = d.ctl_json(&["list"]);
    assert_eq!(list["modules"].as_array().unwrap().len(), 1);
    assert!(!d.state.join("logs/hello.log").exists());
    let artifacts: Vec<_> = std::fs::read_dir(d.state.join("artifacts"))
        .unwrap()
        .collect();
    assert_eq!(artifacts.len(), 1, "only other's artifact remains");
    let desired = std::fs::read_to_string(d.state.join("desired.json")).unwrap();
    assert!(!desired.contains("\"hello\""));

    // Pool counters moved.
    let p = d.ctl_json(&["pool"])["pool"].clone();
    assert!(
        p["hits"].as_u64().unwrap() + p["misses"].as_u64().unwrap() >= 3,
        "{p}"
    );
}

#[test]
fn raw_stdout_and_stderr_land_in_the_log() {
    let d = Daemon::start(FAST);
    let m = real_module(
        d.dir.path(),
        "printer",
        "hello",
        "[config]\nprint = \"plain bytes 7\"\n",
    );
    d.ctl_ok(&["install", m.to_str().unwrap()]);
    d.wait_status("printer", "running", |s| s["state"] == "running");
    poll_until("raw output in the log", Duration::from_millis(20), || {
        let out = d.ctl_ok(&["logs", "printer"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        // Written by the module itself, not by emberd: no tag.
        if lines.contains(&"stdout: plain bytes 7") && lines.contains(&"stderr: plain bytes 7") {
            Ok(())
        } else {
            Err(text)
        }
    });
}

#[test]
fn logs_follow_streams_new_lines() {
    let d = Daemon::start(FAST);
    let m = module_dir(d.dir.path(), "chatty", "1.0.0");
    assert!(d.ctl(&["install", m.to_str().unwrap()]).status.success());
    d.wait_status("chatty", "running", |s| s["state"] == "running");
    let mut r = Raw::connect(&d.socket);
    r.send(json!({"method": "io.ember.Supervisor.Logs", "parameters": {"name": "chatty"}, "more": true}));
    let first = r.recv().unwrap();
    assert_eq!(first["continues"], true);
    let has_running = |v: &serde_json::Value| {
        v["parameters"]["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("hello, world"))
    };
    assert!(has_running(&first), "{first}");
    // `emberctl logs -f` follows the same stream, one line per line.
    let mut follower = std::process::Command::new(emberctl())
        .args([
            "--socket",
            d.socket.to_str().unwrap(),
            "logs",
            "chatty",
            "-f",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let out = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |want: &str| loop {
        match lines.recv_timeout(ember_tests::PATIENCE) {
            Ok(l) if l.contains(want) => return l,
            Ok(_) => {}
            Err(e) => panic!("emberctl logs -f never printed {want:?}: {e}"),
        }
    };
    let pid = d.ctl_json(&["status", "chatty"])["status"]["pid"]
        .as_i64()
        .unwrap() as i32;
    next_line(&format!("chatty@1.0.0#0 ember: launched in pid {pid}"));
    // Restarting the module appends lines that both streams carry.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let next = r.recv().unwrap();
    assert_eq!(next["continues"], true);
    let killed = format!("chatty@1.0.0#0 ember: pid {pid} killed by signal 9");
    next_line(&killed);
    next_line("chatty@1.0.0#0 INFO hello: hello, world");
    // Uninstall ends both streams; emberctl exits cleanly.
    assert!(d.ctl(&["uninstall", "chatty"]).status.success());
    let last = loop {
        let v = r.recv().unwrap();
        if v["continues"] != true {
            break v;
        }
    };
    assert!(last.get("error").is_none(), "{last}");
    // The module's last words, written while it stopped, just before the
    // log was removed, still reach the follower.
    next_line("chatty@1.0.0#0 INFO hello: goodbye");
    next_line("ember: pid");
    let status = follower.wait().unwrap();
    assert!(status.success(), "emberctl logs -f: {status}");
    reader.join().unwrap();
}

#[test]
fn kill_9_leaves_no_orphans_and_state_survives() {
    // Orphans are re-parented to us so they can be reaped (PID 1 here does
    // not reap); harmless for the other tests, whose children we never
    // wait for by pid.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut d = Daemon::start(&format!("[pool]\nmin_idle = 2\nmax_idle = 3\n{FAST}"));
    let a = module_dir(d.dir.path(), "alpha", "1.0.0");
    let b = module_dir(d.dir.path(), "beta", "1.0.0");
    assert!(d.ctl(&["install", a.to_str().unwrap()]).status.success());
    assert!(d.ctl(&["install", b.to_str().unwrap()]).status.success());
    d.wait_status("alpha", "running", |s| s["state"] == "running");
    d.wait_status("beta", "running", |s| s["state"] == "running");
    std::thread::sleep(Duration::from_millis(200));
    let health = d.ctl_json(&["health"]);
    let zygote = health["zygote_pid"].as_i64().unwrap() as i32;
    let mut pids: Vec<i32> = d.ctl_json(&["pool"])["pool"]["idle_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap() as i32)
        .collect();
    for m in ["alpha", "beta"] {
        pids.push(
            d.ctl_json(&["status", m])["status"]["pid"]
                .as_i64()
                .unwrap() as i32,
        );
    }
    pids.push(zygote);
    assert!(pids.len() >= 4, "{pids:?}");

    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    for &p in &pids {
        assert!(wait_dead(p), "process {p} survived kill -9 of emberd");
        // Reap it if it was handed to us.
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(p),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }

    // A stale socket file is left behind; the restart replaces it.
    assert!(d.socket.exists());
    d.spawn(&[]);
    let s = d.wait_status("alpha", "running", |s| s["state"] == "running");
    assert_eq!(s["restarts"], 0);
    d.wait_status("beta", "running", |s| s["state"] == "running");
    assert_ne!(
        d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32,
        zygote
    );
}

#[test]
fn kill_9_in_the_middle_of_installs_keeps_every_acknowledged_one() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut d = Daemon::start(FAST);
    let mut acknowledged = Vec::new();
    // Kill emberd at a different moment of an install each round: before
    // it has read the request, while the artifact is copied or the worker
    // starts, while the state is written, after the reply.
    // The last round kills it only once the reply is in.
    let rounds = [
        Some(0u64),
        Some(300),
        Some(1_000),
        Some(3_000),
        Some(10_000),
        Some(50_000),
        None,
    ];
    for (round, delay_us) in rounds.into_iter().enumerate() {
        let name = format!("m{round}");
        let dir = module_dir(d.dir.path(), &name, "1.0.0");
        let mut r = Raw::connect(&d.socket);
        r.send(json!({
            "method": "io.ember.Supervisor.Install",
            "parameters": { "path": dir.to_str().unwrap() },
        }));
        let early_reply = match delay_us {
            Some(us) => {
                std::thread::sleep(Duration::from_micros(us));
                None
            }
            None => r.recv(),
        };
        let workers: Vec<i32> = d.ctl_json(&["list"])["modules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| m["pids"].as_array().unwrap().clone())
            .map(|p| p.as_i64().unwrap() as i32)
            .collect();
        let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;
        let mut child = d.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever reply made it out before the kill is an acknowledgment.
        r.s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let reply = early_reply.or_else(|| r.recv());
        if reply.is_some_and(|v| v.get("error").is_none()) {
            acknowledged.push(name.clone());
        }
        for p in workers.into_iter().chain([zygote]) {
            assert!(wait_dead(p), "process {p} outlived emberd");
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(p),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        d.spawn(&[]);
        // Every acknowledged install is back and runs; an unacknowledged
        // one is either fully there (and runs) or not there at all.
        let listed: Vec<String> = d.ctl_json(&["list"])["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect();
        for a in &acknowledged {
            assert!(listed.contains(a), "acknowledged {a} lost: {listed:?}");
        }
        for m in &listed {
            d.wait_status(m, "running after the restart", |s| s["state"] == "running");
        }
        // A half-written file is cleaned away at the restart.
        let stray: Vec<_> = [d.state.clone(), d.state.join("artifacts")]
            .iter()
            .flat_map(|dir| std::fs::read_dir(dir).unwrap().flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert_eq!(stray, Vec::<String>::new());
    }
    assert!(acknowledged.contains(&"m6".to_owned()), "{acknowledged:?}");
}

#[test]
fn a_dead_zygote_is_replaced_and_running_modules_keep_running() {
    // The plugin from a copy we can take away, to make a restart fail;
    // no idle workers, so every launch needs the zygote.
    let dir = TempDir::new("zygote-restart");
    let plugin = dir.path().join("libcatalog.so");
    std::fs::copy(artifact("catalog"), &plugin).unwrap();
    let d = Daemon::start(&format!(
        "plugins = [{{ path = {:?}, config = {{ size_mb = 1, extra_init_ms = 0 }} }}]\n\
         [pool]\nmin_idle = 0\nmax_idle = 0\n{FAST}",
        plugin.display().to_string()
    ));
    let a = module_dir(d.dir.path(), "alpha", "1.0.0");
    d.ctl_ok(&["install", a.to_str().unwrap()]);
    let alpha = d.wait_status("alpha", "running", |s| s["state"] == "running")["pid"].clone();
    let zygote = |d: &Daemon| d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;
    let kill = |pid: i32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap()
    };
    let restarted = |d: &Daemon, n: u64| {
        poll_until("a new zygote", Duration::from_millis(20), || {
            let p = d.ctl_json(&["pool"])["pool"].clone();
            (p["zygote_restarts"] == n)
                .then_some(())
                .ok_or(p.to_string())
        })
    };

    // Killed: emberd reaps it and starts another with the plugin loaded.
    let first = zygote(&d);
    kill(first);
    restarted(&d, 1);
    assert!(wait_reaped(first), "the dead zygote was never reaped");
    let second = zygote(&d);
    assert_ne!(second, first);
    let maps = std::fs::read_to_string(format!("/proc/{second}/maps")).unwrap();
    assert!(maps.contains("libcatalog.so"), "plugin not loaded again");
    // The running module never noticed; a new install forks from the new one.
    let s = d.ctl_json(&["status", "alpha"])["status"].clone();
    assert_eq!(
        (s["state"].as_str(), &s["pid"], &s["restarts"]),
        (Some("running"), &alpha, &json!(0))
    );
    let b = module_dir(d.dir.path(), "beta", "1.0.0");
    d.ctl_ok(&["install", b.to_str().unwrap()]);
    let beta = d.wait_status("beta", "running", |s| s["state"] == "running")["pid"].clone();
    // Linux sends a parent-death signal when the parent *thread* exits. The
    // new zygote (and the workers re-parented to emberd) must hang off
    // a thread that lives as long as emberd: once emberd's idle blocking
    // threads have retired (tokio lets them go after 10 s idle), both are
    // still there.
    poll_until(
        "emberd's idle blocking threads to retire",
        Duration::from_millis(200),
        || {
            let threads = thread_names(d.pid());
            (threads.len() <= 2)
                .then_some(())
                .ok_or(format!("{threads:?}"))
        },
    );
    assert!(!dead(second), "the new zygote died with a thread of emberd");
    let s = d.ctl_json(&["status", "beta"])["status"].clone();
    assert_eq!(
        (s["state"].as_str(), &s["pid"]),
        (Some("running"), &beta),
        "{s}"
    );

    // A restart that cannot load the plugin fails launches with the reason
    // and is retried until it works again.
    std::fs::rename(&plugin, dir.path().join("gone.so")).unwrap();
    kill(second);
    let c = module_dir(d.dir.path(), "gamma", "1.0.0");
    d.ctl_ok(&["install", c.to_str().unwrap()]);
    let s = d.wait_status("gamma", "a launch failure", |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no zygote"))
    });
    assert!(
        s["last_error"].as_str().unwrap().contains("libcatalog.so"),
        "{s}"
    );
    assert_eq!(d.ctl_json(&["status", "alpha"])["status"]["pid"], alpha);
    std::fs::rename(dir.path().join("gone.so"), &plugin).unwrap();
    restarted(&d, 2);
    d.wait_status("gamma", "running once a zygote is back", |s| {
        s["state"] == "running"
    });
}

#[test]
fn a_launch_whose_fork_dies_with_the_zygote_waits_for_the_next_one() {
    let d = Daemon::start(&format!("[pool]\nmin_idle = 0\nmax_idle = 0\n{FAST}"));
    let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;
    let signal = |sig| nix::sys::signal::kill(nix::unistd::Pid::from_raw(zygote), sig).unwrap();
    // Stopped, the zygote never answers the launch's fork request; killed
    // then, it dies with that request in flight.
    signal(nix::sys::signal::Signal::SIGSTOP);
    let m = module_dir(d.dir.path(), "patient", "1.0.0");
    let mut raw = Raw::connect(&d.socket);
    raw.send(json!({
        "method": "io.ember.Supervisor.Install",
        "parameters": { "path": m.to_str().unwrap() },
    }));
    poll_until(
        "the fork request in flight",
        Duration::from_millis(20),
        || {
            let p = d.ctl_json(&["pool"])["pool"].clone();
            (p["misses"] == 1).then_some(()).ok_or(p.to_string())
        },
    );
    signal(nix::sys::signal::Signal::SIGKILL);
    let s = d.wait_status("patient", "running", |s| s["state"] == "running");
    assert_eq!(
        s["restarts"], 0,
        "the launch failed instead of waiting: {s}"
    );
    assert!(s["last_error"].is_null(), "{s}");
    let p = d.ctl_json(&["pool"])["pool"].clone();
    assert_eq!(
        (&p["zygote_restarts"], &p["fork_failures"]),
        (&json!(1), &json!(0)),
        "{p}"
    );
    assert!(raw.recv().is_some_and(|r| r.get("error").is_none()));
}

#[test]
fn second_daemon_on_same_socket_is_refused() {
    let d = Daemon::start(FAST);
    let out = std::process::Command::new(emberd())
        .arg("--socket")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(d.dir.path().join("state2"))
        .env("EMBER_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    // The first one still answers.
    assert!(d.ctl(&["health"]).status.success());
}

/// A module dir named `name` running the example or fixture crate `krate`.
fn fixture(parent: &std::path::Path, name: &str, krate: &str, extra: &str) -> std::path::PathBuf {
    real_module(parent, name, krate, extra)
}

#[test]
fn failures_are_reported_and_isolated() {
    let d = Daemon::start(FAST);
    let good = module_dir(d.dir.path(), "good", "1.0.0");
    assert!(d.ctl(&["install", good.to_str().unwrap()]).status.success());
    let good_pid = d.wait_status("good", "running", |s| s["state"] == "running")["pid"].clone();

    // A permanent load failure: failed, not restarted.
    let bad = fixture(d.dir.path(), "badabi", "fixture-wrong-abi", "");
    assert!(d.ctl(&["install", bad.to_str().unwrap()]).status.success());
    let s = d.wait_status("badabi", "failed", |s| s["state"] == "failed");
    assert!(s["reason"].as_str().unwrap().contains("AbiMismatch"), "{s}");
    assert_eq!(s["restarts"], 0);
    let logs = String::from_utf8_lossy(&d.ctl(&["logs", "badabi"]).stdout).into_owned();
    assert!(logs.contains("ember: Load failed (AbiMismatch)"), "{logs}");

    // Never ready: killed at the manifest's start deadline, backed off,
    // restarted, then in crash loop.
    let slow = fixture(
        d.dir.path(),
        "slow",
        "fixture-never-ready",
        "[limits]\nstart_deadline = \"300ms\"\n",
    );
    assert!(d.ctl(&["install", slow.to_str().unwrap()]).status.success());
    let s = d.wait_status("slow", "backoff", |s| {
        s["state"] == "backoff" || s["state"] == "crashloop"
    });
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("not ready within 300"),
        "{s}"
    );

    // Panics in start: restarted with back-off until crash loop.
    let quitter = fixture(d.dir.path(), "quitter", "fixture-panic-start", "");
    assert!(d
        .ctl(&["install", quitter.to_str().unwrap()])
        .status
        .success());
    let s = d.wait_status("quitter", "crashloop", |s| s["state"] == "crashloop");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .contains("Start failed (Panic)"),
        "{s}"
    );
    assert!(s["restarts"].as_u64().unwrap() >= 4, "{s}");

    // The good module never noticed.
    let g = d.ctl_json(&["status", "good"]);
    assert_eq!(g["status"]["state"], "running");
    assert_eq!(g["status"]["pid"], good_pid);
    let h = d.ctl_json(&["health"]);
    assert!(h["failed"].as_u64().unwrap() >= 2, "{h}");

    for m in ["badabi", "slow", "quitter", "good"] {
        let out = d.ctl(&["uninstall", m]);
        assert!(
            out.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(d.ctl_json(&["list"])["modules"], json!([]));
}

#[test]
fn listeners_are_bound_shared_and_released() {
    let d = Daemon::start(FAST);
    // A port somebody else holds: install refused with PortInUse.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let m = fixture(
        d.dir.path(),
        "web",
        "hello",
        &format!("[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:{port}\"\n"),
    );
    let out = d.ctl(&["install", m.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("port {port} is in use")));
    let mut r = Raw::connect(&d.socket);
    let e = r.call("io.ember.Supervisor.Install", json!({ "path": m }));
    assert_eq!(e["error"], "io.ember.Supervisor.PortInUse");
    assert_eq!(e["parameters"]["port"], port);
    assert_eq!(
        d.ctl_json(&["list"])["modules"],
        json!([]),
        "nothing half-installed"
    );
    drop(taken);

    // Free now: the daemon binds it and the worker holds it. (A child
    // spawned concurrently by another test may hold a copy of our socket
    // between its fork and exec for a moment: retry briefly.)
    poll_until("the port for web", Duration::from_millis(50), || {
        let out = d.ctl(&["install", m.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            Some(0) => Ok(()),
            Some(5) => Err(stderr),
            _ => panic!("install web: {stderr}"),
        }
    });
    let s = d.wait_status("web", "running", |s| s["state"] == "running");
    assert_eq!(
        s["listeners"],
        json!([{ "name": "http", "address": format!("127.0.0.1:{port}") }])
    );
    let pid = s["pid"].as_i64().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
    // The worker got the socket (besides stdio and its channel).
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds >= 5, "worker descriptors");

    // Uninstalled: the port is free again.
    assert!(d.ctl(&["uninstall", "web"]).status.success());
    assert!(wait_dead(pid as i32));
    poll_until("the port to be free", Duration::from_millis(20), || {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .map(drop)
            .map_err(|e| e.to_string())
    });
}

#[test]
fn replicas_share_a_listener_and_fail_alone() {
    let d = Daemon::start(FAST);
    let m = real_module(
        d.dir.path(),
        "fleet",
        "hello",
        "replicas = 3\n\n[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n",
    );
    assert!(d.ctl(&["install", m.to_str().unwrap()]).status.success());
    let s = d.wait_status("fleet", "3 running", |s| {
        s["state"] == "running"
            && s["replicas"]
                .as_array()
                .is_some_and(|r| r.len() == 3 && r.iter().all(|r| r["state"] == "running"))
    });
    let pids: Vec<i64> = s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].as_i64().unwrap())
        .collect();
    let list = d.ctl_json(&["list"]);
    assert_eq!(list["modules"][0]["replicas"], 3);
    assert_eq!(list["modules"][0]["pids"].as_array().unwrap().len(), 3);
    // Every replica holds the same listening socket (its other sockets,
    // the control channel, are its own).
    let sockets = |pid: i64| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|l| l.display().to_string())
            .filter(|l| l.starts_with("socket:"))
            .collect()
    };
    let shared = pids
        .iter()
        .map(|p| sockets(*p))
        .reduce(|a, b| a.intersection(&b).cloned().collect())
        .unwrap();
    assert_eq!(shared.len(), 1, "{shared:?}");
    let out = String::from_utf8_lossy(&d.ctl(&["status", "fleet"]).stdout).into_owned();
    assert!(
        out.contains("REPLICA") && out.contains("http=127.0.0.1:"),
        "{out}"
    );

    // Kill replica 1: only it restarts.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[1] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = d.wait_status("fleet", "replica 1 back", |s| {
        let r = &s["replicas"][1];
        r["state"] == "running" && r["restarts"] == 1
    });
    let r = s["replicas"].as_array().unwrap();
    assert_eq!(r[0]["pid"], pids[0]);
    assert_eq!(r[2]["pid"], pids[2]);
    assert_eq!(r[0]["restarts"], 0);
    assert_eq!(s["restarts"], 1);
    assert_eq!(s["last_error"], "replica 1: worker killed by signal 9");
    assert!(d.ctl(&["uninstall", "fleet"]).status.success());
    for p in pids {
        assert!(wait_dead(p as i32));
    }
}

#[test]
fn processes_hold_only_their_descriptors() {
    let d = Daemon::start(FAST);
    let fds = |pid: i32| -> Vec<u32> {
        let mut v: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().parse().unwrap())
            .collect();
        v.sort();
        v
    };
    let comm = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;
    assert_eq!(comm(zygote).trim(), "ember-zygote");
    // Let the pool fill up to max_idle (4 by default): then no fork is in
    // flight and the zygote holds only what it keeps between forks.
    let idle = poll_until("a full pool", Duration::from_millis(20), || {
        let p = d.ctl_json(&["pool"])["pool"]["idle_pids"].clone();
        if p.as_array().unwrap().len() >= 4 {
            Ok(p)
        } else {
            Err(p.to_string())
        }
    });
    // The zygote: stdio, its channel, and the numbers where workers put
    // listeners (3 to 18), held before plugins load so none of theirs is
    // there; nothing else.
    let z = fds(zygote);
    let link = |fd: u32| {
        std::fs::read_link(format!("/proc/{zygote}/fd/{fd}"))
            .unwrap()
            .display()
            .to_string()
    };
    let sockets: Vec<u32> = z
        .iter()
        .copied()
        .filter(|&fd| link(fd).starts_with("socket:"))
        .collect();
    assert_eq!(sockets.len(), 1, "zygote: one channel: {z:?}");
    for fd in 3..19 {
        assert!(
            sockets.contains(&fd) || link(fd) == "/dev/null",
            "zygote: {fd} not reserved: {z:?}"
        );
    }
    assert!(
        z.iter().all(|&fd| fd < 19 || sockets.contains(&fd)),
        "zygote: stray descriptors: {z:?}"
    );
    for p in idle.as_array().unwrap() {
        let pid = p.as_i64().unwrap() as i32;
        assert_eq!(fds(pid), vec![0, 1, 2, 3], "idle worker {pid}");
        assert_eq!(comm(pid).trim(), "ember: warm");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.contains(&format!("PPid:\t{}\n", d.pid())),
            "{status}"
        );
        assert!(status.contains("SigBlk:\t0000000000000000"), "{status}");
    }
}

#[test]
fn uninstall_kills_a_module_that_ignores_stop() {
    let d = Daemon::start(FAST);
    let m = fixture(
        d.dir.path(),
        "stubborn",
        "fixture-ignores-stop",
        "[limits]\nstop_deadline = \"400ms\"\n",
    );
    assert!(d.ctl(&["install", m.to_str().unwrap()]).status.success());
    let pid = d.wait_status("stubborn", "running", |s| s["state"] == "running")["pid"]
        .as_i64()
        .unwrap() as i32;
    let out = d.ctl(&["uninstall", "stubborn"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Killed at the deadline rather than waited on forever, and it says so.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "uninstalled stubborn (killed: it had not exited by its stop deadline)\n"
    );
    assert!(dead(pid), "worker {pid} survived the stop deadline");

    // The reply says it, and only when it happened.
    let m = fixture(
        d.dir.path(),
        "stubborn2",
        "fixture-ignores-stop",
        "[limits]\nstop_deadline = \"400ms\"\n",
    );
    d.ctl_ok(&["install", m.to_str().unwrap()]);
    d.wait_status("stubborn2", "running", |s| s["state"] == "running");
    assert_eq!(
        d.ctl_json(&["uninstall", "stubborn2"]),
        json!({ "killed": true })
    );
    let polite = module_dir(d.dir.path(), "polite", "1.0.0");
    d.ctl_ok(&["install", polite.to_str().unwrap()]);
    d.wait_status("polite", "running", |s| s["state"] == "running");
    let out = d.ctl_ok(&["uninstall", "polite"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "uninstalled polite\n");
}
