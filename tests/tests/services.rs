//! The service guide, `docs/services.md`, as a new user meets it: its
//! files are copied out of the guide into a fresh cargo workspace outside
//! the repository (path dependencies on this one), built, and run in a
//! real `emberd`: an exporter that is `kill -9`ed, scaled to two replicas
//! that share the calls and lose one, and an importer of another schema
//! version.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::{poll_until, profile_dir, workspace_root};
use serde_json::Value;

/// The files of the guide: each fenced block right after a line holding
/// only a path in backquotes and a colon (`` `pricing/src/lib.rs`: ``).
fn guide_files() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join("docs/services.md")).unwrap();
    let mut files = Vec::new();
    let mut lines = text.lines();
    let mut path: Option<String> = None;
    while let Some(line) = lines.next() {
        let l = line.trim();
        if let Some(p) = l.strip_prefix('`').and_then(|l| l.strip_suffix("`:")) {
            path = Some(p.to_owned());
            continue;
        }
        if l.starts_with("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            if let Some(p) = path.take() {
                files.push((p, body.join("\n") + "\n"));
            }
            continue;
        }
        if !l.is_empty() {
            path = None;
        }
    }
    files
}

/// The guide's project, written and built once per test binary.
struct Guide {
    dir: PathBuf,
    /// Built cdylibs by crate name.
    artifacts: PathBuf,
}

fn guide() -> &'static Guide {
    static GUIDE: OnceLock<Guide> = OnceLock::new();
    GUIDE.get_or_init(|| {
        let files = guide_files();
        let names: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "Cargo.toml",
            "pricing-schema/Cargo.toml",
            "pricing-schema/src/lib.rs",
            "pricing/Cargo.toml",
            "pricing/src/lib.rs",
            "pricing/module.toml",
            "shop/Cargo.toml",
            "shop/src/lib.rs",
            "shop/module.toml",
        ] {
            assert!(names.contains(&want), "the guide shows {want}: {names:?}");
        }
        // Outside the workspace (a project of its own), under the target
        // directory it shares with this build.
        let dir = profile_dir().join("services-guide");
        let _ = std::fs::remove_dir_all(&dir);
        let root = workspace_root();
        for (path, body) in &files {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            let body = body.replace("/path/to/ember", root.to_str().unwrap());
            std::fs::write(file, body).unwrap();
        }
        // The same dependency versions as this workspace: nothing to fetch.
        std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        let target = profile_dir().parent().unwrap().to_owned();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(&dir)
            .args(["build", "--offline", "--quiet", "--target-dir"])
            .arg(&target);
        if profile_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build for the guide");
        assert!(
            out.status.success(),
            "the guide's project does not build:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Guide {
            dir,
            artifacts: profile_dir(),
        }
    })
}

/// The guide's module `name`, its manifest with the entry pointing at the
/// built library, `edit` applied to the rest (a free port, replicas).
fn guide_module(d: &Daemon, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let g = guide();
    let text = std::fs::read_to_string(g.dir.join(name).join("module.toml")).unwrap();
    let lib = g.artifacts.join(format!("lib{name}.so"));
    let text = text.replace(
        &format!("\"../target/release/lib{name}.so\""),
        &format!("{:?}", lib.display().to_string()),
    );
    assert!(text.contains(&lib.display().to_string()), "{text}");
    let dir = d.dir.path().join(format!("mod-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("module.toml"), edit(text)).unwrap();
    dir
}

/// Installs `shop` on a free port (another one if a test took it).
fn install_shop(d: &Daemon, edit: impl Fn(String) -> String) -> u16 {
    poll_until("a free port", Duration::ZERO, || {
        let port = free_port();
        let dir = guide_module(d, "shop", |t| {
            edit(t.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}")))
        });
        let out = d.ctl(&["install", dir.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            Some(0) => Ok(port),
            Some(5) => Err(stderr),
            _ => panic!("install shop: {stderr}"),
        }
    })
}

fn replicas(n: u32) -> impl Fn(String) -> String {
    move |t| t.replace("replicas = 2", &format!("replicas = {n}"))
}

fn running(s: &Value) -> bool {
    s["state"] == "running"
}

fn pids(s: &Value) -> Vec<i64> {
    s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["pid"].as_i64())
        .collect()
}

/// `GET /price/<item>/1`: the status and who answered.
fn price(port: u16, item: &str) -> (u16, String) {
    let (st, body) = http_get(port, &format!("/price/{item}/1"));
    let who = if st == 200 {
        body.split_whitespace().nth(1).unwrap_or("").to_owned()
    } else {
        body
    };
    (st, who)
}

fn kill9(pid: i64) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
fn an_importer_from_the_guide_survives_a_kill_9_of_its_exporter() {
    let d = Daemon::start(FAST);
    let pricing = guide_module(&d, "pricing", replicas(1));
    d.ctl_ok(&["install", pricing.to_str().unwrap()]);
    let port = install_shop(&d, |t| t);
    let shop = d.wait_status("shop", "wired", |s| {
        running(s) && s["imports"][0]["state"] == "wired"
    });
    assert_eq!(price(port, "apple"), (200, "pricing@0.1.0#0".into()));
    let text = String::from_utf8_lossy(&d.ctl_ok(&["status", "shop"]).stdout).into_owned();
    assert!(
        text.contains("imports: pricing v1 wired (exporter pricing)"),
        "{text}"
    );

    let old = pids(&d.ctl_json(&["status", "pricing"])["status"]);
    kill9(old[0]);
    // Restarted by emberd; shop's calls succeed again, shop untouched.
    let (st, who) = poll_until(
        "a price after the restart",
        Duration::from_millis(20),
        || match price(port, "pear") {
            (200, who) => Ok((200, who)),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!((st, who.as_str()), (200, "pricing@0.1.0#0"));
    let s = d.wait_status("pricing", "restarted", running);
    assert_eq!(s["restarts"], 1);
    assert_ne!(pids(&s), old);
    for item in ["a", "b", "c", "d"] {
        assert_eq!(price(port, item).0, 200);
    }
    let now = d.wait_status("shop", "wired again", |s| {
        s["imports"][0]["state"] == "wired"
    });
    assert_eq!(pids(&now), pids(&shop), "shop was not restarted");
    assert_eq!(now["restarts"], 0);

    // No exporter at all: the import is not wired any more, and a call
    // says why once its wait for a channel is over.
    d.ctl_ok(&["uninstall", "pricing"]);
    let s = d.wait_status("shop", "waiting", |s| s["imports"][0]["state"] == "waiting");
    assert_eq!(
        s["imports"][0]["reason"], "no running module exports it",
        "{s}"
    );
    let (st, body) = price(port, "apple");
    assert_eq!(st, 503, "{body}");
    assert!(
        body.starts_with("no exporter of service `pricing` connected within"),
        "{body}"
    );
}

#[test]
fn calls_are_spread_over_the_replicas_and_a_replica_killed_costs_no_call() {
    let d = Daemon::start(FAST);
    let pricing = guide_module(&d, "pricing", |t| t);
    d.ctl_ok(&["install", pricing.to_str().unwrap()]);
    let port = install_shop(&d, |t| t);
    d.wait_status("shop", "wired", |s| {
        running(s) && s["imports"][0]["state"] == "wired"
    });
    let both = ["pricing@0.1.0#0", "pricing@0.1.0#1"];
    // Once shop holds a channel to each replica...
    poll_until("a call to each replica", Duration::ZERO, || {
        let seen: Vec<String> = (0..4).map(|_| price(port, "x").1).collect();
        if both.iter().all(|r| seen.iter().any(|s| s == r)) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    });
    // ...calls take turns.
    let mut count = [0u32; 2];
    for i in 0..40 {
        let (st, who) = price(port, &format!("item{i}"));
        assert_eq!(st, 200, "{who}");
        count[both.iter().position(|r| *r == who).unwrap()] += 1;
    }
    assert!(count[0] >= 10 && count[1] >= 10, "{count:?}");

    // A caller in a loop while one replica is killed: not one call fails.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let caller = {
        let (stop, calls) = (stop.clone(), calls.clone());
        std::thread::spawn(move || {
            let mut failed = Vec::new();
            let mut served = [0u32; 2];
            while !stop.load(Ordering::Relaxed) {
                let (st, who) = price(port, "loop");
                calls.fetch_add(1, Ordering::Relaxed);
                match both.iter().position(|r| *r == who) {
                    Some(i) if st == 200 => served[i] += 1,
                    _ => failed.push(format!("{st} {who}")),
                }
            }
            (failed, served)
        })
    };
    let at_least = |n: u64| {
        let calls = calls.clone();
        poll_until("calls", Duration::from_millis(5), move || {
            let c = calls.load(Ordering::Relaxed);
            if c >= n {
                Ok(c)
            } else {
                Err(c.to_string())
            }
        })
    };
    let before = at_least(20);
    let old = pids(&d.ctl_json(&["status", "pricing"])["status"]);
    kill9(old[1]);
    let s = d.wait_status("pricing", "replica 1 restarted", |s| {
        running(s) && s["restarts"] == 1
    });
    assert_ne!(pids(&s), old);
    // Some calls after the restart, which reach the new replica too.
    let restarted = calls.load(Ordering::Relaxed);
    at_least(restarted + 40);
    stop.store(true, Ordering::Relaxed);
    let (failed, served) = caller.join().unwrap();
    assert_eq!(failed, Vec::<String>::new(), "calls failed");
    assert!(served[0] > 0 && served[1] > 0, "{served:?}");
    assert!(before >= 20);
}

#[test]
fn an_import_of_another_schema_version_waits_naming_both() {
    let d = Daemon::start(FAST);
    let pricing = guide_module(&d, "pricing", replicas(1));
    d.ctl_ok(&["install", pricing.to_str().unwrap()]);
    d.wait_status("pricing", "running", running);
    let v2 = |t: String| {
        t.replace(
            "name = \"pricing\"\nversion = 1",
            "name = \"pricing\"\nversion = 2",
        )
    };
    install_shop(&d, v2);
    let want = "waiting for service pricing version 2: pricing exports version 1";
    let s = d.wait_status("shop", "held", |s| s["state"] == "waiting");
    assert_eq!(s["reason"], want, "{s}");
    assert_eq!(s["imports"][0]["version"], 2, "{s}");
    let text = String::from_utf8_lossy(&d.ctl_ok(&["status", "shop"]).stdout).into_owned();
    assert!(text.contains(want), "{text}");
    assert!(
        text.contains("imports: pricing v2 waiting: pricing exports version 1"),
        "{text}"
    );
    let list = String::from_utf8_lossy(&d.ctl_ok(&["list"]).stdout).into_owned();
    assert!(
        list.lines()
            .any(|l| l.starts_with("shop") && l.contains("waiting")),
        "{list}"
    );
    // Its pricing channel never existed: pricing serves nobody.
    assert_eq!(
        channel_segments(pids(&d.ctl_json(&["status", "pricing"])["status"])[0] as i32),
        Default::default()
    );
}

/// Keeps the helpers honest: the extraction finds exactly the files the
/// guide heads with a path.
#[test]
fn the_guide_shows_each_file_once() {
    let files = guide_files();
    let mut paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    let n = paths.len();
    paths.sort_unstable();
    paths.dedup();
    assert_eq!(paths.len(), n, "a file shown twice: {paths:?}");
    assert!(files.iter().all(|(_, body)| !body.trim().is_empty()));
}
