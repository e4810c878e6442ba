//! The module sandbox, through the real emberd: a hostile module's attacks
//! on emberd, a sibling and the host fail with the errno each layer
//! promises, emberd running as root or as a user whose uid modules keep
//! (then emberd and its zygote are not dumpable either); a forged sandbox
//! report is not believed; calls any uid may make on itself fail only
//! while seccomp denies them, and a granted one gets through; each module
//! runs as its own stable uid, with no new privileges, a seccomp filter and
//! not dumpable; a tampered stored artifact is refused; a manifest cannot
//! grant itself syscalls; a writable path that is missing or a symlink
//! fails the launch, and one the module's uid cannot reach fails alike
//! whether it exists or not; the control socket refuses uids outside its allow
//! list, module uids included.
//!
//! Tests that need root (a second uid, a mount namespace) say `skipped` on
//! stderr and pass without it; CI runs them as root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use ember_tests::daemon::*;
use ember_tests::TempDir;
use serde_json::Value;

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether the test may run: root, else it says why it is skipped.
fn root_or_skip(test: &str, why: &str) -> bool {
    let r = root();
    if !r {
        eprintln!("{test}: skipped, not root ({why})");
    }
    r
}

/// The fixture's calls on itself (`fixture-hostile`'s `SELF_ATTACKS`),
/// each with the syscall it makes: any uid may make them, so `EPERM` comes
/// from the seccomp filter.
const SELF_ATTACKS: [(&str, &str); 8] = [
    ("ptrace_traceme", "ptrace"),
    ("process_vm_readv", "process_vm_readv"),
    ("kcmp", "kcmp"),
    ("pidfd_getfd", "pidfd_getfd"),
    ("keyctl", "keyctl"),
    ("io_uring_setup", "io_uring_setup"),
    ("perf_event_open", "perf_event_open"),
    ("userfaultfd", "userfaultfd"),
];

/// The attacks on itself in `report` all got `EPERM`.
fn self_attacks_refused(report: &Value) {
    for (attack, _) in SELF_ATTACKS {
        assert_eq!(report[attack], libc::EPERM, "{attack}: {report}");
    }
}

fn running(d: &Daemon, name: &str) -> Value {
    d.wait_status(name, &format!("{name} running with its sandbox"), |s| {
        s["state"] == "running" && !s["replicas"][0]["sandbox"].is_null()
    })
}

fn install(d: &Daemon, dir: &Path) {
    d.ctl_ok(&["install", dir.to_str().unwrap()]);
}

/// `Key:\tv1\tv2…` fields of `/proc/PID/status`.
fn proc_status(pid: i64) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn dir_0777(path: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    path
}

#[test]
fn a_hostile_module_is_fenced_in() {
    if !root_or_skip("a_hostile_module_is_fenced_in", "the uid switch needs root") {
        return;
    }
    let d = Daemon::start(FAST);
    let work = TempDir::new("hostile");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    install(&d, &module_dir(work.path(), "sibling", "1.0.0"));
    let sibling = running(&d, "sibling");
    let sibling_pid = sibling["pid"].as_i64().unwrap();
    let artifact = d.state.join("artifacts").join(format!(
        "{}.so",
        sibling["artifact_sha256"].as_str().unwrap()
    ));
    // Both directories may be written by anyone as far as file modes go:
    // only the sandbox tells them apart.
    let writable = dir_0777(work.path().join("data"));
    let outside = dir_0777(work.path().join("outside"));
    let extra = format!(
        "[sandbox]\nwritable = [{writable:?}]\n[config]\nemberd_pid = {}\nsibling_pid = {sibling_pid}\n\
         artifact = {artifact:?}\nsocket = {:?}\nwritable = {writable:?}\noutside = {outside:?}\n",
        d.pid(),
        d.socket,
    );
    install(
        &d,
        &real_module(work.path(), "hostile", "fixture-hostile", &extra),
    );
    let status = running(&d, "hostile");
    let report: Value =
        serde_json::from_slice(&std::fs::read(writable.join("report.json")).unwrap()).unwrap();
    eprintln!("the hostile module's report (errno per attack): {report}");
    let expect = [
        ("signal_emberd", libc::EPERM),
        ("signal_sibling", libc::EPERM),
        ("ptrace_sibling", libc::EPERM),
        ("sibling_fd", libc::EACCES),
        ("artifact_overwrite", libc::EACCES),
        ("artifact_read", libc::EACCES),
        ("artifact_store_create", libc::EACCES),
        ("control_socket", libc::EACCES),
        ("mount", libc::EPERM),
        ("bpf", libc::EPERM),
        ("unshare_user", libc::EPERM),
        ("clone_newuser", libc::EPERM),
        ("clone3", libc::ENOSYS),
        ("write_inside", 0),
        ("prlimit_emberd", libc::EPERM),
        ("setpriority_emberd", libc::EPERM),
        ("setaffinity_emberd", libc::EPERM),
        ("emberd_mem", libc::EACCES),
        ("set_dumpable", libc::EPERM),
        // Sent: emberd must not believe it (below).
        ("forge_report", 0),
    ];
    for (attack, errno) in expect {
        assert_eq!(report[attack], errno, "{attack}: {report}");
    }
    self_attacks_refused(&report);
    assert!(writable.join("proof").exists());
    // `outside` is mode 0777: only Landlock keeps the module out of it.
    // Without Landlock the write succeeds, and the status says the
    // filesystem layer is `none` (checked below).
    let landlock = module_runtime::host::sandbox::landlock_abi() > 0;
    if landlock {
        assert_eq!(report["write_outside"], libc::EACCES, "{report}");
        assert!(!outside.join("escaped").exists());
    } else {
        assert_eq!(report["write_outside"], 0, "{report}");
    }
    assert!(!d.state.join("artifacts/evil.so").exists());

    // What the kernel says of it.
    let pid = status["pid"].as_i64().unwrap();
    let uid = status["replicas"][0]["sandbox"]["uid"].as_u64().unwrap();
    assert_ne!(uid, 0);
    assert_eq!(report["uid"], uid);
    assert_eq!(report["dumpable"], 0);
    assert_eq!(report["no_new_privs"], 1);
    let st = proc_status(pid);
    let all = |v: &str| v.split_whitespace().all(|x| x == uid.to_string());
    assert!(all(&st["Uid"]), "{:?}", st["Uid"]);
    assert!(all(&st["Gid"]), "{:?}", st["Gid"]);
    assert_eq!(st["Groups"], "");
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["Seccomp"], "2");
    assert_eq!(st["CapEff"], "0000000000000000");
    // Not dumpable: the kernel hands its /proc files to root (all but the
    // /proc/PID directory itself, which keeps showing the euid).
    let owner = std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid();
    assert_eq!(owner, 0, "a dumpable process's /proc files are its own");
    let sb = &status["replicas"][0]["sandbox"];
    assert_eq!(sb["uid_mechanism"], "own-uid");
    assert_eq!(sb["no_new_privs"], true);
    assert_eq!(sb["dumpable"], false);
    assert!(sb["seccomp"].as_str().unwrap().starts_with("seccomp-bpf"));
    assert_ne!(sb["filesystem"], "forged", "{sb}");
    let fs = sb["filesystem"].as_str().unwrap();
    if landlock {
        assert!(fs.starts_with("landlock ABI "), "{fs}");
    } else {
        assert!(fs.starts_with("none"), "{fs}");
    }
    // The worker's list, not the forged report's `/`.
    let w = writable.display().to_string();
    assert_eq!(sb["writable"], serde_json::json!([w]), "{sb}");
    let text = String::from_utf8(d.ctl_ok(&["status", "hostile"]).stdout).unwrap();
    assert!(
        text.contains(&format!(
            "sandbox: uid {uid} gid {uid} (own-uid), no-new-privs, not dumpable, seccomp-bpf"
        )) && text.contains(&format!("; writable: {w}\n")),
        "{text}"
    );

    // Nobody was harmed: emberd and the sibling run as before.
    assert!(!dead(d.pid()));
    let sibling_now = d.ctl_json(&["status", "sibling"]);
    assert_eq!(sibling_now["status"]["state"], "running");
    assert_eq!(sibling_now["status"]["pid"], sibling_pid);
    assert_eq!(sibling_now["status"]["restarts"], 0);
}

/// Owner of `/proc/PID/status`: root for a process that is not dumpable.
fn proc_owner(pid: i64) -> u32 {
    std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid()
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`.
fn proc_stat(pid: i64, n: usize) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name, which may hold spaces: field 3 on.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(n - 3).unwrap().to_owned()
}

#[test]
fn a_module_keeping_emberds_uid_cannot_reach_emberd() {
    if !root_or_skip(
        "a_module_keeping_emberds_uid_cannot_reach_emberd",
        "emberd is started as another uid",
    ) {
        return;
    }
    // A module of emberd's own uid is kept from signalling it only by
    // Landlock's signal scope (ABI 6 and later): below that the fixture's
    // SIGTERM would stop emberd mid-test, so there is nothing to assert.
    let abi = module_runtime::host::sandbox::landlock_abi();
    if abi < 6 {
        eprintln!(
            "a_module_keeping_emberds_uid_cannot_reach_emberd: skipped, Landlock ABI {abi} \
             has no signal scope (6 and later), so the module's SIGTERM would reach emberd"
        );
        return;
    }
    let uid = unused_uid();
    // emberd as `uid`: it cannot switch a module to another uid, so the
    // module keeps `uid` too.
    let dir = TempDir::new("nonroot");
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
    // The shared runtime of slim modules (`hello` is one) where `uid` can
    // read it, as a deployment would install it: the toolchain's std is in
    // root's home.
    ember_tests::build_examples();
    let libs = module_runtime::host::RuntimeLibs::locate(None).unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    for lib in [&libs.std, &libs.sdk] {
        std::fs::copy(lib, runtime.join(lib.file_name().unwrap())).unwrap();
    }
    let config = format!(
        "{FAST}[runtime_libs]\ndir = {:?}\n",
        runtime.display().to_string()
    );
    let mut d = Daemon::in_dir(dir, &config);
    let mut cmd = std::process::Command::new(emberd());
    cmd.arg("--config")
        .arg(&d.config)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(&d.state)
        .env("EMBER_LOG", "error")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .uid(uid)
        .gid(uid); // std drops root's supplementary groups with the uid
    d.child = Some(cmd.spawn().unwrap());
    ember_tests::poll_until(
        "emberd's socket",
        std::time::Duration::from_millis(20),
        || {
            std::os::unix::net::UnixStream::connect(&d.socket)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    );
    let emberd = i64::from(d.pid());
    assert_eq!(
        proc_status(emberd)["Uid"].split_whitespace().next(),
        Some(&*uid.to_string())
    );
    // Not dumpable, so its /proc files are root's, not `uid`'s.
    assert_eq!(proc_owner(emberd), 0, "emberd is dumpable");
    let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap();
    assert_eq!(proc_owner(zygote), 0, "the zygote is dumpable");

    let work = TempDir::new("nonroot-mods");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    install(&d, &module_dir(work.path(), "sibling", "1.0.0"));
    let sibling = running(&d, "sibling");
    let artifact = d.state.join("artifacts").join(format!(
        "{}.so",
        sibling["artifact_sha256"].as_str().unwrap()
    ));
    let writable = dir_0777(work.path().join("data"));
    let outside = dir_0777(work.path().join("outside"));
    let extra = format!(
        "[sandbox]\nwritable = [{writable:?}]\n[config]\nemberd_pid = {emberd}\nsibling_pid = {}\n\
         artifact = {artifact:?}\nsocket = {:?}\nwritable = {writable:?}\noutside = {outside:?}\n",
        sibling["pid"], d.socket,
    );
    install(
        &d,
        &real_module(work.path(), "hostile", "fixture-hostile", &extra),
    );
    let status = running(&d, "hostile");
    let report: Value =
        serde_json::from_slice(&std::fs::read(writable.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["uid"], uid, "{report}");
    for (attack, errno) in [
        ("prlimit_emberd", libc::EPERM),
        ("setpriority_emberd", libc::EPERM),
        ("setaffinity_emberd", libc::EPERM),
        ("emberd_mem", libc::EACCES),
        ("set_dumpable", libc::EPERM),
        // It may connect (emberd's uid), but emberd refuses its own
        // descendants' calls.
        ("control_socket", libc::EACCES),
        ("forge_report", 0),
    ] {
        assert_eq!(report[attack], errno, "{attack}: {report}");
    }
    self_attacks_refused(&report);
    // Same uid: only Landlock's signal scope refuses the signal (checked
    // at the top: below ABI 6 the test does not get here).
    assert_eq!(report["signal_emberd"], libc::EPERM, "{report}");
    assert_eq!(report["dumpable"], 0);
    // emberd has what it had: its descriptors, its priority, all CPUs.
    let limits = std::fs::read_to_string(format!("/proc/{emberd}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(!nofile.split_whitespace().any(|f| f == "3"), "{nofile}");
    assert_eq!(proc_stat(emberd, 19), "0", "emberd's nice value");
    // As this test's (emberd's parent's), not pinned to CPU 0.
    let cpus = |pid: i64| proc_status(pid)["Cpus_allowed_list"].clone();
    assert_eq!(
        cpus(emberd),
        cpus(std::process::id().into()),
        "emberd pinned"
    );
    // The worker's own report, not the module's forgery.
    let sb = &status["replicas"][0]["sandbox"];
    assert_eq!(sb["uid"], uid, "{sb}");
    assert_eq!(sb["uid_mechanism"], "emberd-uid", "{sb}");
    assert!(
        sb["seccomp"].as_str().unwrap().starts_with("seccomp-bpf"),
        "{sb}"
    );
    assert!(d.ctl(&["health"]).status.success());
    assert_eq!(d.ctl_json(&["status", "sibling"])["status"]["restarts"], 0);
}

#[test]
fn each_module_has_its_own_uid_stable_across_restart_and_reinstall() {
    if !root_or_skip(
        "each_module_has_its_own_uid_stable_across_restart_and_reinstall",
        "modules keep emberd's uid without it",
    ) {
        return;
    }
    let mut d = Daemon::start(FAST);
    let work = TempDir::new("uids");
    let a_dir = module_dir(work.path(), "alpha", "1.0.0");
    install(&d, &a_dir);
    install(&d, &module_dir(work.path(), "beta", "1.0.0"));
    let uid = |d: &Daemon, name: &str| running(d, name)["replicas"][0]["sandbox"]["uid"].clone();
    let (a, b) = (uid(&d, "alpha"), uid(&d, "beta"));
    assert_ne!(a, b);
    let range = 0x7000_0000u64..=0x7000_FFFF;
    assert!(range.contains(&a.as_u64().unwrap()), "{a}");
    assert!(range.contains(&b.as_u64().unwrap()), "{b}");
    // Recorded in the state: the same after a restart.
    let state = std::fs::read_to_string(d.state.join("desired.json")).unwrap();
    assert!(state.contains(&format!("\"uid\": {a}")), "{state}");
    d.stop();
    d.spawn(&[]);
    assert_eq!(uid(&d, "alpha"), a);
    assert_eq!(uid(&d, "beta"), b);
    // And after an uninstall and a new install of the same name.
    d.ctl_ok(&["uninstall", "alpha"]);
    install(&d, &a_dir);
    assert_eq!(uid(&d, "alpha"), a);
}

#[test]
fn a_tampered_stored_artifact_is_refused_with_both_hashes() {
    let mut d = Daemon::start(FAST);
    let work = TempDir::new("tamper");
    install(&d, &copied_module(work.path(), "victim", "hello"));
    let sha = running(&d, "victim")["artifact_sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let stored = d.state.join("artifacts").join(format!("{sha}.so"));
    let meta = std::fs::metadata(&stored).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    assert_eq!(
        std::fs::metadata(d.state.join("artifacts"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    d.stop();
    // Flip one byte in the middle (where a patch would go).
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::set_permissions(&stored, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&stored, &bytes).unwrap();
    d.spawn(&[]);
    let s = d.wait_status("victim", "the launch refused", |s| s["state"] == "failed");
    let reason = s["reason"].as_str().unwrap();
    assert!(reason.contains("was modified"), "{reason}");
    assert!(reason.contains(&stored.display().to_string()), "{reason}");
    assert!(reason.contains(&sha), "{reason}");
    use sha2::Digest;
    let found = format!("{:x}", sha2::Sha256::digest(&bytes));
    assert!(reason.contains(&found), "{reason}");
    assert!(s["pid"].is_null(), "never launched");
    let list = d.ctl_json(&["list"]);
    assert_eq!(list["modules"][0]["state"], "failed");
}

#[test]
fn a_manifest_gets_only_the_syscalls_the_configuration_grants() {
    let work = TempDir::new("grants");
    let asks = real_module(
        work.path(),
        "tracer",
        "hello",
        "[sandbox]\nallow_syscalls = [\"ptrace\"]\n",
    );
    let d = Daemon::start(FAST);
    let out = d.ctl(&["install", asks.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`ptrace`"), "{err}");
    assert!(err.contains("sandbox.grantable_syscalls"), "{err}");
    assert!(d.ctl_json(&["list"])["modules"]
        .as_array()
        .unwrap()
        .is_empty());
    // Not a syscall the sandbox denies: a manifest error of its own.
    let odd = real_module(
        work.path(),
        "odd",
        "hello",
        "[sandbox]\nallow_syscalls = [\"read\"]\n",
    );
    let out = d.ctl(&["install", odd.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sandbox.allow_syscalls[0]") && err.contains("`read`"),
        "{err}"
    );
    drop(d);

    // Granted by the configuration: installed, and the worker says so.
    let d = Daemon::start(&format!(
        "[sandbox]\ngrantable_syscalls = [\"ptrace\"]\n{FAST}"
    ));
    install(&d, &asks);
    let s = running(&d, "tracer");
    let seccomp = s["replicas"][0]["sandbox"]["seccomp"].as_str().unwrap();
    assert!(seccomp.contains("granted ptrace"), "{seccomp}");
    drop(d);

    // Off by configuration: said so, not silently.
    let d = Daemon::start(&format!("[sandbox]\nenabled = false\n{FAST}"));
    install(&d, &module_dir(work.path(), "plain", "1.0.0"));
    let sb = running(&d, "plain")["replicas"][0]["sandbox"].clone();
    assert_eq!(sb["uid_mechanism"], "none", "{sb}");
    assert_eq!(sb["seccomp"], "none (sandbox off)", "{sb}");
    assert_eq!(sb["uid"], nix::unistd::geteuid().as_raw(), "{sb}");
}

/// `fixture-hostile` named `name`, trying only the calls on itself, granted
/// `allow`; its report once it runs.
fn self_attacks_with(d: &Daemon, work: &Path, name: &str, allow: &[&str]) -> Value {
    let writable = dir_0777(work.join(format!("{name}-data")));
    let extra = format!(
        "[sandbox]\nwritable = [{writable:?}]\nallow_syscalls = {allow:?}\n\
         [config]\nself_only = true\nwritable = {writable:?}\n"
    );
    install(d, &real_module(work, name, "fixture-hostile", &extra));
    let s = running(d, name);
    let seccomp = s["replicas"][0]["sandbox"]["seccomp"].as_str().unwrap();
    if !allow.is_empty() {
        assert!(
            seccomp.contains(&format!("granted {}", allow.join(", "))),
            "{seccomp}"
        );
    }
    serde_json::from_slice(&std::fs::read(writable.join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_granted_syscall_gets_through_and_only_it() {
    let work = TempDir::new("granted");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let syscalls: Vec<&str> = SELF_ATTACKS.iter().map(|(_, s)| *s).collect();
    let d = Daemon::start(&format!(
        "[sandbox]\ngrantable_syscalls = {syscalls:?}\n{FAST}"
    ));
    // Nothing granted: each refused by the filter…
    self_attacks_refused(&self_attacks_with(&d, work.path(), "none", &[]));
    // …and with all granted, none refused with EPERM: the kernel itself
    // lets this uid make them, so the EPERM above is the filter's. Those
    // that depend on no sysctl work outright.
    let all = self_attacks_with(&d, work.path(), "all", &syscalls);
    eprintln!("every self attack granted: {all}");
    for (attack, _) in SELF_ATTACKS {
        assert_ne!(all[attack], libc::EPERM, "{attack}: {all}");
    }
    for attack in ["ptrace_traceme", "process_vm_readv", "pidfd_getfd"] {
        assert_eq!(all[attack], 0, "{attack}: {all}");
    }
    // ptrace alone: PTRACE_TRACEME works, the other seven stay refused.
    let one = self_attacks_with(&d, work.path(), "tracer", &["ptrace"]);
    assert_eq!(one["ptrace_traceme"], 0, "{one}");
    for (attack, _) in &SELF_ATTACKS[1..] {
        assert_eq!(one[attack], libc::EPERM, "{attack}: {one}");
    }
}

/// Installs a hello module asking to write `path` (the install passes the
/// lexical checks) and returns `emberctl status`'s text once its launch
/// failed, after checking the reason names `path` and says `why`.
fn launch_refused(d: &Daemon, work: &Path, name: &str, path: &Path, why: &str) -> String {
    install(d, &ok_like(work, name, path));
    let s = d.wait_status(name, "the launch refused", |s| s["state"] == "failed");
    let reason = s["reason"].as_str().unwrap_or_default();
    let expect = format!("sandbox: writable path {}: {why}", path.display());
    assert!(reason.contains(&expect), "{expect:?} not in {s}");
    let text = String::from_utf8(d.ctl_ok(&["status", name]).stdout).unwrap();
    assert!(text.contains(&expect), "{text}");
    text
}

#[test]
fn a_writable_path_that_is_missing_or_a_symlink_fails_the_launch() {
    let work = TempDir::new("wmissing");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(FAST);
    // Missing: the module would run without it and fail at its first write.
    launch_refused(
        &d,
        work.path(),
        "missing",
        &work.path().join("not-there"),
        "does not exist (a writable path must exist when the module starts)",
    );
    // A link inside a root to emberd's state directory: the lexical check
    // passes it, the worker does not follow it.
    let link = work.path().join("state-link");
    std::os::unix::fs::symlink(&d.state, &link).unwrap();
    launch_refused(
        &d,
        work.path(),
        "linked",
        &link,
        "is or passes through a symbolic link",
    );
    // A link on the way, to a directory anyone may write.
    let real = dir_0777(work.path().join("real"));
    dir_0777(real.join("sub"));
    let via = work.path().join("via");
    std::os::unix::fs::symlink(&real, &via).unwrap();
    launch_refused(
        &d,
        work.path(),
        "via",
        &via.join("sub"),
        "is or passes through a symbolic link",
    );
    // The real path: it runs, and the status lists it.
    install(&d, &ok_like(work.path(), "direct", &real.join("sub")));
    let s = running(&d, "direct");
    let w = real.join("sub").display().to_string();
    assert_eq!(
        s["replicas"][0]["sandbox"]["writable"],
        serde_json::json!([w])
    );
    assert!(!dead(d.pid()));
}

/// The reviewer's probe: writable paths are opened as the module's uid, so
/// a launch does not tell a client what lies inside a directory only root
/// may search (opened as root, one path "does not exist" and the other
/// runs).
#[test]
fn a_writable_path_in_a_root_only_directory_fails_alike_whether_it_exists() {
    if !root_or_skip(
        "a_writable_path_in_a_root_only_directory_fails_alike_whether_it_exists",
        "the module's own uid needs root",
    ) {
        return;
    }
    let work = TempDir::new("wprivate");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = work.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Writable by anyone who gets there: only the 0700 parent stops it.
    let there = dir_0777(private.join("there"));
    let d = Daemon::start(FAST);
    let why = "cannot be opened by the module's uid";
    let reason = |name: &str, path: &Path| {
        let text = launch_refused(&d, work.path(), name, path, why);
        assert!(!text.contains("does not exist"), "{text}");
        let s = d.ctl_json(&["status", name]);
        let r = s["status"]["reason"].as_str().unwrap().to_owned();
        // The same words but for the path.
        r.replace(&path.display().to_string(), "PATH")
    };
    let existing = reason("existing", &there);
    let missing = reason("missing", &private.join("not-there"));
    assert_eq!(existing, missing);
    assert!(!dead(d.pid()));
}

/// A uid no passwd or group entry has and no module was given.
fn unused_uid() -> u32 {
    (4_000_000u32..)
        .find(|&id| !supervisor::sandbox::id_in_use(id))
        .unwrap()
}

fn health_as(socket: &Path, uid: u32) -> std::process::Output {
    std::process::Command::new(emberctl())
        .arg("--socket")
        .arg(socket)
        .arg("health")
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

#[test]
fn the_control_socket_refuses_outsiders_and_module_uids() {
    if !root_or_skip(
        "the_control_socket_refuses_outsiders_and_module_uids",
        "needs a second uid",
    ) {
        return;
    }
    // The socket file lets anyone connect: SO_PEERCRED is what refuses.
    let d = Daemon::start(&format!("socket_mode = \"0666\"\n{FAST}"));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = health_as(&d.socket, unused_uid());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    // A module's own uid is no better.
    let work = TempDir::new("sock");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    install(&d, &module_dir(work.path(), "insider", "1.0.0"));
    let uid = running(&d, "insider")["replicas"][0]["sandbox"]["uid"]
        .as_u64()
        .unwrap() as u32;
    let out = health_as(&d.socket, uid);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    // The allowed user still gets in.
    assert!(d.ctl(&["health"]).status.success());
}

/// `emberctl install DIR`'s stderr; the install must fail.
fn refused(d: &Daemon, dir: &Path) -> String {
    let out = d.ctl(&["install", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "{err}");
    err
}

#[test]
fn writable_paths_are_confined_to_the_configured_roots_and_off_emberds_directories() {
    let work = TempDir::new("roots");
    let d = Daemon::start(FAST);
    // The whole filesystem: outside the default roots (/tmp, /var/tmp).
    let all = real_module(
        work.path(),
        "all",
        "hello",
        "[sandbox]\nwritable = [\"/\"]\n",
    );
    let err = refused(&d, &all);
    assert!(
        err.contains("field `sandbox.writable[0]`")
            && err.contains("/ is not inside a directory of `sandbox.writable_roots`"),
        "{err}"
    );
    // `..` out of a root.
    let up = real_module(
        work.path(),
        "up",
        "hello",
        "[sandbox]\nwritable = [\"/tmp/../etc\"]\n",
    );
    assert!(refused(&d, &up).contains("contains `..`"));
    // emberd's state directory, its socket's directory, an ancestor and a
    // descendant: all inside /tmp here, all refused.
    let socket_dir = d.socket.parent().unwrap().to_owned();
    for (i, p) in [
        d.state.clone(),
        socket_dir.clone(),
        socket_dir.parent().unwrap().to_owned(),
        d.state.join("artifacts"),
    ]
    .iter()
    .enumerate()
    {
        let m = real_module(
            work.path(),
            &format!("own{i}"),
            "hello",
            &format!("[sandbox]\nwritable = [{p:?}]\n"),
        );
        let err = refused(&d, &m);
        assert!(
            err.contains(&format!("{} is, holds or lies in", p.display()))
                && err.contains("emberd's state or control socket directory"),
            "{p:?}: {err}"
        );
    }
    assert!(d.ctl_json(&["list"])["modules"]
        .as_array()
        .unwrap()
        .is_empty());
    // Inside a root: installed. A deploy may not widen it.
    let data = dir_0777(work.path().join("data"));
    let ok = real_module(
        work.path(),
        "ok",
        "hello",
        &format!("[sandbox]\nwritable = [{data:?}]\n"),
    );
    d.ctl_ok(&["install", ok.to_str().unwrap()]);
    running(&d, "ok");
    std::fs::write(
        ok.join("module.toml"),
        format!(
            "name = \"ok\"\nversion = \"2.0.0\"\nentry = {:?}\n[sandbox]\nwritable = [{:?}]\n",
            ember_tests::artifact("hello").display().to_string(),
            d.state
        ),
    )
    .unwrap();
    let out = d.ctl(&["deploy", ok.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("field `sandbox.writable[0]`"), "{err}");
    let s = d.ctl_json(&["status", "ok"]);
    assert_eq!(s["status"]["revision"], 1, "{s}");
    assert_eq!(s["status"]["state"], "running", "{s}");
    drop(d);

    // The operator's roots replace the default: /tmp is no longer one.
    let elsewhere = TempDir::new("roots-cfg");
    let d = Daemon::start(&format!(
        "[sandbox]\nwritable_roots = [{:?}]\n{FAST}",
        elsewhere.path()
    ));
    let err = refused(&d, &ok_like(work.path(), "tmp", &data));
    assert!(
        err.contains(&format!("({})", elsewhere.path().display())),
        "{err}"
    );
    let inside = dir_0777(elsewhere.path().join("m"));
    d.ctl_ok(&[
        "install",
        ok_like(work.path(), "inside", &inside).to_str().unwrap(),
    ]);
    running(&d, "inside");
}

/// A hello module named `name` asking to write `path`.
fn ok_like(parent: &Path, name: &str, path: &Path) -> PathBuf {
    real_module(
        parent,
        name,
        "hello",
        &format!("[sandbox]\nwritable = [{path:?}]\n"),
    )
}

/// Opens the FIFO `p` for writing if a reader waits on it (else `None`).
fn fifo_writer(p: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .ok()
}

#[test]
fn an_installs_passwd_and_group_lookups_block_no_other_client() {
    if !root_or_skip(
        "an_installs_passwd_and_group_lookups_block_no_other_client",
        "a private mount namespace needs root",
    ) {
        return;
    }
    // emberd in its own mount namespace where /etc/passwd is a FIFO: each
    // passwd lookup (the uid allocation's) waits for a writer, as a lookup
    // against a stalled LDAP or sssd would.
    let dir = TempDir::new("nss");
    let fifo = dir.path().join("passwd");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let mut d = Daemon::in_dir(dir, FAST);
    let child = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/passwd && exec \"$@\"")
        .arg(&fifo)
        .arg(emberd())
        .arg("--config")
        .arg(&d.config)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(&d.state)
        .env("EMBER_LOG", "error")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    d.child = Some(child);
    ember_tests::poll_until(
        "emberd's socket",
        std::time::Duration::from_millis(20),
        || {
            std::os::unix::net::UnixStream::connect(&d.socket)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    );
    let work = TempDir::new("nss-mod");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = module_dir(work.path(), "looked-up", "1.0.0");
    let install = ember_tests::ChildGuard(
        std::process::Command::new(emberctl())
            .arg("--socket")
            .arg(&d.socket)
            .arg("install")
            .arg(&m)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The first lookup waits in the FIFO's open for a writer (the kernel's
    // `wait_for_partner`), on whichever emberd thread runs it.
    let pid = d.pid();
    ember_tests::poll_until(
        "the install's passwd lookup",
        std::time::Duration::from_millis(10),
        || {
            let waiting = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map_err(|e| e.to_string())?
                .flatten()
                .any(|t| {
                    std::fs::read_to_string(t.path().join("wchan"))
                        .is_ok_and(|w| w == "wait_for_partner")
                });
            waiting.then_some(()).ok_or_else(|| "not yet".to_owned())
        },
    );
    // Everyone else is answered meanwhile (the read timeout is the guard).
    let mut raw = Raw::connect(&d.socket);
    let h = raw.call("io.ember.Supervisor.Health", serde_json::json!({}));
    assert!(h["parameters"]["version"].is_string(), "{h}");
    // Then passwd answers, this lookup and every later one.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let (stop, fifo) = (stop.clone(), fifo.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(w) = fifo_writer(&fifo) {
                    let _ = std::io::Write::write_all(&mut &w, b"root:x:0:0:root:/root:/bin/sh\n");
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let mut install = install;
    let status = install
        .wait_timeout(std::time::Duration::from_secs(30))
        .expect("the install returns");
    let s = running(&d, "looked-up");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    feeder.join().unwrap();
    assert!(status.success());
    let uid = s["replicas"][0]["sandbox"]["uid"].as_u64().unwrap();
    assert!((0x7000_0000u64..=0x7000_FFFF).contains(&uid), "{uid}");
}
