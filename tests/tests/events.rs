//! The event stream through the real daemon: `emberctl events` (the real
//! binary) sees a crash and its restart as they happen; a reader that
//! stalls is dropped with the number of events it missed while emberd
//! keeps serving; the name filter; the `status` table of every module;
//! `list --watch` redraws when a module is installed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use ember_tests::daemon::*;
use ember_tests::{ChildGuard, PATIENCE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// `emberctl --socket … ARGS` started with its stdout piped: the child and
/// its stdout's lines as they are printed.
fn spawn_ctl(d: &Daemon, args: &[&str]) -> (ChildGuard, mpsc::Receiver<String>) {
    let mut child = Command::new(emberctl())
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (ChildGuard(child), rx)
}

/// Lines from `rx` until one satisfies `f` (returned); all lines read,
/// that one included, are appended to `seen`.
fn line_until(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    what: &str,
    f: impl Fn(&str) -> bool,
) -> String {
    loop {
        let line = rx
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}; seen: {seen:#?}"));
        seen.push(line.clone());
        if f(&line) {
            return line;
        }
    }
}

/// JSON events from `rx` until one satisfies `f` (returned); all events
/// read are appended to `seen`.
fn event_until(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<Value>,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let line = rx
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}; seen: {seen:#?}"));
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        seen.push(v.clone());
        if f(&v) {
            return v;
        }
    }
}

/// Installs and uninstalls the module at `dir` (named `name`) until every
/// follower has printed a line: then each has subscribed. (Their lines
/// about the pings stay to be read: the tests' predicates skip them.)
fn ping_until_subscribed(
    d: &Daemon,
    dir: &std::path::Path,
    name: &str,
    rxs: &[&mpsc::Receiver<String>],
) {
    let mut waiting: Vec<usize> = (0..rxs.len()).collect();
    ember_tests::poll_until(
        "the followers' subscriptions",
        std::time::Duration::from_millis(20),
        || {
            d.ctl_ok(&["install", dir.to_str().unwrap()]);
            d.ctl_ok(&["uninstall", name]);
            waiting.retain(|&i| rxs[i].try_recv().is_err());
            if waiting.is_empty() {
                Ok(())
            } else {
                Err(format!("followers {waiting:?} saw nothing yet"))
            }
        },
    );
}

fn state(e: &Value, module: &str, from: &str, to: &str) -> bool {
    e["kind"] == "state" && e["module"] == module && e["from"] == from && e["to"] == to
}

#[test]
fn events_show_a_crash_and_its_restart_as_they_happen() {
    let d = Daemon::start(FAST);
    let (mut all, all_rx) = spawn_ctl(&d, &["events", "--json"]);
    let (mut human, human_rx) = spawn_ctl(&d, &["events"]);
    let (mut only_other, other_rx) = spawn_ctl(&d, &["events", "other", "--json"]);
    let other = module_dir(d.dir.path(), "other", "2.0.0");
    ping_until_subscribed(&d, &other, "other", &[&all_rx, &human_rx, &other_rx]);
    d.ctl_ok(&["install", other.to_str().unwrap()]);
    let mut seen = Vec::new();
    let mut other_seen = Vec::new();
    let mut human_seen = Vec::new();
    line_until(&human_rx, &mut human_seen, "other running", |l| {
        l.contains(" other r0 rev 1 starting -> running pid ")
    });

    let hello = module_dir(d.dir.path(), "hello", "0.1.0");
    d.ctl_ok(&["install", hello.to_str().unwrap()]);
    let running = event_until(&all_rx, &mut seen, "hello running", |e| {
        state(e, "hello", "starting", "running")
    });
    let pid = running["pid"].as_i64().expect("the running worker's pid") as i32;
    assert_eq!(running["revision"], 1);
    assert_eq!(running["replica"], 0);
    event_until(&all_rx, &mut seen, "hello installed", |e| {
        e["kind"] == "installed" && e["module"] == "hello" && e["version"] == "0.1.0"
    });

    // The crash, then the restart, as they happen.
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let crash = event_until(&all_rx, &mut seen, "the crash", |e| {
        e["module"] == "hello" && e["kind"] == "state" && e["from"] == "running"
    });
    assert_eq!(crash["to"], "backoff", "{crash}");
    assert_eq!(crash["pid"], pid, "{crash}");
    assert_eq!(crash["reason"], "worker killed by signal 9", "{crash}");
    assert_eq!(crash["restarts"], 0, "{crash}");
    let restart = event_until(&all_rx, &mut seen, "the restart", |e| {
        e["module"] == "hello" && e["kind"] == "state"
    });
    assert!(state(&restart, "hello", "backoff", "starting"), "{restart}");
    assert_eq!(restart["restarts"], 1, "{restart}");
    let back = event_until(&all_rx, &mut seen, "running again", |e| {
        e["module"] == "hello" && e["kind"] == "state"
    });
    assert!(state(&back, "hello", "starting", "running"), "{back}");
    let new_pid = back["pid"].as_i64().unwrap() as i32;
    assert_ne!(new_pid, pid);
    // The daemon agrees.
    let s = d.ctl_json(&["status", "hello"]);
    assert_eq!(s["status"]["pid"], new_pid);
    assert_eq!(s["status"]["restarts"], 1);

    // Every event reached this follower, in order: the numbers follow
    // each other without a gap; each has a UTC timestamp.
    for w in seen.windows(2) {
        assert_eq!(
            w[1]["seq"].as_u64().unwrap(),
            w[0]["seq"].as_u64().unwrap() + 1,
            "{:#?}",
            w
        );
    }
    for e in &seen {
        let t = e["time"].as_str().unwrap();
        assert!(
            t.len() == 24 && t.ends_with('Z') && &t[10..11] == "T",
            "{e}"
        );
    }

    // The human follower printed the crash with its reason.
    line_until(&human_rx, &mut human_seen, "the crash line", |l| {
        l.contains(&format!(
            " hello r0 rev 1 running -> backoff pid {pid}: worker killed by signal 9"
        ))
    });
    line_until(&human_rx, &mut human_seen, "the restart line", |l| {
        l.contains(" hello r0 rev 1 backoff -> starting")
    });

    // The filtered follower saw nothing of hello: events reach it in
    // order, so hello's (earlier) events would precede other's uninstall.
    d.ctl_ok(&["uninstall", "other"]);
    let last = back["seq"].as_u64().unwrap();
    event_until(&other_rx, &mut other_seen, "other uninstalled", |e| {
        e["kind"] == "uninstalled" && e["seq"].as_u64().unwrap() > last
    });
    assert!(
        other_seen.iter().all(|e| e["module"] == "other"),
        "{other_seen:#?}"
    );
    assert!(other_seen
        .iter()
        .any(|e| state(e, "other", "running", "stopping") && e["seq"].as_u64().unwrap() > last));
    for c in [&mut all, &mut human, &mut only_other] {
        c.kill();
    }
}

#[test]
fn a_stalled_reader_is_dropped_with_the_count_it_missed() {
    // A small hub: a reader more than 4 events behind is dropped. The
    // write deadline (a reader that reads nothing for that long is closed,
    // see the next test) is out of the way: this test may take as long as
    // it takes, and the readers still get their `EventsLagged`.
    let d = Daemon::start_with(
        &format!("{FAST}[events]\nbuffer = 4\n"),
        &[("EMBER_TEST_WRITE_DEADLINE_MS", "86400000")],
    );
    // A raw client that subscribes, then does not read.
    let mut raw = Raw::connect(&d.socket);
    raw.send(json!({
        "method": "io.ember.Supervisor.Events", "parameters": {}, "more": true
    }));
    let first = raw.recv().expect("the subscription");
    assert_eq!(first["parameters"]["subscribed"], true, "{first}");
    assert_eq!(first["continues"], true, "{first}");
    let last_seq = first["parameters"]["last_seq"].as_u64().expect("last_seq");
    let daemon = first["parameters"]["daemon"]
        .as_str()
        .expect("daemon")
        .to_owned();
    assert!(daemon.starts_with(&format!("{}-", d.pid())), "{first}");
    // And the real emberctl, stopped (SIGSTOP) while events pile up.
    let (mut ctl, ctl_rx) = spawn_ctl(&d, &["events", "--json"]);
    let hello = module_dir(d.dir.path(), "hello", "1.0.0");
    ping_until_subscribed(&d, &hello, "hello", &[&ctl_rx]);
    d.ctl_ok(&["install", hello.to_str().unwrap()]);
    kill(Pid::from_raw(ctl.pid() as i32), Signal::SIGSTOP).unwrap();

    // Many events: each cycle is an uninstall and an install (stops,
    // starts, pool refills). emberd keeps answering meanwhile.
    for _ in 0..12 {
        d.ctl_ok(&["uninstall", "hello"]);
        d.ctl_ok(&["install", hello.to_str().unwrap()]);
        let list = d.ctl_json(&["list"]);
        assert_eq!(list["modules"][0]["name"], "hello");
    }

    // The raw reader: what fitted in its socket, then the error naming how
    // many events it missed.
    let mut events = 0;
    let error = loop {
        let r = raw.recv().expect("a reply before the end");
        if r.get("error").is_some() {
            break r;
        }
        assert_eq!(r["continues"], true, "{r}");
        let seq = r["parameters"]["event"]["seq"].as_u64().unwrap();
        // The first event after the subscription is `last_seq + 1`.
        assert_eq!(seq, last_seq + 1 + events, "{r}");
        assert_eq!(r["parameters"]["event"]["daemon"], daemon.as_str(), "{r}");
        events += 1;
    };
    // Then the connection is closed.
    assert!(raw.recv().is_none(), "closed after EventsLagged");
    assert_eq!(
        error["error"], "io.ember.Supervisor.EventsLagged",
        "{error}"
    );
    let missed = error["parameters"]["missed"].as_u64().unwrap();
    assert!(missed > 0, "{error}");
    assert!(events > 0);

    // emberctl, woken up: its lines, then it exits 1 with the message.
    kill(Pid::from_raw(ctl.pid() as i32), Signal::SIGCONT).unwrap();
    let status = ctl
        .wait_timeout(PATIENCE)
        .expect("emberctl exits once dropped");
    let mut stderr = String::new();
    std::io::Read::read_to_string(ctl.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("dropped by emberd: this reader fell behind and missed")
            && stderr.contains(" events"),
        "{stderr}"
    );

    // A new subscriber is served as before.
    d.ctl_ok(&["uninstall", "hello"]);
    let (mut again, again_rx) = spawn_ctl(&d, &["events", "hello", "--json"]);
    ping_until_subscribed(&d, &hello, "hello", &[&again_rx]);
    again.kill();
}

#[test]
fn a_reader_stalled_past_the_write_deadline_is_closed_not_left_hanging() {
    // A big hub (it never lags by count) and a 300 ms write deadline.
    let d = Daemon::start_with(FAST, &[("EMBER_TEST_WRITE_DEADLINE_MS", "300")]);
    let mut raw = Raw::connect(&d.socket);
    raw.send(json!({
        "method": "io.ember.Supervisor.Events", "parameters": {}, "more": true
    }));
    let first = raw.recv().expect("the subscription");
    assert_eq!(first["parameters"]["subscribed"], true, "{first}");
    // More events than its socket holds (as in the test above), while it
    // reads nothing.
    let hello = module_dir(d.dir.path(), "hello", "1.0.0");
    for _ in 0..20 {
        d.ctl_ok(&["install", hello.to_str().unwrap()]);
        d.ctl_ok(&["uninstall", "hello"]);
    }
    // It stalls well past the deadline (the sleep makes the stall longer
    // than the deadline; it measures nothing).
    std::thread::sleep(std::time::Duration::from_secs(3));
    // What fitted in its socket (whole events, perhaps a half one), maybe
    // the error, then the end: never a connection left open (Raw's read
    // timeout fails the test if it hangs).
    let mut events = 0;
    while let Some(r) = raw.recv() {
        if r.get("error").is_some() {
            assert_eq!(r["error"], "io.ember.Supervisor.EventsLagged", "{r}");
            assert!(raw.recv().is_none(), "closed after the error");
            break;
        }
        assert!(r["parameters"]["event"]["seq"].is_u64(), "{r}");
        events += 1;
    }
    assert!(events > 0);
    let last = d.ctl_json(&["list"]);
    assert!(last["modules"].as_array().unwrap().is_empty(), "{last}");
}

/// emberd's resident memory, kB (`VmRSS` of `/proc/PID/status`).
fn rss_kb(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Sends `mib` MiB of bytes with no terminator on `raw`, from a thread,
/// ignoring the error once emberd closes the connection.
fn pour(raw: &Raw, mib: usize) -> std::thread::JoinHandle<()> {
    let mut s = raw.s.try_clone().unwrap();
    std::thread::spawn(move || {
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..mib {
            if std::io::Write::write_all(&mut s, &chunk).is_err() {
                return;
            }
        }
    })
}

#[test]
fn bytes_sent_during_a_stream_are_capped_and_the_connection_closed() {
    let d = Daemon::start(FAST);
    let hello = module_dir(d.dir.path(), "hello", "1.0.0");
    d.ctl_ok(&["install", hello.to_str().unwrap()]);
    let before = rss_kb(d.pid());
    for (method, params) in [
        ("io.ember.Supervisor.Events", json!({})),
        ("io.ember.Supervisor.Logs", json!({ "name": "hello" })),
    ] {
        let mut raw = Raw::connect(&d.socket);
        raw.send(json!({ "method": method, "parameters": params, "more": true }));
        let first = raw.recv().expect("the first reply");
        assert_eq!(first["continues"], true, "{first}");
        // 24 MiB, far more than a call may be (MAX_MESSAGE).
        let writer = pour(&raw, 24);
        // emberd closes the connection: whatever came, then the end (Raw's
        // read timeout fails the test if it never comes).
        let mut last = first;
        while let Some(r) = raw.recv() {
            last = r;
        }
        assert_eq!(
            last["error"], "io.ember.Supervisor.ProtocolError",
            "{method}: {last}"
        );
        writer.join().unwrap();
    }
    // emberd did not keep what was poured into it.
    let grown = rss_kb(d.pid()).saturating_sub(before);
    assert!(grown < 8 * 1024, "emberd grew by {grown} kB");
    d.ctl_ok(&["list"]);
}

#[test]
fn events_without_more_is_refused_clearly() {
    let d = Daemon::start(FAST);
    let mut raw = Raw::connect(&d.socket);
    let r = raw.call("io.ember.Supervisor.Events", json!({}));
    assert_eq!(r["error"], "io.ember.Supervisor.InvalidInput", "{r}");
    assert!(
        r["parameters"]["reason"]
            .as_str()
            .unwrap()
            .contains("call it with `more`"),
        "{r}"
    );
    let r = raw.call("io.ember.Supervisor.Events", json!({ "nam": "x" }));
    assert_eq!(r["error"], "org.varlink.service.InvalidParameter", "{r}");
    // The connection still serves.
    let r = raw.call("io.ember.Supervisor.List", json!({}));
    assert!(r["parameters"]["modules"].is_array(), "{r}");
}

#[test]
fn status_without_a_name_is_a_table_of_every_module() {
    let d = Daemon::start(FAST);
    for (name, version) in [("alpha", "1.0.0"), ("beta", "2.0.0")] {
        let m = module_dir(d.dir.path(), name, version);
        d.ctl_ok(&["install", m.to_str().unwrap()]);
        d.wait_status(name, "running", |s| s["state"] == "running");
    }
    let out = d.ctl_ok(&["status"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "VERSION", "REV", "STATE", "READY", "RESTARTS", "PIDS", "CPU", "PSS", "UPTIME"],
        "{text}"
    );
    for (line, (name, version)) in lines[1..]
        .iter()
        .zip([("alpha", "1.0.0"), ("beta", "2.0.0")])
    {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &cols[..6],
            [name, version, "1", "running", "1/1", "0"],
            "{text}"
        );
        let pid: i32 = cols[6].parse().unwrap_or_else(|_| panic!("{text}"));
        assert!(!dead(pid), "{text}");
    }
    let v = d.ctl_json(&["status"]);
    let names: Vec<&str> = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
}

#[test]
fn list_watch_redraws_when_a_module_is_installed() {
    let d = Daemon::start(FAST);
    let (mut watch, rx) = spawn_ctl(&d, &["list", "--watch"]);
    let mut seen = Vec::new();
    // The first drawing: the header alone (nothing installed).
    line_until(&rx, &mut seen, "the first drawing", |l| {
        l.starts_with("NAME")
    });
    let m = module_dir(d.dir.path(), "hello", "1.0.0");
    d.ctl_ok(&["install", m.to_str().unwrap()]);
    // Not a terminal: a separator, then the new drawing with the module,
    // until it shows running.
    line_until(&rx, &mut seen, "a separator", |l| l == "---");
    line_until(&rx, &mut seen, "hello running", |l| {
        l.starts_with("hello ") && l.contains(" running ")
    });
    assert!(
        !seen.iter().any(|l| l.contains('\x1b')),
        "no ANSI escapes off a terminal: {seen:?}"
    );
    watch.kill();
}

#[test]
fn rollouts_pool_misses_and_zygote_restarts_are_events() {
    // No idle worker is kept: every launch is a pool miss.
    let d = Daemon::start(&format!("{FAST}[pool]\nmin_idle = 0\nmax_idle = 0\n"));
    let (mut follow, rx) = spawn_ctl(&d, &["events", "--json"]);
    let v1 = module_dir(d.dir.path(), "hello", "1.0.0");
    ping_until_subscribed(&d, &v1, "hello", &[&rx]);
    let mut seen = Vec::new();
    d.ctl_ok(&["install", v1.to_str().unwrap()]);
    let miss = event_until(&rx, &mut seen, "a pool miss", |e| e["kind"] == "pool");
    assert_eq!(miss["what"], "miss", "{miss}");

    // A new revision: the rollout's start, its steps, its outcome.
    let v2 = d.dir.path().join("v2");
    std::fs::create_dir_all(&v2).unwrap();
    let manifest = std::fs::read_to_string(v1.join("module.toml")).unwrap();
    std::fs::write(
        v2.join("module.toml"),
        manifest.replace("version = \"1.0.0\"", "version = \"2.0.0\""),
    )
    .unwrap();
    d.ctl_ok(&["deploy", v2.to_str().unwrap(), "--wait"]);
    let started = event_until(&rx, &mut seen, "the rollout's start", |e| {
        e["kind"] == "rollout"
    });
    assert_eq!(started["step"], "started", "{started}");
    assert_eq!(
        (
            started["from_revision"].as_u64(),
            started["revision"].as_u64()
        ),
        (Some(1), Some(2)),
        "{started}"
    );
    let mut steps = Vec::new();
    loop {
        let e = event_until(&rx, &mut seen, "the rollout's outcome", |e| {
            e["kind"] == "rollout" || state(e, "hello", "starting", "running")
        });
        if e["kind"] == "state" {
            assert_eq!(e["revision"], 2, "{e}");
            continue;
        }
        steps.push(e["step"].as_str().unwrap().to_owned());
        if e["step"] == "completed" {
            break;
        }
    }
    assert!(steps.contains(&"stabilizing".to_owned()), "{steps:?}");

    // The zygote dies: emberd says so, and that a new one serves.
    let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;
    kill(Pid::from_raw(zygote), Signal::SIGKILL).unwrap();
    let died = event_until(&rx, &mut seen, "the zygote's death", |e| {
        e["kind"] == "zygote"
    });
    assert_eq!(died["what"], "died", "{died}");
    assert_eq!(died["pid"], zygote, "{died}");
    let restarted = event_until(&rx, &mut seen, "a new zygote", |e| e["kind"] == "zygote");
    assert_eq!(restarted["what"], "restarted", "{restarted}");
    assert_ne!(restarted["pid"], zygote, "{restarted}");
    follow.kill();
}
