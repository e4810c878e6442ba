//! Idle modules cost nothing: a running module that has nothing to do —
//! `hello` waiting for its stop request, the `kv` exporter with a connected
//! but quiet importer, and that importer (`greeter`, a tokio module) — is
//! not woken at all. Counted from the kernel's context-switch counters of
//! every thread of each worker (`/proc/PID/task/*/status`): a thread that
//! sleeps without a timeout and is never woken adds nothing to either
//! counter; a thread polling every 20 ms would add about 500 in 10 s.
//!
//! Run with both memory-limit mechanisms: the instance's cgroup, and the
//! fallback where emberd (not the worker) watches the worker's private
//! memory (`EMBER_CGROUP_ROOT=none`).

use std::collections::BTreeMap;
use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::{artifact, poll_until};
use serde_json::json;

/// How long the workers are watched.
const WINDOW: Duration = Duration::from_secs(10);

/// Context switches (voluntary + involuntary) of every thread of `pid`, by
/// thread (`tid comm`).
fn switches(pid: i32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("worker {pid} is gone: {e}"));
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let n: u64 = status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(
            format!("{} {}", t.file_name().to_string_lossy(), comm.trim()),
            n,
        );
    }
    out
}

/// Threads of `pid` that are not asleep (state other than `S`).
fn awake(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("worker {pid} is gone: {e}"))
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter(|status| !status.contains("\nState:\tS"))
        .map(|status| status.lines().take(3).collect::<Vec<_>>().join(" "))
        .collect()
}

/// Per-thread context switches of each worker during `WINDOW`, counted
/// from a moment when every thread sleeps (one still finishing the last
/// request would add the switch of going to sleep).
fn wakeups(workers: &[(&str, i32)]) -> BTreeMap<String, BTreeMap<String, u64>> {
    poll_until(
        "every worker thread asleep",
        Duration::from_millis(10),
        || {
            let awake: Vec<String> = workers.iter().flat_map(|(_, p)| awake(*p)).collect();
            if awake.is_empty() {
                Ok(())
            } else {
                Err(format!("{awake:?}"))
            }
        },
    );
    let before: Vec<_> = workers.iter().map(|(_, p)| switches(*p)).collect();
    std::thread::sleep(WINDOW);
    let mut out = BTreeMap::new();
    for ((name, pid), before) in workers.iter().zip(before) {
        let after = switches(*pid);
        let mut per = BTreeMap::new();
        for (thread, n) in &after {
            // A thread started during the window counts from zero.
            per.insert(thread.clone(), n - before.get(thread).copied().unwrap_or(0));
        }
        out.insert(format!("{name} (pid {pid})"), per);
    }
    out
}

fn pid_of(s: &serde_json::Value) -> i32 {
    s["pid"].as_i64().expect("a running instance has a pid") as i32
}

fn idle_modules_cost_no_wakeups(env: &[(&str, &str)], mechanism_is_cgroup: Option<bool>) {
    let plugin = artifact("catalog");
    let d = Daemon::start_with(
        &format!(
            "plugins = [{{ path = {:?}, config = {{ size_mb = 1, extra_init_ms = 0 }} }}]\n{FAST}",
            plugin.display().to_string()
        ),
        env,
    );
    let mechanism = d.ctl_json(&["health"])["memory_limits"].clone();
    if let Some(cgroup) = mechanism_is_cgroup {
        assert_eq!(
            mechanism.as_str().is_some_and(|m| m.starts_with("cgroup")),
            cgroup,
            "{mechanism}"
        );
    }
    // Every module here has limits.memory, so the fallback watches them.
    let hello = real_module(
        d.dir.path(),
        "hello",
        "hello",
        "[limits]\nmemory = \"64MiB\"\n",
    );
    d.ctl_ok(&["install", hello.to_str().unwrap()]);
    let kv = real_module(
        d.dir.path(),
        "kv",
        "kv",
        "[[exports]]\nname = \"kv\"\n[limits]\nmemory = \"64MiB\"\n",
    );
    d.ctl_ok(&["install", kv.to_str().unwrap()]);
    let port = install_on_free_port(
        &d,
        "greeter",
        "greeter",
        "[[imports]]\nname = \"kv\"\n[[plugins]]\nname = \"catalog\"\ntable_version = 1\n[limits]\nmemory = \"64MiB\"\n",
    );
    let running = |s: &serde_json::Value| s["state"] == "running";
    let hello_pid = pid_of(&d.wait_status("hello", "hello running", running));
    let kv_pid = pid_of(&d.wait_status("kv", "kv running", running));
    let greeter_pid = pid_of(&d.wait_status("greeter", "greeter wired to kv", |s| {
        running(s) && s["imports"] == json!([{"name": "kv", "version": 1, "state": "wired", "exporter": "kv", "reason": null}])
    }));
    // kv has a client, which has called it.
    assert_eq!(http_get(port, "/kv/put/k/v"), (200, "ok".into()));
    assert_eq!(http_get(port, "/kv/get/k"), (200, "v".into()));

    let seen = wakeups(&[
        ("hello", hello_pid),
        ("kv", kv_pid),
        ("greeter", greeter_pid),
    ]);
    eprintln!("memory limits: {mechanism}; context switches in {WINDOW:?}: {seen:#?}");
    for (worker, threads) in &seen {
        let total: u64 = threads.values().sum();
        assert_eq!(total, 0, "{worker} woke up while idle: {threads:?}");
    }
    // Still the same instances, and they still answer.
    assert_eq!(http_get(port, "/kv/get/k"), (200, "v".into()));
    for (name, pid) in [
        ("hello", hello_pid),
        ("kv", kv_pid),
        ("greeter", greeter_pid),
    ] {
        let s = d.ctl_json(&["status", name])["status"].clone();
        assert_eq!(pid_of(&s), pid, "{s}");
        assert_eq!(s["restarts"], 0, "{s}");
    }
}

#[test]
fn idle_modules_cost_no_wakeups_with_cgroup_limits() {
    // Where this machine has no usable memory controller the fallback runs
    // here too; the test below forces it.
    idle_modules_cost_no_wakeups(&[], None);
}

#[test]
fn idle_modules_cost_no_wakeups_when_emberd_watches_memory() {
    idle_modules_cost_no_wakeups(&[("EMBER_CGROUP_ROOT", "none")], Some(false));
}
