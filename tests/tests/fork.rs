//! The fork path through the real daemon: what a plugin set up in the
//! zygote (descriptors, `pthread_atfork` handlers) holds in every worker,
//! glibc knows the worker's own thread id, workers outlive a killed zygote
//! but not emberd, and emberd reaps what is orphaned below it.

use std::path::Path;
use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::procs::ppid;
use ember_tests::{artifact, poll_until, TempDir};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// emberd with the `fork-probe` plugin holding `file` open.
fn config(file: &Path) -> String {
    format!(
        "plugins = [{{ path = {:?}, config = {{ path = {:?} }} }}]\n{FAST}",
        artifact("fixture-fork-probe-plugin").display().to_string(),
        file.display().to_string(),
    )
}

/// The `fixture-fork-probe` module as `name`, with one listener and
/// `config` as its `[config]` table.
fn probe_module(d: &Daemon, name: &str, config: &str) -> String {
    let m = real_module(
        d.dir.path(),
        name,
        "fixture-fork-probe",
        &format!(
            "[[plugins]]\nname = \"fork-probe\"\ntable_version = 1\n\
             [[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\
             [config]\n{config}"
        ),
    );
    m.to_str().unwrap().to_owned()
}

/// The probe's report line for worker `pid`, from the module's log.
fn probe_line(d: &Daemon, name: &str, pid: i32) -> String {
    let log = d.state.join(format!("logs/{name}.log"));
    let want = format!("fork-probe pid={pid} ");
    poll_until("the probe's report", Duration::from_millis(20), || {
        let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
        text.lines()
            .find_map(|l| l.split_once(&want).map(|(_, rest)| rest.to_owned()))
            .ok_or(text)
    })
}

fn running_pid(d: &Daemon, name: &str) -> i32 {
    let s = d.wait_status(name, "running", |s| s["state"] == "running");
    s["pid"].as_i64().unwrap() as i32
}

/// The descriptor number at which `pid` holds `file`.
fn fd_holding(pid: i32, file: &Path) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == file))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}

#[test]
fn plugin_descriptors_and_atfork_handlers_hold_in_workers() {
    let probe = TempDir::new("fork-probe");
    let file = probe.path().join("plugin.log");
    let d = Daemon::start(&config(&file));
    d.ctl_ok(&["install", &probe_module(&d, "probe", "")]);
    let pid = running_pid(&d, "probe");

    let report = probe_line(&d, "probe", pid);
    for want in [
        // The plugin's file is still its file, at its number (close_range
        // and the /proc/self/fd sweep closed it, and the number went to a
        // channel).
        "fd_same_file=true",
        "epoll_kept=true",
        // glibc's fork ran the plugin's pthread_atfork child handler (a raw
        // clone3 did not)…
        "atfork_child_ran=true",
        // …and the C library knows the worker's thread id (with clone3 it
        // kept the zygote's: ESRCH) and its robust-futex list.
        "pthread_kill_self=0",
        "pthread_sigqueue_self=0",
        "robust_list=true",
        "tid_is_pid=true",
        "wrote=true",
        // Socket activation still puts the listener at descriptor 3.
        "listen_fds=1",
    ] {
        assert!(report.contains(want), "{want} not in: {report}");
    }
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains(&format!("worker {pid}\n")),
        "the worker's line went elsewhere: {text:?}"
    );
    // The same descriptor number in the zygote and the worker.
    let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;
    let in_zygote = fd_holding(zygote, &file).expect("the zygote holds the plugin's file");
    assert_eq!(fd_holding(pid, &file), Some(in_zygote));
    assert!(std::fs::read_link(format!("/proc/{pid}/fd/3"))
        .unwrap()
        .to_string_lossy()
        .starts_with("socket:"));

    d.ctl_ok(&["uninstall", "probe"]);
    assert!(wait_reaped(pid), "worker {pid} was not reaped");
}

#[test]
fn a_killed_zygote_spares_running_modules_and_emberd_takes_all_down() {
    // Orphans of the killed emberd come to us so they can be reaped (PID 1
    // here does not reap); only pids recorded below are waited for.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let probe = TempDir::new("fork-probe");
    let file = probe.path().join("plugin.log");
    let mut d = Daemon::start(&config(&file));
    d.ctl_ok(&["install", &probe_module(&d, "first", "")]);
    let first = running_pid(&d, "first");
    let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;

    kill(Pid::from_raw(zygote), Signal::SIGKILL).unwrap();
    let second_zygote = poll_until("a new zygote", Duration::from_millis(20), || {
        let z = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap_or(0) as i32;
        (z != 0 && z != zygote && !dead(z))
            .then_some(z)
            .ok_or(format!("zygote {z}"))
    });
    assert!(wait_reaped(zygote), "the killed zygote was not reaped");
    // The module runs on, in the same worker, still emberd's child.
    assert!(!dead(first), "the worker died with the zygote");
    assert_eq!(ppid(first), Some(d.pid()));
    let s = d.ctl_json(&["status", "first"])["status"].clone();
    assert_eq!(
        (s["state"].as_str(), s["restarts"].as_u64()),
        (Some("running"), Some(0))
    );
    assert_eq!(s["pid"].as_i64(), Some(i64::from(first)));

    // It can be stopped, and its exit is reaped by emberd (no zombie).
    d.ctl_ok(&["uninstall", "first"]);
    assert!(wait_reaped(first), "worker {first} was not reaped");

    // The new zygote's workers are sound too.
    d.ctl_ok(&["install", &probe_module(&d, "second", "")]);
    let second = running_pid(&d, "second");
    let report = probe_line(&d, "second", second);
    assert!(
        report.contains("fd_same_file=true") && report.contains("atfork_child_ran=true"),
        "{report}"
    );
    assert_eq!(ppid(second), Some(d.pid()));

    // kill -9 of emberd takes the zygote and every worker with it.
    let mut pids: Vec<i32> = d.ctl_json(&["pool"])["pool"]["idle_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap() as i32)
        .collect();
    pids.extend([second, second_zygote]);
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    for &p in &pids {
        assert!(wait_dead(p), "process {p} survived kill -9 of emberd");
        let _ =
            nix::sys::wait::waitpid(Pid::from_raw(p), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    }
}

/// Kills the module's `sleep 1000` child when the test ends, if it still
/// runs (checked by its command line, not only its pid).
struct SleepGuard(i32);

impl Drop for SleepGuard {
    fn drop(&mut self) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        if cmdline == b"sleep\x001000\x00" && !dead(self.0) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

#[test]
fn emberd_reaps_what_is_orphaned_below_it() {
    let probe = TempDir::new("fork-probe");
    let file = probe.path().join("plugin.log");
    let d = Daemon::start(&config(&file));
    d.ctl_ok(&[
        "install",
        &probe_module(&d, "parent", "spawn_child = true\n"),
    ]);
    let worker = running_pid(&d, "parent");
    let log = d.state.join("logs/parent.log");
    let child: i32 = poll_until("the module's child", Duration::from_millis(20), || {
        let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
        text.lines()
            .find_map(|l| l.split_once("fork-probe child=")?.1.trim().parse().ok())
            .ok_or(text)
    });
    let _guard = SleepGuard(child);
    assert_eq!(ppid(child), Some(worker));

    // The worker exits; its child is re-parented to emberd, the nearest
    // child subreaper, not to PID 1…
    d.ctl_ok(&["uninstall", "parent"]);
    assert!(wait_reaped(worker));
    assert_eq!(ppid(child), Some(d.pid()));
    // …and reaped by emberd when it exits.
    kill(Pid::from_raw(child), Signal::SIGKILL).unwrap();
    assert!(wait_reaped(child), "orphan {child} left a zombie");
}
