//! Slim modules on the real emberd: `hello` links std and the Ember SDK
//! dynamically (it depends on `ember-sdk`), the zygote preloaded both
//! before forking, and the worker binds the module to them. Modules built
//! against another runtime (another rustc's std, another SDK build, an SDK
//! lacking a symbol) are crafted from a copy of `libhello.so` by rewriting
//! one string of its dynamic section, as such a build would differ, and
//! must be refused at install with the library they wanted, what emberd
//! offers and how to rebuild, while what runs is untouched.

use std::path::{Path, PathBuf};

use ember_tests::artifact;
use ember_tests::daemon::*;
use module_runtime::elf;
use serde_json::Value;

fn running(s: &Value) -> bool {
    s["state"] == "running"
}

/// `DT_NEEDED` of `path`.
fn needed(path: &Path) -> Vec<String> {
    let f = std::fs::File::open(path).unwrap();
    elf::dynamic_info(&f, path).unwrap().needed
}

/// The entry of `needed` starting with `prefix`.
fn needed_with(path: &Path, prefix: &str) -> String {
    needed(path)
        .into_iter()
        .find(|n| n.starts_with(prefix))
        .unwrap_or_else(|| panic!("{} needs no {prefix}*: is it slim?", path.display()))
}

/// A module directory `name` holding a copy of `libhello.so` in which every
/// occurrence of `from` is replaced by `to` (same length, so every offset
/// in the file stays valid).
fn rewritten_hello(parent: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    assert_eq!(from.len(), to.len());
    let dir = copied_module(parent, name, "hello");
    let so = dir.join("libhello.so");
    let mut bytes = std::fs::read(&so).unwrap();
    let mut found = 0;
    let mut i = 0;
    while let Some(at) = bytes[i..]
        .windows(from.len())
        .position(|w| w == from.as_bytes())
    {
        bytes[i + at..i + at + to.len()].copy_from_slice(to.as_bytes());
        i += at + to.len();
        found += 1;
    }
    assert!(found > 0, "{from} is not in libhello.so");
    std::fs::write(&so, bytes).unwrap();
    dir
}

fn health(d: &Daemon) -> Value {
    d.ctl_json(&["health"])
}

/// Installs `dir`, which must be refused as invalid input (exit 4); the
/// message.
fn refused(d: &Daemon, dir: &Path) -> String {
    let out = d.ctl(&["install", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "install: {stderr}");
    stderr
}

/// A daemon running slim `hello` (as `keep`) and the fat fixture
/// `ignores-stop`, both checked running.
fn daemon_with_modules() -> (Daemon, i32) {
    let d = Daemon::start(FAST);
    let dir = copied_module(d.dir.path(), "keep", "hello");
    d.ctl_ok(&["install", "--wait", dir.to_str().unwrap()]);
    let keep = d.wait_status("keep", "keep running", running);
    let fat = real_module(d.dir.path(), "fat", "fixture-ignores-stop", "");
    d.ctl_ok(&["install", "--wait", fat.to_str().unwrap()]);
    d.wait_status("fat", "the fat module running", running);
    (d, keep["pid"].as_i64().unwrap() as i32)
}

#[test]
fn slim_module_runs_on_the_runtime_the_zygote_preloaded() {
    let hello = artifact("hello");
    let fat = artifact("fixture-ignores-stop");
    // hello is slim, the fixture fat (it carries its own std and SDK).
    let sdk = needed_with(&hello, "libember_sdk-");
    needed_with(&hello, "libstd-");
    assert!(
        !needed(&fat)
            .iter()
            .any(|n| n.starts_with("libstd-") || n.starts_with("libember_sdk")),
        "{:?}",
        needed(&fat)
    );
    assert!(
        std::fs::metadata(&hello).unwrap().len() * 4 < std::fs::metadata(&fat).unwrap().len(),
        "a slim module is a fraction of a fat one"
    );

    let (d, pid) = daemon_with_modules();
    let h = health(&d);
    let rt = &h["runtime_libs"];
    assert_eq!(rt["offered"], true, "{h}");
    assert_eq!(rt["sdk"], sdk.as_str(), "{h}");
    assert_eq!(
        rt["std"].as_str(),
        Some(needed_with(&hello, "libstd-").as_str())
    );
    assert!(rt["rustc"].as_str().unwrap().starts_with("rustc "), "{h}");
    let sdk_path = rt["sdk_path"].as_str().unwrap().to_owned();
    let text = String::from_utf8_lossy(&d.ctl_ok(&["health"]).stdout).into_owned();
    assert!(
        text.contains(&format!("slim modules: {sdk} + ")),
        "health names the runtime: {text}"
    );

    // The zygote mapped the SDK before it forked; the worker runs the
    // module on that copy, its std with it.
    let zygote = h["zygote_pid"].as_i64().unwrap();
    let maps = |pid: i64| std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps(zygote).contains(&sdk_path), "zygote maps the SDK");
    let worker = maps(i64::from(pid));
    assert!(worker.contains(&sdk_path), "{worker}");
    assert!(worker.contains(&format!("/{}", rt["std"].as_str().unwrap())));
    assert!(worker.contains("memfd:ember-artifact"), "{worker}");
    poll_log(&d, "keep", "hello, world");
    let out = d.ctl_ok(&["uninstall", "keep"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("keep"));
}

fn poll_log(d: &Daemon, name: &str, needle: &str) {
    ember_tests::poll_until(
        &format!("{name}'s log to say {needle:?}"),
        std::time::Duration::from_millis(30),
        || {
            let out = d.ctl(&["logs", name]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains(needle) {
                Ok(())
            } else {
                Err(text)
            }
        },
    );
}

/// The modules `daemon_with_modules` started still run, in the same
/// processes.
fn untouched(d: &Daemon, pid: i32) {
    let keep = d.wait_status("keep", "keep still running", running);
    assert_eq!(keep["pid"].as_i64(), Some(i64::from(pid)));
    d.wait_status("fat", "the fat module still running", running);
}

#[test]
fn module_built_by_another_rustc_is_refused_at_install() {
    let (d, pid) = daemon_with_modules();
    let std = needed_with(&artifact("hello"), "libstd-");
    let other = format!("libstd-{}.so", "0".repeat(std.len() - "libstd-.so".len()));
    let dir = rewritten_hello(d.dir.path(), "other-rustc", &std, &other);
    let msg = refused(&d, &dir);
    assert!(msg.contains(&other), "names what it needs: {msg}");
    assert!(msg.contains(&std), "names what emberd offers: {msg}");
    assert!(msg.contains("another Rust compiler"), "{msg}");
    assert!(msg.contains("rebuild the module with"), "{msg}");
    assert!(msg.contains("rustc "), "names the compiler: {msg}");
    untouched(&d, pid);
    assert!(!d.ctl(&["status", "other-rustc"]).status.success());
}

#[test]
fn module_built_against_another_sdk_build_is_refused_at_install() {
    let (d, pid) = daemon_with_modules();
    let sdk = needed_with(&artifact("hello"), "libember_sdk-");
    let other = format!(
        "libember_sdk-{}.so",
        "f".repeat(sdk.len() - "libember_sdk-.so".len())
    );
    assert_ne!(sdk, other);
    let dir = rewritten_hello(d.dir.path(), "other-sdk", &sdk, &other);
    let msg = refused(&d, &dir);
    assert!(msg.contains(&other), "names what it needs: {msg}");
    assert!(msg.contains(&sdk), "names what emberd offers: {msg}");
    assert!(msg.contains("another build of the Ember SDK"), "{msg}");
    assert!(msg.contains("rebuild the module against"), "{msg}");
    untouched(&d, pid);
}

#[test]
fn module_needing_a_symbol_the_sdk_lacks_is_refused_at_install() {
    // Same soname, different SDK build (other features, dependencies or
    // build directory): the symbol hashes differ.
    let hello = artifact("hello");
    let f = std::fs::File::open(&hello).unwrap();
    let mut symbol = None;
    elf::for_each_dynamic_symbol(&f, &hello, |s| {
        let name = String::from_utf8_lossy(s.name);
        if symbol.is_none()
            && !s.defined
            && name.starts_with("_ZN14module_runtime")
            && name.ends_with('E')
        {
            symbol = Some(name.into_owned());
        }
    })
    .unwrap();
    let symbol = symbol.expect("hello imports a module_runtime symbol from the SDK");
    // Flip the last digit of its `17h<16 hex>E` hash.
    let mut other = symbol.clone().into_bytes();
    let i = other.len() - 2;
    other[i] = if other[i] == b'0' { b'1' } else { b'0' };
    let other = String::from_utf8(other).unwrap();

    let (d, pid) = daemon_with_modules();
    let dir = rewritten_hello(d.dir.path(), "other-symbols", &symbol, &other);
    let msg = refused(&d, &dir);
    assert!(msg.contains("module_runtime::"), "names the symbol: {msg}");
    assert!(msg.contains("do not define"), "{msg}");
    assert!(msg.contains("rebuild it in the workspace"), "{msg}");
    assert!(msg.contains("[runtime_libs] dir"), "{msg}");
    untouched(&d, pid);
}

#[test]
fn runtime_dir_without_the_runtime_stops_emberd_at_start() {
    let dir = ember_tests::TempDir::new("slim-empty-runtime");
    let cfg = dir.path().join("emberd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[runtime_libs]\ndir = {:?}\n",
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let mut out = std::process::Command::new(emberd())
        .arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It must refuse to start; one that starts anyway is killed (by its
    // pid) after 60 s rather than hanging the test.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while out.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if out.try_wait().unwrap().is_none() {
        let _ = out.kill();
    }
    let out = out.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("runtime_libs.dir"), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}
