//! The README's "Trying the examples" and "Stopping emberd", as a newcomer
//! follows them: the snippet's commands, read from README.md as it stands,
//! run against a real emberd with the real emberctl from the repository
//! root, installing every in-tree example and fixture as it is (its
//! manifest names the bare library; emberctl finds cargo's build of it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ember_tests::daemon::{emberctl, wait_dead, Daemon, FAST};
use ember_tests::{build_examples, poll_until, profile_dir, workspace_root, TempDir};
use serde_json::Value;

/// The text of README.md's section `## {heading}`, up to the next one.
fn readme_section(heading: &str) -> String {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no section `## {heading}`"));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    rest[..end].to_owned()
}

/// The lines of the first ```sh block of `section`, comments dropped.
fn sh_lines(section: &str) -> Vec<String> {
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, b)| b.split_once("```"))
        .expect("a ```sh block")
        .0;
    block
        .lines()
        .map(|l| {
            l.split_once("  #")
                .map_or(l, |(cmd, _)| cmd)
                .trim()
                .to_owned()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// The target directory the tests (and so emberd, emberctl and the
/// examples) were built in, and the profile.
fn target_and_profile() -> (PathBuf, String) {
    let profile = profile_dir();
    let name = profile.file_name().unwrap().to_string_lossy().into_owned();
    (profile.parent().unwrap().to_owned(), name)
}

/// `emberctl ARGS` from the repository root, as the README runs it
/// (`EMBER_SOCKET` exported). The cargo target directory is found as a
/// newcomer's shell would have it: the workspace's `target/` found by
/// walking up when the tests were built there, else `CARGO_TARGET_DIR`.
fn ctl_as_readme(d: &Daemon, args: &[&str]) -> Output {
    let (target, _) = target_and_profile();
    let mut cmd = Command::new(emberctl());
    cmd.current_dir(workspace_root())
        .env("EMBER_SOCKET", &d.socket)
        .args(args);
    if target == workspace_root().join("target") {
        cmd.env_remove("CARGO_TARGET_DIR");
    } else {
        cmd.env("CARGO_TARGET_DIR", &target);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The library cargo builds for the example at `dir` (its manifest's
/// `entry`), and the line emberctl prints when it picks it.
fn expected_pick(dir: &Path) -> (String, String) {
    let manifest = std::fs::read_to_string(dir.join("module.toml")).unwrap();
    let entry = manifest
        .lines()
        .find_map(|l| l.strip_prefix("entry = "))
        .expect("an entry")
        .trim_matches('"')
        .to_owned();
    let (_, profile) = target_and_profile();
    let line = format!(
        "entry {entry}: {} ({profile} build, as emberctl's",
        profile_dir().join(&entry).display()
    );
    (entry, line)
}

/// Checks what one `emberctl install` of an in-tree module printed: the
/// build picked first, then the install, or, for the two the README names,
/// the refusal it says.
fn check_install(dir: &Path, out: &Output) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let (entry, line) = expected_pick(dir);
    assert!(
        stdout.starts_with(&line),
        "{}: expected `{line}` first, got: {stdout}{stderr}",
        dir.display()
    );
    assert!(!entry.contains('/'), "{entry}: a bare file name");
    let name = dir.file_name().unwrap().to_string_lossy();
    match (name.as_ref(), out.status.code()) {
        (_, Some(0)) => assert!(stdout.contains("\ninstalled "), "{stdout}"),
        // Refused after the entry was found, for its writable path, as the
        // README says.
        ("hostile", Some(4)) => assert!(stderr.contains("sandbox.writable"), "{stderr}"),
        // Its listener's port is checked after the entry: another program
        // holding 127.0.0.1:8080 is no failure of the install path.
        ("greeter", Some(5)) => assert!(stderr.contains("port 8080 is in use"), "{stderr}"),
        _ => panic!("install {}: {stdout}{stderr}", dir.display()),
    }
}

#[test]
fn every_example_and_fixture_installs_as_it_is_as_the_readme_says() {
    let lines = sh_lines(&readme_section("Trying the examples"));
    let expect = |i: usize, what: &str| {
        assert_eq!(lines.get(i).map(String::as_str), Some(what), "{lines:#?}");
    };
    // `cargo build`: build_examples() builds emberd, emberctl and every
    // example and fixture crate with the tests' own cargo, profile and
    // target directory.
    expect(0, "cargo build");
    build_examples();
    expect(
        1,
        "export PATH=$PWD/target/debug:$PATH EMBER_SOCKET=/tmp/ember.sock",
    );
    // The daemon as the README starts it (default configuration), on this
    // test's own socket and state directory.
    expect(
        2,
        "emberd --socket /tmp/ember.sock --state-dir /tmp/ember-state &",
    );
    let d = Daemon::start("");
    let fixtures_loop =
        r#"for f in examples/fixtures/*/module.toml; do emberctl install "$f"; done"#;
    assert!(lines.iter().any(|l| l == fixtures_loop), "{lines:#?}");
    let mut greeter_installed = false;
    for line in &lines[3..] {
        if line == fixtures_loop {
            let mut manifests: Vec<PathBuf> =
                std::fs::read_dir(workspace_root().join("examples/fixtures"))
                    .unwrap()
                    .map(|e| e.unwrap().path().join("module.toml"))
                    .filter(|m| m.is_file())
                    .collect();
            manifests.sort();
            assert!(manifests.len() >= 12, "{manifests:?}");
            for m in manifests {
                let rel = m.strip_prefix(workspace_root()).unwrap();
                let out = ctl_as_readme(&d, &["install", rel.to_str().unwrap()]);
                check_install(m.parent().unwrap(), &out);
            }
            continue;
        }
        let args: Vec<&str> = line
            .strip_prefix("emberctl ")
            .unwrap_or_else(|| panic!("not an emberctl command: {line}"))
            .split_whitespace()
            .collect();
        let out = ctl_as_readme(&d, &args);
        if args[0] == "install" {
            let dir = workspace_root().join(args.last().unwrap());
            check_install(&dir, &out);
            greeter_installed |= dir.ends_with("greeter") && out.status.success();
            if args.contains(&"--wait") {
                let name = dir.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    text(&out.stdout).contains(&format!("{name}: running")),
                    "{}",
                    text(&out.stdout)
                );
            }
        } else {
            assert!(out.status.success(), "{line}: {}", text(&out.stderr));
        }
    }
    // Everything the README installed is there, the fixtures included
    // (running, or failing as each is meant to).
    let listed: Vec<String> = d.ctl_json(&["list"])["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    for name in [
        "hello",
        "kv",
        "fixture-abort",
        "fixture-fork-probe",
        "fixture-hangs-in-load",
        "fixture-ignores-stop",
        "fixture-never-ready",
        "fixture-panic-start",
        "fixture-scribbler",
        "fixture-segfault",
        "fixture-unbounded-alloc",
        "fixture-wrong-abi",
        "fixture-wrong-sdk",
    ] {
        assert!(listed.iter().any(|l| l == name), "{name} in {listed:?}");
    }
    assert_eq!(
        listed.iter().any(|l| l == "greeter"),
        greeter_installed,
        "{listed:?}"
    );
    for name in ["hello", "kv"] {
        d.wait_status(name, "running", |s| s["state"] == "running");
    }
    // `deploy` finds the entry the same way: the same build is no change.
    let out = ctl_as_readme(&d, &["deploy", "examples/hello"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let (_, line) = expected_pick(&workspace_root().join("examples/hello"));
    assert!(stdout.starts_with(&line), "{stdout}");
    assert!(stdout.contains("hello: unchanged (revision 1"), "{stdout}");
    // With --json the pick goes to stderr: stdout stays one JSON reply.
    let out = ctl_as_readme(&d, &["--json", "deploy", "examples/hello"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).expect("a JSON reply");
    assert_eq!(reply["outcome"], "unchanged", "{reply}");
    assert!(
        text(&out.stderr).starts_with(&line),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_entry_found_nowhere_is_refused_naming_every_place_looked() {
    let d = Daemon::start(FAST);
    let work = TempDir::new("nowhere");
    // A cargo package that was never built.
    let pkg = work.path().join("nowhere");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(pkg.join("Cargo.toml"), "[package]\nname = \"nowhere\"\n").unwrap();
    std::fs::write(
        pkg.join("module.toml"),
        "name = \"nowhere\"\nversion = \"1.0.0\"\nentry = \"libnowhere.so\"\n",
    )
    .unwrap();
    let run = |args: &[&str], target: Option<&Path>| {
        let mut cmd = Command::new(emberctl());
        cmd.env("EMBER_SOCKET", &d.socket).args(args);
        match target {
            Some(t) => cmd.env("CARGO_TARGET_DIR", t),
            None => cmd.env_remove("CARGO_TARGET_DIR"),
        };
        cmd.output().unwrap()
    };
    let dir = pkg.to_str().unwrap();
    for verb in ["install", "deploy"] {
        let out = run(&[verb, dir], None);
        assert_eq!(out.status.code(), Some(4), "{verb}: {out:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "invalid manifest {}: field `entry`: libnowhere.so not found; looked for {}, {}, {}",
                pkg.join("module.toml").display(),
                pkg.join("libnowhere.so").display(),
                pkg.join("target/release/libnowhere.so").display(),
                pkg.join("target/debug/libnowhere.so").display(),
            )),
            "{verb}: {err}"
        );
    }
    // With CARGO_TARGET_DIR, that directory is the one looked in.
    let elsewhere = work.path().join("elsewhere");
    let out = run(&["install", dir], Some(&elsewhere));
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(
            &elsewhere
                .join("release/libnowhere.so")
                .display()
                .to_string()
        ) && err.contains(&elsewhere.join("debug/libnowhere.so").display().to_string())
            && !err.contains(&pkg.join("target").display().to_string()),
        "{err}"
    );
    // Nothing reached emberd.
    assert_eq!(d.ctl_json(&["list"])["modules"], Value::Array(Vec::new()));
    // A raw client's `entry` must be absolute, like its `path`.
    let mut raw = ember_tests::daemon::Raw::connect(&d.socket);
    let reply = raw.call(
        "io.ember.Supervisor.Install",
        serde_json::json!({ "path": dir, "entry": "libnowhere.so" }),
    );
    assert_eq!(
        reply["error"], "io.ember.Supervisor.InvalidInput",
        "{reply}"
    );
    assert!(
        reply["parameters"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("libnowhere.so is not absolute")),
        "{reply}"
    );
    // A packaged module (its library next to its manifest) is taken as it
    // is, with no cargo lookup to report.
    let packaged = ember_tests::daemon::copied_module(work.path(), "packaged", "hello");
    let out = run(&["install", packaged.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("installed packaged 1.0.0"),
        "{}",
        text(&out.stdout)
    );
}

/// Pids of emberd's processes: the zygote, the idle workers and every
/// replica of every module.
fn processes(d: &Daemon) -> Vec<i32> {
    let pool = d.ctl_json(&["pool"]);
    let mut pids = vec![pool["pool"]["zygote_pid"].as_i64().unwrap() as i32];
    pids.extend(
        pool["pool"]["idle_pids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_i64().unwrap() as i32),
    );
    for m in d.ctl_json(&["list"])["modules"].as_array().unwrap() {
        pids.extend(
            m["pids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_i64().unwrap() as i32),
        );
    }
    pids
}

#[test]
fn sigterm_stops_every_module_and_the_next_start_restores_them() {
    let section = readme_section("Stopping emberd");
    for claim in [
        "SIGTERM",
        "stop_deadline",
        "the zygote and the idle workers exit",
        "removes the control socket file it bound",
        "and exits 0",
        "restores every module on its committed revision",
    ] {
        assert!(section.contains(claim), "README's Stopping emberd: {claim}");
    }
    build_examples();
    let mut d = Daemon::start("");
    // hello returns from `serve` when asked; the fixture never does and is
    // killed at its manifest's stop deadline (300 ms).
    for m in ["examples/hello", "examples/fixtures/ignores-stop"] {
        let out = ctl_as_readme(&d, &["install", "--wait", m]);
        assert!(out.status.success(), "{m}: {}", text(&out.stderr));
    }
    let pids = processes(&d);
    assert!(pids.len() >= 3, "{pids:?}");
    let mut child = d.child.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = poll_until("emberd to exit", Duration::from_millis(20), || {
        child
            .try_wait()
            .unwrap()
            .ok_or_else(|| "running".to_owned())
    });
    assert!(status.success(), "emberd exited {status}");
    for pid in &pids {
        assert!(wait_dead(*pid), "pid {pid} outlived emberd");
    }
    assert!(!d.socket.exists(), "the control socket file is left");
    // The next start restores both, on the same revision.
    d.spawn(&[]);
    for name in ["hello", "fixture-ignores-stop"] {
        let s = d.wait_status(name, "running again", |s| s["state"] == "running");
        assert_eq!(s["revision"], 1, "{s}");
    }
    // hello ran its `stop` at the shutdown (a graceful stop, not a kill).
    let logs = text(&d.ctl_ok(&["logs", "hello", "--lines", "1000"]).stdout);
    assert!(logs.contains("goodbye"), "{logs}");
}
