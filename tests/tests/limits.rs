//! Per-module OS limits: the real `emberd` detects what this machine offers
//! (cgroup v2, v1 or nothing), reports it in `Health` and `Status`, puts the
//! `unbounded-alloc` fixture's worker into a cgroup of its own with the
//! manifest's memory limit, reports the kill as a memory failure, and
//! leaves no cgroup behind. Without a usable controller the same test
//! asserts the fallback: emberd's memory watch, which counts a worker's
//! private memory only (a plugin's sealed table that a module reads is not
//! charged to it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::{poll_until, workspace_root};
use supervisor::cgroup::{detect, Mechanism, Version, ROOT};

const LIMIT: u64 = 64 << 20;

fn fixture(d: &Daemon) -> PathBuf {
    // The fixture's own manifest asks for 64MiB.
    let own = std::fs::read_to_string(
        workspace_root().join("examples/fixtures/unbounded-alloc/module.toml"),
    )
    .unwrap();
    assert!(own.contains("memory = \"64MiB\""), "{own}");
    real_module(
        d.dir.path(),
        "alloc",
        "fixture-unbounded-alloc",
        "[limits]\nmemory = \"64MiB\"\nstart_deadline = \"2s\"\nstop_deadline = \"1s\"\n",
    )
}

fn reason(s: &serde_json::Value) -> String {
    format!("{} {}", s["reason"], s["last_error"])
}

/// Watches `parent` until an instance cgroup of `alloc` shows `file` set
/// to `value` (instances come and go: the fixture is killed and restarted).
fn observe_limit(parent: &Path, file: &str, value: &str) -> PathBuf {
    let what = format!(
        "an instance cgroup with {file} = {value} under {}",
        parent.display()
    );
    poll_until(&what, Duration::from_millis(1), || {
        if let Ok(rd) = std::fs::read_dir(parent) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with("alloc.0.") {
                    continue;
                }
                if let Ok(v) = std::fs::read_to_string(e.path().join(file)) {
                    if v.trim() == value {
                        return Ok(e.path());
                    }
                }
            }
        }
        Err("none yet".into())
    })
}

#[test]
fn memory_limit_is_enforced_reported_and_cleaned_up() {
    // Detect, don't assume: emberd runs in this test's cgroup.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let detected = detect(Path::new(ROOT), &own);
    let expected = detected.memory_mechanism();

    let mut d = Daemon::start(FAST);
    let pid = d.pid() as u32;
    let h = d.ctl_json(&["health"]);
    assert_eq!(h["memory_limits"], expected.as_str(), "{h}");
    assert_eq!(h["cpu_limits"], detected.cpu_mechanism().as_str(), "{h}");
    let human = d.ctl(&["health"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains(expected.as_str()));

    let dir = fixture(&d);
    d.ctl_ok(&["install", dir.to_str().unwrap()]);
    let s = d.ctl_json(&["status", "alloc"])["status"].clone();
    assert_eq!(s["limits"]["memory_bytes"], LIMIT, "{s}");
    assert_eq!(s["limits"]["memory_mechanism"], expected.as_str(), "{s}");

    let parent = detected
        .memory
        .as_ref()
        .map(|h| (h.version, h.base.join(format!("ember-{pid}"))));
    match &parent {
        Some((version, parent)) => {
            assert!(parent.is_dir(), "{} missing", parent.display());
            let file = match version {
                Version::V1 => "memory.limit_in_bytes",
                Version::V2 => "memory.max",
            };
            let inst = observe_limit(parent, file, &LIMIT.to_string());
            eprintln!("saw {} with {file} = {LIMIT}", inst.display());
            // The kernel, not the worker, ended it, and said why.
            let s = d.wait_status("alloc", "a cgroup OOM kill", |s| {
                reason(s).contains("OOM-killed")
            });
            let r = reason(&s);
            assert!(r.contains("MemoryLimitExceeded"), "{r}");
            assert!(r.contains(expected.as_str()), "{r}");
            assert!(r.contains("64 MiB"), "{r}");
        }
        None => {
            assert_eq!(expected, Mechanism::PrivateRssWatch);
            let s = d.wait_status("alloc", "the memory watch's failure", |s| {
                reason(s).contains("MemoryLimitExceeded")
            });
            assert!(s["replicas"][0]["cgroups"]
                .as_array()
                .is_none_or(|a| a.is_empty()));
        }
    }

    d.ctl_ok(&["uninstall", "alloc"]);
    if let Some((_, parent)) = &parent {
        let left: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name())
            // Idle workers wait in cgroups of their own (`idle.<pid>`).
            .filter(|n| !n.to_string_lossy().starts_with("idle."))
            .collect();
        assert!(left.is_empty(), "instance cgroups left: {left:?}");
    }
    d.stop();
    if let Some(h) = &detected.memory {
        let ours = h.base.join(format!("ember-{pid}"));
        assert!(!ours.exists(), "{} left behind", ours.display());
    }
    if let Some(h) = &detected.cpu {
        let ours = h.base.join(format!("ember-{pid}"));
        assert!(!ours.exists(), "{} left behind", ours.display());
    }
}

#[test]
fn without_cgroups_emberd_watches_private_memory() {
    let d = Daemon::start_with(FAST, &[("EMBER_CGROUP_ROOT", "none")]);
    let h = d.ctl_json(&["health"]);
    assert_eq!(h["memory_limits"], "private-rss-watch", "{h}");
    assert_eq!(h["cpu_limits"], "none", "{h}");
    let dir = fixture(&d);
    d.ctl_ok(&["install", dir.to_str().unwrap()]);
    let s = d.wait_status("alloc", "the memory watch's failure", |s| {
        reason(s).contains("private resident memory grew")
    });
    // Reported as the worker reports its own failures: stage, kind, why.
    let r = reason(&s);
    assert!(
        r.contains("Serve failed (MemoryLimitExceeded): private resident memory grew by "),
        "{r}"
    );
    assert!(r.contains("limit is 64 MiB (limits.memory)"), "{r}");
    assert_eq!(s["limits"]["memory_mechanism"], "private-rss-watch", "{s}");
}

/// Sum of a `/proc/PID/status` field, in bytes (the file gives kB).
fn status_bytes(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        << 10
}

#[test]
fn a_module_reading_a_sealed_plugin_table_larger_than_its_limit_is_not_killed() {
    // The pattern the README recommends: a plugin publishes a sealed table
    // (shared memory) and modules read it in place. Reading all of it makes
    // it resident in the module's worker, but it is not the module's
    // memory: the watch must not charge it.
    const TABLE_MIB: u64 = 96;
    let plugin = ember_tests::artifact("catalog");
    let d = Daemon::start_with(
        &format!(
            "plugins = [{{ path = {:?}, config = {{ size_mb = {TABLE_MIB}, extra_init_ms = 0 }} }}]\n{FAST}",
            plugin.display().to_string()
        ),
        &[("EMBER_CGROUP_ROOT", "none")],
    );
    let port = install_on_free_port(
        &d,
        "greeter",
        "greeter",
        "[[imports]]\nname = \"kv\"\noptional = true\n[[plugins]]\nname = \"catalog\"\ntable_version = 1\n[limits]\nmemory = \"32MiB\"\n",
    );
    let s = d.wait_status("greeter", "greeter running", |s| s["state"] == "running");
    assert_eq!(s["limits"]["memory_mechanism"], "private-rss-watch", "{s}");
    let pid = s["pid"].as_i64().unwrap() as i32;

    // Reads every row of the table, in place.
    let (status, body) = http_get(port, "/catalog/sum");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("price_sum="), "{body}");
    // The whole table is resident in the greeter's worker now: three times
    // its limit, all of it shared memory, none of it private.
    let shmem = status_bytes(pid, "RssShmem:");
    assert!(shmem >= TABLE_MIB << 20, "RssShmem {shmem}");
    assert!(status_bytes(pid, "VmRSS:") > 3 * (32 << 20));

    // A module that does overgrow is still killed: the sample that finds it
    // over its limit is one that also looked at the greeter, after the read.
    let dir = fixture(&d);
    d.ctl_ok(&["install", dir.to_str().unwrap()]);
    d.wait_status("alloc", "the memory watch's failure", |s| {
        reason(s).contains("private resident memory grew")
    });
    let s = d.ctl_json(&["status", "greeter"])["status"].clone();
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["pid"].as_i64(), Some(pid as i64), "{s}");
    assert_eq!(s["restarts"], 0, "{s}");
    assert!(s["last_error"].is_null(), "{s}");
    assert_eq!(http_get(port, "/catalog/sum"), (status, body));
}

#[test]
fn emberd_watches_memory_only_when_no_cgroup_does() {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let cgroup = detect(Path::new(ROOT), &own).memory.is_some();
    let d = Daemon::start(FAST);
    let dir = real_module(
        d.dir.path(),
        "watched",
        "hello",
        "[limits]\nmemory = \"256MiB\"\n",
    );
    d.ctl_ok(&["install", dir.to_str().unwrap()]);
    let s = d.wait_status("watched", "running", |s| s["state"] == "running");
    let pid = s["pid"].as_i64().unwrap() as i32;
    // The worker never watches its own memory (a thread doing so would wake
    // the idle module): the kernel enforces the limit through the
    // instance's cgroup, or else emberd samples the worker from outside.
    let names = thread_names(pid);
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("ember-"))
            .collect::<Vec<_>>(),
        ["ember-control"],
        "{names:?}"
    );
    let emberd = thread_names(d.pid());
    assert_eq!(
        emberd.iter().any(|n| n == "ember-memwatch"),
        !cgroup,
        "cgroup memory controller: {cgroup}; emberd's threads {emberd:?}"
    );
}
