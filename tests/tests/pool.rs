//! The warm pool of the real emberd, seen through `emberctl pool --json`:
//! a launch with an idle worker is a hit and runs in a worker forked
//! before the install (no fork on the critical path); the pool refills in
//! the background from below `min_idle` back up to `max_idle` and never
//! holds more; a launch into an empty pool is a miss and still runs.

use std::collections::BTreeSet;
use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::poll_until;
use serde_json::Value;

/// Pool counters; asserts the invariants every sample must hold.
fn pool(d: &Daemon) -> Value {
    let p = d.ctl_json(&["pool"])["pool"].clone();
    let idle = p["idle"].as_u64().unwrap();
    assert!(
        idle <= p["max_idle"].as_u64().unwrap(),
        "over max_idle: {p}"
    );
    assert_eq!(p["idle_pids"].as_array().unwrap().len() as u64, idle, "{p}");
    assert!(
        p["refills_last_minute"].as_u64().unwrap() <= p["refills"].as_u64().unwrap(),
        "{p}"
    );
    p
}

fn pids(p: &Value) -> BTreeSet<i64> {
    p["idle_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

fn wait_idle(d: &Daemon, n: u64) -> Value {
    poll_until(
        &format!("{n} idle workers"),
        Duration::from_millis(10),
        || {
            let p = pool(d);
            if p["idle"] == n {
                Ok(p)
            } else {
                Err(p.to_string())
            }
        },
    )
}

/// Each cgroup emberd reports for `name`'s replica is one the worker is in
/// (`/proc/PID/cgroup`); how many there are (none without cgroups).
fn in_its_cgroups(d: &Daemon, name: &str, pid: i64) -> usize {
    let s = d.ctl_json(&["status", name])["status"].clone();
    let dirs: Vec<String> = s["replicas"][0]["cgroups"]
        .as_array()
        .map(|a| a.iter().map(|g| g.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for dir in &dirs {
        assert!(
            own.lines()
                .filter_map(|l| l.splitn(3, ':').nth(2))
                .any(|path| path != "/" && dir.ends_with(path)),
            "worker {pid} is not in {dir}: {own}"
        );
    }
    dirs.len()
}

fn install_running(d: &Daemon, name: &str) -> i64 {
    let dir = module_dir(d.dir.path(), name, "1.0.0");
    d.ctl_ok(&["install", dir.to_str().unwrap()]);
    let s = d.wait_status(name, "running", |s| s["state"] == "running");
    s["pid"].as_i64().unwrap()
}

#[test]
fn hits_use_prewarmed_workers_and_the_pool_refills_to_max() {
    let d = Daemon::start(&format!("[pool]\nmin_idle = 2\nmax_idle = 3\n{FAST}"));

    // Start-up fills the pool to max_idle, in the background.
    let p0 = wait_idle(&d, 3);
    assert_eq!(p0["refills"], 3, "{p0}");
    assert_eq!(p0["refills_last_minute"], 3, "{p0}");
    assert_eq!(
        (p0["hits"].clone(), p0["misses"].clone()),
        (0.into(), 0.into())
    );
    assert_eq!(p0["fork_failures"], 0, "{p0}");
    let warm = pids(&p0);

    // First launch: a hit, in a worker that existed before the install.
    let a = install_running(&d, "a");
    assert!(warm.contains(&a), "worker {a} was not prewarmed: {p0}");
    let p1 = pool(&d);
    assert_eq!(p1["hits"], 1, "{p1}");
    assert_eq!(p1["misses"], 0, "{p1}");
    // Two left, not below min_idle: no fork at all, before or after.
    assert_eq!(p1["idle"], 2, "{p1}");
    assert_eq!(p1["refills"], 3, "{p1}");
    assert_eq!(
        pids(&p1),
        warm.iter().copied().filter(|&p| p != a).collect()
    );

    // Second launch: a hit again, from the same prewarmed set; one left,
    // below min_idle, so the pool refills back to max_idle.
    let b = install_running(&d, "b");
    assert!(warm.contains(&b) && b != a, "worker {b}: {p0}");
    let p2 = wait_idle(&d, 3);
    assert_eq!(p2["hits"], 2, "{p2}");
    assert_eq!(p2["misses"], 0, "{p2}");
    assert_eq!(p2["refills"], 5, "two background forks: {p2}");
    let last_minute = p2["refills_last_minute"].as_u64().unwrap();
    assert!(last_minute >= 2, "the refill is counted: {p2}");
    let now = pids(&p2);
    let old: BTreeSet<i64> = warm
        .iter()
        .copied()
        .filter(|p| ![a, b].contains(p))
        .collect();
    assert!(old.is_subset(&now), "the untouched worker stays: {p2}");
    assert_eq!(now.difference(&old).count(), 2, "two fresh workers: {p2}");
    assert!(!now.contains(&a) && !now.contains(&b));

    // Filled: it stays at max_idle (every sample is checked against it).
    for _ in 0..20 {
        let p = pool(&d);
        assert_eq!(p["refills"], 5, "{p}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Both modules serve from the workers they got.
    let s = d.ctl_json(&["status", "a"]);
    assert_eq!(s["status"]["pid"], a);
}

#[test]
fn an_empty_pool_misses_and_still_launches() {
    let d = Daemon::start(&format!("[pool]\nmin_idle = 0\nmax_idle = 0\n{FAST}"));
    let p0 = pool(&d);
    assert_eq!(p0["idle"], 0, "{p0}");
    assert_eq!(p0["refills"], 0, "nothing forked ahead: {p0}");

    let pid = install_running(&d, "cold");
    let p1 = pool(&d);
    assert_eq!(p1["misses"], 1, "{p1}");
    assert_eq!(p1["hits"], 0, "{p1}");
    // Forked for the launch itself, not into the pool.
    assert_eq!(p1["refills"], 0, "{p1}");
    assert_eq!(p1["refills_last_minute"], 0, "{p1}");
    assert_eq!(p1["idle"], 0, "{p1}");
    assert_eq!(p1["fork_failures"], 0, "{p1}");
    assert!(p1["fork_us_avg"].as_u64().unwrap() > 0, "{p1}");
    // Not adopted while idle (nobody was): it joined its cgroups at launch.
    let cgroups = in_its_cgroups(&d, "cold", pid);

    // A second launch misses too.
    let pid2 = install_running(&d, "cold2");
    assert_ne!(pid, pid2);
    let p2 = pool(&d);
    assert_eq!(p2["misses"], 2, "{p2}");
    assert_eq!(p2["refills"], 0, "{p2}");
    assert_eq!(in_its_cgroups(&d, "cold2", pid2), cgroups);
    d.ctl_ok(&["uninstall", "cold"]);
    d.ctl_ok(&["uninstall", "cold2"]);
    assert_eq!(pool(&d)["idle"], 0);
}

#[test]
fn a_single_worker_pool_refills_behind_each_launch() {
    // One idle worker: the launch takes it (a hit) and the pool, now below
    // min_idle, forks its replacement in the background.
    let d = Daemon::start(&format!("[pool]\nmin_idle = 1\nmax_idle = 1\n{FAST}"));
    let p0 = wait_idle(&d, 1);
    let warm = pids(&p0);
    let a = install_running(&d, "one");
    assert!(warm.contains(&a), "{p0}");
    // Adopted while idle: its idle cgroups became the instance's.
    in_its_cgroups(&d, "one", a);
    let p1 = wait_idle(&d, 1);
    assert_eq!(p1["hits"], 1, "{p1}");
    assert_eq!(p1["refills"], 2, "{p1}");
    assert!(p1["refills_last_minute"].as_u64().unwrap() >= 1, "{p1}");
    assert!(!pids(&p1).contains(&a));
}
