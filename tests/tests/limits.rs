//! Per-module OS limits: the real `emberd` detects what this machine offers
//! (cgroup v2, v1 or nothing), reports it in `Health` and `Status`, puts the
//! `unbounded-alloc` fixture's worker into a cgroup of its own with the
//! manifest's memory limit, reports the kill as a memory failure, and
//! leaves no cgroup behind. Without a usable controller the same test
//! asserts the in-worker fallback.

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
            assert_eq!(expected, Mechanism::InWorkerRss);
            let s = d.wait_status("alloc", "the watchdog's failure", |s| {
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
fn without_cgroups_the_worker_watchdog_enforces_memory() {
    let d = Daemon::start_with(FAST, &[("EMBER_CGROUP_ROOT", "none")]);
    let h = d.ctl_json(&["health"]);
    assert_eq!(h["memory_limits"], "in-worker-rss", "{h}");
    assert_eq!(h["cpu_limits"], "none", "{h}");
    let dir = fixture(&d);
    d.ctl_ok(&["install", dir.to_str().unwrap()]);
    let s = d.wait_status("alloc", "the watchdog's failure", |s| {
        reason(s).contains("resident memory grew")
    });
    assert_eq!(s["limits"]["memory_mechanism"], "in-worker-rss", "{s}");
}

#[test]
fn the_worker_watches_its_memory_only_when_no_cgroup_does() {
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
    let names = thread_names(pid);
    assert!(names.iter().any(|n| n == "ember-control"), "{names:?}");
    // The kernel enforces the limit through the instance's cgroup; only
    // without one does the worker poll its own resident set.
    assert_eq!(
        names.iter().any(|n| n == "ember-memwatch"),
        !cgroup,
        "cgroup memory controller: {cgroup}; threads {names:?}"
    );
}
